//! The store in a RADOS pool (issue 11): `[store] url = "rados:POOL/NS"`
//! against a real cluster with a bluestore OSD ([`bluestore_conf`]), each
//! test in its own namespace. The store suite the directory store passes
//! (round trips, dedup, bit flips detected, kill -9 during a backup), two
//! agents sharing one store while a third runs gc and prune, and a lock
//! holder that dies.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockvault_tests::bluestore_conf;

use crate::common::{assert_same, random_changes, rng, write_random, Env};
use crate::shared_store::{committed_id, two_agents_and_a_gc, SharedStore};

const MIB: u64 = 1 << 20;

fn unique_ns(tag: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("bvt-{tag}-{}-{}", std::process::id(), t % 1_000_000_000)
}

/// An agent: its own directory, config and catalog, on the store `url`.
fn agent(url: &str, images: &[(&str, &Path)], lease: &str, extra: &str) -> Env {
    let keys = format!("lock-lease = \"{lease}\"\ngc-grace = 0\n[store.ceph]\nconf = \"{}\"\ntimeout = 20", bluestore_conf().display());
    let extra = format!("[defaults]\nblock-size = \"64K\"\n{extra}");
    let sources: Vec<(&str, String)> = images.iter().map(|(n, p)| (*n, format!("file:{}", p.display()))).collect();
    let images: Vec<(&str, &str)> = sources.iter().map(|(n, s)| (*n, s.as_str())).collect();
    Env::on_store_url(url, &keys, &extra, &images, Vec::new())
}

fn rados(args: &[&str]) -> Output {
    Command::new("rados").arg("-c").arg(bluestore_conf()).args(args).output().unwrap()
}

fn chunk_objects(ns: &str) -> Vec<String> {
    let o = rados(&["-p", "rbd", "-N", &format!("{ns}/chunks"), "ls"]);
    assert!(o.status.success(), "rados ls: {}", String::from_utf8_lossy(&o.stderr));
    let mut v: Vec<String> = String::from_utf8(o.stdout).unwrap().lines().map(str::to_string).collect();
    v.sort();
    v
}

fn restore_to(env: &Env, spec: &str) -> PathBuf {
    let to = env.path(&format!("restored-{}", spec.replace('@', "-")));
    let _ = fs::remove_file(&to);
    env.ok(&["restore", spec, "--to", to.to_str().unwrap()]);
    to
}

