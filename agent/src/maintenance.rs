//! Scheduled maintenance in the daemon: `[daemon] verify-schedule` (with
//! `verify-deep-percent`, a random share of the chunks read in full each
//! run) and `gc-schedule`, cron expressions like the images' schedules.
//!
//! A task runs on a blocking thread with its own store and catalog handles
//! and the locks its command takes (`verify`: the store lock shared, and
//! exclusive only to move a corrupt chunk aside; `gc`: its `gc` lock and the
//! exclusive store lock for the sweep, so it waits for running backups).
//! Its result is kept as agent state in the catalog and written into the
//! metrics file:
//!
//! * `blockvault_verify_last_run_timestamp_seconds`,
//!   `blockvault_verify_last_success_timestamp_seconds`,
//!   `blockvault_verify_last_run_success`, `blockvault_verify_problems`
//!   (findings of the last run), `blockvault_verify_invalid_backups`;
//! * `blockvault_gc_last_run_timestamp_seconds`,
//!   `blockvault_gc_last_success_timestamp_seconds`,
//!   `blockvault_gc_last_run_success`, `blockvault_gc_last_freed_bytes`,
//!   `blockvault_gc_freed_bytes_total`.
//!
//! A failed task (a verify that finds a problem, or an error) runs the
//! `[daemon] on-failure` hook (else `[defaults] on-failure`); a task
//! cancelled by a daemon stop is not a failure and is not recorded.

use std::fmt::Write as _;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::context::Ctx;
use crate::error::BackupError;
use crate::notify::{self, Job};

/// Threads a scheduled verify reads chunks with (as `blockvault verify`).
const VERIFY_THREADS: usize = 4;

/// A maintenance task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Task {
    Verify,
    Gc,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Verify => "verify",
            Task::Gc => "gc",
        }
    }

    fn job(self) -> Job {
        match self {
            Task::Verify => Job::Verify,
            Task::Gc => Job::Gc,
        }
    }

    /// The configured schedules: `(task, cron expression)`.
    pub fn scheduled(cfg: &Config) -> Vec<(Task, String)> {
        let mut v = Vec::new();
        if let Some(s) = &cfg.daemon.verify_schedule {
            v.push((Task::Verify, s.clone()));
        }
        if let Some(s) = &cfg.daemon.gc_schedule {
            v.push((Task::Gc, s.clone()));
        }
        v
    }
}

/// What the last run of a task did (agent state in the catalog).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// RFC 3339 UTC time the last run ended.
    pub last_run: String,
    pub success: bool,
    /// When the last successful run ended.
    pub last_success: Option<String>,
    pub duration_ms: u64,
    /// verify: findings; gc: 0.
    pub problems: u64,
    /// verify: backups marked invalid (also stale marks).
    pub invalid_backups: u64,
    /// verify: chunks read in full.
    pub deep_chunks: u64,
    /// gc: bytes freed by the last run, and by every run so far.
    pub freed_bytes: u64,
    pub freed_bytes_total: u64,
    pub error: Option<String>,
}

fn key(t: Task) -> String {
    format!("maintenance:{}", t.as_str())
}

/// The recorded state of `t`; `None` before its first run.
///
/// # Errors
/// Catalog errors.
pub fn state(ctx: &Ctx, t: Task) -> Result<Option<TaskState>> {
    Ok(ctx.catalog.agent_state(&key(t))?.and_then(|v| serde_json::from_str(&v).ok()))
}

/// What one run found, before it is recorded.
struct Outcome {
    ok: bool,
    problems: u64,
    invalid: u64,
    deep_chunks: u64,
    freed: u64,
    error: Option<String>,
}

