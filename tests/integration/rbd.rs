//! RBD backups against a real throwaway cluster: the one CEPH_CONF names
//! (tests/run.sh starts it), else one started for this test process. Without
//! Ceph's packages these tests fail, naming the packages to install: they
//! never pass silently.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use crate::common::*;

pub(crate) const POOL: &str = "rbd";
/// layering, exclusive-lock, object-map, fast-diff, deep-flatten
pub(crate) const FEATURES: u64 = 1 | 4 | 8 | 16 | 32;
const STRIPINGV2: u64 = 2;
pub(crate) const MIB: u64 = 1 << 20;

/// `$CEPH_CONF`, else the cluster started for this test process (see
/// `blockvault_tests::ceph_conf`).
pub(crate) fn ceph_conf() -> String {
    blockvault_tests::ceph_conf().to_string_lossy().into_owned()
}

pub(crate) fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Runs tests/integration/rbd_io.py with a list of ops.
pub(crate) fn rbd_io(image: &str, ops: Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/rbd_io.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .args([POOL, image])
        .env("CEPH_CONF", ceph_conf())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(ops.to_string().as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "rbd_io.py {image} failed on {ops}");
}

/// Runs `rbd ARGS` on the test cluster, whatever its exit status.
pub(crate) fn rbd_run(args: &[&str]) -> std::process::Output {
    Command::new("rbd").args(args).env("CEPH_CONF", ceph_conf()).output().unwrap()
}

