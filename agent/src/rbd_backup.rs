//! RBD sources: snapshot, diff against the previous backup's snapshot, read
//! only the changed blocks, then demote older snapshots.
//!
//! Safety rules, each a place where real tools lost data:
//! * An extent the diff reports as no longer existing (discarded, or cut off
//!   by a shrink) becomes zero blocks, never "unchanged".
//! * A vanished base snapshot, an object map or fast-diff flagged invalid, or
//!   a diff that fails a sampled check falls back to a full read of the
//!   allocated extents: one warning, and the job still succeeds.
//! * The snapshot is recorded in the catalog (intent) before it is created,
//!   so a crash between the two leaves a row the next run cleans up; a
//!   failure after it was created removes it.
//! * Only snapshots that this catalog recorded as created by blockvault are
//!   ever removed.

use std::cell::Cell;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use blockvault_catalog::{BackupState, SnapshotState};
use blockvault_store::{BlockMap, ChunkId, Manifest, RbdInfo};
use rand::seq::SliceRandom;
use tracing::{info, warn};

use crate::backup::{image_lock_name, load_parent, recover_stale, run_backup, Parent, Prepared};
use crate::config::{Config, ImageConfig, Source};
use crate::context::Ctx;
use crate::pipeline::Progress;
use crate::rbd::{self, CephOptions, Cluster, Image, IoCtx};
use crate::rbd_patch::{plan_patches, Patcher};
use crate::source::{mark_range, BlockAction, ImageSource};

/// Prefix of every snapshot blockvault creates.
pub const SNAP_PREFIX: &str = "blockvault-";

/// Inherited blocks checked against the snapshot before a diff is trusted:
/// at least this many…
const MIN_SAMPLES: usize = 8;
/// …or this fraction of them (per mille), whichever is more.
const SAMPLE_PER_MILLE: usize = 1;

/// Cluster connection options from the config, defaulting as Ceph's tools do.
pub fn ceph_options(cfg: &Config) -> CephOptions {
    let c = &cfg.ceph;
    CephOptions {
        conf: c.conf.clone(),
        client_id: c.client_id.clone().unwrap_or_else(|| "admin".into()),
        keyring: c.keyring.clone(),
        timeout_secs: c.timeout.unwrap_or(rbd::DEFAULT_TIMEOUT_SECS),
    }
}

/// Connects to the configured cluster.
///
/// # Errors
/// When the libraries are missing or the cluster cannot be reached in time.
pub fn connect(cfg: &Config) -> Result<Arc<Cluster>> {
    let opts = ceph_options(cfg);
    let conf = opts
        .conf
        .clone()
        .or_else(|| std::env::var_os("CEPH_CONF").map(Into::into))
        .unwrap_or_else(|| "/etc/ceph/ceph.conf".into());
    Cluster::connect(&opts)
        .with_context(|| format!("connecting to the Ceph cluster of {} as client.{}", conf.display(), opts.client_id))
}

/// A snapshot opened read-only, as a pipeline source; partly changed
/// blocks are patched from the parent backup when a patcher is given.
struct RbdSource {
    image: Image,
    size: u64,
    patcher: Option<Patcher>,
}

impl ImageSource for RbdSource {
    fn describe(&self) -> String {
        format!("rbd:{}", self.image.spec())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(p) = &self.patcher {
            if p.read_patched(&self.image, offset, buf)? {
                return Ok(());
            }
        }
        self.image.read_at(offset, buf).map_err(io::Error::other)
    }
    fn patched(&self) -> (u64, u64) {
        self.patcher.as_ref().map_or((0, 0), Patcher::counters)
    }
}

fn snapshot_name() -> String {
    format!("{SNAP_PREFIX}{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"))
}

/// Splits an RBD source.
fn rbd_parts(src: &Source) -> (&str, Option<&str>, &str) {
    match src {
        Source::Rbd { pool, namespace, image } => (pool, namespace.as_deref(), image),
        Source::File(_) => unreachable!("not an RBD source"),
    }
}

pub(crate) fn open_pool(cluster: &Arc<Cluster>, pool: &str, ns: Option<&str>) -> Result<IoCtx> {
    cluster.ioctx(pool, ns).with_context(|| match ns {
        Some(ns) => format!("opening pool '{pool}' namespace '{ns}'"),
        None => format!("opening pool '{pool}'"),
    })
}

