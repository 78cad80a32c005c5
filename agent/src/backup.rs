//! One backup of one image, top to bottom:
//!
//! lock → open the source → recover what a crashed run left → load the
//! parent → allocate the backup → the source freezes a point in time → the
//! source reports what changed → plan ([`crate::plan`], pure) → trust
//! checks (sampled) → pipeline → commit (store, then catalog) → the source
//! finishes (demote, or remove the snapshot of a failed run).
//!
//! Each step calls down into the next one's modules; nothing calls back.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use blockvault_catalog::{now_rfc3339, BackupState};
use blockvault_store::{BackupId, BlockMap, ChunkChecker, ChunkId, Manifest, SetRef};
use tracing::{debug, info, info_span, warn};

use crate::config::{self, ImageConfig};
use crate::context::Ctx;
use crate::error::BackupError;
use crate::parent_check::{self, Memo};
use crate::pipeline::{self, KnownChunks, PipelineOptions, Progress};
use crate::plan::{self, BlockAction, Changes, FullReason};
use crate::source::file::FileSource;
use crate::source::rbd::RbdSource;
use crate::source::{Job, Outcome, Source};

pub use crate::source::Parent;

/// File name of the per-image lock.
pub fn image_lock_name(image: &str) -> String {
    format!("image-{image}")
}

/// Rolls stale `running` rows of an image forward or back. Must be called
/// with the image lock held: then no other process is running this image,
/// so every `running` row was left by a crash.
///
/// A row whose manifest is in the store is complete (the manifest is written
/// only after every chunk and the block map are durable): it is committed.
/// Any other is marked failed; its chunks are left to GC.
///
/// # Errors
/// Catalog or store errors.
pub fn recover_stale(ctx: &mut Ctx, image_id: i64) -> Result<Vec<BackupId>> {
    let mut failed = Vec::new();
    for b in ctx.catalog.backups_in_state(image_id, BackupState::Running)? {
        if ctx.store.has_backup(b.id) {
            match ctx.store.read_manifest(b.id).and_then(|m| ctx.store.read_blockmap(&m).map(|_| m)) {
                Ok(m) => {
                    warn!(backup = b.id.0, image = %b.image, "found an interrupted backup that is complete in the store: committing it");
                    ctx.catalog.commit_backup(&m)?;
                    continue;
                }
                Err(e) => {
                    warn!(backup = b.id.0, error = %crate::logging::Chain(&e), "interrupted backup has an unreadable manifest: removing it from the store");
                    ctx.store.remove_backup(b.id)?;
                }
            }
        }
        warn!(backup = b.id.0, image = %b.image, "marking interrupted backup as failed");
        ctx.catalog.fail_backup(b.id, "interrupted: the process running it died")?;
        failed.push(b.id);
    }
    Ok(failed)
}

/// Loads the newest valid committed backup of an image as a parent; one whose
/// manifest or block map does not read back is not used (with a warning).
///
/// The parent's inherited entries are copied into the new backup unread and
/// its chunk ids are trusted as present (see [`pipeline::run`]), so a parent
/// that references a chunk missing from the store would spread the loss into
/// every later backup. Every distinct chunk id of its block map is therefore
/// checked for existence first (one `stat` each, under the shared store lock
/// the caller holds, so none can vanish afterwards); a parent with missing
/// chunks is marked invalid in the catalog, loudly, and the next valid
/// backup is tried instead (none left: a full read).
///
/// # Errors
/// Catalog errors, or a store error other than "not found" while checking.
pub fn load_parent(ctx: &Ctx, image_id: i64, held: Option<&[String]>) -> Result<Option<Parent>> {
    // Each round either returns or marks one more backup invalid, which
    // `latest_valid_backup` then skips: the loop ends.
    loop {
        let Some((row, parent)) = read_parent(ctx, image_id, held)? else { return Ok(None) };
        let step = Instant::now();
        let missing = missing_chunks(&ctx.store.chunk_checker(), &parent.map, ctx.cfg.workers())
            .with_context(|| format!("checking the chunks of parent backup {} of image '{}'", row.id, row.image))?;
        debug!(parent = row.id.0, ms = step.elapsed().as_millis() as u64, "parent's chunks checked");
        if missing.is_empty() {
            debug!(parent = row.id.0, blocks = parent.map.len(), verify_state = row.verify_state.as_str(), "parent chosen: the newest valid committed backup");
            return Ok(Some(parent));
        }
        reject_parent(ctx, &row, &missing)?;
    }
}

