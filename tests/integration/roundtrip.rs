//! Backup → restore is bit-identical; deduplication writes only what is new;
//! corruption is caught; the catalog can be rebuilt from the store.

use std::fs;
use std::process::Command;

use crate::common::*;

fn roundtrip(name: &str, make: impl FnOnce(&std::path::Path), block: &str) {
    let env = Env::new(&[], "");
    let img = env.path(name);
    make(&img);
    let src = format!("file:{}", img.display());
    env.write_config(&[(name, &src)], "", &format!("[defaults]\nblock-size = \"{block}\"\n"));
    env.ok(&["init"]);
    env.ok(&["backup", name]);
    let out = env.restore(name);
    assert_same(&img, &out);
    assert_eq!(fs::metadata(&out).unwrap().len(), fs::metadata(&img).unwrap().len());
}

#[test]
fn random_data() {
    roundtrip("random", |p| write_random(p, 0, 20 << 20, &mut rng(1)), "64K");
}

#[test]
fn all_zeros_store_nothing() {
    let env = Env::new(&[], "");
    let img = env.path("zeros");
    fs::write(&img, vec![0u8; 9 << 20]).unwrap(); // allocated zeros, not holes
    env.write_config(&[("zeros", &format!("file:{}", img.display()))], "", "");
    env.ok(&["init"]);
    env.ok(&["backup", "zeros"]);
    assert!(env.chunk_files().is_empty(), "zero blocks must not be stored");
    let l = env.list();
    assert_eq!(num(&l[0], "zero_blocks"), 3);
    let out = env.restore("zeros");
    assert_same(&img, &out);
    // restored zeros are holes
    let o = Command::new("du").arg("-k").arg(&out).output().unwrap();
    let kib: u64 = String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().parse().unwrap();
    assert!(kib < 64, "restored zero image uses {kib} KiB");
}

#[test]
fn sparse_file_with_holes() {
    roundtrip(
        "sparse",
        |p| {
            sparse_file(p, 64 << 20);
            let mut r = rng(2);
            write_random(p, 0, 4096, &mut r);
            write_random(p, 10 << 20, 100_000, &mut r);
            write_random(p, (64 << 20) - 10, 10, &mut r);
        },
        "64K",
    );
}

#[test]
fn size_not_a_multiple_of_the_block_size() {
    roundtrip("odd", |p| write_random(p, 0, (5 << 20) + 12345, &mut rng(3)), "4M");
    roundtrip("tiny", |p| write_random(p, 0, 7, &mut rng(4)), "64K");
}

#[test]
fn empty_image() {
    roundtrip("empty", |p| sparse_file(p, 0), "64K");
}