/// Backs up one RBD image. The caller holds the store lock and the image lock.
///
/// # Errors
/// Cluster, store or catalog errors; nothing is committed then, and a
/// snapshot this run created is removed.
pub fn backup(ctx: &mut Ctx, img: &ImageConfig, progress: &dyn Progress, cancel: &AtomicBool) -> Result<Manifest> {
    let (pool, ns, name) = rbd_parts(&img.source);
    // Everything that can fail on the cluster side fails before the catalog is touched.
    let cluster = connect(&ctx.cfg)?;
    let ioctx = open_pool(&cluster, pool, ns)?;
    let head = ioctx.open_rw(name).with_context(|| format!("opening RBD image {}", img.source))?;

    let block_size = img.block_size(&ctx.cfg.defaults).unwrap_or(ctx.store.meta().default_block_size);
    let image_row = ctx.catalog.ensure_image(&img.name, &img.source.to_string(), block_size)?;
    let image_id = image_row.id;
    let block_size = image_row.block_size;
    recover_stale(ctx, image_id)?;
    let record = ctx.store.root().join("locks").join(format!("{}.rbd-client", image_lock_name(&img.name)));
    break_lock_of_dead_run(&head, &record, &img.name);
    log_lock_owner(&head, &img.name);
    record_client(&head, &record);
    cleanup_snapshots(ctx, &head, image_id)?;
    let parent = load_parent(ctx, image_id)?;

    // Decide the base snapshot, or why there is none.
    let cluster_snaps = head.snaps()?;
    let present: Vec<String> = ctx
        .catalog
        .snapshots(image_id)?
        .into_iter()
        .filter(|s| s.state == SnapshotState::Present)
        .map(|s| s.name)
        .collect();
    let base: Option<String> = match &parent {
        None => {
            info!(image = %img.name, "first backup of this image: reading every allocated extent");
            None
        }
        Some(p) => match &p.manifest.snapshot {
            None => {
                warn!(image = %img.name, parent = p.manifest.id.0, "parent backup has no RBD snapshot: falling back to a full read");
                None
            }
            Some(s) if !cluster_snaps.iter().any(|c| &c.name == s) || !present.contains(s) => {
                warn!(image = %img.name, snapshot = %s, parent = p.manifest.id.0,
                    "base snapshot is gone from the cluster: falling back to a full read of the allocated extents");
                None
            }
            Some(s) if p.map.block_size() != block_size => {
                warn!(image = %img.name, snapshot = %s, "parent block size differs: falling back to a full read");
                None
            }
            Some(s) => Some(s.clone()),
        },
    };

    let features = head.features()?;
    let object_size = head.object_size()?;
    let snap = snapshot_name();
    let snap_row: Cell<Option<i64>> = Cell::new(None);
    let result = run_backup(ctx, img, image_id, parent.as_ref(), block_size, progress, cancel, |ctx, id| {
        let row = ctx.catalog.snapshot_intent(image_id, &snap, id)?;
        snap_row.set(Some(row));
        head.create_snap(&snap).with_context(|| format!("creating snapshot {snap} of {}", img.source))?;
        ctx.catalog.set_snapshot_state(row, SnapshotState::Present)?;
        let at = ioctx.open(name, Some(&snap))?;
        let size = at.size()?;
        let fast_diff_ok = fast_diff_usable(&at, features)?;
        let whole_object = fast_diff_ok && block_size as u64 >= object_size;
        let planned = match (&base, &parent) {
            (Some(base_snap), Some(p)) => {
                let base_ok = match ioctx.open(name, Some(base_snap)) {
                    Ok(b) => fast_diff_usable(&b, features)?,
                    Err(e) => {
                        warn!(snapshot = %base_snap, error = %e, "cannot open the base snapshot");
                        false
                    }
                };
                if (features & rbd::FEATURE_OBJECT_MAP != 0) && !(fast_diff_ok && base_ok) {
                    warn!(image = %img.name, "object map or fast-diff is flagged invalid: falling back to a full read of the allocated extents");
                    None
                } else {
                    let plan = plan_incremental(&at, base_snap, p, size, whole_object)?;
                    if let Some(b) = sample_check(&at, p, &plan.0, &plan.1)? {
                        warn!(image = %img.name, block = b, parent = p.manifest.id.0,
                            "the diff called a block unchanged whose content differs from the parent backup: falling back to a full read");
                        None
                    } else {
                        Some(plan)
                    }
                }
            }
            _ => None,
        };
        let (actions, map, full_read) = match planned {
            Some((actions, map)) => (actions, map, false),
            None => {
                let (actions, map) = plan_full(&at, size, block_size, fast_diff_ok)?;
                (actions, map, true)
            }
        };
        let patcher = match (&base, &parent) {
            (Some(base_snap), Some(p)) if !full_read => patcher_for(ctx, img, &at, base_snap, p, &actions, size)?,
            _ => None,
        };
        let changed = actions.iter().filter(|a| **a == BlockAction::Read).count();
        let patched = patcher.as_ref().map_or(0, Patcher::len);
        info!(image = %img.name, snapshot = %snap, base = ?base, full_read, blocks = actions.len(), read_blocks = changed,
            patched_blocks = patched, "plan ready");
        Ok(Prepared {
            source: Box::new(RbdSource { image: at, size, patcher }),
            actions,
            map,
            full_read,
            snapshot: Some(snap.clone()),
            rbd: Some(RbdInfo { features, object_size }),
        })
    });
    match result {
        Ok(m) => {
            let keep = img.keep_snapshots(&ctx.cfg.defaults);
            if let Err(e) = demote(ctx, &head, image_id, keep) {
                warn!(image = %img.name, error = %format!("{e:#}"), "could not demote older snapshots; the next run retries");
            }
            Ok(m)
        }
        Err(e) => {
            if head.has_timed_out() {
                // The cluster stopped answering: removing the snapshot (and
                // closing the images, see blockvault-ceph) would each wait
                // another timeout. The catalog records the snapshot as
                // this uncommitted backup's, so the next run removes it.
                if snap_row.get().is_some() {
                    warn!(image = %img.name, snapshot = %snap,
                        "the cluster timed out: leaving the snapshot of this failed backup for the next run to remove");
                }
                return Err(e);
            }
            if let Some(row) = snap_row.get() {
                match remove_snap_if_present(&head, &snap) {
                    Ok(()) => ctx.catalog.set_snapshot_state(row, SnapshotState::Removed)?,
                    Err(e2) => warn!(snapshot = %snap, error = %format!("{e2:#}"), "could not remove the snapshot of a failed backup; the next run retries"),
                }
            }
            Err(e)
        }
    }
}

