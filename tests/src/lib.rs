//! Test support shared by the integration tests and the `blockvault-ceph`
//! crate's tests: a throwaway Ceph cluster.
//!
//! [`ceph_conf`] returns `$CEPH_CONF` when it is set (tests/run.sh and CI
//! start a cluster and set it). Otherwise it starts one cluster for the
//! whole test process with `tests/ceph/start-cluster.sh`, the first time a
//! test asks, and the cluster is stopped when the process ends, however it
//! ends: a reaper process (`setsid`, so Ctrl-C of the test run does not
//! kill it) waits for end-of-file on a pipe whose only writer is this
//! process, then runs `tests/ceph/stop-cluster.sh`. When Ceph's packages
//! are missing the test fails and names the packages to install.
//!
//! [`TestCluster::start`] starts a separate cluster for a test that harms
//! it (stops an OSD, ...), stopped on drop and by the same reaper.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// tests/ceph, where the cluster scripts are.
pub fn ceph_scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ceph")
}

/// The commands a test cluster needs, with the Debian package of each.
const NEEDED: &[(&str, &str)] = &[
    ("ceph-mon", "ceph-mon"),
    ("ceph-osd", "ceph-osd"),
    ("ceph", "ceph-common"),
    ("rbd", "ceph-common"),
    ("rados", "ceph-common"),
    ("ceph-authtool", "ceph-common"),
    ("monmaptool", "ceph-common"),
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Panics, naming what to install, unless Ceph's packages are there.
pub fn require_ceph_packages() {
    let mut missing: Vec<&str> = Vec::new();
    for (cmd, pkg) in NEEDED {
        if !on_path(cmd) && !missing.contains(pkg) {
            missing.push(pkg);
        }
    }
    let py = Command::new("/usr/bin/python3")
        .args(["-c", "import rados, rbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !py.map(|s| s.success()).unwrap_or(false) {
        missing.extend(["python3-rados", "python3-rbd"]);
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/librbd.so.1").exists()
        && !Path::new("/usr/lib/librbd.so.1").exists()
        && !Path::new("/usr/lib64/librbd.so.1").exists()
    {
        missing.push("librbd1");
    }
    assert!(
        missing.is_empty(),
        "CEPH_CONF is not set, so the RBD tests start their own Ceph test cluster, but Ceph is not \
         installed: install the Debian packages {} (all of them: tests/ceph/install-deps.sh, as root), \
         or point CEPH_CONF at a running test cluster",
        missing.join(" ")
    );
}

/// A pipe to a reaper process that stops the cluster in `dir` once this
/// process has exited (the pipe's write end is closed only then).
fn spawn_reaper(dir: &Path) -> ChildStdin {
    let stop = ceph_scripts().join("stop-cluster.sh");
    let mut child = Command::new("setsid")
        .arg("sh")
        .arg("-c")
        .arg(r#"cat >/dev/null; exec "$0" "$1" >/dev/null 2>&1"#)
        .arg(&stop)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the test cluster's reaper (setsid sh): {e}"));
    child.stdin.take().expect("piped stdin")
}

/// A throwaway cluster started by `tests/ceph/start-cluster.sh`.
pub struct TestCluster {
    /// Its directory (conf, keyrings, data, logs, pid files).
    pub dir: PathBuf,
    /// `dir/ceph.conf`.
    pub conf: PathBuf,
    /// Keeps the reaper waiting while this process lives.
    _reaper: ChildStdin,
}

impl TestCluster {
    /// Starts a cluster; `env` is passed to start-cluster.sh (e.g.
    /// `BV_CEPH_BACKEND=bluestore`). Panics with the script's log on failure.
    pub fn start(tag: &str, env: &[(&str, &str)]) -> TestCluster {
        require_ceph_packages();
        static N: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut g = N.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        let dir = PathBuf::from(format!("/tmp/bv-test-ceph-{tag}-{}-{n}", std::process::id()));
        let reaper = spawn_reaper(&dir);
        let log = dir.with_extension("log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(ceph_scripts().join("start-cluster.sh"));
        cmd.arg(&dir).stdout(Stdio::piped()).stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child: Child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run start-cluster.sh: {e}"));
        let mut conf = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            if let Some(c) = line.unwrap_or_default().strip_prefix("export CEPH_CONF=") {
                conf = Some(PathBuf::from(c));
            }
        }
        let status = child.wait().unwrap();
        let conf = match conf {
            Some(c) if status.success() => c,
            _ => panic!(
                "tests/ceph/start-cluster.sh {} failed ({status}):\n{}",
                dir.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        let _ = std::fs::remove_file(&log);
        eprintln!("started Ceph test cluster {} (stopped when the tests end)", dir.display());
        TestCluster { dir, conf, _reaper: reaper }
    }

    /// Runs tests/ceph/stop-cluster.sh now.
    pub fn stop(&self) {
        let _ = Command::new(ceph_scripts().join("stop-cluster.sh"))
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The pid in `dir/run/NAME.pid` (e.g. `osd.0`).
    pub fn daemon_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("run").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cluster started for this test process, if [`ceph_conf`] started one.
static SHARED: OnceLock<TestCluster> = OnceLock::new();

/// The ceph.conf of the cluster the RBD tests use: `$CEPH_CONF`, else one
/// started for this process (see the crate docs).
pub fn ceph_conf() -> PathBuf {
    if let Some(c) = std::env::var_os("CEPH_CONF").filter(|c| !c.is_empty()) {
        return PathBuf::from(c);
    }
    SHARED
        .get_or_init(|| TestCluster::start("shared", &[("BV_CEPH_MGR", "0")]))
        .conf
        .clone()
}

/// The conf of the cluster [`ceph_conf`] started, `None` when it used
/// `$CEPH_CONF` (or was not called): children must then be given it.
pub fn started_ceph_conf() -> Option<PathBuf> {
    SHARED.get().map(|c| c.conf.clone())
}

/// The bluestore cluster started for this process by [`bluestore_conf`].
static BLUESTORE: OnceLock<TestCluster> = OnceLock::new();

/// The ceph.conf of a cluster with a **bluestore** OSD, for tests that use
/// a RADOS pool as a blockvault *store* (a memstore OSD would keep every
/// byte ever written in RAM): `$BV_STORE_CEPH_CONF` when set, else one
/// cluster started for this test process (pool `rbd`, no mgr), stopped
/// when the process ends. Tests isolate themselves by RADOS namespace.
pub fn bluestore_conf() -> PathBuf {
    if let Some(c) = std::env::var_os("BV_STORE_CEPH_CONF").filter(|c| !c.is_empty()) {
        return PathBuf::from(c);
    }
    BLUESTORE
        .get_or_init(|| TestCluster::start("store", &[("BV_CEPH_MGR", "0"), ("BV_CEPH_BACKEND", "bluestore")]))
        .conf
        .clone()
}

/// An S3 endpoint for a test: radosgw on a bluestore test cluster
/// (tests/ceph/start-rgw.sh), with its keys and a bucket name no other
/// test uses. The bucket is not created: `blockvault init` (or
/// `S3Backend::create_bucket`) does that, as it would for a user.
#[derive(Clone, Debug)]
pub struct S3Endpoint {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// The cluster's directory (for tests/ceph/stop-rgw.sh and start-rgw.sh).
    pub cluster_dir: Option<PathBuf>,
}

impl S3Endpoint {
    /// `s3:ENDPOINT/BUCKET`, the store URL of the fresh bucket.
    pub fn url(&self) -> String {
        format!("s3:{}/{}", self.endpoint, self.bucket)
    }

    /// The environment a child needs to reach the store.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [("AWS_ACCESS_KEY_ID", self.access_key.clone()), ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone())]
    }
}

/// The bluestore cluster with radosgw that [`s3_endpoint`] started.
static S3_CLUSTER: OnceLock<(TestCluster, String, String, String)> = OnceLock::new();

fn parse_rgw_env(text: &str) -> (String, String, String) {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {k}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("start-rgw.sh printed no {k}:\n{text}"))
    };
    (get("BV_S3_ENDPOINT"), get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"))
}

/// Starts radosgw on the test cluster in `dir` (again, after
/// [`stop_rgw`]: same port); returns (endpoint, access key, secret key).
/// Panics with the script's output on failure.
pub fn start_rgw(dir: &Path) -> (String, String, String) {
    assert!(on_path("radosgw"), "radosgw is not installed: run tests/ceph/install-deps.sh (package radosgw)");
    let out = Command::new(ceph_scripts().join("start-rgw.sh"))
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run start-rgw.sh: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tests/ceph/start-rgw.sh {} failed ({}):\n{text}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_rgw_env(&text)
}

/// Kills the radosgw of the cluster in `dir` (tests/ceph/stop-rgw.sh).
pub fn stop_rgw(dir: &Path) {
    let st = Command::new(ceph_scripts().join("stop-rgw.sh")).arg(dir).status().expect("run stop-rgw.sh");
    assert!(st.success(), "stop-rgw.sh {} failed", dir.display());
}

/// A fresh bucket name on the S3 endpoint the tests use: `$BV_S3_ENDPOINT`
/// with `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` when set, else
/// radosgw on a bluestore cluster started for this test process (stopped
/// when it ends, as [`ceph_conf`]'s).
pub fn s3_endpoint(tag: &str) -> S3Endpoint {
    static N: Mutex<u32> = Mutex::new(0);
    let n = {
        let mut g = N.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        *g
    };
    let tag: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let bucket = format!("bv-{tag}-{}-{n}-{:08x}", std::process::id(), rand_u32());
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(e), Some(a), Some(s)) = (env("BV_S3_ENDPOINT"), env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return S3Endpoint { endpoint: e, access_key: a, secret_key: s, bucket, cluster_dir: None };
    }
    let (c, e, a, s) = S3_CLUSTER.get_or_init(|| {
        let c = TestCluster::start("s3", &[("BV_CEPH_BACKEND", "bluestore"), ("BV_CEPH_MGR", "0")]);
        let (e, a, s) = start_rgw(&c.dir);
        (c, e, a, s)
    });
    S3Endpoint { endpoint: e.clone(), access_key: a.clone(), secret_key: s.clone(), bucket, cluster_dir: Some(c.dir.clone()) }
}

/// A private radosgw on its own bluestore cluster, for a test that stops
/// it: (cluster, endpoint). The cluster stops when the value drops.
pub fn s3_private(tag: &str) -> (TestCluster, S3Endpoint) {
    let c = TestCluster::start(tag, &[("BV_CEPH_BACKEND", "bluestore"), ("BV_CEPH_MGR", "0")]);
    let (e, a, s) = start_rgw(&c.dir);
    let bucket = format!("bv-{tag}-{}", std::process::id());
    let ep = S3Endpoint { endpoint: e, access_key: a, secret_key: s, bucket, cluster_dir: Some(c.dir.clone()) };
    (c, ep)
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}
