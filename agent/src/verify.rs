//! Verifying backups.
//!
//! * Metadata (always): the manifest reads, agrees with its catalog row, and
//!   its block map reads and matches the manifest's checksum; every chunk
//!   the block map references exists.
//! * Deep (`--deep`): every referenced chunk is read once, however many
//!   blocks and backups use it, and fully decoded: header and payload
//!   checksums, decompression, length, and the blake3 of the plaintext
//!   against the chunk id. Chunks are checked in parallel.
//! * Source (`--source`): an RBD backup is compared block by block with the
//!   snapshot it was read from, while that snapshot still exists.
//!
//! Every finding is collected; nothing stops at the first. A bad chunk is
//! reported with every backup in the store that references it, not just the
//! ones asked about. Each backup with a finding of its own, or referencing a
//! bad chunk, is marked `invalid` in the store (`backups/<id>.verify`, so a
//! rebuilt catalog keeps it) and then in the catalog, so it is never the base of
//! an incremental; every other backup checked is marked `ok`, except that a
//! backup already `invalid` stays so unless the run repeats the check that
//! found its fault, which the mark records ([`Recheck`]): a plain verify
//! for a missing chunk or unreadable metadata, `--deep` for a corrupt or
//! unreadable chunk, `--deep --source` for a source mismatch (seen by
//! nothing else, so once the snapshot is gone such a backup stays
//! `invalid`). Marks without a recorded recheck (older stores) need
//! `--deep`, plus `--source` for a backup read from an RBD snapshot.
//!
//! ## Corrupt chunks are moved aside
//! A corrupt chunk left in place would be reused: the next backup that reads
//! the same data finds the chunk id present and references the bad copy. So
//! a corrupt chunk is renamed to `<id>.bad` ([`Store::quarantine_chunk`]);
//! the next backup that has the data writes a good copy, which also repairs
//! the older backups that reference it (a later verify marks them `ok`).
//!
//! This is done under the exclusive store lock, after the shared lock of the
//! check is let go: no backup is running then. Under that lock the store's
//! backups are scanned again for references to the chunk (a backup may have
//! reused it while the check ran), the chunk is checked once more, moved,
//! and every backup that references it is marked `invalid` before the lock
//! is released. A backup that starts afterwards thus neither finds the bad
//! chunk nor takes a backup that references it as its parent (whose block
//! map it would copy without looking the chunks up).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use blockvault_catalog::{BackupRow, BackupState, VerifyState};
use blockvault_store::{chunk, BackupId, BlockMap, ChunkId, Manifest, Recheck, Store, VerifyMark, VerifyResult};
use serde::Serialize;
use tracing::{info, warn};

use crate::context::Ctx;
use crate::error::{BackupError, Error};
use crate::lookup::{self, BackupRef};
use crate::pipeline::Progress;
use crate::pool;
use crate::progress::Bar;
use crate::rebuild::Unreadable;
use crate::source::{ImageSource, Origins};

/// Chunks (or source blocks) queued per verify worker.
const QUEUE_PER_WORKER: usize = 4;

/// Most block numbers a source mismatch lists.
const MAX_LISTED_BLOCKS: usize = 16;

#[derive(Clone, Copy, Debug)]
pub struct VerifyOptions<'a> {
    pub deep: bool,
    /// Without `deep`: the percentage (0 to 100) of the chunks, picked at
    /// random, that are read and decoded in full anyway (the daemon's
    /// `verify-deep-percent`). It finds corrupt chunks over several runs;
    /// it clears no mark that needs `--deep`.
    pub deep_percent: f64,
    pub source: bool,
    /// Threads that read and decode chunks (and read the source).
    pub threads: usize,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Checked between chunks and source blocks: set, verify stops with
    /// [`Error::Cancelled`] before marking anything.
    pub cancel: &'a AtomicBool,
}

/// One thing wrong. Chunk findings name every backup that references the chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// The catalog lists the backup as committed; the store has no manifest.
    ManifestMissing { backup: u64 },
    ManifestUnreadable { backup: u64, error: String },
    /// The manifest and the catalog row disagree.
    ManifestMismatch { backup: u64, reason: String },
    BlockMapUnreadable { backup: u64, error: String },
    ChunkMissing { chunk: String, backups: Vec<u64> },
    ChunkCorrupt { chunk: String, reason: String, backups: Vec<u64>, moved_to: Option<String> },
    /// Reading the chunk failed (an I/O error, perhaps transient).
    ChunkUnreadable { chunk: String, error: String, backups: Vec<u64> },
    /// The backup's data differs from the RBD snapshot it was read from.
    SourceMismatch { backup: u64, snapshot: String, blocks: u64, first_blocks: Vec<u64>, reason: String },
}

