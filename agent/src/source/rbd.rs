//! RBD sources: snapshot, diff against the previous backup's snapshot, read
//! only the changed blocks (partly changed ones patched from the parent
//! backup, see [`patch`]), then demote older snapshots.
//!
//! Safety rules, each a place where real tools lost data:
//! * An extent the diff reports as no longer existing (discarded, or cut off
//!   by a shrink) becomes zero blocks, never "unchanged" (the planner's rule,
//!   [`crate::plan`]).
//! * A vanished base snapshot, an object map or fast-diff flagged invalid, or
//!   a diff that fails a sampled check falls back to a full read of the
//!   allocated extents: one warning, and the job still succeeds.
//! * The snapshot is recorded in the catalog (intent) before it is created,
//!   so a crash between the two leaves a row the next run cleans up; a
//!   failure after it was created removes it.
//! * Only snapshots that this catalog recorded as created by blockvault are
//!   ever removed.

mod ahead;
pub mod patch;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use blockvault_catalog::{BackupState, Catalog, SnapshotState};
use blockvault_store::{BackupId, ChunkHasher, ChunkId, RbdInfo, Store};
use rand::seq::SliceRandom;
use tracing::{info, warn};

use self::ahead::{covered_blocks, ReadAhead, READ_AHEAD_THREADS};
use self::patch::{plan_patches, Patcher};
use super::{BlockRead, ImageSource, Job, Outcome, Parent, Source, StoreAhead, StoredBlock};
use crate::config::{self, Config, ImageConfig};
use crate::error::BackupError;
use crate::plan::{BlockAction, Changes, Extent, FullReason, Plan};
use crate::rbd::{self, CephOptions, Cluster, Image, IoCtx};

/// Prefix of every snapshot blockvault creates.
pub const SNAP_PREFIX: &str = "blockvault-";

/// Inherited blocks checked against the snapshot before a diff is trusted:
/// one per mille of them, at least [`MIN_SAMPLES`] and at most
/// [`MAX_SAMPLES`]. What a random sample catches depends on its size, not
/// on the image's: an object map wrong for a share `f` of the blocks
/// escapes `n` samples with probability `(1 - f)^n` (64 samples: 4 % for
/// `f` = 5 %, 0.2 % for 10 %), so a larger image gets no more reads (they
/// were 16 MiB for 16 GiB at 64 KiB blocks, 40 % of a 40 MiB incremental).
const MIN_SAMPLES: usize = 8;
const MAX_SAMPLES: usize = 64;
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

/// Splits an RBD source.
pub(crate) fn rbd_parts(src: &config::Source) -> (&str, Option<&str>, &str) {
    match src {
        config::Source::Rbd { pool, namespace, image, .. } => (pool, namespace.as_deref(), image),
        config::Source::File(_) => unreachable!("not an RBD source"),
    }
}

pub(crate) fn open_pool(cluster: &Arc<Cluster>, pool: &str, ns: Option<&str>) -> Result<IoCtx> {
    cluster.ioctx(pool, ns).with_context(|| match ns {
        Some(ns) => format!("opening pool '{pool}' namespace '{ns}'"),
        None => format!("opening pool '{pool}'"),
    })
}

fn snapshot_name() -> String {
    format!("{SNAP_PREFIX}{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"))
}

/// The snapshot of one backup run and what was learnt about it.
struct Frozen {
    image: Image,
    size: u64,
    /// The object map and fast-diff of the snapshot can be trusted.
    fast_diff_ok: bool,
    /// Blocks of the snapshot read while the exact diff ran.
    ahead: ReadAhead,
}

/// One RBD image, backed up through a snapshot per run.
pub struct RbdSource {
    /// `rbd:POOL[/NS]/IMAGE`, as configured.
    spec: String,
    name: String,
    /// The configured image name (the catalog's).
    image_name: String,
    ioctx: IoCtx,
    head: Image,
    features: u64,
    object_size: u64,
    /// The image's block size (from the catalog, at [`Source::freeze`]).
    block_size: u32,
    /// Snapshots to keep on the cluster after a commit.
    keep: u32,
    /// Snapshots the catalog records as present (after [`Source::recover`]).
    present: Vec<String>,
    /// This run's snapshot, and its catalog row once the intent is recorded.
    snap: String,
    snap_row: Option<i64>,
    frozen: Option<Frozen>,
    /// The base snapshot of an incremental plan.
    base: Option<String>,
    /// The exact (not whole-object) diff the plan was made from, kept for
    /// finding the partly changed blocks without diffing again.
    exact: Option<Vec<Extent>>,
    patcher: Option<Patcher>,
    /// `rbd:POOL/IMAGE@SNAP`: this fixed snapshot is the source; no
    /// snapshot is created or removed.
    fixed: Option<String>,
    /// The clone's parent, when the image is a clone.
    clone_of: Option<rbd::ParentSpec>,
    /// The plan's base is the backup of the clone's parent snapshot.
    clone_base: bool,
    /// The store's chunk hasher (from [`Source::recover`]): the trust
    /// check's samples are hashed while the exact diff runs.
    hasher: Option<ChunkHasher>,
    /// The trust check's samples, read while the exact diff ran: blocks
    /// of objects the fast-diff reports unchanged, with their ids.
    samples: Option<Vec<(usize, Option<ChunkId>)>>,
}

