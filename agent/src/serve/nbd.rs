//! The NBD protocol, server side, read-only: the fixed newstyle handshake,
//! option haggling, and the transmission phase with simple and structured
//! replies and the `base:allocation` metadata context.
//!
//! Written from the protocol document (NetworkBlockDevice/nbd,
//! `doc/proto.md`). All integers on the wire are big-endian (network order),
//! which is why this file reads and writes them with `from_be_bytes` and
//! `to_be_bytes` and allows clippy's `big_endian_bytes` lint: the store's
//! formats are little-endian, the NBD wire is not.
//!
//! Everything a client sends is bounded before it is allocated or trusted:
//! an option's data ([`MAX_OPTION_LEN`]), the number of options before the
//! transmission phase ([`MAX_OPTIONS`]), a request's payload
//! ([`MAX_PAYLOAD`]). A client that breaks the protocol (a wrong magic, an
//! option too long, a write payload too large to skip) gets a hard
//! disconnect: [`negotiate`] or [`transmit`] returns an error and the caller
//! closes the socket. Nothing here is shared between connections except the
//! exports, which are read-only.
#![allow(clippy::big_endian_bytes)]

use std::io::{self, BufReader, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

/// "NBDMAGIC", the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// handshake flags (server) and client flags
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// options
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// option reply types
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// NBD_INFO types
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// transmission flags
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// What every export advertises: read-only; flush and cache accepted (both
/// no-ops); several connections at once see the same data (it never changes).
pub const TRANSMISSION_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;

// commands
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// structured reply chunk types and flags
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// errors (the protocol's values, which are Linux's)
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;

// base:allocation
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id of `base:allocation` on every connection (the only context).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest read or write payload accepted (the protocol's portable maximum,
/// 32 MiB); what is advertised as the maximum block size. A larger read is
/// refused with an error, a larger write disconnects (its payload would have
/// to be read and thrown away).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data accepted during the handshake: an export name is at
/// most 4096 bytes, and a client needs a handful of meta context queries.
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Options a client may send before it picks an export; a real client sends
/// fewer than ten.
pub const MAX_OPTIONS: usize = 128;
/// Block status descriptors in one reply at most (8 bytes each): a reply may
/// cover less than was asked, the client asks again from where it ends.
pub const MAX_DESCRIPTORS: usize = 1 << 17;
/// Largest data chunk of a structured read reply.
const MAX_DATA_CHUNK: u64 = 4 << 20;
/// Longest error message sent to a client.
const MAX_MESSAGE: usize = 1024;
/// Size of a request header.
const REQUEST_LEN: usize = 28;

/// What the server exports: one backup, or a test double.
pub trait Export: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The preferred request size (the backup's block size).
    fn preferred_block_size(&self) -> u32;
    /// Human-readable description, sent on `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String;
    /// Fills `buf` from `offset` (inside the export). Every byte is verified:
    /// an error (a corrupt or missing chunk) means no byte may be trusted.
    ///
    /// # Errors
    /// The cause, for the log and the client's error message.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The `len` bytes at `offset`, never past the end of the block holding
    /// `offset`, verified as [`Export::read_at`]; an export that keeps
    /// decoded blocks shares them instead of copying (the default copies).
    ///
    /// # Errors
    /// As [`Export::read_at`].
    fn read_shared(&self, offset: u64, len: usize) -> Result<Shared, String> {
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(Shared::whole(Arc::new(v)))
    }
    /// Whether `offset` (inside the export) is in a run that reads as zeros
    /// with nothing stored, and where that run ends (at most the end of the
    /// block holding `offset`; never past the export's end).
    fn run_at(&self, offset: u64) -> (bool, u64);
}

/// Bytes of an export, shared rather than copied: `data[start..start+len]`.
pub struct Shared {
    data: Arc<Vec<u8>>,
    start: usize,
    len: usize,
}

impl Shared {
    /// All of `data`.
    pub fn whole(data: Arc<Vec<u8>>) -> Shared {
        let len = data.len();
        Shared { data, start: 0, len }
    }
    /// `data[start..start + len]`, or `None` when that is not inside `data`.
    pub fn part(data: Arc<Vec<u8>>, start: usize, len: usize) -> Option<Shared> {
        (start.checked_add(len)? <= data.len()).then_some(Shared { data, start, len })
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
}

/// The exports of one server: the first is also the default (empty name).
pub struct Exports<'a> {
    list: Vec<(String, &'a dyn Export)>,
}

impl<'a> Exports<'a> {
    /// `list` in order; names must be distinct and non-empty.
    pub fn new(list: Vec<(String, &'a dyn Export)>) -> Self {
        Exports { list }
    }

    /// The export called `name` (the first one for ""), with its index.
    pub fn find(&self, name: &str) -> Option<(usize, &'a dyn Export)> {
        if name.is_empty() {
            return self.list.first().map(|(_, e)| (0, *e));
        }
        self.list.iter().position(|(n, _)| n == name).map(|i| (i, self.list[i].1))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|(n, _)| n.as_str())
    }

    fn name(&self, i: usize) -> &str {
        &self.list[i].0
    }
}

/// What the handshake agreed on.
pub struct Session<'a> {
    pub export: &'a dyn Export,
    /// The export's name (as listed, not as the client spelt "").
    pub name: String,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub base_allocation: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A cursor over option data that fails, rather than panics, when the data
/// is shorter than its own length fields say.
struct Cursor<'d>(&'d [u8]);

impl<'d> Cursor<'d> {
    fn take(&mut self, n: usize) -> Option<&'d [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: export name and information requests.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()? as usize;
    let reqs = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
    c.0.is_empty().then_some((name, reqs))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
pub fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()? as usize;
    // each query takes at least its 4-byte length: a count beyond that is a lie
    if n > c.0.len() / 4 {
        return None;
    }
    let queries = (0..n).map(|_| c.string()).collect::<Option<Vec<_>>>()?;
    c.0.is_empty().then_some((name, queries))
}

fn write_opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&kind.to_be_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&h)?;
    w.write_all(data)
}

fn info_export(e: &dyn Export) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.size().to_be_bytes());
    d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    d
}