pub(crate) fn rbd_cli(args: &[&str]) -> String {
    let o = rbd_run(args);
    assert!(o.status.success(), "rbd {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn snaps(image: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&rbd_cli(&["snap", "ls", "--format", "json", &format!("{POOL}/{image}")])).unwrap();
    v.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

pub(crate) fn blockvault_snaps(image: &str) -> Vec<String> {
    snaps(image).into_iter().filter(|s| s.starts_with("blockvault-")).collect()
}

/// sha256 of `rbd export SPEC -`.
pub(crate) fn export_hash(spec: &str) -> String {
    let sh = format!("rbd export --no-progress {POOL}/{spec} - | sha256sum");
    let o = Command::new("sh").arg("-c").arg(&sh).env("CEPH_CONF", ceph_conf()).output().unwrap();
    assert!(o.status.success(), "{sh}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

pub(crate) fn file_hash(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(o.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

pub(crate) fn rbd_env(images: &[(&str, &str)], extra: &str) -> Env {
    ceph_conf();
    let env = Env::new(&[], "");
    let imgs: Vec<(&str, String)> = images.iter().map(|(n, i)| (*n, format!("rbd:{POOL}/{i}"))).collect();
    let refs: Vec<(&str, &str)> = imgs.iter().map(|(n, s)| (*n, s.as_str())).collect();
    env.write_config(&refs, "", extra);
    env.ok(&["init"]);
    env
}

/// Restores backup `l` of `name` and checks it against `rbd export` of the
/// backup's snapshot of `img`. Returns the restored file.
fn restore_equals_snapshot(env: &Env, name: &str, img: &str, l: &Value) -> std::path::PathBuf {
    let snap = l["snapshot"].as_str().unwrap();
    let out = env.restore(&format!("{name}@{}", num(l, "id")));
    assert_eq!(file_hash(&out), export_hash(&format!("{img}@{snap}")), "backup {l} differs from its snapshot");
    out
}

pub(crate) fn latest(env: &Env, image: &str) -> Value {
    env.list().into_iter().filter(|b| b["image"] == image).last().unwrap_or_else(|| panic!("no backup of {image}"))
}

/// Random writes (some straddling block edges) and discards (some of whole
/// objects written before, some partial) for one round.
fn round_ops(r: &mut impl Rng, size: u64, block: u64, object: u64, seed: u64) -> Vec<Value> {
    let mut ops = Vec::new();
    for i in 0..6 {
        let len = r.gen_range(1..200_000u64);
        let off = if i % 2 == 0 {
            // straddle a block edge
            let edge = r.gen_range(1..size / block) * block;
            edge - r.gen_range(1..len.min(edge) + 1).min(edge)
        } else {
            r.gen_range(0..size - len)
        };
        ops.push(json!(["write", off, len.min(size - off), seed * 100 + i]));
    }
    // zero a whole object that holds data
    let obj = r.gen_range(0..size / object);
    ops.push(json!(["write", obj * object, 4096, seed * 100 + 50]));
    if seed % 3 == 0 {
        ops.push(json!(["discard", obj * object, object]));
    }
    // a partial discard somewhere
    let len = r.gen_range(1..3 * block);
    let off = r.gen_range(0..size - len);
    ops.push(json!(["discard", off, len]));
    // and a run of zeros written over data (reads as zero, exists on the cluster)
    let off = r.gen_range(0..size / block) * block;
    ops.push(json!(["fill", off, block.min(size - off), 0]));
    ops
}

/// In the spirit of Ceph's qa/workunits/rbd/diff_continuous.sh: 30 rounds of
/// random writes and discards (and a grow and a shrink), a backup after
/// each, each snapshot's export kept as a hash before blockvault demotes it;
/// then every backup is restored and compared. Two images: a 1 GiB one at
/// the default 4 MiB blocks (whole-object fast-diff), and a fancy-striped
/// one with 1 MiB objects at 64 KiB blocks (exact extents).
#[test]
fn continuous_diff() {
    let a = unique("cdiff-a");
    let b = unique("cdiff-b");
    let (a_size, b_size) = (1024 * MIB, 192 * MIB);
    rbd_io(&a, json!([["create", a_size, 0, FEATURES, 0, 0], ["write", 0, 8 * MIB, 1], ["snap", "foreign-keep"]]));
    rbd_io(&b, json!([["create", b_size, 20, FEATURES | STRIPINGV2, 65536, 8], ["write", 0, 3 * MIB, 2]]));
    let env = rbd_env(&[("a", &a), ("b", &b)], "[defaults]\nkeep-snapshots = 1\n");
    // image b uses 64 KiB blocks
    let cfg = fs::read_to_string(&env.config).unwrap();
    fs::write(&env.config, cfg.replacen(&format!("source = \"rbd:{POOL}/{b}\""), &format!("source = \"rbd:{POOL}/{b}\"\nblock-size = \"64K\""), 1)).unwrap();

    let mut r = rng(42);
    let mut expected: BTreeMap<u64, (String, String)> = BTreeMap::new(); // backup id -> (image, hash)
    let mut sizes = (a_size, b_size);
    let mut patched = (0, 0);
    for round in 1..=30u64 {
        if round > 1 {
            let mut ops_a = round_ops(&mut r, sizes.0, 4 * MIB, 4 * MIB, round);
            let mut ops_b = round_ops(&mut r, sizes.1, 65536, MIB, round + 1000);
            if round == 10 {
                sizes.0 += 256 * MIB + 12345; // grow, not block aligned
                ops_a.push(json!(["resize", sizes.0]));
                ops_a.push(json!(["write", sizes.0 - 70_000, 70_000, 777]));
                sizes.1 += 3 * MIB;
                ops_b.push(json!(["resize", sizes.1]));
            }
            if round == 20 {
                sizes.0 -= 300 * MIB; // shrink below the grow, cutting written data
                ops_a.push(json!(["resize", sizes.0]));
                sizes.1 -= 5 * MIB + 4096;
                ops_b.push(json!(["resize", sizes.1]));
            }
            rbd_io(&a, json!(ops_a));
            rbd_io(&b, json!(ops_b));
        }
        env.ok(&["backup", "a", "b"]);
        for (name, img) in [("a", &a), ("b", &b)] {
            let l = latest(&env, name);
            let snap = l["snapshot"].as_str().unwrap().to_string();
            expected.insert(num(&l, "id"), (name.to_string(), export_hash(&format!("{img}@{snap}"))));
            if round > 1 {
                assert_eq!(l["full_read"], false, "round {round}: image {name} fell back to a full read: {l}");
            }
            if name == "a" {
                patched.0 += num(&l, "patched_blocks");
            } else {
                patched.1 += num(&l, "patched_blocks");
            }
            // exactly keep-snapshots blockvault snapshots, foreign ones untouched
            assert_eq!(blockvault_snaps(img), vec![snap.clone()], "round {round} image {name}");
        }
        assert!(snaps(&a).contains(&"foreign-keep".to_string()), "foreign snapshot removed");
    }
    assert_eq!(expected.len(), 60);
    // small writes into 4 MiB blocks: many are patched, and checked below
    assert!(patched.0 > 0, "no block of image a was patched from its parent");
    // and small writes into 64 KiB blocks, found from the whole-image exact diff
    assert!(patched.1 > 0, "no block of image b was patched from its parent");
    eprintln!("patched blocks: image a {}, image b {}", patched.0, patched.1);
    for (id, (name, hash)) in &expected {
        let out = env.restore(&format!("{name}@{id}"));
        assert_eq!(&file_hash(&out), hash, "backup {id} of {name} differs from its snapshot");
        fs::remove_file(out).unwrap();
    }
    let v: Value = serde_json::from_str(&env.ok(&["snapshots", "a", "--json"])).unwrap();
    let states: Vec<&str> = v[0]["snapshots"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert!(states.contains(&"foreign") && states.contains(&"held"), "{v}");
    rbd_cli(&["snap", "purge", &format!("{POOL}/{a}")]);
    rbd_cli(&["snap", "purge", &format!("{POOL}/{b}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{a}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{b}")]);
}

/// Small writes inside 4 MiB blocks: the incremental reads only the changed
/// bytes from the cluster and patches them over the parent's chunks, and the
/// result is the snapshot's content. A parent chunk missing from the store
/// makes its block a whole-block read: still correct, never a failed job.
#[test]
fn partly_changed_blocks_are_patched_from_the_parent() {
    let img = unique("patch");
    rbd_io(&img, json!([["create", 64 * MIB, 0, FEATURES, 0, 0], ["write", 0, 64 * MIB, 7]]));
    let env = rbd_env(&[("p", &img)], "");
    env.ok(&["backup", "p"]);
    // blocks 0 (two writes), 9 and 10 (one write across their edge), 12
    let writes = [(4096u64, 4096u64), (3 * MIB + 1000, 5000), (40 * MIB - 2048, 4096), (50 * MIB, 65536)];
    let ops: Vec<Value> = writes.iter().enumerate().map(|(i, (o, l))| json!(["write", o, l, 100 + i])).collect();
    rbd_io(&img, json!(ops));
    env.ok(&["backup", "p"]);
    let l = latest(&env, "p");
    assert_eq!(l["full_read"], false, "{l}");
    assert_eq!(num(&l, "patched_blocks"), 4, "{l}");
    let changed: u64 = writes.iter().map(|w| w.1).sum();
    let read = num(&l, "read_bytes");
    // exact extents: at least the written bytes, far less than 4 blocks
    assert!(read >= changed && read < 4 * changed, "read {read} bytes for {changed} changed: {l}");
    let out = restore_equals_snapshot(&env, "p", &img, &l);

    // corrupt the chunk of block 12 (patched above) in the store, change it
    // again. (A chunk *missing* from the store makes its backup no base at
    // all: `lost_chunk_of_an_unchanged_rbd_block_is_not_inherited`.)
    let data = fs::read(&out).unwrap();
    let id = blockvault_store::ChunkId::of(&data[(48 * MIB) as usize..(52 * MIB) as usize]).to_hex();
    let chunk = env.store().join("chunks").join(&id[..4]).join(&id);
    let mut bytes = fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a; // payload: its checksum no longer matches
    fs::write(&chunk, bytes).unwrap();
    rbd_io(&img, json!([["write", 49 * MIB, 8192, 200]]));
    let o = env.run(&["backup", "p"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not load"), "the fallback is not logged: {err}");
    let l = latest(&env, "p");
    assert_eq!(num(&l, "patched_blocks"), 0, "{l}");
    assert_eq!(num(&l, "read_bytes"), 4 * MIB, "block 12 is read whole: {l}");
    restore_equals_snapshot(&env, "p", &img, &l);
    rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
}

/// Issue 9, item 1: a chunk lost from the store must not spread. Backup 1's
/// chunk of a block that never changes again is removed; an incremental on
/// top of backup 1 would inherit the reference unread, and every later
/// backup with it, until a restore fails. The backup checks the parent's
/// chunks first: it warns, marks backup 1 invalid, reads in full (no other
/// valid parent), writes the chunk again, and restores like its snapshot.
#[test]
fn lost_chunk_of_an_unchanged_rbd_block_is_not_inherited() {
    let img = unique("lost");
    rbd_io(&img, json!([["create", 32 * MIB, 0, FEATURES, 0, 0], ["write", 0, 32 * MIB, 9]]));
    let env = rbd_env(&[("l", &img)], "");
    env.ok(&["backup", "l"]);
    let store = blockvault_store::Store::open(&env.store()).unwrap();
    let m = store.read_manifest(blockvault_store::BackupId(1)).unwrap();
    let lost = store.read_blockmap(&m).unwrap().get(5).expect("block 5 holds data");
    fs::remove_file(store.chunk_path(&lost)).unwrap();
    rbd_io(&img, json!([["write", 4096, 8192, 300]])); // block 0 changes, block 5 does not

    let o = env.run(&["backup", "l"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("chunks missing from the store") && err.contains("backup=1"), "not logged: {err}");
    let l = latest(&env, "l");
    assert_eq!(l["full_read"], true, "an invalid parent was used as the base: {l}");
    assert_eq!(l["parent"], Value::Null, "{l}");
    assert!(store.has_chunk(&lost).unwrap(), "the lost chunk of block 5 was not written again");
    restore_equals_snapshot(&env, "l", &img, &l);
    // (backup 1 stays invalid: for an RBD backup only `verify --deep
    // --source` lifts the mark, and its snapshot is demoted by now)
    let v = env.run(&["verify", "l@2", "--deep"]);
    assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
}

/// An object map that lies: every data object rewritten behind librbd's
/// back (`rados put`, no snapshot context, no object map update), so the
/// fast-diff calls them unchanged while their content differs from the
/// parent backup. The trust check's samples (taken from those objects
/// while the exact diff runs) must catch it: a full read, with a warning,
/// that restores as the snapshot reads.
#[test]
fn object_map_that_lies_is_caught_by_the_trust_check() {
    let img = unique("lies");
    rbd_io(&img, json!([["create", 32 * MIB, 0, FEATURES, 0, 0], ["write", 0, 32 * MIB, 11]]));
    let env = rbd_env(&[("l", &img)], "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["backup", "l"]);
    let info: Value = serde_json::from_str(&rbd_cli(&["info", "--format", "json", &format!("{POOL}/{img}")])).unwrap();
    let prefix = info["block_name_prefix"].as_str().unwrap().to_string();
    let junk = env.path("junk");
    let mut r = rng(12);
    for obj in 1..8u64 {
        write_random(&junk, 0, (4 * MIB) as usize, &mut r);
        let o = Command::new("rados")
            .args(["-p", POOL, "put", &format!("{prefix}.{obj:016x}"), junk.to_str().unwrap()])
            .env("CEPH_CONF", ceph_conf())
            .output()
            .unwrap();
        assert!(o.status.success(), "rados put: {}", String::from_utf8_lossy(&o.stderr));
    }
    rbd_io(&img, json!([["write", 0, 65536, 13]])); // a change the diff does report

    let o = env.run(&["backup", "l"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("content differs from the parent backup: falling back to a full read"), "the lie was not caught: {err}");
    let l = latest(&env, "l");
    assert_eq!(l["full_read"], true, "{l}");
    restore_equals_snapshot(&env, "l", &img, &l);
    rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
}

/// The base snapshot deleted by hand: the next backup reads everything,
/// says so, writes only what the store lacks, and restores correctly.
#[test]
fn deleted_base_snapshot_falls_back_to_a_full_read() {
    let img = unique("nobase");
    rbd_io(&img, json!([["create", 64 * MIB, 0, FEATURES, 0, 0], ["write", 0, 20 * MIB, 3]]));
    let env = rbd_env(&[("img", &img)], "");
    env.ok(&["backup", "img"]);
    let first = latest(&env, "img");
    let snap = first["snapshot"].as_str().unwrap();
    rbd_cli(&["snap", "rm", "--no-progress", &format!("{POOL}/{img}@{snap}")]);
    let o = env.run(&["backup", "img"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("falling back to a full read"), "no warning: {err}");
    let l = latest(&env, "img");
    assert_eq!(l["full_read"], true);
    assert_eq!(num(&l, "new_chunks"), 0, "unchanged data was stored again");
    assert_eq!(num(&l, "read_bytes"), 20 * MIB);
    // and the chain continues incrementally from the new snapshot
    rbd_io(&img, json!([["write", 30 * MIB, 100, 4]]));
    env.ok(&["backup", "img"]);
    let l = latest(&env, "img");
    assert_eq!(l["full_read"], false);
    assert_eq!(num(&l, "new_chunks"), 1);
    let snap = l["snapshot"].as_str().unwrap();
    let out = env.restore("img");
    assert_eq!(file_hash(&out), export_hash(&format!("{img}@{snap}")));
    assert_eq!(blockvault_snaps(&img), vec![snap.to_string()]);
}

/// kill -9 at several moments of a backup: the next run removes the orphan
/// snapshot and succeeds.
#[test]
fn kill_during_backup_leaves_no_orphan_snapshot() {
    let img = unique("kill");
    rbd_io(&img, json!([["create", 512 * MIB, 0, FEATURES, 0, 0], ["write", 0, 256 * MIB, 5]]));
    let env = rbd_env(&[("img", &img)], "");
    for (i, delay) in [150u64, 500, 1200, 2500].iter().enumerate() {
        rbd_io(&img, json!([["write", (i as u64) * 8 * MIB, MIB, 10 + i]]));
        let mut child = env.cmd(&["backup", "img"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(*delay));
        let _ = child.kill();
        let _ = child.wait();
        env.ok(&["backup", "img"]);
        let l = latest(&env, "img");
        let snap = l["snapshot"].as_str().unwrap().to_string();
        assert_eq!(blockvault_snaps(&img), vec![snap.clone()], "orphan snapshot after kill at {delay} ms");
        let out = env.restore("img");
        assert_eq!(file_hash(&out), export_hash(&format!("{img}@{snap}")));
        fs::remove_file(out).unwrap();
    }
}

/// Runs blockvault and fails the test if it has not ended after `limit`
/// (a hang, e.g. librados' default 300 s connect timeout).
fn run_bounded(env: &Env, args: &[&str], limit: Duration) -> std::process::Output {
    let mut child = env.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("blockvault {args:?} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn unreachable_cluster_missing_pool_and_image() {
    let img = unique("errs");
    rbd_io(&img, json!([["create", 16 * MIB, 0, FEATURES, 0, 0], ["write", 0, MIB, 6]]));
    let env = rbd_env(&[("img", &img)], "");
    env.ok(&["backup", "img"]);
    let catalog_before = fs::read(env.catalog()).unwrap();
    let list_before = env.ok(&["list", "--json"]);

    // a conf whose monitor nobody listens on, with the real keyring
    let real = fs::read_to_string(ceph_conf()).unwrap();
    let dead = real
        .lines()
        .map(|l| if l.trim_start().starts_with("mon_host") || l.trim_start().starts_with("mon host") { "mon_host = v2:127.0.0.1:9".to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let dead_conf = env.path("dead.conf");
    fs::write(&dead_conf, dead).unwrap();
    let cases = [
        ("dead", format!("rbd:{POOL}/{img}"), format!("[ceph]\nconf = \"{}\"\ntimeout = 5\n", dead_conf.display()), "connecting to the Ceph cluster"),
        ("nopool", format!("rbd:no-such-pool/{img}"), String::new(), "no-such-pool"),
        ("noimage", format!("rbd:{POOL}/no-such-image"), String::new(), "no-such-image"),
    ];
    for (name, src, extra, needle) in cases {
        env.write_config(&[("img", &format!("rbd:{POOL}/{img}")), (name, &src)], "", &extra);
        let o = run_bounded(&env, &["backup", name], Duration::from_secs(120));
        assert!(!o.status.success(), "{name}: backup succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{name}: error does not name it: {err}");
        assert_eq!(list_before, env.ok(&["list", "--json"]), "{name}: catalog changed");
        assert_eq!(catalog_before, fs::read(env.catalog()).unwrap(), "{name}: catalog file changed");
    }
}

#[test]
fn restore_to_rbd() {
    let img = unique("rsrc");
    let target = unique("rdst");
    rbd_io(&img, json!([["create", 40 * MIB + 4096, 0, FEATURES, 0, 0], ["write", 0, 5 * MIB, 7], ["write", 30 * MIB, 3 * MIB, 8]]));
    let env = rbd_env(&[("img", &img)], "");
    env.ok(&["backup", "img"]);
    let snap = latest(&env, "img")["snapshot"].as_str().unwrap().to_string();
    let want = export_hash(&format!("{img}@{snap}"));
    let to = format!("rbd:{POOL}/{target}");
    env.ok(&["restore", "img", "--to", &to]);
    assert_eq!(export_hash(&target), want);
    let info: Value = serde_json::from_str(&rbd_cli(&["info", "--format", "json", &format!("{POOL}/{target}")])).unwrap();
    assert!(info["features"].as_array().unwrap().iter().any(|f| f == "fast-diff"), "{info}");
    // an existing image is refused without --force
    let err = env.fails(&["restore", "img", "--to", &to]);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    // with --force, data written since is overwritten and zero blocks are zeroed
    rbd_io(&target, json!([["write", 20 * MIB, 6 * MIB, 9], ["write", 0, 100, 10]]));
    env.ok(&["restore", "img", "--to", &to, "--force"]);
    assert_eq!(export_hash(&target), want);
    // --sparse-size 1M: the zero MiBs of block 1 (5-8 MiB) are one piece
    // each; written over on the target, they are zeroed again
    rbd_io(&target, json!([["write", 6 * MIB + 512 * 1024, 4096, 11], ["write", 33 * MIB - 4096, 8192, 12]]));
    assert_ne!(export_hash(&target), want);
    env.ok(&["restore", "img", "--to", &to, "--force", "--sparse-size", "1M"]);
    assert_eq!(export_hash(&target), want);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{target}")]);
    // and into a new image, with 64 KiB pieces
    env.ok(&["restore", "img", "--to", &to, "--sparse-size", "64K"]);
    assert_eq!(export_hash(&target), want);
    let err = env.fails(&["restore", "img", "--to", &format!("rbd:{POOL}/{target}-x"), "--sparse-size", "3000"]);
    assert!(err.contains("power of two"), "{err}");
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{target}")]);
}

/// `rbd -c CONF ARGS` on a cluster of the test's own.
fn rbd_on(conf: &Path, args: &[&str]) -> String {
    let o = Command::new("rbd").arg("-c").arg(conf).args(args).output().unwrap();
    assert!(o.status.success(), "rbd {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn signal(sig: &str, pid: u32) {
    let s = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(s.success(), "kill -{sig} {pid} failed");
}

/// Issue 9 item 10: an OSD killed in the middle of a backup with
/// `[ceph] timeout` set. The backup fails with a clear error after the read
/// times out, without then waiting again for the snapshot removal and each
/// image close (it took five timeouts); it leaves its snapshot to the next
/// run, which (the OSD back) breaks the exclusive lock the dead run left
/// (instead of waiting 30 s for its watch to expire), removes that snapshot
/// and succeeds. On a cluster of its
/// own (bluestore, so the OSD restarts with its data), since it kills the OSD.
#[test]
fn osd_killed_mid_backup_fails_once_and_the_next_run_removes_its_snapshot() {
    let cluster = blockvault_tests::TestCluster::start(
        "osdkill",
        &[("BV_CEPH_BACKEND", "bluestore"), ("BV_CEPH_OSD_GB", "4"), ("BV_CEPH_MGR", "0")],
    );
    let conf = cluster.conf.clone();
    let img = unique("osdkill");
    let spec = format!("{POOL}/{img}");
    rbd_on(&conf, &["create", "--size", "512M", &spec]);
    rbd_on(&conf, &["bench", "--io-type", "write", "--io-size", "4M", "--io-total", "256M", "--io-pattern", "seq", &spec]);
    let env = Env::new(&[], "");
    let extra = format!("[ceph]\nconf = \"{}\"\ntimeout = 10\n", conf.display());
    env.write_config(&[("v", &format!("rbd:{spec}"))], "", &extra);
    env.ok(&["init"]);

    // Stop the backup once its plan is made (its snapshot exists, the reads
    // start), kill the OSD, let the backup go on.
    let mut child = env.cmd(&["backup", "v"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut err = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err.push_str(&line);
        err.push('\n');
        if line.contains("plan ready") {
            signal("STOP", child.id());
            break;
        }
    }
    assert!(err.contains("plan ready"), "the backup ended before its plan: {err}");
    let osd = cluster.daemon_pid("osd.0").expect("osd.0 pid file");
    signal("KILL", osd);
    while Path::new(&format!("/proc/{osd}/stat")).exists() {
        let stat = fs::read_to_string(format!("/proc/{osd}/stat")).unwrap_or_default();
        if stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal("CONT", child.id());
    for line in lines {
        err.push_str(&line.unwrap());
        err.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the backup succeeded without its OSD: {err}");
    assert_eq!(status.code(), Some(1), "not a clean failure: {status}\n{err}");
    assert!(err.contains(&format!("rbd read {spec}@blockvault-")), "the error does not name the read: {err}");
    assert!(err.contains("Connection timed out (errno 110); the cluster did not answer in time"), "{err}");
    assert!(err.contains("leaving the snapshot of this failed backup for the next run"), "{err}");
    assert!(!err.contains("could not remove the snapshot"), "it waited for the snapshot removal: {err}");
    assert!(env.list().is_empty(), "a backup was committed");

    // the OSD back: the next run removes the leftover snapshot and succeeds
    let s = Command::new("ceph-osd").arg("-c").arg(&conf)        .args(["-i", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(s.success(), "ceph-osd did not restart");
    let mut tries = 0;
    while !Command::new("timeout")
        .args(["10", "rbd", "-c"])
        .arg(&conf)
        .args(["snap", "ls", &spec])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        tries += 1;
        assert!(tries < 60, "the restarted OSD does not serve {spec}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let left: Vec<Value> = serde_json::from_str(&rbd_on(&conf, &["snap", "ls", "--format", "json", &spec])).unwrap();
    assert_eq!(left.len(), 1, "the failed run's snapshot should be left: {left:?}");
    let o = env.run(&["backup", "v"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "the next backup failed: {err}");
    // the failed run left the image's exclusive lock held by its client;
    // that process is dead, so the lock is broken instead of waited for
    assert!(err.contains("broke the exclusive lock left by a blockvault run that is dead"), "{err}");
    assert!(err.contains("removing the snapshot of an interrupted or failed backup"), "{err}");
    let l = latest(&env, "v");
    let snap = l["snapshot"].as_str().unwrap().to_string();
    let now: Vec<Value> = serde_json::from_str(&rbd_on(&conf, &["snap", "ls", "--format", "json", &spec])).unwrap();
    let names: Vec<&str> = now.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, [snap.as_str()], "the leftover snapshot was not removed");
    let out = env.restore("v");
    let sh = format!("rbd -c {} export --no-progress {spec}@{snap} - | sha256sum", conf.display());
    let o = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
    assert!(o.status.success(), "{sh}");
    let want = String::from_utf8(o.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    assert_eq!(file_hash(&out), want, "restore differs from the snapshot");
    drop(cluster);
}

/// Issue 9 item 14: librados printed a malformed keyring's key value to
/// stderr. The key must never reach blockvault's output, and the error must
/// say which keyring is malformed.
#[test]
fn malformed_keyring_is_named_and_its_key_never_printed() {
    let env = rbd_env(&[], "");
    let secret = "s3cretK3yMaterialNotBase64!!";
    let keyring = env.path("bad.keyring");
    fs::write(&keyring, format!("[client.admin]\n\tkey = {secret}\n")).unwrap();
    let extra = format!("[ceph]\nconf = \"{}\"\nkeyring = \"{}\"\ntimeout = 10\n", ceph_conf(), keyring.display());
    env.write_config(&[("k", &format!("rbd:{POOL}/{}", unique("kr")))], "", &extra);
    let o = env.run(&["backup", "k"]);
    assert!(!o.status.success(), "backup succeeded with a malformed keyring");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!out.contains(secret) && !out.contains("s3cretK3y"), "the key was printed: {out}");
    assert!(out.contains(&format!("the keyring {} is malformed", keyring.display())), "{out}");
    assert!(out.contains("[client.admin]"), "{out}");
}
