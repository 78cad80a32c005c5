//! The failure hook: `on-failure = "CMD"` on an image, in `[defaults]`, or
//! in `[daemon]` for scheduled verify and gc. When a job fails (not when it
//! is cancelled), `CMD` runs once through `/bin/sh -c` with
//!
//! * `BLOCKVAULT_JOB`: `backup`, `verify` or `gc`;
//! * `BLOCKVAULT_IMAGE`: the image (empty for verify and gc);
//! * `BLOCKVAULT_ERROR`: the error, one line;
//! * `BLOCKVAULT_CONFIG`: the config file.
//!
//! Its stdin is `/dev/null` and its stdout goes to blockvault's stderr (so
//! `--json` output stays clean). It runs in a process group of its own,
//! killed when it outlives `[defaults] on-failure-timeout` (default 60 s).
//! A hook that fails or times out is logged; it never changes the outcome
//! of the job.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::Config;

/// Default limit on how long the hook may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a running hook is polled.
const POLL: Duration = Duration::from_millis(50);

/// What failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    Backup,
    Verify,
    Gc,
}

impl Job {
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Backup => "backup",
            Job::Verify => "verify",
            Job::Gc => "gc",
        }
    }
}

/// How a hook ended.
#[derive(Debug, PartialEq, Eq)]
pub enum HookOutcome {
    Exited(i32),
    /// Killed by a signal (not ours).
    Signalled,
    TimedOut,
    SpawnFailed(String),
}

/// Runs `cmd` for a failed job (see the module docs) and waits for it.
pub fn run_hook(cmd: &str, job: Job, image: &str, error: &str, config: &std::path::Path, timeout: Duration) -> HookOutcome {
    let one_line = error.replace('\n', " ");
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("BLOCKVAULT_JOB", job.as_str())
        .env("BLOCKVAULT_IMAGE", image)
        .env("BLOCKVAULT_ERROR", &one_line)
        .env("BLOCKVAULT_CONFIG", config)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .process_group(0);
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => return HookOutcome::SpawnFailed(e.to_string()),
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.code().map_or(HookOutcome::Signalled, HookOutcome::Exited),
            Ok(None) if start.elapsed() >= timeout => {
                if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return HookOutcome::TimedOut;
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return HookOutcome::SpawnFailed(e.to_string()),
        }
    }
}

/// Runs the configured hook, if any, for a failed job and logs how it
/// ended. `cmd` is the hook that applies (the image's, `[defaults]`', or
/// `[daemon]`'s); `None` does nothing.
pub fn on_failure(cfg: &Config, cmd: Option<&str>, job: Job, image: &str, error: &str) {
    let Some(cmd) = cmd.filter(|c| !c.trim().is_empty()) else { return };
    let timeout = cfg.defaults.on_failure_timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
    let out = run_hook(cmd, job, image, error, &cfg.path, timeout);
    match out {
        HookOutcome::Exited(0) => info!(job = job.as_str(), image, "on-failure hook ran"),
        HookOutcome::Exited(code) => warn!(job = job.as_str(), image, code, "on-failure hook exited non-zero"),
        HookOutcome::Signalled => warn!(job = job.as_str(), image, "on-failure hook was killed by a signal"),
        HookOutcome::TimedOut => {
            warn!(job = job.as_str(), image, timeout_s = timeout.as_secs(), "on-failure hook timed out and was killed")
        }
        HookOutcome::SpawnFailed(e) => warn!(job = job.as_str(), image, error = %e, "on-failure hook could not be started"),
    }
}

/// [`on_failure`] for a failed backup of `img`, with its hook.
pub fn backup_failed(cfg: &Config, img: &crate::config::ImageConfig, error: &anyhow::Error) {
    if crate::error::BackupError::is_cancelled(error) {
        return;
    }
    on_failure(cfg, img.on_failure(&cfg.defaults).as_deref(), Job::Backup, &img.name, &format!("{error:#}"));
}

/// [`on_failure`] for a failed scheduled verify or gc: `[daemon] on-failure`,
/// else `[defaults] on-failure`.
pub fn maintenance_failed(cfg: &Config, job: Job, error: &str) {
    let cmd = cfg.daemon.on_failure.clone().or_else(|| cfg.defaults.on_failure.clone());
    on_failure(cfg, cmd.as_deref(), job, "", error);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = format!("printf '%s|%s|%s' \"$BLOCKVAULT_JOB\" \"$BLOCKVAULT_IMAGE\" \"$BLOCKVAULT_ERROR\" > {}; exit 3", out.display());
        let o = run_hook(&cmd, Job::Backup, "vm1", "a\nb", std::path::Path::new("/c.toml"), DEFAULT_TIMEOUT);
        assert_eq!(o, HookOutcome::Exited(3));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "backup|vm1|a b");
    }

    #[test]
    fn a_hung_hook_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let cmd = format!("sleep 300 & echo $! > {}; wait", pid.display());
        let o = run_hook(&cmd, Job::Gc, "", "x", std::path::Path::new("/c"), Duration::from_millis(500));
        assert_eq!(o, HookOutcome::TimedOut);
        // the background child was killed too (gone, or a zombie until reaped)
        // SIGKILL is delivered asynchronously: the child may still show as
        // running for a moment after the group was killed, so give it a few
        // seconds (a child that was not killed sleeps for 300).
        let pid = std::fs::read_to_string(&pid).unwrap();
        let dead = |stat: &str| stat.is_empty() || stat.contains(") Z ") || stat.contains(") X ");
        let mut stat = String::new();
        for _ in 0..100 {
            stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
            if dead(&stat) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(dead(&stat), "the hook's child still runs: {stat}");
    }
}
