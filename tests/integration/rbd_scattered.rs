//! Issue 13: a continuous diff whose writes are scattered small extents
//! (4 KiB to 64 KiB, unaligned) over fully written images, one at the
//! default 4 MiB blocks (partly changed blocks patched from the parent) and
//! one at 64 KiB blocks (indexed block maps, format version 2). After each
//! round a backup of both; every backup restored and compared with `rbd
//! export` of its snapshot; the last ones also restored to RBD and to qcow2;
//! `verify --deep` and a `gc` in between change nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;

use rand::Rng;
use serde_json::{json, Value};

use crate::common::*;
use crate::rbd::{export_hash, file_hash, latest, rbd_cli, rbd_env, rbd_io, unique, FEATURES, MIB, POOL};

const ROUNDS: u64 = 8;
const WRITES_PER_ROUND: usize = 40;
const SMALL: u64 = 65536;

#[test]
fn continuous_diff_with_scattered_small_writes() {
    let size = 64 * MIB;
    let (a, b) = (unique("scat-4m"), unique("scat-64k"));
    for (img, seed) in [(&a, 1), (&b, 2)] {
        rbd_io(img, json!([["create", size, 0, FEATURES, 0, 0], ["write", 0, size, seed]]));
    }
    let env = rbd_env(&[("a", &a), ("b", &b)], "[defaults]\nkeep-snapshots = 1\n");
    let cfg = fs::read_to_string(&env.config).unwrap();
    let with_bs = format!("source = \"rbd:{POOL}/{b}\"\nblock-size = \"64K\"");
    fs::write(&env.config, cfg.replacen(&format!("source = \"rbd:{POOL}/{b}\""), &with_bs, 1)).unwrap();
    env.ok(&["backup", "a", "b"]);

    let mut r = rng(13);
    let mut expected: BTreeMap<u64, (String, String)> = BTreeMap::new();
    for name in ["a", "b"] {
        let l = latest(&env, name);
        let img = if name == "a" { &a } else { &b };
        expected.insert(num(&l, "id"), (name.into(), export_hash(&format!("{img}@{}", l["snapshot"].as_str().unwrap()))));
    }
    for round in 1..=ROUNDS {
        let mut touched_small = BTreeSet::new();
        let mut written = 0;
        let mut ops = Vec::new();
        for i in 0..WRITES_PER_ROUND {
            let len = r.gen_range(4096..=SMALL);
            let off = r.gen_range(0..size - len);
            ops.push(json!(["write", off, len, round * 1000 + i as u64]));
            written += len;
            touched_small.extend(off / SMALL..(off + len).div_ceil(SMALL));
        }
        if round % 5 == 0 {
            let off = r.gen_range(0..size / SMALL) * SMALL;
            ops.push(json!(["discard", off, SMALL]));
            touched_small.insert(off / SMALL);
        }
        rbd_io(&a, json!(ops));
        rbd_io(&b, json!(ops));
        env.ok(&["backup", "a", "b"]);
        for (name, img) in [("a", &a), ("b", &b)] {
            let l = latest(&env, name);
            assert_eq!(l["full_read"], false, "round {round}: {name} fell back to a full read: {l}");
            let read = num(&l, "read_bytes");
            assert!(read >= written.min(size) / 2, "round {round}: {name} read {read} bytes for {written} written: {l}");
            if name == "b" {
                // 64 KiB blocks: what is read and stored follows the touched blocks
                let bound = touched_small.len() as u64 * SMALL;
                assert!(read <= bound, "round {round}: b read {read} bytes, {bound} in touched blocks: {l}");
                assert!(num(&l, "new_plain_bytes") <= bound, "round {round}: b stored more than the touched blocks: {l}");
            } else {
                assert!(num(&l, "patched_blocks") > 0, "round {round}: no block of a was patched: {l}");
            }
            let snap = l["snapshot"].as_str().unwrap();
            expected.insert(num(&l, "id"), (name.into(), export_hash(&format!("{img}@{snap}"))));
        }
        if round == ROUNDS / 2 {
            env.ok(&["verify", "--deep"]);
            env.ok(&["gc"]);
        }
    }
    assert_eq!(expected.len(), 2 * (ROUNDS as usize + 1));
    for (id, (name, hash)) in &expected {
        let out = env.restore(&format!("{name}@{id}"));
        assert_eq!(&file_hash(&out), hash, "backup {id} of {name} differs from its snapshot");
        fs::remove_file(out).unwrap();
    }
    env.ok(&["verify", "--deep"]);

    // the last backup of b, to RBD and to qcow2
    let l = latest(&env, "b");
    let (id, want) = (num(&l, "id"), expected[&num(&l, "id")].1.clone());
    let back = unique("scat-back");
    env.ok(&["restore", &format!("b@{id}"), "--to", &format!("rbd:{POOL}/{back}")]);
    assert_eq!(export_hash(&back), want, "restore to RBD differs");
    let q = env.path("b.qcow2");
    env.ok(&["restore", &format!("b@{id}"), "--to", &format!("qcow2:{}", q.display())]);
    let raw = env.path("b.raw");
    let o = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&q).arg(&raw).output().unwrap();
    assert!(o.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(file_hash(&raw), want, "restore to qcow2 differs");
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(&q);

    let v: Vec<Value> = env.list();
    assert!(v.iter().all(|b| b["valid"] == true), "{v:?}");
    for img in [&a, &b] {
        rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
        rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
    }
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{back}")]);
}
