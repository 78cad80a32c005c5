//! `blockvault serve` (issue 12, item 1) checked with real NBD clients:
//! qemu-img, qemu-io (qemu-utils) and nbdinfo, nbdcopy (libnbd-bin).
//!
//! One image, two backups: backup 1, then random writes and a zeroed range
//! (data blocks that became zero), backup 2. Both are served at once and
//! compared with raw restores of the same backups; the allocation map a
//! client sees is compared with the zero blocks of the restore; hostile
//! clients come and go while the server keeps serving; a corrupted chunk
//! must reach the client as an I/O error, never as data.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::common::*;

const BS: u64 = 64 << 10;
const SIZE: u64 = 160 * BS; // 10 MiB

/// A running `blockvault serve`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    stderr: PathBuf,
}

impl Server {
    fn start(env: &Env, specs: &[&str], unix: Option<&Path>) -> Server {
        let stderr = env.path(&format!("serve-{}.log", rand::random::<u32>()));
        let mut args = vec!["serve"];
        args.extend_from_slice(specs);
        args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
        let u;
        if let Some(p) = unix {
            u = p.to_str().unwrap().to_string();
            args.extend_from_slice(&["--unix", &u]);
        }
        let mut child = env
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        // the server prints where it listens, then one line per export
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut port, mut exports) = (None, 0);
        while exports < specs.len() {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                panic!("serve exited before it listened: {}", fs::read_to_string(&stderr).unwrap());
            }
            if let Some(a) = line.trim().strip_prefix("listening on 127.0.0.1:") {
                port = Some(a.parse().unwrap());
            }
            if line.starts_with("export '") {
                exports += 1;
            }
        }
        // keep reading stdout so the server never blocks on a full pipe
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Server { child, port: port.expect("no TCP address printed"), stderr }
    }

    fn url(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Panics unless the server is still running.
    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server exited: {}",
            fs::read_to_string(&self.stderr).unwrap()
        );
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install qemu-utils and libnbd-bin)"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    stdout_of_success(&format!("{cmd} {args:?}"), run(cmd, args))
}

/// `qemu-img compare` of an export against a raw file: its exit code
/// (0 identical, 1 different, 2 error) and output.
fn compare(url: &str, file: &Path) -> (i32, String) {
    let o = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", url, file.to_str().unwrap()]);
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn assert_identical(url: &str, file: &Path) {
    let (code, out) = compare(url, file);
    assert_eq!(code, 0, "qemu-img compare {url} {}: {out}", file.display());
}

/// The allocation map a restore implies: (offset, length, zero) runs of
/// whole blocks.
fn expected_map(file: &Path) -> Vec<(u64, u64, bool)> {
    let data = fs::read(file).unwrap();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, block) in data.chunks(BS as usize).enumerate() {
        let zero = block.iter().all(|&b| b == 0);
        match out.last_mut() {
            Some(l) if l.2 == zero => l.1 += block.len() as u64,
            _ => out.push((i as u64 * BS, block.len() as u64, zero)),
        }
    }
    out
}

/// `nbdinfo --map` as (offset, length, zero) runs; a run must be either
/// data (type 0) or hole+zero (type 3), nothing in between.
fn nbd_map(url: &str) -> Vec<(u64, u64, bool)> {
    let out = ok("nbdinfo", &["--map", url]);
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        assert!(ty == 0 || ty == 3, "unexpected map type in {line:?}");
        let zero = ty == 3;
        match runs.last_mut() {
            Some(l) if l.2 == zero => l.1 += len,
            _ => runs.push((off, len, zero)),
        }
    }
    runs
}

/// Two backups of one image: (env, raw restore of backup 1, of backup 2).
fn two_backups() -> (Env, PathBuf, PathBuf) {
    let env = Env::new(&[], "");
    let img = env.path("vm.img");
    sparse_file(&img, SIZE);
    let mut r = rng(1212);
    write_random(&img, 0, (10 * BS) as usize, &mut r);
    write_random(&img, 30 * BS + 100, (20 * BS) as usize, &mut r);
    write_random(&img, 100 * BS, (5 * BS) as usize, &mut r);
    write_random(&img, SIZE - 1000, 1000, &mut r);
    // written zeros: allocated in the file, zero blocks in the backup
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (4 * BS) as usize], 60 * BS).unwrap();
    env.write_config(&[("vm", &format!("file:{}", img.display()))], "", "[defaults]\nblock-size = \"64K\"\n");
    env.ok(&["init"]);
    env.ok(&["backup", "vm"]); // 1
    random_changes(&img, SIZE, 20, &mut r);
    // data blocks 2..6 become zero: holes in backup 2, data in backup 1
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (4 * BS) as usize], 2 * BS).unwrap();
    env.ok(&["backup", "vm"]); // 2
    let (r1, r2) = (env.restore("vm@1"), env.restore("vm@2"));
    (env, r1, r2)
}