/// Round trips, dedup across images and backups, a backup killed with -9
/// (then the next one waits out the lease and commits), and a flipped bit
/// in a chunk object found by verify and refused by restore.
#[test]
fn rados_store_round_trips_dedups_survives_kill_and_detects_bit_flips() {
    let ns = unique_ns("suite");
    let url = format!("rados:rbd/{ns}");
    let scratch = tempfile::tempdir().unwrap();
    let (a, b, big) = (scratch.path().join("a.img"), scratch.path().join("b.img"), scratch.path().join("big.img"));
    let mut r = rng(11);
    fs::File::create(&a).unwrap().set_len(4 * MIB).unwrap();
    write_random(&a, 0, 3 * MIB as usize, &mut r);
    fs::copy(&a, &b).unwrap();
    fs::File::create(&big).unwrap().set_len(48 * MIB).unwrap();
    write_random(&big, 0, 48 * MIB as usize, &mut r);
    let env = agent(&url, &[("a", &a), ("b", &b), ("big", &big)], "3s", "");
    let out = env.ok(&["init"]);
    assert!(out.contains(&format!("initialised store {url}")), "{out}");
    assert!(env.ok(&["init"]).contains("already initialised"));

    let a1 = committed_id(&env.ok(&["backup", "a"]));
    let after_a = chunk_objects(&ns);
    // 48 blocks of data and the block map's one index chunk (format 3; the
    // hole at the end is in the same group of 512 entries)
    assert_eq!(after_a.len(), 48 + 1, "3 MiB of random data in 64 KiB blocks: {after_a:?}");
    let keep_a1 = scratch.path().join("a1");
    fs::copy(&a, &keep_a1).unwrap();
    // the same data under another image name: no new chunk
    let b1 = committed_id(&env.ok(&["backup", "b"]));
    assert_eq!(chunk_objects(&ns), after_a, "dedup across images");
    random_changes(&a, 3 * MIB, 3, &mut r);
    let a2 = committed_id(&env.ok(&["backup", "a"]));
    let n = chunk_objects(&ns).len();
    assert!(n > 49 && n <= 49 + 15, "a few changed blocks add a few chunks: {n}");
    assert!(a1 < b1 && b1 < a2, "ids are allocated in order: {a1} {b1} {a2}");

    assert_same(&restore_to(&env, &format!("a@{a1}")), &keep_a1);
    assert_same(&restore_to(&env, &format!("b@{b1}")), &b);
    assert_same(&restore_to(&env, &format!("a@{a2}")), &a);

    // kill -9 during a backup: nothing half-committed, the next run succeeds
    let mut child = env.cmd(&["backup", "big"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    let before: BTreeSet<u64> = env.list().iter().map(|v| v["id"].as_u64().unwrap()).collect();
    let mut big_id = None;
    for _ in 0..60 {
        // the dead run's image lock is free once its lease (3s) ran out
        let o = env.run(&["backup", "big"]);
        if o.status.success() {
            big_id = Some(committed_id(&String::from_utf8_lossy(&o.stdout)));
            break;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is running") && err.contains("held by host"), "{err}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let big_id = big_id.expect("a backup after the killed one succeeds once the lease has expired");
    assert!(!before.contains(&big_id));
    assert_same(&restore_to(&env, &format!("big@{big_id}")), &big);
    let v = env.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep after kill -9: {}\n{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));

    // a flipped bit in a chunk object is found and never restored
    let victim = after_a[0].clone();
    let file = scratch.path().join("victim");
    let chunk_ns = format!("{ns}/chunks");
    assert!(rados(&["-p", "rbd", "-N", &chunk_ns, "get", &victim, file.to_str().unwrap()]).status.success());
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    fs::write(&file, &bytes).unwrap();
    assert!(rados(&["-p", "rbd", "-N", &chunk_ns, "put", &victim, file.to_str().unwrap()]).status.success());
    let v = env.run(&["verify", "--deep"]);
    let text = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    assert!(!v.status.success(), "verify --deep missed a flipped bit: {text}");
    assert!(text.contains(&victim[..16]) || text.contains("corrupt"), "{text}");
    let to = env.path("flipped");
    let e = env.fails(&["restore", &format!("a@{a1}"), "--to", to.to_str().unwrap()]);
    assert!(e.contains("corrupt") || e.contains("missing") || e.contains(&victim[..16]), "{e}");
}

/// Two agents (own configs and catalogs) back up different images into one
/// RADOS store, 20 rounds each, while a third runs gc (grace 0) and prune
/// in a loop. Afterwards: unique ids, every backup still in the store
/// restores bit-identically from a fresh catalog and from either agent,
/// verify --deep is clean.
#[test]
fn rados_two_agents_share_a_store_while_gc_and_prune_run() {
    const ROUNDS: usize = 20;
    let ns = unique_ns("share");
    let url = format!("rados:rbd/{ns}");
    let scratch = tempfile::tempdir().unwrap();
    let (ia, ib) = (scratch.path().join("a.img"), scratch.path().join("b.img"));
    for (p, seed) in [(&ia, 1), (&ib, 2)] {
        fs::File::create(p).unwrap().set_len(2 * MIB).unwrap();
        write_random(p, 0, 2 * MIB as usize, &mut rng(seed));
    }
    let ea = agent(&url, &[("a", &ia)], "15s", "");
    let eb = agent(&url, &[("b", &ib)], "15s", "");
    let ec = agent(&url, &[("a", &ia), ("b", &ib)], "15s", "retention = { keep-last = 6 }\n");
    ea.ok(&["init"]);
    assert!(eb.ok(&["init"]).contains("already initialised"), "the second agent finds the store");

    let sc = SharedStore { a: &ea, b: &eb, gc: &ec, images: (&ia, &ib), fresh: || agent(&url, &[], "15s", "") };
    two_agents_and_a_gc(&sc, ROUNDS, 12, || {
        let manifests = rados(&["-p", "rbd", "-N", &ns, "ls"]);
        String::from_utf8_lossy(&manifests.stdout).lines().filter(|l| l.ends_with(".json") && l.starts_with("backups/")).count()
    });
}

/// A lock holder stopped and killed with -9: another agent is refused with
/// a message naming the holder's host and pid while the lease lasts, and
/// gets the lock once it has expired, never before.
#[test]
fn rados_lock_of_a_killed_holder_is_free_only_after_its_lease() {
    let lease = Duration::from_secs(12);
    let ns = unique_ns("lease");
    let url = format!("rados:rbd/{ns}");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("big.img");
    fs::File::create(&img).unwrap().set_len(160 * MIB).unwrap();
    write_random(&img, 0, 160 * MIB as usize, &mut rng(5));
    let e1 = agent(&url, &[("big", &img)], "12s", "");
    let e2 = agent(&url, &[("big", &img)], "12s", "");
    e1.ok(&["init"]);

    let t_spawn = Instant::now();
    let mut holder = e1.cmd(&["backup", "big"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // freeze the holder as soon as it holds the image lock: its lease is
    // then no longer renewed, as for a host that died
    let mut cookie = String::new();
    for _ in 0..2000 {
        let o = rados(&["-p", "rbd", "-N", &ns, "lock", "info", "locks/image-big", "blockvault"]);
        let text = String::from_utf8_lossy(&o.stdout);
        if o.status.success() && text.contains("\"cookie\"") {
            assert!(Command::new("kill").args(["-STOP", &holder.id().to_string()]).status().unwrap().success());
            cookie = text.to_string();
            break;
        }
        assert!(holder.try_wait().unwrap().is_none(), "the holder finished before it could be stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cookie.contains(&format!("pid={}", holder.id())), "the holder never held the lock, or its cookie does not name it: {cookie}");
    holder.kill().unwrap();
    holder.wait().unwrap();

    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut refused = 0;
    let got = loop {
        let o = e2.run(&["backup", "big"]);
        if o.status.success() {
            break Instant::now();
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("held by host {} pid {}", host.trim(), holder.id())),
            "the refusal names the holder's host and pid: {err}"
        );
        refused += 1;
        assert!(refused < 120, "the lock never became free");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(refused >= 1, "the lock of the killed holder was free at once (not a lease)");
    // the holder took the lock after t_spawn, so its lease ran past t_spawn + lease
    assert!(got.duration_since(t_spawn) >= lease, "taken over before the lease can have expired");
    let out = restore_to(&e2, "big");
    assert_same(&out, &img);
}