/// The patcher for the partly changed blocks of an incremental, or `None`
/// when there are none or the exact diff cannot be trusted (both logged).
///
/// # Errors
/// When the store cannot be opened or a sample read fails.
fn patcher_for(
    ctx: &Ctx,
    img: &ImageConfig,
    at: &Image,
    base: &str,
    parent: &Parent,
    actions: &[BlockAction],
    size: u64,
) -> Result<Option<Patcher>> {
    let patches = match plan_patches(at, base, &parent.map, actions, size) {
        Ok(p) if p.is_empty() => return Ok(None),
        Ok(p) => p,
        Err(e) => {
            warn!(image = %img.name, snapshot = %base, error = %format!("{e:#}"),
                "exact diff of the changed blocks failed: reading them whole");
            return Ok(None);
        }
    };
    let patcher = Patcher::new(ctx.store.root(), parent.map.block_size(), patches)?;
    if let Some(b) = patcher.sample_check(at)? {
        warn!(image = %img.name, block = b, parent = parent.manifest.id.0,
            "a partly changed block patched from the parent backup differs from the snapshot: reading every changed block whole");
        return Ok(None);
    }
    Ok(Some(patcher))
}

/// Who this process is, so a later run can tell that it is dead: the
/// boot, the pid and the pid's start time (a reused pid has another).
fn process_identity(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name (which may hold spaces) start at field 3;
    // the start time is field 22
    let start = stat.rsplit_once(") ")?.1.split(' ').nth(19)?.to_string();
    Some(format!("{} {pid} {start}", boot.trim()))
}

