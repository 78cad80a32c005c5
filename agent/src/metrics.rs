//! Prometheus metrics as a text file for node_exporter's textfile collector
//! (`[metrics] path = ".../blockvault.prom"`).
//!
//! Every figure comes from the catalog, so whichever process writes the file
//! (a `run` from a timer, a daemon job) describes every configured image,
//! not only the one it just backed up. The one thing the catalog has no row
//! for is a run that failed before its backup was recorded (source missing,
//! image locked by another run): such failures are kept as agent state in
//! the catalog ([`record_failure_without_row`]).
//!
//! The file is replaced atomically (temp file in the same directory, then
//! rename), so the collector never reads half of it. It is made mode 0644
//! whatever the umask: node_exporter runs as another user. Writers are
//! serialised with a lock in the store's `locks/`, so two processes cannot
//! overwrite a newer picture with an older one.
//!
//! Images listed: every configured image, and for a glob entry the images
//! it matched when it was last listed (before its first listing, every
//! catalog image its name template matches). Images no longer in the config
//! are left out, so that alerts on them stop. A glob entry also gets
//! `blockvault_glob_matched_images` (0 alerts: nothing is backed up) and
//! `blockvault_glob_last_expansion_success`.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use blockvault_catalog::{BackupRow, BackupState, SnapshotState};
use blockvault_store::BackupStats;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::context::Ctx;

/// Name of the store lock that serialises metrics writers. flock locks
/// belong to the open file, so it also serialises a daemon's jobs.
const LOCK_NAME: &str = "metrics";

/// Failures that left no backup row, per image (agent state in the catalog).
#[derive(Debug, Default, Serialize, Deserialize)]
struct RowlessFailures {
    /// How many, ever (as far as this catalog knows).
    count: u64,
    /// When the latest ended (RFC 3339, UTC, milliseconds).
    finished: String,
    duration_ms: u64,
    error: String,
    /// The highest backup id when the latest was recorded: a backup row
    /// with a higher id is newer than that failure (ids are never reused).
    #[serde(default)]
    max_id: u64,
}

fn state_key(image: &str) -> String {
    format!("failed-without-row:{image}")
}

/// Records a run of `image` that failed before a backup row existed.
///
/// # Errors
/// Catalog errors.
pub fn record_failure_without_row(ctx: &Ctx, image: &str, duration: Duration, error: &str) -> Result<()> {
    let key = state_key(image);
    let mut rec: RowlessFailures = match ctx.catalog.agent_state(&key)? {
        Some(v) => serde_json::from_str(&v).unwrap_or_default(),
        None => RowlessFailures::default(),
    };
    rec.count += 1;
    rec.finished = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    rec.duration_ms = duration.as_millis() as u64;
    rec.error = error.to_string();
    rec.max_id = ctx.catalog.max_backup_id()?;
    ctx.catalog.set_agent_state(&key, &serde_json::to_string(&rec)?)?;
    Ok(())
}

fn glob_key(entry: &str) -> String {
    format!("glob:{entry}")
}

/// The last expansion of a glob entry (agent state in the catalog).
#[derive(Debug, Default, Serialize, Deserialize)]
struct GlobState {
    /// Images it matched; `None` when it could not be expanded.
    matched: Option<u64>,
    /// The names of the images it matched when it last could be expanded.
    #[serde(default)]
    images: Vec<String>,
    finished: String,
    #[serde(default)]
    error: String,
}

/// Records what the expansion of the glob entry `entry` (its name template)
/// found: how many images, or why it failed.
///
/// # Errors
/// Catalog errors.
pub fn record_glob(ctx: &Ctx, entry: &str, found: std::result::Result<&[String], &str>) -> Result<()> {
    let images = match found {
        Ok(names) => names.to_vec(),
        // the images known before still stand for the entry
        Err(_) => glob_state(ctx, entry)?.map(|s| s.images).unwrap_or_default(),
    };
    let st = GlobState {
        matched: found.ok().map(|n| n.len() as u64),
        images,
        finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        error: found.err().unwrap_or_default().to_string(),
    };
    ctx.catalog.set_agent_state(&glob_key(entry), &serde_json::to_string(&st)?)?;
    Ok(())
}

