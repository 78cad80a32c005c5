//! The agent on an S3 store (radosgw on a bluestore test cluster): `store
//! copy` directory → S3 and back, a copy killed with -9 and resumed,
//! radosgw stopped mid-backup. See issue 11.

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use blockvault_store::Backend;
use blockvault_tests::S3Endpoint;

use crate::common::{self, Env};
use crate::shared_store::{two_agents_and_a_gc, SharedStore};

/// An agent whose store is an S3 URL: its own config and catalog in a temp
/// dir, the keys in its environment.
pub fn s3_agent(ep: &S3Endpoint, images: &[(&str, &str)], extra: &str) -> Env {
    let vars = ep.env().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Env::on_store_url(&ep.url(), "lock-lease = \"10s\"\ngc-grace = 0", extra, images, vars)
}

fn s3_backend(ep: &S3Endpoint) -> blockvault_store::backend::s3::S3Backend {
    crate::s3::backend(ep, Duration::from_secs(30))
}

fn copy_json(env: &Env, ep: &S3Endpoint, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["store", "copy", "--json", "--to"];
    let url = ep.url();
    args.push(&url);
    args.extend_from_slice(extra);
    let mut c = env.cmd(&args);
    for (k, v) in ep.env() {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "store copy failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn backup_spec(b: &serde_json::Value) -> String {
    format!("{}@{}", b["image"].as_str().unwrap(), b["id"].as_u64().unwrap())
}

/// `store copy` from a directory store to S3: every backup lands, a second
/// copy writes nothing, and restores from S3 (through a second agent whose
/// catalog is rebuilt from the bucket) are bit-identical to the originals.
#[test]
fn store_copy_dir_to_s3_then_restore_from_s3() {
    let env = Env::new(&[], "");
    let img = env.path("vm.img");
    let mut rng = common::rng(11);
    common::sparse_file(&img, 8 << 20);
    env.write_config(&[("vm", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"256K\"\n");
    env.ok(&["init"]);
    let mut copies = Vec::new();
    for round in 0..3 {
        common::random_changes(&img, 8 << 20, 6, &mut rng);
        env.ok(&["backup", "vm"]);
        let c = env.path(&format!("orig-{round}"));
        fs::copy(&img, &c).unwrap();
        copies.push(c);
    }
    let ep = blockvault_tests::s3_endpoint("copy");
    s3_backend(&ep).create_bucket().unwrap();
    let r = copy_json(&env, &ep, &[]);
    assert_eq!(r["backups_copied"], 3, "{r}");
    assert!(r["chunks_copied"].as_u64().unwrap() > 0);
    let again = copy_json(&env, &ep, &[]);
    assert_eq!((again["backups_copied"].as_u64(), again["chunks_copied"].as_u64()), (Some(0), Some(0)), "{again}");
    assert_eq!(again["backups_present"], 3);

    let remote = s3_agent(&ep, &[], "");
    remote.ok(&["catalog", "rebuild"]);
    let list = remote.list();
    assert_eq!(list.len(), 3, "{list:?}");
    let mut specs: Vec<String> = list.iter().map(backup_spec).collect();
    specs.sort_by_key(|s| s.rsplit('@').next().unwrap().parse::<u64>().unwrap());
    for (spec, orig) in specs.iter().zip(&copies) {
        let got = remote.restore(spec);
        common::assert_same(&got, orig);
    }
    remote.ok(&["verify", "--deep"]);
}

fn count_chunks(ep: &S3Endpoint) -> usize {
    s3_backend(ep).list_chunks().unwrap().len()
}

/// A copy killed with -9 half-way leaves a valid target, and the next
/// copy writes exactly the chunks that were left.
#[test]
fn store_copy_killed_and_resumed_copies_only_the_rest() {
    let env = Env::new(&[], "");
    let img = env.path("big.img");
    let mut rng = common::rng(12);
    common::sparse_file(&img, 48 << 20);
    common::write_random(&img, 0, 48 << 20, &mut rng);
    env.write_config(&[("big", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["init"]);
    env.ok(&["backup", "big"]);
    // 64 KiB chunks of random data, all distinct, and the block map's 2
    // index chunks (format 3: 512 entries each)
    let total = 48 * 16 + 2;
    let ep = blockvault_tests::s3_endpoint("resume");
    s3_backend(&ep).create_bucket().unwrap();
    let url = ep.url();
    let mut c = env.cmd(&["store", "copy", "--to", &url]);
    for (k, v) in ep.env() {
        c.env(k, v);
    }
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        let n = count_chunks(&ep);
        if n >= 100 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the copy ended before it could be killed ({n} chunks)");
        assert!(t0.elapsed() < Duration::from_secs(300), "the copy made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // a PUT the killed copy had sent may still complete on radosgw after
    // the kill: count once the bucket has stopped changing
    let mut before = count_chunks(&ep);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let again = count_chunks(&ep);
        if again == before {
            break;
        }
        before = again;
    }
    assert!(before < total, "the copy finished before the kill");
    assert!(!s3_backend(&ep).object_exists("backups/000000000001.json").unwrap(), "no manifest before its chunks");
    let r = copy_json(&env, &ep, &[]);
    assert_eq!(r["chunks_copied"].as_u64().unwrap() as usize, total - before, "{r}");
    assert_eq!(r["chunks_present"].as_u64().unwrap() as usize, before, "{r}");
    let remote = s3_agent(&ep, &[], "");
    remote.ok(&["catalog", "rebuild"]);
    let spec = backup_spec(&remote.list()[0]);
    common::assert_same(&remote.restore(&spec), &img);
}

/// radosgw killed while a backup writes chunks: the backup fails within a
/// bounded time naming the store, nothing is committed, and once radosgw
/// is back the next backup succeeds and restores bit-identically.
#[test]
fn radosgw_stopped_mid_backup() {
    let (cluster, ep) = blockvault_tests::s3_private("rgwstop");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("vm.img");
    let mut rng = common::rng(13);
    common::sparse_file(&img, 48 << 20);
    common::write_random(&img, 0, 48 << 20, &mut rng);
    let agent = s3_agent(
        &ep,
        &[("vm", &format!("file:{}", img.display()))],
        "[defaults]\nblock-size = \"64K\"\n",
    );
    agent.ok(&["init"]);
    let mut child = agent.cmd(&["backup", "vm"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while count_chunks(&ep) < 60 {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before radosgw could be stopped");
        assert!(t0.elapsed() < Duration::from_secs(300), "the backup made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    blockvault_tests::stop_rgw(&cluster.dir);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        // bounded: retries (~2 s) and timeouts per request, not forever
        assert!(stopped.elapsed() < Duration::from_secs(180), "the backup hangs after radosgw stopped");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "the backup succeeded without its store");
    assert!(err.contains(&ep.url()) || err.contains("s3:"), "the error names the store: {err}");
    eprintln!("backup failed {:?} after radosgw stopped: {}", stopped.elapsed(), err.lines().last().unwrap_or(""));
    blockvault_tests::start_rgw(&cluster.dir);
    assert!(!s3_backend(&ep).object_exists("backups/000000000001.json").unwrap_or(true) || {
        // a manifest exists only for a complete backup
        agent.ok(&["verify", "--deep"]);
        true
    });
    agent.ok(&["backup", "vm"]);
    let list = agent.list();
    // `list` shows committed backups only: the interrupted one is not there
    assert_eq!(list.len(), 1, "{list:?}");
    common::assert_same(&agent.restore(&backup_spec(&list[0])), &img);
    agent.ok(&["verify", "--deep"]);
}

/// Two agents (own configs and catalogs) back up different images into one
/// S3 store, 20 rounds each, while a third runs gc (grace 0) and prune in a
/// loop. Afterwards: unique ids, every backup still in the store restores
/// bit-identically from a fresh catalog and from either agent, verify
/// --deep is clean.
#[test]
fn s3_two_agents_share_a_store_while_gc_and_prune_run() {
    const ROUNDS: usize = 20;
    const MIB: u64 = 1 << 20;
    let ep = blockvault_tests::s3_endpoint("share");
    let scratch = tempfile::tempdir().unwrap();
    let (ia, ib) = (scratch.path().join("a.img"), scratch.path().join("b.img"));
    for (p, seed) in [(&ia, 1), (&ib, 2)] {
        common::sparse_file(p, 2 * MIB);
        common::write_random(p, 0, 2 * MIB as usize, &mut common::rng(seed));
    }
    let src = |p: &std::path::Path| format!("file:{}", p.display());
    let defaults = "[defaults]\nblock-size = \"64K\"\nretention = { keep-last = 6 }\n";
    let ea = s3_agent(&ep, &[("a", &src(&ia))], defaults);
    let eb = s3_agent(&ep, &[("b", &src(&ib))], defaults);
    let ec = s3_agent(&ep, &[("a", &src(&ia)), ("b", &src(&ib))], defaults);
    ea.ok(&["init"]);
    eb.ok(&["init"]);
    let sc = SharedStore { a: &ea, b: &eb, gc: &ec, images: (&ia, &ib), fresh: || s3_agent(&ep, &[], "") };
    two_agents_and_a_gc(&sc, ROUNDS, 12, || {
        s3_backend(&ep).list_objects("backups/").unwrap().iter().filter(|k| k.ends_with(".json")).count()
    });
}
