//! Faults of the shared stores (issue 11): a backup into a RADOS or S3
//! store killed with -9 at several points of its run, and the RADOS
//! store's cluster (its OSD) killed mid-backup and started again.
//!
//! After each fault: the next backup succeeds (once the dead run's lease
//! has run out), nothing half-done is listed, every committed backup
//! restores bit-identically, `verify --deep` is clean (so no committed
//! block map references a missing chunk), and a catalog rebuilt from the
//! store elsewhere lists exactly the committed backups.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockvault_store::Backend;

use crate::common::{self, assert_same, rng, write_random};

const MIB: u64 = 1 << 20;

/// An agent on a shared store: its own config and catalog, and the
/// environment its commands need (S3 keys).
struct Agent {
    dir: tempfile::TempDir,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Agent {
    /// `store` is the `[store]` table's body (url, lease, ...), `extra` any
    /// further tables.
    fn new(store: &str, images: &[(&str, &Path)], extra: &str, env: Vec<(String, String)>) -> Agent {
        let dir = tempfile::Builder::new().prefix("bv-faults-").tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let mut t = format!(
            "[store]\ngc-grace = 0\n{store}\n{extra}\n[catalog]\npath = \"{}\"\n[defaults]\nblock-size = \"64K\"\n",
            dir.path().join("catalog.sqlite").display()
        );
        for (name, src) in images {
            t.push_str(&format!("[[image]]\nname = \"{name}\"\nsource = \"file:{}\"\n", src.display()));
        }
        fs::write(&config, t).unwrap();
        Agent { dir, config, env }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::bin());
        c.arg("--config").arg(&self.config).arg("--no-progress").args(args);
        c.env_remove("BLOCKVAULT_LOG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        common::stdout_of_success(&format!("blockvault {args:?}"), self.run(args))
    }

    fn ids(&self) -> BTreeSet<u64> {
        let v: Vec<serde_json::Value> = serde_json::from_str(&self.ok(&["list", "--json"])).unwrap();
        v.iter().map(|b| b["id"].as_u64().unwrap()).collect()
    }

    fn restore(&self, spec: &str) -> PathBuf {
        let to = self.dir.path().join(format!("restored-{}", spec.replace('@', "-")));
        let _ = fs::remove_file(&to);
        self.ok(&["restore", spec, "--to", to.to_str().unwrap()]);
        to
    }

    /// `backup IMAGE`, retried while a dead run's image lock (or store
    /// lock) is still leased; every refusal must name the holder's host.
    /// Returns (the committed id, how many times it was refused).
    fn backup_after_fault(&self, image: &str, bound: Duration) -> (u64, usize) {
        let t0 = Instant::now();
        let mut refused = 0;
        loop {
            let o = self.run(&["backup", image]);
            let out = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            if o.status.success() {
                return (committed_id(&out), refused);
            }
            let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
            assert!(
                err.contains("is running") && err.contains("held by") && err.contains(host.trim()),
                "a backup after a fault fails only on the dead run's lock, naming its holder's host: {err}"
            );
            refused += 1;
            assert!(t0.elapsed() < bound, "the dead run's lock was never freed ({refused} refusals): {err}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The backup id in `backup`'s output (`NAME: backup ID committed: ...`).
fn committed_id(out: &str) -> u64 {
    let rest = out.split("backup ").nth(1).unwrap_or_else(|| panic!("no backup id in {out:?}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

/// A new version of the image: fresh random content, its round number in
/// the first 8 bytes (so a restored backup tells which version it holds).
fn new_version(img: &Path, size: u64, round: u64, r: &mut rand::rngs::StdRng, refs: &mut BTreeMap<u64, PathBuf>, dir: &Path) {
    write_random(img, 0, size as usize, r);
    fs::OpenOptions::new().write(true).open(img).unwrap().write_all_at(&round.to_le_bytes(), 0).unwrap();
    let reference = dir.join(format!("ref-{round}"));
    fs::copy(img, &reference).unwrap();
    refs.insert(round, reference);
}

/// Where in a backup's run the kill lands, by the chunks the run has
/// written (each version is new data: `total` new chunks per run).
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// as soon as the store holds the run's id claim (locks held, no chunk yet)
    Claimed,
    /// after this fraction of the run's chunks
    Chunks(f64),
}

/// The shared store suite's kill -9 part, on any shared store: backups
/// killed at the points in `at`, each followed by a backup that must
/// succeed, then the checks of the module docs. `chunks` counts chunk
/// objects, `claims` the `backups/*.claim` objects.
fn kill_dash_nine_suite(
    agent: &Agent,
    fresh: &Agent,
    img: &Path,
    scratch: &Path,
    chunks: &dyn Fn() -> usize,
    claims: &dyn Fn() -> usize,
    manifests: &dyn Fn() -> BTreeSet<u64>,
) {
    const SIZE: u64 = 24 * MIB;
    let total = (SIZE / (64 * 1024)) as usize;
    let at = [KillAt::Claimed, KillAt::Chunks(0.3), KillAt::Chunks(0.8), KillAt::Chunks(0.6)];
    let mut r = rng(31);
    let mut refs = BTreeMap::new();
    agent.ok(&["init"]);
    new_version(img, SIZE, 0, &mut r, &mut refs, scratch);
    let mut committed = BTreeSet::from([committed_id(&agent.ok(&["backup", "img"]))]);
    let mut killed = 0;
    let mut refused_total = 0;
    for (i, point) in at.iter().enumerate() {
        let round = i as u64 * 2 + 1;
        new_version(img, SIZE, round, &mut r, &mut refs, scratch);
        let (c0, k0) = (chunks(), claims());
        let mut child = agent.cmd(&["backup", "img"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        let reached = loop {
            let done = match point {
                KillAt::Claimed => claims() > k0,
                KillAt::Chunks(f) => chunks() >= c0 + (total as f64 * f) as usize,
            };
            if done {
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "the backup made no progress");
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if reached && status.code().is_none() {
            killed += 1;
        }
        // a run killed after its manifest was written (or one that ended
        // before the kill) has committed: at most that one backup is new
        let new: BTreeSet<u64> = manifests().difference(&committed).copied().collect();
        assert!(new.len() <= 1, "one killed run committed several backups: {new:?}");
        committed.extend(new);
        eprintln!("kill at {point:?}: reached {reached}, {status}, {} new chunks", chunks() - c0);
        // the next backup, of the next version, succeeds once the dead
        // run's lease has run out
        new_version(img, SIZE, round + 1, &mut r, &mut refs, scratch);
        let (id, refused) = agent.backup_after_fault("img", Duration::from_secs(120));
        refused_total += refused;
        assert!(!committed.contains(&id), "backup id {id} handed out twice");
        committed.insert(id);
    }
    assert!(killed >= 3, "only {killed} of {} backups were killed mid-run; make the image larger", at.len());
    assert!(refused_total >= 1, "no backup after a kill ever met the dead run's lease: is the image lock a lease?");

    // nothing half-done is listed: the catalog, the store's manifests and
    // a catalog rebuilt elsewhere all hold exactly the committed backups
    assert_eq!(agent.ids(), committed);
    assert_eq!(manifests(), committed, "manifests in the store");
    fresh.ok(&["catalog", "rebuild"]);
    assert_eq!(fresh.ids(), committed, "a catalog rebuilt from the store");
    // every committed backup restores bit-identically to its version
    for id in &committed {
        common::assert_restored_round(&fresh.restore(&format!("img@{id}")), &refs, *id);
    }
    // no committed block map references a missing chunk, no chunk is bad
    let v = agent.run(&["verify", "--deep"]);
    assert!(
        v.status.success(),
        "verify --deep after kill -9: {}\n{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // what the dead runs left (unreferenced chunks) goes at the next gc
    let before = chunks();
    agent.ok(&["gc"]);
    assert!(chunks() < before, "gc removed none of the dead runs' chunks ({before})");
    let v = agent.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep after gc: {}", String::from_utf8_lossy(&v.stderr));
}

fn unique_ns(tag: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("bvf-{tag}-{}-{}", std::process::id(), t % 1_000_000_000)
}

fn rados(conf: &Path, args: &[&str]) -> Output {
    Command::new("rados").arg("-c").arg(conf).args(args).output().unwrap()
}

fn rados_ls(conf: &Path, ns: &str) -> Vec<String> {
    let o = rados(conf, &["-p", "rbd", "-N", ns, "ls"]);
    assert!(o.status.success(), "rados ls: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().map(str::to_string).collect()
}

/// `backups/<id>.json` names among `names`: the committed backups.
fn manifest_ids<'a>(names: impl Iterator<Item = &'a str>) -> BTreeSet<u64> {
    names
        .filter_map(|n| n.strip_prefix("backups/").unwrap_or(n).strip_suffix(".json").map(str::to_string))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn rados_store(conf: &Path, ns: &str, lease: &str, timeout: u32) -> String {
    format!(
        "url = \"rados:rbd/{ns}\"\nlock-lease = \"{lease}\"\n[store.ceph]\nconf = \"{}\"\ntimeout = {timeout}",
        conf.display()
    )
}

/// kill -9 during backups into a RADOS store, at several points.
#[test]
fn rados_store_kill_dash_nine_at_several_points() {
    let conf = blockvault_tests::bluestore_conf();
    let ns = unique_ns("kill");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("img");
    let store = rados_store(&conf, &ns, "4s", 20);
    let agent = Agent::new(&store, &[("img", &img)], "", Vec::new());
    let fresh = Agent::new(&store, &[("img", &img)], "", Vec::new());
    let chunk_ns = format!("{ns}/chunks");
    kill_dash_nine_suite(
        &agent,
        &fresh,
        &img,
        scratch.path(),
        &|| rados_ls(&conf, &chunk_ns).len(),
        &|| rados_ls(&conf, &ns).iter().filter(|n| n.ends_with(".claim")).count(),
        &|| manifest_ids(rados_ls(&conf, &ns).iter().map(String::as_str)),
    );
}

/// kill -9 during backups into an S3 store (radosgw), at several points.
#[test]
fn s3_store_kill_dash_nine_at_several_points() {
    let ep = blockvault_tests::s3_endpoint("kill");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("img");
    let store = format!("url = \"{}\"\nlock-lease = \"4s\"", ep.url());
    let env: Vec<(String, String)> = ep.env().iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let agent = Agent::new(&store, &[("img", &img)], "", env.clone());
    let fresh = Agent::new(&store, &[("img", &img)], "", env);
    let backend = crate::s3::backend(&ep, Duration::from_secs(30));
    kill_dash_nine_suite(
        &agent,
        &fresh,
        &img,
        scratch.path(),
        &|| backend.list_chunks().unwrap().len(),
        &|| backend.list_objects("backups/").unwrap().iter().filter(|n| n.ends_with(".claim")).count(),
        &|| manifest_ids(backend.list_objects("backups/").unwrap().iter().map(String::as_str)),
    );
}

/// The RADOS store's cluster loses its OSD (kill -9) in the middle of a
/// backup: the backup fails within a bounded time with an error naming the
/// store, nothing is committed, and once the OSD is back the next backup
/// succeeds, restores bit-identically and verifies.
#[test]
fn rados_store_osd_killed_mid_backup() {
    let cluster = blockvault_tests::TestCluster::start("osdkill", &[("BV_CEPH_MGR", "0"), ("BV_CEPH_BACKEND", "bluestore")]);
    let conf = cluster.conf.clone();
    let ns = unique_ns("osd");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("img");
    fs::File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    write_random(&img, 0, 64 * MIB as usize, &mut rng(41));
    // operations time out after 8 s; leases of 4 s
    let timeout = 8;
    let store = rados_store(&conf, &ns, "4s", timeout);
    let agent = Agent::new(&store, &[("img", &img)], "", Vec::new());
    agent.ok(&["init"]);
    let chunk_ns = format!("{ns}/chunks");

    let mut child = agent.cmd(&["backup", "img"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while rados_ls(&conf, &chunk_ns).len() < 100 {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before the OSD could be killed");
        assert!(t0.elapsed() < Duration::from_secs(300), "the backup made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let osd = cluster.daemon_pid("osd.0").expect("osd.0 pid file");
    assert!(Command::new("kill").args(["-KILL", &osd.to_string()]).status().unwrap().success());
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        // bounded: each OSD operation gives up after `timeout`; a few of
        // them in a row (the writes in flight, then the error path)
        assert!(killed.elapsed() < Duration::from_secs(120), "the backup hangs after its OSD died");
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = killed.elapsed();
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    eprintln!("backup failed {took:?} after the OSD died: {}", err.trim_end().lines().last().unwrap_or(""));
    assert!(!status.success(), "the backup succeeded without its OSD");
    assert!(status.code().is_some(), "the backup died of a signal: {status}");
    assert!(err.contains(&format!("rados:rbd/{ns}")), "the error names the store: {err}");
    assert!(err.contains("timed out") || err.contains("110"), "the error says the cluster did not answer: {err}");

    // start the OSD again (bluestore: its data survived the kill)
    let st = Command::new("ceph-osd")
        .args(["-c", conf.to_str().unwrap(), "-i", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "ceph-osd restart failed");
    let t1 = Instant::now();
    loop {
        let o = Command::new("ceph").arg("-c").arg(&conf).args(["osd", "dump"]).output().unwrap();
        if String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("osd.0 up")) {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(120), "osd.0 did not come back up");
        std::thread::sleep(Duration::from_millis(200));
    }

    // nothing committed: no manifest in the store, nothing listed
    let names = rados_ls(&conf, &ns);
    assert!(manifest_ids(names.iter().map(String::as_str)).is_empty(), "a manifest of the failed backup: {names:?}");
    assert!(agent.ids().is_empty(), "the failed backup is listed");
    // the next run succeeds and everything verifies
    let (id, _) = agent.backup_after_fault("img", Duration::from_secs(120));
    assert_eq!(agent.ids(), BTreeSet::from([id]));
    assert_same(&agent.restore(&format!("img@{id}")), &img);
    let v = agent.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep: {}\n{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    let fresh = Agent::new(&store, &[("img", &img)], "", Vec::new());
    fresh.ok(&["catalog", "rebuild"]);
    assert_eq!(fresh.ids(), BTreeSet::from([id]));
}