/// The images a config entry stands for in the metrics: itself, or for a
/// glob entry the images it matched when last listed (an RBD image deleted
/// from the cluster, or renamed, leaves the file instead of tripping a
/// staleness alert forever); before its first listing, every catalog image
/// its name template matches.
///
/// # Errors
/// Catalog errors.
pub fn images_known(ctx: &Ctx, entry: &crate::config::ImageConfig) -> Result<Vec<String>> {
    match glob_state(ctx, &entry.name)?.filter(|_| entry.source.is_glob()) {
        Some(st) => Ok(st.images),
        None => crate::prune::images_of_entry(ctx, entry),
    }
}

fn glob_state(ctx: &Ctx, entry: &str) -> Result<Option<GlobState>> {
    Ok(ctx.catalog.agent_state(&glob_key(entry))?.and_then(|v| serde_json::from_str(&v).ok()))
}

/// What the file says about one glob entry.
#[derive(Debug, Default, PartialEq)]
struct GlobMetrics {
    entry: String,
    matched: Option<u64>,
    success: bool,
}

fn gather_globs(ctx: &Ctx) -> Result<Vec<GlobMetrics>> {
    let mut out = Vec::new();
    for e in ctx.cfg.images.iter().filter(|e| e.source.is_glob()) {
        let Some(st) = glob_state(ctx, &e.name)? else { continue };
        out.push(GlobMetrics { entry: e.name.clone(), matched: st.matched, success: st.matched.is_some() });
    }
    Ok(out)
}

fn render_globs(o: &mut String, globs: &[GlobMetrics]) {
    if globs.is_empty() {
        return;
    }
    let _ = writeln!(o, "# HELP blockvault_glob_matched_images RBD images the glob entry matched when last expanded (0: it matches nothing, nothing is backed up).");
    let _ = writeln!(o, "# TYPE blockvault_glob_matched_images gauge");
    for g in globs {
        if let Some(n) = g.matched {
            let _ = writeln!(o, "blockvault_glob_matched_images{{entry=\"{}\"}} {n}", escape(&g.entry));
        }
    }
    let _ = writeln!(o, "# HELP blockvault_glob_last_expansion_success 1 if the glob entry's images could be listed when last tried, 0 if not (cluster unreachable).");
    let _ = writeln!(o, "# TYPE blockvault_glob_last_expansion_success gauge");
    for g in globs {
        let _ = writeln!(o, "blockvault_glob_last_expansion_success{{entry=\"{}\"}} {}", escape(&g.entry), u8::from(g.success));
    }
}

/// What the file says about one image.
#[derive(Debug, Default, PartialEq)]
struct ImageMetrics {
    name: String,
    /// Unix time the newest committed backup finished.
    last_success: Option<f64>,
    last_run: Option<LastRun>,
    /// Id of the backup row `last_run` comes from.
    last_run_id: Option<u64>,
    /// Stats of the newest committed backup.
    last_stats: Option<BackupStats>,
    failures: u64,
    backups: u64,
    snapshots: u64,
    /// Bytes blockvault's snapshots hold on the cluster, as last measured
    /// (`crate::release::measure`); `None` when never measured.
    held_bytes: Option<u64>,
}

#[derive(Debug, PartialEq)]
struct LastRun {
    finished: f64,
    success: bool,
    duration: f64,
}

fn unix(ts: &str) -> Option<f64> {
    DateTime::parse_from_rfc3339(ts).ok().map(|t| t.timestamp_millis() as f64 / 1000.0)
}

fn run_of_row(r: &BackupRow) -> Option<LastRun> {
    let finished = unix(r.finished.as_deref()?)?;
    let success = r.state == BackupState::Committed;
    let duration = match (&r.stats, success) {
        (Some(s), true) => s.duration_ms as f64 / 1000.0,
        _ => (finished - unix(&r.created).unwrap_or(finished)).max(0.0),
    };
    Some(LastRun { finished, success, duration })
}

