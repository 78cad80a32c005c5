//! `blockvault serve`: committed backups as read-only NBD exports.
//!
//! [`nbd`] is the protocol (handshake, options, requests, replies), over any
//! byte stream and any [`nbd::Export`]; this module puts a backup behind that
//! trait ([`BackupExport`], through [`BackupReader`], so every chunk is
//! verified as it is read and a corrupt one is an `EIO` for its range) and
//! runs the listeners: a thread per listener, a thread per client (and
//! [`READ_WORKERS`] more serving its reads), at most [`MAX_CLIENTS`]
//! clients at once. A client that breaks the protocol, stalls
//! in the handshake or hangs up mid-request loses its own connection and
//! nothing else: clients share only the read-only exports (and their
//! decoded-block caches, which hold verified blocks only).
//!
//! The caller holds the store lock shared for as long as it serves, so a
//! `gc` cannot remove the chunks under a client: a gc started meanwhile
//! plans, then waits for the server to exit before it sweeps.

pub mod nbd;

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{debug, info, warn};

use crate::restore::reader::BackupReader;
use nbd::{Export, Exports, Shared};

/// Clients served at once; one more is accepted and closed at once, so a
/// flood of connections costs a bounded number of threads and buffers (each
/// client may hold a 32 MiB read buffer).
pub const MAX_CLIENTS: usize = 64;
/// A client must finish the whole handshake within this time (a client that
/// connects and says nothing, or trickles a byte at a time, does not hold a
/// thread forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that stops reading its replies for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Decoded blocks each export keeps: several clients (or an `nbdcopy` with
/// four connections) reading in different places each keep their current
/// block decoded. 16 blocks of 4 MiB are 64 MiB at most per export.
pub const CACHE_BLOCKS: usize = 16;
/// Threads serving the reads of one client at once: a client with several
/// requests in flight (nbdcopy sends 64, qemu several) gets one block
/// decoded while the reply of another is being sent. Each holds at most one
/// request's bytes (up to [`nbd::MAX_PAYLOAD`], mostly shared with the
/// export's cache).
pub const READ_WORKERS: usize = 2;
/// Buffer of replies before they go to the socket: headers and small chunks
/// are coalesced, large data chunks go straight through.
const WRITE_BUFFER: usize = 256 << 10;

/// One backup, exported.
pub struct BackupExport<'s> {
    reader: BackupReader<'s>,
    description: String,
}

impl<'s> BackupExport<'s> {
    pub fn new(reader: BackupReader<'s>, description: String) -> Self {
        BackupExport { reader, description }
    }
}

impl Export for BackupExport<'_> {
    fn size(&self) -> u64 {
        self.reader.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.reader.block_size()
    }
    fn description(&self) -> String {
        self.description.clone()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.reader.read_at(offset, buf).map_err(|e| format!("{e:#}"))
    }
    fn read_shared(&self, offset: u64, len: usize) -> Result<Shared, String> {
        // a data block straight from the reader's cache, without a copy
        match self.reader.block_at(offset).map_err(|e| format!("{e:#}"))? {
            Some((block, at)) => Shared::part(block, at, len)
                .ok_or_else(|| format!("read of {len} bytes at {offset} runs past the end of its block")),
            None => Ok(Shared::whole(std::sync::Arc::new(vec![0u8; len]))),
        }
    }
    fn run_at(&self, offset: u64) -> (bool, u64) {
        let map = self.reader.block_map();
        let b = (offset / u64::from(self.reader.block_size())) as usize;
        let (off, len) = map.block_range(b);
        (map.get(b).is_none(), off + len as u64)
    }
}