impl RbdSource {
    /// Connects and opens the image. Everything that can fail on the cluster
    /// side fails here, before the catalog is touched.
    ///
    /// # Errors
    /// When the cluster, the pool or the image cannot be reached.
    pub fn open(cfg: &Config, img: &ImageConfig) -> Result<RbdSource> {
        let (pool, ns, name) = rbd_parts(&img.source);
        let cluster = connect(cfg)?;
        let ioctx = open_pool(&cluster, pool, ns)?;
        let fixed = img.source.fixed_snapshot().map(String::from);
        let head = match &fixed {
            // nothing is written to an image whose fixed snapshot is the source
            Some(snap) => ioctx.open(name, Some(snap)),
            None => ioctx.open_rw(name),
        }
        .with_context(|| format!("opening RBD image {}", img.source))?;
        let features = head.features()?;
        let object_size = head.object_size()?;
        let clone_of = head.parent().with_context(|| format!("reading the parent of RBD image {}", img.source))?;
        Ok(RbdSource {
            spec: img.source.to_string(),
            name: name.to_string(),
            image_name: img.name.clone(),
            ioctx,
            head,
            features,
            object_size,
            block_size: 0,
            keep: img.keep_snapshots(&cfg.defaults),
            present: Vec::new(),
            snap_row: None,
            frozen: None,
            base: None,
            exact: None,
            patcher: None,
            snap: fixed.clone().unwrap_or_else(snapshot_name),
            fixed,
            clone_of,
            clone_base: false,
            hasher: None,
            samples: None,
        })
    }

    /// What a clone wrote itself, as changes against the backup of its
    /// parent snapshot, or why that backup cannot be the base.
    ///
    /// Every object the clone has (written, copied up, or discarded over
    /// parent data: librbd then keeps the object, zeroed or truncated) is
    /// reported as whole objects and read from the clone, so the parent
    /// never shows through an object the clone holds; every other block
    /// reads through to the parent snapshot, which the parent backup holds.
    /// That is only true when the clone reads the whole parent: same size,
    /// overlap covering it, same block size; otherwise a full read.
    fn clone_changes(&self, f: &Frozen, parent: &Parent) -> Result<Result<Vec<Extent>, FullReason>> {
        let first = Err(FullReason::FirstBackup);
        let Some(cp) = &self.clone_of else { return Ok(first) };
        let image = if cp.namespace.is_empty() { format!("rbd:{}/{}", cp.pool, cp.image) } else { format!("rbd:{}/{}/{}", cp.pool, cp.namespace, cp.image) };
        let m = &parent.manifest;
        let same_snapshot = m.snapshot.as_deref() == Some(cp.snap.as_str()) && (m.source == image || m.source == format!("{image}@{}", cp.snap));
        let overlap = f.image.overlap()?;
        if !same_snapshot || m.image_size != f.size || overlap != f.size || parent.map.block_size() != self.block_size {
            warn!(image = %self.spec, parent_backup = m.id.0, overlap, size = f.size,
                "the clone's parent backup does not cover the clone as it is (resized, or another snapshot): reading every allocated extent");
            return Ok(first);
        }
        if self.features & rbd::FEATURE_OBJECT_MAP != 0 && !f.fast_diff_ok {
            return Ok(Err(FullReason::MapInvalid));
        }
        let mut extents = Vec::new();
        f.image.own_extents(0, f.size, true, |off, len, exists| {
            extents.push(if exists { Extent::changed(off, len) } else { Extent::gone(off, len) });
            true
        })?;
        // whole objects: widen each to its objects (librbd reports whole
        // objects here; this keeps it true if a version did not)
        let os = self.object_size.max(1);
        for e in &mut extents {
            let start = e.off / os * os;
            let end = (e.off + e.len).div_ceil(os).saturating_mul(os).min(f.size);
            e.len = end - start;
            e.off = start;
        }
        Ok(Ok(extents))
    }

    fn frozen(&self) -> Result<&Frozen> {
        self.frozen.as_ref().with_context(|| format!("RBD image {}: no snapshot taken yet", self.spec))
    }

    /// The base snapshot an incremental can diff against, or why there is none.
    fn base_for(&self, parent: &Parent, block_size: u32) -> Result<Result<String, FullReason>> {
        let parent_id = parent.manifest.id;
        let Some(s) = &parent.manifest.snapshot else {
            return Ok(Err(FullReason::ParentHasNoSnapshot { parent: parent_id }));
        };
        let on_cluster = self.head.snaps()?;
        if !on_cluster.iter().any(|c| &c.name == s) || !self.present.contains(s) {
            return Ok(Err(FullReason::BaseSnapshotGone { snapshot: s.clone(), parent: parent_id }));
        }
        if parent.map.block_size() != block_size {
            return Ok(Err(FullReason::BlockSizeChanged { snapshot: s.clone() }));
        }
        Ok(Ok(s.clone()))
    }