fn gather_image(ctx: &Ctx, name: &str) -> Result<ImageMetrics> {
    let mut m = ImageMetrics { name: name.to_string(), ..Default::default() };
    if let Some(img) = ctx.catalog.image(name)? {
        let newest = ctx.catalog.latest_valid_backup(img.id)?;
        let newest = match newest {
            Some(b) => Some(b),
            None => ctx.catalog.committed_backups(Some(name))?.pop(),
        };
        if let Some(b) = &newest {
            m.last_success = b.finished.as_deref().and_then(unix);
            m.last_stats = b.stats.clone();
        }
        // a cancelled run (SIGTERM, daemon stop) is no failure: the last run
        // is the one before it
        if let Some(row) = ctx.catalog.latest_run(img.id)? {
            m.last_run = run_of_row(&row);
            m.last_run_id = Some(row.id.0);
        }
        m.failures = ctx.catalog.count_failures(img.id)?;
        m.backups = ctx.catalog.count_backups(img.id, BackupState::Committed)?;
        m.snapshots =
            ctx.catalog.snapshots(img.id)?.iter().filter(|s| s.state == SnapshotState::Present).count() as u64;
    }
    m.held_bytes = crate::release::recorded(ctx, name)?.map(|h| h.bytes);
    if let Some(v) = ctx.catalog.agent_state(&state_key(name))? {
        if let Ok(rec) = serde_json::from_str::<RowlessFailures>(&v) {
            m.failures += rec.count;
            if let Some(finished) = unix(&rec.finished) {
                if !matches!(m.last_run_id, Some(id) if id > rec.max_id) {
                    m.last_run =
                        Some(LastRun { finished, success: false, duration: rec.duration_ms as f64 / 1000.0 });
                }
            }
        }
    }
    Ok(m)
}

fn gather(ctx: &Ctx) -> Result<Vec<ImageMetrics>> {
    let mut names: Vec<String> = Vec::new();
    for entry in &ctx.cfg.images {
        names.extend(images_known(ctx, entry)?);
    }
    names.sort();
    names.dedup();
    names.iter().map(|n| gather_image(ctx, n)).collect()
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// One metric family: HELP, TYPE, then a sample per image that has a value.
fn family(out: &mut String, name: &str, kind: &str, help: &str, images: &[ImageMetrics], f: impl Fn(&ImageMetrics) -> Option<f64>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for m in images {
        if let Some(v) = f(m) {
            let _ = writeln!(out, "{name}{{image=\"{}\"}} {v}", escape(&m.name));
        }
    }
}

fn render(images: &[ImageMetrics]) -> String {
    let mut o = String::new();
    family(
        &mut o,
        "blockvault_last_success_timestamp_seconds",
        "gauge",
        "Unix time the newest committed backup of the image finished; 0 if it has none.",
        images,
        |m| Some(m.last_success.unwrap_or(0.0)),
    );
    family(
        &mut o,
        "blockvault_last_run_timestamp_seconds",
        "gauge",
        "Unix time the last backup run of the image ended, successful or not.",
        images,
        |m| m.last_run.as_ref().map(|r| r.finished),
    );
    family(
        &mut o,
        "blockvault_last_run_success",
        "gauge",
        "1 if the last backup run of the image committed a backup, 0 if it failed.",
        images,
        |m| m.last_run.as_ref().map(|r| if r.success { 1.0 } else { 0.0 }),
    );
    family(
        &mut o,
        "blockvault_last_run_duration_seconds",
        "gauge",
        "How long the last backup run of the image took.",
        images,
        |m| m.last_run.as_ref().map(|r| r.duration),
    );
    family(
        &mut o,
        "blockvault_last_backup_read_bytes",
        "gauge",
        "Bytes read from the source by the newest committed backup.",
        images,
        |m| m.last_stats.as_ref().map(|s| s.read_bytes as f64),
    );
    family(
        &mut o,
        "blockvault_last_backup_written_bytes",
        "gauge",
        "Bytes of new chunks (as stored, compressed) the newest committed backup wrote.",
        images,
        |m| m.last_stats.as_ref().map(|s| s.new_bytes as f64),
    );
    family(
        &mut o,
        "blockvault_last_backup_new_chunks",
        "gauge",
        "New chunks the newest committed backup wrote.",
        images,
        |m| m.last_stats.as_ref().map(|s| s.new_chunks as f64),
    );
    family(
        &mut o,
        "blockvault_backup_failures_total",
        "counter",
        "Failed backup runs of the image recorded in the catalog (resets with a catalog rebuild).",
        images,
        |m| Some(m.failures as f64),
    );
    family(
        &mut o,
        "blockvault_backups",
        "gauge",
        "Committed backups of the image in the catalog.",
        images,
        |m| Some(m.backups as f64),
    );
    family(
        &mut o,
        "blockvault_rbd_snapshots",
        "gauge",
        "RBD snapshots blockvault holds on the cluster for the image.",
        images,
        |m| Some(m.snapshots as f64),
    );
    family(
        &mut o,
        "blockvault_snapshot_held_bytes",
        "gauge",
        "Bytes of the objects written since blockvault's oldest kept RBD snapshot of the image (RADOS keeps a copy of each for the snapshot), as measured after the last backup run.",
        images,
        |m| m.held_bytes.map(|b| b as f64),
    );
    o
}

/// Writes `text` to `path` atomically, mode 0644.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().context("metrics path has no file name")?.to_string_lossy();
    // Not ending in .prom, so the collector ignores it; created exclusively
    // under a random name, so a link planted in a directory others can
    // write (textfile directories often are) is never followed.
    let res = (|| -> std::io::Result<()> {
        let mut f = tempfile::Builder::new().prefix(&format!(".{file_name}.")).suffix(".tmp").tempfile_in(dir)?;
        f.as_file().set_permissions(fs::Permissions::from_mode(0o644))?;
        f.write_all(text.as_bytes())?;
        f.as_file().sync_all()?;
        f.persist(path).map_err(|e| e.error)?;
        Ok(())
    })();
    res.with_context(|| format!("writing metrics file {}", path.display()))
}

