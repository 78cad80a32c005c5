//! What blockvault's kept snapshots cost the cluster, and letting go of them.
//!
//! An RBD snapshot makes RADOS copy a whole object on its first write after
//! the snapshot: [`held_bytes`] sums the objects written since the oldest
//! snapshot blockvault keeps of an image (`rbd_diff_iterate2` from it to the
//! head, whole objects), which is what those snapshots pin on the cluster
//! (the objects also pinned by a foreign snapshot taken after it are
//! counted too: an upper bound). `run` and the daemon record it after each
//! backup (agent state in the catalog), and the metrics file shows it as
//! `blockvault_snapshot_held_bytes`.
//!
//! A snapshot also blocks the image's removal: `rbd rm` refuses an image
//! with snapshots, and an image moved to the trash cannot be purged while
//! it has any. [`release_image`] (`blockvault release IMAGE`) removes the
//! snapshots this catalog recorded for the image (only those: a snapshot
//! blockvault did not make is never touched); the image's backups stay in
//! the store and restorable, and its next backup is a full read.
//! [`release_trashed`] does that for every image found in the RBD trash
//! (`run` and the daemon, unless `release-trashed = false`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blockvault_catalog::{SnapshotState, SnapshotRow};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::backup::image_lock_name;
use crate::config;
use crate::context::Ctx;
use crate::error::BackupError;
use crate::rbd::{Cluster, Image};
use crate::source::rbd::{connect, open_pool, SNAP_PREFIX};

/// Bytes of the objects written since `snap` (whole objects, as RADOS
/// copies them), of the open head `head`.
///
/// # Errors
/// The diff fails (e.g. the snapshot is gone).
pub fn bytes_written_since(head: &Image, snap: &str) -> Result<u64> {
    let size = head.size()?;
    let mut total = 0u64;
    head.diff_iterate(Some(snap), 0, size, true, |_, len, _exists| {
        // an object removed since (exists = false) still has its copy
        // held by the snapshot: it counts as well
        total += len;
        true
    })
    .with_context(|| format!("diffing {} from snapshot {snap}", head.spec()))?;
    Ok(total)
}

/// What blockvault's snapshots of one image hold: `(oldest kept snapshot,
/// bytes)`, or `None` when it keeps none on the cluster.
///
/// # Errors
/// Cluster errors.
pub fn held_bytes(head: &Image, kept: &[String]) -> Result<Option<(String, u64)>> {
    let oldest = head.snaps()?.into_iter().filter(|s| kept.contains(&s.name)).min_by_key(|s| s.id);
    match oldest {
        Some(s) => Ok(Some((s.name.clone(), bytes_written_since(head, &s.name)?))),
        None => Ok(None),
    }
}

/// The catalog's snapshot rows of an image whose snapshot may be on the
/// cluster (present, or the intent of a run that crashed).
fn kept_rows(ctx: &Ctx, image_id: i64) -> Result<Vec<SnapshotRow>> {
    Ok(ctx.catalog.snapshots(image_id)?.into_iter().filter(|s| s.state != SnapshotState::Removed).collect())
}

/// A measurement of [`held_bytes`], kept as agent state for the metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Held {
    pub bytes: u64,
    pub snapshot: Option<String>,
    /// RFC 3339.
    pub measured: String,
}

fn held_key(image: &str) -> String {
    format!("held-bytes:{image}")
}

/// The last recorded measurement of an image.
///
/// # Errors
/// Catalog errors.
pub fn recorded(ctx: &Ctx, image: &str) -> Result<Option<Held>> {
    Ok(ctx.catalog.agent_state(&held_key(image))?.and_then(|v| serde_json::from_str(&v).ok()))
}

/// Measures what blockvault's snapshots of image `name` (an RBD source
/// `src`) hold and records it for the metrics. Returns the measurement.
///
/// # Errors
/// Cluster or catalog errors.
pub fn measure(ctx: &Ctx, cluster: &Arc<Cluster>, name: &str, src: &config::Source) -> Result<Held> {
    let config::Source::Rbd { pool, namespace, image, .. } = src else { bail!("image '{name}' is not an RBD image") };
    let kept: Vec<String> = match ctx.catalog.image(name)? {
        Some(row) => kept_rows(ctx, row.id)?.into_iter().map(|s| s.name).collect(),
        None => Vec::new(),
    };
    let held = if kept.is_empty() {
        None
    } else {
        let head = open_pool(cluster, pool, namespace.as_deref())?.open(image, None)?;
        held_bytes(&head, &kept)?
    };
    let h = Held {
        bytes: held.as_ref().map_or(0, |h| h.1),
        snapshot: held.map(|h| h.0),
        measured: blockvault_catalog::now_rfc3339(),
    };
    ctx.catalog.set_agent_state(&held_key(name), &serde_json::to_string(&h)?)?;
    Ok(h)
}