/// Writes `record` (`locks/image-NAME.rbd-client` in the store, under the
/// image lock): this process and its cluster client's addresses, so the
/// next run can break the exclusive lock this run may leave behind if it is
/// killed or gives up on an unresponsive cluster. Best effort.
fn record_client(head: &Image, record: &std::path::Path) {
    let (Some(me), Ok(addrs)) = (process_identity(std::process::id()), head.ioctx().client_addrs()) else {
        return;
    };
    let tmp = record.with_extension("rbd-client.tmp");
    if std::fs::write(&tmp, format!("{me}\n{addrs}\n")).and_then(|()| std::fs::rename(&tmp, record)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Breaks the image's exclusive lock when its owner is verifiably dead: the
/// record of the previous run (see [`record_client`]) names the owner's
/// address, and that run's process, on this same boot, no longer exists.
/// We hold the image lock, so no other blockvault run of this image is
/// alive. librbd blocklists the owner as it breaks the lock. Anything less
/// certain leaves the lock alone (and [`log_lock_owner`] says so).
fn break_lock_of_dead_run(head: &Image, record: &std::path::Path, image: &str) {
    let Ok(text) = std::fs::read_to_string(record) else {
        return;
    };
    let mut lines = text.lines();
    let (Some(who), Some(addrs)) = (lines.next(), lines.next()) else {
        return;
    };
    let mut f = who.split(' ');
    let (Some(boot), Some(pid)) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok())) else {
        return;
    };
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    if boot != this_boot.trim() || pid == std::process::id() {
        return; // another boot or host: cannot tell whether it is dead
    }
    if process_identity(pid).as_deref() == Some(who) {
        return; // still running (cannot be a backup of this image: we hold its lock)
    }
    let Ok(owners) = head.lock_owners() else {
        return;
    };
    for owner in owners.iter().filter(|o| !o.is_empty() && addrs.contains(o.as_str())) {
        match head.break_lock(owner) {
            Ok(()) => info!(image = %image, owner = %owner, pid,
                "broke the exclusive lock left by a blockvault run that is dead (killed, or gave up on an unresponsive cluster); its client is blocklisted"),
            Err(e) => warn!(image = %image, owner = %owner, error = %e,
                "cannot break the exclusive lock left by a dead blockvault run; waiting for it to expire"),
        }
    }
}

/// Says, before anything waits for it, that another client holds the
/// image's exclusive lock: snapshot creation and removal then go through
/// that client, and if it is gone without releasing the lock (a killed
/// backup, a crashed host) librbd takes the lock over only once the
/// owner's watch has expired (`osd_client_watch_timeout`, 30 s by
/// default). Only the lock of a blockvault run known to be dead is broken
/// ([`break_lock_of_dead_run`]): any other owner may be alive (a running
/// VM), and breaking a live owner's lock blocklists it.
fn log_lock_owner(head: &Image, image: &str) {
    if head.features().is_ok_and(|f| f & rbd::FEATURE_EXCLUSIVE_LOCK == 0) {
        return;
    }
    let me = head.ioctx().client_addrs().unwrap_or_default();
    match head.lock_owners() {
        Ok(owners) => {
            for owner in owners.iter().filter(|o| !me.contains(o.as_str())) {
                info!(image = %image, owner = %owner,
                    "another client holds the image's exclusive lock: snapshots are created and removed through it; \
                     if it is dead (e.g. a killed backup), this waits until its watch expires (osd_client_watch_timeout, 30 s by default); \
                     the lock is not broken: it is not a blockvault run known to be dead, and breaking a live owner's lock (a VM's) would blocklist it");
            }
        }
        Err(e) => tracing::debug!(image = %image, error = %e, "cannot read the exclusive lock owner"),
    }
}

/// Whether the object map / fast-diff of an open image or snapshot can be
/// trusted (true also when the image has no object map: then librbd diffs
/// by listing objects, which is slower but exact).
fn fast_diff_usable(img: &Image, features: u64) -> Result<bool> {
    if features & rbd::FEATURE_OBJECT_MAP == 0 {
        return Ok(false);
    }
    let flags = img.flags()?;
    Ok(flags & (rbd::FLAG_OBJECT_MAP_INVALID | rbd::FLAG_FAST_DIFF_INVALID) == 0)
}

/// Plans a full read: every extent that exists is read, the rest is zero.
fn plan_full(at: &Image, size: u64, block_size: u32, whole_object: bool) -> Result<(Vec<BlockAction>, BlockMap)> {
    let map = BlockMap::new_zeroed(size, block_size);
    let mut actions = vec![BlockAction::Zero; map.len()];
    at.diff_iterate(None, 0, size, whole_object, |off, len, exists| {
        if exists {
            mark_range(&mut actions, block_size, off, len, BlockAction::Read);
        }
        true
    })?;
    Ok((actions, map))
}

