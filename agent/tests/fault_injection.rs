//! Agent-level fault injection (issue 10, "Must show", bullet 2).
//!
//! The store-level test (store/tests/fault_injection.rs) replays the
//! agent's store calls by hand; this one drives the agent library itself:
//! `backup_image` of a file source, `prune_image`, `gc::run`, `verify::run
//! --deep` and a restore (`OpenBackup` + `restore_to` a file), each on a
//! [`Store`] whose backend is a [`FaultBackend`] over the real directory
//! backend. For every operation a clean run counts its backend operations
//! N; then every k in 1..=N gets each fault: `ENOSPC` from k on (a full
//! disk stays full), `EIO` once at k, a torn write at the first write at
//! or after k, and a crash at k (k and everything after it fail and reach
//! nothing, and the failed operation's cleanup does nothing either).
//!
//! Each trial starts from a copy of the same state (two committed backups
//! of one image, garbage chunks of a forgotten third) and must end with
//! `Ok` or an error that names the object (a store path, a chunk, a
//! backup, a lock), never a panic. Then the fault is gone: the next process
//! opens store and catalog as the CLI does and checks that every committed
//! backup restores bit-identically to what was backed up, that no backup
//! the operation did not remove went missing, and that `verify --deep`
//! finds nothing (so no committed backup references a missing or torn
//! chunk).
//!
//! A difference from a real crash: the catalog (SQLite) is not behind the
//! fault backend, so the failed backup's "failed" mark still reaches it
//! where a crashed process would leave the row `running`; the next backup's
//! recovery handles both.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blockvault::config::Config;
use blockvault::context::Ctx;
use blockvault::lookup::BackupRef;
use blockvault::restore::{OpenBackup, RestoreOptions, TargetSpec, DEFAULT_SPARSE_SIZE};
use blockvault::verify::{self, VerifyOptions};
use blockvault_catalog::Catalog;
use blockvault_store::backend::dir::DirBackend;
use blockvault_store::backend::fault::{FaultBackend, FaultControl, FaultKind, FaultPlan};
use blockvault_store::{BackupId, InitOptions, Store};
use rand::{Rng, SeedableRng};

const BS: usize = 65536;
const BLOCKS: usize = 18;
const IMAGE: &str = "vm";

/// Image version `v`: some blocks zero, some shared between versions (so
/// backups deduplicate and inherit), some unique to `v`, one repeated
/// inside the image.
fn image(v: u64) -> Vec<u8> {
    let mut img = vec![0u8; BS * BLOCKS];
    for b in 0..BLOCKS {
        let seed = match b {
            0 | 7 => None,                   // zero blocks
            1 | 2 | 3 => Some(b as u64),     // the same in every version
            4 => Some(1),                    // a duplicate of block 1
            _ => Some(1000 * v + b as u64),  // changes in every version
        };
        if let Some(seed) = seed {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            rng.fill(&mut img[b * BS..(b + 1) * BS]);
        }
    }
    img
}

fn config_text(dir: &Path, image_file: &Path) -> String {
    format!(
        "[store]\npath = \"{}\"\nworkers = 1\nreaders = 1\ngc-grace = \"0s\"\n\
         [catalog]\npath = \"{}\"\n\
         [defaults]\nblock-size = \"64K\"\n\
         [[image]]\nname = \"{IMAGE}\"\nsource = \"file:{}\"\nretention = {{ keep-last = 1 }}\n",
        dir.join("store").display(),
        dir.join("catalog.sqlite").display(),
        image_file.display()
    )
}

