//! Issue 13: the blocks an RBD incremental reads, hashes and stores while
//! its exact diff still runs (64 KiB blocks, writes of whole blocks). The
//! backup must take them, restore identical to `rbd export` of its
//! snapshot, and pass `verify --deep`. The store then fills up before an
//! incremental: that backup fails naming the store and the cause, commits
//! nothing, leaves no snapshot behind, and once there is room again the
//! next one is whole. Which writer meets the full disk first, a thread of
//! the diff or the pipeline, is a race (on a small image the diff often
//! ends before a block is stored); both must end the same way.

use std::fs;
use std::io::Write;

use rand::Rng;
use serde_json::json;

use crate::common::*;
use crate::rbd::{blockvault_snaps, export_hash, file_hash, latest, rbd_io, unique, FEATURES, MIB, POOL};

const BS: u64 = 65536;

/// Writes of 1 to 4 whole blocks at block-aligned offsets, new data each,
/// only into every other 4 MiB object: each changed object is a piece of
/// the exact diff of its own, more pieces than the diff has threads, so
/// the blocks of the first pieces are stored while later ones are diffed.
fn whole_block_writes(r: &mut impl Rng, size: u64, n: usize, seed: u64) -> Vec<serde_json::Value> {
    const OBJECT: u64 = 4 * MIB;
    (0..n)
        .map(|i| {
            let blocks = r.gen_range(1..=4);
            let object = 2 * r.gen_range(0..size / OBJECT / 2);
            let off = object * OBJECT + r.gen_range(0..OBJECT / BS - blocks) * BS;
            json!(["write", off, blocks * BS, seed + i as u64])
        })
        .collect()
}

/// `taken=N` of the `-v` line that says how many bytes the diff stored, 0
/// without one.
fn stored_during_diff(stderr: &str) -> u64 {
    // logged only when some block was read during the diff
    let Some(line) = stderr.lines().find(|l| l.contains("blocks read and stored during the diff")) else { return 0 };
    let taken = line.split_whitespace().find_map(|w| w.strip_prefix("taken=")).unwrap_or_else(|| panic!("no taken= in {line}"));
    taken.parse().unwrap()
}

fn restore_matches_snapshot(env: &Env, img: &str) {
    let l = latest(env, "d");
    let out = env.restore(&format!("d@{}", num(&l, "id")));
    assert_eq!(file_hash(&out), export_hash(&format!("{img}@{}", l["snapshot"].as_str().unwrap())), "backup {} differs from its snapshot", l["id"]);
    fs::remove_file(out).unwrap();
}

#[test]
fn rbd_blocks_stored_during_the_diff_restore_and_a_full_store_loses_nothing() {
    let size = 64 * MIB;
    let img = unique("ahead");
    rbd_io(&img, json!([["create", size, 0, FEATURES, 0, 0], ["write", 0, size, 7]]));
    let env = Env::new(&[], "");
    // the store on a small filesystem of its own, the catalog beside the config
    let small = env.path("small");
    let _m = Mount::tmpfs(&small, "96m");
    let store = small.join("store");
    fs::write(
        &env.config,
        format!(
            "[store]\npath = \"{}\"\n[catalog]\npath = \"{}\"\n[[image]]\nname = \"d\"\nsource = \"rbd:{POOL}/{img}\"\nblock-size = \"64K\"\n",
            store.display(),
            env.catalog().display()
        ),
    )
    .unwrap();
    env.ok(&["init"]);
    env.ok(&["backup", "d"]);

    let mut r = rng(14);
    let mut stored = 0;
    for round in 1..=3u64 {
        rbd_io(&img, json!(whole_block_writes(&mut r, size, 32, round * 100)));
        let o = env.run(&["-v", "backup", "d"]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "round {round}: backup failed:\n{err}");
        let l = latest(&env, "d");
        assert_eq!(l["full_read"], false, "round {round}: {l}");
        stored += stored_during_diff(&err);
        restore_matches_snapshot(&env, &img);
    }
    // a block is stored during the diff only when it is read before the last
    // piece is diffed: a race in any one round, not over three
    assert!(stored > 0, "no block was stored during the diff in three rounds");
    env.ok(&["verify", "--deep"]);

    // fill the store's filesystem up to 16 KiB (less than one chunk), then change ~6 MiB
    let before = env.list().len();
    let filler = small.join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let mib = vec![0xa5u8; MIB as usize];
        while f.write_all(&mib).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(16 << 10)).unwrap();
    }
    rbd_io(&img, json!(whole_block_writes(&mut r, size, 24, 900)));
    let err = env.fails(&["backup", "d"]);
    let last = err.lines().rfind(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(last.contains("No space left on device"), "the cause is not named: {last}");
    assert!(last.contains(&store.display().to_string()), "the store is not named: {last}");
    assert_eq!(env.list().len(), before, "a failed backup was committed");
    assert_eq!(blockvault_snaps(&img).len(), 1, "the failed backup's snapshot was left: {:?}", blockvault_snaps(&img));
    env.ok(&["verify", "--deep"]);

    // room again: the next incremental is whole
    fs::remove_file(&filler).unwrap();
    env.ok(&["backup", "d"]);
    assert_eq!(env.list().len(), before + 1);
    assert_eq!(latest(&env, "d")["full_read"], false);
    restore_matches_snapshot(&env, &img);
    env.ok(&["verify", "--deep"]);
    crate::rbd::rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
    crate::rbd::rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
}
