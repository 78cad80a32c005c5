//! Indexed block maps (format version 2, blocks below 4 MiB): written and
//! read back through the store, small whatever the block count, unchanged
//! groups deduplicated, corruption and a lost index chunk refused, GC
//! keeping index chunks; version 1 maps (4 MiB blocks) unchanged.

use std::time::Duration;

use blockvault_store::format::{BLOCKMAP_VERSION, BLOCKMAP_VERSION_INDEXED};
use blockvault_store::gc::{self, GcOptions, LiveSet};
use blockvault_store::{chunk, BackupId, BlockMap, ChunkId, InitOptions, Manifest, Store};

const BS: u32 = 65536;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::init(&dir.path().join("s"), &InitOptions { default_block_size: BS }).unwrap();
    (dir, s)
}

fn put(s: &Store, data: &[u8]) -> ChunkId {
    let id = s.chunk_id(data);
    s.put_chunk(&chunk::encode(data, id, 1, None).unwrap()).unwrap();
    id
}

fn commit(s: &Store, id: u64, map: &BlockMap) -> Manifest {
    let mut m = Manifest::new(BackupId(id), "vm", "file:/vm", map.block_size()).at("2026-01-01T00:00:00Z");
    s.write_backup(&mut m, map).unwrap();
    m
}

fn map_bytes(s: &Store, id: u64) -> Vec<u8> {
    std::fs::read(s.root().join(format!("backups/{id:012}.blockmap"))).unwrap()
}

fn version(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

/// 20 MiB at 64 KiB blocks (320 blocks, 5 groups; the last one short and
/// one all zero), written and read back: the same entries, 5 index chunks
/// at most, 32 bytes per group in the map file.
#[test]
fn indexed_map_roundtrips_and_stays_small() {
    let (_d, s) = store();
    let size = 20 * (1 << 20) - 1000; // last block short, last group short
    let mut map = BlockMap::new_zeroed(size, BS);
    for b in 0..map.len() {
        if !(64..128).contains(&b) && b % 3 != 0 {
            map.set(b, Some(put(&s, &(b as u32).to_le_bytes().repeat(100))));
        }
    }
    let m = commit(&s, 1, &map);
    let bytes = map_bytes(&s, 1);
    assert_eq!(version(&bytes), BLOCKMAP_VERSION_INDEXED);
    assert_eq!(bytes.len(), 40 + 5 * 32 + 32, "32 bytes per 4 MiB group");
    let back = s.read_blockmap(&m).unwrap();
    assert_eq!(back.entries(), map.entries());
    assert_eq!((back.image_size(), back.block_size()), (size, BS));
    assert_eq!(back.index_chunks().len(), 4, "group 1 is all zero: no index chunk");
    for ix in back.index_chunks() {
        assert!(s.has_chunk(ix).unwrap());
        assert!(back.chunk_ids().any(|c| c == ix), "chunk_ids names the index chunks (GC, verify, copy)");
    }

    // one block changed: one new index chunk, the other groups' are shared
    let mut next = back.clone();
    next.set(200, Some(put(&s, b"changed")));
    let m2 = commit(&s, 2, &next);
    let back2 = s.read_blockmap(&m2).unwrap();
    assert_eq!(back2.entries(), next.entries());
    let shared = back2.index_chunks().iter().filter(|c| back.index_chunks().contains(c)).count();
    assert_eq!(shared, 3, "unchanged groups keep their index chunk");
}

/// 4 MiB blocks keep the version 1 layout byte for byte.
#[test]
fn four_mib_blocks_stay_version_1() {
    let (_d, s) = store();
    let mut map = BlockMap::new_zeroed(12 << 20, 4 << 20);
    map.set(1, Some(put(&s, b"x")));
    let m = commit(&s, 1, &map);
    let bytes = map_bytes(&s, 1);
    assert_eq!(version(&bytes), BLOCKMAP_VERSION);
    assert_eq!(bytes, map.encode());
    assert_eq!(s.read_blockmap(&m).unwrap(), map);
}

/// Every flipped bit of an indexed map is refused, and a lost or corrupt
/// index chunk makes the map unreadable (never a map of zero blocks).
#[test]
fn corrupt_indexed_map_or_index_chunk_is_refused() {
    let (_d, s) = store();
    let mut map = BlockMap::new_zeroed(8 << 20, BS);
    map.set(3, Some(put(&s, b"a")));
    map.set(100, Some(put(&s, b"b")));
    let m = commit(&s, 1, &map);
    let bytes = map_bytes(&s, 1);
    let p = std::path::Path::new("t");
    assert!(BlockMap::decode_any(p, &bytes).is_ok());
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x04;
        assert!(BlockMap::decode_any(p, &b).is_err(), "flip at {i} not caught");
    }
    let ix = s.read_blockmap(&m).unwrap().index_chunks()[1];
    let path = s.chunk_path(&ix);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let e = s.read_blockmap(&m).unwrap_err().to_string();
    assert!(e.contains("index chunk") && e.contains(&ix.to_string()), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = s.read_blockmap(&m).unwrap_err().to_string();
    assert!(e.contains("index chunk"), "{e}");
    // GC refuses to plan over an unreadable live backup instead of sweeping its chunks
    assert!(LiveSet::from_store(&s).is_err());
    std::fs::write(&path, &good).unwrap();
    assert_eq!(s.read_blockmap(&m).unwrap().entries(), map.entries());
}

/// GC keeps the index chunks of live backups (however old) and removes
/// those of pruned ones.
#[test]
fn gc_keeps_live_index_chunks_and_sweeps_dead_ones() {
    let (_d, s) = store();
    let mut a = BlockMap::new_zeroed(8 << 20, BS);
    a.set(0, Some(put(&s, b"live")));
    let ma = commit(&s, 1, &a);
    let mut b = BlockMap::new_zeroed(8 << 20, BS);
    b.set(70, Some(put(&s, b"dead")));
    let mb = commit(&s, 2, &b);
    let a_ix = s.read_blockmap(&ma).unwrap().index_chunks().to_vec();
    let b_ix = s.read_blockmap(&mb).unwrap().index_chunks().to_vec();
    assert_eq!((a_ix.len(), b_ix.len()), (1, 1));
    s.remove_backup(BackupId(2)).unwrap();
    // grace zero: every unreferenced chunk written before the plan is garbage
    std::thread::sleep(Duration::from_millis(20));
    let plan = gc::plan(&s, LiveSet::from_store(&s).unwrap(), &GcOptions { grace: Duration::ZERO }).unwrap();
    gc::apply(&s, plan).unwrap();
    assert!(s.has_chunk(&a_ix[0]).unwrap(), "a live backup's index chunk was removed");
    assert!(!s.has_chunk(&b_ix[0]).unwrap(), "a pruned backup's index chunk was kept");
    assert_eq!(s.read_blockmap(&ma).unwrap().entries(), a.entries());
}
