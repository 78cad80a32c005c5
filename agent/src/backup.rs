//! One backup of one image: plan, pipeline, commit.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use blockvault_catalog::{now_rfc3339, BackupState};
use blockvault_store::{format::MANIFEST_VERSION, BackupId, BlockMap, ChunkId, Manifest, Store};
use tracing::{debug, info, info_span, warn};

use crate::config::{ImageConfig, Source};
use crate::context::Ctx;
use crate::pipeline::{self, PipelineOptions, Progress};
use crate::source::file::FileSource;
use crate::source::{BlockAction, ImageSource};

/// A committed parent backup, with its verified block map.
pub struct Parent {
    pub manifest: Manifest,
    pub map: BlockMap,
}

/// The work a source hands the generic commit path.
pub struct Prepared<'a> {
    pub source: Box<dyn ImageSource + 'a>,
    pub actions: Vec<BlockAction>,
    /// The new block map, inherited entries already filled in.
    pub map: BlockMap,
    pub full_read: bool,
    pub snapshot: Option<String>,
    pub rbd: Option<blockvault_store::RbdInfo>,
}

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
pub fn load_parent(ctx: &Ctx, image_id: i64) -> Result<Option<Parent>> {
    // Each round either returns or marks one more backup invalid, which
    // `latest_valid_backup` then skips: the loop ends.
    loop {
        let Some(row) = ctx.catalog.latest_valid_backup(image_id)? else {
            debug!(image_id, "no valid committed backup: no parent, every block is read");
            return Ok(None);
        };
        let loaded = ctx.store.read_manifest(row.id).and_then(|m| ctx.store.read_blockmap(&m).map(|map| (m, map)));
        let (manifest, map) = match loaded {
            Ok(l) => l,
            Err(e) => {
                warn!(backup = row.id.0, error = %crate::logging::Chain(&e), "parent backup does not read back from the store; not using it as a base");
                return Ok(None);
            }
        };
        let missing = missing_chunks(&ctx.store, &map, ctx.cfg.workers())
            .with_context(|| format!("checking the chunks of parent backup {} of image '{}'", row.id, row.image))?;
        if missing.is_empty() {
            debug!(parent = row.id.0, blocks = map.len(), verify_state = row.verify_state.as_str(), "parent chosen: the newest valid committed backup");
            return Ok(Some(Parent { manifest, map }));
        }
        warn!(
            backup = row.id.0,
            image = %row.image,
            missing_chunks = missing.len(),
            first_missing = %missing[0],
            "parent backup references chunks missing from the store: marking it invalid and not using it as a base \
             (this backup rewrites the chunks whose data it reads; run `blockvault verify --deep`)"
        );
        // in the store first (a rebuilt catalog keeps it), then the catalog
        let mark = blockvault_store::VerifyMark {
            state: blockvault_store::VerifyResult::Invalid,
            at: now_rfc3339(),
            reason: Some(format!("references {} chunks missing from the store, e.g. {}", missing.len(), missing[0])),
        };
        ctx.store.set_verify_mark(row.id, &mark)?;
        ctx.catalog.set_verify_state(row.id, blockvault_catalog::VerifyState::Invalid)?;
    }
}

/// Distinct chunk ids of `map` that the store does not hold, checked by
/// `threads` threads (a `stat` each: cheap, but a large map of small
/// blocks has many).
fn missing_chunks(store: &Store, map: &BlockMap, threads: usize) -> blockvault_store::Result<Vec<ChunkId>> {
    let ids: Vec<ChunkId> = map.chunk_ids().copied().collect::<HashSet<_>>().into_iter().collect();
    let per = ids.len().div_ceil(threads.max(1)).max(1);
    let mut missing = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> blockvault_store::Result<Vec<ChunkId>> {
                    let mut out = Vec::new();
                    for id in part {
                        if !store.has_chunk(id)? {
                            out.push(*id);
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().expect("chunk existence check panicked")?);
        }
        Ok::<_, blockvault_store::Error>(all)
    })?;
    missing.sort();
    Ok(missing)
}

