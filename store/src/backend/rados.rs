//! The RADOS backend: a store in a pool (and namespace) of a Ceph cluster,
//! usually a separate backup cluster, shared by the agents of many hosts.
//!
//! ## Objects
//! ```text
//! namespace NS (the url's, or the default one):
//!   blockvault-store.json, backups/<id:012>.{json,blockmap,protected,verify,claim}
//!                           metadata objects, named by their key
//!   locks/<name>            empty objects that carry the advisory locks
//! namespace NS/chunks:
//!   <64 hex>                one object per chunk
//!   <64 hex>.bad            a chunk verify found corrupt, kept aside
//! ```
//! Chunks live in a namespace of their own, so that listing the backups
//! (which every backup and every catalog refresh does) does not walk the
//! millions of chunk objects; a namespace given in a url cannot contain a
//! `/`, so `NS/chunks` is never another store's metadata namespace.
//!
//! ## Durability and atomicity
//! RADOS acknowledges a write once every replica (or every shard of an
//! erasure-coded pool) has it on stable storage, and applies each
//! operation atomically. So:
//! * a chunk is written with one operation that creates the object
//!   exclusively and writes its whole content (`CREATE EXCL` + `WRITE_FULL`
//!   in one write op): it is never overwritten, a concurrent writer of the
//!   same chunk gets EEXIST, and no reader ever sees it incomplete. There
//!   are no temp objects. Puts are staged to [`WRITERS`] writer threads so
//!   that many OSD operations overlap; [`Backend::sync`] waits for them
//!   all and returns the first error.
//! * a metadata object is replaced with one `WRITE_FULL`: readers see the
//!   old bytes or the new. [`Backend::create_object`] (backup id claims) is
//!   the same exclusive create as a chunk.
//!
//! ## Locks
//! A lock is a cls_lock advisory lock named `blockvault` on the object
//! `locks/<name>`, shared or exclusive, taken for a *lease* (default 30 s)
//! and renewed every third of the lease by a thread that the
//! [`StoreLock`] owns. The OSD expires a lease by its own clock, so the
//! clocks of the hosts play no part. A holder that dies (kill -9, host
//! crash, network cut) stops renewing, and the lock is free once its lease
//! has run out, never before: RADOS refuses the lock (EBUSY) to everyone
//! else until then. The cookie of each holder says who it is
//! (`host=H pid=P id=RANDOM`), so a waiter or a refused caller names the
//! holder and its host ([`RadosBackend::holder`]).
//!
//! A holder whose renewal fails because the lease is gone (it was paused
//! longer than the lease, or cut off from the cluster) marks its
//! [`StoreLock`] lost; the backup and GC check
//! [`StoreLock::ensure_held`] before they commit or remove anything, and
//! stop. See the crate docs for the locking rules and the GC argument.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockvault_ceph::{CephOptions, Cluster, IoCtx, RbdError};

use super::{Backend, ChunkEntry, LockMode, StoreLock};
use crate::error::{Error, Result};
use crate::ChunkId;

/// Name of the cls_lock lock on every lock object.
const LOCK_NAME: &str = "blockvault";
/// Threads that stat chunks while listing them.
const LIST_STAT_THREADS: usize = 8;

/// Settings of a [`RadosBackend`].
#[derive(Clone, Debug)]
pub struct RadosOptions {
    /// Lease of every lock this handle takes (see the module docs).
    pub lease: Duration,
}

impl Default for RadosOptions {
    fn default() -> Self {
        RadosOptions { lease: Duration::from_secs(30) }
    }
}

/// A store in a RADOS pool and namespace.
pub struct RadosBackend {
    /// `rados:POOL[/NS]`
    location: PathBuf,
    meta: IoCtx,
    chunks: IoCtx,
    opts: RadosOptions,
    /// Chunk writes in flight (started on the first put).
    writer: std::sync::OnceLock<Writer>,
}

/// Chunk writes in flight at once: one synchronous librados call per
/// writer thread, so this many OSD operations overlap (as `rados bench
/// -t 16`). Bounds the memory of queued chunks to about this many too.
const WRITERS: usize = 16;

