//! The backup pipeline:
//!
//! ```text
//! plan ─▶ read ×R ─▶ zero-check + hash + compress (+ seal) ×N ─▶ chunk write ─▶ collector (block map,
//!                                                                      │          index chunks)
//!                                                                      └─▶ chunk flush (early syncs)
//! ```
//!
//! The chunk writer stages new chunks in the store; once enough are staged
//! it asks the flusher to make them durable and visible while the reads go
//! on, and the collector stores each index group's chunk as soon as the
//! group's blocks are done, so the commit has only the last few left.
//!
//! In an encrypted store the hash workers also seal each new chunk
//! ([`Store::prepare_chunk`]), in place, so the CPU-heavy encryption runs
//! on all N workers and the single writer thread only writes (it used to
//! seal inside `put_chunk`, serialising the cipher with the writes).
//!
//! Stages are threads joined by bounded channels, so memory stays bounded
//! whatever the image size: at most `buffers` plaintext blocks plus the
//! writer queue of compressed ones are in flight. Every message carries its
//! block number and the collector sets the block map by position, so stages
//! may finish in any order. The first error stops every stage and is
//! returned; nothing is committed by this module.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use blockvault_store::{chunk, BackupStats, BlockMap, ChunkId, IndexAhead, ReadyChunk, Store};
use crossbeam_channel::{bounded, Sender};

use crate::plan::BlockAction;
use crate::pool::{Stop, WorkerPool};
use crate::source::{BlockRead, ImageSource};

/// Plaintext blocks queued between the readers and the hash workers, per
/// worker: enough to keep workers busy while a read is in flight.
const WORK_QUEUE_PER_WORKER: usize = 2;
/// Compressed chunks queued for the writer, per worker: a short queue
/// absorbs write latency spikes.
const WRITE_QUEUE_PER_WORKER: usize = 2;
/// Staged bytes at which the flusher makes the new chunks durable while the
/// pipeline still runs (a store that stages chunks in a local directory):
/// the sync before the commit then waits for the last few only. On the
/// test machine's disk the commit of a 40 MiB incremental waited 66 ms
/// for its syncfs and 26 ms for its renames, all after the last read.
pub(crate) const EARLY_SYNC_BYTES: u64 = 8 << 20;

#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub workers: usize,
    pub readers: usize,
    pub compression_level: i32,
}

/// What happened to one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOutcome {
    Zero,
    /// The store already had the chunk.
    Dedup(ChunkId),
    /// A new chunk was written: `stored` bytes encoded (before any
    /// sealing), of `plain` bytes of block.
    New { id: ChunkId, stored: u64, plain: u64 },
}

use BlockOutcome as Outcome;

struct Work {
    block: usize,
    buf: Buf,
    read: BlockRead,
}

/// A new chunk for the writer, sealed already in an encrypted store.
struct Write {
    block: usize,
    read: BlockRead,
    enc: ReadyChunk,
}

/// A finished block, for the collector.
struct Done {
    block: usize,
    read: BlockRead,
    outcome: Outcome,
}

/// Receives progress: bytes of the image handled so far.
pub trait Progress: Sync {
    /// The plan is ready: `total` bytes of the image will be handled
    /// (read, inherited or zero), before the first [`Progress::advance`].
    fn start(&self, _total: u64) {}
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _: u64) {}
}

/// Chunk ids found in the store, sorted and without repeats: the parent's,
/// as its chunk check left them (a sorted `Vec` costs a fraction of a
/// `HashSet` of 262,144 ids, a 16 GiB image at 64 KiB blocks, and the
/// pipeline only looks up the few blocks it reads).
#[derive(Debug, Default)]
pub struct KnownChunks(Vec<ChunkId>);

impl KnownChunks {
    /// The distinct block chunk ids of `map` (not its index chunks).
    pub fn of_map(map: &BlockMap) -> KnownChunks {
        let mut ids: Vec<ChunkId> = map.block_chunk_ids().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        KnownChunks(ids)
    }

