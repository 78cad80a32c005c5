//! The directory backend reads and writes exactly what the format-1 code
//! did: `tests/fixtures/store-v1` (written by blockvault at 1c466a2, before
//! the backend trait) opens, lists, restores to the recorded sha256 of each
//! image, passes a deep check, and a backup rewritten through the trait
//! gives byte-identical block map, manifest and marker files.

mod common;
use common::copy_tree;

use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault_store::{BackupId, Store};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/store-v1")
}

/// A writable copy of the fixture (git keeps no empty `tmp/` or `locks/`).
fn copy() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("s");
    copy_tree(&fixture(), &root);
    for sub in ["tmp", "locks"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    (d, root)
}

fn sha256(bytes: &[u8], dir: &Path) -> String {
    let p = dir.join("image");
    std::fs::write(&p, bytes).unwrap();
    let out = Command::new("sha256sum").arg(&p).output().expect("sha256sum (coreutils) runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

fn restore(s: &Store, id: u64) -> Vec<u8> {
    let m = s.read_manifest(BackupId(id)).unwrap();
    let map = s.read_blockmap(&m).unwrap();
    let mut out = vec![0u8; m.image_size as usize];
    let (mut raw, mut plain) = (Vec::new(), Vec::new());
    for (b, e) in map.entries().iter().enumerate() {
        if let Some(cid) = e {
            s.load_chunk(cid, &mut raw, &mut plain).unwrap();
            let (off, len) = map.block_range(b);
            out[off as usize..off as usize + len].copy_from_slice(&plain[..len]);
        }
    }
    out
}

#[test]
fn format_1_fixture_store_restores_bit_identically_through_the_dir_backend() {
    let (d, root) = copy();
    let s = Store::open(&root).unwrap();
    assert_eq!(s.dir(), Some(root.as_path()));
    assert_eq!(s.list_backups().unwrap(), vec![BackupId(1), BackupId(2), BackupId(3)]);
    assert!(s.is_protected(BackupId(1)) && !s.is_protected(BackupId(2)));
    let sums = std::fs::read_to_string(fixture().with_extension("sha256")).unwrap();
    let want: Vec<&str> = sums.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    for (id, want) in [1, 2, 3].into_iter().zip(want) {
        assert_eq!(sha256(&restore(&s, id), d.path()), want, "backup {id}");
    }
    // every chunk in the store decodes
    let (mut raw, mut plain) = (Vec::new(), Vec::new());
    let chunks = s.list_chunks().unwrap();
    assert!(!chunks.is_empty());
    for (cid, size, _) in chunks {
        s.load_chunk(&cid, &mut raw, &mut plain).unwrap();
        assert_eq!(raw.len() as u64, size);
        assert_eq!(s.chunk_path(&cid), root.join("chunks").join(&cid.to_hex()[..4]).join(cid.to_hex()));
    }
}

#[test]
fn rewriting_a_format_1_backup_through_the_trait_gives_the_same_entries() {
    let (_d, root) = copy();
    let s = Store::open(&root).unwrap();
    let mut index_chunks = Vec::new();
    for id in [1u64, 2, 3] {
        let name = |ext: &str| root.join("backups").join(format!("{id:012}.{ext}"));
        let (json, map_bytes) = (std::fs::read(name("json")).unwrap(), std::fs::read(name("blockmap")).unwrap());
        let protected = s.is_protected(BackupId(id));
        let mut m = s.read_manifest(BackupId(id)).unwrap();
        let map = s.read_blockmap(&m).unwrap();
        s.remove_backup(BackupId(id)).unwrap();
        assert!(!name("json").exists() && !name("blockmap").exists() && !name("protected").exists());
        s.write_backup(&mut m, &map).unwrap();
        if protected {
            s.set_protected(BackupId(id), true).unwrap();
            assert_eq!(std::fs::read(name("protected")).unwrap(), b"");
        }
        // the version 1 encoder is unchanged byte for byte; the store now
        // writes maps of 64 KiB blocks indexed (version 3 since 2026-12-07,
        // issue 13), which read back to the same entries
        assert_eq!(map.encode(), map_bytes, "block map of backup {id}");
        let written = std::fs::read(name("blockmap")).unwrap();
        assert_eq!(u32::from_le_bytes(written[8..12].try_into().unwrap()), 3, "backup {id}: an indexed map");
        let again = s.read_blockmap(&s.read_manifest(BackupId(id)).unwrap()).unwrap();
        assert_eq!(again.entries(), map.entries(), "block map of backup {id}");
        index_chunks.extend(again.index_chunks().iter().map(|c| format!("chunks/{}/{}", &c.to_hex()[..4], c.to_hex())));
        let old_sum: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let json_now = String::from_utf8(std::fs::read(name("json")).unwrap()).unwrap();
        let want = String::from_utf8(json.clone()).unwrap().replace(
            old_sum["blockmap_blake3"].as_str().unwrap(),
            &blake3::hash(&written).to_hex().to_string(),
        );
        assert_eq!(json_now, want, "manifest of backup {id}: the same but for the map's checksum");
    }
    let fixture_files = |r: &Path| {
        let mut v: Vec<String> = walk(r).into_iter().map(|p| p.strip_prefix(r).unwrap().display().to_string()).collect();
        v.sort();
        v
    };
    // nothing left beside them: no temp files, same tree (plus tmp/ and locks/ contents)
    let mut ours = fixture_files(&root);
    ours.retain(|p| !p.starts_with("locks/") && !index_chunks.contains(p));
    assert_eq!(ours, fixture_files(&fixture()));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