    /// Every extent that exists in the snapshot.
    fn allocated(&self, f: &Frozen) -> Result<Vec<Extent>> {
        let mut extents = Vec::new();
        f.image.diff_iterate(None, 0, f.size, f.fast_diff_ok, |off, len, exists| {
            if exists {
                extents.push(Extent::changed(off, len));
            }
            true
        })?;
        Ok(extents)
    }

    /// What changed since `base`: written extents, and extents that no
    /// longer exist.
    /// What changed in the frozen snapshot since `base`: whole objects with
    /// `whole_object`, else exact extents (see [`Image::diff_iterate`]).
    ///
    /// librbd 16's exact diff asks the OSD to list the snapshots of every
    /// object of the image, ten at a time, changed or not: 1,024 round
    /// trips for 4 GiB (175 ms measured here), 4,096 for 16 GiB, whatever
    /// changed. With a usable fast-diff the object maps say which objects
    /// changed without a round trip (2 ms for 4 GiB), so only those are
    /// diffed exactly, a piece of [`DIFF_PIECE_OBJECTS`] at a time on
    /// [`DIFF_THREADS`] threads.
    ///
    /// Meanwhile the trust check's samples are read from the objects the
    /// fast-diff reports unchanged (see [`early_samples`]), returned with
    /// the extents when they could be taken.
    #[allow(clippy::type_complexity)]
    fn diff(
        &self,
        f: &Frozen,
        base: &str,
        whole_object: bool,
        parent: &Parent,
        ahead: Option<&StoreAhead<'_>>,
    ) -> Result<(Vec<Extent>, Option<Vec<(usize, Option<ChunkId>)>>)> {
        if whole_object || !f.fast_diff_ok || self.features & rbd::FEATURE_FAST_DIFF == 0 {
            return Ok((diff_range(&f.image, base, 0, f.size, whole_object)?, None));
        }
        let objects = diff_range(&f.image, base, 0, f.size, true)?;
        let pieces = diff_pieces(&objects, self.object_size.max(1) * DIFF_PIECE_OBJECTS);
        let results: Vec<Mutex<Option<Result<Vec<Extent>>>>> = pieces.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let geometry = (f.size, self.block_size);
        let changed = objects_of(&objects);
        // blocks the diff finds changed whole are read and stored meanwhile (see `ahead`)
        let (todo_tx, todo) = crossbeam_channel::unbounded::<(u64, usize)>();
        let todo_tx = ahead.map(|_| todo_tx);
        let diffing_done = AtomicBool::new(false);
        let bs = u64::from(self.block_size.max(1));
        let samples = std::thread::scope(|s| {
            let changed = &changed;
            let samples = self.hasher.as_ref().map(|h| s.spawn(move || early_samples(&f.image, h, geometry, changed, parent)));
            if let Some(to) = ahead {
                for _ in 0..READ_AHEAD_THREADS.min(pieces.len()) {
                    s.spawn(|| f.ahead.read_from(&f.image, to, &todo, &diffing_done));
                }
            }
            let (next, results, pieces) = (&next, &results, &pieces);
            let diffing: Vec<_> = (0..DIFF_THREADS.min(pieces.len()))
                .map(|_| {
                    let todo_tx = todo_tx.clone();
                    s.spawn(move || loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(off, len)) = pieces.get(i) else { break };
                        let r = diff_range(&f.image, base, off, len, false);
                        if let (Ok(extents), Some(tx)) = (&r, &todo_tx) {
                            for b in covered_blocks(extents, bs, f.size) {
                                let _ = tx.send(b);
                            }
                        }
                        let failed = r.is_err();
                        *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                        if failed {
                            // the others stop at their next piece
                            next.store(pieces.len(), Ordering::Relaxed);
                            break;
                        }
                    })
                })
                .collect();
            drop(todo_tx);
            for d in diffing {
                // a panic surfaces as the piece it left empty, below
                let _ = d.join();
            }
            // the pipeline reads the rest; each block in flight ends first
            diffing_done.store(true, Ordering::Relaxed);
            samples.map(|t| t.join().map_err(|_| anyhow::anyhow!("the trust check's sample thread panicked")))
        });
        // the first error in image order; pieces skipped after a failure
        // are empty, and that failure is returned whatever its place
        let mut extents = Vec::new();
        let mut skipped = false;
        for r in results {
            match r.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(r) => extents.extend(r?),
                None => skipped = true,
            }
        }
        anyhow::ensure!(!skipped, "internal: a piece of the exact diff was skipped without an error");
        if let Some(e) = f.ahead.take_error() {
            return Err(e);
        }
        tracing::debug!(objects = objects.len(), pieces = pieces.len(), extents = extents.len(), "exact diff of the objects fast-diff reports changed");
        let samples = match samples.transpose()?.transpose() {
            Ok(s) => s,
            Err(e) => {
                // the check reads its samples again, after the plan
                warn!(image = %self.spec, error = %format!("{e:#}"), "the trust check's samples could not be read with the diff");
                None
            }
        };
        Ok((extents, samples))
    }
}

impl Source for RbdSource {
    fn describe(&self) -> String {
        format!("rbd:{}", self.head.spec())
    }

