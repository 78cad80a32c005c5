//! `export-diff`, `import-diff` and `restore --clone` against a real
//! throwaway cluster (issue 12, items 3 and 4), checked with Ceph's own
//! tools: `rbd import-diff` applies what blockvault exports, blockvault
//! imports what `rbd export-diff` writes, and `rbd info` / `rbd export`
//! judge the clones. Small images (32 MiB, 64 KiB blocks): about a minute.

use std::fs;
use std::io::Write;
use std::process::Stdio;

use serde_json::{json, Value};

use crate::common::*;
use crate::rbd::{ceph_conf, export_hash, file_hash, rbd_cli, rbd_io, rbd_run, unique, POOL};

/// layering, exclusive-lock, object-map, fast-diff, deep-flatten
const FEATURES: u64 = 1 | 4 | 8 | 16 | 32;
const MIB: u64 = 1 << 20;
const SMALL_BLOCKS: &str = "[defaults]\nblock-size = \"64K\"\n";

fn env_with(images: &[(&str, String)]) -> Env {
    ceph_conf();
    let env = Env::new(&[], "");
    let refs: Vec<(&str, &str)> = images.iter().map(|(n, s)| (*n, s.as_str())).collect();
    env.write_config(&refs, "", SMALL_BLOCKS);
    env.ok(&["init"]);
    env
}

fn backups_of(env: &Env, image: &str) -> Vec<Value> {
    env.list().into_iter().filter(|b| b["image"] == image).collect()
}

/// Writes across blocks and objects, a partial-block write, a discard of a
/// whole object and one of part of a block, and zeros written over data.
fn change(img: &str, seed: u64) {
    rbd_io(
        img,
        json!([
            ["write", 3 * MIB + 1000, 300_000, seed],
            ["write", 9 * MIB - 4096, 8192, seed + 1],
            ["write", 17 * MIB + 12_345, 100, seed + 2],
            ["discard", 4 * MIB, 4 * MIB],
            ["discard", 20 * MIB + 70_000, 30_000],
            ["fill", 22 * MIB, 65536, 0],
        ]),
    );
}

/// `rbd import-diff` applies `blockvault export-diff B --from A` to an image
/// restored at A (given A's snapshot), giving B's snapshot exactly; the
/// `--from none` stream builds B on an empty image; a v2 stream is refused
/// by stock `rbd import-diff` (it reads v1 only) and read by blockvault.
#[test]
fn rbd_import_diff_replays_blockvault_export_diff() {
    let img = unique("ed-src");
    let env = env_with(&[("vm", format!("rbd:{POOL}/{img}"))]);
    rbd_io(&img, json!([["create", 32 * MIB, 0, FEATURES, 0, 0], ["write", 0, 10 * MIB, 1], ["write", 20 * MIB, 3 * MIB, 2]]));
    env.ok(&["backup", "vm"]);
    change(&img, 10);
    env.ok(&["backup", "vm"]);
    let b = backups_of(&env, "vm");
    let (a_id, b_id) = (num(&b[0], "id").to_string(), num(&b[1], "id").to_string());
    let (a_snap, b_snap) = (b[0]["snapshot"].as_str().unwrap().to_string(), b[1]["snapshot"].as_str().unwrap().to_string());
    let want = export_hash(&format!("{img}@{b_snap}"));

    // the replica: backup A restored, with A's snapshot name, then the stream
    let copy = unique("ed-copy");
    env.ok(&["restore", &format!("vm@{a_id}"), "--to", &format!("rbd:{POOL}/{copy}")]);
    rbd_cli(&["snap", "create", &format!("{POOL}/{copy}@{a_snap}")]);
    let diff = env.path("a-to-b.diff");
    env.ok(&["export-diff", &format!("vm@{b_id}"), "--from", &a_id, "-o", diff.to_str().unwrap()]);
    assert!(fs::read(&diff).unwrap().starts_with(b"rbd diff v1\n"));
    // the default --from is the parent: the same stream
    let dflt = env.path("default.diff");
    env.ok(&["export-diff", &format!("vm@{b_id}"), "-o", dflt.to_str().unwrap()]);
    assert_eq!(file_hash(&diff), file_hash(&dflt));
    // only what changed: far less than the image
    let len = fs::metadata(&diff).unwrap().len();
    assert!(len < 4 * MIB, "the A-to-B stream is {len} bytes");
    rbd_cli(&["import-diff", "--no-progress", diff.to_str().unwrap(), &format!("{POOL}/{copy}")]);
    assert_eq!(export_hash(&copy), want, "rbd import-diff of blockvault's stream does not give backup B's snapshot");
    // import-diff named the new snapshot after B's
    let snaps = rbd_cli(&["snap", "ls", &format!("{POOL}/{copy}")]);
    assert!(snaps.contains(&b_snap), "{snaps}");

    // a stream from A's snapshot is refused by rbd where that snapshot is missing
    let other = unique("ed-other");
    rbd_cli(&["create", "--size", "1M", &format!("{POOL}/{other}")]);
    assert!(!rbd_run(&["import-diff", "--no-progress", diff.to_str().unwrap(), &format!("{POOL}/{other}")]).status.success());

    // --from none onto an empty image
    let full = env.path("full.diff");
    env.ok(&["export-diff", &format!("vm@{b_id}"), "--from", "none", "-o", full.to_str().unwrap()]);
    let fresh = unique("ed-fresh");
    rbd_cli(&["create", "--size", "1M", &format!("{POOL}/{fresh}")]);
    rbd_cli(&["import-diff", "--no-progress", full.to_str().unwrap(), &format!("{POOL}/{fresh}")]);
    assert_eq!(export_hash(&fresh), want);

    // to standard output, v2: stock rbd import-diff reads only v1
    let o = env.cmd(&["export-diff", &format!("vm@{b_id}"), "--format", "2"]).output().unwrap();
    assert!(o.status.success());
    assert!(o.stdout.starts_with(b"rbd diff v2\n"));
    let v2 = env.path("b.v2");
    fs::write(&v2, &o.stdout).unwrap();
    let fresh2 = unique("ed-fresh2");
    rbd_cli(&["create", "--size", "1M", &format!("{POOL}/{fresh2}")]);
    let r = rbd_run(&["import-diff", "--no-progress", v2.to_str().unwrap(), &format!("{POOL}/{fresh2}")]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("banner"), "rbd import-diff took a v2 stream");
}

