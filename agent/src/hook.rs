//! Snapshot hooks: a command run before the point in time is fixed (e.g.
//! `fsfreeze -f /mnt/db`, `virsh domfsfreeze vm`) and one run right after
//! (`fsfreeze -u`, `virsh domfsthaw`), through `/bin/sh -c`.
//!
//! The rule that matters: **the post hook runs exactly once whenever the
//! pre hook ran**, whatever happened in between (the pre hook failed or
//! timed out, the snapshot failed, SIGTERM). A filesystem left frozen hangs
//! the workload it was meant to protect. [`Frozen`] is the guard that
//! enforces it: [`Frozen::pre`] runs the pre hook and, when that fails,
//! runs the post hook before returning the error; a [`Frozen`] that is
//! dropped without [`Frozen::post`] (an early `?`, a panic unwinding) runs
//! it in `Drop`.
//!
//! Each hook runs in its own process group; on timeout (or, for the pre
//! hook, on cancellation) the whole group is killed with SIGKILL, so a
//! shell's children do not outlive it. The post hook is never cancelled:
//! it only has its timeout, since interrupting a thaw is worse than a slow
//! shutdown. Hook output (stdout and stderr) goes to an unnamed temporary
//! file, not a pipe, so a background child still holding it never blocks
//! the agent; its tail is logged.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::error::BackupError;

/// Default `hook-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a running hook is polled for exit, timeout and cancellation.
const POLL: Duration = Duration::from_millis(20);

/// Bytes of a hook's output kept for the log (its tail).
const OUTPUT_TAIL: u64 = 4096;

/// The environment variables a hook sees, besides the agent's own.
#[derive(Clone, Debug, Default)]
pub struct HookEnv {
    /// `BLOCKVAULT_IMAGE`: the configured image name (or group name).
    pub image: String,
    /// `BLOCKVAULT_SOURCE`: the configured source (`rbd:pool/img`, `file:/…`).
    pub source: String,
    /// `BLOCKVAULT_SNAPSHOT`: the snapshot about to be created (empty for
    /// a source without snapshots).
    pub snapshot: String,
}

impl HookEnv {
    /// The `(name, value)` pairs given to the hook.
    pub fn vars(&self) -> [(&'static str, &str); 3] {
        [
            ("BLOCKVAULT_IMAGE", self.image.as_str()),
            ("BLOCKVAULT_SOURCE", self.source.as_str()),
            ("BLOCKVAULT_SNAPSHOT", self.snapshot.as_str()),
        ]
    }
}

/// The hooks around one point in time, as configured.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    pub pre: Option<String>,
    pub post: Option<String>,
    /// Per hook (the pre and the post hook each get this much).
    pub timeout: Duration,
}

impl Hooks {
    /// True when neither hook is set.
    pub fn is_empty(&self) -> bool {
        self.pre.is_none() && self.post.is_none()
    }
}

/// How a hook ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// It exited non-zero or was killed by a signal.
    #[error("{which} hook `{cmd}` failed ({status}){}", tail_suffix(.output))]
    Failed { which: &'static str, cmd: String, status: ExitStatus, output: String },
    /// It ran longer than the timeout; its process group was killed.
    #[error("{which} hook `{cmd}` timed out after {timeout:?}; its process group was killed{}", tail_suffix(.output))]
    TimedOut { which: &'static str, cmd: String, timeout: Duration, output: String },
}

fn tail_suffix(output: &str) -> String {
    let t = output.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(": {t}")
    }
}

/// Runs `cmd` with `/bin/sh -c` in a new process group, with `env` added
/// to the agent's environment and stdin from `/dev/null`; waits for it at
/// most `timeout`. When `cancel` is given and becomes set, the hook's
/// process group is killed and [`BackupError::Cancelled`] returned. `which`
/// names the hook in logs and errors (`"pre-snapshot"`). Returns the tail
/// of its output (stdout and stderr interleaved).
///
/// # Errors
/// [`HookError::Failed`], [`HookError::TimedOut`], `BackupError::Cancelled`,
/// or the shell could not be started.
pub fn run_hook(
    which: &'static str,
    cmd: &str,
    env: &HookEnv,
    timeout: Duration,
    cancel: Option<&AtomicBool>,
) -> Result<String> {
    let mut out = tempfile::tempfile().context("creating a temporary file for hook output")?;
    let err = out.try_clone().context("duplicating the hook output file")?;
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.vars())
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().context("duplicating the hook output file")?))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {which} hook `{cmd}` with /bin/sh"))?;
    let pgid = rustix::process::Pid::from_child(&child);
    info!(hook = which, cmd, pid = child.id(), "running hook");
    let kill_group = |child: &mut std::process::Child| {
        // the group first (the shell's children), then reap the shell
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        let _ = child.kill();
        let _ = child.wait();
    };
    let status = loop {
        if let Some(s) = child.try_wait().with_context(|| format!("waiting for {which} hook `{cmd}`"))? {
            break s;
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            kill_group(&mut child);
            warn!(hook = which, cmd, "cancelled: the hook's process group was killed");
            return Err(BackupError::Cancelled.into());
        }
        if started.elapsed() >= timeout {
            kill_group(&mut child);
            let output = tail(&mut out);
            return Err(HookError::TimedOut { which, cmd: cmd.to_string(), timeout, output }.into());
        }
        std::thread::sleep(POLL);
    };
    // whatever the shell left running in its group goes with it: a hook is
    // over when its shell exits
    let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    let output = tail(&mut out);
    let ms = started.elapsed().as_millis() as u64;
    if !status.success() {
        return Err(HookError::Failed { which, cmd: cmd.to_string(), status, output }.into());
    }
    info!(hook = which, cmd, duration_ms = ms, output = %output.trim(), "hook succeeded");
    Ok(output)
}

