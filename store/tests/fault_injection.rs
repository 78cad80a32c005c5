//! Fault injection through the store's backend trait (issue 10, item 3).
//!
//! Each trial starts from the same store (three committed backups of two
//! images, one protected, one unreferenced chunk), runs one operation
//! (backup-like, prune-like, protect, gc, verify-like, restore-like)
//! through [`Store`] on a [`FaultBackend`], with a fault at its k-th
//! backend operation, k swept over the whole operation: `ENOSPC` from k on
//! (a full disk stays full), `EIO` once, a torn write at each write, and a
//! crash at k (nothing
//! after k happens, not even the failed backup's cleanup). The operation
//! must return an error that names the object and the cause, never panic.
//! Then a fresh handle on the stored state (the next process) checks: every
//! backup in the store restores bit-identically to what was backed up, the
//! backups the operation did not remove are all there, every chunk in the
//! store decodes (no torn chunk is visible, so none can be deduplicated
//! against), none referenced is missing; and after the next run's cleanup,
//! a GC and one more backup the same holds.
//!
//! The operations are store-level versions of the agent's (the same calls
//! in the same order, single-threaded), not the agent's own code: a
//! backup locks, reads its parent, looks up or writes each changed block
//! and commits with `write_backup`; a restore or verify loads every chunk.

mod common;
use common::copy_tree;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use blockvault_store::backend::dir::DirBackend;
use blockvault_store::backend::fault::{FaultBackend, FaultControl, FaultKind, FaultPlan};
use blockvault_store::backend::memory::MemoryBackend;
use blockvault_store::format::MANIFEST_VERSION;
use blockvault_store::gc::{self, GcOptions, LiveSet};
use blockvault_store::{chunk, Backend, BackupId, BlockMap, ChunkId, InitOptions, Manifest, Result, Store};
use rand::{Rng, SeedableRng};

const BS: usize = 65536;
const BLOCKS: usize = 24;

/// What the test backed up: the image of every backup it tried to commit.
#[derive(Clone, Default)]
struct Model {
    images: BTreeMap<u64, Vec<u8>>,
}

fn block(seed: u64, compressible: bool) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    if compressible {
        let b: u8 = rng.gen();
        (0..BS).map(|i| b.wrapping_add((i / 512) as u8)).collect()
    } else {
        let mut b = vec![0u8; BS];
        rng.fill(&mut b[..]);
        b
    }
}

/// An image of `BLOCKS` blocks: block i is `f(i)` (None: zeros).
fn image(f: impl Fn(usize) -> Option<Vec<u8>>) -> Vec<u8> {
    let mut img = vec![0u8; BS * BLOCKS];
    for i in 0..BLOCKS {
        if let Some(b) = f(i) {
            img[i * BS..(i + 1) * BS].copy_from_slice(&b);
        }
    }
    img
}

fn manifest(id: u64, image: &str, parent: Option<u64>) -> Manifest {
    Manifest {
        format: MANIFEST_VERSION,
        set: None,
        id: BackupId(id),
        image: image.into(),
        source: format!("file:/{image}"),
        created: "2026-01-01T00:00:00Z".into(),
        finished: "2026-01-01T00:00:01Z".into(),
        parent: parent.map(BackupId),
        image_size: 0,
        block_size: BS as u32,
        blockmap_blake3: String::new(),
        snapshot: None,
        stats: Default::default(),
        rbd: None,
    }
}

