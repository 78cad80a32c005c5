//! Writes the seed corpus of the fuzz targets (`fuzz/corpus/<target>/`)
//! from the store's own encoders, so every seed is a valid object the
//! fuzzer mutates from. Ignored in normal runs; regenerate with
//! `cargo test -p blockvault-store --test fuzz_seeds -- --ignored`.

use std::fs;
use std::path::{Path, PathBuf};

use blockvault_store::chunk::encode;
use blockvault_store::{BackupId, BackupStats, BlockMap, ChunkId, Manifest, RbdInfo};

fn corpus(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
#[ignore = "writes fuzz/corpus; run on purpose"]
fn write_fuzz_seeds() {
    let d = corpus("blockmap");
    let mut m = BlockMap::new_zeroed(5 * 65536 + 100, 65536);
    m.set(1, Some(ChunkId::of(b"one")));
    m.set(5, Some(ChunkId::of(b"tail")));
    fs::write(d.join("small"), m.encode()).unwrap();
    fs::write(d.join("empty"), BlockMap::new_zeroed(0, 4 << 20).encode()).unwrap();
    fs::write(d.join("one-block"), BlockMap::new_zeroed(4 << 20, 4 << 20).encode()).unwrap();

    let d = corpus("chunk");
    let text = b"a block of text that compresses well, well, well. ".repeat(40);
    let mut random = vec![0u8; 3000];
    blake3::Hasher::new().update(b"seed").finalize_xof().fill(&mut random);
    for (name, plain, level) in [("zstd", &text[..], 3), ("raw", &random[..], 3), ("level0", &text[..200], 0), ("empty", &[][..], 3)] {
        fs::write(d.join(name), encode(plain, ChunkId::of(plain), level, None).unwrap().bytes).unwrap();
    }

    let d = corpus("manifest");
    let mut man = Manifest {
        format: 1,
        set: None,
        id: BackupId(7),
        image: "vm-100-disk-0".into(),
        source: "rbd:rbd/vm-100-disk-0".into(),
        created: "2026-12-01T10:00:00Z".into(),
        finished: "2026-12-01T10:01:00Z".into(),
        parent: Some(BackupId(6)),
        image_size: 10 << 30,
        block_size: 4 << 20,
        blockmap_blake3: blake3::hash(b"map").to_hex().to_string(),
        snapshot: Some("blockvault-7".into()),
        stats: BackupStats { read_bytes: 123, read_blocks: 4, new_chunks: 2, ..Default::default() },
        rbd: Some(RbdInfo { features: 61, object_size: 4 << 20 }),
    };
    fs::write(d.join("rbd"), serde_json::to_vec_pretty(&man).unwrap()).unwrap();
    man.parent = None;
    man.snapshot = None;
    man.rbd = None;
    man.source = "file:/srv/disk.img".into();
    fs::write(d.join("file"), serde_json::to_vec_pretty(&man).unwrap()).unwrap();

    let d = corpus("config");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
    fs::copy(example, d.join("example")).unwrap();
    fs::write(
        d.join("small"),
        "[store]\npath = \"/srv/bv\"\ncompression-level = 3\ngc-grace = \"12h\"\n\n[defaults]\nblock-size = \"64K\"\n\
         schedule = \"0 0 3 * * *\"\n\n[[image]]\nname = \"vm-{image}\"\nsource = \"rbd:rbd/vm-*\"\n\n\
         [[image]]\nname = \"disk\"\nsource = \"file:/srv/disk.img\"\nblock-size = 1048576\n",
    )
    .unwrap();
}