/// Writer threads taking chunk puts off a bounded queue: puts are staged
/// (the trait allows it) and [`Backend::sync`] waits for every one and
/// returns the first error.
struct Writer {
    tx: Mutex<Option<std::sync::mpsc::SyncSender<(ChunkId, Vec<u8>)>>>,
    state: Arc<(Mutex<WriteState>, Condvar)>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct WriteState {
    inflight: usize,
    error: Option<Error>,
}

impl Writer {
    fn start(chunks: &IoCtx, location: &Path) -> Writer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(ChunkId, Vec<u8>)>(WRITERS);
        let rx = Arc::new(Mutex::new(rx));
        let state: Arc<(Mutex<WriteState>, Condvar)> = Arc::default();
        let mut threads = Vec::new();
        for _ in 0..WRITERS {
            let (rx, state, io, loc) = (rx.clone(), state.clone(), chunks.clone(), location.to_path_buf());
            let t = std::thread::Builder::new().name("rados chunk writer".into()).spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((id, bytes)) = job else { return };
                let res = io.create_exclusive(&RadosBackend::chunk_oid(&id), &bytes);
                let (m, cv) = &*state;
                let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = res {
                    if st.error.is_none() {
                        st.error = Some(io_err("write chunk", loc.join("chunks").join(id.to_hex()), e));
                    }
                }
                st.inflight -= 1;
                cv.notify_all();
            });
            if let Ok(t) = t {
                threads.push(t);
            }
        }
        Writer { tx: Mutex::new(Some(tx)), state, threads: Mutex::new(threads) }
    }

    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        {
            let mut st = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            st.inflight += 1;
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = tx.map(|t| t.send((*id, bytes.to_vec())).is_ok()).unwrap_or(false);
        if !sent {
            let mut st = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
            st.inflight -= 1;
            return Err(Error::Io {
                op: "write chunk",
                path: PathBuf::from(id.to_hex()),
                source: std::io::Error::other("the chunk writer threads are gone"),
            });
        }
        Ok(())
    }

    /// Waits for every write in flight; the first error since the last wait.
    fn wait(&self) -> Option<Error> {
        let (m, cv) = &*self.state;
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        while st.inflight > 0 {
            st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.error.take()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        for t in self.threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = t.join();
        }
    }
}

/// An `Io` error of a RADOS operation on `what`, keeping librados' cause.
fn io_err(op: &'static str, what: impl Into<PathBuf>, e: RbdError) -> Error {
    let kind = match e.errno_value() {
        Some(n) => std::io::Error::from_raw_os_error(n).kind(),
        None => std::io::ErrorKind::Other,
    };
    Error::Io { op, path: what.into(), source: std::io::Error::new(kind, e) }
}

/// `host=H pid=P id=R`: who holds a lock, in its cookie (RADOS lists the
/// cookies of a lock's holders).
fn holder_cookie() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_graphic() && *c != '\0').collect();
    let host = if host.is_empty() { "unknown".to_string() } else { host };
    format!("host={host} pid={} id={:016x}", std::process::id(), rand::random::<u64>())
}

impl RadosBackend {
    /// Connects to the cluster and opens the store's pool and namespace
    /// (`namespace` `None`: the default one). Nothing is created.
    ///
    /// # Errors
    /// `Io` naming the store when the cluster cannot be reached or the pool
    /// does not exist.
    pub fn connect(ceph: &CephOptions, pool: &str, namespace: Option<&str>, opts: &RadosOptions) -> Result<RadosBackend> {
        let location = PathBuf::from(match namespace {
            Some(ns) => format!("rados:{pool}/{ns}"),
            None => format!("rados:{pool}"),
        });
        let cluster = Cluster::connect(ceph).map_err(|e| io_err("connect", &location, e))?;
        let meta = cluster.ioctx(pool, namespace).map_err(|e| io_err("open pool", &location, e))?;
        let chunk_ns = format!("{}/chunks", namespace.unwrap_or(""));
        let chunks = cluster.ioctx(pool, Some(&chunk_ns)).map_err(|e| io_err("open pool", &location, e))?;
        Ok(RadosBackend { location, meta, chunks, opts: opts.clone(), writer: std::sync::OnceLock::new() })
    }

    fn chunk_oid(id: &ChunkId) -> String {
        id.to_hex()
    }

    fn chunk_name(&self, id: &ChunkId) -> PathBuf {
        self.location.join("chunks").join(id.to_hex())
    }

    fn lock_oid(name: &str) -> String {
        format!("locks/{name}")
    }

    /// Who holds lock `name`, for messages: `host H pid P (client.N at
    /// ADDR), exclusive`; `None` when nobody does.
    ///
    /// # Errors
    /// `Io`.
    pub fn holder(&self, name: &str) -> Result<Option<String>> {
        let oid = Self::lock_oid(name);
        let (exclusive, lockers) =
            self.meta.lockers(&oid, LOCK_NAME).map_err(|e| io_err("list lockers", self.object_name(&oid), e))?;
        if lockers.is_empty() {
            return Ok(None);
        }
        let who: Vec<String> = lockers
            .iter()
            .map(|l| {
                let mut f = l.cookie.split(' ');
                let host = f.next().and_then(|h| h.strip_prefix("host=")).unwrap_or("?");
                let pid = f.next().and_then(|p| p.strip_prefix("pid=")).unwrap_or("?");
                format!("host {host} pid {pid} ({} at {})", l.client, l.addr)
            })
            .collect();
        Ok(Some(format!("{}, {}", who.join("; "), if exclusive { "exclusive" } else { "shared" })))
    }