/// [`load_parent`] with the chunk check left running on its own threads
/// (it makes a `stat` per block: 65,536 of them for 4 GiB at 64 KiB blocks),
/// so the snapshot and the diff proceed meanwhile. The parent must not be
/// trusted until [`ParentCheck::finish`] says so.
///
/// # Errors
/// Catalog errors.
fn load_parent_checking(ctx: &Ctx, image_id: i64, held: Option<&[String]>) -> Result<Option<(Parent, ParentCheck)>> {
    let Some((row, parent)) = read_parent(ctx, image_id, held)? else { return Ok(None) };
    let (checker, threads) = (ctx.store.chunk_checker(), ctx.cfg.workers());
    let map = parent.map.clone();
    let what = format!("checking the chunks of parent backup {} of image '{}'", row.id, row.image);
    let memo_path = (!ctx.catalog_in_memory).then(|| Memo::path(&ctx.cfg.catalog_path(), image_id));
    let store_uuid = ctx.store.meta().uuid.clone();
    let memo_at = memo_path.clone();
    let handle = std::thread::Builder::new()
        .name("parent check".into())
        .spawn(move || {
            // Lowest priority (nice 19, inherited by its pool's threads): on
            // a host short of CPU the check takes what the snapshot and the
            // diff leave idle instead of delaying them (on 2 cores shared
            // with an OSD, at nice 0 it made the diff twice as slow)
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
            let step = Instant::now();
            let memo = memo_at.as_deref().and_then(|p| Memo::load_for(p, &store_uuid, image_id, row.id));
            let checked = parent_check::check(&checker, &map, threads, memo.as_deref(), memo_at.is_some()).context(what);
            if let Ok(c) = &checked {
                debug!(parent = row.id.0, ms = step.elapsed().as_millis() as u64, chunks = c.known.len(),
                    in_unchanged_shards = c.vouched, looked_up = c.known.len() - c.vouched,
                    "parent's chunks checked (while the backup went on)");
            }
            checked.map(|c| (row, c))
        })
        .context("starting the parent's chunk check")?;
    Ok(Some((parent, ParentCheck { handle, memo_path })))
}

/// The chunk check of a parent from [`load_parent_checking`], running.
pub(crate) struct ParentCheck {
    handle: std::thread::JoinHandle<Result<(blockvault_catalog::BackupRow, parent_check::Checked)>>,
    /// Where the check's memo is kept (`None`: a catalog in memory).
    memo_path: Option<std::path::PathBuf>,
}

/// A passed parent check: the parent's chunk ids, and the memo to keep
/// once the backup is committed.
struct Passed {
    known: KnownChunks,
    memo: Option<(std::path::PathBuf, Memo)>,
}

impl ParentCheck {
    /// Waits for the check. When every chunk of the parent is in the store,
    /// its chunk ids (the pipeline's `known`); otherwise the parent is
    /// marked invalid (loudly) and must not be used: `None`.
    ///
    /// # Errors
    /// Catalog errors, or a store error other than "not found" while checking.
    fn finish(self, ctx: &Ctx, id: BackupId) -> Result<Option<Passed>> {
        let (row, checked) = self.handle.join().map_err(|_| anyhow::anyhow!("the parent's chunk check panicked"))??;
        if checked.missing.is_empty() {
            debug!(parent = row.id.0, verify_state = row.verify_state.as_str(), "parent chosen: the newest valid committed backup");
            let memo = self.memo_path.map(|p| {
                let memo = Memo { store: ctx.store.meta().uuid.clone(), image_id: row.image_id, made_by: id, checked: row.id, stamps: checked.stamps };
                (p, memo)
            });
            return Ok(Some(Passed { known: checked.known, memo }));
        }
        reject_parent(ctx, &row, &checked.missing)?;
        Ok(None)
    }
}

