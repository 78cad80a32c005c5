//! `restore --to qcow2:PATH`, flat and `--chain` (issue 12, item 2),
//! checked with qemu-img: `check` on every layer, `info --backing-chain`,
//! `compare` of every layer (through its backing chain) against the raw
//! restore of its backup, and `map` for the zero clusters that hide
//! discarded blocks from the layers below.
//!
//! File-source backups, no Ceph. Between the backups the source gets random
//! writes, punched holes (a discard, which the file source reads as zeros)
//! and written zeros. The image sizes are not multiples of the cluster size.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::Rng;

use crate::common::*;

const KIB: u64 = 1024;

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img").args(args).output().expect("qemu-img (package qemu-utils) must be installed");
    stdout_of_success(&format!("qemu-img {args:?}"), o)
}

fn qemu_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&qemu_img(args)).unwrap()
}

/// `qemu-img check` passes and finds nothing to report (no errors, leaks or
/// corruptions), and the image is a qcow2 v3 of `virtual_size`.
fn check_layer(p: &Path, virtual_size: u64) {
    let path = p.to_str().unwrap();
    let c = qemu_json(&["check", "--output=json", "-f", "qcow2", path]);
    for key in ["corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"] {
        assert_eq!(c[key].as_u64().unwrap_or(0), 0, "qemu-img check of {path}: {key} in {c}");
    }
    let info = qemu_json(&["info", "--output=json", "-f", "qcow2", path]);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{path} is not qcow2 version 3: {info}");
    assert_eq!(num(&info, "virtual-size"), virtual_size, "{path}: {info}");
}

/// `qemu-img compare` of a qcow2, read through its backing chain, against a
/// raw file. (Not `-s`: that also compares allocation, which differs between
/// the formats by design. A size difference passes only when the longer
/// image's tail is zeros: the qcow2's rounding up to 512 bytes.)
fn assert_compare_identical(qcow2: &Path, raw: &Path) {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(qcow2)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}{}",
        qcow2.display(),
        raw.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The `qemu-img map --output=json` entries covering `[off, off+len)`.
fn map_over(map: &[serde_json::Value], off: u64, len: u64) -> Vec<&serde_json::Value> {
    map.iter().filter(|e| num(e, "start") < off + len && num(e, "start") + num(e, "length") > off).collect()
}

fn punch(path: &Path, off: u64, len: u64) {
    let s = Command::new("fallocate").args(["-p", "-o", &off.to_string(), "-l", &len.to_string()]).arg(path).status().unwrap();
    assert!(s.success(), "fallocate -p on {}", path.display());
}

fn write_zeros(path: &Path, off: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(&vec![0u8; len], off).unwrap();
}

fn last_id(env: &Env) -> u64 {
    env.list().iter().map(|b| num(b, "id")).max().unwrap()
}

fn restore_qcow2(env: &Env, spec: &str, to: &Path, extra: &[&str]) -> String {
    let target = format!("qcow2:{}", to.display());
    let mut args = vec!["restore", spec, "--to", &target];
    args.extend_from_slice(extra);
    env.ok(&args)
}