fn run_verify(ctx: &Ctx, cancel: &AtomicBool) -> Result<Outcome> {
    let opts = crate::verify::VerifyOptions {
        deep: false,
        deep_percent: ctx.cfg.daemon.verify_deep_percent.unwrap_or(0.0),
        source: false,
        threads: ctx.cfg.workers().clamp(1, VERIFY_THREADS),
        progress: false,
        cancel,
    };
    let r = crate::verify::run(ctx, None, &opts)?;
    let mut invalid: std::collections::BTreeSet<u64> = r.invalid.iter().copied().collect();
    invalid.extend(r.stale_invalid.iter().map(|(id, _)| *id));
    let ok = r.is_clean();
    let error = (!ok).then(|| match r.findings.first() {
        Some(f) => format!("verify found {} problems, e.g. {f}", r.findings.len()),
        None => format!("{} backups stay marked invalid by an earlier verify", invalid.len()),
    });
    Ok(Outcome {
        ok,
        problems: r.findings.len() as u64,
        invalid: invalid.len() as u64,
        deep_chunks: r.deep_sampled,
        freed: 0,
        error,
    })
}

fn run_gc(ctx: &Ctx) -> Result<Outcome> {
    let out = crate::gc::run(&ctx.cfg, &ctx.store, false)?;
    let freed = out.report.as_ref().map_or(0, |r| r.removed_bytes);
    Ok(Outcome { ok: true, problems: 0, invalid: 0, deep_chunks: 0, freed, error: None })
}

/// Runs one task (blocking), records it, writes the metrics file and runs
/// the failure hook when it failed. Returns whether it succeeded (a cancel
/// counts as success: nothing is recorded).
pub fn run_task(cfg: Config, t: Task, cancel: &AtomicBool) -> bool {
    let started = Instant::now();
    info!(task = t.as_str(), "scheduled maintenance started");
    let ctx = match Ctx::open(cfg.clone()) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{e:#}");
            error!(task = t.as_str(), error = %msg, "cannot open the store or catalog");
            notify::maintenance_failed(&cfg, t.job(), &msg);
            return false;
        }
    };
    let res = match t {
        Task::Verify => run_verify(&ctx, cancel),
        Task::Gc => run_gc(&ctx),
    };
    let out = match res {
        Ok(o) => o,
        Err(e) if BackupError::is_cancelled(&e) => {
            warn!(task = t.as_str(), "scheduled maintenance cancelled");
            return true;
        }
        Err(e) => Outcome { ok: false, problems: 0, invalid: 0, deep_chunks: 0, freed: 0, error: Some(format!("{e:#}")) },
    };
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let prev = state(&ctx, t).ok().flatten().unwrap_or_default();
    let st = TaskState {
        last_run: now.clone(),
        success: out.ok,
        last_success: if out.ok { Some(now) } else { prev.last_success },
        duration_ms: started.elapsed().as_millis() as u64,
        problems: out.problems,
        invalid_backups: out.invalid,
        deep_chunks: out.deep_chunks,
        freed_bytes: out.freed,
        freed_bytes_total: prev.freed_bytes_total + out.freed,
        error: out.error.clone(),
    };
    if let Err(e) = serde_json::to_string(&st).map_err(anyhow::Error::from).and_then(|v| Ok(ctx.catalog.set_agent_state(&key(t), &v)?)) {
        warn!(task = t.as_str(), error = %format!("{e:#}"), "could not record the maintenance result");
    }
    crate::metrics::write_logged(&ctx);
    if out.ok {
        info!(task = t.as_str(), problems = out.problems, freed_bytes = out.freed, duration_ms = st.duration_ms, "scheduled maintenance done");
    } else {
        let msg = out.error.unwrap_or_default();
        error!(task = t.as_str(), error = %msg, "scheduled maintenance failed");
        notify::maintenance_failed(&ctx.cfg, t.job(), &msg);
    }
    out.ok
}

fn unix(ts: &str) -> Option<f64> {
    DateTime::parse_from_rfc3339(ts).ok().map(|t| t.timestamp_millis() as f64 / 1000.0)
}

