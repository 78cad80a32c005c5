//! Groups (`[[group]]`): the images of one VM or application backed up at
//! one point in time, recorded as one set.
//!
//! A set is made in three steps: every image's backup is prepared (locks,
//! recovery, parent, backup id; see [`crate::backup::Prepared`]), then the
//! group's pre-snapshot hook runs once, every image's snapshot is taken, and
//! the post-snapshot hook runs once (exactly once whenever the pre hook ran,
//! [`crate::hook::around`]); then each image's backup reads and commits as a
//! single image's would. Every manifest of the set records it
//! ([`blockvault_store::SetRef`], manifest format 2), so the catalog, and a
//! catalog rebuilt from the store, knows the sets.
//!
//! On Ceph 16.2 there is no diff from an RBD group snapshot
//! (`rbd_diff_iterate3` is Reef/Squid), so the point in time is per-image
//! snapshots taken under the freeze the hooks provide: without hooks that
//! quiesce the writers, the images of a set are each crash-consistent but
//! not at one instant.
//!
//! A set is complete when every image of the group has a committed backup
//! in it; only complete sets are restored as a whole. Retention of a group
//! ([`prune_group`]) keeps or removes whole sets; the images' own retention
//! does not touch the backups a group made.

use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, bail, Context, Result};
use blockvault_catalog::SetRow;
use blockvault_store::{BackupId, Manifest, SetRef};
use tracing::{error, info, info_span, warn};

use crate::config::GroupConfig;
use crate::context::Ctx;
use crate::hook::{HookEnv, Hooks};
use crate::pipeline::Progress;
use crate::retention::{self, BackupInfo};

/// What backing up a group did: each image's backup, in the group's order.
pub struct SetOutcome {
    /// The set id, once every image was prepared.
    pub set: Option<BackupId>,
    /// Each image's committed manifest, or why it failed.
    pub backups: Vec<(String, Result<Manifest>)>,
}

impl SetOutcome {
    /// True when every image of the set committed.
    pub fn ok(&self) -> bool {
        !self.backups.is_empty() && self.backups.iter().all(|(_, r)| r.is_ok())
    }
}

/// The hooks of a group, as [`crate::hook`] runs them.
fn hooks_of(grp: &GroupConfig) -> Hooks {
    Hooks { pre: grp.pre_snapshot.clone(), post: grp.post_snapshot.clone(), timeout: grp.hook_timeout() }
}

/// Backs up every image of `grp` as one set (see the module docs).
///
/// # Errors
/// When a member is not configured, or when the set cannot be started
/// (an image cannot be prepared, the pre hook fails, a snapshot fails):
/// then no backup of the set is left running and no snapshot of it is
/// left on the cluster. Failures of single images after the snapshots
/// are in the outcome.
pub fn backup_group(ctx: &mut Ctx, grp: &GroupConfig, progress: &dyn Progress, cancel: &AtomicBool) -> Result<SetOutcome> {
    let span = info_span!("group", group = %grp.name);
    let _e = span.enter();
    let images: Vec<_> = grp.images.iter().map(|n| ctx.cfg.image(n).cloned()).collect::<Result<_>>()?;
    let mut preps = Vec::with_capacity(images.len());
    for img in &images {
        match crate::backup::prepare(ctx, img, None) {
            Ok(p) => preps.push(p),
            Err(e) => {
                let why = format!("{e:#}");
                for p in preps {
                    let _ = p.fail(ctx, anyhow!("another image of group '{}' could not start: {why}", grp.name));
                }
                return Err(e.context(format!("group '{}': image '{}' cannot be backed up", grp.name, img.name)));
            }
        }
    }
    let set = SetRef { group: grp.name.clone(), id: preps[0].id(), images: grp.images.clone() };
    let env = HookEnv {
        image: grp.name.clone(),
        source: images.iter().map(|i| i.source.to_string()).collect::<Vec<_>>().join(" "),
        snapshot: preps.iter().filter_map(|p| p.snapshot()).collect::<Vec<_>>().join(" "),
    };
    // the point in time: one pre hook, every snapshot, one post hook
    let frozen = crate::hook::around(&hooks_of(grp), env, cancel, || -> Result<()> {
        for p in &mut preps {
            let name = p.image().name.clone();
            p.freeze(ctx).with_context(|| format!("snapshot of image '{name}'"))?;
        }
        Ok(())
    });
    if let Err(e) = frozen {
        let why = format!("{e:#}");
        for p in preps {
            let _ = p.fail(ctx, anyhow!("set {} of group '{}' could not be taken: {why}", set.id, grp.name));
        }
        return Err(e.context(format!("set {} of group '{}' failed", set.id, grp.name)));
    }
    info!(group = %grp.name, set = set.id.0, images = images.len(), "set: every snapshot taken");
    let mut backups = Vec::with_capacity(preps.len());
    for p in preps {
        let name = p.image().name.clone();
        let res = p.complete(ctx, Some(set.clone()), progress, cancel);
        if let Err(e) = &res {
            error!(group = %grp.name, set = set.id.0, image = %name, error = %format!("{e:#}"), "backup of a set member failed: the set is incomplete");
        }
        backups.push((name, res));
    }
    Ok(SetOutcome { set: Some(set.id), backups })
}

