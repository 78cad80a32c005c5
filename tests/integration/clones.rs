//! Clones on a real cluster: a clone backs up its full content (the
//! parent's data included); a fixed snapshot is a source of its own,
//! backed up once; the first backup of a clone of a snapshot the store
//! holds reads and stores about what the clone wrote, and inherits the rest
//! from that snapshot's backup. Every restore is compared with `rbd export`.

use std::fs;

use serde_json::{json, Value};

use crate::common::*;
use crate::rbd::{export_hash, file_hash, rbd_cli, rbd_io, unique, FEATURES, MIB, POOL};

const OBJECT: u64 = 4 * MIB;

/// A golden image with data over most of it, and its protected snapshot.
fn golden(size: u64, data: u64) -> String {
    let g = unique("golden");
    rbd_io(&g, json!([["create", size, 0, FEATURES, 0, 0], ["write", 0, data, 7], ["fill", data, MIB, 0x5a]]));
    rbd_cli(&["snap", "create", &format!("{POOL}/{g}@gold")]);
    rbd_cli(&["snap", "protect", &format!("{POOL}/{g}@gold")]);
    g
}

fn clone_of(g: &str) -> String {
    let c = unique("clone");
    rbd_cli(&["clone", &format!("{POOL}/{g}@gold"), &format!("{POOL}/{c}")]);
    c
}

fn store_bytes(env: &Env) -> u64 {
    env.chunk_files().iter().map(|p| fs::metadata(p).unwrap().len()).sum()
}

fn config_with(env: &Env, images: &[(String, String)]) {
    let refs: Vec<(&str, &str)> = images.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    env.write_config(&refs, "", "");
}

/// Restores `b` and compares it with `rbd export` of its snapshot of `img`.
fn restores_as_exported(env: &Env, b: &Value, img: &str) {
    let out = env.restore(&format!("{}@{}", b["image"].as_str().unwrap(), num(b, "id")));
    let snap = b["snapshot"].as_str().unwrap();
    assert_eq!(file_hash(&out), export_hash(&format!("{img}@{snap}")), "backup {b} differs from rbd export of {img}@{snap}");
    fs::remove_file(out).unwrap();
}

#[test]
fn a_clone_backs_up_its_full_content_and_a_fixed_snapshot_is_backed_up_once() {
    let g = golden(32 * MIB, 20 * MIB);
    let c = clone_of(&g);
    rbd_io(&c, json!([["write", 5 * MIB + 100, 70_000, 11], ["discard", 8 * MIB, OBJECT]]));
    let env = Env::new(&[], "");
    config_with(&env, &[("c".into(), format!("rbd:{POOL}/{c}"))]);
    env.ok(&["init"]);
    // the store does not hold the parent snapshot: a full read, parent data included
    env.ok(&["backup", "c"]);
    let b = env.list().pop().unwrap();
    assert_eq!(b["full_read"], true);
    assert!(num(&b, "read_bytes") >= 16 * MIB, "the parent's data is read through the clone: {b}");
    restores_as_exported(&env, &b, &c);

    // a fixed snapshot as the source: no snapshot created, backed up once
    config_with(&env, &[("c".into(), format!("rbd:{POOL}/{c}")), ("gold".into(), format!("rbd:{POOL}/{g}@gold"))]);
    let snaps = rbd_cli(&["snap", "ls", &format!("{POOL}/{g}")]);
    env.ok(&["backup", "gold"]);
    env.ok(&["backup", "gold"]);
    let gold: Vec<Value> = env.list().into_iter().filter(|b| b["image"] == "gold").collect();
    assert_eq!(gold.len(), 1, "a fixed snapshot is backed up once: {gold:?}");
    assert_eq!(gold[0]["snapshot"], "gold");
    assert_eq!(rbd_cli(&["snap", "ls", &format!("{POOL}/{g}")]), snaps, "no snapshot created or removed on the golden image");
    restores_as_exported(&env, &gold[0], &g);
}