    fn recover(&mut self, store: &Store, catalog: &Catalog, job: &Job) -> Result<()> {
        self.hasher = Some(store.hasher().clone());
        if self.fixed.is_some() {
            // no snapshot of ours, no lock taken: nothing to recover
            return Ok(());
        }
        // a store object (a file of a directory store), so it works for stores without a directory
        let record = format!("locks/{}.rbd-client", job.image_lock);
        break_lock_of_dead_run(&self.head, store, &record, &job.image);
        log_lock_owner(&self.head, &job.image);
        record_client(&self.head, store, &record);
        cleanup_snapshots(catalog, &self.head, job.image_id)?;
        self.present = catalog
            .snapshots(job.image_id)?
            .into_iter()
            .filter(|s| s.state == SnapshotState::Present)
            .map(|s| s.name)
            .collect();
        Ok(())
    }

    fn freeze(&mut self, catalog: &Catalog, job: &Job, backup: BackupId) -> Result<u64> {
        self.block_size = job.block_size;
        if let Some(snap) = &self.fixed {
            let image = self.ioctx.open(&self.name, Some(snap)).with_context(|| format!("opening {}", self.spec))?;
            let size = image.size()?;
            let fast_diff_ok = fast_diff_usable(&image, self.features)?;
            self.frozen = Some(Frozen { image, size, fast_diff_ok, ahead: ReadAhead::default() });
            return Ok(size);
        }
        let row = catalog.snapshot_intent(job.image_id, &self.snap, backup)?;
        self.snap_row = Some(row);
        self.head
            .create_snap(&self.snap)
            .with_context(|| format!("creating snapshot {} of {}", self.snap, self.spec))?;
        catalog.set_snapshot_state(row, SnapshotState::Present)?;
        let image = self.ioctx.open(&self.name, Some(&self.snap))?;
        let size = image.size()?;
        let fast_diff_ok = fast_diff_usable(&image, self.features)?;
        self.frozen = Some(Frozen { image, size, fast_diff_ok, ahead: ReadAhead::default() });
        Ok(size)
    }

    fn changes(&mut self, since: Option<&Parent>, ahead: Option<&StoreAhead<'_>>) -> Result<Changes> {
        self.base = None;
        self.exact = None;
        self.clone_base = false;
        self.samples = None;
        let f = self.frozen()?;
        let full = |reason| -> Result<Changes> { Ok(Changes::Full { extents: self.allocated(f)?, reason }) };
        let Some(parent) = since else { return full(FullReason::FirstBackup) };
        if self.fixed.is_some() {
            return full(FullReason::FirstBackup);
        }
        if parent.manifest.image != self.image_name {
            // the base is the backup of the clone's parent snapshot
            return match self.clone_changes(f, parent)? {
                Ok(extents) => {
                    self.clone_base = true;
                    Ok(Changes::Since { extents })
                }
                Err(reason) => full(reason),
            };
        }
        let block_size = self.block_size;
        let base = match self.base_for(parent, block_size)? {
            Ok(b) => b,
            Err(reason) => return full(reason),
        };
        let base_ok = match self.ioctx.open(&self.name, Some(&base)) {
            Ok(b) => fast_diff_usable(&b, self.features)?,
            Err(e) => {
                warn!(snapshot = %base, error = %e, "cannot open the base snapshot");
                false
            }
        };
        if (self.features & rbd::FEATURE_OBJECT_MAP != 0) && !(f.fast_diff_ok && base_ok) {
            return full(FullReason::MapInvalid);
        }
        let whole_object = f.fast_diff_ok && block_size as u64 >= self.object_size;
        let (extents, samples) = self.diff(f, &base, whole_object, parent, ahead)?;
        self.samples = samples;
        self.base = Some(base);
        if !whole_object {
            self.exact = Some(extents.clone());
        }
        Ok(Changes::Since { extents })
    }

    fn check(&mut self, store: &Store, parent: &Parent, plan: &Plan) -> Result<()> {
        self.patcher = None;
        let early = self.samples.take();
        let f = self.frozen()?;
        if self.clone_base {
            // inherited blocks read through to the parent snapshot: sample them
            if let Some(block) = sample_check(store, &f.image, parent, plan, None)? {
                return Err(BackupError::UntrustedDiff { image: self.spec.clone(), block, parent: parent.manifest.id }.into());
            }
            return Ok(());
        }
        let Some(base) = &self.base else { return Ok(()) };
        let bad = match early {
            // a diff that touched nearly every object leaves few untouched
            // blocks: the rest of the samples come from the plan's
            Some(samples) => match first_mismatch(&samples, parent, plan) {
                None if samples.len() < MIN_SAMPLES => sample_check(store, &f.image, parent, plan, Some(MIN_SAMPLES - samples.len()))?,
                bad => bad,
            },
            None => sample_check(store, &f.image, parent, plan, None)?,
        };
        if let Some(block) = bad {
            return Err(BackupError::UntrustedDiff { image: self.spec.clone(), block, parent: parent.manifest.id }.into());
        }
        let patcher = patcher_for(store, &self.spec, &f.image, base, parent, &plan.actions, f.size, self.exact.as_deref())?;
        self.patcher = patcher;
        Ok(())
    }