/// Plans an incremental against `base`: changed blocks are read, blocks
/// the diff reports as gone are zero, every other block is inherited.
fn plan_incremental(
    at: &Image,
    base: &str,
    parent: &Parent,
    size: u64,
    whole_object: bool,
) -> Result<(Vec<BlockAction>, BlockMap)> {
    let pmap = &parent.map;
    let bs = pmap.block_size() as u64;
    let map = BlockMap::inherit(pmap, size);
    let n = map.len();
    let old = pmap.image_size();
    let mut actions = vec![BlockAction::Inherit; n];
    for (b, a) in actions.iter_mut().enumerate() {
        if b as u64 * bs >= old {
            *a = BlockAction::Zero; // grown: unwritten space reads as zeros
        }
    }
    if size != old {
        // blocks whose length changed with the resize must be read whole
        for edge in [old, size] {
            if edge % bs != 0 && edge <= size && ((edge / bs) as usize) < n {
                actions[(edge / bs) as usize] = BlockAction::Read;
            }
        }
    }
    at.diff_iterate(Some(base), 0, size, whole_object, |off, len, exists| {
        if exists {
            mark_range(&mut actions, bs as u32, off, len, BlockAction::Read);
        } else {
            mark_gone(&mut actions, bs, size, off, len);
        }
        true
    })?;
    Ok((actions, map))
}

/// An extent that no longer exists: blocks it covers entirely are zero
/// (unless another extent made them Read); blocks it covers partly must be
/// read, since the rest of the block may hold data.
fn mark_gone(actions: &mut [BlockAction], bs: u64, size: u64, off: u64, len: u64) {
    if len == 0 || actions.is_empty() {
        return;
    }
    let end = (off + len).min(size);
    let first = (off / bs) as usize;
    let last = (((end.max(off + 1)) - 1) / bs) as usize;
    for b in first..=last.min(actions.len() - 1) {
        let bstart = b as u64 * bs;
        let bend = (bstart + bs).min(size);
        let covered = off <= bstart && end >= bend;
        if !covered {
            actions[b] = BlockAction::Read;
        } else if actions[b] != BlockAction::Read {
            actions[b] = BlockAction::Zero;
        }
    }
}