fn info_block_size(e: &dyn Export) -> Vec<u8> {
    // minimum 1 (any offset and length), preferred the backup's block size
    // (a power of two, at least 512), maximum the payload limit
    let preferred = e.preferred_block_size().clamp(512, MAX_PAYLOAD).next_power_of_two();
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, preferred, MAX_PAYLOAD] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = kind.to_be_bytes().to_vec();
    d.extend_from_slice(&s.as_bytes()[..s.len().min(4096)]);
    d
}

/// The handshake and option haggling, up to the transmission phase.
/// `Ok(None)` when the client ended it (`NBD_OPT_ABORT`, or a disconnect
/// between options).
///
/// # Errors
/// I/O errors, and protocol violations (the connection must then be closed).
pub fn negotiate<'a, R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut W,
    exports: &Exports<'a>,
) -> io::Result<Option<Session<'a>>> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    w.flush()?;
    let cflags = read_u32(r)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(bad(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // the export index `base:allocation` was last selected for
    let mut meta: Option<usize> = None;
    for _ in 0..MAX_OPTIONS {
        let magic = match read_u64(r) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(bad(format!("option magic {magic:#x} is not IHAVEOPT")));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION_LEN {
            return Err(bad(format!("option {opt} has {len} bytes of data (at most {MAX_OPTION_LEN})")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| bad("export name is not UTF-8"))?;
                // this option cannot fail politely: an unknown name disconnects
                let (i, e) = exports.find(&name).ok_or_else(|| bad(format!("no export named {name:?}")))?;
                let mut d = e.size().to_be_bytes().to_vec();
                d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    d.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&d)?;
                w.flush()?;
                let base_allocation = meta == Some(i);
                return Ok(Some(Session { export: e, name: exports.name(i).to_string(), structured, base_allocation }));
            }
            OPT_ABORT => {
                // the client may already be gone; the reply is a courtesy
                let _ = write_opt_reply(w, opt, REP_ACK, &[]).and_then(|()| w.flush());
                return Ok(None);
            }
            OPT_LIST if len != 0 => write_opt_reply(w, opt, REP_ERR_INVALID, &[])?,
            OPT_LIST => {
                for n in exports.names() {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    write_opt_reply(w, opt, REP_SERVER, &d)?;
                }
                write_opt_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => write_opt_reply(w, opt, REP_ERR_INVALID, &[])?,
                Some((name, reqs)) => match exports.find(&name) {
                    None => write_opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export")?,
                    Some((i, e)) => {
                        write_opt_reply(w, opt, REP_INFO, &info_export(e))?;
                        // sent whether asked or not: our limits are the defaults
                        write_opt_reply(w, opt, REP_INFO, &info_block_size(e))?;
                        if reqs.contains(&INFO_NAME) {
                            write_opt_reply(w, opt, REP_INFO, &info_string(INFO_NAME, exports.name(i)))?;
                        }
                        if reqs.contains(&INFO_DESCRIPTION) {
                            write_opt_reply(w, opt, REP_INFO, &info_string(INFO_DESCRIPTION, &e.description()))?;
                        }
                        write_opt_reply(w, opt, REP_ACK, &[])?;
                        if opt == OPT_GO {
                            w.flush()?;
                            let base_allocation = meta == Some(i);
                            return Ok(Some(Session {
                                export: e,
                                name: exports.name(i).to_string(),
                                structured,
                                base_allocation,
                            }));
                        }
                    }
                },
            },
            OPT_STRUCTURED_REPLY if len != 0 => write_opt_reply(w, opt, REP_ERR_INVALID, &[])?,
            OPT_STRUCTURED_REPLY => {
                structured = true;
                write_opt_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // replaces the selection, even when it fails
                    meta = None;
                }
                match (structured, parse_meta_request(&data)) {
                    (false, _) | (_, None) => write_opt_reply(w, opt, REP_ERR_INVALID, &[])?,
                    (true, Some((name, queries))) => match exports.find(&name) {
                        None => write_opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export")?,
                        Some((i, _)) => {
                            let matches = if set {
                                queries.iter().any(|q| q == BASE_ALLOCATION)
                            } else {
                                queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                            };
                            if matches {
                                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                                let mut d = id.to_be_bytes().to_vec();
                                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                write_opt_reply(w, opt, REP_META_CONTEXT, &d)?;
                                if set {
                                    meta = Some(i);
                                }
                            }
                            write_opt_reply(w, opt, REP_ACK, &[])?;
                        }
                    },
                }
            }
            // no TLS: plain NBD on loopback or a Unix socket
            OPT_STARTTLS => write_opt_reply(w, opt, REP_ERR_UNSUP, &[])?,
            // EXTENDED_HEADERS, and anything newer or unknown
            _ => write_opt_reply(w, opt, REP_ERR_UNSUP, &[])?,
        }
        w.flush()?;
    }
    Err(bad(format!("more than {MAX_OPTIONS} options without choosing an export")))
}

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Reads one request header; `Ok(None)` on a clean disconnect between
/// requests.
///
/// # Errors
/// I/O errors, a disconnect inside a header, a wrong magic.
pub fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let mut h = [0u8; REQUEST_LEN];
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "disconnected inside a request header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(bad(format!("request magic {magic:#x} is wrong")));
    }
    Ok(Some(Request {
        flags: u16::from_be_bytes(h[4..6].try_into().expect("2 bytes")),
        kind: u16::from_be_bytes(h[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(h[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(h[24..28].try_into().expect("4 bytes")),
    }))
}

fn simple_reply(w: &mut impl Write, cookie: u64, error: u32) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h)
}

fn chunk_header(w: &mut impl Write, flags: u16, kind: u16, cookie: u64, len: u32) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&h)
}

fn truncated(msg: &str) -> &[u8] {
    let mut n = msg.len().min(MAX_MESSAGE);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    &msg.as_bytes()[..n]
}

/// Replies to a failed request: an error chunk, or a simple reply.
fn error_reply(w: &mut impl Write, s: &Session, cookie: u64, error: u32, msg: &str) -> io::Result<()> {
    if !s.structured {
        return simple_reply(w, cookie, error);
    }
    let m = truncated(msg);
    chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + m.len() as u32)?;
    w.write_all(&error.to_be_bytes())?;
    w.write_all(&(m.len() as u16).to_be_bytes())?;
    w.write_all(m)
}