    fn reader<'a>(&'a self, store: &'a Store) -> Result<Box<dyn ImageSource + 'a>> {
        let f = self.frozen()?;
        Ok(Box::new(RbdReader { image: &f.image, size: f.size, patcher: self.patcher.as_ref(), ahead: &f.ahead, store }))
    }

    fn held_snapshots(&self) -> Option<Vec<String>> {
        Some(self.present.clone())
    }

    fn clone_parent(&mut self) -> Result<Option<String>> {
        Ok(self.clone_of.as_ref().filter(|_| self.fixed.is_none()).map(|cp| {
            if cp.namespace.is_empty() {
                format!("rbd:{}/{}@{}", cp.pool, cp.image, cp.snap)
            } else {
                format!("rbd:{}/{}/{}@{}", cp.pool, cp.namespace, cp.image, cp.snap)
            }
        }))
    }

    fn snapshot(&self) -> Option<String> {
        Some(self.snap.clone())
    }

    fn rbd_info(&self) -> Option<RbdInfo> {
        Some(RbdInfo { features: self.features, object_size: self.object_size })
    }

    /// Each read is a round trip to an OSD: keep about 32 MiB in flight
    /// (8 reads of 4 MiB, 16 of 1 MiB or less), as `rbd export-diff` keeps
    /// several object reads in flight.
    fn default_readers(&self, block_size: u32) -> usize {
        ((32 << 20) / block_size.max(1) as usize).clamp(4, 16)
    }

    fn finish(&mut self, catalog: &Catalog, job: &Job, outcome: Outcome) -> Result<()> {
        if let Some(f) = &self.frozen {
            let (read, taken) = f.ahead.counts();
            if read > 0 {
                tracing::debug!(read, taken, "blocks read and stored during the diff, and taken by the pipeline");
            }
        }
        if self.fixed.is_some() {
            return Ok(()); // not our snapshot: never demoted or removed
        }
        match outcome {
            Outcome::Committed => {
                if let Err(e) = demote(catalog, &self.head, job.image_id, self.keep) {
                    warn!(image = %job.image, error = %format!("{e:#}"), "could not demote older snapshots; the next run retries");
                }
            }
            Outcome::Failed => {
                if self.head.has_timed_out() {
                    // The cluster stopped answering: removing the snapshot (and
                    // closing the images, see blockvault-ceph) would each wait
                    // another timeout. The catalog records the snapshot as
                    // this uncommitted backup's, so the next run removes it.
                    if self.snap_row.is_some() {
                        warn!(image = %job.image, snapshot = %self.snap,
                            "the cluster timed out: leaving the snapshot of this failed backup for the next run to remove");
                    }
                    return Ok(());
                }
                if let Some(row) = self.snap_row {
                    // the snapshot is closed before it is removed
                    self.frozen = None;
                    match remove_snap_if_present(&self.head, &self.snap) {
                        Ok(()) => catalog.set_snapshot_state(row, SnapshotState::Removed)?,
                        Err(e) => warn!(snapshot = %self.snap, error = %format!("{e:#}"),
                            "could not remove the snapshot of a failed backup; the next run retries"),
                    }
                }
            }
        }
        Ok(())
    }
}

/// A snapshot opened read-only, as a pipeline source; partly changed
/// blocks are patched from the parent backup when a patcher is given.
struct RbdReader<'a> {
    image: &'a Image,
    size: u64,
    patcher: Option<&'a Patcher>,
    ahead: &'a ReadAhead,
    store: &'a Store,
}

impl ImageSource for RbdReader<'_> {
    fn describe(&self) -> String {
        format!("rbd:{}", self.image.spec())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(offset, buf).map_err(io::Error::other)
    }
    fn read_block(&self, offset: u64, buf: &mut [u8]) -> io::Result<BlockRead> {
        if let Some(p) = self.patcher {
            if let Some(source_bytes) = p.read_patched(self.store, self.image, offset, buf)? {
                return Ok(BlockRead::Patched { source_bytes });
            }
        }
        self.read_at(offset, buf)?;
        Ok(BlockRead::Whole)
    }
    fn take_stored(&self) -> Vec<StoredBlock> {
        self.ahead.take_all()
    }
}