fn config(dir: &Path, image_file: &Path) -> Config {
    Config::parse(&config_text(dir, image_file), &dir.join("config.toml")).unwrap()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// A context whose store goes through a fault backend.
fn faulty_ctx(cfg: Config) -> (Ctx, Arc<FaultControl>) {
    let fb = FaultBackend::new(DirBackend::new(cfg.store.path.as_deref().expect("a directory store")));
    let control = fb.control();
    let store = Store::with_backend(Box::new(fb)).unwrap();
    let catalog = Catalog::open(&cfg.catalog_path()).unwrap();
    catalog.bind_store(&store.meta().uuid).unwrap();
    (Ctx { cfg, store, catalog, catalog_in_memory: false }, control)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Backup,
    Prune,
    Gc,
    Verify,
    Restore,
}

/// Runs `op` on `ctx`; `out` is a scratch directory.
fn run_op(op: Op, ctx: &mut Ctx, out: &Path) -> anyhow::Result<()> {
    let never = AtomicBool::new(false);
    match op {
        Op::Backup => {
            let img = ctx.cfg.image(IMAGE)?.clone();
            blockvault::backup::backup_image(ctx, &img, &(), &never).map(drop)
        }
        Op::Prune => blockvault::prune::prune_image(ctx, IMAGE).map(drop),
        Op::Gc => blockvault::gc::run(&ctx.cfg, &ctx.store, false).map(drop),
        Op::Verify => {
            let opts = VerifyOptions { deep: true, deep_percent: 0.0, source: false, threads: 2, progress: false, cancel: &never };
            let r = verify::run(ctx, None, &opts)?;
            // with a fault, findings are expected (an EIO reads as an
            // unreadable chunk); they must name the chunk
            for f in &r.findings {
                let s = f.to_string();
                anyhow::ensure!(s.contains("chunk ") || s.contains("backup "), "finding names no object: {s}");
            }
            Ok(())
        }
        Op::Restore => {
            let b = OpenBackup::open(ctx, &BackupRef::parse(IMAGE)?)?;
            let to = TargetSpec::Path(out.join("restored.img"));
            let opts = RestoreOptions { force: true, mode: None, threads: 2, cancel: &never, sparse_size: DEFAULT_SPARSE_SIZE };
            b.restore_to(ctx, &to, &opts, &())
        }
    }
}

/// The base state every trial starts from, and what each backup holds.
struct Base {
    dir: tempfile::TempDir,
    /// The image file the trial's backup reads (version 4).
    image_file: PathBuf,
    /// Backup id → the image it must restore to.
    model: BTreeMap<u64, Vec<u8>>,
}

fn base() -> Base {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let image_file = dir.path().join("vm.img");
    let cfg = config(&state, &image_file);
    Store::init(cfg.store.path.as_deref().expect("a directory store"), &InitOptions { default_block_size: BS as u32 }).unwrap();
    let mut ctx = Ctx::open(cfg).unwrap();
    let img = ctx.cfg.image(IMAGE).unwrap().clone();
    let never = AtomicBool::new(false);
    let mut model = BTreeMap::new();
    for v in 1..=3 {
        std::fs::write(&image_file, image(v)).unwrap();
        let m = blockvault::backup::backup_image(&mut ctx, &img, &(), &never).unwrap();
        model.insert(m.id.0, image(v));
    }
    // forget the first: its own chunks become garbage for gc
    let first = *model.keys().next().unwrap();
    blockvault::prune::remove_backup(&ctx, BackupId(first)).unwrap();
    model.remove(&first);
    std::fs::write(&image_file, image(4)).unwrap();
    Base { dir, image_file, model }
}

/// The next process, with the fault gone: everything committed restores
/// as backed up and verifies clean. `op` may have added (backup) or removed
/// (prune) backups.
fn check_after(base: &Base, op: Op, trial: &Path) -> Result<(), String> {
    let cfg = config(trial, &base.image_file);
    let ctx = Ctx::open(cfg).map_err(|e| format!("store or catalog does not open: {e:#}"))?;
    blockvault::rebuild::reconcile(&ctx.store, &ctx.catalog).map_err(|e| format!("reconcile: {e:#}"))?;
    let rows = ctx.catalog.committed_backups(None).map_err(|e| e.to_string())?;
    let committed: BTreeSet<u64> = rows.iter().map(|r| r.id.0).collect();
    let before: BTreeSet<u64> = base.model.keys().copied().collect();
    let newest = *before.iter().next_back().unwrap();
    match op {
        // prune keeps the newest backup at least
        Op::Prune if !committed.contains(&newest) => return Err(format!("prune lost backup {newest}: {committed:?}")),
        Op::Prune => {}
        _ if !before.is_subset(&committed) => return Err(format!("backups {before:?} before, {committed:?} after")),
        _ => {}
    }
    let never = AtomicBool::new(false);
    for r in &rows {
        let want = match base.model.get(&r.id.0) {
            Some(w) => w.clone(),
            None if op == Op::Backup => image(4),
            None => return Err(format!("backup {} appeared from nowhere", r.id)),
        };
        let out = trial.join(format!("check-{}.img", r.id));
        let b = OpenBackup::open(&ctx, &BackupRef::parse(&format!("{IMAGE}@{}", r.id)).unwrap())
            .map_err(|e| format!("backup {} does not open: {e:#}", r.id))?;
        let opts = RestoreOptions { force: true, mode: None, threads: 2, cancel: &never, sparse_size: DEFAULT_SPARSE_SIZE };
        b.restore_to(&ctx, &TargetSpec::Path(out.clone()), &opts, &())
            .map_err(|e| format!("backup {} does not restore: {e:#}", r.id))?;
        drop(b);
        if std::fs::read(&out).unwrap() != want {
            return Err(format!("backup {} restores to different bytes", r.id));
        }
    }
    let opts = VerifyOptions { deep: true, deep_percent: 0.0, source: false, threads: 2, progress: false, cancel: &never };
    let report = verify::run(&ctx, None, &opts).map_err(|e| format!("verify --deep failed: {e:#}"))?;
    if !report.is_clean() {
        let f: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
        return Err(format!("verify --deep is not clean: {f:?}"));
    }
    Ok(())
}

/// An error names the object that failed: a path in the trial's store, a
/// chunk, a backup, an image or a lock.
fn names_object(msg: &str, trial: &Path) -> bool {
    msg.contains(&trial.display().to_string())
        || msg.contains("chunk ")
        || msg.contains("backup ")
        || msg.contains("image '")
        || msg.contains("lock")
}

#[test]
fn a_fault_at_every_backend_operation_of_every_agent_operation() {
    let base = base();
    let state = base.dir.path().join("state");
    let mut trials = 0;
    let mut fired = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut counts = Vec::new();
    for op in [Op::Backup, Op::Prune, Op::Gc, Op::Verify, Op::Restore] {
        // a clean run counts the operation's backend operations
        let clean = tempfile::tempdir().unwrap();
        copy_tree(&state, clean.path());
        let (mut ctx, control) = faulty_ctx(config(clean.path(), &base.image_file));
        control.reset();
        run_op(op, &mut ctx, clean.path()).unwrap_or_else(|e| panic!("{op:?} fails without a fault: {e:#}"));
        let n = control.ops();
        drop(ctx);
        check_after(&base, op, clean.path()).unwrap_or_else(|e| panic!("{op:?} without a fault: {e}"));
        assert!(n > 0, "{op:?} made no backend operation");
        counts.push((op, n));
        for k in 1..=n {
            for (kind, sticky) in
                [(FaultKind::NoSpace, true), (FaultKind::Io, false), (FaultKind::Tear, false), (FaultKind::Crash, true)]
            {
                trials += 1;
                let t = tempfile::tempdir().unwrap();
                copy_tree(&state, t.path());
                let (mut ctx, control) = faulty_ctx(config(t.path(), &base.image_file));
                control.arm(FaultPlan { at: k, kind, sticky });
                let what = format!("{op:?}, {kind:?} at operation {k} of {n}");
                let res = catch_unwind(AssertUnwindSafe(|| run_op(op, &mut ctx, t.path())));
                if control.fired().is_some() {
                    fired += 1;
                }
                match res {
                    Err(_) => failures.push(format!("{what}: panicked")),
                    Ok(Err(e)) => {
                        let msg = format!("{e:#}");
                        if !names_object(&msg, t.path()) {
                            failures.push(format!("{what}: the error names no object: {msg}"));
                        }
                    }
                    Ok(Ok(())) => {}
                }
                // the process ends (a crash: without any cleanup)
                drop(ctx);
                if let Err(e) = check_after(&base, op, t.path()) {
                    failures.push(format!("{what}: afterwards {e}"));
                }
            }
        }
    }
    eprintln!("{trials} trials ({fired} with the fault fired); backend operations per clean run: {counts:?}");
    assert!(failures.is_empty(), "{} of {trials} trials failed:\n{}", failures.len(), failures.join("\n"));
    assert!(trials >= 500, "only {trials} trials");
    // a sweep whose faults never fire tests nothing
    assert!(fired * 10 >= trials * 7, "only {fired} of {trials} faults fired");
}