/// Appends the maintenance families to the metrics text: for each task
/// that is scheduled or has run.
///
/// # Errors
/// Catalog errors.
pub fn render(ctx: &Ctx, o: &mut String) -> Result<()> {
    for t in [Task::Verify, Task::Gc] {
        let scheduled = Task::scheduled(&ctx.cfg).iter().any(|(s, _)| *s == t);
        let st = state(ctx, t)?;
        if !scheduled && st.is_none() {
            continue;
        }
        let st = st.unwrap_or_default();
        let n = t.as_str();
        let mut g = |name: &str, kind: &str, help: &str, v: Option<f64>| {
            let Some(v) = v else { return };
            let _ = writeln!(o, "# HELP blockvault_{n}_{name} {help}");
            let _ = writeln!(o, "# TYPE blockvault_{n}_{name} {kind}");
            let _ = writeln!(o, "blockvault_{n}_{name} {v}");
        };
        g("last_run_timestamp_seconds", "gauge", "Unix time the last scheduled run ended.", unix(&st.last_run));
        g(
            "last_success_timestamp_seconds",
            "gauge",
            "Unix time the last successful scheduled run ended.",
            st.last_success.as_deref().and_then(unix),
        );
        let ran = !st.last_run.is_empty();
        g("last_run_success", "gauge", "1 if the last scheduled run succeeded, 0 if not.", ran.then_some(f64::from(u8::from(st.success))));
        match t {
            Task::Verify => {
                g("problems", "gauge", "Problems the last scheduled verify found.", ran.then_some(st.problems as f64));
                g("invalid_backups", "gauge", "Backups marked invalid after the last scheduled verify.", ran.then_some(st.invalid_backups as f64));
                g("deep_chunks", "gauge", "Chunks the last scheduled verify read in full (verify-deep-percent).", ran.then_some(st.deep_chunks as f64));
            }
            Task::Gc => {
                g("last_freed_bytes", "gauge", "Stored bytes the last scheduled gc freed.", ran.then_some(st.freed_bytes as f64));
                g("freed_bytes_total", "counter", "Stored bytes scheduled gc runs freed.", ran.then_some(st.freed_bytes_total as f64));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<Config> {
        Config::parse(&format!("[store]\npath = \"/s\"\n{extra}"), std::path::Path::new("/t.toml"))
    }

    #[test]
    fn maintenance_keys_are_checked_at_load() {
        let c = parse("[daemon]\nverify-schedule = \"@daily\"\nverify-deep-percent = 5\ngc-schedule = \"0 5 * * Sun\"\non-failure = \"true\"\n").unwrap();
        assert_eq!(Task::scheduled(&c).iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![Task::Verify, Task::Gc]);
        let e = format!("{:#}", parse("[daemon]\nverify-deep-percent = 101\n").unwrap_err());
        assert!(e.contains("daemon.verify-deep-percent"), "{e}");
        let e = format!("{:#}", parse("[daemon]\ngc-schedule = \"61 1 * * *\"\n").unwrap_err());
        assert!(e.contains("daemon.gc-schedule"), "{e}");
        let e = format!("{:#}", parse("[[image]]\nname = \"a\"\nsource = \"file:/a\"\nlabels = { \"bad key\" = \"x\" }\n").unwrap_err());
        assert!(e.contains("labels") && e.contains("bad key"), "{e}");
        let c = parse("[defaults]\non-failure = \"d\"\non-failure-timeout = \"5s\"\n[[image]]\nname = \"a\"\nsource = \"file:/a\"\n[[image]]\nname = \"b\"\nsource = \"file:/b\"\non-failure = \"own\"\n").unwrap();
        assert_eq!(c.images[0].on_failure(&c.defaults).as_deref(), Some("d"));
        assert_eq!(c.images[1].on_failure(&c.defaults).as_deref(), Some("own"));
        assert_eq!(c.defaults.on_failure_timeout.map(|d| d.0.as_secs()), Some(5));
    }
}
