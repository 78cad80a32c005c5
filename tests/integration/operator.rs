//! Issue 14 (operator polish): defects found by running blockvault as a new
//! operator would. Each test opens with the defect it pins down.

use std::fs;
use std::io::{BufRead, BufReader};
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