/// A backup as the agent does one: the store lock shared for the whole
/// run, the parent's map inherited for unchanged blocks, each changed
/// block looked up and written when missing (with an early sync halfway,
/// as the pipeline's flusher makes), the index chunk stored once its
/// blocks are done, then the commit. On an error, what was staged is
/// discarded, as the pipeline does.
fn backup(s: &Store, id: u64, name: &str, parent: Option<u64>, img: &[u8], changed: &[usize]) -> Result<()> {
    let _lock = s.lock_shared()?;
    let mut map = match parent {
        Some(p) => {
            let pm = s.read_manifest(BackupId(p))?;
            let pmap = s.read_blockmap(&pm)?;
            BlockMap::inherit(&pmap, img.len() as u64)
        }
        None => BlockMap::new_zeroed(img.len() as u64, BS as u32),
    };
    let res = (|| {
        let blocks: Vec<usize> = if parent.is_some() { changed.to_vec() } else { (0..BLOCKS).collect() };
        let half = blocks.len() / 2;
        for (n, b) in blocks.into_iter().enumerate() {
            if n == half {
                s.sync_early()?;
            }
            let data = &img[b * BS..(b + 1) * BS];
            if chunk::is_zero(data) {
                map.set(b, None);
                continue;
            }
            let cid = ChunkId::of(data);
            if !s.has_chunk(&cid)? {
                s.put_chunk(&chunk::encode(data, cid, 1, None)?)?;
            }
            map.set(b, Some(cid));
        }
        // every block is done: the map's one index group (BLOCKS < fanout)
        let fanout = map.index_fanout().expect("64 KiB blocks: an indexed map");
        let mut ahead = blockvault_store::IndexAhead::default();
        if let Some(id) = s.put_index_group(map.index_group(fanout, 0))? {
            ahead.set(0, id);
        }
        s.write_backup_ahead(&mut manifest(id, name, parent), &map, &ahead)
    })();
    if res.is_err() {
        s.discard_pending();
    }
    res
}

/// Restores a backup: every block from its verified chunk.
fn restore(s: &Store, id: u64) -> Result<Vec<u8>> {
    let _lock = s.lock_shared()?;
    let m = s.read_manifest(BackupId(id))?;
    let map = s.read_blockmap(&m)?;
    let mut out = vec![0u8; m.image_size as usize];
    let (mut raw, mut plain) = (Vec::new(), Vec::new());
    for (b, e) in map.entries().iter().enumerate() {
        if let Some(cid) = e {
            s.load_chunk(cid, &mut raw, &mut plain)?;
            let (off, len) = map.block_range(b);
            out[off as usize..off as usize + len].copy_from_slice(&plain[..len]);
        }
    }
    Ok(out)
}

/// `verify --deep`: every committed backup's manifest and block map, and
/// every chunk they reference, read and decoded once; the first failure
/// is the result.
fn verify_deep(s: &Store) -> Result<()> {
    let _lock = s.lock_shared()?;
    let mut seen = BTreeSet::new();
    let (mut raw, mut plain) = (Vec::new(), Vec::new());
    for id in s.list_backups()? {
        let m = s.read_manifest(id)?;
        let _ = s.try_is_protected(id)?;
        for cid in s.read_blockmap(&m)?.chunk_ids() {
            if seen.insert(*cid) {
                s.load_chunk(cid, &mut raw, &mut plain)?;
            }
        }
    }
    Ok(())
}

fn run_gc(s: &Store) -> Result<()> {
    let live = LiveSet::from_store(s)?;
    let plan = gc::plan(s, live, &GcOptions { grace: Duration::ZERO })?;
    gc::apply(s, plan).map(|_| ())
}

/// A prune of backup 2 (its protection checked first, as prune does).
fn prune(s: &Store) -> Result<()> {
    let _lock = s.lock_shared()?;
    if !s.try_is_protected(BackupId(2))? {
        s.remove_backup(BackupId(2))?;
    }
    Ok(())
}

fn protect(s: &Store) -> Result<()> {
    s.set_protected(BackupId(3), true)?;
    s.set_protected(BackupId(1), false)
}

/// Image a of backup 1: zero blocks, a block repeated, compressible and
/// random blocks.
fn image1() -> Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(make_image1).clone()
}
fn make_image1() -> Vec<u8> {
    image(|i| match i {
        3 | 9 | 17 => None,
        4 | 21 => Some(block(100, false)), // the same as block 0: deduplicated
        _ => Some(block(100 + i as u64, i % 2 == 0)),
    })
}

/// `base` with the blocks in `changes` replaced (None: zeroed).
fn changed(base: &[u8], changes: &[(usize, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut img = base.to_vec();
    for (b, data) in changes {
        let r = b * BS..(b + 1) * BS;
        match data {
            Some(d) => img[r].copy_from_slice(d),
            None => img[r].fill(0),
        }
    }
    img
}

/// Backup 2, image a, the incremental of backup 1.
fn changes2() -> Vec<(usize, Option<Vec<u8>>)> {
    vec![(2, Some(block(202, false))), (3, Some(block(203, true))), (6, None), (13, Some(block(213, false))), (20, Some(block(100, false)))]
}
fn image2() -> Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(make_image2).clone()
}
fn make_image2() -> Vec<u8> {
    changed(&image1(), &changes2())
}

/// Backup 3, image b: its own blocks, one shared with image a.
fn image3() -> Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(make_image3).clone()
}
fn make_image3() -> Vec<u8> {
    image(|i| match i {
        0 | 12 => None,
        5 => Some(block(102, true)), // block 2 of backup 1
        _ => Some(block(300 + i as u64, i % 3 == 0)),
    })
}