impl Finding {
    /// The backups this finding makes invalid.
    pub fn backups(&self) -> Vec<u64> {
        match self {
            Finding::ManifestMissing { backup }
            | Finding::ManifestUnreadable { backup, .. }
            | Finding::ManifestMismatch { backup, .. }
            | Finding::BlockMapUnreadable { backup, .. }
            | Finding::SourceMismatch { backup, .. } => vec![*backup],
            Finding::ChunkMissing { backups, .. }
            | Finding::ChunkCorrupt { backups, .. }
            | Finding::ChunkUnreadable { backups, .. } => backups.clone(),
        }
    }

    /// The least verify that can find the backups of this finding sound
    /// again, once what is wrong was repaired (a missing chunk rewritten by
    /// a later backup, say).
    pub fn recheck(&self) -> Recheck {
        match self {
            Finding::ManifestMissing { .. }
            | Finding::ManifestUnreadable { .. }
            | Finding::ManifestMismatch { .. }
            | Finding::BlockMapUnreadable { .. }
            | Finding::ChunkMissing { .. } => Recheck::Metadata,
            Finding::ChunkCorrupt { .. } | Finding::ChunkUnreadable { .. } => Recheck::Deep,
            Finding::SourceMismatch { .. } => Recheck::Source,
        }
    }
}

fn list(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "no backup".into();
    }
    let s: Vec<String> = ids.iter().map(u64::to_string).collect();
    format!("backup{} {}", if ids.len() == 1 { "" } else { "s" }, s.join(", "))
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::ManifestMissing { backup } => {
                write!(f, "backup {backup}: the catalog lists it but the store has no manifest")
            }
            Finding::ManifestUnreadable { backup, error } => write!(f, "backup {backup}: manifest unreadable: {error}"),
            Finding::ManifestMismatch { backup, reason } => {
                write!(f, "backup {backup}: manifest and catalog disagree: {reason}")
            }
            Finding::BlockMapUnreadable { backup, error } => write!(f, "backup {backup}: block map unreadable: {error}"),
            Finding::ChunkMissing { chunk, backups } => {
                write!(f, "chunk {chunk} is missing; referenced by {}", list(backups))
            }
            Finding::ChunkCorrupt { chunk, reason, backups, moved_to } => {
                write!(f, "chunk {chunk} is corrupt ({reason}); referenced by {}", list(backups))?;
                match moved_to {
                    Some(p) => write!(f, "; moved aside to {p}"),
                    None => Ok(()),
                }
            }
            Finding::ChunkUnreadable { chunk, error, backups } => {
                write!(f, "chunk {chunk} cannot be read ({error}); referenced by {}", list(backups))
            }
            Finding::SourceMismatch { backup, snapshot, blocks, first_blocks, reason } => {
                write!(f, "backup {backup}: differs from RBD snapshot {snapshot}: {reason}")?;
                if *blocks > 0 {
                    write!(f, " ({blocks} blocks differ, first {first_blocks:?})")?;
                }
                Ok(())
            }
        }
    }
}

/// What verify concluded about one backup it was asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckedState {
    Ok,
    Invalid,
    /// Pruned while verify ran.
    Gone,
}

impl fmt::Display for CheckedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckedState::Ok => "ok",
            CheckedState::Invalid => "invalid",
            CheckedState::Gone => "gone",
        })
    }
}

/// Outcome for one backup that was asked about.
#[derive(Clone, Debug, Serialize)]
pub struct Checked {
    pub id: u64,
    pub image: String,
    pub state: CheckedState,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub deep: bool,
    pub source: bool,
    pub backups: Vec<Checked>,
    /// Every backup marked invalid, including ones not asked about that
    /// reference a bad chunk.
    pub invalid: Vec<u64>,
    /// Distinct chunks checked.
    pub chunks: u64,
    /// Stored bytes read (deep).
    pub bytes_read: u64,
    /// Chunks read in full without `deep` (the `deep_percent` sample).
    pub deep_sampled: u64,
    /// Backups asked about that stay `invalid` from an earlier verify with
    /// nothing found now, and the verify that can clear each.
    pub stale_invalid: Vec<(u64, Recheck)>,
    pub findings: Vec<Finding>,
    /// Checks that could not be made, and why (not findings).
    pub skipped: Vec<String>,
}

