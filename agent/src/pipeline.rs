//! The backup pipeline:
//!
//! ```text
//! plan ─▶ read ×R ─▶ zero-check + hash + compress ×N ─▶ chunk write ─▶ collector (block map)
//! ```
//!
//! Stages are threads joined by bounded channels, so memory stays bounded
//! whatever the image size: at most `buffers` plaintext blocks plus the
//! writer queue of compressed ones are in flight. Every message carries its
//! block number and the collector sets the block map by position, so stages
//! may finish in any order. The first error stops every stage and is
//! returned; nothing is committed by this module.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use blockvault_store::{chunk, BackupStats, BlockMap, ChunkId, EncodedChunk, Store};
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::source::{BlockAction, ImageSource};

/// Plaintext blocks queued between the readers and the hash workers, per
/// worker: enough to keep workers busy while a read is in flight.
const WORK_QUEUE_PER_WORKER: usize = 2;
/// Compressed chunks queued for the writer, per worker: writes are fsynced
/// one by one, so a short queue absorbs fsync latency spikes.
const WRITE_QUEUE_PER_WORKER: usize = 2;

#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub workers: usize,
    pub readers: usize,
    pub compression_level: i32,
}

/// What happened to one block.
enum Outcome {
    Zero,
    /// The store already had the chunk.
    Dedup(ChunkId),
    /// A new chunk was written.
    New { id: ChunkId, stored: u64, plain: u64 },
}

struct Work {
    block: usize,
    buf: Vec<u8>,
}

/// Receives progress: bytes of the image handled so far.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _: u64) {}
}

/// Runs the plan against `source`, filling `map` (which must already hold the
/// inherited entries) and writing new chunks to `store`.
///
/// `known` holds chunk ids known to be in the store: the parent's, after its
/// block map checksum was verified and every one of them was found in the
/// store under the store lock the caller still holds
/// ([`crate::backup::load_parent`]). Others are looked up in the store. A
/// block read whose id is in `known` is not looked up again, so an id whose
/// chunk is missing must never be in `known`: the block, data in hand, would
/// be committed referencing a chunk nobody wrote.
///
/// # Errors
/// The first read, store or cancellation error, naming the block.
pub fn run(
    store: &Store,
    source: &dyn ImageSource,
    actions: &[BlockAction],
    map: &mut BlockMap,
    known: &HashSet<ChunkId>,
    opts: &PipelineOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<BackupStats> {
    assert_eq!(actions.len(), map.len(), "plan and block map disagree");
    let mut stats = BackupStats::default();
    let to_read: Vec<usize> = actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| (*a == BlockAction::Read).then_some(i))
        .collect();
    for (i, a) in actions.iter().enumerate() {
        match a {
            BlockAction::Zero => {
                map.set(i, None);
                stats.zero_blocks += 1;
                progress.advance(map.block_range(i).1 as u64);
            }
            BlockAction::Inherit => {
                stats.inherited_blocks += 1;
                progress.advance(map.block_range(i).1 as u64);
            }
            BlockAction::Read => {}
        }
    }
    tracing::debug!(
        blocks = actions.len(),
        read = to_read.len(),
        zero = stats.zero_blocks,
        inherit = stats.inherited_blocks,
        parent_chunks = known.len(),
        "plan: blocks per action"
    );
    if to_read.is_empty() {
        return Ok(stats);
    }

    let workers = opts.workers.max(1);
    let readers = opts.readers.max(1).min(to_read.len());
    let block_size = map.block_size() as usize;
    let geometry = Geometry { image_size: map.image_size(), block_size: map.block_size() };
    let abort = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    // ids this run has claimed for writing: a block repeated inside the image
    // is written once, and no chunk file is ever written twice.
    let claimed: Mutex<HashSet<ChunkId>> = Mutex::new(HashSet::new());

    // The buffer pool bounds memory: readers take a buffer, workers return it.
    let pool_size = readers + workers * (WORK_QUEUE_PER_WORKER + 1);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(pool_size);
    for _ in 0..pool_size {
        pool_tx.send(Vec::with_capacity(block_size)).unwrap();
    }
    let (work_tx, work_rx) = bounded::<Work>(workers * WORK_QUEUE_PER_WORKER);
    let (write_tx, write_rx) = bounded::<(usize, EncodedChunk)>(workers * WRITE_QUEUE_PER_WORKER);
    let (res_tx, res_rx) = bounded::<Result<(usize, Outcome)>>(pool_size * 2);

    let mut first_err: Option<anyhow::Error> = None;
    std::thread::scope(|s| {
        // readers
        for _ in 0..readers {
            let (work_tx, res_tx, pool_rx) = (work_tx.clone(), res_tx.clone(), pool_rx.clone());
            let (to_read, next, abort, geometry) = (&to_read, &next, &abort, &geometry);
            s.spawn(move || {
                reader(source, to_read, next, abort, cancel, geometry, &pool_rx, &work_tx, &res_tx)
            });
        }
        drop(work_tx);
        // hash + compress workers
        for _ in 0..workers {
            let (work_rx, write_tx, res_tx, pool_tx) =
                (work_rx.clone(), write_tx.clone(), res_tx.clone(), pool_tx.clone());
            let (claimed, abort) = (&claimed, &abort);
            let level = opts.compression_level;
            s.spawn(move || worker(store, known, claimed, level, abort, &work_rx, &write_tx, &res_tx, &pool_tx));
        }
        drop(work_rx);
        drop(write_tx);
        drop(pool_tx);
        // writer
        {
            let res_tx = res_tx.clone();
            let abort = &abort;
            s.spawn(move || writer(store, abort, &write_rx, &res_tx));
        }
        drop(res_tx);

        // collector: drains every result so no stage blocks on a full channel
        for r in res_rx.iter() {
            match r {
                Ok((block, outcome)) => {
                    let (_, len) = map.block_range(block);
                    stats.read_blocks += 1;
                    stats.read_bytes += len as u64;
                    match outcome {
                        Outcome::Zero => {
                            map.set(block, None);
                            stats.zero_blocks += 1;
                        }
                        Outcome::Dedup(id) => {
                            map.set(block, Some(id));
                            stats.dedup_blocks += 1;
                        }
                        Outcome::New { id, stored, plain } => {
                            map.set(block, Some(id));
                            stats.new_chunks += 1;
                            stats.new_bytes += stored;
                            stats.new_plain_bytes += plain;
                        }
                    }
                    progress.advance(len as u64);
                }
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(anyhow!("backup cancelled"));
    }
    Ok(stats)
}

/// Block geometry, shared read-only with the readers.
struct Geometry {
    image_size: u64,
    block_size: u32,
}

impl Geometry {
    fn range(&self, block: usize) -> (u64, usize) {
        let off = block as u64 * self.block_size as u64;
        (off, (self.image_size - off).min(self.block_size as u64) as usize)
    }
}

#[allow(clippy::too_many_arguments)]
fn reader(
    source: &dyn ImageSource,
    to_read: &[usize],
    next: &AtomicUsize,
    abort: &AtomicBool,
    cancel: &AtomicBool,
    geometry: &Geometry,
    pool_rx: &Receiver<Vec<u8>>,
    work_tx: &Sender<Work>,
    res_tx: &Sender<Result<(usize, Outcome)>>,
) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&block) = to_read.get(i) else { return };
        // check for cancellation every block: cheap, and reads are the slow part
        if abort.load(Ordering::Relaxed) {
            return;
        }
        if cancel.load(Ordering::Relaxed) {
            let _ = res_tx.send(Err(anyhow!("backup cancelled")));
            return;
        }
        let Ok(mut buf) = pool_rx.recv() else { return };
        let (off, len) = geometry.range(block);
        buf.resize(len, 0);
        if let Err(e) = source.read_at(off, &mut buf) {
            let _ = res_tx.send(Err(anyhow::Error::new(e)
                .context(format!("reading {} at offset {off} (block {block}, {len} bytes)", source.describe()))));
            return;
        }
        if work_tx.send(Work { block, buf }).is_err() {
            return;
        }
    }
}

