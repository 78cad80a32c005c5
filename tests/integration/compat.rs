//! Stores written by every released format version keep working (issue 10:
//! "Must show"). `tests/fixtures/store-v1/` was written by the format-1 code
//! (see `tests/fixtures/README.md`); it must list, verify and restore
//! bit-identically with every later build. Never edit the fixture: a new
//! format version adds a new fixture and a test beside this one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().expect("sha256sum (coreutils) runs");
    assert!(o.status.success(), "sha256sum {}: {}", p.display(), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// The recorded sha256 of each image, by file name.
fn recorded() -> Vec<(String, String)> {
    fs::read_to_string(fixtures().join("store-v1.sha256"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (h, n) = l.split_once(char::is_whitespace).unwrap();
            (n.trim().to_string(), h.to_string())
        })
        .collect()
}

fn summary(list: &[Value]) -> Vec<(u64, String, Option<u64>, bool)> {
    list.iter()
        .map(|b| (num(b, "id"), b["image"].as_str().unwrap().to_string(), b["parent"].as_u64(), b["protected"] == true))
        .collect()
}

#[test]
fn fixture_store_v1_restores_bit_identically() {
    let env = Env::new(&[], "");
    copy_tree(&fixtures().join("store-v1"), &env.store());
    // git keeps no empty directories
    fs::create_dir_all(env.store().join("tmp")).unwrap();
    fs::create_dir_all(env.store().join("locks")).unwrap();

    let expected = vec![
        (1, "disk".to_string(), None, true),
        (2, "disk".to_string(), Some(1), false),
        (3, "other".to_string(), None, false),
    ];
    // no catalog yet: the first command rebuilds it from the store
    assert_eq!(summary(&env.list()), expected, "listing after the automatic rebuild");
    env.ok(&["catalog", "rebuild"]);
    let list = env.list();
    assert_eq!(summary(&list), expected, "listing after `catalog rebuild`");

    let v = env.run(&["verify", "--deep"]);
    assert!(
        v.status.success(),
        "verify --deep of the format-1 fixture is not clean:\n{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    let sums = recorded();
    for (id, image, file) in [(1, "disk", "disk-1.img"), (2, "disk", "disk-2.img"), (3, "other", "other-1.img")] {
        let want = &sums.iter().find(|(n, _)| n == file).unwrap_or_else(|| panic!("{file} not in store-v1.sha256")).1;
        let out = env.restore(&format!("{image}@{id}"));
        assert_eq!(&sha256(&out), want, "backup {id} ({file}) does not restore bit-identically");
        let size = list.iter().find(|b| num(b, "id") == id).map(|b| num(b, "size")).unwrap();
        assert_eq!(fs::metadata(&out).unwrap().len(), size, "backup {id}: restored size");
    }
}