impl VerifyReport {
    /// Nothing found, and no backup asked about is (still) invalid.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.backups.iter().all(|b| b.state != CheckedState::Invalid)
    }
}

/// What is wrong with one chunk.
#[derive(Clone, Debug)]
enum Problem {
    Missing,
    Corrupt(String),
    Unreadable(String),
}

/// Loads a backup's manifest and block map, checking them against the row.
fn load(store: &Store, row: &BackupRow) -> Result<(Manifest, BlockMap), Finding> {
    let backup = row.id.0;
    let m = match store.read_manifest(row.id) {
        Ok(m) => m,
        Err(blockvault_store::Error::BackupMissing { .. }) => return Err(Finding::ManifestMissing { backup }),
        Err(e) => return Err(Finding::ManifestUnreadable { backup, error: crate::logging::Chain(&e).to_string() }),
    };
    let mut diffs = Vec::new();
    if m.image != row.image {
        diffs.push(format!("image '{}' in the manifest, '{}' in the catalog", m.image, row.image));
    }
    if m.parent != row.parent {
        let show = |p: Option<BackupId>| p.map_or("none".to_string(), |p| p.0.to_string());
        diffs.push(format!("parent {} in the manifest, {} in the catalog", show(m.parent), show(row.parent)));
    }
    if m.image_size != row.image_size || m.block_size != row.block_size {
        diffs.push(format!(
            "size {}/block {} in the manifest, {}/{} in the catalog",
            m.image_size, m.block_size, row.image_size, row.block_size
        ));
    }
    if !diffs.is_empty() {
        return Err(Finding::ManifestMismatch { backup, reason: diffs.join("; ") });
    }
    match store.read_blockmap(&m) {
        Ok(map) => Ok((m, map)),
        Err(e) => Err(Finding::BlockMapUnreadable { backup, error: crate::logging::Chain(&e).to_string() }),
    }
}

/// Checks every chunk in `ids` on `threads` workers of the pool:
/// existence, or with `deep` a full decode and a length check against the
/// blocks that use it. Returns the problems and the bytes read.
///
/// # Errors
/// [`Error::Cancelled`]; a problem with a chunk is a finding, not an error.
fn check_chunks(
    store: &Store,
    ids: &[(ChunkId, u32)],
    deep: bool,
    sample: &HashSet<ChunkId>,
    threads: usize,
    cancel: &AtomicBool,
    progress: &dyn Progress,
) -> Result<(Vec<(ChunkId, Problem)>, u64)> {
    let problems = Mutex::new(Vec::new());
    let bytes = AtomicU64::new(0);
    let threads = threads.max(1);
    pool::for_each(cancel, "verify", threads, threads * QUEUE_PER_WORKER, ids, || (Vec::new(), Vec::new()), |(raw, plain), &(id, len)| {
        let p = if deep || sample.contains(&id) {
            check_one(store, &id, len, raw, plain)
        } else {
            match store.has_chunk(&id) {
                Ok(true) => None,
                Ok(false) => Some(Problem::Missing),
                Err(e) => Some(Problem::Unreadable(crate::logging::Chain(&e).to_string())),
            }
        };
        bytes.fetch_add(raw.len() as u64, Ordering::Relaxed);
        progress.advance(len as u64);
        if let Some(p) = p {
            problems.lock().unwrap_or_else(|p| p.into_inner()).push((id, p));
        }
        Ok(())
    })
    .map_err(|e| Error::cancelled_as(e, || "verify".into()))?;
    let mut problems = problems.into_inner().unwrap_or_else(|p| p.into_inner());
    problems.sort_by_key(|(id, _)| *id);
    Ok((problems, bytes.into_inner()))
}

