//! One scheduled job: back up one configured image, prune it if configured,
//! write the metrics file. Shared by `blockvault run` and the daemon.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use blockvault_catalog::BackupState;
use blockvault_store::Manifest;
use tracing::{error, warn};

use crate::config::{Config, ImageConfig};
use crate::context::Ctx;
use crate::error::BackupError;
use crate::pipeline::Progress;

/// What a job did.
pub struct JobOutcome {
    /// The backup: the committed manifest, or why it failed.
    pub backup: Result<Manifest>,
    /// Backups pruned after it; `None` when pruning was not configured or
    /// the backup failed.
    pub pruned: Option<Result<usize>>,
}

impl JobOutcome {
    /// True when the backup, and the prune if there was one, succeeded.
    pub fn ok(&self) -> bool {
        self.backup.is_ok() && !matches!(self.pruned, Some(Err(_)))
    }

    /// True when the backup was cancelled (SIGTERM, SIGINT, daemon stop).
    pub fn cancelled(&self) -> bool {
        matches!(&self.backup, Err(e) if BackupError::is_cancelled(e))
    }
}

/// Runs one job. Never panics on a failed step: every step's error is in
/// the outcome (and logged), and the metrics file is written either way.
pub fn run_image(ctx: &mut Ctx, img: &ImageConfig, progress: &dyn Progress, cancel: &AtomicBool) -> JobOutcome {
    let started = Instant::now();
    let before = ctx.catalog.max_backup_id().unwrap_or(u64::MAX);
    let backup = crate::backup::backup_image(ctx, img, progress, cancel);
    if let Err(e) = &backup {
        if BackupError::is_cancelled(e) {
            warn!(image = %img.name, error = %format!("{e:#}"), "backup cancelled: nothing of it is committed");
        } else {
            error!(image = %img.name, error = %format!("{e:#}"), "backup failed");
        }
        if BackupError::is_cancelled(e) {
            // not a failure: the metrics keep the run before it
        } else if let Err(e2) = note_failure(ctx, img, before, started, e) {
            warn!(image = %img.name, error = %format!("{e2:#}"), "could not record the failure for metrics");
        }
        crate::notify::backup_failed(&ctx.cfg, img, e);
    }
    if let Ok(m) = &backup {
        // the image's configured labels (the backup is committed either way)
        let ann = crate::annotate::for_backup(img, &[], None);
        if let Err(e) = crate::annotate::record(ctx, m.id, &ann) {
            warn!(image = %img.name, backup = m.id.0, error = %format!("{e:#}"), "could not record the backup's labels");
        }
    }
    let pruned = if backup.is_ok() && img.prune_after_backup(&ctx.cfg.defaults) && !cancel.load(Ordering::Relaxed) {
        let res = (|| -> Result<usize> {
            let mut n = 0;
            for name in crate::prune::images_of_entry(ctx, img)? {
                n += crate::prune::prune_image(ctx, &name)?;
            }
            Ok(n)
        })();
        if let Err(e) = &res {
            error!(image = %img.name, error = %format!("{e:#}"), "prune after backup failed");
        }
        Some(res)
    } else {
        None
    };
    // what the kept snapshot now holds on the cluster, and images gone to
    // the trash that blockvault's snapshots keep from being purged
    crate::release::measure_logged(ctx, &img.name, &img.source);
    if !cancel.load(Ordering::Relaxed) {
        crate::release::release_trashed_logged(ctx);
    }
    crate::metrics::write_logged(ctx);
    JobOutcome { backup, pruned }
}

/// What a group's job did.
pub struct GroupOutcome {
    /// The set id, when the set was started.
    pub set: Option<blockvault_store::BackupId>,
    /// Each image's backup, in the group's order (empty when the set could
    /// not be started: then `error` says why).
    pub backups: Vec<(String, Result<Manifest>)>,
    pub error: Option<anyhow::Error>,
    /// Backups pruned after it (whole sets).
    pub pruned: Option<Result<usize>>,
}

impl GroupOutcome {
    /// True when every image of the set committed, and the prune if any worked.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && !self.backups.is_empty()
            && self.backups.iter().all(|(_, r)| r.is_ok())
            && !matches!(self.pruned, Some(Err(_)))
    }
}