/// Sends the NBD handshake and `NBD_OPT_GO` for `name` by hand; returns the
/// socket in the transmission phase.
fn raw_client(port: u16, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        assert!(kind & (1 << 31) == 0, "GO {name} refused: {kind:#x}");
        if kind == 1 {
            return s; // ACK
        }
    }
}

#[test]
fn serve_exports_backups_that_real_clients_read_identically() {
    let (env, r1, r2) = two_backups();
    let sock = env.path("nbd.sock");
    let mut srv = Server::start(&env, &["vm", "vm@1"], Some(&sock));

    // qemu-img compare: the latest and the older backup, served at once,
    // and the first spec as the default export; the check can fail
    assert_identical(&srv.url("vm"), &r2);
    assert_identical(&srv.url("vm@1"), &r1);
    assert_identical(&format!("nbd://127.0.0.1:{}", srv.port), &r2);
    assert_eq!(compare(&srv.url("vm@1"), &r2).0, 1, "backups 1 and 2 differ, the comparison must say so");
    let o = run("nbdinfo", &[&srv.url("vm@7")]);
    assert!(!o.status.success(), "an export that is not served must be refused");

    // the allocation map: zero blocks as holes, data as data
    for (url, restore) in [(srv.url("vm"), &r2), (srv.url("vm@1"), &r1)] {
        let want = expected_map(restore);
        assert!(want.iter().filter(|x| x.2).count() >= 3, "the test image must have zero runs: {want:?}");
        assert_eq!(nbd_map(&url), want, "nbdinfo --map {url}");
    }
    // backup 2's zeroed blocks 2..6 are holes there, data in backup 1
    assert!(nbd_map(&srv.url("vm")).contains(&(2 * BS, 4 * BS, true)));
    assert!(nbd_map(&srv.url("vm@1")).iter().any(|&(o, l, z)| !z && o <= 2 * BS && o + l >= 6 * BS));

    // a client that sends garbage, one that hangs up inside a request, one
    // that connects and says nothing (still connected below)
    let mut garbage = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    let mut hello = [0u8; 18];
    garbage.read_exact(&mut hello).unwrap();
    garbage.write_all(&[0xffu8; 4096]).unwrap();
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest); // the server closes it
    let mut half = raw_client(srv.port, "vm");
    half.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0]).unwrap();
    drop(half);
    let mut in_flight = raw_client(srv.port, "vm@1");
    // a read of 1 MiB, then gone before the reply is read
    let mut q = 0x2560_9513u32.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 0]);
    q.extend_from_slice(&1u64.to_be_bytes());
    q.extend_from_slice(&0u64.to_be_bytes());
    q.extend_from_slice(&(1u32 << 20).to_be_bytes());
    in_flight.write_all(&q).unwrap();
    drop(in_flight);
    let silent = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    // a write (which no read-only client would send) is refused with EPERM,
    // its payload skipped: the next read on that connection is in step
    let mut w = raw_client(srv.port, "vm");
    let mut q = 0x2560_9513u32.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 1]); // NBD_CMD_WRITE
    q.extend_from_slice(&5u64.to_be_bytes());
    q.extend_from_slice(&0u64.to_be_bytes());
    q.extend_from_slice(&4096u32.to_be_bytes());
    q.extend_from_slice(&[0xAAu8; 4096]);
    q.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0]); // NBD_CMD_READ (simple reply)
    q.extend_from_slice(&6u64.to_be_bytes());
    q.extend_from_slice(&(30 * BS).to_be_bytes());
    q.extend_from_slice(&4096u32.to_be_bytes());
    w.write_all(&q).unwrap();
    let mut reply = [0u8; 16];
    w.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [&0x6744_6698u32.to_be_bytes()[..], &1u32.to_be_bytes(), &5u64.to_be_bytes()].concat()[..], "EPERM");
    w.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [&0x6744_6698u32.to_be_bytes()[..], &0u32.to_be_bytes(), &6u64.to_be_bytes()].concat()[..]);
    let mut got = vec![0u8; 4096];
    w.read_exact(&mut got).unwrap();
    assert!(got == fs::read(&r2).unwrap()[(30 * BS) as usize..][..4096]);
    drop(w);
    srv.assert_alive();

    // nbdcopy of each export, two at once (each with several connections,
    // which the server allows: the exports never change)
    let (c1, c2) = (env.path("copy-1.raw"), env.path("copy-2.raw"));
    let mut a = Command::new("nbdcopy").args([&srv.url("vm@1"), c1.to_str().unwrap()]).spawn().unwrap();
    let mut b = Command::new("nbdcopy").args([&srv.url("vm"), c2.to_str().unwrap()]).spawn().unwrap();
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success(), "nbdcopy failed: {}", srv.log());
    assert_same(&c1, &r1);
    assert_same(&c2, &r2);
    // and a later client still reads correctly
    assert_identical(&srv.url("vm"), &r2);
    srv.assert_alive();
    drop(silent);

    // the Unix socket
    let unix_url = format!("nbd+unix:///vm@1?socket={}", sock.display());
    assert_eq!(ok("nbdinfo", &["--size", &unix_url]).trim(), SIZE.to_string());
    assert_identical(&unix_url, &r1);
    assert_eq!(ok("nbdinfo", &["--is", "read-only", &unix_url]).trim(), "");
    let list = ok("nbdinfo", &["--list", &srv.url("")]);
    assert!(list.contains("export=\"vm\"") || list.contains("vm\n") || list.contains("vm@1"), "{list}");

    // writes are refused
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &srv.url("vm")]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!out.contains("wrote 4096"), "a write must not succeed: {out}");
    assert_identical(&srv.url("vm"), &r2);
    srv.assert_alive();
    // the server logged the dropped clients, not a failure of its own
    assert!(srv.log().contains("client dropped"), "{}", srv.log());
}