/// Reads and fully decodes one chunk; `len` is the length blocks expect.
fn check_one(store: &Store, id: &ChunkId, len: u32, raw: &mut Vec<u8>, plain: &mut Vec<u8>) -> Option<Problem> {
    raw.clear();
    if let Err(e) = store.read_chunk_raw(id, raw) {
        return Some(match e {
            blockvault_store::Error::ChunkMissing { .. } => Problem::Missing,
            // a sealed chunk that does not authenticate
            blockvault_store::Error::CorruptChunk { reason, .. } => Problem::Corrupt(reason),
            e => Problem::Unreadable(crate::logging::Chain(&e).to_string()),
        });
    }
    match store.decode_chunk(id, raw, plain) {
        Err(blockvault_store::Error::CorruptChunk { reason, .. }) => Some(Problem::Corrupt(reason)),
        Err(e) => Some(Problem::Corrupt(format!("{e:#}"))),
        Ok(()) if plain.len() != len as usize => {
            Some(Problem::Corrupt(format!("holds {} bytes but its blocks are {len} bytes", plain.len())))
        }
        Ok(()) => None,
    }
}

/// Adds to `refs` the backups in the store that reference a chunk of `bad`,
/// reading every block map not in `scanned` (which it extends).
fn scan_referrers(
    store: &Store,
    bad: &HashSet<ChunkId>,
    scanned: &mut BTreeSet<BackupId>,
    refs: &mut HashMap<ChunkId, BTreeSet<BackupId>>,
) -> Result<()> {
    for id in store.list_backups()? {
        if !scanned.insert(id) {
            continue;
        }
        // a backup that does not read is reported on its own when asked about
        let Ok(map) = store.read_manifest(id).and_then(|m| store.read_blockmap(&m)) else { continue };
        for c in map.chunk_ids() {
            if bad.contains(c) {
                refs.entry(*c).or_default().insert(id);
            }
        }
    }
    Ok(())
}