/// Backup 4, image a, the incremental of backup 2: new blocks, a zeroed
/// one, blocks equal to image b's, new compressible ones.
fn changes4() -> Vec<(usize, Option<Vec<u8>>)> {
    vec![
        (1, Some(block(401, false))),
        (5, None),
        (7, Some(block(301, false))),
        (11, Some(block(411, true))),
        (14, Some(block(414, false))),
        (15, Some(block(414, false))),
        (19, Some(block(306, true))),
        (22, Some(block(422, true))),
    ]
}
fn image4() -> Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(make_image4).clone()
}
fn make_image4() -> Vec<u8> {
    changed(&image2(), &changes4())
}

fn blocks_of(changes: &[(usize, Option<Vec<u8>>)]) -> Vec<usize> {
    changes.iter().map(|c| c.0).collect()
}

/// The starting store of every trial; returns what it holds.
fn populate(s: &Store) -> Model {
    let mut m = Model::default();
    for (id, name, parent, img, changed) in [
        (1, "a", None, image1(), &[][..]),
        (2, "a", Some(1), image2(), &blocks_of(&changes2())[..]),
        (3, "b", None, image3(), &[][..]),
    ] {
        backup(s, id, name, parent, &img, changed).unwrap();
        m.images.insert(id, img);
    }
    s.set_protected(BackupId(1), true).unwrap();
    // an unreferenced chunk, for GC to remove
    let junk = block(999, false);
    s.put_chunk(&chunk::encode(&junk, ChunkId::of(&junk), 1, None).unwrap()).unwrap();
    s.sync().unwrap();
    m
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Backup,
    Prune,
    Protect,
    Gc,
    Verify,
    Restore,
}
const OPS: [Op; 6] = [Op::Backup, Op::Prune, Op::Protect, Op::Gc, Op::Verify, Op::Restore];

/// Runs one operation; `model` learns the image of a backup it tries.
fn run_op(op: Op, s: &Store, model: &mut Model) -> Result<()> {
    match op {
        Op::Backup => {
            model.images.insert(4, image4());
            backup(s, 4, "a", Some(2), &image4(), &blocks_of(&changes4()))
        }
        Op::Prune => prune(s),
        Op::Protect => protect(s),
        Op::Gc => run_gc(s),
        Op::Verify => verify_deep(s),
        Op::Restore => {
            for id in [2, 3] {
                let img = restore(s, id)?;
                // a restore that succeeds returns exactly what was backed up
                assert!(img == model.images[&id], "restore of backup {id} returned wrong data");
            }
            Ok(())
        }
    }
}

/// Backups that `op` must leave in the store, whatever happens to it.
fn must_remain(op: Op) -> &'static [u64] {
    match op {
        Op::Prune => &[1, 3],
        _ => &[1, 2, 3],
    }
}

/// The checks after a trial, on a fresh handle: see the module docs.
/// Every visible chunk is decoded (and checked against its id) once; each
/// backup is then rebuilt from those.
fn check_store(s: &Store, model: &Model, must: &[u64]) -> std::result::Result<(), String> {
    let ids: Vec<u64> = s.list_backups().map_err(|e| e.to_string())?.iter().map(|b| b.0).collect();
    for id in must {
        if !ids.contains(id) {
            return Err(format!("backup {id} vanished; store holds {ids:?}"));
        }
    }
    let mut plain_of = HashMap::new();
    let mut raw = Vec::new();
    for (cid, _, _) in s.list_chunks().map_err(|e| e.to_string())? {
        let mut plain = Vec::new();
        s.load_chunk(&cid, &mut raw, &mut plain).map_err(|e| format!("a visible chunk does not decode: {e}"))?;
        plain_of.insert(cid, plain);
    }
    for id in &ids {
        let Some(want) = model.images.get(id) else { return Err(format!("unknown backup {id} in the store")) };
        let m = s.read_manifest(BackupId(*id)).map_err(|e| e.to_string())?;
        let map = s.read_blockmap(&m).map_err(|e| e.to_string())?;
        let mut got = vec![0u8; m.image_size as usize];
        for (b, e) in map.entries().iter().enumerate() {
            if let Some(cid) = e {
                let plain = plain_of.get(cid).ok_or_else(|| format!("backup {id} references missing chunk {cid}"))?;
                let (off, len) = map.block_range(b);
                got[off as usize..off as usize + len].copy_from_slice(&plain[..len]);
            }
        }
        if &got != want {
            return Err(format!("backup {id} restores different data"));
        }
    }
    Ok(())
}

