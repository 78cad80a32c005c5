//! The store's own files: never written through a planted link, always
//! private. See issue 9, items 3 and 6.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use blockvault_store::{InitOptions, Store};

/// See issue 9, item 3. The store's atomic writes used the temp name
/// `.NAME.tmp.PID`, opened with create+truncate, so a link planted at that
/// name made the writer overwrite the link's target. In-process the pid is
/// known: plant the exact name the old code used for the store marker and
/// check that `init` leaves the link's target alone.
#[test]
fn atomic_write_does_not_follow_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"do not touch").unwrap();
    let root = dir.path().join("store");
    fs::create_dir(&root).unwrap();
    let planted = root.join(format!(".blockvault-store.json.tmp.{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let store = Store::init(&root, &InitOptions::default()).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"do not touch", "init wrote through the planted link");
    assert!(fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());
    // the store is whole and its marker a regular file
    assert!(fs::symlink_metadata(root.join("blockvault-store.json")).unwrap().is_file());
    Store::open(store.root()).unwrap();
}

/// See issue 9, item 6: a store initialised in an existing directory made
/// with the umask's 0755 becomes private (0700), and so do its
/// subdirectories and marker.
#[test]
fn init_makes_the_store_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    Store::init(&root, &InitOptions::default()).unwrap();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    for sub in ["chunks", "backups", "tmp", "locks"] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(mode(&root.join("blockvault-store.json")), 0o600);
}
