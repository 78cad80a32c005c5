//! Indexed block maps (format version 3, blocks below 4 MiB): written and
//! read back through the store, small whatever the block count, unchanged
//! groups deduplicated, corruption and a lost index chunk refused, GC
//! keeping index chunks; version 2 maps (narrower groups) still read, and
//! a backup on a version-2 parent written as version 3; version 1 maps
//! (4 MiB blocks) unchanged.

use std::time::Duration;

use blockvault_store::blockmap::{index_fanout, indexed_fanout};
use blockvault_store::format::{BLOCKMAP_VERSION, BLOCKMAP_VERSION_INDEXED, BLOCKMAP_VERSION_INDEXED_WIDE};
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

/// Blocks per group of a new map at 64 KiB.
fn fanout() -> usize {
    index_fanout(BS).unwrap() as usize
}

/// Five groups at 64 KiB blocks (160 MiB; the last one short and one all
/// zero), written and read back: the same entries, 5 index chunks at
/// most, 32 bytes per group in the map file.
#[test]
fn indexed_map_roundtrips_and_stays_small() {
    let (_d, s) = store();
    let f = fanout();
    assert_eq!(f, 512, "version 3: 512 blocks of 64 KiB per index chunk");
    let size = 5 * (f as u64 * BS as u64) - 1000; // last block short, last group short
    let mut map = BlockMap::new_zeroed(size, BS);
    for b in 0..map.len() {
        if !(f..2 * f).contains(&b) && b % 3 != 0 {
            map.set(b, Some(put(&s, &(b as u32).to_le_bytes().repeat(100))));
        }
    }
    let m = commit(&s, 1, &map);
    let bytes = map_bytes(&s, 1);
    assert_eq!(version(&bytes), BLOCKMAP_VERSION_INDEXED_WIDE);
    assert_eq!(bytes.len(), 40 + 5 * 32 + 32, "32 bytes per 32 MiB group");
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
    next.set(3 * f + 200, Some(put(&s, b"changed")));
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
    let f = fanout();
    let mut map = BlockMap::new_zeroed(2 * f as u64 * BS as u64, BS);
    map.set(3, Some(put(&s, b"a")));
    map.set(f + 100, Some(put(&s, b"b")));
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

/// A version-2 map (groups of 4 MiB, as written before version 3) in the
/// store reads back whole; a backup inheriting from it is written as
/// version 3 with its own, wider groups, and reads back whole too. Each
/// version's fanout is refused under the other's number.
#[test]
fn version_2_maps_read_and_their_children_are_version_3() {
    let (_d, s) = store();
    let size = (40 << 20) + 123;
    let mut old = BlockMap::new_zeroed(size, BS);
    for b in (0..old.len()).filter(|b| b % 5 == 1 && !(64..192).contains(b)) {
        old.set(b, Some(put(&s, &(b as u32).to_le_bytes().repeat(40))));
    }
    let f2 = indexed_fanout(BLOCKMAP_VERSION_INDEXED, BS).unwrap();
    assert_eq!(f2, 64);
    let groups: Vec<Option<ChunkId>> = old
        .index_groups(f2)
        .map(|g| {
            g.iter().any(Option::is_some).then(|| {
                let plain = blockvault_store::blockmap::encode_index_chunk(g);
                let id = s.chunk_id(&plain);
                s.put_chunk(&chunk::encode(&plain, id, 0, None).unwrap()).unwrap();
                id
            })
        })
        .collect();
    assert!(groups[1].is_none() && groups[2].is_none(), "two all-zero groups");
    s.sync().unwrap();
    let bytes = old.encode_indexed_as(BLOCKMAP_VERSION_INDEXED, f2, &groups);
    assert_eq!(version(&bytes), BLOCKMAP_VERSION_INDEXED);
    // written as the format-2 code did: the map object, then the manifest
    let mut m = Manifest::new(BackupId(1), "vm", "file:/vm", BS).at("2026-01-01T00:00:00Z");
    m.blockmap_blake3 = blake3::hash(&bytes).to_hex().to_string();
    m.image_size = size;
    std::fs::write(s.root().join("backups/000000000001.blockmap"), &bytes).unwrap();
    std::fs::write(s.root().join("backups/000000000001.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let back = s.read_blockmap(&m).unwrap();
    assert_eq!(back.entries(), old.entries());
    assert_eq!(back.index_chunks().len(), groups.iter().flatten().count());

    let mut next = back.clone();
    next.set(7, Some(put(&s, b"new in the child")));
    let m2 = commit(&s, 2, &next);
    let bytes2 = map_bytes(&s, 2);
    assert_eq!(version(&bytes2), BLOCKMAP_VERSION_INDEXED_WIDE);
    assert_eq!(bytes2.len(), 40 + 2 * 32 + 32, "two groups of 512 blocks");
    let back2 = s.read_blockmap(&m2).unwrap();
    assert_eq!(back2.entries(), next.entries());
    // both maps keep reading, and GC keeps both maps' index chunks
    std::thread::sleep(Duration::from_millis(20));
    let plan = gc::plan(&s, LiveSet::from_store(&s).unwrap(), &GcOptions { grace: Duration::ZERO }).unwrap();
    gc::apply(&s, plan).unwrap();
    assert_eq!(s.read_blockmap(&m).unwrap().entries(), old.entries());
    assert_eq!(s.read_blockmap(&m2).unwrap().entries(), next.entries());

    // the version number decides the fanout: swapped, the map is refused
    let p = std::path::Path::new("t");
    for (from, to) in [(BLOCKMAP_VERSION_INDEXED, BLOCKMAP_VERSION_INDEXED_WIDE), (BLOCKMAP_VERSION_INDEXED_WIDE, BLOCKMAP_VERSION_INDEXED)] {
        let src = if from == BLOCKMAP_VERSION_INDEXED { &bytes } else { &bytes2 };
        let mut b = src[..src.len() - 32].to_vec();
        b[8..12].copy_from_slice(&to.to_le_bytes());
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        let e = BlockMap::decode_any(p, &b).unwrap_err().to_string();
        assert!(e.contains("does not fit block size 65536"), "{e}");
    }
}