/// Where clients connect.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Serves `exports` on every listener until the process ends (or every
/// listener fails).
///
/// # Errors
/// When a listener cannot accept any more (its error, after the others
/// stopped too).
pub fn serve(exports: &Exports<'_>, listeners: Vec<Listener>) -> Result<()> {
    let active = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let mut loops = Vec::new();
        for l in listeners {
            let active = &active;
            loops.push(scope.spawn(move || -> Result<()> {
                loop {
                    match &l {
                        Listener::Tcp(t) => {
                            let (s, peer) = match t.accept() {
                                Ok(x) => x,
                                Err(e) if transient(&e) => continue,
                                Err(e) => return Err(e).context("accepting a TCP client"),
                            };
                            let _ = s.set_nodelay(true);
                            let peer = peer.to_string();
                            spawn_client(scope, active, exports, s, peer, |s, t| s.set_read_timeout(t), |s, t| s.set_write_timeout(t));
                        }
                        Listener::Unix(u) => {
                            let (s, _) = match u.accept() {
                                Ok(x) => x,
                                Err(e) if transient(&e) => continue,
                                Err(e) => return Err(e).context("accepting a Unix socket client"),
                            };
                            let peer = "unix socket".to_string();
                            spawn_client(scope, active, exports, s, peer, |s, t| s.set_read_timeout(t), |s, t| s.set_write_timeout(t));
                        }
                    }
                }
            }));
        }
        let mut first = None;
        for h in loops {
            let r = h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a listener thread panicked")));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    })
}

/// Accept errors that concern one client (it hung up before we took it) or a
/// passing shortage, not the listener.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock) {
        return true;
    }
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: back off briefly and go on
    if matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) {
        warn!(error = %e, "cannot accept a client now; retrying");
        std::thread::sleep(Duration::from_millis(100));
        return true;
    }
    false
}

/// Decrements the client count when a client's thread ends, however it ends.
struct Slot<'a>(&'a AtomicUsize);
impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type SetTimeout<S> = fn(&S, Option<Duration>) -> std::io::Result<()>;

fn spawn_client<'scope, 'env, S>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    active: &'env AtomicUsize,
    exports: &'env Exports<'env>,
    s: S,
    peer: String,
    set_read: SetTimeout<S>,
    set_write: SetTimeout<S>,
) where
    S: Send + Sync + 'scope,
    for<'x> &'x S: Read + Write,
{
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
        active.fetch_sub(1, Ordering::SeqCst);
        warn!(peer, max = MAX_CLIENTS, "too many clients: connection refused");
        return; // dropping the socket closes it
    }
    let slot = Slot(active);
    let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn_scoped(scope, move || {
        let _slot = slot;
        client(s, &peer, exports, set_read, set_write);
    });
    if let Err(e) = spawned {
        // the closure (and the slot with it) was dropped
        warn!(error = %e, "cannot start a thread for a client: connection closed");
    }
}

/// Reads from a socket; while `deadline` is set, each read may wait only
/// until then, so the handshake as a whole is bounded, not each read.
struct Deadline<'a, S> {
    s: &'a S,
    set_read: SetTimeout<S>,
    deadline: Option<Instant>,
}

impl<S> Read for Deadline<'_, S>
where
    for<'x> &'x S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake not finished in time"));
            }
            (self.set_read)(self.s, Some(left))?;
        }
        let mut s = self.s;
        s.read(buf)
    }
}

/// One client, start to end. Errors end this connection only.
fn client<S: Sync>(s: S, peer: &str, exports: &Exports<'_>, set_read: SetTimeout<S>, set_write: SetTimeout<S>)
where
    for<'x> &'x S: Read + Write,
{
    if let Err(e) = set_write(&s, Some(WRITE_TIMEOUT)) {
        warn!(peer, error = %e, "cannot set socket timeouts: connection closed");
        return;
    }
    let mut r = BufReader::new(Deadline { s: &s, set_read, deadline: Some(Instant::now() + HANDSHAKE_TIMEOUT) });
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, &s);
    let session = match nbd::negotiate(&mut r, &mut w, exports) {
        Ok(Some(x)) => x,
        Ok(None) => {
            debug!(peer, "client left during the handshake");
            return;
        }
        Err(e) => {
            info!(peer, error = %e, "client dropped during the handshake");
            return;
        }
    };
    // transmission: an idle client is legitimate, a deaf one is not
    r.get_mut().deadline = None;
    if let Err(e) = set_read(&s, None) {
        warn!(peer, error = %e, "cannot clear the handshake timeout: connection closed");
        return;
    }
    info!(peer, export = %session.name, structured = session.structured, "client connected");
    let name = session.name.clone();
    let on_error = |offset: u64, cause: &str| {
        warn!(peer, export = %name, offset, error = cause, "read failed: the client got EIO for this range");
    };
    match nbd::transmit(&mut r, &mut w, &session, READ_WORKERS, &on_error) {
        Ok(()) => info!(peer, export = %session.name, "client disconnected"),
        Err(e) => info!(peer, export = %session.name, error = %e, "client dropped"),
    }
    let _ = w.flush();
}
