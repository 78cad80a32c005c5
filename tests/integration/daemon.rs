//! `blockvault daemon`: schedules fire, SIGHUP picks up config changes (and
//! survives a broken config), SIGTERM stops cleanly even in the middle of a
//! backup, and systemd hears READY/RELOADING/STATUS/STOPPING.
//!
//! No timing is asserted: every wait is for something to happen, with a
//! generous timeout.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(180);

/// A running daemon; killed if the test ends without stopping it.
struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(env: &Env, notify_socket: Option<&std::path::Path>) -> Daemon {
        let mut cmd = env.cmd(&["daemon"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
        if let Some(s) = notify_socket {
            cmd.env("NOTIFY_SOCKET", s);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (err, l) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Daemon { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(st.success(), "kill -{sig} failed");
    }

    /// Waits for `cond`, failing with the daemon's log after [`WAIT`].
    fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Daemon) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("daemon exited ({st}) while waiting for {what}; log:\n{}", self.log());
            }
            assert!(t.elapsed() < WAIT, "timed out waiting for {what}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < WAIT, "daemon did not exit after SIGTERM; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn backups_of(env: &Env, image: &str) -> Vec<u64> {
    env.list().iter().filter(|b| b["image"] == image).map(|b| num(b, "id")).collect()
}

/// Everything systemd was told so far.
fn drain(sock: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

#[test]
fn schedules_fire_and_sighup_reloads() {
    let env = Env::new(&[], "");
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    write_random(&a, 0, 1 << 20, &mut rng(61));
    write_random(&b, 0, 1 << 20, &mut rng(62));
    let (src_a, src_b) = (format!("file:{}", a.display()), format!("file:{}", b.display()));
    let extra = "[defaults]\nblock-size = \"64K\"\nschedule = \"*/2 * * * * *\"\n[daemon]\nmax-concurrent = 2\n";
    env.write_config(&[("a", &src_a)], "", extra);
    env.ok(&["init"]);

    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut told = Vec::new();

    let mut d = Daemon::start(&env, Some(&sock_path));
    d.wait_for("a first scheduled backup of a", |_| !backups_of(&env, "a").is_empty());
    drain(&sock, &mut told);
    assert!(told.iter().any(|m| m.contains("READY=1")), "no READY=1: {told:?}");
    assert!(told.iter().any(|m| m.contains("STATUS=")), "no STATUS=: {told:?}");

    // add image b; SIGHUP; b gets backed up too
    env.write_config(&[("a", &src_a), ("b", &src_b)], "", extra);
    d.signal("HUP");
    d.wait_for("a scheduled backup of b after SIGHUP", |_| !backups_of(&env, "b").is_empty());
    drain(&sock, &mut told);
    assert!(told.iter().any(|m| m.contains("RELOADING=1")), "no RELOADING=1: {told:?}");

    // a broken config is refused and the running one kept: a keeps going
    fs::write(&env.config, "[store]\npath = \"relative\"\n").unwrap();
    d.signal("HUP");
    d.wait_for("the reload error in the log", |d| d.log().contains("keeping the running config"));
    // (the good file back for `list`, without a reload)
    env.write_config(&[("a", &src_a), ("b", &src_b)], "", extra);
    let seen = backups_of(&env, "a").len();
    d.wait_for("more backups of a after a bad reload", |_| backups_of(&env, "a").len() > seen);

    // remove b; its schedule stops (no assertion on timing: just that the
    // daemon says so)
    env.write_config(&[("a", &src_a)], "", extra);
    d.signal("HUP");
    d.wait_for("b unscheduled", |d| d.log().contains("no longer scheduled"));

    let st = d.stop();
    assert!(st.success(), "daemon exit status {st}; log:\n{}", d.log());
    drain(&sock, &mut told);
    assert!(told.iter().any(|m| m.contains("STOPPING=1")), "no STOPPING=1: {told:?}");

    // everything it committed restores
    for (name, src) in [("a", &a), ("b", &b)] {
        let id = *backups_of(&env, name).last().unwrap();
        let out = env.restore(&format!("{name}@{id}"));
        assert_same(src, &out);
        fs::remove_file(out).unwrap();
    }
}

#[test]
fn sigterm_during_a_backup_stops_cleanly() {
    const SIZE: usize = 300 << 20;
    let env = Env::new(&[], "");
    let img = env.path("big.img");
    let mut r = rng(63);
    for off in (0..SIZE).step_by(16 << 20) {
        write_random(&img, off as u64, 16 << 20, &mut r);
    }
    let src = format!("file:{}", img.display());
    // Level 19 makes the backup slow enough that SIGTERM lands inside it.
    let slow = "compression-level = 19\n";
    let extra = "[defaults]\nblock-size = \"1M\"\nschedule = \"*/2 * * * * *\"\n";
    env.write_config(&[("big", &src)], slow, extra);
    env.ok(&["init"]);

    let mut d = Daemon::start(&env, None);
    d.wait_for("the backup to start", |d| d.log().contains("backup started"));
    std::thread::sleep(Duration::from_millis(500));
    let st = d.stop();
    let log = d.log();
    assert!(st.success(), "daemon exit status {st}; log:\n{log}");
    assert!(log.contains("daemon stopped"), "{log}");
    // (almost surely cancelled; if the backup beat the signal that is fine too)
    let cancelled = log.contains("backup cancelled");
    eprintln!("backup cancelled by SIGTERM: {cancelled}");

    // no temp files in the store
    let tmp: Vec<_> = fs::read_dir(env.store().join("tmp")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(tmp.is_empty(), "temp files left: {tmp:?}");
    let hidden: Vec<_> = fs::read_dir(env.store().join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "temp files left in backups/: {hidden:?}");

    // every committed backup restores
    let committed = backups_of(&env, "big");
    for id in &committed {
        let out = env.restore(&format!("big@{id}"));
        assert_same(&img, &out);
        fs::remove_file(out).unwrap();
    }

    // the next backup succeeds and finds no interrupted (still `running`) row
    env.write_config(&[("big", &src)], "compression-level = 1\n", extra);
    let o = env.run(&["backup", "big"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "next backup failed: {stderr}");
    assert!(!stderr.contains("interrupted"), "the daemon left a running row behind: {stderr}");
    let after = backups_of(&env, "big");
    assert_eq!(after.len(), committed.len() + 1);
    let out = env.restore(&format!("big@{}", after.last().unwrap()));
    assert_same(&img, &out);
}
