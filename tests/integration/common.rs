//! Shared helpers: a scratch directory with a config, and the binary.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, RngCore, SeedableRng};

/// The `blockvault` binary of this build (built by `cargo build` or by
/// `cargo test --workspace`).
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-<hash>
    let dir = exe.parent().unwrap().parent().unwrap();
    let b = dir.join("blockvault");
    assert!(b.exists(), "{} not found: run `cargo build -p blockvault` first", b.display());
    b
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Set in the environment of every command (an S3 store's keys).
    pub vars: Vec<(String, String)>,
}

impl Env {
    /// A store and catalog in a temp dir, with `images` as `(name, source)`.
    pub fn new(images: &[(&str, &str)], extra_store: &str) -> Env {
        let dir = tempfile::Builder::new().prefix("bv-test-").tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let env = Env { dir, config, vars: Vec::new() };
        env.write_config(images, extra_store, "");
        env
    }

    /// An agent of a store that is not a local directory: `url`, then
    /// `store_keys` in `[store]`, its own catalog in its own temp dir,
    /// `extra` after that, `images` as `(name, source)`; `vars` go into
    /// every command's environment.
    pub fn on_store_url(url: &str, store_keys: &str, extra: &str, images: &[(&str, &str)], vars: Vec<(String, String)>) -> Env {
        let dir = tempfile::Builder::new().prefix("bv-agent-").tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let mut t = format!(
            "[store]\nurl = \"{url}\"\n{store_keys}\n[catalog]\npath = \"{}\"\n{extra}\n",
            dir.path().join("catalog.sqlite").display()
        );
        for (name, src) in images {
            t.push_str(&format!("[[image]]\nname = \"{name}\"\nsource = \"{src}\"\n"));
        }
        fs::write(&config, t).unwrap();
        Env { dir, config, vars }
    }

    pub fn write_config(&self, images: &[(&str, &str)], extra_store: &str, extra: &str) {
        let mut t = format!(
            "[store]\npath = \"{}\"\n{extra_store}\n[catalog]\npath = \"{}\"\n{extra}\n",
            self.store().display(),
            self.catalog().display()
        );
        for (name, src) in images {
            t.push_str(&format!("[[image]]\nname = \"{name}\"\nsource = \"{src}\"\n"));
        }
        fs::write(&self.config, t).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn store(&self) -> PathBuf {
        self.path("store")
    }
    pub fn catalog(&self) -> PathBuf {
        self.path("catalog.sqlite")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--config").arg(&self.config).arg("--no-progress").args(args);
        c.env_remove("BLOCKVAULT_LOG");
        if let Some(conf) = blockvault_tests::started_ceph_conf() {
            // the cluster this test process started (CEPH_CONF was unset)
            c.env("CEPH_CONF", conf);
        }
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Runs blockvault; returns the output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs blockvault and panics with its stderr unless it succeeded.
    pub fn ok(&self, args: &[&str]) -> String {
        stdout_of_success(&format!("blockvault {args:?}"), self.run(args))
    }

    /// Runs blockvault, expects failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "blockvault {args:?} unexpectedly succeeded: {}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8(o.stderr).unwrap()
    }

    pub fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["list", "--json"])).unwrap()
    }

    /// Restores `spec` to a fresh path and returns it.
    pub fn restore(&self, spec: &str) -> PathBuf {
        let to = self.path(&format!("restored-{}", spec.replace('@', "-")));
        let _ = fs::remove_file(&to);
        self.ok(&["restore", spec, "--to", to.to_str().unwrap()]);
        to
    }

    /// Every chunk file in the store.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.store().join("chunks")).unwrap() {
            for f in fs::read_dir(shard.unwrap().path()).unwrap() {
                out.push(f.unwrap().path());
            }
        }
        out.sort();
        out
    }
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Writes `len` random bytes at `off`.
pub fn write_random(path: &Path, off: u64, len: usize, rng: &mut impl RngCore) {
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    f.write_all_at(&buf, off).unwrap();
}

/// A sparse file of `size` bytes with no data.
pub fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// Byte-compares two files, with a useful message.
pub fn assert_same(a: &Path, b: &Path) {
    let o = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(o.status.success(), "{} and {} differ: {}", a.display(), b.display(), String::from_utf8_lossy(&o.stdout));
}

pub fn random_changes(path: &Path, size: u64, n: usize, rng: &mut impl Rng) {
    for _ in 0..n {
        let len = rng.gen_range(1..200_000usize);
        let off = rng.gen_range(0..size - len as u64);
        write_random(path, off, len, rng);
    }
}

pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no numeric {key} in {v}"))
}

/// The stdout of a command that must have succeeded; else a panic naming
/// `what`, the exit status, stdout and stderr.
pub fn stdout_of_success(what: &str, o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A restored image holds one known version: its first 8 bytes are the
/// round number of a reference copy in `refs`, and it equals that copy.
/// The restored file is removed.
pub fn assert_restored_round(out: &Path, refs: &std::collections::BTreeMap<u64, PathBuf>, id: u64) {
    let mut round = [0u8; 8];
    fs::File::open(out).unwrap().read_exact_at(&mut round, 0).unwrap();
    let round = u64::from_le_bytes(round);
    let reference = refs.get(&round).unwrap_or_else(|| panic!("backup {id} holds no known version ({round})"));
    assert_same(reference, out);
    fs::remove_file(out).unwrap();
}

/// A mount made for a test, unmounted when dropped (even when the test
/// fails), so no test leaves a mount behind.
pub struct Mount(PathBuf);

impl Mount {
    pub fn run(args: &[&str]) {
        let o = Command::new("mount").args(args).output().unwrap();
        assert!(o.status.success(), "mount {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    /// `src` seen read-only at `at` (a read-only bind mount).
    pub fn read_only_bind(src: &Path, at: &Path) -> Mount {
        fs::create_dir_all(at).unwrap();
        Mount::run(&["--bind", src.to_str().unwrap(), at.to_str().unwrap()]);
        let m = Mount(at.to_path_buf());
        Mount::run(&["-o", "remount,bind,ro", at.to_str().unwrap()]);
        m
    }
    /// A tmpfs of `size` at `at`.
    pub fn tmpfs(at: &Path, size: &str) -> Mount {
        fs::create_dir_all(at).unwrap();
        Mount::run(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str().unwrap()]);
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
