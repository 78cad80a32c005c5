//! `blockvault daemon`: runs every image on its cron schedule.
//!
//! # Model
//! One async loop owns all state: the config, each scheduled image's next
//! firing, a queue of due images and the running jobs. It wakes for the next
//! firing, a finished job, a signal, or a watchdog ping (and at least once a
//! minute, re-reading the wall clock, so a clock change or a suspend only
//! delays a firing until the next wake-up).
//!
//! - When an image's time comes (its cron time plus a fresh random delay of
//!   up to `[daemon] random-delay`), it joins the queue, unless it is already
//!   queued or running: that firing is skipped with a log line, so an image
//!   never runs twice at once and a slow backup does not pile up runs.
//! - Queued images start in order while fewer than `[daemon] max-concurrent`
//!   jobs run. Firings missed while the daemon was down are not caught up
//!   (a systemd timer with `Persistent=true` does that). A run that finds
//!   the image locked by another process (a `blockvault backup` by hand)
//!   fails and counts as a failure in the metrics.
//! - A job is [`crate::job::run_image`] on a blocking thread with its own
//!   [`Ctx`] (a SQLite connection is not shared between threads); the
//!   pipeline's hashing and compression run on its own worker threads.
//! - SIGTERM / SIGINT: stop scheduling, set every running job's cancel flag
//!   (the pipeline stops at its next check; the backup is recorded as failed
//!   and nothing of it is committed), wait for the jobs, exit 0.
//! - SIGHUP: reload the config. An invalid file is logged and the running
//!   config kept. Added images are scheduled, removed ones are no longer
//!   started (a running job of one finishes), and an image whose schedule
//!   changed gets a new next firing; the others keep theirs.
//! - `[daemon] verify-schedule` and `gc-schedule`: maintenance tasks on
//!   their own cron schedules (no random delay), outside `max-concurrent`;
//!   a task still running at its next firing skips it. See
//!   [`crate::maintenance`]. A stop cancels a verify; a gc finishes first.
//! - systemd: READY=1 once running, RELOADING=1 / READY=1 around a reload,
//!   STATUS= with what runs and what is next, WATCHDOG=1 at half of
//!   WATCHDOG_USEC when the unit sets `WatchdogSec=`, STOPPING=1.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Local};
use rand::Rng;
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ImageConfig};
use crate::context::Ctx;
use crate::job;
use crate::maintenance::Task;

/// Longest sleep between wall-clock checks.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// When the store or catalog cannot be opened at start, or the runtime or
/// signal handlers cannot be set up.
pub fn run(cfg: Config) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("blockvault-daemon")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(Daemon::new(cfg).main())
}

/// One scheduled image.
struct Entry {
    expr: String,
    schedule: cron::Schedule,
    /// The next cron time, `None` when the schedule has no more.
    next: Option<DateTime<Local>>,
    /// `next` plus this firing's random delay: when the image is queued.
    due: Option<DateTime<Local>>,
}

struct Running {
    cancel: Arc<AtomicBool>,
    since: Instant,
}

/// What a task of the loop's `JoinSet` ends with.
enum Done {
    /// A backup job of one image.
    Job(String, JobReport),
    /// The expansion of a glob entry (named by its template): the images to
    /// queue, each as its own job (empty when it failed or matched nothing;
    /// the expansion logged and recorded that).
    Expanded(String, Vec<ImageConfig>),
    /// A maintenance task and whether it succeeded.
    Maint(Task, bool),
}

struct Daemon {
    cfg: Arc<Config>,
    entries: BTreeMap<String, Entry>,
    /// Images waiting for a slot: configured images, or one image a glob
    /// entry matched.
    queue: VecDeque<ImageConfig>,
    running: HashMap<String, Running>,
    /// Glob entries whose images are being listed.
    expanding: HashSet<String>,
    jobs: JoinSet<Done>,
    /// Scheduled maintenance tasks, and the ones running (their cancel flags).
    maint: BTreeMap<Task, Entry>,
    maint_running: HashMap<Task, Arc<AtomicBool>>,
    watchdog: Option<Duration>,
    last_ping: Instant,
    last_status: String,
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!(error = %e, "sd_notify failed");
    }
}

impl Daemon {
    fn new(cfg: Config) -> Daemon {
        let mut usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
        Daemon {
            cfg: Arc::new(cfg),
            entries: BTreeMap::new(),
            queue: VecDeque::new(),
            running: HashMap::new(),
            expanding: HashSet::new(),
            jobs: JoinSet::new(),
            maint: BTreeMap::new(),
            maint_running: HashMap::new(),
            watchdog,
            last_ping: Instant::now(),
            last_status: String::new(),
        }
    }