#[test]
fn a_chain_of_backups_restores_as_qcow2_layers_and_flat() {
    const BS: u64 = 64 * KIB;
    // 48 blocks and a short one, not a multiple of 512 either
    let size = 48 * BS + 20_000 + 3;
    let env = Env::new(&[], "");
    let src = env.path("vm.img");
    env.write_config(&[("vm", &format!("file:{}", src.display()))], "", "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["init"]);
    let mut r = rng(1212);

    // backup 1: data everywhere but blocks 40..44
    sparse_file(&src, size);
    write_random(&src, 0, (40 * BS) as usize, &mut r);
    write_random(&src, 44 * BS, (size - 44 * BS) as usize, &mut r);
    env.ok(&["backup", "vm"]);
    let mut ids = vec![last_id(&env)];
    // backup 2: writes in blocks 5, 25..27 and 45
    write_random(&src, 5 * BS + 10, 3000, &mut r);
    write_random(&src, 25 * BS, 2 * BS as usize, &mut r);
    write_random(&src, 45 * BS + 77, 100, &mut r);
    env.ok(&["backup", "vm"]);
    ids.push(last_id(&env));
    // backup 3: a discard of blocks 8..14 (holes punched), and a write
    punch(&src, 8 * BS, 6 * BS);
    write_random(&src, 30 * BS + 100, 5000, &mut r);
    env.ok(&["backup", "vm"]);
    ids.push(last_id(&env));
    // backup 4: zeros written over blocks 20..23, and half of block 2
    write_zeros(&src, 20 * BS, 3 * BS as usize);
    write_zeros(&src, 2 * BS, (BS / 2) as usize);
    write_random(&src, 41 * BS, 2000, &mut r);
    env.ok(&["backup", "vm"]);
    ids.push(last_id(&env));
    // backup 5: data again in part of the discarded range, the short last
    // block changed, a discard of block 30
    write_random(&src, 9 * BS, BS as usize, &mut r);
    write_random(&src, size - 100, 100, &mut r);
    punch(&src, 30 * BS, BS);
    env.ok(&["backup", "vm"]);
    ids.push(last_id(&env));
    assert_eq!(ids.len(), 5);
    let raws: Vec<PathBuf> = ids.iter().map(|id| env.restore(&format!("vm@{id}"))).collect();
    assert_same(raws.last().unwrap(), &src);
    let vsize = size.div_ceil(512) * 512;

    // the chain
    let out = env.path("out");
    fs::create_dir(&out).unwrap();
    let top = out.join("vm.qcow2");
    let said = restore_qcow2(&env, "vm", &top, &["--chain"]);
    let layers: Vec<PathBuf> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| if i + 1 == ids.len() { top.clone() } else { out.join(format!("vm.{id}.qcow2")) })
        .collect();
    for (i, l) in layers.iter().enumerate() {
        assert!(said.contains(&l.display().to_string()), "restore output does not name layer {}: {said}", l.display());
        check_layer(l, vsize);
        // each layer, read through the layers below it, is its backup
        assert_compare_identical(l, &raws[i]);
    }
    let names: Vec<String> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), 5, "only the five layers, no temp files, in {}: {names:?}", out.display());

    let chain = qemu_json(&["info", "--backing-chain", "--output=json", top.to_str().unwrap()]);
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), 5, "{chain:?}");
    for (k, info) in chain.iter().enumerate() {
        // top first
        let i = ids.len() - 1 - k;
        assert_eq!(info["format"], "qcow2");
        assert_eq!(Path::new(info["filename"].as_str().unwrap()), layers[i]);
        if i == 0 {
            assert!(info.get("backing-filename").is_none(), "the bottom layer has no backing file: {info}");
        } else {
            // relative: the lower layer's file name only
            assert_eq!(info["backing-filename"], format!("vm.{}.qcow2", ids[i - 1]), "{info}");
            assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
        }
    }

    // layer 3 (the discard): blocks 8..14 are zero clusters in the layer
    // itself (depth 0, hiding the data below); blocks it did not change come
    // from below (depth > 0)
    let map3 = qemu_json(&["map", "--output=json", layers[2].to_str().unwrap()]);
    let map3 = map3.as_array().unwrap();
    for e in map_over(map3, 8 * BS, 6 * BS) {
        assert!(e["zero"] == true && e["data"] == false && num(e, "depth") == 0, "discarded blocks in layer 3: {e}");
    }
    for e in map_over(map3, 0, 8 * BS) {
        assert!(num(e, "depth") > 0 || e["zero"] == true, "layer 3 should not hold unchanged blocks 0..8: {e}");
    }
    // ... and the top layer shows them zero too, except block 9 (rewritten)
    let map_top = qemu_json(&["map", "--output=json", top.to_str().unwrap()]);
    let map_top = map_top.as_array().unwrap();
    for (off, len) in [(8 * BS, BS), (10 * BS, 4 * BS), (30 * BS, BS)] {
        for e in map_over(map_top, off, len) {
            assert!(e["zero"] == true && e["data"] == false, "discarded at {off}+{len} in the top layer: {e}");
        }
    }
    for e in map_over(map_top, 9 * BS, BS) {
        assert!(e["data"] == true && num(e, "depth") == 0, "block 9, rewritten in backup 5: {e}");
    }
    // layer 4 (zeros written over blocks 20..23) flags them zero as well
    let map4 = qemu_json(&["map", "--output=json", layers[3].to_str().unwrap()]);
    for e in map_over(map4.as_array().unwrap(), 20 * BS, 3 * BS) {
        assert!(e["zero"] == true && e["data"] == false && num(e, "depth") == 0, "zeroed blocks in layer 4: {e}");
    }
    // upper layers hold only what changed: far smaller than the bottom one
    let len = |p: &Path| fs::metadata(p).unwrap().len();
    for l in &layers[1..] {
        assert!(len(l) * 3 < len(&layers[0]), "{} ({} bytes) vs bottom {} bytes", l.display(), len(l), len(&layers[0]));
    }

    // the flat image of the latest backup: no backing, zeros unallocated
    let flat = env.path("flat.qcow2");
    restore_qcow2(&env, "vm", &flat, &[]);
    check_layer(&flat, vsize);
    assert_compare_identical(&flat, raws.last().unwrap());
    let info = qemu_json(&["info", "--output=json", flat.to_str().unwrap()]);
    assert!(info.get("backing-filename").is_none(), "{info}");
    let map_flat = qemu_json(&["map", "--output=json", flat.to_str().unwrap()]);
    for (off, len) in [(8 * BS, BS), (10 * BS, 4 * BS), (20 * BS, 3 * BS), (30 * BS, BS), (40 * BS, BS)] {
        for e in map_over(map_flat.as_array().unwrap(), off, len) {
            assert!(e["zero"] == true && e["data"] == false, "zero blocks at {off}+{len} in the flat image: {e}");
        }
    }
    // a flat image of an older backup, too
    let flat2 = env.path("flat2.qcow2");
    restore_qcow2(&env, &format!("vm@{}", ids[1]), &flat2, &[]);
    check_layer(&flat2, vsize);
    assert_compare_identical(&flat2, &raws[1]);

    // an older backup as the top of a --since chain: layers 2, 3 and 4
    let since_dir = env.path("since");
    fs::create_dir(&since_dir).unwrap();
    let old_top = since_dir.join("old.qcow2");
    restore_qcow2(&env, &format!("vm@{}", ids[3]), &old_top, &["--chain", "--since", &ids[1].to_string()]);
    let old_layers = [since_dir.join(format!("old.{}.qcow2", ids[1])), since_dir.join(format!("old.{}.qcow2", ids[2])), old_top.clone()];
    for (k, l) in old_layers.iter().enumerate() {
        check_layer(l, vsize);
        assert_compare_identical(l, &raws[1 + k]);
    }
    let chain = qemu_json(&["info", "--backing-chain", "--output=json", old_top.to_str().unwrap()]);
    assert_eq!(chain.as_array().unwrap().len(), 3, "{chain}");
    assert_eq!(fs::read_dir(&since_dir).unwrap().count(), 3);

    // an existing target is refused without --force, and kept as it was
    let before = fs::read(&layers[1]).unwrap();
    let e = env.fails(&["restore", "vm", "--to", &format!("qcow2:{}", top.display()), "--chain"]);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(fs::read(&layers[1]).unwrap(), before);
    // with --force the chain is rewritten, and still checks
    restore_qcow2(&env, "vm", &top, &["--chain", "--force"]);
    check_layer(&top, vsize);
    assert_compare_identical(&top, raws.last().unwrap());
    // a --since that is not in the chain, and --since without --chain
    let e = env.fails(&["restore", &format!("vm@{}", ids[1]), "--to", "qcow2:/nonexistent/x.qcow2", "--chain", "--since", &ids[3].to_string()]);
    assert!(e.contains("not in the chain"), "{e}");
    let o = env.run(&["restore", "vm", "--to", "qcow2:x.qcow2", "--since", "1"]);
    assert!(!o.status.success());
    let e = env.fails(&["restore", "vm", "--to", env.path("raw-chain").to_str().unwrap(), "--chain"]);
    assert!(e.contains("qcow2"), "{e}");
}

