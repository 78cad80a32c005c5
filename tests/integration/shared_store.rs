//! One scenario, run on every shared store backend (RADOS in
//! `rados_store`, S3 in `s3_agent`): two agents back up into one store
//! while a third runs gc and prune. See issue 11.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common::{assert_same, random_changes, rng, Env};

const MIB: u64 = 1 << 20;

/// The backup id in `backup`'s output (`NAME: backup ID committed: ...`).
pub fn committed_id(out: &str) -> u64 {
    let rest = out.split("backup ").nth(1).unwrap_or_else(|| panic!("no backup id in {out:?}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

/// `n` backups of image `name` (a 2 MiB file at `img`), each after a few
/// random writes: id -> content.
pub fn backup_rounds(env: &Env, img: &Path, name: &str, seed: u64, n: usize) -> BTreeMap<u64, Vec<u8>> {
    let mut r = rng(seed);
    let mut got = BTreeMap::new();
    for _ in 0..n {
        random_changes(img, 2 * MIB, 4, &mut r);
        let content = fs::read(img).unwrap();
        let out = env.ok(&["backup", name]);
        got.insert(committed_id(&out), content);
    }
    got
}

/// The agents of [`two_agents_and_a_gc`]: `a` backs up image "a" (the file
/// `images.0`), `b` image "b" (`images.1`), `gc` has both images (and the
/// retention that keeps `kept` backups in all), `fresh` makes a new agent
/// of the same store with an empty catalog.
pub struct SharedStore<'a, F: Fn() -> Env> {
    pub a: &'a Env,
    pub b: &'a Env,
    pub gc: &'a Env,
    pub images: (&'a Path, &'a Path),
    pub fresh: F,
}

/// `rounds` backups from each of two agents at once while a third runs gc
/// (grace 0) and prune in a loop. Afterwards: backup ids unique across the
/// agents; a fresh catalog rebuilt from the store lists `kept` backups, as
/// many as `manifests_in_store()` counts; each restores bit-identically
/// from that catalog and from the agent that did not make it; verify
/// --deep is clean.
pub fn two_agents_and_a_gc<F: Fn() -> Env>(s: &SharedStore<'_, F>, rounds: usize, kept: usize, manifests_in_store: impl Fn() -> usize) {
    let stop = AtomicBool::new(false);
    let (mut got_a, mut got_b) = (BTreeMap::new(), BTreeMap::new());
    std::thread::scope(|sc| {
        let ha = sc.spawn(|| backup_rounds(s.a, s.images.0, "a", 10, rounds));
        let hb = sc.spawn(|| backup_rounds(s.b, s.images.1, "b", 20, rounds));
        let hc = sc.spawn(|| {
            let mut loops = 0;
            while !stop.load(Ordering::SeqCst) {
                s.gc.ok(&["gc"]);
                s.gc.ok(&["prune"]);
                loops += 1;
            }
            loops
        });
        got_a = ha.join().unwrap();
        got_b = hb.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        assert!(hc.join().unwrap() >= 1, "gc and prune ran alongside the backups");
    });
    let ids_a: BTreeSet<u64> = got_a.keys().copied().collect();
    let ids_b: BTreeSet<u64> = got_b.keys().copied().collect();
    assert_eq!((ids_a.len(), ids_b.len()), (rounds, rounds));
    assert!(ids_a.is_disjoint(&ids_b), "backup ids are unique across agents: {ids_a:?} {ids_b:?}");
    // one more prune and gc with everything quiet
    s.gc.ok(&["prune"]);
    s.gc.ok(&["gc"]);

    // a new host: a fresh catalog rebuilt from the store lists every backup in it
    let ed = (s.fresh)();
    ed.ok(&["catalog", "rebuild"]);
    let listed = ed.list();
    let in_store: BTreeSet<u64> = listed.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(in_store.len(), kept, "retention keeps {kept}: {in_store:?}");
    assert_eq!(manifests_in_store(), in_store.len(), "the rebuilt catalog lists every manifest in the store");
    let scratch = tempfile::tempdir().unwrap();
    for v in &listed {
        let id = v["id"].as_u64().unwrap();
        let image = v["image"].as_str().unwrap();
        let want = if image == "a" { &got_a[&id] } else { &got_b[&id] };
        let f = scratch.path().join("want");
        fs::write(&f, want).unwrap();
        assert_same(&ed.restore(&format!("{image}@{id}")), &f);
        // and from the other agent, whose catalog learns of it from the store
        let other = if image == "a" { s.b } else { s.a };
        other.ok(&["list"]);
        assert_same(&other.restore(&format!("{image}@{id}")), &f);
    }
    ed.ok(&["verify", "--deep"]);
}
