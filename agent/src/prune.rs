//! Applying a retention policy to the backups of one image (plan, then apply).
//!
//! The plan comes from the pure planner in [`crate::retention`]; this module
//! feeds it the committed backups from the catalog and removes what it says.
//!
//! Removing a backup deletes its catalog row, then its manifest, block map
//! and markers from the store, inside one catalog write transaction
//! ([`remove_backup`]). A crash in between leaves the row (the transaction
//! rolls back) and a backup whose manifest is gone: `list` and `verify`
//! report it, `forget` removes the row. A prune killed after its commit but
//! before the fsync of the store removal may leave the backup in the store
//! only: the next `list` or `prune` imports it again (reconcile, see
//! `crate::rebuild`) and the prune removes it.
//! Chunks are left to `gc`. Every block map is complete, so removing any
//! backup never breaks another one.
//!
//! A backup is protected when the catalog says so *or* the store holds its
//! `.protected` marker: when the two disagree, the safe answer wins.
//!
//! The newest backup of an image is the base of its next incremental (and,
//! for RBD, the one whose snapshot is kept on the cluster). No special rule
//! guards it: whenever any rule is set, the planner keeps the newest
//! unprotected backup, and a policy without rules keeps everything. Should
//! the base of an RBD incremental ever be gone, the next backup falls back
//! to reading the whole image.

use anyhow::{anyhow, bail, Context, Result};
use blockvault_catalog::{BackupRow, BackupState};
use blockvault_store::{BackupId, StoreLock};
use chrono::{DateTime, Local, NaiveDateTime};
use serde_json::json;
use tracing::{info, warn};

use crate::config::Config;
use crate::context::Ctx;
use crate::error::Error;
use crate::lookup::BackupRef;
use crate::retention::{self, BackupInfo, PruneAction, PruneItem, RetentionPolicy};

/// The retention policy of an image of the catalog: that of its config
/// entry (by name, or a glob entry's name template), else `[defaults]`.
/// An image removed from the config thus keeps aging out under the
/// defaults' policy; with no policy at all, everything is kept.
pub fn policy_for(cfg: &Config, image: &str) -> RetentionPolicy {
    match cfg.entry_for(image) {
        Some(entry) => entry.retention(&cfg.defaults),
        None => cfg.defaults.retention.clone(),
    }
    .unwrap_or_default()
}

/// One image's prune: the policy, the plan, and the catalog rows it is about.
pub struct ImagePrune {
    pub image: String,
    pub policy: RetentionPolicy,
    pub items: Vec<PruneItem>,
    /// The committed backups, for the UTC creation times.
    pub rows: Vec<BackupRow>,
}

impl ImagePrune {
    pub fn to_remove(&self) -> impl Iterator<Item = &PruneItem> {
        self.items.iter().filter(|i| !i.action.is_keep())
    }

    /// The `--json` form.
    pub fn to_json(&self, dry_run: bool) -> serde_json::Value {
        let backups: Vec<_> = self
            .items
            .iter()
            .map(|item| {
                let created = self.rows.iter().find(|r| r.id.0 == item.backup.id).map(|r| r.created.clone());
                let (action, reason) = match &item.action {
                    PruneAction::Keep(r) => ("keep", Some(r.to_string())),
                    PruneAction::Remove => ("remove", None),
                };
                json!({
                    "id": item.backup.id,
                    "created": created,
                    "local_time": item.backup.time.format("%Y-%m-%dT%H:%M:%S").to_string(),
                    "protected": item.backup.protected,
                    "action": action,
                    "reason": reason,
                })
            })
            .collect();
        let removed = self.to_remove().count();
        json!({
            "image": self.image,
            "policy": self.policy.to_string(),
            "dry_run": dry_run,
            "kept": self.items.len() - removed,
            "removed": removed,
            "backups": backups,
        })
    }
}

/// Local wall time of a catalog timestamp (RFC 3339, UTC).
pub(crate) fn local_time(created: &str) -> Result<NaiveDateTime> {
    let t = DateTime::parse_from_rfc3339(created).map_err(|e| anyhow!("'{created}' is not an RFC 3339 time: {e}"))?;
    Ok(t.with_timezone(&Local).naive_local())
}

