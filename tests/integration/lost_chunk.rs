//! A chunk lost from the store must not spread into new backups (issue 9,
//! item 1).
//!
//! The bug: a read block whose hash was in the parent's block map was taken
//! as "the store has it" without looking, so after a chunk was lost (a bad
//! disk sector, a hand-removed file, verify moving a corrupt one aside with
//! the catalog rebuilt since) the next backup, with the data in hand, wrote
//! nothing ("0 new chunks", exit 0) and every later backup inherited the
//! reference to the missing chunk until a restore failed. Now every distinct
//! chunk id of the parent is checked before the parent is used: a parent
//! with a missing chunk is marked invalid and the next valid backup (or
//! none: a full read) is the base, and a block read is written when the
//! store lacks its chunk.

use std::fs;
use std::path::Path;

use blockvault_store::{BackupId, ChunkId, Store};
use serde_json::Value;

use crate::common::*;

const BS: usize = 64 << 10;
const DEFAULTS: &str = "[defaults]\nblock-size = \"64K\"\n";

fn chunks_of(env: &Env, id: u64) -> Vec<ChunkId> {
    let s = Store::open(&env.store()).unwrap();
    let m = s.read_manifest(BackupId(id)).unwrap();
    s.read_blockmap(&m).unwrap().block_chunk_ids().copied().collect()
}

fn chunk_path(env: &Env, id: &ChunkId) -> std::path::PathBuf {
    Store::open(&env.store()).unwrap().chunk_path(id)
}

fn backup_row(env: &Env, id: u64) -> Value {
    env.list().into_iter().find(|b| num(b, "id") == id).unwrap_or_else(|| panic!("backup {id} not listed"))
}

/// An image of 16 random blocks, a zero hole, and 4 more random blocks.
fn make_image(p: &Path, seed: u64) {
    let mut r = rng(seed);
    write_random(p, 0, 16 * BS, &mut r);
    write_random(p, 20 * BS as u64, 4 * BS, &mut r);
}

/// Remove one chunk of a backup, back up the unchanged image: the backup
/// writes the chunk again, `verify --deep` is clean, and both the new and
/// the old backup restore bit-identically.
#[test]
fn lost_chunk_is_rewritten_by_next_backup() {
    let env = Env::new(&[], "");
    let img = env.path("disk.img");
    make_image(&img, 91);
    env.write_config(&[("disk", &format!("file:{}", img.display()))], "", DEFAULTS);
    env.ok(&["init"]);
    env.ok(&["backup", "disk"]);

    let lost = chunks_of(&env, 1)[5];
    let lost_path = chunk_path(&env, &lost);
    fs::remove_file(&lost_path).unwrap();

    let o = env.run(&["backup", "disk"]);
    assert!(o.status.success(), "backup failed: {}", String::from_utf8_lossy(&o.stderr));
    let b2 = backup_row(&env, 2);
    assert_eq!(num(&b2, "new_chunks"), 1, "the backup must write the lost chunk again: {b2}");
    assert!(lost_path.exists(), "chunk {lost} is still missing from the store after a backup that read its data");
    assert!(chunks_of(&env, 2).contains(&lost));

    let v = env.run(&["verify", "--deep"]);
    assert!(
        v.status.success(),
        "verify --deep after the healing backup is not clean:\n{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert_same(&env.restore("disk@2"), &img);
    assert_same(&env.restore("disk@1"), &img);
}

/// The index chunk of a (format 3) block map lost: verify names it and
/// marks the backup invalid, the next backup is a full read that writes
/// the index chunk again (the same blocks give the same index), and then
/// the old backup restores bit-identically and verifies clean.
#[test]
fn lost_index_chunk_is_named_by_verify_and_rewritten_by_next_backup() {
    let env = Env::new(&[], "");
    let img = env.path("disk.img");
    make_image(&img, 94);
    env.write_config(&[("disk", &format!("file:{}", img.display()))], "", DEFAULTS);
    env.ok(&["init"]);
    env.ok(&["backup", "disk"]);
    let index: Vec<ChunkId> = {
        let s = Store::open(&env.store()).unwrap();
        let m = s.read_manifest(BackupId(1)).unwrap();
        s.read_blockmap(&m).unwrap().index_chunks().to_vec()
    };
    assert_eq!(index.len(), 1, "24 blocks of 64 KiB: one index chunk");
    let lost_path = chunk_path(&env, &index[0]);
    fs::remove_file(&lost_path).unwrap();

    let v = env.run(&["verify"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "verify passed with an index chunk missing: {out}");
    assert!(out.contains(&index[0].to_hex().to_string()) && out.contains("missing"), "verify does not name the index chunk: {out}");
    assert_eq!(backup_row(&env, 1)["valid"], false);

    env.ok(&["backup", "disk"]);
    let b2 = backup_row(&env, 2);
    assert!(b2["parent"].is_null(), "an unreadable backup was a base: {b2}");
    assert!(lost_path.exists(), "the next backup did not write the index chunk again");
    let v = env.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep after the healing backup: {}", String::from_utf8_lossy(&v.stdout));
    assert_same(&env.restore("disk@1"), &img);
    assert_same(&env.restore("disk@2"), &img);
}

/// A parent that references a missing chunk is never the base of an
/// incremental: the backup warns naming it, marks it invalid, builds on the
/// next valid backup instead, and restores bit-identically.
#[test]
fn parent_with_a_missing_chunk_is_never_a_base() {
    let env = Env::new(&[], "");
    let img = env.path("disk.img");
    make_image(&img, 92);
    env.write_config(&[("disk", &format!("file:{}", img.display()))], "", DEFAULTS);
    env.ok(&["init"]);
    env.ok(&["backup", "disk"]); // 1
    let mut r = rng(93);
    write_random(&img, 3 * BS as u64, BS, &mut r); // block 3 changes: one chunk only backup 2 has
    env.ok(&["backup", "disk"]); // 2
    let only_in_2: Vec<ChunkId> = {
        let c1 = chunks_of(&env, 1);
        chunks_of(&env, 2).into_iter().filter(|c| !c1.contains(c)).collect()
    };
    assert_eq!(only_in_2.len(), 1);
    fs::remove_file(chunk_path(&env, &only_in_2[0])).unwrap();

    let o = env.run(&["backup", "disk"]); // 3
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "backup failed: {stderr}");
    assert!(
        stderr.contains("parent backup references chunks missing from the store")
            && stderr.contains("backup=2")
            && stderr.contains("missing_chunks=1"),
        "no warning naming the parent and the missing chunk count:\n{stderr}"
    );
    let b3 = backup_row(&env, 3);
    assert_eq!(b3["parent"], 1, "backup 3 must build on backup 1, the newest valid one: {b3}");
    assert_eq!(num(&b3, "new_chunks"), 1, "{b3}");
    assert_eq!(backup_row(&env, 2)["valid"], false, "backup 2 was not marked invalid");

    // Backup 2's chunk is back (backup 3 wrote it again), so a plain verify
    // finds nothing wrong with it and clears the mark it checked (issue 14
    // item 7: the check that finds nothing wrong clears what it checked)
    let (ok, v) = verify_json(&env, &["verify", "disk@2"]);
    assert!(ok, "{v}");
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["backups"][0]["state"], "ok", "backup 2's stale mark was not cleared: {v}");

    assert_same(&env.restore("disk@3"), &img);
    let (ok, v) = verify_json(&env, &["verify", "--deep"]);
    assert!(ok, "{v}");
    assert_same(&env.restore("disk@2"), &img);
}