    fn try_lock(&self, name: &str, mode: LockMode) -> Result<Option<StoreLock>> {
        let oid = Self::lock_oid(name);
        let cookie = holder_cookie();
        let exclusive = mode == LockMode::Exclusive;
        let got = self
            .meta
            .lock(&oid, LOCK_NAME, &cookie, exclusive, self.opts.lease, false)
            .map_err(|e| io_err("lock", self.object_name(&oid), e))?;
        if !got {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let guard = LeaseGuard::start(
            self.meta.clone(),
            oid,
            cookie,
            exclusive,
            self.opts.lease,
            lost.clone(),
            self.object_name(&Self::lock_oid(name)),
        );
        Ok(Some(StoreLock::with_lease(guard, lost)))
    }
}

/// Keeps a lease renewed until dropped, then releases the lock.
struct LeaseGuard {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    ioctx: IoCtx,
    oid: String,
    cookie: String,
    lost: Arc<AtomicBool>,
}

impl LeaseGuard {
    fn start(
        ioctx: IoCtx,
        oid: String,
        cookie: String,
        exclusive: bool,
        lease: Duration,
        lost: Arc<AtomicBool>,
        name: PathBuf,
    ) -> LeaseGuard {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (s, io, o, k, l) = (stop.clone(), ioctx.clone(), oid.clone(), cookie.clone(), lost.clone());
        let thread = std::thread::Builder::new()
            .name("lease renewal".into())
            .spawn(move || {
                let every = lease / 3;
                let (m, cv) = &*s;
                let mut stopped = m.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    // `_while`: a stop set before this thread first took
                    // the mutex is seen at once (a plain wait would miss
                    // that notification and sleep a whole period, holding
                    // up the drop of every short-lived lock by lease / 3)
                    let (g, _) = cv.wait_timeout_while(stopped, every, |s| !*s).unwrap_or_else(|p| p.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    match io.lock(&o, LOCK_NAME, &k, exclusive, lease, true) {
                        Ok(_) => {}
                        Err(e) if e.is_not_found() => {
                            // The lease ran out before this renewal (a pause
                            // longer than the lease, a cluster out of reach):
                            // others may hold the lock now. Never retaken
                            // silently; the holder sees it at its next check.
                            l.store(true, Ordering::SeqCst);
                            tracing::error!(lock = %name.display(), error = %e, "lost a store lock: its lease expired before it was renewed");
                            return;
                        }
                        // transient (a slow or briefly unreachable cluster):
                        // try again at the next tick while the lease lasts
                        Err(e) => tracing::warn!(lock = %name.display(), error = %e, "could not renew a store lock lease; retrying"),
                    }
                }
            })
            .ok();
        if thread.is_none() {
            // no renewal thread: the lease will run out, so say so now
            lost.store(true, Ordering::SeqCst);
        }
        LeaseGuard { stop, thread, ioctx, oid, cookie, lost }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.lost.load(Ordering::SeqCst) && !self.ioctx.has_timed_out() {
            if let Err(e) = self.ioctx.unlock(&self.oid, LOCK_NAME, &self.cookie) {
                tracing::warn!(error = %e, "could not release a store lock; it expires with its lease");
            }
        }
    }
}

impl Backend for RadosBackend {
    fn location(&self) -> &Path {
        &self.location
    }

    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        match self.chunks.stat_object(&Self::chunk_oid(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(io_err("stat", self.chunk_name(id), e)),
        }
    }

    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        // Staged: a writer thread does one atomic exclusive create with the
        // whole content (never overwrites, never visible in part); `sync`
        // waits for it. A chunk already there is found by the exclusive
        // create (EEXIST) and left alone; it then still counts as written.
        // (No stat first: the store's callers look chunks up before they
        // put them, and a second round trip here would serialise the
        // hash workers on the OSD's latency.)
        self.writer.get_or_init(|| Writer::start(&self.chunks, &self.location)).put(id, bytes)?;
        Ok(true)
    }

