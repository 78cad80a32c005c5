//! kill -9 at random moments during backups: afterwards the next backup
//! succeeds, every committed backup restores bit-identically, and no
//! committed backup references a missing chunk.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use rand::Rng;

use crate::common::*;

const SIZE: u64 = 48 << 20;

#[test]
fn kill_dash_nine_during_backups() {
    let env = Env::new(&[], "");
    let img = env.path("img");
    let mut r = rng(11);
    write_random(&img, 0, SIZE as usize, &mut r);
    env.write_config(&[("img", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["init"]);
    // Each version carries its round number in its first 8 bytes, so a
    // restored backup tells which reference it must equal.
    let mut refs: BTreeMap<u64, std::path::PathBuf> = BTreeMap::new();
    let mut new_version = |round: u64, r: &mut rand::rngs::StdRng| {
        random_changes(&img, SIZE, 20, r);
        fs::OpenOptions::new().write(true).open(&img).unwrap().write_all_at(&round.to_le_bytes(), 0).unwrap();
        let reference = env.path(&format!("ref-{round}"));
        fs::copy(&img, &reference).unwrap();
        refs.insert(round, reference);
    };
    // How long one round's backup takes here: kills land uniformly inside that.
    new_version(100, &mut r);
    env.ok(&["backup", "img"]);
    new_version(101, &mut r);
    let t = std::time::Instant::now();
    env.ok(&["backup", "img"]);
    let span_ms = (t.elapsed().as_millis() as u64 * 9 / 10).max(20);
    let mut killed = 0;
    for round in 1..=24u64 {
        new_version(round, &mut r);

        let mut child = env.cmd(&["backup", "img"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let delay = r.gen_range(0..span_ms);
        std::thread::sleep(Duration::from_millis(delay));
        match child.try_wait().unwrap() {
            Some(_) => {} // finished before the kill
            None => {
                child.kill().unwrap(); // SIGKILL
                killed += 1;
            }
        }
        let _ = child.wait();
    }
    assert!(killed >= 20, "only {killed} of 24 backups were killed mid-run; make the image larger");

    // the next backup succeeds
    env.ok(&["backup", "img"]);
    let tmp_left = fs::read_dir(env.store().join("tmp")).unwrap().count();
    assert_eq!(tmp_left, 0, "temp files left in the store after a successful run");

    // every committed backup restores bit-identically to its round's reference
    let list = env.list();
    assert!(list.len() >= 2, "too few committed backups: {}", list.len());
    for b in &list {
        let id = num(b, "id");
        assert_restored_round(&env.restore(&format!("img@{id}")), &refs, id);
    }
}
