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

/// Copies a committed fixture store into `env`'s store path, with the
/// empty `tmp/` and `locks/` git does not keep.
fn copy_fixture_store(env: &Env, store: &Path) {
    copy_tree(store, &env.store());
    fs::create_dir_all(env.store().join("tmp")).unwrap();
    fs::create_dir_all(env.store().join("locks")).unwrap();
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

/// The three backups every fixture holds (`make-store-*.sh`).
fn fixture_backups() -> Vec<(u64, String, Option<u64>, bool)> {
    vec![(1, "disk".to_string(), None, true), (2, "disk".to_string(), Some(1), false), (3, "other".to_string(), None, false)]
}

/// A copied fixture store (`fx`, with `images.sha256`) lists its three
/// backups before and after `catalog rebuild`, verifies clean with
/// `--deep`, and restores each bit-identically. Returns the recorded
/// sha256 by image file name.
fn fixture_lists_verifies_and_restores(env: &Env, fx: &Path, what: &str) -> impl Fn(&str) -> String {
    let expected = fixture_backups();
    assert_eq!(summary(&env.list()), expected, "{what}: listing after the automatic rebuild");
    env.ok(&["catalog", "rebuild"]);
    assert_eq!(summary(&env.list()), expected, "{what}: listing after `catalog rebuild`");
    let v = env.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep of the {what}: {}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    let sums: Vec<(String, String)> = fs::read_to_string(fx.join("images.sha256"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace).map(|(h, n)| (n.trim().to_string(), h.to_string())))
        .collect();
    let want = move |file: &str| sums.iter().find(|(n, _)| n == file).unwrap_or_else(|| panic!("{file} not in images.sha256")).1.clone();
    fixture_backups_restore(env, &want, what);
    want
}

/// Each of the fixture's three backups restores to the image `want` names.
fn fixture_backups_restore(env: &Env, want: &impl Fn(&str) -> String, what: &str) {
    for (id, image, file) in [(1, "disk", "disk-1.img"), (2, "disk", "disk-2.img"), (3, "other", "other-1.img")] {
        let out = env.restore(&format!("{image}@{id}"));
        assert_eq!(sha256(&out), want(file), "{what}: backup {id} ({file}) does not restore bit-identically");
    }
}

#[test]
fn fixture_store_v1_restores_bit_identically() {
    let env = Env::new(&[], "");
    copy_fixture_store(&env, &fixtures().join("store-v1"));

    let expected = fixture_backups();
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

/// `tests/fixtures/store-v2-encrypted/`: an encrypted store written by the
/// format-2 code (XChaCha20-Poly1305, keyed blake3 ids, flat block maps at
/// 64 KiB blocks; blockvault at efbc19c, by
/// `tests/fixtures/make-store-v2-encrypted.sh`), with its key file. Today's
/// code (new encrypted stores are format 3, maps below 4 MiB blocks are
/// indexed) must list, verify and restore it bit-identically, and back up
/// into it.
#[test]
fn fixture_store_v2_encrypted_restores_bit_identically() {
    use std::os::unix::fs::PermissionsExt;
    let fx = fixtures().join("store-v2-encrypted");
    let env = Env::new(&[], "");
    copy_fixture_store(&env, &fx.join("store"));
    let key = env.path("store.key");
    fs::copy(fx.join("store.key"), &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let disk = env.path("disk.img");
    env.write_config(
        &[("disk", &format!("file:{}", disk.display())), ("other", &format!("file:{}", env.path("other.img").display()))],
        &format!("key-file = \"{}\"", key.display()),
        "[defaults]\nblock-size = \"64K\"\n",
    );
    let meta = fs::read_to_string(env.store().join("blockvault-store.json")).unwrap();
    assert!(meta.contains("\"format\": 2") && meta.contains("xchacha20poly1305"), "{meta}");

    let _ = fixture_lists_verifies_and_restores(&env, &fx, "format-2 encrypted fixture");

    // a new backup into the old store: an incremental on backup 2, then
    // restored; the store stays format 2
    let two = env.restore("disk@2");
    fs::copy(&two, &disk).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed by today's code", 70_000).unwrap();
    env.ok(&["backup", "disk"]);
    let list = env.list();
    assert_eq!(list.len(), 4);
    assert_eq!(list[3]["parent"], 2, "{}", list[3]);
    assert_same(&disk, &env.restore("disk@4"));
    assert_eq!(fs::read_to_string(env.store().join("blockvault-store.json")).unwrap(), meta, "the store meta is unchanged");
    let v = env.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep after a new backup: {}", String::from_utf8_lossy(&v.stdout));
}

/// `tests/fixtures/store-bm2-indexed/`: a store whose block maps are format
/// 2 (indexed, 64 blocks of 64 KiB per index chunk, with an all-zero group
/// and a short last one), written by blockvault at c6cbcc3 with
/// `tests/fixtures/make-store-bm2-indexed.sh`. Today's code writes format 3
/// (512 blocks per index chunk); it must list, verify and restore the
/// format-2 maps bit-identically, and take an incremental on one whose own
/// map is format 3.
#[test]
fn fixture_store_bm2_indexed_restores_bit_identically() {
    let fx = fixtures().join("store-bm2-indexed");
    let env = Env::new(&[], "");
    copy_fixture_store(&env, &fx.join("store"));
    let disk = env.path("disk.img");
    env.write_config(
        &[("disk", &format!("file:{}", disk.display())), ("other", &format!("file:{}", env.path("other.img").display()))],
        "gc-grace = 0",
        "[defaults]\nblock-size = \"64K\"\n",
    );
    let map_version = |id: u64| {
        let b = fs::read(env.store().join(format!("backups/{id:012}.blockmap"))).unwrap();
        u32::from_le_bytes(b[8..12].try_into().unwrap())
    };
    for id in [1, 2, 3] {
        assert_eq!(map_version(id), 2, "the fixture's backup {id} has a format-2 map");
    }
    let want = fixture_lists_verifies_and_restores(&env, &fx, "block-map-format-2 fixture");

    // an incremental on backup 2 (a format-2 parent): its map is format 3
    let two = env.restore("disk@2");
    fs::copy(&two, &disk).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed by today's code", 5 * 65536 + 100).unwrap();
    env.ok(&["backup", "disk"]);
    let list = env.list();
    assert_eq!(list.len(), 4);
    assert_eq!(list[3]["parent"], 2, "{}", list[3]);
    assert_eq!(map_version(4), 3, "a new backup's map is format 3");
    assert_same(&disk, &env.restore("disk@4"));
    let v = env.run(&["verify", "--deep"]);
    assert!(v.status.success(), "verify --deep after a new backup: {}", String::from_utf8_lossy(&v.stdout));
    // the old maps still restore after the new backup and a gc
    env.ok(&["gc"]);
    fixture_backups_restore(&env, &want, "block-map-format-2 fixture after a new backup and gc");
    assert_same(&disk, &env.restore("disk@4"));
}