/// Plans the prune of one image without changing anything.
///
/// # Errors
/// Catalog errors, or a backup whose creation time does not parse.
pub fn plan_image(ctx: &Ctx, image: &str, policy: &RetentionPolicy) -> Result<ImagePrune> {
    // the backups a group made are kept or removed with their set (`crate::group::prune_group`)
    let mut rows = ctx.catalog.committed_backups(Some(image))?;
    let mut in_sets = Vec::new();
    for r in &rows {
        if ctx.catalog.set_of(r.id)?.is_some() {
            in_sets.push(r.id);
        }
    }
    rows.retain(|r| !in_sets.contains(&r.id));
    let mut infos = Vec::with_capacity(rows.len());
    for r in &rows {
        let time = local_time(&r.created).with_context(|| format!("backup {} of image '{image}'", r.id))?;
        let marker = ctx.store.is_protected(r.id);
        if marker != r.protected {
            warn!(
                backup = r.id.0,
                image = %image,
                catalog = r.protected,
                store = marker,
                "catalog and store disagree on whether the backup is protected; treating it as protected"
            );
        }
        infos.push(BackupInfo { id: r.id.0, time, protected: r.protected || marker });
    }
    let items = retention::plan(policy, &infos);
    Ok(ImagePrune { image: image.to_string(), policy: policy.clone(), items, rows })
}

/// Removes what the plan says to remove, holding the store lock shared.
/// Tries every removal; returns how many succeeded, or the first error
/// after trying all.
///
/// # Errors
/// The first catalog or store error.
pub fn apply(ctx: &Ctx, plan: &ImagePrune) -> Result<usize> {
    let _lock = ctx.store.lock_shared()?;
    let mut removed = 0;
    let mut first_err = None;
    for item in plan.to_remove() {
        let id = blockvault_store::BackupId(item.backup.id);
        let res = remove_backup(ctx, id).with_context(|| format!("removing backup {id} of image '{}'", plan.image));
        match res {
            Ok(()) => {
                info!(backup = id.0, image = %plan.image, "backup pruned");
                removed += 1;
            }
            Err(e) => {
                warn!(backup = id.0, image = %plan.image, error = %format!("{e:#}"), "prune could not remove backup");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Removes one backup: its catalog row, then its manifest, block map and
/// markers, all inside one catalog write transaction. A catalog rebuild or
/// reconcile (which take the same lock) thus sees the backup either whole
/// or gone, never as a store-only backup to bring back; when the store
/// removal fails the row stays (the transaction rolls back).
///
/// # Errors
/// Catalog or store errors.
///
/// The store removes the manifest first, and without it the backup no
/// longer exists (its other files are orphans that gc removes). So when the
/// store fails part-way (a full disk, an I/O error), the row goes too
/// unless the manifest is demonstrably still there: rolling it back would
/// leave a committed row for a backup that cannot be restored (found by
/// the agent-level fault injection test). When the store cannot even say,
/// the row goes and the error is returned: a backup still in the store is
/// brought back by the next reconcile.
pub fn remove_backup(ctx: &Ctx, id: blockvault_store::BackupId) -> Result<()> {
    let mut unsure = None;
    ctx.catalog.with_write_lock(|c| -> Result<()> {
        c.delete_backup(id)?;
        if let Err(e) = ctx.store.remove_backup(id) {
            match ctx.store.try_has_backup(id) {
                Ok(true) => return Err(e.into()),
                Ok(false) => {
                    warn!(backup = id.0, error = %crate::logging::Chain(&e), "backup removed, but some of its files were left behind; gc removes them");
                }
                Err(_) => unsure = Some(e),
            }
        }
        Ok(())
    })?;
    match unsure {
        Some(e) => Err(anyhow::Error::from(e)
            .context(format!("removing backup {id} from the store failed part-way; the next reconcile brings it back if it is still whole"))),
        None => Ok(()),
    }
}

/// Backups `forget` removes, chosen and checked by [`forget`], with the
/// locks that keep them removable: the shared store lock (a GC waits) and,
/// for a whole image, its image lock (no backup of it runs meanwhile).
pub struct Forget<'c> {
    ctx: &'c Ctx,
    /// In the order they are removed.
    pub targets: Vec<BackupId>,
    /// Something the operator should know before they go.
    pub note: Option<String>,
    _store_lock: StoreLock,
    _image_lock: Option<StoreLock>,
}

/// Chooses what `forget SPEC` removes: `IMAGE@ID` that backup (also one the
/// store holds with an unreadable manifest that no catalog row names,
/// `@ID`), `IMAGE` with `all` every committed backup of the image.
/// Protected backups are refused without `force`. Nothing is removed yet:
/// [`Forget::remove`] does that.
///
/// # Errors
/// [`Error::ImageNotFound`], [`Error::BackupNotFound`],
/// [`Error::WrongImage`], [`Error::NoCommittedBackup`], [`Error::Locked`]
/// (a backup of the image runs), a running or protected backup, or a
/// catalog or store error.
pub fn forget<'c>(ctx: &'c Ctx, spec: &BackupRef, all: bool, force: bool) -> Result<Forget<'c>> {
    let store_lock = ctx.store.lock_shared()?;
    let rec = crate::rebuild::reconcile(&ctx.store, &ctx.catalog)?;
    let image = &spec.image;
    let mut targets: Vec<BackupId> = Vec::new();
    let mut image_lock = None;
    let mut note = None;
    if all {
        if spec.id.is_some() || image.is_empty() {
            bail!("'{spec}': --all takes an IMAGE, not IMAGE@ID");
        }
        if ctx.catalog.image(image)?.is_none() {
            bail!("image '{image}' is not in the catalog (see `blockvault list`)");
        }
        let lock = crate::backup::image_lock_name(image);
        image_lock = ctx.store.try_lock_named(&lock)?;
        if image_lock.is_none() {
            return Err(Error::Locked { lock, message: format!("a backup of image '{image}' is running; forget it once that ends") }.into());
        }
        targets.extend(ctx.catalog.committed_backups(Some(image))?.iter().map(|r| r.id));
        if targets.is_empty() {
            return Err(Error::NoCommittedBackup { image: image.clone() }.into());
        }
    } else {
        let Some(id) = spec.id else { bail!("'{spec}': name the backup as IMAGE@ID, or use --all") };
        match ctx.catalog.backup(id)? {
            Some(r) if r.image != *image => {
                return Err(Error::WrongImage { image: image.clone(), id, actual: r.image }.into());
            }
            Some(r) if r.state == BackupState::Running => bail!("backup {id} of image '{image}' is running"),
            Some(_) => {}
            None if rec.unreadable.iter().any(|(u, _)| *u == id) => {
                // no catalog row and no readable manifest: the image is unknown
                if !image.is_empty() {
                    note = Some(format!("backup {id}'s manifest is unreadable, so its image cannot be checked against '{image}'"));
                }
            }
            None => return Err(Error::BackupNotFound { image: image.clone(), id }.into()),
        }
        targets.push(id);
    }
    let protected: Vec<String> = targets
        .iter()
        .filter(|id| ctx.store.is_protected(**id) || matches!(ctx.catalog.backup(**id), Ok(Some(r)) if r.protected))
        .map(|id| id.to_string())
        .collect();
    if !protected.is_empty() && !force {
        bail!(
            "backup{} {} {} protected: `blockvault unprotect IMAGE@ID` first, or forget --force",
            if protected.len() == 1 { "" } else { "s" },
            protected.join(", "),
            if protected.len() == 1 { "is" } else { "are" }
        );
    }
    Ok(Forget { ctx, targets, note, _store_lock: store_lock, _image_lock: image_lock })
}

impl Forget<'_> {
    /// Removes one of the targets (catalog row and store files in one
    /// catalog transaction, as prune does). Chunks are freed by the next gc.
    ///
    /// # Errors
    /// Catalog or store errors, naming the backup.
    pub fn remove(&self, id: BackupId) -> Result<()> {
        remove_backup(self.ctx, id).map_err(|e| e.context(format!("forgetting backup {id}")))
    }
}