/// `blockvault import-diff` of `rbd export-diff` streams (v1), a full one
/// then an incremental from stdin, gives backups that restore identical to
/// the snapshots; blockvault's own v2 stream imports too; a truncated or
/// corrupted stream, or one from another snapshot, is refused with nothing
/// committed.
#[test]
fn import_diff_of_rbd_export_diff_streams() {
    let src = unique("id-src");
    let env = env_with(&[("imp", format!("rbd:{POOL}/{src}")), ("imp2", format!("rbd:{POOL}/{src}"))]);
    rbd_io(&src, json!([["create", 32 * MIB, 0, FEATURES, 0, 0], ["write", 0, 10 * MIB, 3], ["write", 20 * MIB, 3 * MIB, 4], ["snap", "s1"]]));
    change(&src, 20);
    rbd_io(&src, json!([["snap", "s2"]]));
    let full = env.path("s1.full");
    let inc = env.path("s1-s2.inc");
    rbd_cli(&["export-diff", "--no-progress", &format!("{POOL}/{src}@s1"), full.to_str().unwrap()]);
    rbd_cli(&["export-diff", "--no-progress", "--from-snap", "s1", &format!("{POOL}/{src}@s2"), inc.to_str().unwrap()]);
    assert!(fs::read(&inc).unwrap().starts_with(b"rbd diff v1\n"));

    // an incremental with no backup to apply it to
    let e = env.fails(&["import-diff", "imp", inc.to_str().unwrap()]);
    assert!(e.contains("no valid backup"), "{e}");
    assert!(backups_of(&env, "imp").is_empty());

    env.ok(&["import-diff", "imp", full.to_str().unwrap()]);
    let b = backups_of(&env, "imp");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0]["snapshot"], "s1");
    assert_eq!(file_hash(&env.restore(&format!("imp@{}", num(&b[0], "id")))), export_hash(&format!("{src}@s1")));

    // truncated, and corrupted (a record tag), streams: refused, nothing committed
    let bytes = fs::read(&inc).unwrap();
    let cut = env.path("cut.inc");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = env.fails(&["import-diff", "imp", cut.to_str().unwrap()]);
    assert!(e.contains("truncated"), "{e}");
    let bad = env.path("bad.inc");
    let mut b2 = bytes.clone();
    // the first record after the banner is 'f': make it an unknown tag
    assert_eq!(b2[12], b'f');
    b2[12] = b'X';
    fs::write(&bad, &b2).unwrap();
    let e = env.fails(&["import-diff", "imp", bad.to_str().unwrap()]);
    assert!(e.contains("unknown record tag"), "{e}");
    let mut b3 = bytes.clone();
    b3.push(b'w');
    fs::write(&bad, &b3).unwrap();
    let e = env.fails(&["import-diff", "imp", bad.to_str().unwrap()]);
    assert!(e.contains("follow the end record"), "{e}");
    assert_eq!(backups_of(&env, "imp").len(), 1, "a refused stream committed a backup");

    // the incremental, from standard input
    let mut child = env.cmd(&["import-diff", "imp", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = backups_of(&env, "imp");
    assert_eq!(b.len(), 2);
    assert_eq!(b[1]["snapshot"], "s2");
    // only the changed blocks were stored anew; the rest came from backup 1
    assert!(num(&b[1], "inherited_blocks") > 300, "{}", b[1]);
    let s2 = export_hash(&format!("{src}@s2"));
    assert_eq!(file_hash(&env.restore(&format!("imp@{}", num(&b[1], "id")))), s2);

    // the same stream again starts from s1, not the latest backup's s2
    let e = env.fails(&["import-diff", "imp", inc.to_str().unwrap()]);
    assert!(e.contains("'s1'") && e.contains("'s2'") && e.contains("--force"), "{e}");
    assert_eq!(backups_of(&env, "imp").len(), 2);

    // blockvault's v2 stream of the same change, into a second image
    let v2 = env.path("s1-s2.v2");
    env.ok(&["export-diff", &format!("imp@{}", num(&b[1], "id")), "--format", "2", "-o", v2.to_str().unwrap()]);
    assert!(fs::read(&v2).unwrap().starts_with(b"rbd diff v2\n"));
    env.ok(&["import-diff", "imp2", full.to_str().unwrap()]);
    env.ok(&["import-diff", "imp2", v2.to_str().unwrap()]);
    let c = backups_of(&env, "imp2");
    assert_eq!(c.len(), 2);
    assert_eq!(file_hash(&env.restore(&format!("imp2@{}", num(&c[1], "id")))), s2);
    env.ok(&["verify", "imp2", "--deep"]);
}

/// `restore --clone` while the backup's snapshot exists: a clone with that
/// snapshot as parent and the same content; `--flatten` detaches it; once
/// the snapshot is demoted, a clear message, and `--clone=auto` restores
/// from the store.
#[test]
fn restore_by_clone() {
    let img = unique("cl-src");
    let env = env_with(&[("vm", format!("rbd:{POOL}/{img}"))]);
    rbd_io(&img, json!([["create", 32 * MIB, 0, FEATURES, 0, 0], ["write", 0, 6 * MIB, 5], ["write", 25 * MIB, MIB, 6]]));
    env.ok(&["backup", "vm"]);
    let b1 = backups_of(&env, "vm").remove(0);
    let (id1, snap1) = (num(&b1, "id").to_string(), b1["snapshot"].as_str().unwrap().to_string());
    let want = export_hash(&format!("{img}@{snap1}"));

    let c1 = unique("cl-a");
    let out = env.ok(&["restore", &format!("vm@{id1}"), "--to", &format!("rbd:{POOL}/{c1}"), "--clone"]);
    assert!(out.contains("cloned"), "{out}");
    let info: Value = serde_json::from_str(&rbd_cli(&["info", "--format", "json", &format!("{POOL}/{c1}")])).unwrap();
    assert_eq!(info["parent"]["image"], img.as_str(), "{info}");
    assert_eq!(info["parent"]["snapshot"], snap1.as_str(), "{info}");
    assert_eq!(export_hash(&c1), want);
    // a clone is always a new image
    let e = env.fails(&["restore", &format!("vm@{id1}"), "--to", &format!("rbd:{POOL}/{c1}"), "--clone"]);
    assert!(e.contains("already exists"), "{e}");

    let c2 = unique("cl-b");
    env.ok(&["restore", &format!("vm@{id1}"), "--to", &format!("rbd:{POOL}/{c2}"), "--clone", "--flatten"]);
    let info: Value = serde_json::from_str(&rbd_cli(&["info", "--format", "json", &format!("{POOL}/{c2}")])).unwrap();
    assert!(info.get("parent").is_none(), "flattened clone still has a parent: {info}");
    assert_eq!(export_hash(&c2), want);

    // backups go on while a clone hangs off blockvault's snapshot
    change(&img, 30);
    env.ok(&["backup", "vm"]);
    // once the clones are gone, the next backup demotes the old snapshot
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{c1}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{c2}")]);
    change(&img, 40);
    env.ok(&["backup", "vm"]);
    let snaps = rbd_cli(&["snap", "ls", &format!("{POOL}/{img}")]);
    assert!(!snaps.contains(&snap1), "{snap1} was not demoted: {snaps}");

    let c3 = unique("cl-c");
    let e = env.fails(&["restore", &format!("vm@{id1}"), "--to", &format!("rbd:{POOL}/{c3}"), "--clone"]);
    assert!(e.contains("is gone") && e.contains(&snap1) && e.contains("--clone=auto"), "{e}");
    assert!(!rbd_cli(&["ls", POOL]).lines().any(|l| l == c3), "a failed clone left an image");
    env.ok(&["restore", &format!("vm@{id1}"), "--to", &format!("rbd:{POOL}/{c3}"), "--clone=auto"]);
    let info: Value = serde_json::from_str(&rbd_cli(&["info", "--format", "json", &format!("{POOL}/{c3}")])).unwrap();
    assert!(info.get("parent").is_none(), "{info}");
    assert_eq!(export_hash(&c3), want);
    // --clone needs an RBD target
    let e = env.fails(&["restore", &format!("vm@{id1}"), "--to", env.path("x.img").to_str().unwrap(), "--clone"]);
    assert!(e.contains("--clone needs an rbd:"), "{e}");
}
