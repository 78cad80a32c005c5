//! The S3 store backend against radosgw on a real (bluestore) test
//! cluster: the promises of the Backend trait (conditional puts, atomic
//! objects, listings), the store on top (round trips, dedup, bit flips,
//! GC), and leases across processes. See issue 11.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockvault_store::backend::s3::{S3Backend, S3Credentials, S3Location, S3Options};
use blockvault_store::{Backend, BackupId, BlockMap, ChunkId, InitOptions, LockMode, Manifest, Store};

use blockvault_tests::S3Endpoint;

pub fn backend(ep: &S3Endpoint, lease: Duration) -> S3Backend {
    let loc = S3Location::parse(&format!("{}/{}", ep.endpoint, ep.bucket)).unwrap();
    let creds = S3Credentials { access_key: ep.access_key.clone(), secret_key: ep.secret_key.clone() };
    S3Backend::new(loc, creds, &S3Options { lease }).unwrap()
}

fn fresh(tag: &str) -> (S3Endpoint, S3Backend) {
    let ep = blockvault_tests::s3_endpoint(tag);
    let b = backend(&ep, Duration::from_secs(30));
    b.create_bucket().unwrap();
    (ep, b)
}

/// radosgw 16.2 honours `If-None-Match: *`: of racing creators of one key
/// exactly one wins, and an existing chunk is never replaced. Everything
/// claimed across hosts (ids, leases) rests on this.
#[test]
fn s3_conditional_put_is_exclusive() {
    let (ep, b) = fresh("cond");
    let id = ChunkId::of(b"c");
    assert!(b.put_chunk(&id, b"first").unwrap());
    assert!(!b.put_chunk(&id, b"second").unwrap());
    let mut out = Vec::new();
    b.get_chunk(&id, &mut out).unwrap();
    assert_eq!(out, b"first");
    const KEYS: usize = 12;
    const RACERS: usize = 6;
    let wins: Vec<AtomicUsize> = (0..KEYS).map(|_| AtomicUsize::new(0)).collect();
    std::thread::scope(|sc| {
        for r in 0..RACERS {
            let (ep, wins) = (&ep, &wins);
            sc.spawn(move || {
                let mine = backend(ep, Duration::from_secs(30));
                for (k, w) in wins.iter().enumerate() {
                    if mine.create_object(&format!("claims/{k:04}"), format!("racer {r}").as_bytes()).unwrap() {
                        w.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    for (k, w) in wins.iter().enumerate() {
        assert_eq!(w.load(Ordering::SeqCst), 1, "key {k}: {} creators won", w.load(Ordering::SeqCst));
    }
    assert_eq!(b.list_objects("claims/").unwrap().len(), KEYS);
}

fn manifest(id: u64, image: &str, bs: u32) -> Manifest {
    Manifest {
        format: blockvault_store::format::MANIFEST_VERSION,
        set: None,
        id: BackupId(id),
        image: image.into(),
        source: format!("file:/{image}"),
        created: "2026-01-01T00:00:00Z".into(),
        finished: "2026-01-01T00:00:01Z".into(),
        parent: None,
        image_size: 0,
        block_size: bs,
        blockmap_blake3: String::new(),
        snapshot: None,
        stats: Default::default(),
        rbd: None,
    }
}

/// The store on S3: chunks and backups round-trip, a second put of a chunk
/// is deduplicated, a flipped bit in a stored chunk is detected, GC
/// removes only unreferenced chunks, quarantine moves a chunk aside.
#[test]
fn s3_store_round_trip_dedup_bit_flip_gc() {
    let (_ep, b) = fresh("store");
    let store = Store::init_with_backend(Box::new(b.clone()), &InitOptions::default()).unwrap();
    assert!(matches!(
        Store::init_with_backend(Box::new(b.clone()), &InitOptions::default()),
        Err(blockvault_store::Error::AlreadyExists { .. })
    ));
    let bs = 64 * 1024u32;
    let mut map = BlockMap::new_zeroed(4 * bs as u64, bs);
    let mut plains = Vec::new();
    for i in 0..4u8 {
        let plain: Vec<u8> = (0..bs).map(|j| (j as u8).wrapping_mul(i + 1) ^ i).collect();
        let id = ChunkId::of(&plain);
        let enc = blockvault_store::chunk::encode(&plain, id, 1, None).unwrap();
        assert!(store.put_chunk(&enc).unwrap());
        assert!(!store.put_chunk(&enc).unwrap(), "dedup: the second put writes nothing");
        map.set(i as usize, Some(id));
        plains.push((id, plain));
    }
    store.sync().unwrap();
    let mut m = manifest(1, "vm", bs);
    store.write_backup(&mut m, &map).unwrap();
    // reopened from the bucket alone
    let again = Store::with_backend(Box::new(b.clone())).unwrap();
    assert_eq!(again.list_backups().unwrap(), vec![BackupId(1)]);
    let m2 = again.read_manifest(BackupId(1)).unwrap();
    let map2 = again.read_blockmap(&m2).unwrap();
    assert_eq!(map2.entries(), map.entries());
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    for (id, plain) in &plains {
        again.load_chunk(id, &mut scratch, &mut out).unwrap();
        assert_eq!(&out, plain);
    }
    // a bit flip in a stored chunk object
    let (victim, _) = plains[2];
    let mut raw = Vec::new();
    b.get_chunk(&victim, &mut raw).unwrap();
    let n = raw.len();
    raw[n - 7] ^= 0x10;
    let h = victim.to_hex();
    b.put_object(&format!("chunks/{}/{h}", &h[..4]), &raw).unwrap();
    let e = again.load_chunk(&victim, &mut scratch, &mut out).unwrap_err();
    assert!(e.is_corruption(), "bit flip not detected: {e}");
    let bad = again.quarantine_chunk(&victim).unwrap().unwrap();
    assert!(bad.to_string_lossy().contains("quarantine/"), "{}", bad.display());
    assert!(!again.has_chunk(&victim).unwrap());
    // GC: an unreferenced chunk goes, referenced ones stay
    let plain = vec![7u8; bs as usize];
    let orphan = ChunkId::of(&plain);
    again.put_chunk(&blockvault_store::chunk::encode(&plain, orphan, 1, None).unwrap()).unwrap();
    again.touch_chunk(&orphan).unwrap();
    assert!(again.chunk_modified(&orphan).unwrap().is_some());
    let live = blockvault_store::gc::LiveSet::from_store(&again).unwrap();
    let plan = blockvault_store::gc::plan(&again, live, &blockvault_store::gc::GcOptions { grace: Duration::ZERO }).unwrap();
    blockvault_store::gc::apply(&again, plan).unwrap();
    assert!(!again.has_chunk(&orphan).unwrap());
    for (id, _) in &plains[..2] {
        assert!(again.has_chunk(id).unwrap());
    }
}

/// Child side of [`s3_lease_of_a_killed_holder_expires`]: takes the lock
/// and holds it until killed.
#[test]
fn s3_lease_holder_child() {
    let Ok(spec) = std::env::var("BV_S3_LEASE_CHILD") else { return };
    let parts: Vec<&str> = spec.split('|').collect();
    let ep = S3Endpoint {
        endpoint: parts[0].into(),
        access_key: parts[1].into(),
        secret_key: parts[2].into(),
        bucket: parts[3].into(),
        cluster_dir: None,
    };
    let b = backend(&ep, Duration::from_secs(4));
    let mode = if parts[4] == "shared" { LockMode::Shared } else { LockMode::Exclusive };
    let _l = b.lock(parts[5], mode, false).unwrap().expect("child takes the lock");
    println!("HOLDING");
    std::thread::sleep(Duration::from_secs(600));
}

fn spawn_holder(ep: &S3Endpoint, mode: &str, name: &str) -> std::process::Child {
    let spec = format!("{}|{}|{}|{}|{mode}|{name}", ep.endpoint, ep.access_key, ep.secret_key, ep.bucket);
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "s3::s3_lease_holder_child", "--nocapture", "--test-threads=1"])
        .env("BV_S3_LEASE_CHILD", spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let out = c.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    assert!(lines.any(|l| l.map(|l| l.contains("HOLDING")).unwrap_or(false)), "the child did not take the lock");
    c
}

/// A lease holder killed with -9: others refuse naming holder and host
/// while its lease runs, and take the lock once it expired, never before.
/// A live holder keeps its lock past its lease by renewing it.
#[test]
fn s3_lease_of_a_killed_holder_expires() {
    let (ep, _) = fresh("lease");
    let lease = Duration::from_secs(4);
    let b = backend(&ep, lease);
    for (mode, probe) in [("exclusive", LockMode::Shared), ("shared", LockMode::Exclusive)] {
        let name = format!("store-{mode}");
        let mut child = spawn_holder(&ep, mode, &name);
        // alive: renewed past its lease
        std::thread::sleep(lease + Duration::from_secs(2));
        assert!(b.lock(&name, probe, false).unwrap().is_none(), "{mode}: a live holder keeps its lock");
        let who = b.lease_holder(&name).unwrap().expect("a holder is named");
        assert_eq!(who.pid, child.id());
        assert!(who.describe().contains(&blockvault_store::backend::lease::hostname()), "{}", who.describe());
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // its last renewal, which nothing will change now
        let last = b.lease_holder(&name).unwrap().expect("the dead holder's lease is still there");
        assert!(b.lock(&name, probe, false).unwrap().is_none(), "{mode}: the dead holder's lease still runs");
        let t0 = Instant::now();
        let got = b.lock(&name, probe, true).unwrap();
        assert!(got.is_some());
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(now_ms >= last.expires_ms, "{mode}: taken over {} ms before the lease expired", last.expires_ms - now_ms);
        eprintln!("{mode}: taken over {:?} after the kill", t0.elapsed());
    }
}