/// Checks that `[offset, offset+len)` lies inside the export.
fn in_bounds(s: &Session, offset: u64, len: u32) -> bool {
    offset.checked_add(u64::from(len)).is_some_and(|end| end <= s.export.size())
}

/// Block status descriptors (length, flags) for `[offset, offset+len)`,
/// runs of the same state merged, at most `max` of them.
pub fn block_status(e: &dyn Export, offset: u64, len: u32, max: usize) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    let mut last: Option<bool> = None;
    while pos < end {
        let (zero, run_end) = e.run_at(pos);
        // never trust the export to move forward
        let run_end = run_end.clamp(pos + 1, end);
        let n = (run_end - pos) as u32; // <= len, so it fits
        match out.last_mut() {
            Some(d) if last == Some(zero) => d.0 += n,
            _ => {
                if out.len() == max {
                    break;
                }
                out.push((n, if zero { STATE_HOLE | STATE_ZERO } else { 0 }));
                last = Some(zero);
            }
        }
        pos = run_end;
    }
    out
}

/// Outcome of one read for the log: `Some(offset, cause)` when a part of it
/// could not be read.
pub type ReadFailure = Option<(u64, String)>;

/// One piece of a structured read reply.
enum Piece {
    Hole { offset: u64, len: u32 },
    Data { offset: u64, bytes: Shared },
    /// A block that cannot be read: nothing of the request after it is sent.
    Error { offset: u64, cause: String },
}

/// A read's reply, with every byte read (and verified) before any is sent,
/// so that only the sending needs the connection's writer.
enum ReadReply {
    Structured(Vec<Piece>),
    Simple(Result<Vec<u8>, String>),
}

/// Reads what one `NBD_CMD_READ` (bounds and size already checked) replies
/// with. Structured: holes for zero runs, a data chunk per data block (at
/// most [`MAX_DATA_CHUNK`]), and for a block that cannot be read an error
/// with its offset, and nothing after it. Simple: all of it, or the error.
fn read_reply(s: &Session, q: &Request) -> ReadReply {
    if !s.structured {
        let mut buf = vec![0u8; q.len as usize];
        return ReadReply::Simple(s.export.read_at(q.offset, &mut buf).map(|()| buf));
    }
    let end = q.offset + u64::from(q.len);
    let mut pos = q.offset;
    let mut pieces = Vec::new();
    while pos < end {
        let (zero, run_end) = s.export.run_at(pos);
        let mut seg_end = run_end.clamp(pos + 1, end);
        if zero {
            while seg_end < end {
                let (z, e) = s.export.run_at(seg_end);
                if !z {
                    break;
                }
                seg_end = e.clamp(seg_end + 1, end);
            }
            pieces.push(Piece::Hole { offset: pos, len: (seg_end - pos) as u32 });
        } else {
            seg_end = seg_end.min(pos + MAX_DATA_CHUNK);
            match s.export.read_shared(pos, (seg_end - pos) as usize) {
                Ok(bytes) if bytes.len == (seg_end - pos) as usize => pieces.push(Piece::Data { offset: pos, bytes }),
                Ok(bytes) => {
                    let cause = format!("the export returned {} bytes for a read of {} at {pos}", bytes.len, seg_end - pos);
                    pieces.push(Piece::Error { offset: pos, cause });
                    break;
                }
                Err(cause) => {
                    pieces.push(Piece::Error { offset: pos, cause });
                    break;
                }
            }
        }
        pos = seg_end;
    }
    ReadReply::Structured(pieces)
}

/// Sends a read's reply; returns the failed part, if any, for the log.
fn send_read(w: &mut impl Write, q: &Request, reply: ReadReply) -> io::Result<ReadFailure> {
    match reply {
        ReadReply::Simple(Ok(buf)) => {
            simple_reply(w, q.cookie, 0)?;
            w.write_all(&buf)?;
            Ok(None)
        }
        ReadReply::Simple(Err(cause)) => {
            simple_reply(w, q.cookie, EIO)?;
            Ok(Some((q.offset, cause)))
        }
        ReadReply::Structured(pieces) => {
            for p in pieces {
                match p {
                    Piece::Hole { offset, len } => {
                        chunk_header(w, 0, REPLY_TYPE_OFFSET_HOLE, q.cookie, 12)?;
                        w.write_all(&offset.to_be_bytes())?;
                        w.write_all(&len.to_be_bytes())?;
                    }
                    Piece::Data { offset, bytes } => {
                        chunk_header(w, 0, REPLY_TYPE_OFFSET_DATA, q.cookie, 8 + bytes.len as u32)?;
                        w.write_all(&offset.to_be_bytes())?;
                        w.write_all(bytes.as_slice())?;
                    }
                    Piece::Error { offset, cause } => {
                        let m = truncated(&cause);
                        chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, q.cookie, 14 + m.len() as u32)?;
                        w.write_all(&EIO.to_be_bytes())?;
                        w.write_all(&(m.len() as u16).to_be_bytes())?;
                        w.write_all(m)?;
                        w.write_all(&offset.to_be_bytes())?;
                        return Ok(Some((offset, cause)));
                    }
                }
            }
            chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, q.cookie, 0)?;
            Ok(None)
        }
    }
}

/// Reads and throws away `len` bytes of a refused write's payload.
fn skip(r: &mut impl Read, len: u32) -> io::Result<()> {
    let n = io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
    if n < u64::from(len) {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "disconnected inside a write payload"));
    }
    Ok(())
}

/// Read requests queued per read worker of a connection, beyond the one
/// each is serving: the reader thread goes on reading requests (and
/// answering the cheap ones) while the workers read blocks.
const READS_QUEUED_PER_WORKER: usize = 2;

