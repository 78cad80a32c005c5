//! Issue 14 (operator polish): defects found by running blockvault as a new
//! operator would. Each test opens with the defect it pins down.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;

use crate::common::*;
use crate::rbd::{blockvault_snaps, latest, rbd_env, rbd_io, unique, FEATURES, MIB};

/// A running blockvault whose stderr is read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(env: &Env, args: &[&str]) -> Running {
        let mut child = env.cmd(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, seen: Vec::new() }
    }

    /// Waits for a stderr line containing `what` (or for the end of stderr).
    fn wait_for_line(&mut self, what: &str) -> bool {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(300)) {
            let hit = l.contains(what);
            self.seen.push(l);
            if hit {
                return true;
            }
        }
        false
    }

    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success(), "kill -{sig} failed");
    }

    /// Waits for the exit; returns the status and all of stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let st = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(l);
        }
        (st, self.seen.join("\n"))
    }
}

fn store_leftovers(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["tmp", "backups"] {
        let Ok(rd) = fs::read_dir(env.store().join(dir)) else { continue };
        for e in rd {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            if dir == "tmp" || n.starts_with('.') || n.contains("tmp") {
                out.push(format!("{dir}/{n}"));
            }
        }
    }
    out
}

/// Issue 14 item 3: `blockvault backup` installed no signal handler, so
/// SIGTERM (or Ctrl-C) killed it outright: temp files stayed in `tmp/`, an
/// RBD snapshot stayed that `snapshots` showed as held by a backup `list`
/// did not have, and the next backup stalled on the dead client's lock.
/// Now SIGTERM cancels as in `run`: nothing committed, nothing left behind,
/// and the next backup neither finds an interrupted run nor waits on a lock.
#[test]
fn sigterm_of_backup_leaves_nothing_behind() {
    let img = unique("sigterm");
    rbd_io(&img, json!([["create", 512 * MIB, 0, FEATURES, 0, 0], ["write", 0, 384 * MIB, 21]]));
    let env = rbd_env(&[("img", &img)], "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["backup", "img"]);
    let before = env.list();
    let held = blockvault_snaps(&img);
    assert_eq!(held.len(), 1);

    rbd_io(&img, json!([["write", 0, 384 * MIB, 22]]));
    let mut r = Running::start(&env, &["backup", "img"]);
    assert!(r.wait_for_line("backup started"), "the backup did not start: {:?}", r.seen);
    r.signal("TERM");
    let (st, err) = r.finish();
    assert!(!st.success(), "a cancelled backup exited 0: {err}");
    assert!(err.contains("SIGTERM: cancelling"), "no word of the signal: {err}");
    assert!(err.contains("backup cancelled"), "{err}");
    assert!(st.code().is_some(), "killed by the signal instead of exiting: {st}");

    assert_eq!(env.list(), before, "a cancelled backup changed the list");
    assert_eq!(blockvault_snaps(&img), held, "the cancelled backup's snapshot was left on the cluster");
    assert_eq!(store_leftovers(&env), Vec::<String>::new(), "temp files left in the store");

    let o = env.run(&["backup", "img"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("interrupted"), "the cancelled backup left a running row: {err}");
    assert!(!err.contains("exclusive lock"), "the cancelled backup left its lock behind: {err}");
    let l = latest(&env, "img");
    assert_eq!(blockvault_snaps(&img), vec![l["snapshot"].as_str().unwrap().to_string()]);
}

/// Issue 14 item 3: after a `kill -9` in the middle of a backup, the next
/// backup stalled ~30 s (librbd waiting for the dead client's exclusive
/// lock) without a word. It must say what it does about the lock: break
/// it (the dead run is ours) or say that it waits and why.
#[test]
fn after_kill_9_the_next_backup_says_what_it_does_about_the_lock() {
    let img = unique("kill9");
    rbd_io(&img, json!([["create", 256 * MIB, 0, FEATURES, 0, 0], ["write", 0, 192 * MIB, 23]]));
    let env = rbd_env(&[("img", &img)], "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["backup", "img"]);
    rbd_io(&img, json!([["write", 0, 192 * MIB, 24]]));
    let mut r = Running::start(&env, &["backup", "img"]);
    assert!(r.wait_for_line("backup started"), "the backup did not start: {:?}", r.seen);
    r.signal("KILL");
    let _ = r.finish();

    let o = env.run(&["backup", "img"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("interrupted"), "the killed run was not noticed: {err}");
    assert!(
        err.contains("broke the exclusive lock left by a blockvault run that is dead")
            || err.contains("waits until its watch expires"),
        "the next backup said nothing about the dead run's lock: {err}"
    );
    let l = latest(&env, "img");
    assert_eq!(blockvault_snaps(&img), vec![l["snapshot"].as_str().unwrap().to_string()]);
}

/// The sample value of `metric{label="value"}` in a Prometheus text file.
fn sample(text: &str, metric: &str, label: &str, value: &str) -> Option<f64> {
    let prefix = format!("{metric}{{{label}=\"{value}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().unwrap())
}

fn img_sample(text: &str, metric: &str, image: &str) -> Option<f64> {
    sample(text, metric, "image", image)
}

fn metrics_extra(env: &Env, more: &str) -> (String, std::path::PathBuf) {
    let prom = env.path("blockvault.prom");
    (format!("[metrics]\npath = \"{}\"\n{more}", prom.display()), prom)
}

/// Writes a config whose `[[image]]` entries are `(name, source)` as given
/// (a glob source as is), with `extra` before them.
fn write_raw_config(env: &Env, images: &[(&str, &str)], extra: &str) {
    env.write_config(images, "", extra);
}

/// A copy of the cluster's conf whose monitor nobody listens on.
fn dead_conf(env: &Env) -> std::path::PathBuf {
    let real = fs::read_to_string(crate::rbd::ceph_conf()).unwrap();
    let dead: Vec<String> = real
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("mon_host") || t.starts_with("mon host") { "mon_host = v2:127.0.0.1:9".to_string() } else { l.to_string() }
        })
        .collect();
    let p = env.path("dead.conf");
    fs::write(&p, dead.join("\n")).unwrap();
    p
}

/// Issue 14 items 1, 2 and 11, on globs:
/// 1. a glob that matched nothing made `run --all` print nothing, exit 0
///    and write no metrics (a one-character typo meant no backups and no
///    signal): now a warning, a non-zero exit and a metric that alerts;
/// 11. an RBD image deleted from the cluster kept its series under the
///    glob forever (tripping the staleness alert): it leaves the file;
/// 2. with the cluster down, the glob entry failed as `{image}` and the
///    images under it kept `last_run_success 1`, `failures_total 0`: now
///    every image known under the glob is marked failed.
#[test]
fn globs_that_match_nothing_or_cannot_be_listed_alert() {
    let tag = unique("glob");
    let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
    for i in [&a, &b] {
        rbd_io(i, json!([["create", 8 * MIB, 0, FEATURES, 0, 0], ["write", 0, MIB, 31]]));
    }
    let env = rbd_env(&[], "");
    let (mx, prom) = metrics_extra(&env, "");
    let glob = format!("rbd:rbd/{tag}-*");
    let nomatch = format!("rbd:rbd/{tag}-nomatch-*");
    write_raw_config(&env, &[("g-{image}", &glob), ("typo-{image}", &nomatch)], &mx);

    // 1: the typo fails the run, loudly, and the metrics say so
    let o = env.run(&["run", "--all"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a glob matching nothing exited 0: {err}");
    assert!(err.contains("the glob matches no RBD image"), "no warning: {err}");
    assert!(err.contains("typo-{image}"), "the entry is not named: {err}");
    let text = fs::read_to_string(&prom).expect("no metrics written");
    assert_eq!(sample(&text, "blockvault_glob_matched_images", "entry", "typo-{image}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "blockvault_glob_matched_images", "entry", "g-{image}"), Some(2.0), "{text}");
    for i in [&a, &b] {
        assert_eq!(img_sample(&text, "blockvault_last_run_success", &format!("g-{i}")), Some(1.0), "{text}");
    }

    // 11: an RBD image removed from the cluster leaves the metrics
    write_raw_config(&env, &[("g-{image}", &glob)], &mx);
    crate::rbd::rbd_cli(&["snap", "purge", "--no-progress", &format!("rbd/{b}")]);
    crate::rbd::rbd_cli(&["rm", "--no-progress", &format!("rbd/{b}")]);
    env.ok(&["run", "--all"]);
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(img_sample(&text, "blockvault_last_run_success", &format!("g-{a}")), Some(1.0), "{text}");
    assert!(!text.contains(&format!("image=\"g-{b}\"")), "a deleted image keeps its series: {text}");
    assert!(!text.contains("typo-{image}"), "an entry no longer configured keeps its series: {text}");

    // 2: cluster down: every image known under the glob is failed
    let dead = dead_conf(&env);
    let (mx, _) = metrics_extra(&env, &format!("[ceph]\nconf = \"{}\"\ntimeout = 5\n", dead.display()));
    write_raw_config(&env, &[("g-{image}", &glob)], &mx);
    let o = env.run(&["run", "--all"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(img_sample(&text, "blockvault_last_run_success", &format!("g-{a}")), Some(0.0), "{text}");
    assert_eq!(img_sample(&text, "blockvault_backup_failures_total", &format!("g-{a}")), Some(1.0), "{text}");
    assert_eq!(sample(&text, "blockvault_glob_last_expansion_success", "entry", "g-{image}"), Some(0.0), "{text}");
    assert!(!text.contains("image=\"g-{image}\""), "the template is reported as an image: {text}");
}

/// Issue 14 item 2: the daemon ran a glob entry as one job named `{image}`
/// (its images one after another, `max-concurrent` not applied, failures
/// reported as `{image}`). Now each image the glob matches is its own job.
#[test]
fn daemon_runs_each_image_of_a_glob_as_its_own_job() {
    let tag = unique("dglob");
    let names: Vec<String> = (0..3).map(|i| format!("{tag}-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        rbd_io(n, json!([["create", 8 * MIB, 0, FEATURES, 0, 0], ["write", 0, MIB, 40 + i]]));
    }
    let env = rbd_env(&[], "");
    let glob = format!("rbd:rbd/{tag}-*");
    write_raw_config(&env, &[("d-{image}", &glob)], "[defaults]\nschedule = \"*/2 * * * * *\"\n[daemon]\nmax-concurrent = 1\n");
    let mut r = Running::start(&env, &["daemon"]);
    let mut done = std::collections::BTreeSet::new();
    while done.len() < names.len() {
        assert!(r.wait_for_line("scheduled run done"), "daemon ended: {:?}", r.seen);
        let l = r.seen.last().unwrap().clone();
        if let Some(n) = names.iter().find(|n| l.contains(&format!("d-{n}"))) {
            done.insert(n.clone());
        }
    }
    for l in r.seen.iter().filter(|l| l.contains("starting scheduled backup") || l.contains("scheduled run")) {
        assert!(!l.contains("{image}"), "a glob entry ran as one job: {l}");
    }
    r.signal("TERM");
    let (st, log) = r.finish();
    assert!(st.success(), "{log}");
    assert!(log.contains("glob expanded: queueing each image"), "{log}");
    let listed: std::collections::BTreeSet<String> =
        env.list().iter().map(|b| b["image"].as_str().unwrap().to_string()).collect();
    for n in &names {
        assert!(listed.contains(&format!("d-{n}")), "no backup of d-{n}: {listed:?}");
    }
}

/// Bytes that zstd compresses well but slowly at level 19 (3 bits of
/// entropy per byte), so a backup lasts long enough to be signalled.
fn slow_data(path: &std::path::Path, len: usize, seed: u64) {
    use rand::Rng;
    let mut r = rng(seed);
    let buf: Vec<u8> = (0..len).map(|_| b'a' + r.gen_range(0..8u8)).collect();
    fs::write(path, buf).unwrap();
}

/// Issue 14 items 10 and 11: stopping the daemon (SIGTERM during a backup)
/// set `last_run_success 0`, so every reboot alerted; and an image taken out
/// of the config kept its series. A cancel is not a failure: the metrics
/// keep the run before it. An image no longer configured leaves the file.
#[test]
fn metrics_after_a_daemon_stop_and_after_an_image_leaves_the_config() {
    let env = Env::new(&[], "");
    let img = env.path("slow.img");
    slow_data(&img, 96 << 20, 77);
    let other = env.path("other.img");
    write_random(&other, 0, 1 << 20, &mut rng(78));
    let (mx, prom) = metrics_extra(&env, "[defaults]\nblock-size = \"1M\"\n");
    let src = format!("file:{}", img.display());
    let osrc = format!("file:{}", other.display());
    env.write_config(&[("slow", &src), ("other", &osrc)], "compression-level = 1\n", &mx);
    env.ok(&["init"]);
    env.ok(&["run", "--all"]);
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(img_sample(&text, "blockvault_last_run_success", "slow"), Some(1.0), "{text}");
    assert_eq!(img_sample(&text, "blockvault_last_run_success", "other"), Some(1.0), "{text}");

    // new data, so the next backup has work; level 19 makes it slow
    slow_data(&img, 96 << 20, 79);
    let cfg = format!(
        "[defaults]\nblock-size = \"1M\"\nschedule = \"*/2 * * * * *\"\n[metrics]\npath = \"{}\"\n",
        prom.display()
    );
    env.write_config(&[("slow", &src)], "compression-level = 19\n", &cfg);
    let mut r = Running::start(&env, &["daemon"]);
    assert!(r.wait_for_line("backup started"), "{:?}", r.seen);
    r.signal("TERM");
    let (st, log) = r.finish();
    assert!(st.success(), "{log}");
    assert!(log.contains("backup cancelled"), "the backup was not cancelled by the stop (it finished first?): {log}");
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(img_sample(&text, "blockvault_last_run_success", "slow"), Some(1.0), "a daemon stop counted as a failure: {text}");
    assert_eq!(img_sample(&text, "blockvault_backup_failures_total", "slow"), Some(0.0), "{text}");
    // 11: "other" is no longer configured: no series for it
    assert!(!text.contains("image=\"other\""), "an image no longer configured keeps its series: {text}");
}

/// Issue 14 item 5: with `keep-snapshots = 2`, deleting the newest
/// blockvault snapshot by hand gave a full read although the older one was
/// still held. The newest held snapshot whose backup is valid is the base.
#[test]
fn keep_snapshots_falls_back_to_the_newest_held_snapshot() {
    let img = unique("keep2");
    rbd_io(&img, json!([["create", 64 * MIB, 0, FEATURES, 0, 0], ["write", 0, 20 * MIB, 51]]));
    let env = rbd_env(&[("img", &img)], "[defaults]\nkeep-snapshots = 2\n");
    env.ok(&["backup", "img"]);
    let first = latest(&env, "img");
    rbd_io(&img, json!([["write", 40 * MIB, 100, 52]]));
    env.ok(&["backup", "img"]);
    let second = latest(&env, "img");
    assert_eq!(blockvault_snaps(&img).len(), 2);
    let newest = second["snapshot"].as_str().unwrap();
    crate::rbd::rbd_cli(&["snap", "rm", "--no-progress", &format!("rbd/{img}@{newest}")]);

    rbd_io(&img, json!([["write", 50 * MIB, 100, 53]]));
    let o = env.run(&["backup", "img"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("falling back to a full read"), "a full read although an older snapshot is held: {err}");
    assert!(err.contains("an older backup whose snapshot is still held is the base"), "{err}");
    let third = latest(&env, "img");
    assert_eq!(third["full_read"], false, "{third}");
    assert_eq!(third["parent"], first["id"], "{third}");
    // two 4 MiB blocks changed since the first backup's snapshot
    assert!(num(&third, "read_bytes") <= 8 * MIB, "{third}");
    // issue 14 item 9: list shows protection, validity, and which
    // snapshots are gone (the second backup's was deleted by hand)
    env.ok(&["protect", &format!("img@{}", num(&first, "id"))]);
    let text = env.ok(&["list", "img"]);
    let line = |id: u64| text.lines().find(|l| l.split_whitespace().next() == Some(&id.to_string())).unwrap().to_string();
    assert!(text.lines().next().unwrap().contains("PROT") && text.contains("VERIFY"), "{text}");
    assert!(line(num(&first, "id")).contains(" yes "), "{text}");
    assert!(line(num(&second, "id")).contains("(gone)"), "{text}");
    assert!(!line(num(&third, "id")).contains("(gone)"), "{text}");
    assert!(!line(num(&first, "id")).contains("(gone)"), "{text}");
    for b in env.list() {
        assert_eq!(b["valid"], true, "{b}");
        assert_eq!(b["verify_state"], "unverified", "{b}");
    }
    let snap = third["snapshot"].as_str().unwrap();
    let out = env.restore(&format!("img@{}", num(&third, "id")));
    assert_eq!(crate::rbd::file_hash(&out), crate::rbd::export_hash(&format!("{img}@{snap}")));
}

/// Issue 14 item 8: cron errors said `Minutes must be less than 59` and
/// showed the internal six-field form, `"daily"` talked of the Seconds
/// field, `"0 2 * *"` printed a caret with no reason, and seven fields were
/// accepted. Now each names the field and the forms a schedule takes, and
/// the `@daily` style shorthands work.
#[test]
fn cron_errors_speak_the_operators_terms() {
    let env = Env::new(&[], "");
    let img = env.path("a.img");
    sparse_file(&img, 1 << 20);
    let src = format!("file:{}", img.display());
    let cases = [
        ("61 1 * * *", "minute 61 is out of range"),
        ("daily", "'@daily'"),
        ("0 2 * *", "has 4 fields"),
        ("0 0 2 * * * 2030", "has 7 fields"),
    ];
    for (expr, needle) in cases {
        env.write_config(&[("a", &src)], "", &format!("[defaults]\nschedule = \"{expr}\"\n"));
        let err = env.fails(&["list"]);
        assert!(err.contains(needle), "{expr}: {err}");
        assert!(err.contains("defaults.schedule"), "{expr}: the key is not named: {err}");
        assert!(!err.contains(&format!("0 {expr}")), "{expr}: the internal form is shown: {err}");
    }
    env.write_config(&[("a", &src)], "", "[defaults]\nschedule = \"@daily\"\n");
    env.ok(&["init"]);
    env.ok(&["list"]);
}

/// Issue 14 item 12: the shipped /etc/blockvault/config.toml backed up two
/// placeholder images, so an enabled timer failed on a fresh install. The
/// package's config (packaging/config.toml) has a valid store section and
/// no image: it loads, `init` works on it, and a run names the cause.
#[test]
fn the_packaged_config_backs_up_nothing() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.toml");
    let text = fs::read_to_string(&shipped).unwrap();
    assert!(!text.lines().any(|l| l.trim_start().starts_with("[[image]]")), "an image is configured");
    let env = Env::new(&[], "");
    let t = text
        .replace("/var/lib/blockvault/store", env.store().to_str().unwrap())
        .replace("/var/lib/blockvault/catalog.sqlite", env.catalog().to_str().unwrap());
    assert_ne!(t, text, "the store and catalog paths moved: update this test");
    fs::write(&env.config, t).unwrap();
    env.ok(&["init"]);
    assert_eq!(env.list(), Vec::<serde_json::Value>::new());
    let err = env.fails(&["run", "--all"]);
    assert!(err.contains("has no [[image]]"), "{err}");
}

/// Issue 14 item 6: JSON logs carried Rust debug strings
/// (`"parent":"Some(25)"`), and config errors and the final error line
/// stayed plain text under `--log-format json`. Every stderr line is now a
/// JSON object, and no value is a debug string.
#[test]
fn json_logs_are_json_to_the_last_line() {
    let env = Env::new(&[], "");
    let img = env.path("a.img");
    write_random(&img, 0, 1 << 20, &mut rng(91));
    env.write_config(&[("a", &format!("file:{}", img.display()))], "", "");
    env.ok(&["init"]);
    let check = |o: &std::process::Output| -> Vec<serde_json::Value> {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("Some("), "a debug string in the log: {err}");
        err.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    for _ in 0..2 {
        let o = env.run(&["--log-format", "json", "backup", "a"]);
        assert!(o.status.success());
        check(&o);
    }
    let lines = check(&env.run(&["--log-format", "json", "backup", "a"]));
    let started = lines.iter().find(|l| l["message"] == "backup started").expect("no 'backup started'");
    assert!(started["parent"].is_u64(), "{started}");

    // a config error, then the final error line: JSON too
    fs::write(&env.config, "[store]\npath = \"relative\"\n").unwrap();
    let o = env.run(&["--log-format", "json", "list"]);
    assert!(!o.status.success());
    let lines = check(&o);
    let last = lines.last().expect("no error line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(last["error"].as_str().unwrap().contains("store.path"), "{last}");
}

/// Issue 14 item 7: a cephx user without caps got a bare `Operation not
/// permitted (errno 1)`. The error names the caps a backup user needs.
#[test]
fn a_cephx_user_without_caps_is_told_which_caps() {
    let img = unique("caps");
    rbd_io(&img, json!([["create", 8 * MIB, 0, FEATURES, 0, 0], ["write", 0, MIB, 61]]));
    let env = rbd_env(&[], "");
    let user = format!("bvnocaps{}", std::process::id());
    let keyring = env.path("nocaps.keyring");
    let o = std::process::Command::new("ceph")
        .args(["auth", "get-or-create", &format!("client.{user}"), "mon", "allow r", "-o"])
        .arg(&keyring)
        .env("CEPH_CONF", crate::rbd::ceph_conf())
        .output()
        .unwrap();
    assert!(o.status.success(), "ceph auth: {}", String::from_utf8_lossy(&o.stderr));
    let extra = format!("[ceph]\nclient-id = \"{user}\"\nkeyring = \"{}\"\ntimeout = 10\n", keyring.display());
    env.write_config(&[("img", &format!("rbd:rbd/{img}"))], "", &extra);
    let err = env.fails(&["backup", "img"]);
    assert!(err.contains("profile rbd"), "the caps are not named: {err}");
}

/// Issue 14 item 9: a restore into a missing directory reported a
/// `.x.img.blockvault-partial` temp path instead of the directory.
#[test]
fn restore_into_a_missing_directory_names_the_directory() {
    let env = Env::new(&[], "");
    let img = env.path("a.img");
    write_random(&img, 0, 1 << 20, &mut rng(95));
    env.write_config(&[("a", &format!("file:{}", img.display()))], "", "");
    env.ok(&["init"]);
    env.ok(&["backup", "a"]);
    let missing = env.path("no-such-dir");
    let to = missing.join("x.img");
    let err = env.fails(&["restore", "a", "--to", to.to_str().unwrap()]);
    assert!(err.contains(&format!("the directory {} of restore target", missing.display())), "{err}");
    assert!(!err.contains("blockvault-partial"), "{err}");
}