/// Runs one group's job: the set, then the group's prune if
/// `prune-after-backup`, then the metrics file.
pub fn run_group(ctx: &mut Ctx, grp: &crate::config::GroupConfig, progress: &dyn Progress, cancel: &AtomicBool) -> GroupOutcome {
    let (set, backups, error) = match crate::group::backup_group(ctx, grp, progress, cancel) {
        Ok(o) => (o.set, o.backups, None),
        Err(e) => {
            error!(group = %grp.name, error = %format!("{e:#}"), "set failed");
            (None, Vec::new(), Some(e))
        }
    };
    let all_ok = error.is_none() && backups.iter().all(|(_, r)| r.is_ok());
    let pruned = if all_ok && grp.prune_after_backup(&ctx.cfg.defaults) && !cancel.load(Ordering::Relaxed) {
        let res = crate::group::prune_group(ctx, grp, false);
        if let Err(e) = &res {
            error!(group = %grp.name, error = %format!("{e:#}"), "prune after backup failed");
        }
        Some(res)
    } else {
        None
    };
    crate::metrics::write_logged(ctx);
    GroupOutcome { set, backups, error, pruned }
}

/// The images a config entry stands for: itself, or the RBD images its
/// glob matches right now (named by its `{image}` template).
///
/// # Errors
/// When the glob cannot be expanded (cluster unreachable, bad pattern).
pub fn expand_entry(cfg: &Config, entry: &ImageConfig) -> Result<Vec<ImageConfig>> {
    if !entry.source.is_glob() {
        return Ok(vec![entry.clone()]);
    }
    let mut one = cfg.clone();
    one.images = vec![entry.clone()];
    crate::source::rbd::expand_images(&one)
}

/// The images a config entry stands for in a run, with what the metrics
/// need to know about a glob entry recorded on the way: a glob that matches
/// nothing (a typo in `source` means no backups, and must not look like
/// success) is an error with a warning, and a glob that cannot be expanded
/// (cluster down) marks every image the catalog knows under it failed, so
/// none of them keeps reporting its last success.
///
/// # Errors
/// When the glob matches nothing or cannot be expanded.
pub fn expand_for_run(ctx: &Ctx, entry: &ImageConfig) -> Result<Vec<ImageConfig>> {
    if !entry.source.is_glob() {
        return Ok(vec![entry.clone()]);
    }
    let started = Instant::now();
    match expand_entry(&ctx.cfg, entry) {
        Ok(v) => {
            let names: Vec<String> = v.iter().map(|i| i.name.clone()).collect();
            crate::metrics::record_glob(ctx, &entry.name, Ok(&names))?;
            if v.is_empty() {
                warn!(image = %entry.name, source = %entry.source,
                    "the glob matches no RBD image: nothing is backed up for this entry (a typo in `source`?)");
                anyhow::bail!("image '{}': no RBD image matches '{}'", entry.name, entry.source);
            }
            Ok(v)
        }
        Err(e) => {
            let why = format!("{e:#}");
            let known = crate::metrics::images_known(ctx, entry)?;
            for n in &known {
                crate::metrics::record_failure_without_row(ctx, n, started.elapsed(), &why)?;
            }
            crate::metrics::record_glob(ctx, &entry.name, Err(&why))?;
            error!(image = %entry.name, known_images = known.len(), error = %why,
                "cannot list the images of a glob: every image known under it is marked failed");
            Err(e.context(format!("image '{}': listing the RBD images matching '{}'", entry.name, entry.source)))
        }
    }
}

/// A failure that left a failed backup row is counted from the catalog; one
/// that failed before any row existed is recorded for the metrics here.
fn note_failure(ctx: &Ctx, img: &ImageConfig, before: u64, started: Instant, e: &anyhow::Error) -> Result<()> {
    if img.name.contains("{image}") {
        // a glob entry's backups are recorded under the expanded names
        return Ok(());
    }
    let has_row = match ctx.catalog.image(&img.name)? {
        Some(row) => ctx
            .catalog
            .latest_finished_backup(row.id)?
            .is_some_and(|b| b.id.0 > before && b.state == BackupState::Failed),
        None => false,
    };
    if !has_row {
        crate::metrics::record_failure_without_row(ctx, &img.name, started.elapsed(), &format!("{e:#}"))?;
    }
    Ok(())
}