/// Plans and applies the configured policy to one image (after a backup).
/// Returns how many backups were removed.
///
/// # Errors
/// As [`plan_image`] and [`apply`].
pub fn prune_image(ctx: &Ctx, image: &str) -> Result<usize> {
    let policy = policy_for(&ctx.cfg, image);
    if policy.is_empty() {
        return Ok(0);
    }
    let plan = plan_image(ctx, image, &policy)?;
    let n = apply(ctx, &plan)?;
    if n > 0 {
        info!(image = %image, removed = n, policy = %policy, "pruned");
    }
    Ok(n)
}

/// Catalog images that a config entry covers: itself, or for a glob entry
/// every catalog image its name template matches.
///
/// # Errors
/// Catalog errors.
pub fn images_of_entry(ctx: &Ctx, entry: &crate::config::ImageConfig) -> Result<Vec<String>> {
    if !entry.name.contains("{image}") {
        return Ok(vec![entry.name.clone()]);
    }
    Ok(ctx.catalog.images()?.into_iter().map(|i| i.name).filter(|n| entry.matches_name(n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_times_become_local() {
        let utc = "2026-11-20T14:00:00Z";
        let want = DateTime::parse_from_rfc3339(utc).unwrap().with_timezone(&Local).naive_local();
        assert_eq!(local_time(utc).unwrap(), want);
        assert!(local_time("yesterday").is_err());
    }

    #[test]
    fn policy_comes_from_entry_then_defaults() {
        let cfg = Config::parse(
            "[store]\npath = \"/s\"\n[defaults]\nretention = { keep-daily = 7 }\n\
             [[image]]\nname = \"a\"\nsource = \"file:/a\"\nretention = { keep-last = 2 }\n\
             [[image]]\nname = \"b\"\nsource = \"file:/b\"\n",
            std::path::Path::new("/t.toml"),
        )
        .unwrap();
        assert_eq!(policy_for(&cfg, "a").to_string(), "keep-last=2");
        assert_eq!(policy_for(&cfg, "b").to_string(), "keep-daily=7");
        assert_eq!(policy_for(&cfg, "gone").to_string(), "keep-daily=7");
    }
}