/// The newest valid committed backup of an image and its manifest and block
/// map, read back; `None` when there is none, or when it does not read back
/// (with a warning: a full read follows).
fn read_parent(ctx: &Ctx, image_id: i64, held: Option<&[String]>) -> Result<Option<(blockvault_catalog::BackupRow, Parent)>> {
    let Some(mut row) = ctx.catalog.latest_valid_backup(image_id)? else {
        debug!(image_id, "no valid committed backup: no parent, every block is read");
        return Ok(None);
    };
    if let Some(held) = held {
        if !row.snapshot.as_ref().is_some_and(|s| held.contains(s)) {
            if let Some(older) = newest_valid_with_held_snapshot(ctx, image_id, held)? {
                info!(image = %row.image, newest = row.id.0, base = older.id.0,
                    snapshot = %older.snapshot.as_deref().unwrap_or_default(),
                    "the newest backup's snapshot is gone: an older backup whose snapshot is still held is the base");
                row = older;
            }
        }
    }
    let step = Instant::now();
    let loaded = ctx.store.read_manifest(row.id).and_then(|m| ctx.store.read_blockmap(&m).map(|map| (m, map)));
    debug!(parent = row.id.0, ms = step.elapsed().as_millis() as u64, "parent's manifest and block map read");
    match loaded {
        Ok((manifest, map)) => Ok(Some((row, Parent { manifest, map }))),
        Err(e) => {
            warn!(backup = row.id.0, error = %crate::logging::Chain(&e), "parent backup does not read back from the store; not using it as a base");
            Ok(None)
        }
    }
}

/// A parent whose chunks are not all in the store: warned about and marked
/// invalid, in the store first (a rebuilt catalog keeps the mark), then in
/// the catalog, so it is never a base.
fn reject_parent(ctx: &Ctx, row: &blockvault_catalog::BackupRow, missing: &[ChunkId]) -> Result<()> {
    warn!(
        backup = row.id.0,
        image = %row.image,
        missing_chunks = missing.len(),
        first_missing = %missing[0],
        "parent backup references chunks missing from the store: marking it invalid and not using it as a base \
         (this backup rewrites the chunks whose data it reads; run `blockvault verify --deep`)"
    );
    let reason = format!("references {} chunks missing from the store, e.g. {}", missing.len(), missing[0]);
    crate::verify::mark(ctx, row.id, blockvault_catalog::VerifyState::Invalid, Some(reason))
}

/// The newest committed backup not marked invalid whose snapshot is in
/// `held` (`keep-snapshots` above 1 keeps older bases on the cluster).
fn newest_valid_with_held_snapshot(ctx: &Ctx, image_id: i64, held: &[String]) -> Result<Option<blockvault_catalog::BackupRow>> {
    Ok(ctx
        .catalog
        .backups_in_state(image_id, BackupState::Committed)?
        .into_iter()
        .filter(|b| b.verify_state != blockvault_catalog::VerifyState::Invalid)
        .filter(|b| b.snapshot.as_ref().is_some_and(|s| held.contains(s)))
        .max_by_key(|b| b.id.0))
}

/// Distinct chunk ids of `map` that the store does not hold, each looked up.
fn missing_chunks(store: &ChunkChecker, map: &BlockMap, threads: usize) -> Result<Vec<ChunkId>> {
    Ok(parent_check::check(store, map, threads, None, false)?.missing)
}

/// Opens the source a configured image names.
///
/// # Errors
/// When it cannot be opened (missing file, cluster or image unreachable).
fn open_source(ctx: &Ctx, img: &ImageConfig) -> Result<Box<dyn Source>> {
    Ok(match &img.source {
        config::Source::File(path) => Box::new(FileSource::open(path).with_context(|| format!("image '{}'", img.name))?),
        config::Source::Rbd { .. } => Box::new(RbdSource::open(&ctx.cfg, img)?),
    })
}

