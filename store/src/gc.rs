//! Garbage collection: removing the chunks that no backup references.
//!
//! GC is plan, then apply. The caller builds the live set, the chunks that
//! backups reference, from the store's manifests ([`LiveSet::from_store`]);
//! [`plan`] lists the chunks and picks the garbage; [`apply`] removes it
//! under the exclusive store lock. The store never reads the catalog: a
//! backup is live when its manifest is in `backups/`, whatever the catalog
//! says, so a backup that is durable in the store a moment before its
//! catalog row is committed is live too.
//!
//! ## Steps
//! [`plan`], without a lock (backups, prunes and restores keep running):
//! 1. the live set: every chunk id in the block map of every backup whose
//!    manifest is in the store, and the ids of those backups;
//! 2. every chunk in `chunks/`, with its size and mtime. A chunk outside
//!    the live set is *garbage* when its mtime is older than the start of
//!    the GC minus the grace period, else *recent* (kept).
//!
//! [`apply`], holding the store lock **exclusive**:
//! 3. waits for the lock, so every backup, prune, restore and verify that
//!    holds it shared has finished, and none starts until step 6 is done;
//! 4. lists the manifests again and adds the block map of every backup that
//!    step 1 did not read (committed while the plan ran) to the live set;
//! 5. removes every garbage chunk that is still outside the live set and
//!    whose mtime is still older than the cutoff (a chunk touched since the
//!    plan with [`Store::touch_chunk`] is kept);
//! 6. removes temp files, and block maps and protection markers that have
//!    no manifest: with the lock exclusive, their writers are dead.
//!
//! A backup whose manifest or block map does not read stops the GC
//! ([`Error::BackupUnreadable`]) before anything is removed: its references
//! are unknown, and guessing could delete chunks it needs.
//!
//! ## Why a chunk that a backup references is never removed
//! A backup gets the chunk ids of its block map in three ways: it writes
//! the chunk ([`Store::put_chunk`]), it finds the chunk present
//! ([`Store::has_chunk`]), or it takes the id unchecked from its parent's
//! block map (inherited blocks, and the parent's ids that it does not look
//! up again). It does all three while holding the store lock shared, from
//! before it reads its parent until its manifest is written. Step 5 runs
//! with the lock exclusive, so no backup is between those two points then,
//! and every backup is in one of two cases:
//! * it finished before step 3. If it wrote a manifest, that manifest is in
//!   the store at step 4 (only a prune removes manifests, and then the
//!   backup is no longer live), so its block map was read at step 1 or at
//!   step 4, and none of its chunks is removed. If it wrote none, it
//!   references nothing.
//! * it starts after step 6. It writes its own new chunks after the sweep;
//!   `has_chunk` only finds chunks that survived it; and its parent is a
//!   backup whose manifest is in the store after the sweep, so was there at
//!   step 4 (nobody writes a manifest while GC holds the lock), so its
//!   parent's chunks are in the live set and survived.
//!
//! Step 4 is what makes this hold against prune. Proxmox Backup Server lost
//! referenced chunks in 2025 to this interleaving: its GC listed the index
//! files once; a prune removed a snapshot before the GC read it; a backup
//! that had already taken that snapshot's chunks as its base wrote its
//! index after the listing. The reused chunks were marked by neither index
//! and were swept. Here that backup holds the shared lock until its manifest
//! is written, so the sweep waits for it, and step 4 reads its block map.
//! Step 4 compares against the backups step 1 actually *read*, not against
//! the ids it listed, so a manifest that vanished or appeared in between
//! is covered either way.
//!
//! Nothing above depends on the grace period or on mtimes. The grace period
//! keeps the new chunks of an interrupted backup for its retry to reuse,
//! and is a margin for writers outside the lock protocol (an older
//! blockvault, or hosts sharing a store over a filesystem whose `flock`
//! does not reach the other host).
//!
//! ## Costs and limits
//! The exclusive lock is held for steps 4 to 6: the block maps of backups
//! committed during the plan, and one `stat` and `unlink` per garbage
//! chunk; not for a pass over the whole store. `flock` does not queue, so
//! on a store where shared holders always overlap, step 3 waits until there
//! is a gap. Two GCs at once are safe (each sweep is correct on its own);
//! the agent still runs one at a time.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::{BackupId, BlockMap, ChunkId, Store};

