//! A restore checks that the manifest it reads is of the image it was asked
//! for (issue 9, item 11).
//!
//! The bug: restore took the catalog row's backup id, read that manifest
//! from the store and restored it, never comparing the manifest's image with
//! the one asked for. A catalog row that points at another image's backup
//! (a damaged or hand-edited catalog, or a store whose backup files were
//! swapped under it) restored that other image's data onto the target, with
//! exit 0 and no warning. The tamper here is in the store: backup 1 of image
//! `alpha` is replaced by backup 2 of image `beta`, renumbered to 1, so the
//! catalog's row for `alpha` leads to `beta`'s data.

use std::fs;

use blockvault_store::{BackupId, Manifest};

use crate::common::*;

const BS: usize = 64 << 10;

#[test]
fn restore_refuses_a_backup_of_another_image() {
    let env = Env::new(&[], "");
    let (a, b) = (env.path("alpha.img"), env.path("beta.img"));
    let mut r = rng(111);
    write_random(&a, 0, 4 * BS, &mut r);
    write_random(&b, 0, 6 * BS, &mut r);
    env.write_config(
        &[("alpha", &format!("file:{}", a.display())), ("beta", &format!("file:{}", b.display()))],
        "",
        "[defaults]\nblock-size = \"64K\"\n",
    );
    env.ok(&["init"]);
    env.ok(&["backup", "alpha"]); // 1
    env.ok(&["backup", "beta"]); // 2
    assert_same(&env.restore("alpha@1"), &a);

    let backups = env.store().join("backups");
    let mut m: Manifest = serde_json::from_slice(&fs::read(backups.join("000000000002.json")).unwrap()).unwrap();
    m.id = BackupId(1);
    fs::write(backups.join("000000000001.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    fs::copy(backups.join("000000000002.blockmap"), backups.join("000000000001.blockmap")).unwrap();

    for spec in ["alpha", "alpha@1"] {
        let to = env.path(&format!("out-{spec}"));
        let err = env.fails(&["restore", spec, "--to", to.to_str().unwrap()]);
        assert!(
            err.contains("'alpha'") && err.contains("'beta'") && err.contains("backup 1"),
            "restore {spec}: the error must name the image asked for, the image found and the backup:\n{err}"
        );
        assert!(!to.exists(), "restore {spec} wrote {} although it failed", to.display());
    }
    // beta's own backup is untouched and restores
    assert_same(&env.restore("beta@2"), &b);
}