/// The transmission phase, until `NBD_CMD_DISC` or a disconnect. With
/// `workers` > 0, reads are served by that many threads at once (a client
/// with several requests in flight gets them decoded in parallel, and one
/// block decoded while another is being sent), each reply sent whole under
/// the writer's lock once all its bytes are read, so replies of different
/// requests never interleave; all other commands are answered by this
/// thread. With 0, everything is served in order on this thread. A
/// disconnect request waits for the reads in flight to be answered.
/// `on_read_error` is told about every read that failed (offset, cause), so
/// the server can log it.
///
/// # Errors
/// I/O errors and protocol violations (the connection must then be closed).
pub fn transmit<R: Read, W: Write + Send>(
    r: &mut BufReader<R>,
    w: &mut W,
    s: &Session,
    workers: usize,
    on_read_error: &(dyn Fn(u64, &str) + Sync),
) -> io::Result<()> {
    let w: Out<'_> = Mutex::new(w);
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    let serve_one = |q: &Request| -> io::Result<()> {
        let reply = read_reply(s, q);
        let mut g = lock(&w);
        let failure = send_read(&mut *g, q, reply)?;
        // the reader thread flushes only what it wrote itself
        g.flush()?;
        drop(g);
        if let Some((off, cause)) = failure {
            on_read_error(off, &cause);
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Request>(workers * READS_QUEUED_PER_WORKER);
        for _ in 0..workers {
            let (rx, failed, serve_one) = (rx.clone(), &failed, &serve_one);
            scope.spawn(move || {
                for q in rx {
                    if failed.lock().unwrap_or_else(PoisonError::into_inner).is_some() {
                        continue; // the connection is broken: drain, do not work
                    }
                    if let Err(e) = serve_one(&q) {
                        failed.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
                    }
                }
            });
        }
        drop(rx);
        let res = requests(r, &w, s, &mut |q| match workers {
            0 => serve_one(&q),
            // a send fails only when every worker has ended, which they do
            // only after this sender is dropped
            _ => tx.send(q).map_err(|_| io::Error::other("the read workers of this connection ended")),
        });
        drop(tx);
        // the scope joins the workers: every read in flight is answered
        res
    })?;
    let res = match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    };
    let g = w.into_inner().unwrap_or_else(PoisonError::into_inner);
    res.and_then(|()| g.flush())
}

/// A connection's writer, shared by the thread reading requests and the
/// read workers.
type Out<'a> = Mutex<&'a mut (dyn Write + Send)>;