/// Default grace period: unreferenced chunks younger than this are kept.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Options of a GC run.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Unreferenced chunks whose mtime is younger than this are kept.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { grace: DEFAULT_GRACE }
    }
}

/// The chunks referenced by live backups, and which backups those are.
#[derive(Debug, Default)]
pub struct LiveSet {
    chunks: HashSet<ChunkId>,
    /// Backups whose block maps are in `chunks`.
    backups: BTreeSet<BackupId>,
}

impl LiveSet {
    pub fn new() -> Self {
        LiveSet::default()
    }

    /// Adds the chunks of one backup's block map.
    pub fn insert(&mut self, backup: BackupId, map: &BlockMap) {
        self.chunks.extend(map.chunk_ids().copied());
        self.backups.insert(backup);
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains(id)
    }

    /// True when the block map of `backup` is in the set.
    pub fn has_backup(&self, backup: BackupId) -> bool {
        self.backups.contains(&backup)
    }

    /// Number of backups in the set.
    pub fn backup_count(&self) -> usize {
        self.backups.len()
    }

    /// Number of distinct chunks in the set.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The live set of every backup whose manifest is in the store.
    ///
    /// # Errors
    /// `BackupUnreadable` for a backup whose manifest or block map does not
    /// read; `Io` when `backups/` cannot be listed.
    pub fn from_store(store: &Store) -> Result<LiveSet> {
        let mut live = LiveSet::new();
        live.add_unread(store)?;
        Ok(live)
    }

    /// Adds every backup in the store whose block map is not in the set yet,
    /// and returns their ids. A backup whose manifest vanishes while this
    /// runs (a prune) is skipped.
    ///
    /// # Errors
    /// As [`LiveSet::from_store`].
    pub fn add_unread(&mut self, store: &Store) -> Result<Vec<BackupId>> {
        let mut added = Vec::new();
        for id in store.list_backups()? {
            if self.has_backup(id) {
                continue;
            }
            if let Some(map) = read_live_map(store, id)? {
                self.insert(id, &map);
                added.push(id);
            }
        }
        Ok(added)
    }
}

/// Reads the block map of a backup for the live set: `None` when the backup
/// was removed meanwhile, an error when it is there but does not read.
fn read_live_map(store: &Store, id: BackupId) -> Result<Option<BlockMap>> {
    let unreadable = |e: Error| Error::BackupUnreadable { id: id.0, source: Box::new(e) };
    let manifest = match store.read_manifest(id) {
        Ok(m) => m,
        Err(Error::BackupMissing { .. }) => return Ok(None),
        Err(e) => return Err(unreadable(e)),
    };
    match store.read_blockmap(&manifest) {
        Ok(map) => Ok(Some(map)),
        // a prune removes the manifest first, then the block map
        Err(Error::BackupMissing { .. }) if !store.try_has_backup(id)? => Ok(None),
        Err(e) => Err(unreadable(e)),
    }
}

/// Figures of a GC plan. Bytes are stored (compressed, framed) bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcStats {
    /// Backups whose block maps make up the live set.
    pub backups: u64,
    /// Chunks in the store when they were listed.
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks that a live backup references.
    pub live_chunks: u64,
    pub live_bytes: u64,
    /// Unreferenced chunks inside the grace period (kept).
    pub recent_chunks: u64,
    pub recent_bytes: u64,
    /// Unreferenced chunks past the grace period (removed by `apply`).
    pub garbage_chunks: u64,
    pub garbage_bytes: u64,
    /// Chunks that a live backup references but the store does not hold.
    pub missing_chunks: u64,
}

/// What [`plan`] found; [`apply`] carries it out.
#[derive(Debug)]
pub struct GcPlan {
    started: SystemTime,
    grace: Duration,
    live: LiveSet,
    garbage: Vec<(ChunkId, u64)>,
    pub stats: GcStats,
}

impl GcPlan {
    /// The unreferenced chunks past the grace period, with their sizes.
    pub fn garbage(&self) -> &[(ChunkId, u64)] {
        &self.garbage
    }

