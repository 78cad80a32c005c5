//! Filesystem safety: temp files, links and modes (issue 9, items 3 and 6).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

/// An environment with one 1 MiB file image, initialised and backed up.
fn backed_up() -> (Env, PathBuf) {
    let env = Env::new(&[], "");
    let img = env.path("img");
    write_random(&img, 0, 1 << 20, &mut rng(31));
    env.write_config(&[("img", &format!("file:{}", img.display()))], "", "");
    env.ok(&["init"]);
    env.ok(&["backup", "img"]);
    (env, img)
}

/// Runs blockvault under `umask 022` (what a root shell usually has).
fn run_umask(env: &Env, args: &[&str]) -> Output {
    let mut c = Command::new("sh");
    c.arg("-c").arg("umask 022; exec \"$@\"").arg("sh").arg(bin());
    c.arg("--config").arg(&env.config).arg("--no-progress").args(args);
    c.env_remove("BLOCKVAULT_LOG");
    let o = c.output().unwrap();
    assert!(o.status.success(), "blockvault {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// See issue 9, item 3. Restore wrote its temp file at the predictable name
/// `.NAME.blockvault-partial`, opened with create+truncate: whoever could
/// write the target's directory planted a symlink there and made root
/// overwrite any file (here `victim`) with the restored image. Now the temp
/// file is created exclusively under a random name, and a target that is
/// itself a link to a file is refused.
#[test]
fn restore_does_not_follow_a_planted_symlink() {
    let (env, img) = backed_up();
    let victim = env.path("victim");
    fs::write(&victim, b"do not touch").unwrap();
    let dir = env.path("out");
    fs::create_dir(&dir).unwrap();
    let to = dir.join("disk.img");
    // every name the old code would have used for its temp file
    std::os::unix::fs::symlink(&victim, dir.join(".disk.img.blockvault-partial")).unwrap();
    env.ok(&["restore", "img", "--to", to.to_str().unwrap()]);
    assert_eq!(fs::read(&victim).unwrap(), b"do not touch", "restore wrote through the planted link");
    assert_same(&img, &to);
    assert!(fs::symlink_metadata(dir.join(".disk.img.blockvault-partial")).unwrap().file_type().is_symlink());
    // no temp file left behind
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") && n != ".disk.img.blockvault-partial")
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");

    // the target itself a link to a file: refused, the file untouched
    let link = dir.join("link.img");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let err = env.fails(&["restore", "img", "--to", link.to_str().unwrap(), "--force"]);
    assert!(err.contains("symbolic link") && err.contains(link.to_str().unwrap()), "{err}");
    assert_eq!(fs::read(&victim).unwrap(), b"do not touch");
    // a dangling link is refused too (it would have created the file it names)
    let dangling = dir.join("dangling.img");
    std::os::unix::fs::symlink(env.path("nowhere"), &dangling).unwrap();
    let err = env.fails(&["restore", "img", "--to", dangling.to_str().unwrap()]);
    assert!(err.contains("symbolic link"), "{err}");
    assert!(!env.path("nowhere").exists());
}

/// See issue 9, item 6. Under umask 022 the store's directories and files
/// and the catalog (with its -wal and -shm) were world-readable: a store
/// holds every byte of every image. Now directories are 0700 and files 0600
/// whatever the umask.
#[test]
fn store_and_catalog_are_private_under_umask_022() {
    let env = Env::new(&[], "");
    let img = env.path("img");
    write_random(&img, 0, 1 << 20, &mut rng(33));
    env.write_config(&[("img", &format!("file:{}", img.display()))], "", "");
    run_umask(&env, &["init"]);
    run_umask(&env, &["backup", "img"]);
    run_umask(&env, &["protect", "img@1"]);
    let mut seen = 0;
    let mut stack = vec![env.store()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            assert_eq!(mode(&p), 0o700, "directory {} is not private", p.display());
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode(&p) & 0o077, 0, "file {} is readable by others ({:o})", p.display(), mode(&p));
        }
        seen += 1;
    }
    assert!(seen > 10, "only {seen} store entries");
    // the catalog, while a connection holds its WAL open (list --json reads it)
    let cat = env.catalog();
    for ext in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{ext}", cat.display()));
        if p.exists() {
            assert_eq!(mode(&p) & 0o077, 0, "{} is readable by others ({:o})", p.display(), mode(&p));
        }
    }
    assert!(cat.exists());
}

/// See issue 9, item 6. `restore --force` onto an existing `0600 nobody`
/// file left it `0644 root`: the image became readable by every user and
/// its owner lost it. A forced restore now keeps the target's mode and
/// owner; a new target is 0600 whatever the umask, or `--mode`.
#[test]
fn forced_restore_keeps_target_mode_and_owner() {
    let (env, img) = backed_up();
    let to = env.path("existing.img");
    fs::write(&to, b"old contents").unwrap();
    fs::set_permissions(&to, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&to, Some(65534), Some(65534)).unwrap();
    run_umask(&env, &["restore", "img", "--to", to.to_str().unwrap(), "--force"]);
    assert_same(&img, &to);
    let md = fs::metadata(&to).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534), "owner not kept");
    assert_eq!(mode(&to), 0o600, "mode not kept");

    let fresh = env.path("fresh.img");
    run_umask(&env, &["restore", "img", "--to", fresh.to_str().unwrap()]);
    assert_eq!(mode(&fresh), 0o600, "a new restore target is not private");
    let told = env.path("told.img");
    run_umask(&env, &["restore", "img", "--to", told.to_str().unwrap(), "--mode", "640"]);
    assert_eq!(mode(&told), 0o640);
    assert_same(&img, &told);
    let err = env.fails(&["restore", "img", "--to", env.path("bad.img").to_str().unwrap(), "--mode", "999"]);
    assert!(err.contains("octal"), "{err}");
}