fn verify_json(env: &Env, args: &[&str]) -> (bool, Value) {
    let mut a = args.to_vec();
    a.push("--json");
    let o = env.run(&a);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{a:?}: not JSON ({e}): {}", String::from_utf8_lossy(&o.stderr)));
    (o.status.success(), v)
}

/// The parent check's memo (issue 13): a check skips the chunk groups
/// (shard directories) unchanged since the previous check found all their
/// chunks. A chunk removed after that check is still found missing, whether
/// its directory changed a moment ago (too recent to be trusted) or long
/// enough ago to have a settled, different stamp.
#[test]
fn chunk_lost_after_a_memoized_check_is_still_found() {
    // a directory's stamp is trusted once its last change is 2 s old
    let settle = || std::thread::sleep(std::time::Duration::from_millis(2300));
    let env = Env::new(&[], "");
    let img = env.path("disk.img");
    make_image(&img, 95);
    env.write_config(&[("disk", &format!("file:{}", img.display()))], "", DEFAULTS);
    env.ok(&["init"]);
    env.ok(&["backup", "disk"]); // 1
    settle();
    let checked = |o: &std::process::Output| -> (u64, u64) {
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "backup failed: {stderr}");
        let line = stderr.lines().find(|l| l.contains("parent's chunks checked")).unwrap_or_else(|| panic!("no check logged:\n{stderr}"));
        let field = |k: &str| -> u64 {
            let at = line.find(&format!("{k}=")).unwrap_or_else(|| panic!("no {k} in: {line}")) + k.len() + 1;
            line[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        (field("in_unchanged_shards"), field("looked_up"))
    };
    // 2: no memo yet, every chunk looked up; the memo is kept
    let chunks = chunks_of(&env, 1).into_iter().collect::<std::collections::HashSet<_>>().len() as u64;
    assert_eq!(checked(&env.run(&["-v", "backup", "disk"])), (0, chunks));
    settle();
    // 3: nothing changed since: no chunk looked up
    assert_eq!(checked(&env.run(&["-v", "backup", "disk"])), (chunks, 0), "the memo was not used");
    let memo = env.path("catalog.sqlite.memo");
    assert!(memo.is_dir(), "no memo beside the catalog");

    // a chunk removed just now: its directory's stamp is too recent to trust
    let lost = chunks_of(&env, 3)[2];
    fs::remove_file(chunk_path(&env, &lost)).unwrap();
    let o = env.run(&["-v", "backup", "disk"]); // 4
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("parent backup references chunks missing from the store") && stderr.contains("backup=3"), "{stderr}");
    assert_eq!(backup_row(&env, 3)["valid"], false);
    assert!(chunk_path(&env, &lost).exists(), "the backup did not write the lost chunk again");
    settle();
    env.ok(&["backup", "disk"]); // 5: checks 4 in full, keeps a memo
    settle();
    let (unchanged, _) = checked(&env.run(&["-v", "backup", "disk"])); // 6: with the memo
    assert_eq!(unchanged, chunks, "the memo was not used");

    // a chunk removed, then its directory left alone until its new stamp is settled
    let lost = chunks_of(&env, 6)[7];
    fs::remove_file(chunk_path(&env, &lost)).unwrap();
    settle();
    let o = env.run(&["-v", "backup", "disk"]); // 7
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "backup failed: {stderr}");
    assert!(
        stderr.contains("parent backup references chunks missing from the store") && stderr.contains("backup=6") && stderr.contains("missing_chunks=1"),
        "the chunk removed after the memo was not found missing:\n{stderr}"
    );
    assert_eq!(backup_row(&env, 6)["valid"], false);
    assert!(chunk_path(&env, &lost).exists(), "the backup did not write the lost chunk again");
    assert_same(&env.restore("disk@7"), &img);
    let (ok, v) = verify_json(&env, &["verify", "--deep"]);
    assert!(ok, "{v}");
}