/// Writes the metrics file if `[metrics] path` is set.
///
/// # Errors
/// Catalog errors or a failed write.
pub fn write(ctx: &Ctx) -> Result<()> {
    let Some(path) = ctx.cfg.metrics.path.clone() else { return Ok(()) };
    let _l = ctx.store.lock_named(LOCK_NAME)?;
    let mut text = render(&gather(ctx)?);
    render_globs(&mut text, &gather_globs(ctx)?);
    crate::maintenance::render(ctx, &mut text)?;
    write_atomic(&path, &text)?;
    debug!(path = %path.display(), "metrics written");
    Ok(())
}

/// [`write`], logging a failure instead of returning it: metrics never fail
/// a backup.
pub fn write_logged(ctx: &Ctx) {
    if let Err(e) = write(ctx) {
        warn!(error = %format!("{e:#}"), "could not write the metrics file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn rendering() {
        let imgs = vec![
            ImageMetrics {
                name: "a".into(),
                last_success: Some(1700000000.0),
                last_run: Some(LastRun { finished: 1700000000.0, success: true, duration: 1.5 }),
                last_run_id: Some(3),
                last_stats: Some(BackupStats { read_bytes: 10, new_bytes: 4, new_chunks: 2, ..Default::default() }),
                failures: 1,
                backups: 3,
                snapshots: 0,
                held_bytes: Some(8 << 20),
            },
            ImageMetrics { name: "b\"x".into(), ..Default::default() },
        ];
        let t = render(&imgs);
        assert!(t.contains("# TYPE blockvault_backup_failures_total counter\n"), "{t}");
        assert!(t.contains("blockvault_last_success_timestamp_seconds{image=\"a\"} 1700000000\n"), "{t}");
        assert!(t.contains("blockvault_last_success_timestamp_seconds{image=\"b\\\"x\"} 0\n"), "{t}");
        assert!(t.contains("blockvault_last_run_duration_seconds{image=\"a\"} 1.5\n"), "{t}");
        assert!(t.contains("blockvault_last_backup_written_bytes{image=\"a\"} 4\n"), "{t}");
        assert!(t.contains("blockvault_snapshot_held_bytes{image=\"a\"} 8388608\n"), "{t}");
        assert!(!t.contains("blockvault_snapshot_held_bytes{image=\"b"), "{t}");
        // an image never run has no last-run samples
        assert!(!t.contains("blockvault_last_run_success{image=\"b"), "{t}");
        // every family has HELP and TYPE
        assert_eq!(t.matches("# HELP ").count(), t.matches("# TYPE ").count());
    }
}