    /// Chunks older than this are past the grace period.
    fn cutoff(&self) -> SystemTime {
        self.started.checked_sub(self.grace).unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// What [`apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Backups committed while the plan ran, read under the exclusive lock.
    pub late_backups: u64,
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    /// Garbage of the plan that was kept: referenced by a late backup, or
    /// touched since the plan.
    pub rescued_chunks: u64,
    /// Block maps and protection markers without a manifest, removed.
    pub orphan_files: u64,
    /// Temp files of dead writers, removed.
    pub temp_files: u64,
}

/// Lists the chunks and picks the garbage: chunks outside `live` whose mtime
/// is older than now minus the grace period. Changes nothing and takes no
/// lock. `live` must have been built before this is called (normally with
/// [`LiveSet::from_store`]).
///
/// # Errors
/// `Io` when the chunk directories cannot be listed.
pub fn plan(store: &Store, live: LiveSet, opts: &GcOptions) -> Result<GcPlan> {
    let mut plan = GcPlan { started: SystemTime::now(), grace: opts.grace, live, garbage: Vec::new(), stats: GcStats::default() };
    let cutoff = plan.cutoff();
    let s = &mut plan.stats;
    s.backups = plan.live.backup_count() as u64;
    for (id, size, mtime) in store.list_chunks()? {
        s.chunks += 1;
        s.bytes += size;
        if plan.live.contains(&id) {
            s.live_chunks += 1;
            s.live_bytes += size;
        } else if mtime > cutoff {
            s.recent_chunks += 1;
            s.recent_bytes += size;
        } else {
            s.garbage_chunks += 1;
            s.garbage_bytes += size;
            plan.garbage.push((id, size));
        }
    }
    // every live chunk is durable before its manifest is written, so one
    // that was not listed is missing (or was moved aside by verify)
    s.missing_chunks = plan.live.chunk_count() as u64 - s.live_chunks;
    if s.missing_chunks > 0 {
        warn!(missing_chunks = s.missing_chunks, "live backups reference chunks the store does not hold; run `blockvault verify`");
    }
    info!(
        backups = s.backups,
        chunks = s.chunks,
        live_chunks = s.live_chunks,
        recent_chunks = s.recent_chunks,
        garbage_chunks = s.garbage_chunks,
        garbage_bytes = s.garbage_bytes,
        "gc planned"
    );
    Ok(plan)
}

/// Carries out a plan under the exclusive store lock (waiting for it):
/// re-reads the backups committed since the plan, removes the garbage that
/// is still unreferenced and old, then orphaned backup files and temp files.
/// See the module docs for why this never removes a referenced chunk.
///
/// # Errors
/// `BackupUnreadable` when a backup committed since the plan does not read
/// (nothing is removed then); `Io` on a failed removal (the sweep stops).
pub fn apply(store: &Store, mut plan: GcPlan) -> Result<GcReport> {
    let lock = match store.try_lock_exclusive()? {
        Some(l) => l,
        None => {
            info!("gc waiting for running backups, prunes, restores and verifies to finish");
            store.lock_exclusive()?
        }
    };
    let mut r = GcReport::default();
    // Step 4, before anything is removed: backups committed since the plan.
    let late = plan.live.add_unread(store)?;
    r.late_backups = late.len() as u64;
    if !late.is_empty() {
        info!(late_backups = %late.iter().map(|b| b.0.to_string()).collect::<Vec<_>>().join(","), "backups committed while gc planned are live too");
    }
    let cutoff = plan.cutoff();
    for (id, size) in &plan.garbage {
        if plan.live.contains(id) {
            r.rescued_chunks += 1;
            continue;
        }
        match store.chunk_modified(id)? {
            None => {} // removed by someone else (another GC)
            Some(mtime) if mtime > cutoff => r.rescued_chunks += 1,
            Some(_) => {
                // a shared store's lock is a lease: never remove after losing it
                lock.ensure_held("store (exclusive, gc sweep)")?;
                store.remove_chunk(id)?;
                r.removed_chunks += 1;
                r.removed_bytes += size;
            }
        }
    }
    r.orphan_files = remove_orphans(store)?;
    r.temp_files = store.remove_temp_files(&lock)? as u64;
    drop(lock);
    info!(
        removed_chunks = r.removed_chunks,
        removed_bytes = r.removed_bytes,
        rescued_chunks = r.rescued_chunks,
        orphan_files = r.orphan_files,
        temp_files = r.temp_files,
        "gc done"
    );
    Ok(r)
}

/// Removes `backups/<id>.blockmap`, `.protected`, `.verify` and `.labels` files whose
/// manifest is gone. Only called with the store lock exclusive: a block map
/// without a manifest is then not a commit in progress.
fn remove_orphans(store: &Store) -> Result<u64> {
    let mut n = 0;
    let names = store.list_backup_files()?;
    // Only a file whose manifest is not in the listing is a candidate, and
    // a candidate's manifest is looked up once more before anything goes:
    // one lookup per orphan, not one per block map and marker of every
    // backup (a network round trip each on a shared store).
    let listed: HashSet<&str> = names.iter().filter_map(|n| n.strip_suffix(".json")).collect();
    for name in &names {
        let Some(stem) = name
            .strip_suffix(".blockmap")
            .or_else(|| name.strip_suffix(".protected"))
            .or_else(|| name.strip_suffix(".verify"))
            .or_else(|| name.strip_suffix(".labels"))
        else {
            continue;
        };
        let Ok(id) = stem.parse::<u64>() else { continue };
        if listed.contains(stem) || store.try_has_backup(BackupId(id))? {
            continue;
        }
        warn!(file = %store.root().join("backups").join(&name).display(), "removing a backup file that has no manifest");
        if store.remove_backup_file(name)? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;
    use crate::{InitOptions, Manifest};
    use std::fs::File;

    const BS: u32 = 65536;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::init(&dir.path().join("s"), &InitOptions { default_block_size: BS }).unwrap();
        (dir, s)
    }

    /// Writes a chunk of `seed` bytes and makes it look written `age` ago.
    fn put(s: &Store, seed: u8, age: Duration) -> ChunkId {
        let data = vec![seed; BS as usize];
        let id = ChunkId::of(&data);
        s.put_chunk(&chunk::encode(&data, id, 1, None).unwrap()).unwrap();
        s.sync().unwrap(); // chunks reach chunks/ at a flush
        let f = File::options().append(true).open(s.chunk_path(&id)).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        id
    }

    fn backup(s: &Store, id: u64, chunks: &[ChunkId]) {
        let mut map = BlockMap::new_zeroed(chunks.len() as u64 * BS as u64, BS);
        for (i, c) in chunks.iter().enumerate() {
            map.set(i, Some(*c));
        }
        let mut m = Manifest::new(BackupId(id), "vm", "file:/vm", BS).at("2026-01-01T00:00:00Z");
        s.write_backup(&mut m, &map).unwrap();
    }

    const HOUR: Duration = Duration::from_secs(3600);
    fn opts() -> GcOptions {
        GcOptions { grace: HOUR }
    }

    #[test]
    fn removes_old_unreferenced_chunks_only() {
        let (_d, s) = store();
        let live = put(&s, 1, 2 * HOUR);
        let old = put(&s, 2, 2 * HOUR);
        let recent = put(&s, 3, Duration::ZERO);
        backup(&s, 1, &[live, live]);
        let plan = plan(&s, LiveSet::from_store(&s).unwrap(), &opts()).unwrap();
        assert_eq!(plan.garbage().iter().map(|g| g.0).collect::<Vec<_>>(), vec![old]);
        // live: `live` and the index chunk of backup 1's (indexed, 64 KiB blocks) map
        assert_eq!((plan.stats.live_chunks, plan.stats.recent_chunks, plan.stats.missing_chunks), (2, 1, 0));
        let r = apply(&s, plan).unwrap();
        assert_eq!((r.removed_chunks, r.rescued_chunks), (1, 0));
        assert!(s.has_chunk(&live).unwrap() && s.has_chunk(&recent).unwrap());
        assert!(!s.has_chunk(&old).unwrap());
    }

    /// The interleaving that lost chunks in Proxmox Backup Server (2025): a
    /// prune removes backup 1 before GC reads it, and backup 2, which took
    /// backup 1 as its base and reuses its chunk, commits after GC listed
    /// the manifests. Step 4 of `apply` must find backup 2.
    #[test]
    fn backup_committed_during_the_plan_keeps_its_reused_chunks() {
        let (_d, s) = store();
        let x = put(&s, 7, 2 * HOUR);
        backup(&s, 1, &[x]);
        s.remove_backup(BackupId(1)).unwrap(); // the prune
        let plan = plan(&s, LiveSet::from_store(&s).unwrap(), &opts()).unwrap();
        assert_eq!(plan.garbage().len(), 1, "x is garbage as far as the plan knows");
        backup(&s, 2, &[x]); // the backup that reused backup 1's chunk
        let r = apply(&s, plan).unwrap();
        assert_eq!((r.late_backups, r.removed_chunks, r.rescued_chunks), (1, 0, 1));
        let m = s.read_manifest(BackupId(2)).unwrap();
        let (mut raw, mut out) = (Vec::new(), Vec::new());
        for id in s.read_blockmap(&m).unwrap().chunk_ids() {
            s.load_chunk(id, &mut raw, &mut out).unwrap();
        }
    }

    /// A backup still running (holding the shared lock) when the sweep
    /// starts: the sweep waits for it, then sees its manifest.
    #[test]
    fn sweep_waits_for_a_running_backup() {
        let (_d, s) = store();
        let x = put(&s, 9, 2 * HOUR);
        let plan = plan(&s, LiveSet::from_store(&s).unwrap(), &opts()).unwrap();
        assert_eq!(plan.garbage().len(), 1);
        let running = s.lock_shared().unwrap();
        std::thread::scope(|sc| {
            let gc = sc.spawn(|| apply(&s, plan).unwrap());
            // the backup dedups against x and commits, then lets go of the lock
            assert!(s.has_chunk(&x).unwrap());
            backup(&s, 5, &[x]);
            drop(running);
            let r = gc.join().unwrap();
            assert_eq!((r.removed_chunks, r.rescued_chunks), (0, 1));
        });
        assert!(s.has_chunk(&x).unwrap());
    }

    #[test]
    fn touched_chunks_are_kept() {
        let (_d, s) = store();
        let x = put(&s, 4, 2 * HOUR);
        let plan = plan(&s, LiveSet::new(), &opts()).unwrap();
        s.touch_chunk(&x).unwrap();
        let r = apply(&s, plan).unwrap();
        assert_eq!((r.removed_chunks, r.rescued_chunks), (0, 1));
        assert!(s.has_chunk(&x).unwrap());
    }

    #[test]
    fn an_unreadable_backup_stops_gc() {
        let (_d, s) = store();
        let x = put(&s, 5, 2 * HOUR);
        backup(&s, 3, &[x]);
        let bm = s.root().join("backups/000000000003.blockmap");
        let mut bytes = std::fs::read(&bm).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&bm, bytes).unwrap();
        let e = LiveSet::from_store(&s).unwrap_err();
        assert!(matches!(e, Error::BackupUnreadable { id: 3, .. }), "{e}");
        // a manifest without its block map is just as unknown
        std::fs::remove_file(&bm).unwrap();
        assert!(matches!(LiveSet::from_store(&s), Err(Error::BackupUnreadable { id: 3, .. })));
    }

    #[test]
    fn orphans_and_temp_files_go_missing_chunks_are_counted() {
        let (_d, s) = store();
        let x = put(&s, 6, Duration::ZERO);
        backup(&s, 1, &[x]);
        backup(&s, 2, &[x]);
        s.set_protected(BackupId(2), true).unwrap();
        // a crash of remove_backup after the manifest went
        std::fs::remove_file(s.root().join("backups/000000000002.json")).unwrap();
        std::fs::write(s.root().join("tmp/123-0-abc"), b"partial").unwrap();
        std::fs::write(s.root().join("backups/.000000000009.json.tmp.1"), b"{").unwrap();
        std::fs::remove_file(s.chunk_path(&x)).unwrap();
        let plan = plan(&s, LiveSet::from_store(&s).unwrap(), &opts()).unwrap();
        assert_eq!(plan.stats.missing_chunks, 1);
        let r = apply(&s, plan).unwrap();
        assert_eq!((r.orphan_files, r.temp_files), (2, 2));
        assert!(s.root().join("backups/000000000001.blockmap").exists());
        assert_eq!(s.list_backups().unwrap(), vec![BackupId(1)]);
    }
}