/// A poisoned writer lock means a worker panicked mid-reply: the stream is
/// garbage from there on, and the next write or the close ends it.
fn lock<'o, 'a>(w: &'o Out<'a>) -> std::sync::MutexGuard<'o, &'a mut (dyn Write + Send)> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads requests until `NBD_CMD_DISC` or a disconnect, answers all but the
/// reads itself (through `out`, the connection's writer), and hands every
/// valid, non-empty read to `read`.
fn requests<R: Read>(
    r: &mut BufReader<R>,
    out: &Out<'_>,
    s: &Session,
    read: &mut dyn FnMut(Request) -> io::Result<()>,
) -> io::Result<()> {
    // whether this thread wrote replies not yet flushed
    let mut dirty = false;
    loop {
        // reply as soon as no further whole request is waiting; while the
        // client has pipelined more, keep filling the buffer
        if dirty && r.buffer().len() < REQUEST_LEN {
            lock(out).flush()?;
            dirty = false;
        }
        let Some(q) = read_request(r)? else { return Ok(()) };
        if q.kind == CMD_READ && q.len > 0 && q.len <= MAX_PAYLOAD && in_bounds(s, q.offset, q.len) {
            read(q)?;
            continue;
        }
        if q.kind == CMD_WRITE {
            if q.len > MAX_PAYLOAD {
                return Err(bad(format!("write of {} bytes (at most {MAX_PAYLOAD})", q.len)));
            }
            skip(r, q.len)?;
        }
        if q.kind == CMD_DISC {
            return Ok(());
        }
        let mut g = lock(out);
        let w = &mut *g;
        dirty = true;
        match q.kind {
            CMD_READ if q.len > MAX_PAYLOAD => {
                error_reply(w, s, q.cookie, if s.structured { EOVERFLOW } else { EINVAL }, "read larger than 32 MiB")?
            }
            CMD_READ if !in_bounds(s, q.offset, q.len) => error_reply(w, s, q.cookie, EINVAL, "read past the end")?,
            CMD_READ => match s.structured {
                true => chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, q.cookie, 0)?,
                false => simple_reply(w, q.cookie, 0)?,
            },
            CMD_WRITE => error_reply(w, s, q.cookie, EPERM, "read-only export")?,
            CMD_TRIM | CMD_WRITE_ZEROES => error_reply(w, s, q.cookie, EPERM, "read-only export")?,
            CMD_FLUSH => simple_reply(w, q.cookie, 0)?,
            CMD_CACHE if !in_bounds(s, q.offset, q.len) => error_reply(w, s, q.cookie, EINVAL, "cache past the end")?,
            CMD_CACHE => simple_reply(w, q.cookie, 0)?,
            CMD_BLOCK_STATUS if !s.base_allocation => {
                error_reply(w, s, q.cookie, EINVAL, "no metadata context negotiated")?
            }
            CMD_BLOCK_STATUS if q.len == 0 || !in_bounds(s, q.offset, q.len) => {
                error_reply(w, s, q.cookie, EINVAL, "block status of an empty range or past the end")?
            }
            CMD_BLOCK_STATUS => {
                let max = if q.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_DESCRIPTORS };
                let d = block_status(s.export, q.offset, q.len, max);
                chunk_header(w, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, q.cookie, 4 + 8 * d.len() as u32)?;
                let mut out = Vec::with_capacity(4 + 8 * d.len());
                out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                for (len, flags) in d {
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&flags.to_be_bytes());
                }
                w.write_all(&out)?;
            }
            _ => error_reply(w, s, q.cookie, EINVAL, "unknown command")?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const BS: u64 = 4096;

    /// An export of 8 blocks and a short last one: blocks 2, 3 and 6 are
    /// zero runs, block 5 fails every read (a corrupt chunk).
    struct Mem {
        data: Vec<u8>,
    }

    fn mem() -> Mem {
        let mut data: Vec<u8> = (0..8 * BS as usize + 100).map(|i| (i * 7 % 251) as u8 | 1).collect();
        for b in [2usize, 3, 6] {
            data[b * BS as usize..(b + 1) * BS as usize].fill(0);
        }
        Mem { data }
    }

    impl Export for Mem {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn preferred_block_size(&self) -> u32 {
            BS as u32
        }
        fn description(&self) -> String {
            "test".into()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            let end = offset + buf.len() as u64;
            if offset < 6 * BS && end > 5 * BS {
                return Err("chunk of block 5 is corrupt".into());
            }
            buf.copy_from_slice(&self.data[offset as usize..end as usize]);
            Ok(())
        }
        fn run_at(&self, offset: u64) -> (bool, u64) {
            let b = offset / BS;
            (matches!(b, 2 | 3 | 6), ((b + 1) * BS).min(self.size()))
        }
    }

    /// A raw client on one end of a socket pair; the server runs on a thread.
    struct Client {
        s: UnixStream,
    }

    impl Client {
        fn u16(&mut self) -> u16 {
            read_u16(&mut self.s).unwrap()
        }
        fn u32(&mut self) -> u32 {
            read_u32(&mut self.s).unwrap()
        }
        fn u64(&mut self) -> u64 {
            read_u64(&mut self.s).unwrap()
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            let mut b = vec![0u8; n];
            self.s.read_exact(&mut b).unwrap();
            b
        }
        fn hello(&mut self, flags: u32) {
            assert_eq!(self.u64(), NBD_MAGIC);
            assert_eq!(self.u64(), IHAVEOPT);
            assert_eq!(self.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            self.s.write_all(&flags.to_be_bytes()).unwrap();
        }
        fn option(&mut self, opt: u32, data: &[u8]) {
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&opt.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.s.write_all(&m).unwrap();
        }
        /// One option reply: (type, data).
        fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
            assert_eq!(self.u64(), OPT_REPLY_MAGIC);
            assert_eq!(self.u32(), opt);
            let kind = self.u32();
            let len = self.u32() as usize;
            (kind, self.bytes(len))
        }
        /// Replies until ACK or an error; returns them all.
        fn replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
            let mut out = Vec::new();
            loop {
                let r = self.reply(opt);
                let end = r.0 == REP_ACK || r.0 & (1 << 31) != 0;
                out.push(r);
                if end {
                    return out;
                }
            }
        }
        fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            m.extend_from_slice(&offset.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
            self.s.write_all(&m).unwrap();
        }
        /// One structured chunk: (flags, type, payload).
        fn chunk(&mut self, cookie: u64) -> (u16, u16, Vec<u8>) {
            let (c, flags, kind, p) = self.any_chunk();
            assert_eq!(c, cookie);
            (flags, kind, p)
        }
        /// One structured chunk of whichever request: (cookie, flags, type, payload).
        fn any_chunk(&mut self) -> (u64, u16, u16, Vec<u8>) {
            assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            let cookie = self.u64();
            let len = self.u32() as usize;
            (cookie, flags, kind, self.bytes(len))
        }
        /// A whole structured read: the bytes (holes as zeros) or the error.
        fn structured_read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, (u32, u64)> {
            self.request(CMD_READ, 0, cookie, offset, len);
            let mut out = vec![0xEEu8; len as usize];
            let mut covered = 0u64;
            let mut err = None;
            loop {
                let (flags, kind, p) = self.chunk(cookie);
                match kind {
                    REPLY_TYPE_OFFSET_DATA => {
                        let o = u64::from_be_bytes(p[..8].try_into().unwrap()) - offset;
                        out[o as usize..o as usize + p.len() - 8].copy_from_slice(&p[8..]);
                        covered += p.len() as u64 - 8;
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        let o = u64::from_be_bytes(p[..8].try_into().unwrap()) - offset;
                        let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                        out[o as usize..o as usize + n].fill(0);
                        covered += n as u64;
                    }
                    REPLY_TYPE_ERROR_OFFSET => {
                        let e = u32::from_be_bytes(p[..4].try_into().unwrap());
                        let ml = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
                        let at = u64::from_be_bytes(p[6 + ml..14 + ml].try_into().unwrap());
                        err = Some((e, at));
                    }
                    REPLY_TYPE_ERROR => err = Some((u32::from_be_bytes(p[..4].try_into().unwrap()), u64::MAX)),
                    REPLY_TYPE_NONE => {}
                    k => panic!("unexpected chunk type {k}"),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            match err {
                Some(e) => Err(e),
                None => {
                    assert_eq!(covered, u64::from(len), "chunks must cover the read exactly");
                    Ok(out)
                }
            }
        }
        /// Sends GO for `name` with structured replies and base:allocation.
        fn go_structured(&mut self, name: &str) {
            self.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
            self.option(OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION]));
            let r = self.replies(OPT_SET_META_CONTEXT);
            assert_eq!(r[0].0, REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], BASE_ALLOCATION.as_bytes());
            assert_eq!(r[1].0, REP_ACK);
            self.go(name);
        }
        fn go(&mut self, name: &str) {
            self.option(OPT_GO, &info_data(name, &[INFO_BLOCK_SIZE]));
            let r = self.replies(OPT_GO);
            assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
        }
        /// True when the server closed the connection (EOF or reset).
        fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(self.s.read(&mut b), Ok(0) | Err(_))
        }
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Runs a server for one connection with exports "a" (the default) and
    /// "b" (both `mem()`), `client` on the other end; returns the server's
    /// result and the read failures it reported.
    fn with_server(client: impl FnOnce(&mut Client)) -> (io::Result<()>, Vec<u64>) {
        with_server_n(2, client)
    }

    /// As [`with_server`], with `workers` read workers (0: all in order).
    fn with_server_n(workers: usize, client: impl FnOnce(&mut Client)) -> (io::Result<()>, Vec<u64>) {
        let (a, b) = (mem(), mem());
        let exports = Exports::new(vec![("a".into(), &a as &dyn Export), ("b".into(), &b as &dyn Export)]);
        let (cs, ss) = UnixStream::pair().unwrap();
        std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                let mut r = BufReader::new(&ss);
                let mut w = io::BufWriter::new(&ss);
                let failures = std::sync::Mutex::new(Vec::new());
                let res = match negotiate(&mut r, &mut w, &exports) {
                    Ok(Some(s)) => transmit(&mut r, &mut w, &s, workers, &|off, _| failures.lock().unwrap().push(off)),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                let _ = w.flush();
                drop(w);
                let _ = ss.shutdown(std::net::Shutdown::Both);
                (res, failures.into_inner().unwrap())
            });
            let mut c = Client { s: cs };
            client(&mut c);
            drop(c);
            server.join().unwrap()
        })
    }

    /// Many reads in flight on one connection (as nbdcopy sends them), with
    /// 0, 1 and 3 read workers: each is answered once, whole (its chunks
    /// never interleaved with another reply's), with the right bytes; the
    /// one over the corrupt block gets its error; a disconnect request
    /// waits for the reads before it. See issue 12.
    #[test]
    fn pipelined_reads_are_each_answered_whole_with_the_right_bytes() {
        use std::collections::BTreeMap;
        let want = mem().data;
        for workers in [0, 1, 3] {
            let (res, failures) = with_server_n(workers, |c| {
                c.go_structured("a");
                // 24 reads over blocks 0-4 and 6-8 (block 5 is corrupt), and one over block 5
                let mut reads: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
                for i in 0..24u64 {
                    let off = if i % 2 == 0 { (i * 997) % (4 * BS) } else { 6 * BS + (i * 613) % (2 * BS) };
                    let len = (BS + i * 111).min(c_size() - off).min(if i % 2 == 0 { 5 * BS - off } else { u64::MAX }) as u32;
                    reads.insert(i + 1, (off, len));
                }
                reads.insert(100, (5 * BS + 9, 50));
                for (&cookie, &(off, len)) in &reads {
                    c.request(CMD_READ, 0, cookie, off, len);
                }
                c.request(CMD_DISC, 0, 200, 0, 0);
                let mut got: BTreeMap<u64, Result<Vec<u8>, u64>> = BTreeMap::new();
                while got.len() < reads.len() {
                    let (cookie, mut flags, mut kind, mut p) = c.any_chunk();
                    let (off, len) = reads[&cookie];
                    assert!(!got.contains_key(&cookie), "cookie {cookie} answered twice");
                    let mut out = vec![0xEEu8; len as usize];
                    let mut err = None;
                    loop {
                        match kind {
                            REPLY_TYPE_OFFSET_DATA => {
                                let o = (u64::from_be_bytes(p[..8].try_into().unwrap()) - off) as usize;
                                out[o..o + p.len() - 8].copy_from_slice(&p[8..]);
                            }
                            REPLY_TYPE_OFFSET_HOLE => {
                                let o = (u64::from_be_bytes(p[..8].try_into().unwrap()) - off) as usize;
                                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                                out[o..o + n].fill(0);
                            }
                            REPLY_TYPE_ERROR_OFFSET => {
                                let ml = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
                                err = Some(u64::from_be_bytes(p[6 + ml..14 + ml].try_into().unwrap()));
                            }
                            REPLY_TYPE_NONE => {}
                            k => panic!("unexpected chunk type {k}"),
                        }
                        if flags & REPLY_FLAG_DONE != 0 {
                            break;
                        }
                        let next;
                        (next, flags, kind, p) = c.any_chunk();
                        assert_eq!(next, cookie, "the reply to {cookie} was interleaved with {next}'s");
                    }
                    got.insert(cookie, err.map_or(Ok(out), Err));
                }
                for (cookie, (off, len)) in reads {
                    match &got[&cookie] {
                        Ok(b) => assert!(b[..] == want[off as usize..(off + u64::from(len)) as usize], "read {cookie}"),
                        Err(at) => assert_eq!((cookie, *at), (100, 5 * BS + 9)),
                    }
                }
                assert!(matches!(got[&100], Err(_)), "the read over the corrupt block failed");
                assert!(c.closed(), "the server closes after the disconnect request");
            });
            res.unwrap();
            assert_eq!(failures, vec![5 * BS + 9], "{workers} workers");
        }
    }

    fn c_size() -> u64 {
        mem().size()
    }

    #[test]
    fn structured_reads_give_data_and_holes_and_block_status_the_zero_runs() {
        for workers in [0, 2] {
            structured_reads_with(workers);
        }
    }

    fn structured_reads_with(workers: usize) {
        let want = mem().data;
        let (res, failures) = with_server_n(workers, |c| {
            c.go_structured("b");
            // blocks 0-4 (0,1 data; 2,3 zero; 4 data), unaligned ends
            let got = c.structured_read(1, 100, (5 * BS - 200) as u32).unwrap();
            assert_eq!(got, want[100..(5 * BS - 100) as usize]);
            // the short last block
            let got = c.structured_read(2, 7 * BS, (BS + 100) as u32).unwrap();
            assert_eq!(got, want[7 * BS as usize..]);
            // block status from the middle of block 1 to the end
            c.request(CMD_BLOCK_STATUS, 0, 3, BS + 10, (8 * BS + 100 - BS - 10) as u32);
            let (flags, kind, p) = c.chunk(3);
            assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
            assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), BASE_ALLOCATION_ID);
            let d: Vec<(u32, u32)> = p[4..]
                .chunks(8)
                .map(|x| (u32::from_be_bytes(x[..4].try_into().unwrap()), u32::from_be_bytes(x[4..].try_into().unwrap())))
                .collect();
            let hz = STATE_HOLE | STATE_ZERO;
            let bs = BS as u32;
            assert_eq!(d, vec![(bs - 10, 0), (2 * bs, hz), (2 * bs, 0), (bs, hz), (bs + 100, 0)]);
            // REQ_ONE: one descriptor, inside the request
            c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 2 * BS, (3 * BS) as u32);
            let (_, _, p) = c.chunk(4);
            assert_eq!(p[4..], [(2 * bs).to_be_bytes(), hz.to_be_bytes()].concat());
            c.request(CMD_DISC, 0, 5, 0, 0);
        });
        res.unwrap();
        assert!(failures.is_empty());
    }

    #[test]
    fn a_corrupt_block_is_an_eio_error_never_data() {
        let want = mem().data;
        let (res, failures) = with_server(|c| {
            c.go_structured("");
            // blocks 4, 5 (corrupt), 6: the error names block 5's offset
            assert_eq!(c.structured_read(1, 4 * BS, (3 * BS) as u32), Err((EIO, 5 * BS)));
            // the connection goes on; other blocks read
            assert_eq!(c.structured_read(2, 0, BS as u32).unwrap(), want[..BS as usize]);
        });
        res.unwrap();
        assert_eq!(failures, vec![5 * BS]);

        // simple replies: an error and no data at all
        let (res, failures) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            c.go("a");
            c.request(CMD_READ, 0, 9, 5 * BS + 1, 10);
            assert_eq!(c.u32(), SIMPLE_REPLY_MAGIC);
            assert_eq!(c.u32(), EIO);
            assert_eq!(c.u64(), 9);
            c.request(CMD_READ, 0, 10, 3, 5);
            assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, 0, 10));
            assert_eq!(c.bytes(5), want[3..8]);
        });
        res.unwrap();
        assert_eq!(failures, vec![5 * BS + 1]);
    }

    #[test]
    fn writes_are_refused_with_eperm_and_their_payload_skipped() {
        let want = mem().data;
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            c.go("a");
            c.request(CMD_WRITE, 0, 1, 0, 1000);
            c.s.write_all(&[0x55u8; 1000]).unwrap();
            assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, EPERM, 1));
            for (kind, cookie) in [(CMD_TRIM, 2), (CMD_WRITE_ZEROES, 3)] {
                c.request(kind, 0, cookie, 0, 1000);
                assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, EPERM, cookie));
            }
            c.request(CMD_FLUSH, 0, 4, 0, 0);
            assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, 0, 4));
            c.request(CMD_CACHE, 0, 5, 0, 4096);
            assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, 0, 5));
            // the stream is still in step: a read returns the image
            c.request(CMD_READ, 0, 6, 0, 1000);
            assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, 0, 6));
            assert_eq!(c.bytes(1000), want[..1000]);
        });
        res.unwrap();
    }

    #[test]
    fn bad_requests_get_errors_and_the_connection_goes_on() {
        let size = mem().data.len() as u64;
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
            c.go("a");
            let cases: [(u16, u64, u32, u32); 5] = [
                (CMD_READ, 0, MAX_PAYLOAD + 1, EOVERFLOW),
                (CMD_READ, size - 1, 2, EINVAL),
                (CMD_READ, u64::MAX, 1, EINVAL),
                (CMD_BLOCK_STATUS, 0, 10, EINVAL), // no meta context negotiated
                (99, 0, 0, EINVAL),
            ];
            for (i, (kind, off, len, err)) in cases.into_iter().enumerate() {
                c.request(kind, 0, i as u64, off, len);
                let (flags, ty, p) = c.chunk(i as u64);
                assert_eq!((flags, ty), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR), "case {i}");
                assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), err, "case {i}");
            }
            assert_eq!(c.structured_read(7, size - 1, 1).unwrap(), vec![mem().data[size as usize - 1]]);
        });
        res.unwrap();
    }

    #[test]
    fn options_list_info_unknown_and_default_export() {
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            c.option(OPT_LIST, &[]);
            let r = c.replies(OPT_LIST);
            let names: Vec<_> = r.iter().filter(|x| x.0 == REP_SERVER).map(|x| String::from_utf8(x.1[4..].to_vec()).unwrap()).collect();
            assert_eq!(names, ["a", "b"]);
            c.option(OPT_LIST, b"x");
            assert_eq!(c.reply(OPT_LIST).0, REP_ERR_INVALID);
            c.option(OPT_INFO, &info_data("nope", &[]));
            assert_eq!(c.reply(OPT_INFO).0, REP_ERR_UNKNOWN);
            c.option(OPT_INFO, b"\0\0\0\x09ab"); // name longer than the data
            assert_eq!(c.reply(OPT_INFO).0, REP_ERR_INVALID);
            // meta contexts need structured replies
            c.option(OPT_SET_META_CONTEXT, &meta_data("a", &[BASE_ALLOCATION]));
            assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
            c.option(OPT_STARTTLS, &[]);
            assert_eq!(c.reply(OPT_STARTTLS).0, REP_ERR_UNSUP);
            c.option(OPT_INFO, &info_data("", &[INFO_NAME, INFO_DESCRIPTION]));
            let r = c.replies(OPT_INFO);
            assert_eq!(r.last().unwrap().0, REP_ACK);
            let export = r.iter().find(|x| x.1[..2] == INFO_EXPORT.to_be_bytes()).unwrap();
            assert_eq!(export.1[2..10], mem().size().to_be_bytes());
            assert_eq!(export.1[10..12], TRANSMISSION_FLAGS.to_be_bytes());
            let name = r.iter().find(|x| x.1[..2] == INFO_NAME.to_be_bytes()).unwrap();
            assert_eq!(&name.1[2..], b"a", "the default export is the first");
            let bsz = r.iter().find(|x| x.1[..2] == INFO_BLOCK_SIZE.to_be_bytes()).unwrap();
            assert_eq!(bsz.1[2..], [1u32.to_be_bytes(), 4096u32.to_be_bytes(), MAX_PAYLOAD.to_be_bytes()].concat());
            // old style: EXPORT_NAME, with the 124 zero bytes (no NO_ZEROES... here negotiated, so none)
            c.option(OPT_EXPORT_NAME, b"b");
            assert_eq!(c.u64(), mem().size());
            assert_eq!(c.u16(), TRANSMISSION_FLAGS);
            c.request(CMD_READ, 0, 1, 0, 4);
            assert_eq!((c.u32(), c.u32(), c.u64()), (SIMPLE_REPLY_MAGIC, 0, 1));
            assert_eq!(c.bytes(4), mem().data[..4]);
        });
        res.unwrap();
    }

    #[test]
    fn export_name_without_no_zeroes_pads_and_unknown_name_disconnects() {
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            c.option(OPT_EXPORT_NAME, b"a");
            assert_eq!(c.u64(), mem().size());
            assert_eq!(c.u16(), TRANSMISSION_FLAGS);
            assert_eq!(c.bytes(124), vec![0u8; 124]);
        });
        res.unwrap();
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            c.option(OPT_EXPORT_NAME, b"nope");
            assert!(c.closed());
        });
        assert!(res.is_err());
    }

    #[test]
    fn hostile_clients_are_disconnected() {
        // garbage instead of an option
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            c.s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            assert!(c.closed());
        });
        assert!(res.unwrap_err().to_string().contains("IHAVEOPT"));
        // unknown client flags
        let (res, _) = with_server(|c| {
            c.hello(0x8000_0000);
            assert!(c.closed());
        });
        assert!(res.is_err());
        // an option claiming 1 GiB of data: refused before it is allocated
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_INFO.to_be_bytes());
            m.extend_from_slice(&(1u32 << 30).to_be_bytes());
            c.s.write_all(&m).unwrap();
            assert!(c.closed());
        });
        assert!(res.unwrap_err().to_string().contains("bytes of data"));
        // too many options
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            for _ in 0..MAX_OPTIONS {
                c.option(OPT_STRUCTURED_REPLY, &[]);
                assert_eq!(c.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
            }
            // the server hangs up without reading this one (the write may fail)
            let _ = c.s.write_all(&[IHAVEOPT.to_be_bytes().as_slice(), &[0, 0, 0, 8, 0, 0, 0, 0]].concat());
            assert!(c.closed());
        });
        assert!(res.unwrap_err().to_string().contains("options"));
        // a meta context count far beyond the data
        let (res, _) = with_server(|c| {
            c.hello(FLAG_C_FIXED_NEWSTYLE);
            c.option(OPT_STRUCTURED_REPLY, &[]);
            c.reply(OPT_STRUCTURED_REPLY);
            c.option(OPT_SET_META_CONTEXT, b"\0\0\0\x01a\xff\xff\xff\xff");
            assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
            c.option(OPT_ABORT, &[]);
            assert_eq!(c.reply(OPT_ABORT).0, REP_ACK);
        });
        res.unwrap();
        // a bad request magic, a write too large to skip, a disconnect inside
        // a header and inside a write payload
        for (what, bytes) in [
            ("magic", b"\x12\x34\x56\x78 and the rest of a header".to_vec()),
            ("write", {
                let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&0u16.to_be_bytes());
                m.extend_from_slice(&CMD_WRITE.to_be_bytes());
                m.extend_from_slice(&[0u8; 16]);
                m.extend_from_slice(&u32::MAX.to_be_bytes());
                m
            }),
            ("header", REQUEST_MAGIC.to_be_bytes()[..3].to_vec()),
            ("payload", {
                let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&0u16.to_be_bytes());
                m.extend_from_slice(&CMD_WRITE.to_be_bytes());
                m.extend_from_slice(&[0u8; 16]);
                m.extend_from_slice(&100u32.to_be_bytes());
                m.extend_from_slice(&[1u8; 10]);
                m
            }),
        ] {
            let (res, _) = with_server(|c| {
                c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
                c.go("a");
                c.s.write_all(&bytes).unwrap();
                if what == "magic" || what == "write" {
                    assert!(c.closed(), "{what}");
                }
                // otherwise the client hangs up mid-request (dropped here)
            });
            assert!(res.is_err(), "{what}: the server must report the broken connection");
        }
    }

    #[test]
    fn block_status_is_capped_and_never_stalls() {
        let m = mem();
        // one descriptor per state change, capped
        let d = block_status(&m, 0, m.size() as u32, 2);
        assert_eq!(d, vec![(2 * BS as u32, 0), (2 * BS as u32, STATE_HOLE | STATE_ZERO)]);
        let all = block_status(&m, 0, m.size() as u32, MAX_DESCRIPTORS);
        assert_eq!(all.iter().map(|x| u64::from(x.0)).sum::<u64>(), m.size());
    }

    #[test]
    fn option_parsers_reject_short_or_trailing_data() {
        assert_eq!(parse_info_request(&info_data("vm@3", &[1, 3])), Some(("vm@3".into(), vec![1, 3])));
        assert_eq!(parse_info_request(b""), None);
        assert_eq!(parse_info_request(&[info_data("a", &[]), vec![0]].concat()), None);
        assert_eq!(parse_meta_request(&meta_data("a", &["base:allocation", "x:y"])), Some(("a".into(), vec!["base:allocation".into(), "x:y".into()])));
        assert_eq!(parse_meta_request(b"\0\0\0\x01a\0\0\0\x01\0\0\0\x09ab"), None);
    }

    /// Arbitrary bytes from a client, after a valid start or not, end in an
    /// error or a clean end, never a panic or a hang.
    #[test]
    fn random_client_bytes_never_panic() {
        use rand::{Rng, RngCore, SeedableRng};
        let (a, b) = (mem(), mem());
        let exports = Exports::new(vec![("a".into(), &a as &dyn Export), ("b".into(), &b as &dyn Export)]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut good = 3u32.to_be_bytes().to_vec();
        for opt in [OPT_STRUCTURED_REPLY] {
            good.extend_from_slice(&IHAVEOPT.to_be_bytes());
            good.extend_from_slice(&opt.to_be_bytes());
            good.extend_from_slice(&0u32.to_be_bytes());
        }
        let meta = meta_data("a", &[BASE_ALLOCATION]);
        good.extend_from_slice(&IHAVEOPT.to_be_bytes());
        good.extend_from_slice(&OPT_SET_META_CONTEXT.to_be_bytes());
        good.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        good.extend_from_slice(&meta);
        let go = info_data("a", &[]);
        good.extend_from_slice(&IHAVEOPT.to_be_bytes());
        good.extend_from_slice(&OPT_GO.to_be_bytes());
        good.extend_from_slice(&(go.len() as u32).to_be_bytes());
        good.extend_from_slice(&go);
        for i in 0..3000 {
            let mut input = if i % 2 == 0 { good[..rng.gen_range(0..=good.len())].to_vec() } else { good.clone() };
            let mut tail = vec![0u8; rng.gen_range(0..300)];
            rng.fill_bytes(&mut tail);
            // now and then a well-formed request header with random fields
            if i % 3 == 0 {
                let mut q = REQUEST_MAGIC.to_be_bytes().to_vec();
                q.extend_from_slice(&(rng.gen::<u16>() & 0xf).to_be_bytes());
                q.extend_from_slice(&rng.gen_range(0u16..9).to_be_bytes());
                q.extend_from_slice(&rng.gen::<u64>().to_be_bytes());
                q.extend_from_slice(&rng.gen_range(0..a.size() + 10).to_be_bytes());
                q.extend_from_slice(&rng.gen_range(0u32..3 * BS as u32).to_be_bytes());
                tail = [q, tail].concat();
            }
            input.extend_from_slice(&tail);
            let mut r = BufReader::new(input.as_slice());
            let mut out = Vec::new();
            if let Ok(Some(s)) = negotiate(&mut r, &mut out, &exports) {
                let _ = transmit(&mut r, &mut out, &s, i % 3, &|_, _| {});
            }
        }
    }
}
