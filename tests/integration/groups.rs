//! `[[group]]` sets on a real cluster: three images written by one writer
//! that stamps the same sequence number into all three (an application on
//! the three disks of a VM), paused by the group's pre-snapshot hook and
//! resumed by its post hook (as fsfreeze would); several sets backed up
//! while it runs; every restored set carries one number in all three.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;
use crate::rbd::{ceph_conf, export_hash, file_hash, rbd_cli, unique, MIB, POOL};

/// The sequence number stamped at `off` of a restored image.
fn seq_at(path: &Path, off: u64) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = [0u8; 25];
    f.read_exact(&mut b).unwrap();
    let s = std::str::from_utf8(&b).unwrap_or_else(|_| panic!("{}: no stamp at {off}: {b:?}", path.display()));
    let n = s.strip_prefix("seq=").and_then(|r| r.trim_end().parse().ok());
    n.unwrap_or_else(|| panic!("{}: no stamp at {off}: {s:?}", path.display()))
}

struct Writer {
    child: Child,
    stop: std::path::PathBuf,
}

impl Writer {
    fn start(dir: &Path, images: &[String]) -> Writer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/group_writer.py");
        let stop = dir.join("stop");
        let child = Command::new("/usr/bin/python3")
            .arg(script)
            .args([POOL, dir.join("flag").to_str().unwrap(), dir.join("ack").to_str().unwrap(), stop.to_str().unwrap()])
            .args(images)
            .env("CEPH_CONF", ceph_conf())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Writer { child, stop }
    }

    /// Stops the writer; returns the last sequence number it wrote.
    fn stop(mut self) -> u64 {
        fs::write(&self.stop, "").unwrap();
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
        assert!(out.status.success(), "group_writer.py failed");
        String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, "");
        let _ = self.child.wait();
    }
}