/// Backs up one configured image. Returns the committed manifest.
///
/// # Errors
/// Any failure; the backup row is then marked failed and nothing is
/// committed. [`BackupError::Locked`] when another process backs up the
/// image, [`BackupError::Cancelled`] when `cancel` was set.
pub fn backup_image(ctx: &mut Ctx, img: &ImageConfig, progress: &dyn Progress, cancel: &AtomicBool) -> Result<Manifest> {
    run_backup(ctx, img, None, progress, cancel)
}

/// Backs up `img` from `source` instead of the source its config names
/// (`import-diff`: a stream laid over the image's latest backup), through
/// the same flow as [`backup_image`].
///
/// # Errors
/// As [`backup_image`].
pub fn backup_image_from(
    ctx: &mut Ctx,
    img: &ImageConfig,
    source: Box<dyn Source>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Manifest> {
    run_backup(ctx, img, Some(source), progress, cancel)
}

fn run_backup(
    ctx: &mut Ctx,
    img: &ImageConfig,
    given: Option<Box<dyn Source>>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Manifest> {
    let span = info_span!("backup", image = %img.name);
    let _e = span.enter();
    if given.is_none() {
        if let Some(m) = fixed_snapshot_done(ctx, img)? {
            return Ok(m);
        }
    }
    let mut prep = prepare(ctx, img, given)?;
    // the point in time, between the pre and the post snapshot hooks (the
    // post hook runs right after the snapshot, not after the whole backup,
    // and exactly once whenever the pre hook ran); a group runs its own
    // hooks around all its images' snapshots instead (`crate::group`)
    let hooks = img.hooks(&ctx.cfg.defaults);
    let env = crate::hook::HookEnv {
        image: img.name.clone(),
        source: img.source.to_string(),
        snapshot: prep.snapshot().unwrap_or_default(),
    };
    if let Err(e) = crate::hook::around(&hooks, env, cancel, || prep.freeze(ctx)) {
        return Err(prep.fail(ctx, e));
    }
    prep.complete(ctx, None, progress, cancel)
}

/// A fixed snapshot (`rbd:POOL/IMAGE@SNAP`) is backed up once: its
/// committed backup, when there is one.
///
/// # Errors
/// Catalog or store errors.
fn fixed_snapshot_done(ctx: &Ctx, img: &ImageConfig) -> Result<Option<Manifest>> {
    let Some(snap) = img.source.fixed_snapshot() else { return Ok(None) };
    let Some(row) = ctx.catalog.image(&img.name)? else { return Ok(None) };
    let source = img.source.to_string();
    for b in ctx.catalog.backups_in_state(row.id, BackupState::Committed)?.into_iter().rev() {
        if b.snapshot.as_deref() != Some(snap) || b.verify_state == blockvault_catalog::VerifyState::Invalid {
            continue;
        }
        let m = ctx.store.read_manifest(b.id)?;
        if m.source == source {
            info!(image = %img.name, backup = b.id.0, snapshot = snap,
                "a fixed snapshot is backed up once: backup {} already holds it, nothing to do", b.id);
            return Ok(Some(m));
        }
    }
    Ok(None)
}

/// A backup prepared up to its point in time: the store and image locks
/// held, the source open and recovered, the parent loaded, the backup id
/// allocated and its catalog row `running`. [`Prepared::freeze`] fixes the
/// point in time and [`Prepared::complete`] does the rest; a group
/// prepares every image, then freezes them all between its hooks.
pub(crate) struct Prepared {
    img: ImageConfig,
    store_lock: blockvault_store::StoreLock,
    image_lock: blockvault_store::StoreLock,
    source: Box<dyn Source>,
    job: Job,
    parent: Option<Parent>,
    /// The parent's chunk check, still running.
    parent_check: Option<ParentCheck>,
    id: BackupId,
    created: String,
    started: Instant,
    size: Option<u64>,
}

/// Locks, opens the source, recovers what crashed runs left, loads the
/// parent and allocates the backup (see [`Prepared`]).
///
/// # Errors
/// [`BackupError::Locked`] when another process backs up the image; source,
/// catalog or store errors. Nothing is left running on error.
pub(crate) fn prepare(ctx: &mut Ctx, img: &ImageConfig, given: Option<Box<dyn Source>>) -> Result<Prepared> {
    // lock: temp files of crashed writers go first, while no one else writes
    ctx.store.clean_tmp()?;
    let store_lock = ctx.store.lock_shared()?;
    let lock_name = image_lock_name(&img.name);
    let mut image_lock = ctx.store.try_lock_named(&lock_name)?;
    let mut holder = None;
    if image_lock.is_none() {
        // a shared store names the holder (host, pid): it may be another
        // host. No live holder: its lease ran out since the try; once more
        holder = ctx.store.backend().lock_holder(&lock_name).ok().flatten();
        if holder.is_none() {
            image_lock = ctx.store.try_lock_named(&lock_name)?;
        }
    }
    let Some(image_lock) = image_lock else {
        let err = anyhow::Error::from(BackupError::Locked { image: img.name.clone() });
        return Err(match holder {
            Some(who) => err.context(format!("the image lock is held by {who}")),
            None => err,
        });
    };

    // open the source: what can fail on its side fails before the catalog is touched
    let mut source = match given {
        Some(s) => s,
        None => open_source(ctx, img)?,
    };
    let configured = img.block_size(&ctx.cfg.defaults).unwrap_or(ctx.store.meta().default_block_size);
    let row = ctx.catalog.ensure_image(&img.name, &img.source.to_string(), configured)?;
    if row.block_size != configured {
        warn!(configured, kept = row.block_size, "block size of an image is fixed at its first backup; keeping the existing one");
    }
    let job = Job { image: img.name.clone(), image_id: row.id, block_size: row.block_size, image_lock: image_lock_name(&img.name) };

    // recover what a crashed run left: catalog rows, then the source's side
    recover_stale(ctx, job.image_id)?;
    source.recover(&ctx.store, &ctx.catalog, &job)?;

    // an RBD source diffs from a snapshot it still holds: with
    // keep-snapshots > 1, an older one when the newest was deleted by hand
    // (its chunk check runs on while the snapshot is made and the diff
    // computed: `to_commit` waits for it before trusting the parent)
    let held = source.held_snapshots();
    let (mut parent, parent_check) = match load_parent_checking(ctx, job.image_id, held.as_deref())? {
        Some((p, c)) => (Some(p), Some(c)),
        None => (None, None),
    };
    if parent.is_none() {
        parent = load_clone_parent_of(ctx, &mut *source)?;
    }

    // allocate the backup
    let started = Instant::now();
    let created = now_rfc3339();
    // the id comes from the store (unique across every agent sharing it);
    // above this catalog's own ids too, so an older catalog's rows never clash
    let id = ctx.store.claim_backup_id(ctx.catalog.max_backup_id()? + 1)?;
    ctx.catalog.begin_backup_as(id, job.image_id, parent.as_ref().map(|p| p.manifest.id), job.block_size, &created)?;
    Ok(Prepared { img: img.clone(), store_lock, image_lock, source, job, parent, parent_check, id, created, started, size: None })
}

/// A clone's first backup: the backup of its parent snapshot, if the store
/// holds one, is the base of what the clone did not write.
fn load_clone_parent_of(ctx: &Ctx, source: &mut dyn Source) -> Result<Option<Parent>> {
    match source.clone_parent()? {
        Some(spec) => load_clone_parent(ctx, &spec),
        None => Ok(None),
    }
}

/// The committed backup of a clone's parent snapshot (`rbd:POOL/IMAGE@SNAP`),
/// checked as [`load_parent`] checks a parent: a fixed-snapshot source of
/// that spec, or a backup of `rbd:POOL/IMAGE` read from snapshot SNAP.
fn load_clone_parent(ctx: &Ctx, spec: &str) -> Result<Option<Parent>> {
    let Some((image_spec, snap)) = spec.rsplit_once('@') else { return Ok(None) };
    let mut rows: Vec<_> = ctx
        .catalog
        .committed_backups(None)?
        .into_iter()
        .filter(|b| b.verify_state != blockvault_catalog::VerifyState::Invalid && b.snapshot.as_deref() == Some(snap))
        .collect();
    rows.sort_by_key(|b| std::cmp::Reverse(b.id.0));
    for row in rows {
        let Ok(manifest) = ctx.store.read_manifest(row.id) else { continue };
        if manifest.source != spec && manifest.source != image_spec {
            continue;
        }
        let map = match ctx.store.read_blockmap(&manifest) {
            Ok(m) => m,
            Err(e) => {
                warn!(backup = row.id.0, error = %crate::logging::Chain(&e), "backup of the clone's parent does not read back; not using it");
                continue;
            }
        };
        let missing = missing_chunks(&ctx.store.chunk_checker(), &map, ctx.cfg.workers())?;
        if !missing.is_empty() {
            warn!(backup = row.id.0, missing_chunks = missing.len(), "backup of the clone's parent references missing chunks; not using it");
            continue;
        }
        info!(parent_snapshot = %spec, base = row.id.0, image = %row.image,
            "the image is a clone of a snapshot the store holds: its first backup reads only what the clone wrote");
        return Ok(Some(Parent { manifest, map }));
    }
    Ok(None)
}

impl Prepared {
    /// The backup's id.
    pub(crate) fn id(&self) -> BackupId {
        self.id
    }

    /// The configured image.
    pub(crate) fn image(&self) -> &ImageConfig {
        &self.img
    }

    /// The snapshot this backup is of (RBD), for hooks and logs.
    pub(crate) fn snapshot(&self) -> Option<String> {
        self.source.snapshot()
    }

    /// Fixes the point in time (RBD: creates the snapshot).
    ///
    /// # Errors
    /// Source or catalog errors; then call [`Prepared::fail`].
    pub(crate) fn freeze(&mut self, ctx: &mut Ctx) -> Result<()> {
        let size = self.source.freeze(&ctx.catalog, &self.job, self.id)?;
        info!(backup = self.id.0, parent = self.parent.as_ref().map(|p| p.manifest.id.0), source = %self.source.describe(), size, "backup started");
        self.size = Some(size);
        Ok(())
    }

    /// Marks the backup failed (or cancelled) and cleans up the source side;
    /// returns `e` with the backup named.
    pub(crate) fn fail(mut self, ctx: &mut Ctx, e: anyhow::Error) -> anyhow::Error {
        let id = self.id;
        ctx.store.discard_pending();
        let marked = if BackupError::is_cancelled(&e) { ctx.catalog.cancel_backup(id) } else { ctx.catalog.fail_backup(id, &format!("{e:#}")) };
        if let Err(e2) = marked {
            warn!(backup = id.0, error = %crate::logging::Chain(&e2), "could not mark backup failed in the catalog");
        }
        if let Err(e2) = self.source.finish(&ctx.catalog, &self.job, Outcome::Failed) {
            warn!(backup = id.0, error = %format!("{e2:#}"), "could not clean up the source after the failed backup; the next run retries");
        }
        e.context(format!("backup {id} of image '{}' failed", self.img.name))
    }

    /// Everything after the point in time: changes, plan, checks, pipeline,
    /// commit (with `set` recorded in the manifest), and the source's finish.
    ///
    /// # Errors
    /// Any failure; the backup is then marked failed and nothing is committed.
    pub(crate) fn complete(mut self, ctx: &mut Ctx, set: Option<SetRef>, progress: &dyn Progress, cancel: &AtomicBool) -> Result<Manifest> {
        let Some(size) = self.size else {
            let e = anyhow::anyhow!("internal: backup completed before its point in time was fixed");
            return Err(self.fail(ctx, e));
        };
        let id = self.id;
        let held = [&self.store_lock, &self.image_lock];
        let result = to_commit(
            ctx,
            &self.img,
            &self.job,
            &mut *self.source,
            id,
            size,
            self.parent.as_ref(),
            self.parent_check.take(),
            &self.created,
            self.started,
            set,
            progress,
            cancel,
            &held,
        );
        match result {
            Ok(m) => {
                let s = &m.stats;
                info!(
                    backup = id.0,
                    read_bytes = s.read_bytes,
                    new_chunks = s.new_chunks,
                    new_bytes = s.new_bytes,
                    dedup_blocks = s.dedup_blocks,
                    zero_blocks = s.zero_blocks,
                    inherited_blocks = s.inherited_blocks,
                    patched_blocks = s.patched_blocks,
                    full_read = s.full_read,
                    duration_ms = s.duration_ms,
                    "backup committed"
                );
                if let Err(e) = self.source.finish(&ctx.catalog, &self.job, Outcome::Committed) {
                    warn!(backup = id.0, error = %format!("{e:#}"), "could not finish the source after the commit; the next run retries");
                }
                Ok(m)
            }
            Err(e) => Err(self.fail(ctx, e)),
        }
    }
}

/// The steps from the point in time to the commit point, for backup `id`.
#[allow(clippy::too_many_arguments)]
fn to_commit(
    ctx: &mut Ctx,
    img: &ImageConfig,
    job: &Job,
    source: &mut dyn Source,
    id: BackupId,
    size: u64,
    parent: Option<&crate::source::Parent>,
    parent_check: Option<ParentCheck>,
    created: &str,
    started: Instant,
    set: Option<SetRef>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    held: &[&blockvault_store::StoreLock],
) -> Result<Manifest> {

    // what changed, and the plan; -v logs how long each step took. A source
    // may store blocks meanwhile, unless the image's reads are throttled
    let unthrottled = img.throttle(&ctx.cfg.defaults).is_unlimited();
    let level = ctx.cfg.store.compression_level;
    let ahead = |store| unthrottled.then_some(crate::source::StoreAhead { store, compression_level: level });
    let step = Instant::now();
    let mut changes = source.changes(parent, ahead(&ctx.store).as_ref())?;
    debug!(
        extents = match &changes { Changes::Full { extents, .. } | Changes::Since { extents } => extents.len() },
        ms = step.elapsed().as_millis() as u64,
        "source reported its changes"
    );
    // the parent's chunk check ran meanwhile: a parent with missing chunks
    // is never the base, the next valid backup is (checked now)
    let (mut replaced, mut replacement, mut checked) = (false, None, None);
    if let Some(check) = parent_check {
        checked = check.finish(ctx, id)?;
        if checked.is_none() {
            let held = source.held_snapshots();
            replacement = match load_parent(ctx, job.image_id, held.as_deref())? {
                Some(p) => Some(p),
                None => load_clone_parent_of(ctx, source)?,
            };
            replaced = true;
        }
    }
    let parent = if replaced { replacement.as_ref() } else { parent };
    if replaced {
        changes = source.changes(parent, ahead(&ctx.store).as_ref())?;
    }
    let step = Instant::now();
    if let Changes::Full { reason, .. } = &changes {
        log_full_read(&job.image, reason);
    }
    let plan_of = |changes: &Changes| {
        plan::plan(changes, size, job.block_size, parent.map(|p| &p.map))
            .with_context(|| format!("planning backup {id} of image '{}'", job.image))
    };
    let mut plan = plan_of(&changes)?;

    // trust checks: an untrusted diff makes it a full read
    if let (false, Some(p)) = (plan.full_read, parent) {
        if let Err(e) = source.check(&ctx.store, p, &plan) {
            let Some(&BackupError::UntrustedDiff { block, parent, .. }) = BackupError::find(&e) else { return Err(e) };
            let reason = FullReason::UntrustedDiff { block, parent };
            log_full_read(&job.image, &reason);
            let extents = match source.changes(None, None)? {
                Changes::Full { extents, .. } | Changes::Since { extents } => extents,
            };
            plan = plan_of(&Changes::Full { extents, reason })?;
        }
    }
    info!(image = %job.image, snapshot = source.snapshot().as_deref(), full_read = plan.full_read, blocks = plan.actions.len(),
        read_blocks = plan.count(BlockAction::Read), "plan ready");
    debug!(ms = step.elapsed().as_millis() as u64, "plan and trust checks done");
    let step = Instant::now();

    // pipeline; every id of a parent from `load_parent` was found in the
    // store, and the background check hands its sorted ids over
    let (known, memo) = match (checked, parent) {
        (Some(passed), _) => (passed.known, passed.memo),
        (None, Some(p)) => (KnownChunks::of_map(&p.map), None),
        (None, None) => (KnownChunks::default(), None),
    };
    let opts = PipelineOptions {
        workers: ctx.cfg.workers(),
        readers: ctx.cfg.store.readers.unwrap_or_else(|| source.default_readers(job.block_size)),
        compression_level: ctx.cfg.store.compression_level,
    };
    let mut map = plan.map;
    let mut ahead = blockvault_store::IndexAhead::default();
    let limits = img.throttle(&ctx.cfg.defaults);
    let mut stats = {
        let reader = source.reader(&ctx.store)?;
        if limits.is_unlimited() {
            pipeline::run(&ctx.store, &*reader, &plan.actions, &mut map, &known, &opts, progress, cancel, &mut ahead)?
        } else {
            // one limiter for every reader thread of this backup
            let limiter = crate::throttle::Limiter::new(limits);
            let throttled = crate::throttle::Throttled::new(&*reader, &limiter, cancel);
            let stats = pipeline::run(&ctx.store, &throttled, &plan.actions, &mut map, &known, &opts, progress, cancel, &mut ahead);
            limiter.log(&job.image);
            stats?
        }
    };
    debug!(ms = step.elapsed().as_millis() as u64, readers = opts.readers, "pipeline done");
    let step = Instant::now();
    stats.full_read = plan.full_read;
    stats.duration_ms = started.elapsed().as_millis() as u64;

    // commit: store first (chunks are durable, then block map, then manifest), then the catalog row
    let mut manifest = Manifest {
        format: Manifest::version_for(set.as_ref()),
        set,
        id,
        image: img.name.clone(),
        source: source.source_name().unwrap_or_else(|| img.source.to_string()),
        created: created.to_string(),
        finished: now_rfc3339(),
        parent: parent.map(|p| p.manifest.id),
        image_size: map.image_size(),
        block_size: job.block_size,
        blockmap_blake3: String::new(),
        snapshot: source.snapshot(),
        stats,
        rbd: source.rbd_info(),
    };
    // A lease-based lock (shared store) that ran out means a GC may have
    // swept meanwhile: what this backup knows about existing chunks is
    // stale, so it must not commit.
    for l in held {
        l.ensure_held(&format!("of backup {id} of image '{}'", img.name))?;
    }
    ctx.store
        .write_backup_ahead(&mut manifest, &map, &ahead)
        .with_context(|| format!("writing backup {id} to store {}", ctx.store.root().display()))?;
    ctx.catalog.commit_backup(&manifest)?;
    debug!(ms = step.elapsed().as_millis() as u64, "committed to store and catalog");
    // the next backup's parent check skips the groups unchanged since
    if let Some((path, memo)) = memo {
        if let Err(e) = memo.save(&path) {
            debug!(memo = %path.display(), error = %e, "parent check memo not written (the next check looks every chunk up)");
        }
    }
    Ok(manifest)
}

/// Logs why a backup reads everything, as the operator needs to know.
fn log_full_read(image: &str, reason: &FullReason) {
    match reason {
        FullReason::NoChangeTracking => debug!(
            image,
            "full read: a file source has no diff, so every allocated extent is read and deduplication finds what is unchanged"
        ),
        FullReason::FirstBackup => info!(image, "first backup of this image: reading every allocated extent"),
        FullReason::ParentHasNoSnapshot { parent } => {
            warn!(image, parent = parent.0, "parent backup has no RBD snapshot: falling back to a full read")
        }
        FullReason::BaseSnapshotGone { snapshot, parent } => warn!(image, snapshot = %snapshot, parent = parent.0,
            "base snapshot is gone from the cluster: falling back to a full read of the allocated extents"),
        FullReason::BlockSizeChanged { snapshot } => {
            warn!(image, snapshot = %snapshot, "parent block size differs: falling back to a full read")
        }
        FullReason::MapInvalid => {
            warn!(image, "object map or fast-diff is flagged invalid: falling back to a full read of the allocated extents")
        }
        FullReason::UntrustedDiff { block, parent } => warn!(image, block, parent = parent.0,
            "the diff called a block unchanged whose content differs from the parent backup: falling back to a full read"),
        FullReason::WholeStream => info!(image, "the stream has no from-snapshot: it is the whole image, laid over zeros"),
    }
}