#[test]
fn a_corrupt_chunk_reaches_the_client_as_an_io_error_never_as_data() {
    let (env, _r1, r2) = two_backups();
    let data = fs::read(&r2).unwrap();
    // a data block of backup 2 only (random, so no other block shares it)
    let b = 40u64;
    let block = &data[(b * BS) as usize..((b + 1) * BS) as usize];
    assert!(block.iter().any(|&x| x != 0));
    let h = blockvault_store::ChunkId::of(block).to_hex();
    let chunk = env.store().join("chunks").join(&h[..4]).join(&h);
    let mut bytes = fs::read(&chunk).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x10;
    fs::write(&chunk, &bytes).unwrap();

    let mut srv = Server::start(&env, &["vm"], None);
    // a read of that block is an I/O error
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {} 4096", b * BS + 8192), &srv.url("vm")]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("Input/output error"), "qemu-io read of the corrupt block: {out}");
    // compare stops with a read error (exit 4), never "content mismatch"
    // (1): no wrong byte reached the client
    let (code, out) = compare(&srv.url("vm"), &r2);
    assert_eq!(code, 4, "qemu-img compare over a corrupt chunk: {out}");
    assert!(out.contains("Input/output error"), "{out}");
    let o = run("nbdcopy", &[&srv.url("vm"), env.path("copy.raw").to_str().unwrap()]);
    assert!(!o.status.success(), "nbdcopy over a corrupt chunk must fail");
    // the rest of the image still reads: a healthy range right before it
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", &format!("read {} {}", (b - 1) * BS, BS), &srv.url("vm")]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains(&format!("read {BS}/{BS} bytes")), "{out}");
    srv.assert_alive();
    assert!(srv.log().contains("read failed") && srv.log().contains(&h), "the server must log the corrupt chunk: {}", srv.log());
}

/// The server holds the store lock shared for its whole life: a gc started
/// while it serves a backup that was meanwhile forgotten plans, then waits;
/// the client reads the forgotten backup whole; the sweep happens only once
/// the server is gone.
#[test]
fn gc_waits_for_the_server_before_removing_a_served_backups_chunks() {
    let (env, r1, _r2) = two_backups();
    let img = env.path("vm.img");
    env.write_config(&[("vm", &format!("file:{}", img.display()))], "gc-grace = 0", "[defaults]\nblock-size = \"64K\"\n");
    let mut srv = Server::start(&env, &["vm@1"], None);
    env.ok(&["forget", "vm@1"]);
    let log = env.path("gc.log");
    let gc = env.cmd(&["gc", "--json"]).stdout(Stdio::piped()).stderr(fs::File::create(&log).unwrap()).spawn().unwrap();
    // until gc says it waits for the lock (bounded: gc plans in well under
    // a second here, and exits if anything goes wrong)
    let mut waiting = false;
    for _ in 0..600 {
        if fs::read_to_string(&log).unwrap().contains("gc waiting") {
            waiting = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(waiting, "gc did not wait for the server: {}", fs::read_to_string(&log).unwrap());
    assert_identical(&srv.url("vm@1"), &r1);
    srv.assert_alive();
    drop(srv);
    let out = gc.wait_with_output().unwrap();
    assert!(out.status.success(), "gc: {}", fs::read_to_string(&log).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(num(&v, "removed_chunks") > 0, "backup 1's own chunks are garbage once the server is gone: {v}");
}