/// Every line of an error's chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// One place where a trial's store lives: a memory store, or a store
/// directory on tmpfs.
trait World {
    /// A new handle on the stored state (the next process).
    fn handle(&self) -> Box<dyn Backend>;
    fn fork(&self) -> Self;
    fn location(&self) -> String;
}

struct Mem(MemoryBackend);
impl World for Mem {
    fn handle(&self) -> Box<dyn Backend> {
        Box::new(self.0.reopen())
    }
    fn fork(&self) -> Self {
        Mem(self.0.fork())
    }
    fn location(&self) -> String {
        "memory:".into()
    }
}

struct Dir(tempfile::TempDir);
impl Dir {
    fn root(&self) -> std::path::PathBuf {
        self.0.path().join("s")
    }
}
impl World for Dir {
    fn handle(&self) -> Box<dyn Backend> {
        Box::new(DirBackend::new(&self.root()))
    }
    fn fork(&self) -> Self {
        let d = Dir(tmpdir());
        copy_tree(&self.root(), &d.root());
        d
    }
    fn location(&self) -> String {
        self.root().display().to_string()
    }
}

fn tmpdir() -> tempfile::TempDir {
    // tmpfs: syncfs there costs nothing and waits for no other writer
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

#[derive(Default)]
struct Tally {
    trials: usize,
    by_kind: BTreeMap<String, usize>,
    failures: Vec<String>,
}

/// Sweeps every fault over every operation of `ops` on `base`.
fn sweep<W: World>(base: &W, model: &Model, ops: &[Op], kinds: &[FaultKind], tally: &mut Tally) {
    for &op in ops {
        // a clean run counts the operation's backend calls
        let world = base.fork();
        let fb = FaultBackend::new(world.handle());
        let ctl = fb.control();
        let s = Store::with_backend(Box::new(fb)).unwrap();
        ctl.reset();
        run_op(op, &s, &mut model.clone()).unwrap_or_else(|e| panic!("{op:?} fails without a fault: {e}"));
        let log = ctl.log();
        drop(s);
        assert!(!log.is_empty());
        for &kind in kinds {
            let ks: Vec<u64> = match kind {
                FaultKind::Tear => (1..=log.len() as u64).filter(|k| matches!(log[*k as usize - 1], "put chunk" | "write")).collect(),
                _ => (1..=log.len() as u64).collect(),
            };
            for k in ks {
                let what = format!("{} {op:?} {kind:?} at op {k} ({})", world.location(), log[k as usize - 1]);
                tally.trials += 1;
                *tally.by_kind.entry(format!("{kind:?}")).or_default() += 1;
                if let Err(f) = trial(base, model, op, FaultPlan { at: k, kind, sticky: kind == FaultKind::NoSpace }) {
                    tally.failures.push(format!("{what}: {f}"));
                }
            }
        }
    }
}

fn trial<W: World>(base: &W, model: &Model, op: Op, plan: FaultPlan) -> std::result::Result<(), String> {
    let world = base.fork();
    let mut model = model.clone();
    let fb = FaultBackend::new(world.handle());
    let ctl: std::sync::Arc<FaultControl> = fb.control();
    let s = Store::with_backend(Box::new(fb)).map_err(|e| e.to_string())?;
    ctl.arm(plan);
    let res = catch_unwind(AssertUnwindSafe(|| run_op(op, &s, &mut model))).map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        format!("panicked: {}", msg.unwrap_or_default())
    })?;
    if ctl.fired().is_none() {
        return Err("the fault never fired".into());
    }
    match &res {
        Ok(()) => return Err("the operation succeeded despite the fault".into()),
        Err(e) => {
            let text = chain(e);
            let cause = ["No space left on device", "Input/output error"];
            if !text.contains(&world.location()) || !cause.iter().any(|c| text.contains(c)) {
                return Err(format!("the error does not name the object and the cause: {text}"));
            }
        }
    }
    // the process ends (a crash ends it at the fault, with nothing cleaned up)
    drop(s);
    let s = Store::with_backend(world.handle()).map_err(|e| format!("store does not open: {e}"))?;
    check_store(&s, &model, must_remain(op)).map_err(|e| format!("right after: {e}"))?;
    // the next run: its cleanup, a GC, a new backup
    let _ = s.clean_tmp().map_err(|e| format!("clean_tmp: {e}"))?;
    run_gc(&s).map_err(|e| format!("gc after: {e}"))?;
    let latest = *s.list_backups().map_err(|e| e.to_string())?.last().unwrap();
    let next = latest.0.max(4) + 1;
    let img = model.images[&latest.0].clone();
    let mut img5 = img.clone();
    img5[..BS].copy_from_slice(&block(500 + next, false));
    backup(&s, next, "a", Some(latest.0), &img5, &[0]).map_err(|e| format!("next backup: {e}"))?;
    model.images.insert(next, img5);
    check_store(&s, &model, must_remain(op)).map_err(|e| format!("after the next run: {e}"))
}