/// Verifies the backups of `rows` (committed catalog rows) and marks them,
/// and every other backup that references a bad chunk, in the catalog.
///
/// # Errors
/// Store or catalog failures that stop verify itself (not findings), and a
/// cluster that cannot be reached for `source`.
pub fn verify(ctx: &Ctx, rows: &[BackupRow], opts: &VerifyOptions) -> Result<VerifyReport> {
    let store = &ctx.store;
    let mut report = VerifyReport {
        deep: opts.deep,
        source: opts.source,
        backups: Vec::new(),
        invalid: Vec::new(),
        chunks: 0,
        bytes_read: 0,
        deep_sampled: 0,
        stale_invalid: Vec::new(),
        findings: Vec::new(),
        skipped: Vec::new(),
    };
    let origins = if opts.source {
        Some(Origins::connect(&ctx.cfg, rows.iter().any(|r| r.snapshot.is_some())).context("--source needs the Ceph cluster")?)
    } else {
        None
    };

    let shared = store.lock_shared_for_reading()?;
    // Phase 1: manifests and block maps; the chunks they use.
    let mut own: BTreeSet<u64> = BTreeSet::new(); // backups with findings of their own
    let mut gone: BTreeSet<u64> = BTreeSet::new();
    let mut chunk_len: HashMap<ChunkId, u32> = HashMap::new();
    let mut loaded: Vec<(Manifest, BlockMap)> = Vec::new();
    for row in rows {
        match load(store, row) {
            Ok((m, map)) => {
                let mut conflict = None;
                for (b, e) in map.entries().iter().enumerate() {
                    let Some(id) = e else { continue };
                    let len = map.block_range(b).1 as u32;
                    let first = *chunk_len.entry(*id).or_insert(len);
                    if first != len && conflict.is_none() {
                        conflict = Some(format!("block {b} uses chunk {id} for {len} bytes, other blocks for {first}"));
                    }
                }
                if let Some(reason) = conflict {
                    own.insert(row.id.0);
                    report.findings.push(Finding::BlockMapUnreadable { backup: row.id.0, error: reason });
                }
                if opts.source {
                    loaded.push((m, map));
                }
            }
            Err(Finding::ManifestMissing { backup })
                if !matches!(ctx.catalog.backup(row.id)?, Some(r) if r.state == BackupState::Committed) =>
            {
                // pruned while verify ran: the catalog row goes first
                gone.insert(backup);
            }
            Err(f) => {
                own.insert(row.id.0);
                report.findings.push(f);
            }
        }
    }

    // Phase 2: the chunks, each once.
    let mut ids: Vec<(ChunkId, u32)> = chunk_len.into_iter().collect();
    ids.sort_unstable();
    report.chunks = ids.len() as u64;
    info!(backups = rows.len(), chunks = ids.len(), deep = opts.deep, "verifying");
    let total = ids.iter().map(|(_, len)| *len as u64).sum();
    let bar = Bar::new(total, if opts.deep { "verify --deep" } else { "verify" }, opts.progress);
    let sample: HashSet<ChunkId> = if opts.deep || opts.deep_percent <= 0.0 {
        HashSet::new()
    } else {
        use rand::seq::SliceRandom;
        let n = ((ids.len() as f64) * opts.deep_percent.min(100.0) / 100.0).ceil() as usize;
        ids.choose_multiple(&mut rand::thread_rng(), n).map(|(id, _)| *id).collect()
    };
    report.deep_sampled = sample.len() as u64;
    if !sample.is_empty() {
        info!(chunks = sample.len(), percent = opts.deep_percent, "reading a random share of the chunks in full");
    }
    let checked = check_chunks(store, &ids, opts.deep, &sample, opts.threads, opts.cancel, &bar);
    bar.finish();
    let (problems, bytes) = checked?;
    report.bytes_read = bytes;

    // Phase 3: the source snapshots.
    let mut source_ok: BTreeSet<u64> = BTreeSet::new();
    if let Some(origins) = &origins {
        for (m, map) in &loaded {
            if own.contains(&m.id.0) {
                continue;
            }
            let compared = origins.open(m).and_then(|origin| check_source(&*origin, store, m, map, opts.threads, opts.cancel));
            if let Err(e) = &compared {
                if BackupError::is_cancelled(e) {
                    return Err(compared.unwrap_err());
                }
            }
            match compared {
                Ok(None) => {
                    source_ok.insert(m.id.0);
                }
                Ok(Some(f)) => {
                    own.insert(m.id.0);
                    report.findings.push(f);
                }
                Err(why) => report.skipped.push(format!("backup {}: source not checked: {why:#}", m.id)),
            }
        }
    }
    for r in rows {
        if opts.source && r.snapshot.is_none() {
            report.skipped.push(format!("backup {}: source not checked: not read from an RBD snapshot", r.id));
        }
    }

    // Phase 4: every backup that references a bad chunk.
    let bad: HashSet<ChunkId> = problems.iter().map(|(id, _)| *id).collect();
    let mut scanned = BTreeSet::new();
    let mut refs: HashMap<ChunkId, BTreeSet<BackupId>> = HashMap::new();
    if !bad.is_empty() {
        scan_referrers(store, &bad, &mut scanned, &mut refs)?;
    }
    let corrupt: Vec<ChunkId> =
        problems.iter().filter(|(_, p)| matches!(p, Problem::Corrupt(_))).map(|(id, _)| *id).collect();
    let mut moved: BTreeMap<ChunkId, String> = BTreeMap::new();

    // Phase 5: mark the catalog; with corrupt chunks, move them aside first,
    // all under the exclusive lock (see the module docs).
    let _lock = if corrupt.is_empty() {
        shared
    } else if store.is_read_only() {
        // nothing can be moved aside on a read-only store: say so
        for id in &corrupt {
            report.skipped.push(format!("chunk {id}: not moved aside: the store is read-only"));
        }
        shared
    } else {
        drop(shared);
        let l = match store.try_lock_exclusive()? {
            Some(l) => l,
            None => {
                info!("waiting for running backups to finish before moving corrupt chunks aside");
                store.lock_exclusive()?
            }
        };
        scan_referrers(store, &bad, &mut scanned, &mut refs)?;
        let (mut raw, mut plain) = (Vec::new(), Vec::new());
        for id in &corrupt {
            // checked again: GC may have removed it and a backup rewritten it
            if store.load_chunk(id, &mut raw, &mut plain).is_ok() {
                continue;
            }
            if let Some(p) = store.quarantine_chunk(id)? {
                warn!(chunk = %id, moved_to = %p.display(), "corrupt chunk moved aside; the next backup with its data writes a good copy");
                moved.insert(*id, p.display().to_string());
            }
        }
        l
    };
    for (id, p) in &problems {
        let chunk = id.to_hex();
        let backups: Vec<u64> = refs.get(id).map(|s| s.iter().map(|b| b.0).collect()).unwrap_or_default();
        report.findings.push(match p {
            Problem::Missing => Finding::ChunkMissing { chunk, backups },
            Problem::Corrupt(reason) => {
                Finding::ChunkCorrupt { chunk, reason: reason.clone(), backups, moved_to: moved.get(id).cloned() }
            }
            Problem::Unreadable(error) => Finding::ChunkUnreadable { chunk, error: error.clone(), backups },
        });
    }
    let invalid: BTreeSet<u64> = report.findings.iter().flat_map(Finding::backups).collect();
    for &id in &invalid {
        let mine = || report.findings.iter().filter(|f| f.backups().contains(&id));
        let reason = mine().next().map(|f| f.to_string());
        let recheck = mine().map(Finding::recheck).max().unwrap_or(Recheck::Metadata);
        let covered = match (opts.deep, opts.source) {
            (false, _) => Recheck::Metadata,
            (true, false) => Recheck::Deep,
            (true, true) if source_ok.contains(&id) => Recheck::Source,
            (true, true) => Recheck::Deep,
        };
        mark_with(ctx, BackupId(id), VerifyState::Invalid, reason, Some(recheck), covered)?;
    }
    for r in rows {
        // An earlier `invalid` is lifted only by a run that repeats the
        // check that set it (recorded in the mark): a plain verify clears a
        // chunk that was missing, `--deep` a corrupt one, `--deep --source`
        // a source mismatch (invisible to the other checks; it never heals
        // once the snapshot is gone). Marks written before the mark said
        // which need `--deep`, plus `--source` for an RBD backup.
        let stale = r.verify_state == VerifyState::Invalid && !invalid.contains(&r.id.0) && !gone.contains(&r.id.0);
        let need = if stale {
            let recorded = store.verify_mark(r.id).ok().flatten().and_then(|m| m.recheck);
            recorded.unwrap_or(if r.snapshot.is_some() { Recheck::Source } else { Recheck::Deep })
        } else {
            Recheck::Metadata
        };
        let cleared = match need {
            Recheck::Metadata => true,
            Recheck::Deep => opts.deep,
            Recheck::Source => opts.deep && (r.snapshot.is_none() || source_ok.contains(&r.id.0)),
        };
        let state = if gone.contains(&r.id.0) {
            CheckedState::Gone
        } else if invalid.contains(&r.id.0) {
            CheckedState::Invalid
        } else if stale && !cleared {
            report.stale_invalid.push((r.id.0, need));
            report.skipped.push(format!(
                "backup {}: stays invalid from an earlier verify; run `blockvault verify {}@{} {}` to recheck it",
                r.id,
                r.image,
                r.id,
                recheck_flags(need)
            ));
            CheckedState::Invalid
        } else {
            mark(ctx, r.id, VerifyState::Ok, None)?;
            CheckedState::Ok
        };
        report.backups.push(Checked { id: r.id.0, image: r.image.clone(), state });
    }
    report.invalid = invalid.into_iter().collect();
    if ctx.catalog_in_memory {
        report.skipped.push("results not recorded: the catalog is on a read-only filesystem (built in memory)".into());
    } else if ctx.store.is_read_only() {
        report.skipped.push("results recorded in the catalog only: the store is read-only".into());
    }
    for f in &report.findings {
        warn!(finding = %f, "verify");
    }
    Ok(report)
}