/// A real ext4 filesystem made from a directory tree; the restored image
/// must pass e2fsck.
#[test]
fn ext4_filesystem_image() {
    let env = Env::new(&[], "");
    let tree = env.path("tree");
    for i in 0..200 {
        let d = tree.join(format!("dir{}", i % 13));
        fs::create_dir_all(&d).unwrap();
        let mut data = format!("file {i}\n").repeat(i * 37 + 1).into_bytes();
        if i % 5 == 0 {
            write_random(&d.join(format!("bin{i}")), 0, 30_000 + i * 100, &mut rng(i as u64));
        }
        data.truncate(200_000);
        fs::write(d.join(format!("f{i}.txt")), data).unwrap();
    }
    let img = env.path("fs.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("64M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(st.success());
    env.write_config(&[("fs", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"256K\"\n");
    env.ok(&["init"]);
    env.ok(&["backup", "fs"]);
    let out = env.restore("fs");
    assert_same(&img, &out);
    let o = Command::new("e2fsck").arg("-fn").arg(&out).output().unwrap();
    assert!(o.status.success(), "e2fsck failed on the restored image: {}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn dedup_unchanged_one_byte_and_across_images() {
    let env = Env::new(&[], "");
    let a = env.path("a.img");
    let b = env.path("b.img");
    write_random(&a, 0, 40 << 20, &mut rng(5));
    fs::copy(&a, &b).unwrap();
    env.write_config(
        &[("a", &format!("file:{}", a.display())), ("b", &format!("file:{}", b.display()))],
        "",
        "[defaults]\nblock-size = \"64K\"\n",
    );
    env.ok(&["init"]);
    env.ok(&["backup", "a"]);
    let chunks_after_first = env.chunk_files().len();
    // 640 blocks, and the 2 index chunks of the block map (format 3: 512
    // entries each at 64 KiB blocks)
    assert_eq!(chunks_after_first, 640 + 2);

    // unchanged: zero new chunk bytes
    env.ok(&["backup", "a"]);
    let l = env.list();
    assert_eq!(num(&l[1], "new_bytes"), 0);
    assert_eq!(num(&l[1], "new_chunks"), 0);
    assert_eq!(env.chunk_files().len(), chunks_after_first);

    // one byte changed: exactly one new block chunk, and a new index chunk
    // for its group of 512 entries (the other group's is unchanged)
    let f = fs::OpenOptions::new().write(true).open(&a).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x42 ^ 0xff], 3 << 20).unwrap();
    env.ok(&["backup", "a"]);
    let l = env.list();
    assert_eq!(num(&l[2], "new_chunks"), 1);
    assert_eq!(env.chunk_files().len(), chunks_after_first + 2);

    // another image with the first version's content shares every chunk
    env.ok(&["backup", "b"]);
    let l = env.list();
    assert_eq!(l[3]["image"], "b");
    assert_eq!(num(&l[3], "new_chunks"), 0);
    assert_eq!(num(&l[3], "new_bytes"), 0);

    // every version still restores
    assert_same(&b, &env.restore("a@1"));
    assert_same(&a, &env.restore("a@3"));
    assert_same(&b, &env.restore("b"));
}

/// A flipped bit in a stored chunk is found before any wrong byte is
/// written: the restore fails naming the chunk and the backup, and leaves
/// no target file behind.
#[test]
fn flipped_bit_is_detected() {
    // one raw (incompressible) and one zstd chunk: both codecs must be checked
    for (name, compressible) in [("raw", false), ("zstd", true)] {
        let env = Env::new(&[], "");
        let img = env.path(name);
        if compressible {
            fs::write(&img, "compressible ".repeat(100_000)).unwrap();
        } else {
            write_random(&img, 0, 1 << 20, &mut rng(6));
        }
        env.write_config(&[(name, &format!("file:{}", img.display()))], "", "");
        env.ok(&["init"]);
        env.ok(&["backup", name]);
        let chunks = env.chunk_files();
        assert_eq!(chunks.len(), 1);
        let id = chunks[0].file_name().unwrap().to_string_lossy().to_string();
        let mut bytes = fs::read(&chunks[0]).unwrap();
        let pos = bytes.len() / 2;
        bytes[pos] ^= 0x04;
        fs::write(&chunks[0], bytes).unwrap();

        let to = env.path("out");
        let err = env.fails(&["restore", name, "--to", to.to_str().unwrap()]);
        assert!(err.contains("corrupt"), "{err}");
        assert!(err.contains(&id), "chunk id not named: {err}");
        assert!(err.contains(&format!("backup 1 of image '{name}'")), "backup not named: {err}");
        assert!(!to.exists(), "a failed restore left {}", to.display());
        let leftovers: Vec<_> = fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    }
}

#[test]
fn catalog_rebuild_gives_the_same_list() {
    let env = Env::new(&[], "");
    let a = env.path("a.img");
    let b = env.path("b.img");
    let mut r = rng(7);
    write_random(&a, 0, 3 << 20, &mut r);
    sparse_file(&b, 10 << 20);
    write_random(&b, 5 << 20, 1000, &mut r);
    env.write_config(
        &[("a", &format!("file:{}", a.display())), ("b", &format!("file:{}", b.display()))],
        "",
        "[defaults]\nblock-size = \"64K\"\n",
    );
    env.ok(&["init"]);
    for i in 0..3 {
        random_changes(&a, 3 << 20, 3, &mut r);
        env.ok(&["backup", "a"]);
        if i != 1 {
            env.ok(&["backup", "b"]);
        }
    }
    let before = env.ok(&["list", "--json"]);
    assert_eq!(env.list().len(), 5);
    for ext in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{ext}", env.catalog().display()));
    }
    env.ok(&["catalog", "rebuild"]);
    let after = env.ok(&["list", "--json"]);
    assert_eq!(before, after);
    // and new backups continue with fresh ids
    env.ok(&["backup", "a"]);
    let l = env.list();
    assert_eq!(num(&l[5], "id"), num(&l[4], "id") + 1);
    assert_same(&a, &env.restore("a"));

    // a lost catalog is also rebuilt on its own by the next command
    for ext in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{ext}", env.catalog().display()));
    }
    assert_eq!(env.list().len(), 6);
}