/// What a worker decided for one block.
enum Step {
    /// Nothing to write: report straight to the collector.
    Report(Outcome),
    /// A new chunk for the writer.
    Write(EncodedChunk),
}

#[allow(clippy::too_many_arguments)]
fn worker(
    store: &Store,
    known: &HashSet<ChunkId>,
    claimed: &Mutex<HashSet<ChunkId>>,
    level: i32,
    abort: &AtomicBool,
    work_rx: &Receiver<Work>,
    write_tx: &Sender<(usize, EncodedChunk)>,
    res_tx: &Sender<Result<(usize, Outcome)>>,
    pool_tx: &Sender<Vec<u8>>,
) {
    let mut compressor = (level != 0).then(|| zstd::bulk::Compressor::new(level).expect("valid zstd level"));
    for Work { block, buf } in work_rx.iter() {
        if abort.load(Ordering::Relaxed) {
            let _ = pool_tx.send(buf);
            continue; // keep draining so the readers never block
        }
        let r = process(store, known, claimed, level, compressor.as_mut(), block, &buf);
        let _ = pool_tx.send(buf);
        let sent = match r {
            Ok(Step::Write(enc)) => write_tx.send((block, enc)).is_ok(),
            Ok(Step::Report(o)) => res_tx.send(Ok((block, o))).is_ok(),
            Err(e) => res_tx.send(Err(e)).is_ok(),
        };
        if !sent {
            return;
        }
    }
}

fn process(
    store: &Store,
    known: &HashSet<ChunkId>,
    claimed: &Mutex<HashSet<ChunkId>>,
    level: i32,
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    block: usize,
    buf: &[u8],
) -> Result<Step> {
    if chunk::is_zero(buf) {
        return Ok(Step::Report(Outcome::Zero));
    }
    let id = ChunkId::of(buf);
    if known.contains(&id) || !claimed.lock().unwrap().insert(id) {
        return Ok(Step::Report(Outcome::Dedup(id)));
    }
    if store.has_chunk(&id).with_context(|| format!("looking up chunk {id}"))? {
        return Ok(Step::Report(Outcome::Dedup(id)));
    }
    let enc = chunk::encode(buf, id, level, compressor).with_context(|| format!("encoding block {block}"))?;
    Ok(Step::Write(enc))
}

fn writer(store: &Store, abort: &AtomicBool, write_rx: &Receiver<(usize, EncodedChunk)>, res_tx: &Sender<Result<(usize, Outcome)>>) {
    for (block, enc) in write_rx.iter() {
        if abort.load(Ordering::Relaxed) {
            continue;
        }
        let r = store
            .put_chunk(&enc)
            .with_context(|| format!("writing chunk {} (block {block}) to store {}", enc.id, store.root().display()))
            .map(|written| {
                // per chunk, so trace only (the macro checks the level first)
                tracing::trace!(block, chunk = %enc.id, bytes = enc.bytes.len(), written, "chunk write");
                if written {
                    (block, Outcome::New { id: enc.id, stored: enc.bytes.len() as u64, plain: enc.plain_len as u64 })
                } else {
                    (block, Outcome::Dedup(enc.id))
                }
            });
        if res_tx.send(r).is_err() {
            return;
        }
    }
}