/// One set of a group by `GROUP` (its newest complete set) or `GROUP@SET`.
///
/// # Errors
/// No such group or set, or the set is incomplete.
pub fn find_set(ctx: &Ctx, group: &str, set: Option<BackupId>) -> Result<SetRow> {
    let sets = ctx.catalog.sets(Some(group))?;
    if sets.is_empty() {
        bail!("group '{group}' has no set in the catalog (see `blockvault list {group}`)");
    }
    let found = match set {
        Some(id) => sets.into_iter().find(|s| s.id == id).with_context(|| format!("group '{group}' has no set {id}"))?,
        None => sets
            .into_iter()
            .rev()
            .find(SetRow::is_complete)
            .with_context(|| format!("group '{group}' has no complete set"))?,
    };
    if !found.is_complete() {
        bail!("set {} of group '{group}' is incomplete: no backup of {}", found.id, found.missing().join(", "));
    }
    Ok(found)
}

/// True when `name` is a configured group or a group the catalog has sets of.
///
/// # Errors
/// Catalog errors.
pub fn is_group(ctx: &Ctx, name: &str) -> Result<bool> {
    Ok(ctx.cfg.group(name).is_some() || !ctx.catalog.sets(Some(name))?.is_empty())
}

/// Applies the group's retention policy to its sets: a set is kept or
/// removed whole (a set counts as protected when one of its backups is).
/// An incomplete set is removed once a newer complete set exists (each of
/// its images then has a newer backup). Returns how many backups were removed.
///
/// # Errors
/// Catalog or store errors (every removal is tried).
pub fn prune_group(ctx: &Ctx, grp: &GroupConfig, dry_run: bool) -> Result<usize> {
    let Some(policy) = grp.retention(&ctx.cfg.defaults) else { return Ok(0) };
    if policy.is_empty() {
        return Ok(0);
    }
    let sets = ctx.catalog.sets(Some(&grp.name))?;
    let newest_complete = sets.iter().filter(|s| s.is_complete()).map(|s| s.id.0).max();
    let complete: Vec<&SetRow> = sets.iter().filter(|s| s.is_complete()).collect();
    let mut infos = Vec::with_capacity(complete.len());
    for s in &complete {
        let time = crate::prune::local_time(s.created()).with_context(|| format!("set {} of group '{}'", s.id, grp.name))?;
        let protected = s.members.iter().any(|m| m.protected || ctx.store.is_protected(m.id));
        infos.push(BackupInfo { id: s.id.0, time, protected });
    }
    let plan = retention::plan(&policy, &infos);
    let mut doomed: Vec<&SetRow> =
        complete.iter().copied().filter(|s| plan.iter().any(|i| i.backup.id == s.id.0 && !i.action.is_keep())).collect();
    doomed.extend(sets.iter().filter(|s| !s.is_complete() && newest_complete.is_some_and(|n| n > s.id.0)));
    let _lock = ctx.store.lock_shared()?;
    let mut removed = 0;
    let mut first_err = None;
    for s in doomed {
        if s.members.iter().any(|m| m.protected || ctx.store.is_protected(m.id)) {
            continue; // an incomplete set with a protected backup stays
        }
        info!(group = %grp.name, set = s.id.0, backups = s.members.len(), dry_run, "set pruned");
        if dry_run {
            removed += s.members.len();
            continue;
        }
        for m in &s.members {
            match crate::prune::remove_backup(ctx, m.id) {
                Ok(()) => removed += 1,
                Err(e) => {
                    warn!(group = %grp.name, set = s.id.0, backup = m.id.0, error = %format!("{e:#}"), "prune could not remove a backup of the set");
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}