#[test]
fn a_fault_at_any_backend_operation_loses_no_committed_backup() {
    let started = Instant::now();
    let mut tally = Tally::default();
    let kinds = [FaultKind::NoSpace, FaultKind::Io, FaultKind::Tear, FaultKind::Crash];

    let mem = Mem(MemoryBackend::new());
    let s = Store::init_with_backend(mem.handle(), &InitOptions { default_block_size: BS as u32 }).unwrap();
    let model = populate(&s);
    drop(s);
    sweep(&mem, &model, &OPS, &kinds, &mut tally);

    // the directory backend's own code on the write paths: backup, prune, gc
    let dir = Dir(tmpdir());
    let s = Store::init(&dir.root(), &InitOptions { default_block_size: BS as u32 }).unwrap();
    let dmodel = populate(&s);
    drop(s);
    sweep(&dir, &dmodel, &[Op::Backup, Op::Prune, Op::Gc], &kinds, &mut tally);

    eprintln!("{} fault trials in {:.1?}: {:?}", tally.trials, started.elapsed(), tally.by_kind);
    assert!(tally.failures.is_empty(), "{} of {} trials failed:\n{}", tally.failures.len(), tally.trials, tally.failures.join("\n"));
    assert!(tally.trials >= 500, "only {} trials", tally.trials);
}

/// A torn chunk write must never become visible: not after a sync of the
/// same handle, not after a crash. Checked on the directory backend's
/// real temp-file path and on the memory backend.
#[test]
fn a_torn_chunk_write_never_becomes_a_visible_chunk() {
    let data = block(7, false);
    let cid = ChunkId::of(&data);
    let enc = chunk::encode(&data, cid, 1, None).unwrap();
    let dir = Dir(tmpdir());
    Store::init(&dir.root(), &InitOptions { default_block_size: BS as u32 }).unwrap();
    let worlds: Vec<Box<dyn Fn() -> Box<dyn Backend>>> = {
        let mem = MemoryBackend::new();
        Store::init_with_backend(Box::new(mem.reopen()), &InitOptions::default()).unwrap();
        let root = dir.root();
        vec![Box::new(move || Box::new(mem.reopen())), Box::new(move || Box::new(DirBackend::new(&root)))]
    };
    for handle in &worlds {
        let b = handle();
        let e = b.put_chunk_torn(&cid, &enc.bytes, enc.bytes.len() / 2);
        assert!(chain(&e).contains("No space left on device"), "{}", chain(&e));
        b.sync().unwrap();
        assert!(!b.chunk_exists(&cid).unwrap(), "torn chunk visible after a sync");
        drop(b); // and after a crash
        let s = Store::with_backend(handle()).unwrap();
        assert!(!s.has_chunk(&cid).unwrap());
        assert_eq!(s.clean_tmp().unwrap(), 1, "the torn write leaves one temp object, removed by the next run");
        // a good write of the same chunk afterwards is stored whole
        assert!(s.put_chunk(&enc).unwrap());
        s.sync().unwrap();
        let (mut raw, mut plain) = (Vec::new(), Vec::new());
        s.load_chunk(&cid, &mut raw, &mut plain).unwrap();
        assert_eq!(plain, data);
    }
}