/// Records a verify result: in the store first (`backups/<id>.verify`, so
/// a rebuilt catalog keeps it; rewritten only when it changes), then in the
/// catalog.
/// An `invalid` mark set this way is cleared by a plain verify that finds
/// the backup sound (see [`mark_with`]).
pub fn mark(ctx: &Ctx, id: BackupId, state: VerifyState, reason: Option<String>) -> Result<()> {
    mark_with(ctx, id, state, reason, Some(Recheck::Metadata), Recheck::Metadata)
}

/// The flags of the verify that clears a mark needing `r`.
pub fn recheck_flags(r: Recheck) -> &'static str {
    match r {
        Recheck::Metadata => "",
        Recheck::Deep => "--deep",
        Recheck::Source => "--deep --source",
    }
}

/// [`mark`], saying which verify can clear an `invalid` mark (`recheck`,
/// ignored for `ok`). `covered` is the most the run that marks has checked:
/// a backup already invalid for a reason that run could not see keeps the
/// stricter recheck (a later plain verify must not clear a source mismatch
/// because a missing chunk was marked meanwhile).
pub fn mark_with(
    ctx: &Ctx,
    id: BackupId,
    state: VerifyState,
    reason: Option<String>,
    recheck: Option<Recheck>,
    covered: Recheck,
) -> Result<()> {
    let result = match state {
        VerifyState::Invalid => VerifyResult::Invalid,
        _ => VerifyResult::Ok,
    };
    let mut recheck = recheck.filter(|_| result == VerifyResult::Invalid);
    let current = ctx.store.verify_mark(id).ok().flatten().map(|m| (m.state, m.recheck));
    if let (Some((VerifyResult::Invalid, old)), Some(new)) = (current, recheck) {
        // a mark that does not say: the strictest
        let old = old.unwrap_or(Recheck::Source);
        if old > covered {
            recheck = Some(old.max(new));
        }
    }
    // a read-only store cannot take the mark (reported once by `verify`)
    if current != Some((result, recheck)) && !ctx.store.is_read_only() {
        let m = VerifyMark { state: result, at: blockvault_catalog::now_rfc3339(), reason, recheck };
        ctx.store.set_verify_mark(id, &m).with_context(|| format!("recording the verify result of backup {id} in the store"))?;
    }
    ctx.catalog.set_verify_state(id, state)?;
    Ok(())
}