#[test]
fn group_sets_are_one_point_in_time_restore_whole_and_survive_a_rebuild() {
    let names: Vec<String> = (0..3).map(|i| unique(&format!("grp{i}"))).collect();
    for n in &names {
        rbd_cli(&["create", "--size", "16M", "--image-feature", "layering,exclusive-lock,object-map,fast-diff", &format!("{POOL}/{n}")]);
    }
    let env = Env::new(&[], "");
    let dir = env.dir.path().to_path_buf();
    let flag = dir.join("flag");
    let ack = dir.join("ack");
    let hooks_log = dir.join("hooks.log");
    // pre: a fresh token in the flag, then wait for the writer to pause on it
    let pre = format!(
        "echo pre >> {log}; t=$(date +%s%N); echo $t > {flag}.tmp && mv {flag}.tmp {flag}; \
         until [ \"$(cat {ack} 2>/dev/null)\" = \"$t\" ]; do sleep 0.01; done",
        log = hooks_log.display(),
        flag = flag.display(),
        ack = ack.display()
    );
    let post = format!("echo post >> {}; rm -f {}", hooks_log.display(), flag.display());
    let images: Vec<(String, String)> = names.iter().enumerate().map(|(i, n)| (format!("disk{i}"), format!("rbd:{POOL}/{n}"))).collect();
    let refs: Vec<(&str, &str)> = images.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let group = format!(
        "[[group]]\nname = \"vm1\"\nimages = [\"disk0\", \"disk1\", \"disk2\"]\npre-snapshot = '{pre}'\npost-snapshot = '{post}'\n\
         hook-timeout = \"20s\"\nretention = {{ keep-last = 3 }}\n"
    );
    env.write_config(&refs, "", "");
    let mut text = fs::read_to_string(&env.config).unwrap();
    text.push_str(&group);
    fs::write(&env.config, text).unwrap();
    env.ok(&["init"]);

    let writer = Writer::start(&dir, &names);
    std::thread::sleep(Duration::from_millis(500));
    const SETS: usize = 4;
    for _ in 0..SETS {
        let out = env.ok(&["run", "vm1"]);
        assert_eq!(out.lines().filter(|l| l.starts_with("vm1@")).count(), 3, "{out}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // `run --all` backs up the group (its images only through it)
    env.ok(&["run", "--all"]);
    let last = writer.stop();
    let hooks = fs::read_to_string(&hooks_log).unwrap();
    assert_eq!(hooks.lines().filter(|l| *l == "pre").count(), SETS + 1, "{hooks}");
    assert_eq!(hooks.lines().filter(|l| *l == "post").count(), SETS + 1, "{hooks}");

    let sets: Vec<Value> = serde_json::from_str(&env.ok(&["list", "vm1", "--json"])).unwrap();
    assert_eq!(sets.len(), SETS + 1, "{sets:?}");
    let backups = env.list();
    assert_eq!(backups.len(), 3 * (SETS + 1), "every backup is a set member");
    let mut seen = Vec::new();
    for s in &sets {
        assert_eq!(s["complete"], true, "{s}");
        assert_eq!(s["images"], serde_json::json!(["disk0", "disk1", "disk2"]));
        let id = num(s, "set");
        let to = dir.join(format!("set-{id}/"));
        let out = env.ok(&["restore", &format!("vm1@{id}"), "--to", to.to_str().unwrap()]);
        assert!(out.contains(&format!("restored set {id}")), "{out}");
        let stamps: Vec<u64> = (0..3)
            .flat_map(|i| {
                let p = to.join(format!("disk{i}"));
                [seq_at(&p, 0), seq_at(&p, MIB + 512)]
            })
            .collect();
        assert!(stamps.iter().all(|&n| n == stamps[0]), "set {id} mixes points in time: {stamps:?}");
        assert!(stamps[0] >= 1 && stamps[0] <= last, "set {id}: {stamps:?}, writer ended at {last}");
        seen.push(stamps[0]);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "sets in time order: {seen:?}");
    assert!(seen.first() < seen.last(), "the writer ran between the sets: {seen:?}");

    // the newest set restored to RBD, `{image}` naming each target; checked
    // against `rbd export` of each image's kept snapshot
    let newest = sets.last().unwrap();
    let prefix = unique("grprest");
    let to = format!("rbd:{POOL}/{prefix}-{{image}}");
    env.ok(&["restore", "vm1", "--to", &to]);
    for (i, n) in names.iter().enumerate() {
        let snap = newest["backups"][i]["snapshot"].as_str().unwrap();
        assert_eq!(export_hash(&format!("{prefix}-disk{i}")), export_hash(&format!("{n}@{snap}")), "disk{i}");
    }
    // a single image target for a set is refused, naming {image}
    let e = env.fails(&["restore", "vm1", "--to", dir.join("one.img").to_str().unwrap()]);
    assert!(e.contains("{image}"), "{e}");

    // the store records the sets: a rebuilt catalog lists the same
    let before = env.ok(&["list", "vm1", "--json"]);
    fs::remove_file(env.catalog()).unwrap();
    env.ok(&["catalog", "rebuild"]);
    assert_eq!(env.ok(&["list", "vm1", "--json"]), before);
    let restored = dir.join("after-rebuild/");
    env.ok(&["restore", &format!("vm1@{}", num(newest, "set")), "--to", restored.to_str().unwrap()]);
    let first = dir.join(format!("set-{}/disk0", num(newest, "set")));
    assert_eq!(file_hash(&restored.join("disk0")), file_hash(&first));

    // retention applies per set: keep-last = 3 keeps three whole sets
    env.ok(&["prune", "vm1"]);
    let kept: Vec<Value> = serde_json::from_str(&env.ok(&["list", "vm1", "--json"])).unwrap();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(kept.iter().all(|s| s["complete"] == true));
    assert_eq!(env.list().len(), 9);
    assert_eq!(kept.last().unwrap()["set"], newest["set"]);

    // a failing pre hook: no set, no snapshot left, the post hook ran once
    let mut text = fs::read_to_string(&env.config).unwrap();
    text = text.replace(&pre, &format!("echo pre >> {}; exit 3", hooks_log.display()));
    fs::write(&env.config, text).unwrap();
    fs::write(&hooks_log, "").unwrap();
    let snaps_before: Vec<String> = names.iter().map(|n| rbd_cli(&["snap", "ls", &format!("{POOL}/{n}")])).collect();
    let e = env.fails(&["run", "vm1"]);
    assert!(e.contains("vm1"), "{e}");
    assert_eq!(fs::read_to_string(&hooks_log).unwrap(), "pre\npost\n");
    let snaps_after: Vec<String> = names.iter().map(|n| rbd_cli(&["snap", "ls", &format!("{POOL}/{n}")])).collect();
    assert_eq!(snaps_before, snaps_after, "a failed set leaves no snapshot");
    let sets: Vec<Value> = serde_json::from_str(&env.ok(&["list", "vm1", "--json"])).unwrap();
    assert_eq!(sets.len(), 3);

    for i in 0..3 {
        let _ = Command::new("rbd").args(["rm", "--no-progress", &format!("{POOL}/{prefix}-disk{i}")]).env("CEPH_CONF", ceph_conf()).output();
    }
}
