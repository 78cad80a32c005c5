//! Issue 15: encryption at rest. Every object of an encrypted store is
//! sealed, chunk ids are keyed, and only the key file (plus its passphrase,
//! when its slot has one) opens the store; a wrong or missing key, or a
//! tampered object, fails before anything is written.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use crate::common::*;

const BS: usize = 64 * 1024;

/// An encrypted store over image `img` (`file:`), key file `key`.
fn encrypted_env(img_name: &str, make: impl FnOnce(&Path), pass: Option<&str>) -> (Env, PathBuf, PathBuf) {
    let env = Env::new(&[], "");
    let img = env.path(img_name);
    make(&img);
    let key = env.path("store.key");
    write_config(&env, &img, img_name, &key);
    let mut c = env.cmd(&["init", "--encrypt"]);
    if let Some(p) = pass {
        c.arg("--passphrase").env("BLOCKVAULT_PASSPHRASE", p);
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "init: {}", String::from_utf8_lossy(&o.stderr));
    (env, img, key)
}

fn write_config(env: &Env, img: &Path, name: &str, key: &Path) {
    env.write_config(
        &[(name, &format!("file:{}", img.display()))],
        &format!("key-file = \"{}\"", key.display()),
        "[defaults]\nblock-size = \"64K\"\n",
    );
}

/// Runs with `BLOCKVAULT_PASSPHRASE` set (or unset) and no terminal.
fn run_with(env: &Env, pass: Option<&str>, args: &[&str]) -> Output {
    let mut c = env.cmd(args);
    c.env_remove("BLOCKVAULT_PASSPHRASE").env_remove("BLOCKVAULT_NEW_PASSPHRASE").stdin(Stdio::null());
    if let Some(p) = pass {
        c.env("BLOCKVAULT_PASSPHRASE", p);
    }
    c.output().unwrap()
}