/// 4 MiB blocks get 64 KiB clusters: zero runs inside a data block are
/// unallocated in a flat image and zero clusters in an upper layer, and the
/// data clusters of a changed block are written, not the whole block.
#[test]
fn large_blocks_use_64k_clusters_with_zero_clusters_inside_blocks() {
    const BS: u64 = 4096 * KIB;
    const CS: u64 = 64 * KIB;
    let size = 3 * BS + 300 * KIB + 512; // the last block is short
    let env = Env::new(&[], "");
    let src = env.path("big.img");
    env.write_config(&[("big", &format!("file:{}", src.display()))], "", "[defaults]\nblock-size = \"4M\"\n");
    env.ok(&["init"]);
    let mut r = rng(99);
    sparse_file(&src, size);
    write_random(&src, 0, size as usize, &mut r);
    // a zero run inside block 1, on cluster boundaries
    write_zeros(&src, BS + 10 * CS, (5 * CS) as usize);
    env.ok(&["backup", "big"]);
    let first = last_id(&env);
    // block 0: half zeroed; block 2: one cluster rewritten
    write_zeros(&src, 0, (BS / 2) as usize);
    let off = 2 * BS + 7 * CS;
    write_random(&src, off, r.gen_range(1000..CS as usize), &mut r);
    env.ok(&["backup", "big"]);
    let second = last_id(&env);
    let raw1 = env.restore(&format!("big@{first}"));
    let raw2 = env.restore(&format!("big@{second}"));
    let vsize = size.div_ceil(512) * 512;

    let flat = env.path("big-flat.qcow2");
    restore_qcow2(&env, &format!("big@{first}"), &flat, &[]);
    check_layer(&flat, vsize);
    assert_compare_identical(&flat, &raw1);
    let info = qemu_json(&["info", "--output=json", flat.to_str().unwrap()]);
    assert_eq!(num(&info, "cluster-size"), CS, "{info}");
    let m = qemu_json(&["map", "--output=json", flat.to_str().unwrap()]);
    for e in map_over(m.as_array().unwrap(), BS + 10 * CS, 5 * CS) {
        assert!(e["zero"] == true && e["data"] == false, "zero run inside block 1: {e}");
    }

    let top = env.path("big.qcow2");
    restore_qcow2(&env, "big", &top, &["--chain"]);
    let lower = env.path(&format!("big.{first}.qcow2"));
    check_layer(&lower, vsize);
    check_layer(&top, vsize);
    assert_compare_identical(&lower, &raw1);
    assert_compare_identical(&top, &raw2);
    let m = qemu_json(&["map", "--output=json", top.to_str().unwrap()]);
    let m = m.as_array().unwrap();
    for e in map_over(m, 0, BS / 2) {
        assert!(e["zero"] == true && e["data"] == false && num(e, "depth") == 0, "zeroed half of block 0: {e}");
    }
    for e in map_over(m, BS, BS) {
        assert!(num(e, "depth") == 1 || e["zero"] == true, "block 1 is unchanged, read from below: {e}");
    }
    // the top layer holds block 0's data half and block 2 (both changed,
    // 32 + 64 clusters), nothing of blocks 1 and 3
    let data_in_top: u64 = m.iter().filter(|e| e["data"] == true && num(e, "depth") == 0).map(|e| num(e, "length")).sum();
    assert_eq!(data_in_top, BS / 2 + BS, "{m:?}");

    // a corrupt chunk fails the restore, and leaves no layer (nor temp file)
    for c in env.chunk_files() {
        let mut b = fs::read(&c).unwrap();
        let n = b.len();
        b[n - 5] ^= 0x20;
        fs::write(&c, b).unwrap();
    }
    let bad = env.path("bad");
    fs::create_dir(&bad).unwrap();
    let e = env.fails(&["restore", "big", "--to", &format!("qcow2:{}", bad.join("b.qcow2").display()), "--chain"]);
    assert!(e.contains("cannot be restored") || e.contains("corrupt"), "{e}");
    assert_eq!(fs::read_dir(&bad).unwrap().count(), 0, "a failed restore left files in {}", bad.display());
}
