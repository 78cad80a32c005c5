//! Issue 16: snapshot hooks, what blockvault's kept snapshot holds on the
//! cluster (`held_bytes`), releasing images (by hand and from the RBD
//! trash), and read throttling — on the real throwaway cluster.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::rbd::{blockvault_snaps, ceph_conf, export_hash, file_hash, latest, rbd_cli, rbd_env, rbd_io, unique, FEATURES, MIB, POOL};

/// A shell command writing `byte` over the first 4 KiB of `image` (through
/// tests/integration/rbd_io.py, with an ops file so the TOML needs no
/// quoting), then appending `tag` to `log`.
fn stamp_cmd(dir: &Path, image: &str, byte: u8, tag: &str, log: &Path) -> String {
    let ops = dir.join(format!("ops-{tag}.json"));
    fs::write(&ops, json!([["fill", 0, 4096, byte]]).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/rbd_io.py");
    format!(
        "/usr/bin/python3 {} {POOL} {image} < {} && echo {tag} >> {}",
        script.display(),
        ops.display(),
        log.display()
    )
}

/// Adds `keys` to image entry `name` of the env's config.
fn set_image_keys(env: &Env, name: &str, keys: &str) {
    let cfg = fs::read_to_string(&env.config).unwrap();
    let at = format!("name = \"{name}\"\n");
    assert!(cfg.contains(&at), "{cfg}");
    fs::write(&env.config, cfg.replacen(&at, &format!("{at}{keys}\n"), 1)).unwrap();
}

fn log_of(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// The first 4 KiB of a file.
fn head4k(p: &Path) -> Vec<u8> {
    let mut b = fs::read(p).unwrap();
    b.truncate(4096);
    b
}

/// The pre hook writes marker A into the image and the post hook writes
/// marker B over it: the backup holds A (the snapshot was taken between
/// them), the image now holds B. The hooks see the image, source and
/// snapshot in their environment.
#[test]
fn pre_and_post_hooks_frame_the_snapshot() {
    let img = unique("hook-ab");
    rbd_io(&img, json!([["create", 16 * MIB, 0, FEATURES, 0, 0], ["write", 0, 8 * MIB, 1]]));
    let env = rbd_env(&[("h", &img)], "");
    let log = env.path("hooks.log");
    let envlog = env.path("env.log");
    let pre = format!(
        "echo \\\"$BLOCKVAULT_IMAGE $BLOCKVAULT_SOURCE $BLOCKVAULT_SNAPSHOT\\\" > {} && {}",
        envlog.display(),
        stamp_cmd(env.dir.path(), &img, b'A', "pre", &log)
    );
    let post = stamp_cmd(env.dir.path(), &img, b'B', "post", &log);
    set_image_keys(&env, "h", &format!("pre-snapshot = \"{pre}\"\npost-snapshot = \"{post}\"\nhook-timeout = \"60s\""));
    env.ok(&["backup", "h"]);
    assert_eq!(log_of(&log), "pre\npost\n");
    let l = latest(&env, "h");
    let snap = l["snapshot"].as_str().unwrap();
    assert_eq!(log_of(&envlog).trim(), format!("h rbd:{POOL}/{img} {snap}"));
    let out = env.restore(&format!("h@{}", num(&l, "id")));
    assert!(head4k(&out).iter().all(|&b| b == b'A'), "the backup does not hold the pre hook's marker");
    assert_eq!(file_hash(&out), export_hash(&format!("{img}@{snap}")));
    // the head has B: the post hook ran after the snapshot
    let head = env.path("head.raw");
    rbd_cli(&["export", "--no-progress", &format!("{POOL}/{img}"), head.to_str().unwrap()]);
    assert!(head4k(&head).iter().all(|&b| b == b'B'), "the post hook's marker is not on the image");
    rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
}

/// A failing pre hook fails the backup before any snapshot is taken; the
/// post hook still runs, once. A slow pre hook interrupted by SIGTERM: the
/// backup is cancelled, no snapshot is left, the post hook ran once.
#[test]
fn failing_or_interrupted_pre_hook() {
    let img = unique("hook-fail");
    rbd_io(&img, json!([["create", 16 * MIB, 0, FEATURES, 0, 0], ["write", 0, 4 * MIB, 2]]));
    let env = rbd_env(&[("f", &img)], "");
    // a first good backup: its snapshot must survive the failed ones
    env.ok(&["backup", "f"]);
    let kept = blockvault_snaps(&img);
    assert_eq!(kept.len(), 1);
    let log = env.path("hooks.log");
    let cfg0 = fs::read_to_string(&env.config).unwrap();
    set_image_keys(
        &env,
        "f",
        &format!("pre-snapshot = \"echo pre >> {0}; exit 7\"\npost-snapshot = \"echo post >> {0}\"", log.display()),
    );
    let err = env.fails(&["backup", "f"]);
    assert!(err.contains("pre-snapshot hook") && err.contains("exit status: 7"), "{err}");
    assert_eq!(log_of(&log), "pre\npost\n", "the post hook must run exactly once");
    assert_eq!(blockvault_snaps(&img), kept, "a failed pre hook left a snapshot");
    assert_eq!(env.list().len(), 1);

    // SIGTERM while the (slow) pre hook runs
    fs::remove_file(&log).unwrap();
    fs::write(&env.config, &cfg0).unwrap();
    let sleeper = env.path("sleeper.pid");
    set_image_keys(
        &env,
        "f",
        &format!(
            "pre-snapshot = \"echo pre >> {0}; echo $$ > {1}; sleep 60\"\npost-snapshot = \"echo post >> {0}\"\nhook-timeout = \"120s\"",
            log.display(),
            sleeper.display()
        ),
    );
    let child = env.cmd(&["backup", "f"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while !log_of(&log).contains("pre") {
        assert!(t.elapsed() < Duration::from_secs(60), "the pre hook never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the backup succeeded despite SIGTERM: {err}");
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(log_of(&log), "pre\npost\n", "the post hook must run exactly once: {err}");
    assert_eq!(blockvault_snaps(&img), kept, "an interrupted backup left a snapshot");
    // the hook's shell was killed with its group
    let pid = fs::read_to_string(&sleeper).unwrap();
    assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists(), "the pre hook's shell survived");
    assert_eq!(env.list().len(), 1);
    rbd_cli(&["snap", "purge", &format!("{POOL}/{img}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{img}")]);
}

fn snapshots_json(env: &Env) -> Vec<Value> {
    serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap()
}

fn entry<'a>(v: &'a [Value], name: &str) -> &'a Value {
    v.iter().find(|i| i["image"] == name).unwrap_or_else(|| panic!("no image {name} in {v:?}"))
}

/// `held_bytes` counts whole objects written since blockvault's snapshot
/// and is 0 right after a backup; `release` drops the snapshot (the next
/// backup is a full read); an image moved to the trash is released by the
/// next `run`, after which `rbd trash rm` succeeds, and its backups still
/// restore. The throttle is applied to an RBD backup's reads.
#[test]
fn held_bytes_release_and_trash() {
    let img = unique("held");
    let other = unique("held-other");
    // 4 MiB objects
    rbd_io(&img, json!([["create", 64 * MIB, 22, FEATURES, 0, 0], ["write", 0, 20 * MIB, 3]]));
    rbd_io(&other, json!([["create", 8 * MIB, 22, FEATURES, 0, 0], ["write", 0, MIB, 4]]));
    let env = rbd_env(&[("a", &img), ("o", &other)], "");
    let prom = env.path("bv.prom");
    let cfg = fs::read_to_string(&env.config).unwrap();
    fs::write(&env.config, format!("[metrics]\npath = \"{}\"\n{cfg}", prom.display())).unwrap();
    set_image_keys(&env, "a", "read-bandwidth = \"512M\"\nread-iops = 100000");
    let o = env.run(&["backup", "a", "--log-format", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the throttle saw every byte the backup read
    let l = latest(&env, "a");
    let throttle: Vec<Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "reads were throttled")
        .collect();
    assert_eq!(throttle.len(), 1, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(num(&throttle[0], "throttled_bytes"), num(&l, "read_bytes"), "{throttle:?} {l}");
    assert!(num(&l, "read_bytes") >= 20 * MIB);

    assert_eq!(num(entry(&snapshots_json(&env), "a"), "held_bytes"), 0);
    // three small writes into objects 0, 2 and 9, two into object 2 again
    rbd_io(&img, json!([["write", 100, 10, 5], ["write", 8 * MIB + 5, 3, 6], ["write", 9 * MIB, 4096, 7], ["write", 36 * MIB, 1, 8]]));
    let s = snapshots_json(&env);
    assert_eq!(num(entry(&s, "a"), "held_bytes"), 3 * 4 * MIB, "{s:?}");
    assert_eq!(entry(&s, "a")["removal_blocked"], true);
    assert_eq!(entry(&s, "a")["in_trash"], false);
    // run measures it after the backup: 0 again, in the metrics too
    env.ok(&["run", "a"]);
    assert_eq!(num(entry(&snapshots_json(&env), "a"), "held_bytes"), 0);
    let text = fs::read_to_string(&prom).unwrap();
    assert!(text.contains("blockvault_snapshot_held_bytes{image=\"a\"} 0\n"), "{text}");
    rbd_io(&img, json!([["write", 50 * MIB, 10, 9]]));
    // a backup of another image measures only that one; `o` has one now
    env.ok(&["run", "o"]);
    let text = fs::read_to_string(&prom).unwrap();
    assert!(text.contains("blockvault_snapshot_held_bytes{image=\"o\"} 0\n"), "{text}");

    // release by hand: the snapshot goes, the next backup reads everything
    let before = export_hash(&format!("{img}@{}", latest(&env, "a")["snapshot"].as_str().unwrap()));
    let out = env.ok(&["release", "a"]);
    assert!(out.contains("full read"), "{out}");
    assert!(blockvault_snaps(&img).is_empty());
    assert_eq!(num(entry(&snapshots_json(&env), "a"), "held_bytes"), 0);
    env.ok(&["backup", "a"]);
    let l = latest(&env, "a");
    assert_eq!(l["full_read"], true, "{l}");
    let snap = l["snapshot"].as_str().unwrap().to_string();
    let last_hash = export_hash(&format!("{img}@{snap}"));
    assert_ne!(before, last_hash);

    // to the trash: the snapshot blocks its purge, until the next run
    rbd_cli(&["trash", "mv", &format!("{POOL}/{img}")]);
    let trash: Vec<Value> = serde_json::from_str(&rbd_cli(&["trash", "ls", "--format", "json", POOL])).unwrap();
    let id = trash.iter().find(|t| t["name"] == img.as_str()).unwrap()["id"].as_str().unwrap().to_string();
    let blocked = std::process::Command::new("rbd")
        .args(["trash", "rm", "--no-progress", &format!("{POOL}/{id}")])
        .env("CEPH_CONF", ceph_conf())
        .output()
        .unwrap();
    assert!(!blocked.status.success(), "rbd trash rm succeeded although the image has a snapshot");
    let s = snapshots_json(&env);
    assert_eq!(entry(&s, "a")["in_trash"], true, "{s:?}");
    assert_eq!(entry(&s, "a")["removal_blocked"], true, "{s:?}");
    let text = env.ok(&["snapshots"]);
    assert!(text.contains("IN THE RBD TRASH"), "{text}");
    env.ok(&["run", "o"]);
    let s = snapshots_json(&env);
    assert_eq!(entry(&s, "a")["removal_blocked"], false, "{s:?}");
    // its backups stay restorable
    let out = env.restore(&format!("a@{}", num(&l, "id")));
    assert_eq!(file_hash(&out), last_hash);
    rbd_cli(&["trash", "rm", "--no-progress", &format!("{POOL}/{id}")]);
    rbd_cli(&["snap", "purge", &format!("{POOL}/{other}")]);
    rbd_cli(&["rm", "--no-progress", &format!("{POOL}/{other}")]);
}

/// A throttled backup of a file: the limiter is applied to every byte the
/// backup reads (no timing is asserted; see bench/throttle.sh for the rate).
#[test]
fn file_reads_are_throttled() {
    let env = Env::new(&[], "");
    let disk = env.path("disk.raw");
    write_random(&disk, 0, 6 * MIB as usize, &mut rng(16));
    env.write_config(&[("d", &format!("file:{}", disk.display()))], "", "");
    set_image_keys(&env, "d", "read-bandwidth = \"1G\"\nread-iops = 1000000");
    env.ok(&["init"]);
    let o = env.run(&["backup", "d", "--log-format", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = latest(&env, "d");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let t: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "reads were throttled")
        .unwrap_or_else(|| panic!("no throttle log: {stderr}"));
    assert_eq!(num(&t, "throttled_bytes"), num(&l, "read_bytes"));
    assert_eq!(num(&l, "read_bytes"), 6 * MIB);
    assert_eq!(num(&t, "read_bandwidth"), 1 << 30);
    assert_eq!(num(&t, "read_iops"), 1_000_000);
}