fn ok_with(env: &Env, pass: Option<&str>, args: &[&str]) -> String {
    let o = run_with(env, pass, args);
    assert!(o.status.success(), "blockvault {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fails_with(env: &Env, pass: Option<&str>, args: &[&str]) -> String {
    let o = run_with(env, pass, args);
    assert!(!o.status.success(), "blockvault {args:?} unexpectedly succeeded");
    String::from_utf8(o.stderr).unwrap()
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// The files of `dir` holding any 64-byte run of `marker` (whose period is
/// `period`: every 64-byte run of the repeated marker is one of the
/// `period` runs starting in its first period).
fn files_with_a_run(dir: &Path, marker: &[u8], period: usize) -> Vec<PathBuf> {
    let runs: HashSet<&[u8]> = (0..period).map(|i| &marker[i..i + 64]).collect();
    all_files(dir).into_iter().filter(|f| fs::read(f).unwrap().windows(64).any(|w| runs.contains(w))).collect()
}

const PERIOD: usize = 4096;

/// An 8 MiB image: 3 MiB of a repeated 4 KiB marker, random data elsewhere.
fn marked_image(p: &Path) -> Vec<u8> {
    write_random(p, 0, 8 << 20, &mut rng(15));
    let mut pattern = vec![0u8; PERIOD];
    rand::RngCore::fill_bytes(&mut rng(1515), &mut pattern);
    let marker: Vec<u8> = pattern.iter().copied().cycle().take(3 << 20).collect();
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &marker, 2 << 20).unwrap();
    marker
}

/// The marker is in no file of an encrypted store, nor any 64-byte run of
/// it, through backups, verify, gc, forget and a catalog rebuild; the same
/// image in an unencrypted store does show it (so the search can fail).
#[test]
fn marker_is_in_no_file_of_the_store() {
    let mut marker = Vec::new();
    let (env, img, _key) = encrypted_env("img", |p| marker = marked_image(p), None);
    env.ok(&["backup", "img"]);
    write_random(&img, 7 << 20, 100_000, &mut rng(16));
    env.ok(&["backup", "img"]);
    env.ok(&["verify", "--deep"]);
    env.ok(&["catalog", "rebuild"]);
    assert_eq!(env.list().len(), 2);
    env.ok(&["forget", "img@1"]);
    env.ok(&["gc"]);
    env.ok(&["verify", "--deep"]);
    let out = env.restore("img@2");
    assert_same(&img, &out);
    let found = files_with_a_run(&env.store(), &marker, PERIOD);
    assert!(found.is_empty(), "marker runs in {found:?}");
    // the meta is plain JSON and says the store is encrypted, never a key
    let meta = fs::read_to_string(env.store().join("blockvault-store.json")).unwrap();
    // format 3: AES-256-GCM (format-2 XChaCha20-Poly1305 stores still open: store unit tests)
    assert!(meta.contains("\"format\": 3") && meta.contains("aes256gcm-subkey"), "{meta}");

    let plain = Env::new(&[], "");
    plain.write_config(&[("img", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"64K\"\n");
    plain.ok(&["init"]);
    plain.ok(&["backup", "img"]);
    assert!(!files_with_a_run(&plain.store(), &marker, PERIOD).is_empty(), "the control store should hold the marker");
}

fn chunk_names(env: &Env) -> HashSet<String> {
    env.chunk_files().iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect()
}

/// The same image in two encrypted stores: no chunk name in common; in an
/// unencrypted store the names are the plain blake3 of the blocks.
#[test]
fn keyed_chunk_names() {
    let make = |p: &Path| write_random(p, 0, 2 << 20, &mut rng(17));
    let (a, img, _) = encrypted_env("img", make, None);
    a.ok(&["backup", "img"]);
    let (b, img_b, _) = encrypted_env("img", make, None);
    b.ok(&["backup", "img"]);
    assert_same(&img, &img_b);
    let (na, nb) = (chunk_names(&a), chunk_names(&b));
    // 32 blocks and the block map's one index chunk (format 3)
    assert_eq!(na.len(), 33);
    assert_eq!(nb.len(), 33);
    assert!(na.is_disjoint(&nb), "shared chunk names: {:?}", na.intersection(&nb).collect::<Vec<_>>());

    let plain = Env::new(&[], "");
    plain.write_config(&[("img", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"64K\"\n");
    plain.ok(&["init"]);
    plain.ok(&["backup", "img"]);
    let data = fs::read(&img).unwrap();
    let mut want: HashSet<String> = data.chunks(BS).map(|b| blake3::hash(b).to_hex().to_string()).collect();
    // the index chunk: the 32 block ids, named by its plain blake3 too
    let index: Vec<u8> = data.chunks(BS).flat_map(|b| *blake3::hash(b).as_bytes()).collect();
    want.insert(blake3::hash(&index).to_hex().to_string());
    assert_eq!(chunk_names(&plain), want);
    assert!(na.is_disjoint(&want));
}

/// A flipped bit, a truncated chunk, two swapped chunks, a flipped bit in
/// a manifest: the restore fails naming the object and creates no target;
/// verify --deep names the chunk.
#[test]
fn tampered_objects_fail_naming_them() {
    let (env, img, _) = encrypted_env("img", |p| write_random(p, 0, 1 << 20, &mut rng(18)), None);
    env.ok(&["backup", "img"]);
    let chunks = env.chunk_files();
    let (c0, c1) = (chunks[0].clone(), chunks[1].clone());
    let (b0, b1) = (fs::read(&c0).unwrap(), fs::read(&c1).unwrap());
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let to = env.path("target.img");
    let restore_fails = |what: &str, names: &[&str]| {
        let e = env.fails(&["restore", "img", "--to", to.to_str().unwrap()]);
        assert!(names.iter().any(|n| e.contains(n)) && e.contains("authentication failed"), "{what}: {e}");
        assert!(!to.exists(), "{what}: a target was created");
        let leftovers: Vec<_> = fs::read_dir(env.dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains("target")).collect();
        assert!(leftovers.is_empty(), "{what}: left {leftovers:?}");
    };

    let mut flipped = b0.clone();
    flipped[100] ^= 0x10;
    fs::write(&c0, &flipped).unwrap();
    restore_fails("flipped bit", &[&name(&c0)]);

    fs::write(&c0, &b0[..b0.len() - 7]).unwrap();
    restore_fails("truncated", &[&name(&c0)]);

    fs::write(&c0, &b1).unwrap();
    fs::write(&c1, &b0).unwrap();
    // whichever of the two the restore reads first
    restore_fails("swapped", &[&name(&c0), &name(&c1)]);
    fs::write(&c0, &b0).unwrap();
    fs::write(&c1, &b1).unwrap();

    let map = env.store().join("backups/000000000001.blockmap");
    let m = fs::read(&map).unwrap();
    let mut bad = m.clone();
    bad[3] ^= 1;
    fs::write(&map, &bad).unwrap();
    restore_fails("block map", &["backups/000000000001.blockmap"]);
    fs::write(&map, &m).unwrap();
    // a manifest (restore falls back to the catalog's record and the
    // block map, which authenticates on its own): verify names it
    let manifest = env.store().join("backups/000000000001.json");
    let m = fs::read(&manifest).unwrap();
    let mut bad = m.clone();
    bad[3] ^= 1;
    fs::write(&manifest, &bad).unwrap();
    let o = env.run(&["verify"]);
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() && all.contains("backups/000000000001.json") && all.contains("authentication failed"), "{all}");
    fs::write(&manifest, &m).unwrap();

    // intact again: restores
    assert_same(&img, &env.restore("img"));
    fs::write(&c0, &flipped).unwrap();
    let o = env.run(&["verify", "--deep"]);
    assert!(!o.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(all.contains(&name(&c0)) && all.contains("authentication failed"), "{all}");
}

/// A wrong passphrase, no passphrase, another store's key file, no key
/// file: a clear error, non-zero, no target, and nothing written by a
/// backup.
#[test]
fn wrong_key_or_passphrase_is_refused() {
    let (env, img, key) = encrypted_env("img", |p| write_random(p, 0, 1 << 20, &mut rng(19)), Some("right pass"));
    ok_with(&env, Some("right pass"), &["backup", "img"]);
    let to = env.path("target.img");
    let t = to.to_str().unwrap();
    let before = all_files(&env.store()).len();
    let e = fails_with(&env, Some("wrong pass"), &["restore", "img", "--to", t]);
    assert!(e.contains("wrong passphrase") && e.contains(key.to_str().unwrap()), "{e}");
    let e = fails_with(&env, None, &["restore", "img", "--to", t]);
    assert!(e.contains("needs a passphrase") && e.contains("BLOCKVAULT_PASSPHRASE"), "{e}");
    write_random(&img, 0, 1000, &mut rng(20));
    let e = fails_with(&env, Some("wrong pass"), &["backup", "img"]);
    assert!(e.contains("wrong passphrase"), "{e}");
    // another store's key
    let (_other, _, other_key) = encrypted_env("x", |p| sparse_file(p, 1 << 20), None);
    write_config(&env, &img, "img", &other_key);
    let e = fails_with(&env, Some("right pass"), &["restore", "img", "--to", t]);
    assert!(e.contains("is for store"), "{e}");
    // a key file that is not there
    write_config(&env, &img, "img", &env.path("nope.key"));
    let e = fails_with(&env, Some("right pass"), &["restore", "img", "--to", t]);
    assert!(e.contains("nope.key") && e.contains("cannot read"), "{e}");
    // no key file configured
    env.write_config(&[("img", &format!("file:{}", img.display()))], "", "");
    let e = fails_with(&env, Some("right pass"), &["list"]);
    assert!(e.contains("is encrypted") && e.contains("key-file"), "{e}");
    assert!(!to.exists());
    assert_eq!(all_files(&env.store()).len(), before, "a refused command wrote to the store");
    // the right one still works
    write_config(&env, &img, "img", &key);
    ok_with(&env, Some("right pass"), &["restore", "img", "--to", t]);
    assert!(to.exists());
}

/// Another machine with only a copy of the store and the key file: a fresh
/// catalog from `catalog rebuild`, and a bit-identical restore.
#[test]
fn restore_elsewhere_with_store_and_key_only() {
    let (env, img, key) = encrypted_env("img", |p| {
        sparse_file(p, 4 << 20);
        write_random(p, 0, 300_000, &mut rng(21));
        write_random(p, 3 << 20, 200_000, &mut rng(22));
    }, None);
    env.ok(&["backup", "img"]);
    let other = Env::new(&[], "");
    let st = std::process::Command::new("cp").arg("-a").arg(env.store()).arg(other.store()).status().unwrap();
    assert!(st.success());
    let key2 = other.path("copied.key");
    fs::copy(&key, &key2).unwrap();
    other.write_config(&[], &format!("key-file = \"{}\"", key2.display()), "");
    other.ok(&["catalog", "rebuild"]);
    let l = other.list();
    assert_eq!(l.len(), 1);
    let out = other.restore("img");
    assert_same(&img, &out);
}

/// key add / passwd / remove / export --paper round trips.
#[test]
fn key_slots_round_trip() {
    let (env, img, a) = encrypted_env("img", |p| write_random(p, 0, 256 << 10, &mut rng(23)), Some("one"));
    ok_with(&env, Some("one"), &["backup", "img"]);
    let b = env.path("b.key");
    let mut c = env.cmd(&["key", "add", "--key-file", b.to_str().unwrap(), "--passphrase"]);
    let o = c.env("BLOCKVAULT_PASSPHRASE", "one").env("BLOCKVAULT_NEW_PASSPHRASE", "bee").stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&b).unwrap().permissions().mode() & 0o777, 0o600);
    // never over an existing file
    let mut c = env.cmd(&["key", "add", "--key-file", b.to_str().unwrap()]);
    let o = c.env("BLOCKVAULT_PASSPHRASE", "one").stdin(Stdio::null()).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    // b opens with its own passphrase
    write_config(&env, &img, "img", &b);
    assert_eq!(ok_with(&env, Some("bee"), &["key", "list"]).lines().count(), 2);
    fails_with(&env, Some("one"), &["list"]);
    // passwd on a: the old passphrase no longer opens it
    write_config(&env, &img, "img", &a);
    let mut c = env.cmd(&["key", "passwd"]);
    let o = c.env("BLOCKVAULT_PASSPHRASE", "one").env("BLOCKVAULT_NEW_PASSPHRASE", "two").stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fails_with(&env, Some("one"), &["list"]).contains("wrong passphrase"));
    ok_with(&env, Some("two"), &["list"]);
    // the paper key, typed back in, is a key file
    let paper = ok_with(&env, Some("two"), &["key", "export", "--paper"]);
    assert!(paper.contains("paper key") && paper.contains("needs its passphrase"), "{paper}");
    // what is between the rules, typed with spaces for dashes in upper case
    let body = paper.split_once("-----\n").unwrap().1.rsplit_once("=====").unwrap().0;
    let body = body.trim_end_matches('=');
    let typed: String = body
        .lines()
        .map(|l| match l.strip_prefix("key ") {
            Some(k) => format!("key {}\n", k.replace('-', " ").to_uppercase()),
            None => format!("{l}\n"),
        })
        .collect();
    let retyped = env.path("retyped.key");
    fs::write(&retyped, typed).unwrap();
    write_config(&env, &img, "img", &retyped);
    assert_same(&img, &{
        let to = env.path("from-paper.img");
        ok_with(&env, Some("two"), &["restore", "img", "--to", to.to_str().unwrap()]);
        to
    });
    // remove b: it no longer opens; the last slot cannot go
    write_config(&env, &img, "img", &a);
    ok_with(&env, Some("two"), &["key", "remove", "--key-file", b.to_str().unwrap()]);
    write_config(&env, &img, "img", &b);
    assert!(fails_with(&env, Some("bee"), &["list"]).contains("no key slot"));
    write_config(&env, &img, "img", &a);
    let a_slot = ok_with(&env, Some("two"), &["key", "list"]).split_whitespace().next().unwrap().to_string();
    assert!(fails_with(&env, Some("two"), &["key", "remove", &a_slot]).contains("only key slot"));
}