/// [`measure`] for a job of `run` or the daemon: connects, logs a failure
/// instead of returning it (a measurement never fails a backup).
pub fn measure_logged(ctx: &Ctx, name: &str, src: &config::Source) {
    if !matches!(src, config::Source::Rbd { .. }) {
        return;
    }
    let res = connect(&ctx.cfg).and_then(|c| measure(ctx, &c, name, src));
    match res {
        Ok(h) => tracing::debug!(image = name, held_bytes = h.bytes, snapshot = h.snapshot.as_deref(), "snapshot held bytes measured"),
        Err(e) => warn!(image = name, error = %format!("{e:#}"), "could not measure what blockvault's snapshot holds on the cluster"),
    }
}

/// Where the head of an image is: by name, or (when it is no longer in
/// the pool's directory) in the trash, by id.
pub enum Found {
    Live(Image),
    Trashed(Image),
}

/// Opens the head of `rbd:POOL[/NS]/IMAGE` read-write: the live image of
/// that name holding one of `kept`, else an image of that name in the trash
/// holding one of them. `None`: neither exists.
///
/// # Errors
/// Cluster errors.
fn find_head(cluster: &Arc<Cluster>, src: &config::Source, kept: &[String]) -> Result<Option<Found>> {
    let config::Source::Rbd { pool, namespace, image, .. } = src else { bail!("not an RBD source: {src}") };
    let ioctx = open_pool(cluster, pool, namespace.as_deref())?;
    let holds = |img: &Image| -> Result<bool> { Ok(img.snaps()?.iter().any(|s| kept.contains(&s.name))) };
    match ioctx.open_rw(image) {
        Ok(h) if holds(&h)? => return Ok(Some(Found::Live(h))),
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    // an image of that name may be trashed and another created since
    for (id, name) in ioctx.trash_list()? {
        if &name == image {
            let h = ioctx.open_by_id_rw(&id, &name)?;
            if holds(&h)? {
                return Ok(Some(Found::Trashed(h)));
            }
        }
    }
    Ok(None)
}

/// The source an image of the catalog is read from: its config entry's,
/// else what the catalog recorded.
fn source_of(ctx: &Ctx, name: &str, recorded: &str) -> Result<config::Source> {
    if let Some(e) = ctx.cfg.images.iter().find(|i| i.name == name) {
        return Ok(e.source.clone());
    }
    config::Source::parse(recorded).map_err(|e| anyhow::anyhow!("image '{name}': recorded source: {e}"))
}

/// What [`release_image`] did.
#[derive(Debug, Default)]
pub struct Released {
    /// Snapshots removed from the cluster.
    pub removed: Vec<String>,
    /// The image was found in the RBD trash.
    pub trashed: bool,
}

/// Drops every snapshot this catalog recorded for image `name` from the
/// cluster (under the image lock, so no backup of it runs meanwhile). Its
/// backups stay in the store; its next backup is a full read (logged).
///
/// # Errors
/// [`BackupError::Locked`] when a backup of the image runs; catalog or
/// cluster errors.
pub fn release_image(ctx: &Ctx, cluster: &Arc<Cluster>, name: &str) -> Result<Released> {
    let Some(row) = ctx.catalog.image(name)? else {
        bail!("image '{name}' is not in the catalog: blockvault holds no snapshot of it");
    };
    let src = source_of(ctx, name, &row.source)?;
    if !matches!(src, config::Source::Rbd { .. }) {
        bail!("image '{name}' is not an RBD image ({src}): there is no snapshot to release");
    }
    let _store_lock = ctx.store.lock_shared()?;
    let Some(_image_lock) = ctx.store.try_lock_named(&image_lock_name(name))? else {
        return Err(BackupError::Locked { image: name.to_string() }.into());
    };
    let rows = kept_rows(ctx, row.id)?;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let mut out = Released::default();
    let head = match find_head(cluster, &src, &names)? {
        Some(Found::Live(h)) => h,
        Some(Found::Trashed(h)) => {
            out.trashed = true;
            h
        }
        None => {
            // nothing of ours is on the cluster: the rows are stale
            for r in &rows {
                ctx.catalog.set_snapshot_state(r.id, SnapshotState::Removed)?;
            }
            return Ok(out);
        }
    };
    let on_cluster: Vec<String> = head.snaps()?.into_iter().map(|s| s.name).collect();
    for r in &rows {
        // only snapshots this catalog recorded, and named as blockvault names them
        if on_cluster.contains(&r.name) && r.name.starts_with(SNAP_PREFIX) {
            head.remove_snap(&r.name).with_context(|| format!("removing snapshot {} of {}", r.name, head.spec()))?;
            out.removed.push(r.name.clone());
        }
        ctx.catalog.set_snapshot_state(r.id, SnapshotState::Removed)?;
    }
    ctx.catalog.set_agent_state(
        &held_key(name),
        &serde_json::to_string(&Held { bytes: 0, snapshot: None, measured: blockvault_catalog::now_rfc3339() })?,
    )?;
    info!(image = name, rbd_image = %head.spec(), in_trash = out.trashed, removed = ?out.removed,
        "released: blockvault's snapshots are removed; the backups stay restorable from the store, and the next backup of this image is a full read");
    Ok(out)
}

/// Images of the catalog that blockvault still holds snapshots of, per
/// RBD pool: `(pool, namespace) → [(catalog name, RBD image name)]`.
fn held_images(ctx: &Ctx) -> Result<BTreeMap<(String, Option<String>), Vec<(String, String)>>> {
    let mut by_pool: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for row in ctx.catalog.images()? {
        if kept_rows(ctx, row.id)?.is_empty() {
            continue;
        }
        let Ok(config::Source::Rbd { pool, namespace, image, .. }) = source_of(ctx, &row.name, &row.source) else { continue };
        by_pool.entry((pool, namespace)).or_default().push((row.name, image));
    }
    Ok(by_pool)
}

/// The catalog images that blockvault holds snapshots of and that are in
/// the RBD trash: `(catalog name, rbd:POOL/IMAGE)`. Their removal is
/// blocked by those snapshots.
///
/// # Errors
/// Catalog or cluster errors.
pub fn trashed_images(ctx: &Ctx, cluster: &Arc<Cluster>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for ((pool, ns), images) in held_images(ctx)? {
        let ioctx = open_pool(cluster, &pool, ns.as_deref())?;
        let trash = ioctx.trash_list()?;
        for (name, rbd_name) in images {
            if trash.iter().any(|(_, n)| n == &rbd_name) {
                let spec = config::Source::Rbd { pool: pool.clone(), namespace: ns.clone(), image: rbd_name, snap: None };
                out.push((name, spec.to_string()));
            }
        }
    }
    Ok(out)
}

/// Releases every catalog image found in the RBD trash whose config entry
/// does not say `release-trashed = false` (`run`, the daemon). A failure
/// of one image is logged and the others are still tried. Returns the
/// images released.
///
/// # Errors
/// When the catalog cannot be read or the cluster not reached.
pub fn release_trashed(ctx: &Ctx) -> Result<Vec<String>> {
    let wanted = |name: &str| ctx.cfg.entry_for(name).is_none_or(|e| e.release_trashed(&ctx.cfg.defaults));
    if held_images(ctx)?.values().flatten().all(|(n, _)| !wanted(n)) {
        return Ok(Vec::new()); // nothing to look for: no cluster connection
    }
    let cluster = connect(&ctx.cfg)?;
    let mut done = Vec::new();
    for (name, spec) in trashed_images(ctx, &cluster)? {
        if !wanted(&name) {
            info!(image = %name, rbd_image = %spec, "in the RBD trash, but release-trashed = false: keeping blockvault's snapshot (it blocks the purge)");
            continue;
        }
        warn!(image = %name, rbd_image = %spec, "the image is in the RBD trash: releasing blockvault's snapshots so that it can be purged");
        match release_image(ctx, &cluster, &name) {
            Ok(r) if r.trashed => done.push(name),
            Ok(_) => {}
            Err(e) => warn!(image = %name, error = %format!("{e:#}"), "could not release the trashed image; the next run retries"),
        }
    }
    Ok(done)
}

/// [`release_trashed`], logging a failure instead of returning it.
pub fn release_trashed_logged(ctx: &Ctx) {
    if let Err(e) = release_trashed(ctx) {
        warn!(error = %format!("{e:#}"), "could not look for blockvault images in the RBD trash");
    }
}