/// The last [`OUTPUT_TAIL`] bytes written to `f`, lossily decoded.
fn tail(f: &mut std::fs::File) -> String {
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL)));
    let mut buf = Vec::new();
    let _ = f.take(OUTPUT_TAIL).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The time between the pre and the post hook. While a `Frozen` lives the
/// post hook is owed; it runs exactly once, in [`Frozen::post`] or on drop.
#[must_use = "dropping a Frozen runs the post hook at once"]
pub struct Frozen<'a> {
    hooks: &'a Hooks,
    env: HookEnv,
    /// The post hook is still owed.
    owed: bool,
}

impl<'a> Frozen<'a> {
    /// Runs the pre hook (if any). On success the post hook is owed by the
    /// returned guard. On failure (exit, timeout, `cancel` set) the post
    /// hook has already run once when this returns; the error is the pre
    /// hook's (a post hook failure then is only logged).
    ///
    /// # Errors
    /// The pre hook failed, timed out or was cancelled.
    pub fn pre(hooks: &'a Hooks, env: HookEnv, cancel: &AtomicBool) -> Result<Frozen<'a>> {
        let mut guard = Frozen { hooks, env, owed: true };
        if let Some(cmd) = &hooks.pre {
            if let Err(e) = run_hook("pre-snapshot", cmd, &guard.env, hooks.timeout, Some(cancel)) {
                warn!(image = %guard.env.image, error = %format!("{e:#}"), "pre-snapshot hook did not succeed: running the post-snapshot hook, no snapshot is taken");
                guard.run_post_logged();
                return Err(e);
            }
        }
        Ok(guard)
    }

    /// Runs the post hook now (if any), once.
    ///
    /// # Errors
    /// The post hook failed or timed out.
    pub fn post(mut self) -> Result<()> {
        self.owed = false;
        match &self.hooks.post {
            Some(cmd) => run_hook("post-snapshot", cmd, &self.env, self.hooks.timeout, None).map(|_| ()),
            None => Ok(()),
        }
    }

    fn run_post_logged(&mut self) {
        if !std::mem::replace(&mut self.owed, false) {
            return;
        }
        if let Some(cmd) = &self.hooks.post {
            if let Err(e) = run_hook("post-snapshot", cmd, &self.env, self.hooks.timeout, None) {
                warn!(image = %self.env.image, error = %format!("{e:#}"), "post-snapshot hook did not succeed");
            }
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.run_post_logged();
    }
}

/// Runs `fix` (the step that fixes the point in time) between the pre and
/// the post hook of `hooks`: pre → `fix` → post, the post hook exactly once
/// whenever the pre hook ran. A pre hook that fails means `fix` never runs.
/// A failing post hook after a successful `fix` fails the whole: the
/// workload may still be frozen and the operator must know (a backup that
/// fails is what alerts); the caller's clean-up of a failed backup then
/// removes the snapshot `fix` made.
///
/// # Errors
/// The pre hook's error, `fix`'s error, or the post hook's error.
pub fn around<T>(hooks: &Hooks, env: HookEnv, cancel: &AtomicBool, fix: impl FnOnce() -> Result<T>) -> Result<T> {
    if hooks.is_empty() {
        return fix();
    }
    let frozen = Frozen::pre(hooks, env, cancel)?;
    let fixed = fix();
    let post = frozen.post();
    match (fixed, post) {
        (Ok(v), Ok(())) => Ok(v),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(p)) => {
            warn!(error = %format!("{p:#}"), "post-snapshot hook did not succeed either");
            Err(e)
        }
        (Ok(_), Err(p)) => bail!("{p:#} (after the snapshot was taken; the backup is failed so that it is noticed)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env() -> HookEnv {
        HookEnv { image: "img".into(), source: "file:/x".into(), snapshot: "blockvault-s".into() }
    }

    fn hooks(dir: &Path, pre: &str, post_extra: &str, timeout_ms: u64) -> Hooks {
        let log = dir.join("log");
        Hooks {
            pre: Some(format!("echo pre >> {}; {pre}", log.display())),
            post: Some(format!("echo \"post $BLOCKVAULT_IMAGE $BLOCKVAULT_SNAPSHOT\" >> {}; {post_extra}", log.display())),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn log(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    }

    #[test]
    fn env_is_passed_and_output_kept() {
        let out = run_hook("pre-snapshot", "echo \"$BLOCKVAULT_IMAGE|$BLOCKVAULT_SOURCE|$BLOCKVAULT_SNAPSHOT\"; echo err >&2", &env(), DEFAULT_TIMEOUT, None).unwrap();
        assert_eq!(out, "img|file:/x|blockvault-s\nerr\n");
    }

    #[test]
    fn success_runs_fix_between_pre_and_post() {
        let d = tempfile::tempdir().unwrap();
        let h = hooks(d.path(), "true", "true", 10_000);
        let never = AtomicBool::new(false);
        let l = d.path().join("log");
        let v = around(&h, env(), &never, || {
            std::fs::write(&l, format!("{}fix\n", log(d.path())))?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(v, 7);
        assert_eq!(log(d.path()), "pre\nfix\npost img blockvault-s\n");
    }

    #[test]
    fn failing_pre_hook_skips_fix_and_runs_post_once() {
        let d = tempfile::tempdir().unwrap();
        let h = hooks(d.path(), "echo frozen-fail >&2; exit 3", "true", 10_000);
        let never = AtomicBool::new(false);
        let mut ran = false;
        let e = around(&h, env(), &never, || {
            ran = true;
            Ok(())
        })
        .unwrap_err();
        assert!(!ran);
        let msg = format!("{e:#}");
        assert!(msg.contains("exit status: 3") && msg.contains("frozen-fail"), "{msg}");
        assert_eq!(log(d.path()), "pre\npost img blockvault-s\n");
    }

    #[test]
    fn timed_out_pre_hook_kills_its_group_and_runs_post_once() {
        let d = tempfile::tempdir().unwrap();
        // a child of the shell that would write after the timeout if it survived
        let late = d.path().join("late");
        let h = hooks(d.path(), &format!("(sleep 2; touch {}) & sleep 30", late.display()), "true", 300);
        let never = AtomicBool::new(false);
        let e = around(&h, env(), &never, || Ok(())).unwrap_err();
        assert!(matches!(e.downcast_ref::<HookError>(), Some(HookError::TimedOut { .. })), "{e:#}");
        assert_eq!(log(d.path()), "pre\npost img blockvault-s\n");
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!late.exists(), "a child of the timed-out hook survived the kill of its process group");
    }

    #[test]
    fn cancel_during_pre_hook_runs_post_once() {
        let d = tempfile::tempdir().unwrap();
        let h = hooks(d.path(), "sleep 30", "true", 60_000);
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.store(true, Ordering::Relaxed);
        });
        let e = around(&h, env(), &cancel, || Ok(())).unwrap_err();
        setter.join().unwrap();
        assert!(BackupError::is_cancelled(&e), "{e:#}");
        assert_eq!(log(d.path()), "pre\npost img blockvault-s\n");
    }

    #[test]
    fn failing_fix_runs_post_once_and_keeps_its_error() {
        let d = tempfile::tempdir().unwrap();
        let h = hooks(d.path(), "true", "true", 10_000);
        let never = AtomicBool::new(false);
        let e = around(&h, env(), &never, || -> Result<()> { bail!("snapshot failed") }).unwrap_err();
        assert_eq!(format!("{e:#}"), "snapshot failed");
        assert_eq!(log(d.path()), "pre\npost img blockvault-s\n");
    }

    #[test]
    fn failing_post_hook_fails_the_whole() {
        let d = tempfile::tempdir().unwrap();
        let h = hooks(d.path(), "true", "exit 1", 10_000);
        let never = AtomicBool::new(false);
        let e = around(&h, env(), &never, || Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("post-snapshot hook"), "{e:#}");
        assert_eq!(log(d.path()), "pre\npost img blockvault-s\n");
    }

    #[test]
    fn a_dropped_guard_runs_post_once() {
        let d = tempfile::tempdir().unwrap();
        let h = hooks(d.path(), "true", "true", 10_000);
        let never = AtomicBool::new(false);
        {
            let _g = Frozen::pre(&h, env(), &never).unwrap();
        }
        assert_eq!(log(d.path()), "pre\npost img blockvault-s\n");
    }
}