/// Reads a random sample of the blocks the diff calls unchanged and checks
/// them against the parent's block map. Returns the first mismatching block.
fn sample_check(at: &Image, parent: &Parent, actions: &[BlockAction], map: &BlockMap) -> Result<Option<usize>> {
    let mut inherited: Vec<usize> = actions
        .iter()
        .enumerate()
        .filter_map(|(b, a)| (*a == BlockAction::Inherit).then_some(b))
        .collect();
    let want = (inherited.len() * SAMPLE_PER_MILLE / 1000).max(MIN_SAMPLES).min(inherited.len());
    inherited.shuffle(&mut rand::thread_rng());
    let mut buf = Vec::new();
    for &b in &inherited[..want] {
        let (off, len) = map.block_range(b);
        buf.resize(len, 0);
        at.read_at(off, &mut buf).with_context(|| format!("reading sample block {b}"))?;
        let id = (!blockvault_store::chunk::is_zero(&buf)).then(|| ChunkId::of(&buf));
        if id != parent.map.get(b) {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

fn remove_snap_if_present(head: &Image, snap: &str) -> Result<()> {
    match head.remove_snap(snap) {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Cleans up after crashed or failed runs: snapshots recorded as intended or
/// present whose backup never committed are removed from the cluster;
/// present rows whose snapshot was deleted by hand are marked removed;
/// blockvault snapshots that a committed backup names but that the catalog
/// lost (rebuilt catalog) are adopted.
fn cleanup_snapshots(ctx: &mut Ctx, head: &Image, image_id: i64) -> Result<()> {
    let on_cluster: Vec<String> = head.snaps()?.into_iter().map(|s| s.name).collect();
    let rows = ctx.catalog.snapshots(image_id)?;
    for s in &rows {
        if s.state == SnapshotState::Removed {
            continue;
        }
        let committed = match s.backup_id {
            Some(b) => ctx.catalog.backup(b)?.is_some_and(|r| r.state == BackupState::Committed),
            None => false,
        };
        let exists = on_cluster.contains(&s.name);
        if !committed {
            if exists {
                warn!(snapshot = %s.name, backup = ?s.backup_id.map(|b| b.0), "removing the snapshot of an interrupted or failed backup");
                remove_snap_if_present(head, &s.name)?;
            }
            ctx.catalog.set_snapshot_state(s.id, SnapshotState::Removed)?;
        } else if !exists {
            warn!(snapshot = %s.name, "snapshot was deleted outside blockvault; the next incremental needs a full read");
            ctx.catalog.set_snapshot_state(s.id, SnapshotState::Removed)?;
        } else if s.state == SnapshotState::Intent {
            ctx.catalog.set_snapshot_state(s.id, SnapshotState::Present)?;
        }
    }
    // adopt snapshots of committed backups the catalog has no row for
    for b in ctx.catalog.backups_in_state(image_id, BackupState::Committed)? {
        if let Some(snap) = &b.snapshot {
            if on_cluster.contains(snap) && !rows.iter().any(|r| &r.name == snap) {
                info!(snapshot = %snap, backup = b.id.0, "adopting a blockvault snapshot the catalog did not know");
                let row = ctx.catalog.snapshot_intent(image_id, snap, b.id)?;
                ctx.catalog.set_snapshot_state(row, SnapshotState::Present)?;
            }
        }
    }
    Ok(())
}

/// Keeps the newest `keep` present snapshots of committed backups and
/// deletes the older ones from the cluster (their backups live on in the
/// store).
fn demote(ctx: &mut Ctx, head: &Image, image_id: i64, keep: u32) -> Result<()> {
    let mut present: Vec<_> = ctx
        .catalog
        .snapshots(image_id)?
        .into_iter()
        .filter(|s| s.state == SnapshotState::Present && s.name.starts_with(SNAP_PREFIX))
        .collect();
    present.sort_by_key(|s| std::cmp::Reverse(s.backup_id.map(|b| b.0).unwrap_or(0)));
    for s in present.iter().skip(keep as usize) {
        remove_snap_if_present(head, &s.name).with_context(|| format!("removing snapshot {}", s.name))?;
        ctx.catalog.set_snapshot_state(s.id, SnapshotState::Removed)?;
        info!(snapshot = %s.name, backup = ?s.backup_id.map(|b| b.0), "demoted: snapshot removed, backup lives on in the store");
    }
    Ok(())
}

/// Every configured image, with glob sources (`rbd:pool/vm-*`) expanded to
/// one image per match; the name's `{image}` becomes the RBD image name.
///
/// # Errors
/// When a glob needs the cluster and it cannot be reached.
pub fn expand_images(cfg: &Config) -> Result<Vec<ImageConfig>> {
    let mut out = Vec::new();
    let mut cluster: Option<Arc<Cluster>> = None;
    for img in &cfg.images {
        if !img.source.is_glob() {
            out.push(img.clone());
            continue;
        }
        let (pool, ns, pattern) = rbd_parts(&img.source);
        let pat = glob::Pattern::new(pattern).with_context(|| format!("image '{}': bad glob '{pattern}'", img.name))?;
        if cluster.is_none() {
            cluster = Some(connect(cfg)?);
        }
        let ioctx = open_pool(cluster.as_ref().unwrap(), pool, ns)?;
        let mut names = ioctx.list_images()?;
        names.sort();
        for n in names.into_iter().filter(|n| pat.matches(n)) {
            let mut c = img.clone();
            c.name = img.name.replace("{image}", &n);
            // the store rejects a manifest whose name breaks the rule, so
            // such an image is never backed up under it
            if let Err(why) = blockvault_store::manifest::check_image_name(&c.name) {
                warn!(pattern = %img.name, rbd_image = %n.escape_debug(), "skipping an RBD image whose name makes no valid image name: {why}");
                continue;
            }
            c.source = Source::Rbd { pool: pool.into(), namespace: ns.map(Into::into), image: n };
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockAction::*;

    #[test]
    fn gone_extents_zero_whole_blocks_and_read_partial_ones() {
        let mut a = vec![Inherit; 4];
        mark_gone(&mut a, 100, 400, 50, 200); // 50..250: covers block 1, partial 0 and 2
        assert_eq!(a, vec![Read, Zero, Read, Inherit]);
        let mut a = vec![Inherit, Read, Inherit];
        mark_gone(&mut a, 100, 250, 100, 150); // covers 1 (already Read) and the short last block
        assert_eq!(a, vec![Inherit, Read, Zero]);
    }
}