/// 20 clones of one golden snapshot whose backup the store holds, each
/// with its own writes (a whole object, a small write into an object of
/// parent data, for some a discard of a whole object of parent data): the
/// first backup of each reads and stores about its own writes, and every
/// clone restores to its full content.
#[test]
fn clones_of_a_held_snapshot_read_and_store_only_their_own_writes() {
    const CLONES: usize = 20;
    const SIZE: u64 = 256 * MIB;
    let g = golden(SIZE, 192 * MIB);
    let env = Env::new(&[], "");
    let mut images = vec![("gold".to_string(), format!("rbd:{POOL}/{g}@gold"))];
    config_with(&env, &images);
    env.ok(&["init"]);
    env.ok(&["backup", "gold"]);
    let gold = env.list().pop().unwrap();
    assert!(num(&gold, "new_bytes") >= 150 * MIB, "{gold}");

    let clones: Vec<String> = (0..CLONES).map(|_| clone_of(&g)).collect();
    for (i, c) in clones.iter().enumerate() {
        let i = i as u64;
        let mut ops = vec![
            // a whole object of its own, over parent data
            json!(["write", (2 + i) * OBJECT, OBJECT, 100 + i]),
            // a small write into an object of parent data (copy-up)
            json!(["write", (30 + i) * OBJECT + 12_345, 65_536, 200 + i]),
        ];
        if i % 2 == 0 {
            // a whole object of parent data discarded: must read as zeros, not the parent's
            ops.push(json!(["discard", (24 + i) * OBJECT, OBJECT]));
        }
        if i % 3 == 0 {
            // zeros written over parent data, and a write past the parent's data
            ops.push(json!(["fill", 40 * OBJECT + 4096, 8192, 0]));
            ops.push(json!(["write", 60 * OBJECT + 777, 3000, 300 + i]));
        }
        rbd_io(c, json!(ops));
        images.push((format!("clone{i}"), format!("rbd:{POOL}/{c}")));
    }
    config_with(&env, &images);
    let before = store_bytes(&env);
    let names: Vec<String> = (0..CLONES).map(|i| format!("clone{i}")).collect();
    let mut args = vec!["backup".to_string()];
    args.extend(names.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&refs);
    let growth = store_bytes(&env) - before;
    let list = env.list();
    let mut read_total = 0;
    let mut new_total = 0;
    let mut objects_total = 0;
    for (i, c) in clones.iter().enumerate() {
        let b = list.iter().find(|b| b["image"] == format!("clone{i}").as_str()).unwrap();
        assert_eq!(b["full_read"], false, "clone{i} inherits from the golden snapshot's backup: {b}");
        assert_eq!(num(b, "parent"), num(&gold, "id"), "clone{i}: {b}");
        // at most the objects it has: the whole-object write, the copied-up
        // object, the discarded one, two more for every third clone
        let objects = 2 + u64::from(i % 2 == 0) + 2 * u64::from(i % 3 == 0);
        assert!(num(b, "read_bytes") <= objects * OBJECT, "clone{i} read {}: {b}", num(b, "read_bytes"));
        assert!(num(b, "inherited_blocks") >= SIZE / OBJECT - objects, "clone{i}: {b}");
        objects_total += objects;
        read_total += num(b, "read_bytes");
        new_total += num(b, "new_bytes");
        restores_as_exported(&env, b, c);
    }
    let image_total = CLONES as u64 * SIZE;
    println!("clones' first backups: read {read_total} bytes, stored {new_total} bytes (store grew {growth}), of {image_total} bytes of images");
    // own writes, at object (= block) granularity: a copied-up object is a
    // new block of parent data and the clone's bytes
    assert!(read_total <= objects_total * OBJECT, "{read_total}");
    assert!(growth <= objects_total * OBJECT + CLONES as u64 * MIB, "store grew {growth} bytes for {CLONES} clones");
    assert!(growth * 10 < image_total, "store grew {growth} bytes for {image_total} bytes of clones");
    assert!(growth >= CLONES as u64 * 4 * MIB, "each clone's own whole object is stored: {growth}");

    // the next backup of a clone is an incremental of its own
    rbd_io(&clones[0], json!([["write", 3 * MIB, 5000, 999]]));
    env.ok(&["backup", "clone0"]);
    let b = env.list().into_iter().filter(|b| b["image"] == "clone0").last().unwrap();
    assert_eq!(b["full_read"], false);
    assert!(num(&b, "read_bytes") <= OBJECT, "{b}");
    restores_as_exported(&env, &b, &clones[0]);
}