/// Compares a backup with the version of the image it was read from
/// (`origin`, from [`Origins::open`]), block by block on `threads` workers.
/// `Err` means the comparison could not be made (a read of the origin
/// failed) or was cancelled, `Ok(Some)` that it was made and the two differ.
fn check_source(
    origin: &dyn ImageSource,
    store: &Store,
    m: &Manifest,
    map: &BlockMap,
    threads: usize,
    cancel: &AtomicBool,
) -> Result<Option<Finding>> {
    let snap = m.snapshot.clone().unwrap_or_default();
    let mismatch = |blocks: u64, first_blocks: Vec<u64>, reason: String| {
        Some(Finding::SourceMismatch { backup: m.id.0, snapshot: snap.clone(), blocks, first_blocks, reason })
    };
    let size = origin.size();
    if size != m.image_size {
        return Ok(mismatch(0, Vec::new(), format!("the snapshot has {size} bytes, the backup {}", m.image_size)));
    }
    let differ = Mutex::new(BTreeSet::new());
    let threads = threads.max(1);
    let init = || (Vec::new(), Vec::new(), Vec::new());
    pool::for_each(cancel, "verify source", threads, threads * QUEUE_PER_WORKER, 0..map.len(), init, |(src, raw, plain), b| {
        let (off, len) = map.block_range(b);
        src.resize(len, 0);
        origin.read_at(off, src).with_context(|| format!("reading block {b} of {}", origin.describe()))?;
        let same = match map.get(b) {
            None => chunk::is_zero(src),
            // a chunk that does not load differs (and is reported as a chunk finding)
            Some(id) => store.load_chunk(&id, raw, plain).is_ok() && plain == src,
        };
        if !same {
            differ.lock().unwrap_or_else(|p| p.into_inner()).insert(b as u64);
        }
        Ok(())
    })
    .map_err(|e| Error::cancelled_as(e, || "verify".into()))?;
    let differ = differ.into_inner().unwrap_or_else(|p| p.into_inner());
    if differ.is_empty() {
        return Ok(None);
    }
    let first: Vec<u64> = differ.iter().take(MAX_LISTED_BLOCKS).copied().collect();
    Ok(mismatch(differ.len() as u64, first, "block contents differ".into()))
}

/// `verify [SPEC]` as a whole: reconciles the catalog with the store,
/// selects the backups `spec` names ([`lookup::committed_backups`]; every
/// committed backup without one) and verifies them ([`verify`]). Without a
/// spec, backups the store holds that do not read (so no catalog row names
/// them) are findings too.
///
/// # Errors
/// The typed lookup errors; as [`verify`].
pub fn run(ctx: &Ctx, spec: Option<&BackupRef>, opts: &VerifyOptions) -> Result<VerifyReport> {
    let rec = crate::rebuild::reconcile(&ctx.store, &ctx.catalog).unwrap_or_else(|e| {
        warn!(error = %format!("{e:#}"), "could not reconcile the catalog with the store; verifying the catalog's backups");
        Default::default()
    });
    let rows = lookup::committed_backups(ctx, spec)?;
    let mut report = verify(ctx, &rows, opts)?;
    if spec.is_none() {
        // backups the store holds but that do not read, so no catalog row
        // names them: findings too (`forget @ID` removes one)
        for (id, why) in rec.unreadable {
            report.findings.push(match why {
                Unreadable::Manifest(error) => Finding::ManifestUnreadable { backup: id.0, error },
                Unreadable::BlockMap(error) => Finding::BlockMapUnreadable { backup: id.0, error },
            });
            report.invalid.push(id.0);
        }
    }
    Ok(report)
}