    fn sync(&self) -> Result<()> {
        // every acknowledged create is durable: waiting for them is enough
        match self.writer.get().and_then(Writer::wait) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn discard_pending(&self) {
        // writes in flight finish (unreferenced chunks, for GC); errors are dropped
        if let Some(w) = self.writer.get() {
            let _ = w.wait();
        }
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        // one read of up to the longest chunk + 1 (the decoder refuses what
        // is longer): one round trip, bounded allocation
        let cap = crate::format::MAX_CHUNK_OBJECT_LEN as usize + 1;
        out.clear();
        out.resize(cap, 0);
        match self.chunks.read_object_once(&Self::chunk_oid(id), 0, out) {
            Ok(n) => {
                out.truncate(n);
                Ok(())
            }
            Err(e) if e.is_not_found() => {
                out.clear();
                Err(Error::ChunkMissing { id: *id })
            }
            Err(e) => {
                out.clear();
                Err(io_err("read", self.chunk_name(id), e))
            }
        }
    }

    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
        let names = self.chunks.list_objects().map_err(|e| io_err("list chunks", self.location.join("chunks"), e))?;
        let ids: Vec<ChunkId> = names.iter().filter_map(|n| n.parse::<ChunkId>().ok()).collect();
        // RADOS lists names only: stat each, from a few threads
        let per = ids.len().div_ceil(LIST_STAT_THREADS).max(1);
        let results: Vec<Result<Vec<ChunkEntry>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        let mut out = Vec::with_capacity(part.len());
                        for id in part {
                            match self.chunks.stat_object(&Self::chunk_oid(id)) {
                                Ok(st) => out.push((*id, st.size, mtime(st.mtime))),
                                Err(e) if e.is_not_found() => {} // removed meanwhile
                                Err(e) => return Err(io_err("stat", self.chunk_name(id), e)),
                            }
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new()))).collect()
        });
        let mut out = Vec::with_capacity(ids.len());
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        match self.chunks.remove_object(&Self::chunk_oid(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(io_err("remove", self.chunk_name(id), e)),
        }
    }

    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        match self.chunks.touch_object(&Self::chunk_oid(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Err(Error::ChunkMissing { id: *id }),
            Err(e) => Err(io_err("touch", self.chunk_name(id), e)),
        }
    }

    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        match self.chunks.stat_object(&Self::chunk_oid(id)) {
            Ok(st) => Ok(Some(mtime(st.mtime))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(io_err("stat", self.chunk_name(id), e)),
        }
    }

    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        // no rename in RADOS: copy to <id>.bad, then remove the chunk
        let oid = Self::chunk_oid(id);
        let mut bytes = Vec::new();
        match self.get_chunk(id, &mut bytes) {
            Ok(()) => {}
            Err(Error::ChunkMissing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
        let bad = format!("{oid}.bad");
        let bad_name = self.location.join("chunks").join(&bad);
        self.chunks.write_full(&bad, &bytes).map_err(|e| io_err("write", &bad_name, e))?;
        self.delete_chunk(id)?;
        Ok(Some(bad_name))
    }

    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let cap = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX).min(blockvault_ceph::MAX_OBJECT_IO);
        // small objects in one read; a block map may be larger than a guess,
        // so read what is there up to the bound
        let mut buf = vec![0u8; cap.min(1 << 20)];
        let mut done = 0;
        loop {
            match self.meta.read_object_once(key, done as u64, &mut buf[done..]) {
                Ok(n) => {
                    done += n;
                    if n == 0 || done < buf.len() || buf.len() >= cap {
                        break;
                    }
                    let grow = (buf.len() * 2).min(cap);
                    buf.resize(grow, 0);
                }
                Err(e) if e.is_not_found() && done == 0 => return Ok(None),
                Err(e) => return Err(io_err("read", self.object_name(key), e)),
            }
        }
        buf.truncate(done);
        Ok(Some(buf))
    }

    fn object_exists(&self, key: &str) -> Result<bool> {
        match self.meta.stat_object(key) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(io_err("stat", self.object_name(key), e)),
        }
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.meta.write_full(key, bytes).map_err(|e| io_err("write", self.object_name(key), e))
    }

    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        self.meta.create_exclusive(key, bytes).map_err(|e| io_err("create", self.object_name(key), e))
    }

    fn delete_object(&self, key: &str) -> Result<bool> {
        match self.meta.remove_object(key) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(io_err("remove", self.object_name(key), e)),
        }
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let names = self.meta.list_objects().map_err(|e| io_err("list", self.object_name(prefix), e))?;
        Ok(names.into_iter().filter_map(|n| n.strip_prefix(prefix).map(str::to_string)).filter(|n| !n.contains('/')).collect())
    }

    fn remove_temp_files(&self) -> Result<usize> {
        Ok(0) // writes are single atomic operations: nothing is left half-done
    }

    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        debug_assert!(!name.contains('/'));
        let mut said = false;
        loop {
            if let Some(l) = self.try_lock(name, mode)? {
                return Ok(Some(l));
            }
            if !wait {
                return Ok(None);
            }
            if !said {
                let who = self.holder(name)?.unwrap_or_else(|| "a holder that just left".into());
                tracing::warn!(
                    lock = %self.object_name(&Self::lock_oid(name)).display(),
                    holder = %who,
                    lease_secs = self.opts.lease.as_secs(),
                    "waiting for a store lock (a holder that died loses it when its lease runs out)"
                );
                said = true;
            }
            std::thread::sleep((self.opts.lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)));
        }
    }

    fn lock_holder(&self, name: &str) -> Result<Option<String>> {
        self.holder(name)
    }
}

fn mtime(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}