    /// The ids, sorted and distinct.
    pub fn ids(&self) -> &[ChunkId] {
        &self.0
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.0.binary_search(id).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Runs the plan against `source`, filling `map` (which must already hold the
/// inherited entries) and writing new chunks to `store`.
///
/// `known` holds chunk ids known to be in the store: the parent's, after its
/// block map checksum was verified and every one of them was found in the
/// store under the store lock the caller still holds
/// (`load_parent` of the backup flow). Others are looked up in the store. A
/// block read whose id is in `known` is not looked up again, so an id whose
/// chunk is missing must never be in `known`: the block, data in hand, would
/// be committed referencing a chunk nobody wrote.
///
/// # Errors
/// The first read, store or cancellation error, naming the block.
///
/// The index chunks of an indexed map (blocks below 4 MiB) are stored as
/// their groups' blocks are all done, and recorded in `ahead`, so the
/// commit stores only what is left ([`Store::write_backup_ahead`]).
#[allow(clippy::too_many_arguments)]
pub fn run(
    store: &Store,
    source: &dyn ImageSource,
    actions: &[BlockAction],
    map: &mut BlockMap,
    known: &KnownChunks,
    opts: &PipelineOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    ahead: &mut IndexAhead,
) -> Result<BackupStats> {
    assert_eq!(actions.len(), map.len(), "plan and block map disagree");
    progress.start((0..map.len()).map(|i| map.block_range(i).1 as u64).sum());
    let mut stats = BackupStats::default();
    // blocks the source stored before the pipeline ran: done, if the plan
    // reads them (a block is what the source holds at its offset, whatever
    // the plan; any other is left to the store's GC)
    let geometry = Geometry { image_size: map.image_size(), block_size: map.block_size() };
    let mut stored: Vec<Option<Outcome>> = Vec::new();
    let mut claimed_ahead = HashSet::new();
    for b in source.take_stored() {
        let block = (b.offset / u64::from(map.block_size())) as usize;
        if b.offset % u64::from(map.block_size()) != 0 || actions.get(block) != Some(&BlockAction::Read) || geometry.range(block).1 != b.len {
            continue;
        }
        if stored.is_empty() {
            stored = vec![None; actions.len()];
        }
        stored[block] = Some(b.outcome);
        if let Outcome::New { id, .. } | Outcome::Dedup(id) = b.outcome {
            claimed_ahead.insert(id);
        }
    }
    let to_read: Vec<usize> = actions
        .iter()
        .enumerate()
        .filter_map(|(i, a)| (*a == BlockAction::Read && stored.get(i).is_none_or(Option::is_none)).then_some(i))
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
            BlockAction::Read => {
                if let Some(&Some(outcome)) = stored.get(i) {
                    record(map, &mut stats, i, BlockRead::Whole, outcome);
                    progress.advance(map.block_range(i).1 as u64);
                }
            }
        }
    }
    tracing::debug!(
        blocks = actions.len(),
        read = to_read.len(),
        stored_ahead = stats.read_blocks,
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
    // ids this run has claimed for writing: a block repeated inside the image
    // is written once, and no chunk file is ever written twice (those
    // stored ahead are claimed already).
    let claimed: Mutex<HashSet<ChunkId>> = Mutex::new(claimed_ahead);

    // The buffer pool bounds memory: readers take a buffer, and it comes
    // back when the block is done with (or dropped by a stopping stage).
    let pool_size = readers + workers * (WORK_QUEUE_PER_WORKER + 1);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(pool_size);
    for _ in 0..pool_size {
        pool_tx.send(Vec::with_capacity(block_size)).expect("the pool holds every buffer");
    }
    let (res_tx, res_rx) = bounded::<Done>(pool_size * 2);

    // blocks still to be read, per index group
    let fanout = map.index_fanout();
    let mut unread: Vec<u32> = match fanout {
        Some(f) => {
            let mut v = vec![0; map.len().div_ceil(f as usize)];
            for &b in &to_read {
                v[b / f as usize] += 1;
            }
            v
        }
        None => Vec::new(),
    };
    // bytes written so far, for the flusher's threshold
    let written = AtomicU64::new(0);

    let stop = Stop::new(cancel);
    std::thread::scope(|s| {
        let (store, known, claimed, geometry, level) = (store, known, &claimed, &geometry, opts.compression_level);
        // flusher: syncs the staged chunks while the pipeline goes on, one
        // sync at a time; a request while one runs waits in the queue of one,
        // and the writer drops any beyond it
        let written = &written;
        let flush_at = move || early_sync_bytes(written.load(Ordering::Relaxed));
        let flusher = WorkerPool::spawn(s, &stop, "chunk flush", 1, 1, || (), move |_, (): ()| {
            if store.staged_bytes() >= flush_at() {
                store.sync_early().with_context(|| format!("making new chunks durable in store {}", store.root().display()))?;
            }
            Ok(())
        });
        // writer: chunk files go to the store's staging area, in one thread
        let writer = {
            let (res_tx, flush, written_total) = (res_tx.clone(), flusher.feed(), written);
            WorkerPool::spawn(s, &stop, "chunk writer", 1, workers * WRITE_QUEUE_PER_WORKER, || (), move |_, w: Write| {
                let Write { block, read, enc } = w;
                let was_written = store
                    .put_ready_chunk(&enc)
                    .with_context(|| format!("writing chunk {} (block {block}) to store {}", enc.id, store.root().display()))?;
                if was_written {
                    written_total.fetch_add(enc.stored_len() as u64, Ordering::Relaxed);
                    if store.staged_bytes() >= flush_at() {
                        flush.offer(());
                    }
                }
                // per chunk, so trace only (the macro checks the level first)
                tracing::trace!(block, chunk = %enc.id, bytes = enc.stored_len(), written = was_written, "chunk write");
                let outcome = if was_written {
                    // the encoded length, as before sealing: stats mean the same in both kinds of store
                    Outcome::New { id: enc.id, stored: enc.encoded_len as u64, plain: enc.plain_len as u64 }
                } else {
                    Outcome::Dedup(enc.id)
                };
                let _ = res_tx.send(Done { block, read, outcome });
                Ok(())
            })
        };
        // zero-check + hash + compress
        let hashers = {
            let (res_tx, to_writer) = (res_tx.clone(), writer.feed());
            let init = move || (level != 0).then(|| zstd::bulk::Compressor::new(level).expect("valid zstd level"));
            WorkerPool::spawn(s, &stop, "hash", workers, workers * WORK_QUEUE_PER_WORKER, init, move |compressor, w: Work| {
                let Work { block, buf, read } = w;
                let skip = |id: &ChunkId| known.contains(id) || !claimed.lock().unwrap().insert(*id);
                match process(store, level, compressor.as_mut(), &buf.data, skip).with_context(|| format!("block {block}"))? {
                    Step::Write(enc) => {
                        drop(buf);
                        let _ = to_writer.send(Write { block, read, enc });
                    }
                    Step::Report(outcome) => {
                        drop(buf);
                        let _ = res_tx.send(Done { block, read, outcome });
                    }
                }
                Ok(())
            })
        };
        // readers
        let readers = {
            let (pool_tx, pool_rx, to_hash) = (pool_tx.clone(), pool_rx.clone(), hashers.feed());
            WorkerPool::spawn(s, &stop, "read", readers, readers * 2, || (), move |_, block: usize| {
                let Ok(data) = pool_rx.recv() else { return Ok(()) };
                let mut buf = Buf { data, home: pool_tx.clone() };
                let (off, len) = geometry.range(block);
                buf.data.resize(len, 0);
                let read = source.read_block(off, &mut buf.data).map_err(|e| {
                    anyhow::Error::new(e).context(format!("reading {} at offset {off} (block {block}, {len} bytes)", source.describe()))
                })?;
                let _ = to_hash.send(Work { block, buf, read });
                Ok(())
            })
        };
        drop(res_tx);
        // feeder: the stages end in order once it has fed every block (or stopped)
        let (feed, to_read) = (readers.feed(), &to_read);
        s.spawn(move || {
            for &block in to_read {
                if feed.send(block).is_err() {
                    break;
                }
            }
            drop(feed);
            readers.finish();
            hashers.finish();
            writer.finish();
            flusher.finish();
        });

        // collector: drains every result so no stage blocks on a full
        // channel, and stores each index group's chunk once its blocks are
        // done (those with none to read first)
        let mut put_group = |map: &BlockMap, g: usize| {
            if stop.is_stopped() {
                return;
            }
            let f = fanout.expect("groups only in an indexed map");
            match store.put_index_group(map.index_group(f, g)) {
                Ok(Some(id)) => ahead.set(g, id),
                Ok(None) => {}
                Err(e) => stop.fail(anyhow::Error::new(e).context(format!("storing index chunk {g} to store {}", store.root().display()))),
            }
        };
        for g in (0..unread.len()).filter(|&g| unread[g] == 0) {
            put_group(map, g);
        }
        for Done { block, read, outcome } in res_rx.iter() {
            record(map, &mut stats, block, read, outcome);
            progress.advance(map.block_range(block).1 as u64);
            if let Some(f) = fanout {
                let g = block / f as usize;
                unread[g] -= 1;
                if unread[g] == 0 {
                    put_group(map, g);
                }
            }
        }
    });
    stop.result()?;
    Ok(stats)
}

/// Puts one finished block into the map and its cost into the stats.
fn record(map: &mut BlockMap, stats: &mut BackupStats, block: usize, read: BlockRead, outcome: Outcome) {
    let (_, len) = map.block_range(block);
    stats.read_blocks += 1;
    match read {
        BlockRead::Whole => stats.read_bytes += len as u64,
        BlockRead::Patched { source_bytes } => {
            stats.read_bytes += source_bytes;
            stats.patched_blocks += 1;
        }
    }
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
}

/// The flusher's threshold once `written` bytes of new chunks were
/// written: [`EARLY_SYNC_BYTES`], and a quarter of what was written so far
/// (a full backup of a large image syncs a few dozen times, not once per
/// 8 MiB), below the directory store's own flush point, so the writer
/// never waits for a flush.
fn early_sync_bytes(written: u64) -> u64 {
    (written / 4).clamp(EARLY_SYNC_BYTES, blockvault_store::backend::dir::FLUSH_PENDING_BYTES / 2)
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

/// A block buffer of the pool; it goes back to the pool when dropped, so a
/// stage that stops and drops its queue never starves the readers.
struct Buf {
    data: Vec<u8>,
    home: Sender<Vec<u8>>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        // never full: the pool channel holds every buffer there is
        let _ = self.home.try_send(std::mem::take(&mut self.data));
    }
}

/// What a worker decided for one block.
enum Step {
    /// Nothing to write: report straight to the collector.
    Report(Outcome),
    /// A new chunk for the writer.
    Write(ReadyChunk),
}

/// The zero check, the chunk id, then, unless `skip` (an id known or
/// claimed already) or the store has the chunk, compression at `level`.
fn process(
    store: &Store,
    level: i32,
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    buf: &[u8],
    skip: impl FnOnce(&ChunkId) -> bool,
) -> Result<Step> {
    if chunk::is_zero(buf) {
        return Ok(Step::Report(Outcome::Zero));
    }
    let id = store.chunk_id(buf);
    if skip(&id) {
        return Ok(Step::Report(Outcome::Dedup(id)));
    }
    // looked up first: some backends count a put of a chunk they have as written
    if store.has_chunk(&id).with_context(|| format!("looking up chunk {id}"))? {
        return Ok(Step::Report(Outcome::Dedup(id)));
    }
    let enc = chunk::encode(buf, id, level, compressor).context("encoding the block")?;
    // sealed here, on this worker, not in the single writer thread
    Ok(Step::Write(store.prepare_chunk(enc)))
}

/// What the pipeline does with one block it read, done by a source before
/// the pipeline runs (see [`crate::source::StoreAhead`]): the zero check,
/// the chunk id, compression at `level` (and sealing), and the write,
/// unless the store already has the chunk. The chunk is durable and
/// visible after the store's next sync, as the pipeline's are.
///
/// # Errors
/// The store's write error (the store is then poisoned, as after a failed
/// write in the pipeline).
pub fn store_block(store: &Store, level: i32, compressor: Option<&mut zstd::bulk::Compressor<'static>>, buf: &[u8]) -> Result<BlockOutcome> {
    let enc = match process(store, level, compressor, buf, |_| false)? {
        Step::Report(outcome) => return Ok(outcome),
        Step::Write(enc) => enc,
    };
    let written = store
        .put_ready_chunk(&enc)
        .with_context(|| format!("writing chunk {} to store {}", enc.id, store.root().display()))?;
    Ok(if written {
        Outcome::New { id: enc.id, stored: enc.encoded_len as u64, plain: enc.plain_len as u64 }
    } else {
        Outcome::Dedup(enc.id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_store::{BackupId, InitOptions, Manifest};

    struct Mem(Vec<u8>);

    impl ImageSource for Mem {
        fn describe(&self) -> String {
            "memory image".into()
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
    }

    /// A source that stored some blocks ahead ([`store_block`]) and counts
    /// the reads of the others.
    struct Ahead {
        data: Vec<u8>,
        stored: Mutex<Vec<crate::source::StoredBlock>>,
        reads: Mutex<Vec<u64>>,
    }

    impl ImageSource for Ahead {
        fn describe(&self) -> String {
            "memory image with blocks stored ahead".into()
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.reads.lock().unwrap().push(offset);
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn take_stored(&self) -> Vec<crate::source::StoredBlock> {
            std::mem::take(&mut *self.stored.lock().unwrap())
        }
    }

    /// Blocks stored ahead are taken as done and never read again; one the
    /// plan inherits, one of another length and one off the block grid are
    /// not used (the first keeps its inherited entry, the others are read).
    #[test]
    fn blocks_stored_ahead_are_done_and_only_where_the_plan_reads_them() {
        use crate::source::StoredBlock;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let bs = 64 * 1024usize;
        let blocks = 8;
        let mut data = vec![0u8; blocks * bs];
        for (i, b) in data.chunks_mut(bs).enumerate() {
            b.fill(i as u8 + 1);
            b[..8].copy_from_slice(&(i as u64 * 7919).to_le_bytes());
        }
        // blocks 1, 2 (inherited by the plan), 3 (stored with a wrong length) and
        // one at an offset off the grid are stored ahead
        let mut stored = Vec::new();
        for (offset, len) in [(bs as u64, bs), (2 * bs as u64, bs), (3 * bs as u64, bs - 1), (4 * bs as u64 + 512, bs)] {
            let o = offset as usize;
            let outcome = store_block(&store, 3, None, &data[o..o + len]).unwrap();
            stored.push(StoredBlock { offset, len, outcome });
        }
        assert!(matches!(stored[0].outcome, Outcome::New { .. }));
        let source = Ahead { data: data.clone(), stored: Mutex::new(stored.clone()), reads: Mutex::new(Vec::new()) };
        let mut map = BlockMap::new_zeroed(source.size(), bs as u32);
        let inherited = ChunkId([9; 32]);
        map.set(2, Some(inherited));
        let mut actions = vec![BlockAction::Read; blocks];
        actions[2] = BlockAction::Inherit;
        let opts = PipelineOptions { workers: 2, readers: 2, compression_level: 3 };
        let stats = run(&store, &source, &actions, &mut map, &KnownChunks::default(), &opts, &(), &AtomicBool::new(false), &mut IndexAhead::default()).unwrap();
        let mut reads = source.reads.lock().unwrap().clone();
        reads.sort_unstable();
        let expect: Vec<u64> = [0, 3, 4, 5, 6, 7].iter().map(|b| b * bs as u64).collect();
        assert_eq!(reads, expect, "block 1 was stored ahead: every other read block is read, and only once");
        assert_eq!(stats.read_blocks, 7);
        assert_eq!(stats.new_chunks, 7, "block 1 counts as new, written ahead");
        assert_eq!(map.get(2), Some(inherited), "an inherited block keeps its entry");
        for b in (0..blocks).filter(|&b| b != 2) {
            let id = store.chunk_id(&data[b * bs..(b + 1) * bs]);
            assert_eq!(map.get(b), Some(id), "block {b}");
        }
        store.sync().unwrap();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        store.load_chunk(&map.get(1).unwrap(), &mut scratch, &mut out).unwrap();
        assert_eq!(out, data[bs..2 * bs], "the chunk stored ahead reads back");
    }

    /// 64 KiB blocks in 3 index groups: the first all zeros, the second
    /// random, the third random and short (150 blocks). The pipeline syncs
    /// early (42 MiB of new chunks) and stores each nonzero group's index
    /// chunk as its blocks are done; the commit then stores none, and the
    /// backup reads back whole, every chunk in place.
    #[test]
    fn index_chunks_are_stored_as_their_groups_finish_and_the_commit_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions::default()).unwrap();
        let bs: u32 = 64 * 1024;
        let fanout = blockvault_store::blockmap::index_fanout(bs).unwrap() as usize;
        let blocks = 2 * fanout + 150;
        let mut data = vec![0u8; blocks * bs as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for b in data[fanout * bs as usize..].chunks_mut(8) {
            // xorshift: incompressible, no block repeats
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let source = Mem(data);
        let mut map = BlockMap::new_zeroed(source.size(), bs);
        let actions = vec![BlockAction::Read; blocks];
        let opts = PipelineOptions { workers: 2, readers: 2, compression_level: 3 };
        let mut ahead = IndexAhead::default();
        let stats = run(&store, &source, &actions, &mut map, &KnownChunks::default(), &opts, &(), &AtomicBool::new(false), &mut ahead).unwrap();
        assert_eq!((stats.zero_blocks, stats.new_chunks), (fanout as u64, (blocks - fanout) as u64));
        assert_eq!(ahead.get(0), None, "an all-zero group has no index chunk");
        for g in 1..3 {
            let id = ahead.get(g).unwrap_or_else(|| panic!("group {g} was not stored ahead"));
            assert_eq!(*id, store.chunk_id(&blockvault_store::blockmap::encode_index_chunk(map.index_group(fanout as u32, g))));
        }
        assert_eq!(ahead.len(), 2);
        assert!(store.staged_bytes() < stats.new_bytes / 2, "the flusher synced while the pipeline ran");
        let mut m = Manifest::new(BackupId(1), "m", "file:/m", bs).at("2026-01-01T00:00:00Z");
        store.write_backup_ahead(&mut m, &map, &ahead).unwrap();
        let back = store.read_blockmap(&store.read_manifest(BackupId(1)).unwrap()).unwrap();
        assert_eq!((back.len(), back.image_size()), (map.len(), map.image_size()));
        assert!((0..map.len()).all(|b| back.get(b) == map.get(b)), "the block map reads back as the pipeline filled it");
        assert_eq!(back.index_chunks().len(), 2);
        let checker = store.chunk_checker();
        for id in back.chunk_ids().chain(back.index_chunks()) {
            assert!(checker.has_chunk(id).unwrap(), "chunk {id} is missing");
        }
    }
}