/// The patcher for the partly changed blocks of an incremental, or `None`
/// when there are none or the exact diff cannot be trusted (both logged).
///
/// # Errors
/// When a sample read fails.
#[allow(clippy::too_many_arguments)]
fn patcher_for(
    store: &Store,
    spec: &str,
    at: &Image,
    base: &str,
    parent: &Parent,
    actions: &[BlockAction],
    size: u64,
    exact: Option<&[Extent]>,
) -> Result<Option<Patcher>> {
    let patches = match plan_patches(at, base, &parent.map, actions, size, exact) {
        Ok(p) if p.is_empty() => return Ok(None),
        Ok(p) => p,
        Err(e) => {
            warn!(image = %spec, snapshot = %base, error = %format!("{e:#}"),
                "exact diff of the changed blocks failed: reading them whole");
            return Ok(None);
        }
    };
    let patcher = Patcher::new(parent.map.block_size(), patches);
    if let Some(b) = patcher.sample_check(store, at)? {
        warn!(image = %spec, block = b, parent = parent.manifest.id.0,
            "a partly changed block patched from the parent backup differs from the snapshot: reading every changed block whole");
        return Ok(None);
    }
    info!(image = %spec, patched_blocks = patcher.len(), "partly changed blocks are patched from the parent backup");
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
fn record_client(head: &Image, store: &Store, record: &str) {
    let (Some(me), Ok(addrs)) = (process_identity(std::process::id()), head.ioctx().client_addrs()) else {
        return;
    };
    // atomic replace; a failure only costs the next run this lock-breaking aid
    let _ = store.backend().put_object(record, format!("{me}\n{addrs}\n").as_bytes());
}

/// Breaks the image's exclusive lock when its owner is verifiably dead: the
/// record of the previous run (see [`record_client`]) names the owner's
/// address, and that run's process, on this same boot, no longer exists.
/// We hold the image lock, so no other blockvault run of this image is
/// alive. librbd blocklists the owner as it breaks the lock. Anything less
/// certain leaves the lock alone (and [`log_lock_owner`] says so).
fn break_lock_of_dead_run(head: &Image, store: &Store, record: &str, image: &str) {
    let Ok(Some(bytes)) = store.backend().get_object(record, 4096) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
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

/// Threads of an exact diff ([`RbdSource::diff`]); librbd keeps
/// `rbd_concurrent_management_ops` (10) object requests in flight for each.
const DIFF_THREADS: usize = 4;
/// Objects per exact diff call, at most: a long run of changed objects is
/// split so that the threads share it.
const DIFF_PIECE_OBJECTS: u64 = 16;

/// `cb` of [`Image::diff_iterate`] over `[off, off + len)`, collected.
fn diff_range(image: &Image, base: &str, off: u64, len: u64, whole_object: bool) -> Result<Vec<Extent>> {
    let mut extents = Vec::new();
    image.diff_iterate(Some(base), off, len, whole_object, |off, len, exists| {
        extents.push(if exists { Extent::changed(off, len) } else { Extent::gone(off, len) });
        true
    })?;
    Ok(extents)
}

/// The ranges to diff exactly: the whole-object extents `objects` (sorted,
/// as librbd reports them), adjacent ones joined, cut at most `max` long.
fn diff_pieces(objects: &[Extent], max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in objects {
        match runs.last_mut() {
            Some((off, len)) if *off + *len == e.off => *len += e.len,
            _ => runs.push((e.off, e.len)),
        }
    }
    let mut pieces = Vec::with_capacity(runs.len());
    for (mut off, mut len) in runs {
        while len > max {
            pieces.push((off, max));
            off += max;
            len -= max;
        }
        if len > 0 {
            pieces.push((off, len));
        }
    }
    pieces
}

/// Reads a random sample of the blocks the plan inherits (`count` of them,
/// or [`sample_count`]'s) and checks them against the parent's block map.
/// Returns the first mismatching block.
fn sample_check(store: &Store, at: &Image, parent: &Parent, plan: &Plan, count: Option<usize>) -> Result<Option<usize>> {
    let mut inherited: Vec<usize> = plan
        .actions
        .iter()
        .enumerate()
        .filter_map(|(b, a)| (*a == BlockAction::Inherit).then_some(b))
        .collect();
    let want = count.unwrap_or_else(|| sample_count(inherited.len())).min(inherited.len());
    inherited.shuffle(&mut rand::thread_rng());
    let samples = &inherited[..want];
    let ids = read_samples(at, store.hasher(), samples, plan.map.image_size(), u64::from(plan.map.block_size()))?;
    Ok(first_mismatch(&ids, parent, plan))
}

/// Threads of [`read_samples`].
const SAMPLE_THREADS: usize = 8;

/// How many inherited blocks the trust check samples out of `inherited`.
fn sample_count(inherited: usize) -> usize {
    (inherited * SAMPLE_PER_MILLE / 1000).clamp(MIN_SAMPLES, MAX_SAMPLES).min(inherited)
}

/// The objects of a whole-object diff's extents, sorted.
fn objects_of(extents: &[Extent]) -> Vec<(u64, u64)> {
    extents.iter().map(|e| (e.off, e.off + e.len)).collect()
}

/// The trust check's samples, taken while the exact diff runs: random
/// blocks lying wholly in objects the whole-object diff (`changed`, sorted
/// `[start, end)` ranges) does not report, which the plan inherits unless
/// the parent lacks them, read from the snapshot on [`SAMPLE_THREADS`]
/// threads and hashed. It checks the object maps, the part of the diff that
/// is known to go wrong.
fn early_samples(
    at: &Image,
    hasher: &ChunkHasher,
    (size, block_size): (u64, u32),
    changed: &[(u64, u64)],
    parent: &Parent,
) -> Result<Vec<(usize, Option<ChunkId>)>> {
    let bs = u64::from(block_size.max(1));
    let runs = untouched_blocks(size, bs, changed, parent.map.len());
    let total: usize = runs.iter().map(|r| r.1).sum();
    let want = sample_count(total);
    // the n-th untouched block, through the runs' running sums
    let mut ends = Vec::with_capacity(runs.len());
    let mut sum = 0;
    for r in &runs {
        sum += r.1;
        ends.push(sum);
    }
    let mut picked: Vec<usize> = rand::seq::index::sample(&mut rand::thread_rng(), total, want)
        .into_iter()
        .map(|n| {
            let i = ends.partition_point(|&e| e <= n);
            runs[i].0 + (n - (ends[i] - runs[i].1))
        })
        .collect();
    picked.sort_unstable();
    read_samples(at, hasher, &picked, size, bs)
}

/// Reads `blocks` (of `bs` bytes, the last one cut at `size`) from the
/// snapshot on [`SAMPLE_THREADS`] threads (each read is a round trip to an
/// OSD) and hashes them: `(block, id)`, `None` for a zero block.
fn read_samples(at: &Image, hasher: &ChunkHasher, blocks: &[usize], size: u64, bs: u64) -> Result<Vec<(usize, Option<ChunkId>)>> {
    if blocks.is_empty() {
        return Ok(Vec::new());
    }
    let per = blocks.len().div_ceil(SAMPLE_THREADS);
    std::thread::scope(|s| {
        let parts: Vec<_> = blocks
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<Vec<(usize, Option<ChunkId>)>> {
                    let mut buf = Vec::new();
                    let mut out = Vec::with_capacity(part.len());
                    for &b in part {
                        let off = b as u64 * bs;
                        buf.resize((bs.min(size - off)) as usize, 0);
                        at.read_at(off, &mut buf).with_context(|| format!("reading sample block {b}"))?;
                        out.push((b, (!blockvault_store::chunk::is_zero(&buf)).then(|| hasher.id(&buf))));
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(blocks.len());
        for p in parts {
            all.extend(p.join().map_err(|_| anyhow::anyhow!("a sample thread panicked"))??);
        }
        Ok(all)
    })
}

/// The blocks of `bs` bytes lying wholly outside the sorted `[start, end)`
/// ranges `changed` of an image of `size` bytes, below block `limit`: runs
/// of `(first block, count)`.
fn untouched_blocks(size: u64, bs: u64, changed: &[(u64, u64)], limit: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let blocks = (size.div_ceil(bs) as usize).min(limit);
    let mut push = |from: u64, to: u64| {
        // blocks whose every byte lies in [from, to)
        let first = from.div_ceil(bs) as usize;
        let end = if to >= size { blocks } else { ((to / bs) as usize).min(blocks) };
        if first < end {
            runs.push((first, end - first));
        }
    };
    let mut at = 0;
    for &(s, e) in changed {
        if s > at {
            push(at, s);
        }
        at = at.max(e);
    }
    if at < size {
        push(at, size);
    }
    runs
}

/// The first sample the plan inherits whose id is not the parent's.
fn first_mismatch(samples: &[(usize, Option<ChunkId>)], parent: &Parent, plan: &Plan) -> Option<usize> {
    let checked = samples.iter().filter(|(b, _)| plan.actions.get(*b) == Some(&BlockAction::Inherit));
    let mut n = 0;
    let bad = checked.inspect(|_| n += 1).find(|(b, id)| *id != parent.map.get(*b)).map(|(b, _)| *b);
    tracing::debug!(samples = samples.len(), checked = n, "trust check: samples compared with the parent");
    bad
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
fn cleanup_snapshots(catalog: &Catalog, head: &Image, image_id: i64) -> Result<()> {
    let on_cluster: Vec<String> = head.snaps()?.into_iter().map(|s| s.name).collect();
    let rows = catalog.snapshots(image_id)?;
    for s in &rows {
        if s.state == SnapshotState::Removed {
            continue;
        }
        let committed = match s.backup_id {
            Some(b) => catalog.backup(b)?.is_some_and(|r| r.state == BackupState::Committed),
            None => false,
        };
        let exists = on_cluster.contains(&s.name);
        if !committed {
            if exists {
                warn!(snapshot = %s.name, backup = s.backup_id.map(|b| b.0), "removing the snapshot of an interrupted or failed backup");
                remove_snap_if_present(head, &s.name)?;
            }
            catalog.set_snapshot_state(s.id, SnapshotState::Removed)?;
        } else if !exists {
            warn!(snapshot = %s.name, "snapshot was deleted outside blockvault; the next incremental needs a full read");
            catalog.set_snapshot_state(s.id, SnapshotState::Removed)?;
        } else if s.state == SnapshotState::Intent {
            catalog.set_snapshot_state(s.id, SnapshotState::Present)?;
        }
    }
    // adopt snapshots of committed backups the catalog has no row for
    for b in catalog.backups_in_state(image_id, BackupState::Committed)? {
        if let Some(snap) = &b.snapshot {
            if on_cluster.contains(snap) && !rows.iter().any(|r| &r.name == snap) {
                info!(snapshot = %snap, backup = b.id.0, "adopting a blockvault snapshot the catalog did not know");
                let row = catalog.snapshot_intent(image_id, snap, b.id)?;
                catalog.set_snapshot_state(row, SnapshotState::Present)?;
            }
        }
    }
    Ok(())
}

/// Keeps the newest `keep` present snapshots of committed backups and
/// deletes the older ones from the cluster (their backups live on in the
/// store).
fn demote(catalog: &Catalog, head: &Image, image_id: i64, keep: u32) -> Result<()> {
    let mut present: Vec<_> = catalog
        .snapshots(image_id)?
        .into_iter()
        .filter(|s| s.state == SnapshotState::Present && s.name.starts_with(SNAP_PREFIX))
        .collect();
    present.sort_by_key(|s| std::cmp::Reverse(s.backup_id.map(|b| b.0).unwrap_or(0)));
    for s in present.iter().skip(keep as usize) {
        remove_snap_if_present(head, &s.name).with_context(|| format!("removing snapshot {}", s.name))?;
        catalog.set_snapshot_state(s.id, SnapshotState::Removed)?;
        info!(snapshot = %s.name, backup = s.backup_id.map(|b| b.0), "demoted: snapshot removed, backup lives on in the store");
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
            c.source = config::Source::Rbd { pool: pool.into(), namespace: ns.map(Into::into), image: n, snap: None };
            out.push(c);
        }
    }
    Ok(out)
}

/// A connection for reopening the snapshots committed backups were read
/// from (`verify --source`), behind [`super::Origins`].
pub(crate) struct SnapshotOpener {
    cluster: Arc<Cluster>,
}

impl SnapshotOpener {
    /// Connects to the configured cluster.
    ///
    /// # Errors
    /// As [`connect`].
    pub(crate) fn connect(cfg: &Config) -> Result<SnapshotOpener> {
        Ok(SnapshotOpener { cluster: connect(cfg)? })
    }

    /// Opens snapshot `snap` of `rbd:POOL[/NS]/IMAGE` read-only.
    ///
    /// # Errors
    /// The snapshot no longer exists (said so), or a cluster error.
    pub(crate) fn open(&self, (pool, ns, image): (&str, Option<&str>, &str), snap: &str) -> Result<SnapshotImage> {
        let ioctx = self.cluster.ioctx(pool, ns)?;
        // Looked up through the image's head first: opening a snapshot that
        // is gone makes librbd print "failed to find snapshot" on stderr,
        // once per demoted backup (issue 14 item 7).
        let head = match ioctx.open(image, None) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => anyhow::bail!("image {image} no longer exists"),
            Err(e) => return Err(e.into()),
        };
        if !head.snaps()?.iter().any(|s| s.name == snap) {
            anyhow::bail!("snapshot {snap} no longer exists");
        }
        drop(head);
        let img = match ioctx.open(image, Some(snap)) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => anyhow::bail!("snapshot {snap} no longer exists"),
            Err(e) => return Err(e.into()),
        };
        let size = img.size()?;
        Ok(SnapshotImage { image: img, size })
    }
}

/// One snapshot opened read-only, for comparing a backup with it.
pub(crate) struct SnapshotImage {
    image: Image,
    size: u64,
}

impl ImageSource for SnapshotImage {
    fn describe(&self) -> String {
        format!("rbd:{}", self.image.spec())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(offset, buf).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 4 << 20;

    #[test]
    fn untouched_blocks_lie_wholly_outside_the_changed_objects() {
        const K: u64 = 64 << 10;
        // 16 MiB: objects 1 and 3 changed
        let changed = [(M, 2 * M), (3 * M, 4 * M)];
        assert_eq!(untouched_blocks(4 * M, K, &changed, usize::MAX), vec![(0, 64), (128, 64)]);
        // nothing changed; the parent's map is shorter (the image grew)
        assert_eq!(untouched_blocks(4 * M, K, &[], 100), vec![(0, 100)]);
        // everything changed
        assert_eq!(untouched_blocks(2 * M, K, &[(0, M), (M, 2 * M)], usize::MAX), vec![]);
        // a partial last block counts when nothing past it changed
        assert_eq!(untouched_blocks(M + 100, K, &[(0, M)], usize::MAX), vec![(64, 1)]);
        // a block straddling a changed range's edge is not untouched
        assert_eq!(untouched_blocks(M, K, &[(K + 1, 2 * K)], usize::MAX), vec![(0, 1), (2, 62)]);
    }

    #[test]
    fn diff_pieces_join_adjacent_objects_and_cut_long_runs() {
        let objects = [
            Extent::changed(0, M),
            Extent::gone(M, M),
            Extent::changed(2 * M, M),
            Extent::changed(10 * M, M),
            Extent::changed(20 * M, 5 * M),
            // the image's last object, shorter than an object
            Extent::changed(30 * M, 4096),
        ];
        assert_eq!(
            diff_pieces(&objects, 2 * M),
            vec![(0, 2 * M), (2 * M, M), (10 * M, M), (20 * M, 2 * M), (22 * M, 2 * M), (24 * M, M), (30 * M, 4096)]
        );
        assert_eq!(diff_pieces(&[], 2 * M), Vec::<(u64, u64)>::new());
        // every byte of every object is in exactly one piece, in order
        let pieces = diff_pieces(&objects, 3 * M);
        let covered: u64 = pieces.iter().map(|p| p.1).sum();
        assert_eq!(covered, objects.iter().map(|e| e.len).sum::<u64>());
        assert!(pieces.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }
}