    async fn main(mut self) -> Result<ExitCode> {
        // first, so that a signal during the startup check is not fatal
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;

        // Fail fast on a missing store; also rebuilds an empty catalog once,
        // before jobs open their own handles, and writes the metrics file.
        let cfg = (*self.cfg).clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let ctx = Ctx::open(cfg)?;
            crate::release::release_trashed_logged(&ctx);
            crate::metrics::write_logged(&ctx);
            Ok(())
        })
        .await
        .map_err(|e| anyhow!("startup check panicked: {e}"))??;

        self.reschedule(Local::now(), true);
        info!(
            images = self.entries.len(),
            maintenance = self.maint.len(),
            max_concurrent = self.cfg.daemon.max_concurrent,
            random_delay_s = self.cfg.daemon.random_delay.0.as_secs(),
            watchdog_ms = self.watchdog.map(|d| d.as_millis() as u64),
            "daemon started"
        );
        notify(&[NotifyState::Ready]);
        self.ping();

        loop {
            let now = Local::now();
            self.fire_due(now);
            self.start_queued();
            self.publish_status();
            let sleep = self.sleep_for(Local::now());
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                Some(res) = self.jobs.join_next(), if !self.jobs.is_empty() => self.finished(res),
                _ = term.recv() => { info!("SIGTERM: stopping"); break; }
                _ = int.recv() => { info!("SIGINT: stopping"); break; }
                _ = hup.recv() => self.reload().await,
            }
            self.ping_if_due();
        }

        notify(&[NotifyState::Stopping]);
        self.queue.clear();
        for (name, r) in &self.running {
            info!(image = %name, "cancelling running backup");
            r.cancel.store(true, Ordering::Relaxed);
        }
        for (t, c) in &self.maint_running {
            info!(task = t.as_str(), "cancelling running maintenance");
            c.store(true, Ordering::Relaxed);
        }
        while !self.jobs.is_empty() {
            self.publish_status();
            let sleep = self.watchdog.unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
            tokio::select! {
                Some(res) = self.jobs.join_next() => self.finished(res),
                _ = tokio::time::sleep(sleep) => {}
                _ = term.recv() => info!("already stopping: waiting for running backups to cancel"),
                _ = int.recv() => info!("already stopping: waiting for running backups to cancel"),
                _ = hup.recv() => info!("stopping: config not reloaded"),
            }
            self.ping_if_due();
        }
        info!("daemon stopped");
        Ok(ExitCode::SUCCESS)
    }

    fn random_delay(&self) -> chrono::Duration {
        let max = self.cfg.daemon.random_delay.0.as_millis() as i64;
        if max == 0 {
            return chrono::Duration::zero();
        }
        chrono::Duration::milliseconds(rand::thread_rng().gen_range(0..=max))
    }

    /// Builds the schedule table from the config. Entries whose schedule
    /// is unchanged keep their next firing; new or changed ones get one.
    fn reschedule(&mut self, now: DateTime<Local>, startup: bool) {
        let mut old = std::mem::take(&mut self.entries);
        let cfg = self.cfg.clone();
        // an image in a group is backed up with its group only; a group is
        // scheduled under its name, which no image has
        let groups = cfg.groups.iter().map(|g| (g.name.clone(), g.schedule(&cfg.defaults)));
        let images = cfg.images.iter().filter(|i| cfg.group_of(&i.name).is_none()).map(|i| (i.name.clone(), i.schedule(&cfg.defaults)));
        for (name, expr) in images.chain(groups).collect::<Vec<_>>() {
            let img = Named { name };
            let Some(expr) = expr else {
                if startup {
                    warn!(image = %img.name, "no schedule (set `schedule` on the image or in [defaults]): the daemon never backs it up");
                }
                continue;
            };
            if let Some(e) = old.remove(&img.name).filter(|e| e.expr == expr) {
                self.entries.insert(img.name.clone(), e);
                continue;
            }
            // validated at load; a failure here would be a bug, not a config error
            let schedule = match crate::schedule::parse(&expr) {
                Ok(s) => s,
                Err(e) => {
                    error!(image = %img.name, error = %e, "bad schedule");
                    continue;
                }
            };
            let next = schedule.after(&now).next();
            let due = next.map(|n| n + self.random_delay());
            match next {
                Some(n) => info!(image = %img.name, schedule = %expr, next = %n.format("%Y-%m-%d %H:%M:%S"), "scheduled"),
                None => warn!(image = %img.name, schedule = %expr, "schedule has no future times"),
            }
            self.entries.insert(img.name.clone(), Entry { expr, schedule, next, due });
        }
        for name in old.keys() {
            info!(image = %name, "no longer scheduled");
        }
        let mut old = std::mem::take(&mut self.maint);
        for (t, expr) in Task::scheduled(&cfg) {
            if let Some(e) = old.remove(&t).filter(|e| e.expr == expr) {
                self.maint.insert(t, e);
                continue;
            }
            let schedule = match crate::schedule::parse(&expr) {
                Ok(s) => s,
                Err(e) => {
                    error!(task = t.as_str(), error = %e, "bad schedule");
                    continue;
                }
            };
            let next = schedule.after(&now).next();
            match next {
                Some(n) => info!(task = t.as_str(), schedule = %expr, next = %n.format("%Y-%m-%d %H:%M:%S"), "maintenance scheduled"),
                None => warn!(task = t.as_str(), schedule = %expr, "schedule has no future times"),
            }
            self.maint.insert(t, Entry { expr, schedule, next, due: next });
        }
        for t in old.keys() {
            info!(task = t.as_str(), "maintenance no longer scheduled");
        }
        let entries = &self.entries;
        self.queue.retain(|img| {
            let entry = cfg.entry_for(&img.name).map(|e| e.name.as_str()).or(cfg.group(&img.name).map(|g| g.name.as_str()));
            entry.is_some_and(|e| entries.contains_key(e))
        });
    }

    /// Starts every maintenance task whose time has come, unless it still runs.
    fn fire_maintenance(&mut self, now: DateTime<Local>) {
        let due: Vec<Task> = self.maint.iter().filter(|(_, e)| e.due.is_some_and(|d| d <= now)).map(|(t, _)| *t).collect();
        for t in due {
            let e = self.maint.get_mut(&t).expect("listed above");
            e.next = e.schedule.after(&now).next();
            e.due = e.next;
            if self.maint_running.contains_key(&t) {
                info!(task = t.as_str(), "previous maintenance run still running: skipping this run");
                continue;
            }
            let cancel = Arc::new(AtomicBool::new(false));
            let c = cancel.clone();
            let cfg = (*self.cfg).clone();
            self.jobs.spawn_blocking(move || {
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::maintenance::run_task(cfg, t, &c)))
                    .unwrap_or_else(|_| {
                        error!(task = t.as_str(), "maintenance task panicked");
                        false
                    });
                Done::Maint(t, ok)
            });
            self.maint_running.insert(t, cancel);
        }
    }

    /// Queues every image whose time has come, and sets its next firing.
    fn fire_due(&mut self, now: DateTime<Local>) {
        self.fire_maintenance(now);
        let names: Vec<String> =
            self.entries.iter().filter(|(_, e)| e.due.is_some_and(|d| d <= now)).map(|(n, _)| n.clone()).collect();
        for name in names {
            let delay = self.random_delay();
            let e = self.entries.get_mut(&name).expect("listed above");
            e.next = e.schedule.after(&now).next();
            e.due = e.next.map(|n| n + delay);
            if let Some(grp) = self.cfg.group(&name) {
                let slot = group_slot(&self.cfg, grp);
                self.enqueue(slot);
                continue;
            }
            let Ok(entry) = self.cfg.image(&name).cloned() else { continue };
            if entry.source.is_glob() {
                self.expand(entry);
            } else {
                self.enqueue(entry);
            }
        }
    }

    /// Queues one image unless it is running or queued already.
    fn enqueue(&mut self, img: ImageConfig) {
        let name = &img.name;
        if self.running.contains_key(name) {
            info!(image = %name, "previous backup still running: skipping this run");
        } else if self.queue.iter().any(|q| &q.name == name) {
            info!(image = %name, "still waiting for a free slot: skipping this run");
        } else {
            debug!(image = %name, "due");
            self.queue.push_back(img);
        }
    }

    /// Lists the images of a glob entry on a blocking thread (it talks to
    /// the cluster); each one found is then queued as its own job, so
    /// `max-concurrent` applies to them and each is reported by its name.
    fn expand(&mut self, entry: ImageConfig) {
        if !self.expanding.insert(entry.name.clone()) {
            info!(image = %entry.name, "still listing the images of this glob: skipping this run");
            return;
        }
        let cfg = (*self.cfg).clone();
        self.jobs.spawn_blocking(move || {
            let found = Ctx::open(cfg).and_then(|ctx| {
                let res = job::expand_for_run(&ctx, &entry);
                if res.is_err() {
                    // no job runs for it: the metrics say what was recorded
                    crate::metrics::write_logged(&ctx);
                }
                res
            });
            match found {
                Ok(v) => {
                    info!(image = %entry.name, images = v.len(), "glob expanded: queueing each image");
                    Done::Expanded(entry.name, v)
                }
                Err(e) => {
                    error!(image = %entry.name, error = %format!("{e:#}"), "cannot list the images to back up");
                    Done::Expanded(entry.name, Vec::new())
                }
            }
        });
    }

    fn start_queued(&mut self) {
        while self.running.len() < self.cfg.daemon.max_concurrent {
            let Some(img) = self.queue.pop_front() else { break };
            let name = img.name.clone();
            let cfg = (*self.cfg).clone();
            let cancel = Arc::new(AtomicBool::new(false));
            let c = cancel.clone();
            let n = name.clone();
            info!(image = %name, "starting scheduled backup");
            self.jobs.spawn_blocking(move || {
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(cfg, &img, &c)));
                let out = out.unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    error!(image = %n, panic = %msg, "backup job panicked");
                    JobReport { ok: false, committed: Vec::new() }
                });
                Done::Job(n, out)
            });
            self.running.insert(name, Running { cancel, since: Instant::now() });
        }
    }

    fn finished(&mut self, res: Result<Done, tokio::task::JoinError>) {
        match res {
            Ok(Done::Expanded(entry, images)) => {
                self.expanding.remove(&entry);
                if !self.entries.contains_key(&entry) {
                    return; // no longer scheduled (reloaded meanwhile)
                }
                for img in images {
                    self.enqueue(img);
                }
            }
            Ok(Done::Maint(t, ok)) => {
                self.maint_running.remove(&t);
                debug!(task = t.as_str(), ok, "maintenance finished");
            }
            Ok(Done::Job(name, rep)) => {
                let secs = self.running.remove(&name).map(|r| r.since.elapsed().as_secs()).unwrap_or(0);
                let ids: Vec<u64> = rep.committed.iter().map(|b| b.0).collect();
                if rep.ok {
                    info!(image = %name, backups = %join_ids(&ids), duration_s = secs, "scheduled run done");
                } else {
                    warn!(image = %name, backups = %join_ids(&ids), duration_s = secs, "scheduled run failed");
                }
            }
            // jobs are never aborted and panics are caught inside
            Err(e) => error!(error = %e, "backup job lost"),
        }
    }

    async fn reload(&mut self) {
        info!(config = %self.cfg.path.display(), "SIGHUP: reloading config");
        let mono = NotifyState::monotonic_usec_now().ok();
        let mut states = vec![NotifyState::Reloading];
        states.extend(mono);
        notify(&states);
        let path = self.cfg.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .unwrap_or_else(|e| Err(anyhow!("config reload panicked: {e}")));
        match loaded {
            Ok(cfg) => {
                self.cfg = Arc::new(cfg);
                self.reschedule(Local::now(), false);
                info!(images = self.entries.len(), "config reloaded");
            }
            Err(e) => error!(error = %format!("{e:#}"), "config reload failed: keeping the running config"),
        }
        notify(&[NotifyState::Ready]);
    }

    /// How long to sleep: until the next firing, a watchdog ping, or at most
    /// [`MAX_SLEEP`].
    fn sleep_for(&self, now: DateTime<Local>) -> Duration {
        let mut d = MAX_SLEEP;
        if let Some(due) = self.entries.values().chain(self.maint.values()).filter_map(|e| e.due).min() {
            d = d.min((due - now).to_std().unwrap_or(Duration::ZERO));
        }
        if let Some(w) = self.watchdog {
            d = d.min(w.saturating_sub(self.last_ping.elapsed()));
        }
        d
    }

    fn ping(&mut self) {
        if self.watchdog.is_some() {
            notify(&[NotifyState::Watchdog]);
            self.last_ping = Instant::now();
        }
    }

    fn ping_if_due(&mut self) {
        if self.watchdog.is_some_and(|w| self.last_ping.elapsed() >= w) {
            self.ping();
        }
    }

    fn publish_status(&mut self) {
        let mut parts = Vec::new();
        if !self.running.is_empty() {
            let mut r: Vec<_> = self.running.keys().map(String::as_str).collect();
            r.sort_unstable();
            parts.push(format!("running: {}", r.join(", ")));
        }
        if !self.maint_running.is_empty() {
            let m: Vec<&str> = self.maint_running.keys().map(|t| t.as_str()).collect();
            parts.push(format!("maintenance: {}", m.join(", ")));
        }
        if !self.queue.is_empty() {
            parts.push(format!("queued: {}", self.queue.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")));
        }
        if let Some((name, due)) = self.entries.iter().filter_map(|(n, e)| e.due.map(|d| (n, d))).min_by_key(|(_, d)| *d) {
            parts.push(format!("next: {name} at {}", due.format("%Y-%m-%d %H:%M:%S")));
        }
        if parts.is_empty() {
            parts.push("idle, nothing scheduled".into());
        }
        let status = parts.join("; ");
        if status != self.last_status {
            notify(&[NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }
}

/// Backup ids for a log field: `12,13` (not a Rust debug string).
fn join_ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// What a job reports back to the loop (details are in the log).
struct JobReport {
    ok: bool,
    committed: Vec<blockvault_store::BackupId>,
}

/// The blocking part of a job: opens its own store and catalog handles and
/// backs up one image (a configured one, or one a glob entry matched).
fn run_job(cfg: Config, img: &ImageConfig, cancel: &AtomicBool) -> JobReport {
    let mut ctx = match Ctx::open(cfg) {
        Ok(c) => c,
        Err(e) => {
            error!(image = %img.name, error = %format!("{e:#}"), "cannot open the store or catalog");
            return JobReport { ok: false, committed: Vec::new() };
        }
    };
    if let Some(grp) = ctx.cfg.group(&img.name).cloned() {
        let out = job::run_group(&mut ctx, &grp, &(), cancel);
        let committed = out.backups.iter().filter_map(|(_, r)| r.as_ref().ok().map(|m| m.id)).collect();
        return JobReport { ok: out.ok(), committed };
    }
    let out = job::run_image(&mut ctx, img, &(), cancel);
    JobReport { ok: out.ok(), committed: out.backup.as_ref().map(|m| vec![m.id]).unwrap_or_default() }
}

/// The queue entry of a group's job: named as the group (which no image
/// is: the config checks), so [`run_job`] runs the group's set; the rest
/// of it is its first image's, unused.
fn group_slot(cfg: &Config, grp: &crate::config::GroupConfig) -> ImageConfig {
    let mut slot = cfg.image(&grp.images[0]).cloned().expect("a group's images are configured (checked at load)");
    slot.name = grp.name.clone();
    slot
}

/// A name in the schedule table (an image or a group).
struct Named {
    name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::parse(
            &format!(
                "[store]\npath = \"/s\"\n{extra}\n[[image]]\nname = \"a\"\nsource = \"file:/a\"\nschedule = \"0 3 * * *\"\n\
                 [[image]]\nname = \"b\"\nsource = \"file:/b\"\n"
            ),
            std::path::Path::new("/t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn only_images_with_a_schedule_are_scheduled() {
        let mut d = Daemon::new(cfg(""));
        d.reschedule(Local::now(), true);
        assert_eq!(d.entries.keys().collect::<Vec<_>>(), vec!["a"]);
        let e = &d.entries["a"];
        assert_eq!(e.due, e.next, "no random delay configured");
    }

    #[test]
    fn defaults_schedule_and_reload_keep_unchanged_entries() {
        let mut d = Daemon::new(cfg("[defaults]\nschedule = \"*/5 * * * *\"\n[daemon]\nrandom-delay = \"1h\"\n"));
        let now = Local::now();
        d.reschedule(now, true);
        assert_eq!(d.entries.len(), 2);
        let b = d.entries["b"].due;
        let e = &d.entries["b"];
        assert!(e.due.unwrap() >= e.next.unwrap() && e.due.unwrap() <= e.next.unwrap() + chrono::Duration::hours(1));
        // same config again: b keeps its (random) due time
        d.cfg = Arc::new(cfg("[defaults]\nschedule = \"*/5 * * * *\"\n[daemon]\nrandom-delay = \"1h\"\n"));
        d.reschedule(now, false);
        assert_eq!(d.entries["b"].due, b);
        // b loses its schedule
        d.cfg = Arc::new(cfg(""));
        d.queue.push_back(d.cfg.image("b").unwrap().clone());
        d.reschedule(now, false);
        assert!(!d.entries.contains_key("b"));
        assert!(d.queue.is_empty());
    }

    #[test]
    fn a_running_image_is_not_queued_again() {
        let mut d = Daemon::new(cfg(""));
        let now = Local::now();
        d.reschedule(now, true);
        let due = d.entries["a"].due.unwrap();
        d.running.insert("a".into(), Running { cancel: Arc::new(AtomicBool::new(false)), since: Instant::now() });
        d.fire_due(due);
        assert!(d.queue.is_empty());
        assert!(d.entries["a"].due.unwrap() > due, "next firing set");
        d.running.clear();
        let due = d.entries["a"].due.unwrap();
        d.fire_due(due);
        assert_eq!(d.queue.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), vec!["a"]);
    }
}