/// Backs up one configured image. Returns the committed manifest.
///
/// # Errors
/// Any failure; the backup row is then marked failed and nothing is committed.
pub fn backup_image(ctx: &mut Ctx, img: &ImageConfig, progress: &dyn Progress, cancel: &AtomicBool) -> Result<Manifest> {
    let span = info_span!("backup", image = %img.name);
    let _e = span.enter();
    // temp files of crashed writers go first, while no one else writes
    ctx.store.clean_tmp()?;
    let _store_lock = ctx.store.lock_shared()?;
    let Some(_image_lock) = ctx.store.try_lock_named(&image_lock_name(&img.name))? else {
        anyhow::bail!("another backup of image '{}' is running", img.name);
    };
    match &img.source {
        Source::File(path) => {
            let src = FileSource::open(path).with_context(|| format!("image '{}'", img.name))?;
            let block_size = img.block_size(&ctx.cfg.defaults).unwrap_or(ctx.store.meta().default_block_size);
            let image = ctx.catalog.ensure_image(&img.name, &img.source.to_string(), block_size)?;
            recover_stale(ctx, image.id)?;
            if image.block_size != block_size {
                warn!(configured = block_size, kept = image.block_size, "block size of an image is fixed at its first backup; keeping the existing one");
            }
            let parent = load_parent(ctx, image.id)?;
            let actions = src.plan(image.block_size)?;
            debug!(blocks = actions.len(), "full read: a file source has no diff, so every allocated extent is read and deduplication finds what is unchanged");
            let map = BlockMap::new_zeroed(src.size(), image.block_size);
            run_backup(ctx, img, image.id, parent.as_ref(), image.block_size, progress, cancel, move |_, _| {
                Ok(Prepared { source: Box::new(src), actions, map, full_read: true, snapshot: None, rbd: None })
            })
        }
        Source::Rbd { .. } => crate::rbd_backup::backup(ctx, img, progress, cancel),
    }
}

/// Allocates a backup id, lets `prepare` build the plan (RBD: snapshot
/// intent, snapshot, diff), runs the pipeline and commits the result: store
/// first (chunks, block map, manifest), then the catalog row.
///
/// # Errors
/// Any failure; the backup row is then marked failed.
#[allow(clippy::too_many_arguments)]
pub fn run_backup<'s>(
    ctx: &mut Ctx,
    img: &ImageConfig,
    image_id: i64,
    parent: Option<&Parent>,
    block_size: u32,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    prepare: impl FnOnce(&mut Ctx, BackupId) -> Result<Prepared<'s>>,
) -> Result<Manifest> {
    let started = Instant::now();
    let created = now_rfc3339();
    let min_id = ctx.store.list_backups()?.last().map(|b| b.0 + 1).unwrap_or(1);
    let id = ctx.catalog.begin_backup(image_id, parent.map(|p| p.manifest.id), block_size, &created, min_id)?;
    let result = (|| -> Result<Manifest> {
        let mut p = prepare(ctx, id)?;
        info!(backup = id.0, parent = ?parent.map(|p| p.manifest.id.0), source = %p.source.describe(), size = p.source.size(), "backup started");
        // every id of a parent from `load_parent` was found in the store
        let known: HashSet<_> = parent.map(|p| p.map.chunk_ids().copied().collect()).unwrap_or_default();
        let opts = PipelineOptions {
            workers: ctx.cfg.workers(),
            readers: ctx.cfg.store.readers,
            compression_level: ctx.cfg.store.compression_level,
        };
        let mut stats = pipeline::run(&ctx.store, &*p.source, &p.actions, &mut p.map, &known, &opts, progress, cancel)?;
        stats.full_read = p.full_read;
        let (patched, patched_read) = p.source.patched();
        stats.patched_blocks = patched;
        stats.read_bytes = stats.read_bytes - patched * block_size as u64 + patched_read;
        stats.duration_ms = started.elapsed().as_millis() as u64;
        let mut manifest = Manifest {
            format: MANIFEST_VERSION,
            id,
            image: img.name.clone(),
            source: img.source.to_string(),
            created: created.clone(),
            finished: now_rfc3339(),
            parent: parent.map(|p| p.manifest.id),
            image_size: p.map.image_size(),
            block_size,
            blockmap_blake3: String::new(),
            snapshot: p.snapshot.clone(),
            stats,
            rbd: p.rbd.clone(),
        };
        ctx.store
            .write_backup(&mut manifest, &p.map)
            .with_context(|| format!("writing backup {id} to store {}", ctx.store.root().display()))?;
        ctx.catalog.commit_backup(&manifest)?;
        Ok(manifest)
    })();
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
            Ok(m)
        }
        Err(e) => {
            ctx.store.discard_pending();
            if let Err(e2) = ctx.catalog.fail_backup(id, &format!("{e:#}")) {
                warn!(backup = id.0, error = %crate::logging::Chain(&e2), "could not mark backup failed in the catalog");
            }
            Err(e.context(format!("backup {id} of image '{}' failed", img.name)))
        }
    }
}
