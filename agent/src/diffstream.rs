//! The `rbd export-diff` stream format (Ceph's `doc/dev/rbd-diff.rst`): a
//! [`DiffWriter`] for `blockvault export-diff` and a [`DiffReader`] for
//! `blockvault import-diff`.
//!
//! A stream is a banner, metadata records, data records and an end record:
//!
//! ```text
//! banner   "rbd diff v1\n" | "rbd diff v2\n"
//! 'f' NAME           from-snapshot (absent: the diff is against an empty image)
//! 't' NAME           to-snapshot (absent: the diff is of an image's head)
//! 's' le64 SIZE      image size at the to-snapshot
//! 'w' le64 OFF le64 LEN  LEN bytes   data
//! 'z' le64 OFF le64 LEN              zeros
//! 'e'                end
//! ```
//!
//! NAME is `le32 len` then the bytes. In v2 every record but `'e'` has a
//! `le64` length of what follows its tag after the tag, so readers can skip
//! tags they do not know; v1 has none. `'p'` (snapshot protection, one
//! byte) is skipped.
//!
//! Stock `rbd import-diff` (Ceph 16, `do_import_diff` passes format 1)
//! accepts only v1 streams: v2 diffs are what `rbd export --export-format 2`
//! embeds in its image files. The writer therefore writes v1 by default and
//! v2 on request; the reader takes both.
//!
//! The format has no checksum: a flipped byte inside a data record cannot
//! be detected. The reader refuses every structural fault (a truncated
//! stream, a bad banner, an unknown v1 tag, a v2 length that disagrees with
//! the record, metadata after data, a record past the image size, a
//! missing size or end record, bytes after the end), so a cut stream never
//! reads as a complete one.

use std::io::{self, Read, Write};

/// Banner of a v1 stream.
pub const BANNER_V1: &[u8; 12] = b"rbd diff v1\n";
/// Banner of a v2 stream.
pub const BANNER_V2: &[u8; 12] = b"rbd diff v2\n";
/// Longest snapshot name read (rbd's own reader stops at 4096 bytes too).
pub const MAX_NAME_LEN: u32 = 4096;

const TAG_FROM: u8 = b'f';
const TAG_TO: u8 = b't';
const TAG_SIZE: u8 = b's';
const TAG_PROTECT: u8 = b'p';
const TAG_WRITE: u8 = b'w';
const TAG_ZERO: u8 = b'z';
const TAG_END: u8 = b'e';

/// Stream format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A stream the reader refuses. Offsets are byte positions in the stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiffError {
    #[error("reading the stream at byte {pos}: {source}")]
    Io { pos: u64, source: io::Error },
    #[error("the stream is truncated: it ends at byte {pos}, inside {what}")]
    Truncated { pos: u64, what: &'static str },
    #[error("not an rbd diff stream: the banner is {found:?} (expected \"rbd diff v1\\n\" or \"rbd diff v2\\n\")")]
    Banner { found: String },
    #[error("unknown record tag 0x{tag:02x} at byte {pos} of a v1 stream")]
    UnknownTag { tag: u8, pos: u64 },
    #[error("record '{tag}' at byte {pos} has length {len}, expected {expected}", tag = *tag as char)]
    BadLength { tag: u8, pos: u64, len: u64, expected: u64 },
    #[error("snapshot name at byte {pos} is {len} bytes long (at most {MAX_NAME_LEN})")]
    NameTooLong { pos: u64, len: u32 },
    #[error("snapshot name at byte {pos} is not UTF-8")]
    NameNotUtf8 { pos: u64 },
    #[error("record '{tag}' at byte {pos} appears twice", tag = *tag as char)]
    Duplicate { tag: u8, pos: u64 },
    #[error("metadata record '{tag}' at byte {pos} comes after data records", tag = *tag as char)]
    MetadataAfterData { tag: u8, pos: u64 },
    #[error("the stream has no size record before its first data record (byte {pos})")]
    MissingSize { pos: u64 },
    #[error("record at byte {pos} covers [{offset}, {offset}+{len}), past the image size {size}")]
    OutOfRange { pos: u64, offset: u64, len: u64, size: u64 },
    #[error("{extra} bytes follow the end record at byte {pos}")]
    TrailingBytes { pos: u64, extra: u64 },
}

/// What a stream's metadata records say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// The snapshot the diff starts from (`None`: an empty image).
    pub from: Option<String>,
    /// The snapshot the diff leads to (`None`: an image's head).
    pub to: Option<String>,
    /// The image size at the end of the diff.
    pub size: u64,
}

/// One data record. After a `Write`, its bytes are read with
/// [`DiffReader::read_data`] (or skipped by the next [`DiffReader::next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Write { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// Reads an `rbd diff` stream record by record, checking its structure.
pub struct DiffReader<R: Read> {
    r: R,
    pos: u64,
    header: Header,
    /// The first data-section tag (its position and v2 length), read while
    /// looking for the end of the metadata.
    peeked: Option<(u8, u64, Option<u64>)>,
    /// Bytes of the current `Write` not read yet.
    pending: u64,
    done: bool,
}

impl<R: Read> DiffReader<R> {
    /// Reads the banner and the metadata records.
    ///
    /// # Errors
    /// Any [`DiffError`] of the banner or the metadata.
    pub fn new(r: R) -> Result<Self, DiffError> {
        let mut d = DiffReader {
            r,
            pos: 0,
            header: Header { version: Version::V1, from: None, to: None, size: 0 },
            peeked: None,
            pending: 0,
            done: false,
        };
        let mut banner = [0u8; 12];
        d.exact(&mut banner, "the banner")?;
        d.header.version = match &banner {
            b if b == BANNER_V1 => Version::V1,
            b if b == BANNER_V2 => Version::V2,
            b => return Err(DiffError::Banner { found: String::from_utf8_lossy(b).into_owned() }),
        };
        let mut size = None;
        loop {
            let at = d.pos;
            let tag = d.u8("a record tag")?;
            let len = d.v2_len(tag)?;
            match tag {
                TAG_FROM | TAG_TO => {
                    let name = d.name(tag, at, len)?;
                    let slot = if tag == TAG_FROM { &mut d.header.from } else { &mut d.header.to };
                    if slot.replace(name).is_some() {
                        return Err(DiffError::Duplicate { tag, pos: at });
                    }
                }
                TAG_SIZE => {
                    d.expect_len(tag, at, len, 8)?;
                    let s = d.u64("the size record")?;
                    if size.replace(s).is_some() {
                        return Err(DiffError::Duplicate { tag, pos: at });
                    }
                }
                TAG_PROTECT => {
                    d.expect_len(tag, at, len, 1)?;
                    d.u8("the protection record")?;
                }
                TAG_WRITE | TAG_ZERO | TAG_END => {
                    d.header.size = size.ok_or(DiffError::MissingSize { pos: at })?;
                    d.peeked = Some((tag, at, len));
                    return Ok(d);
                }
                other => d.unknown(other, at, len)?,
            }
        }
    }

    /// The metadata.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes of the stream read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next data record, or `None` after the end record (and after
    /// checking that nothing follows it).
    ///
    /// # Errors
    /// Any [`DiffError`].
    pub fn next(&mut self) -> Result<Option<Record>, DiffError> {
        if self.done {
            return Ok(None);
        }
        if self.pending > 0 {
            let n = self.pending;
            self.skip(n, "the data of a write record")?;
            self.pending = 0;
        }
        loop {
            let (tag, at, len) = match self.peeked.take() {
                Some(p) => p,
                None => {
                    let at = self.pos;
                    let tag = self.u8("a record tag")?;
                    (tag, at, self.v2_len(tag)?)
                }
            };
            match tag {
                TAG_END => {
                    self.done = true;
                    let mut rest = Vec::new();
                    let extra = (&mut self.r).take(1 << 16).read_to_end(&mut rest).map_err(|e| self.io(e))?;
                    if extra > 0 {
                        return Err(DiffError::TrailingBytes { pos: at, extra: extra as u64 });
                    }
                    return Ok(None);
                }
                TAG_WRITE | TAG_ZERO => {
                    let offset = self.u64("a data record")?;
                    let n = self.u64("a data record")?;
                    let expected = if tag == TAG_WRITE { n.checked_add(16) } else { Some(16) };
                    if let Some(len) = len {
                        if Some(len) != expected {
                            return Err(DiffError::BadLength { tag, pos: at, len, expected: expected.unwrap_or(u64::MAX) });
                        }
                    }
                    let size = self.header.size;
                    if offset.checked_add(n).is_none_or(|end| end > size) {
                        return Err(DiffError::OutOfRange { pos: at, offset, len: n, size });
                    }
                    return Ok(Some(if tag == TAG_WRITE {
                        self.pending = n;
                        Record::Write { offset, len: n }
                    } else {
                        Record::Zero { offset, len: n }
                    }));
                }
                TAG_FROM | TAG_TO | TAG_SIZE | TAG_PROTECT => {
                    return Err(DiffError::MetadataAfterData { tag, pos: at });
                }
                other => self.unknown(other, at, len)?,
            }
        }
    }

    /// Reads the next `buf.len()` bytes of the current write record's data.
    ///
    /// # Errors
    /// More than the record holds, or a truncated stream.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<(), DiffError> {
        if buf.len() as u64 > self.pending {
            return Err(DiffError::Io { pos: self.pos, source: io::Error::other("read past the end of a write record") });
        }
        self.exact(buf, "the data of a write record")?;
        self.pending -= buf.len() as u64;
        Ok(())
    }

    fn unknown(&mut self, tag: u8, at: u64, len: Option<u64>) -> Result<(), DiffError> {
        match len {
            // v2: a tag this reader does not know is skipped by its length
            Some(len) => self.skip(len, "a skipped record"),
            None => Err(DiffError::UnknownTag { tag, pos: at }),
        }
    }

    fn expect_len(&self, tag: u8, pos: u64, len: Option<u64>, expected: u64) -> Result<(), DiffError> {
        match len {
            Some(len) if len != expected => Err(DiffError::BadLength { tag, pos, len, expected }),
            _ => Ok(()),
        }
    }

    /// The v2 length after a tag (none for v1, and none after `'e'`).
    fn v2_len(&mut self, tag: u8) -> Result<Option<u64>, DiffError> {
        if self.header.version == Version::V2 && tag != TAG_END {
            Ok(Some(self.u64("a record length")?))
        } else {
            Ok(None)
        }
    }

    fn name(&mut self, tag: u8, at: u64, len: Option<u64>) -> Result<String, DiffError> {
        let pos = self.pos;
        let n = self.u32("a snapshot name")?;
        if n > MAX_NAME_LEN {
            return Err(DiffError::NameTooLong { pos, len: n });
        }
        self.expect_len(tag, at, len, 4 + u64::from(n))?;
        let mut b = vec![0u8; n as usize];
        self.exact(&mut b, "a snapshot name")?;
        String::from_utf8(b).map_err(|_| DiffError::NameNotUtf8 { pos })
    }

    fn io(&self, e: io::Error) -> DiffError {
        DiffError::Io { pos: self.pos, source: e }
    }

    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DiffError> {
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => return Err(DiffError::Truncated { pos: self.pos, what }),
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), DiffError> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink()).map_err(|e| self.io(e))?;
        self.pos += copied;
        if copied < n {
            return Err(DiffError::Truncated { pos: self.pos, what });
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DiffError> {
        let mut b = [0u8; 1];
        self.exact(&mut b, what)?;
        Ok(b[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DiffError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DiffError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Writes an `rbd diff` stream: the banner and metadata on creation, then
/// data and zero records in any order, then [`DiffWriter::finish`].
pub struct DiffWriter<W: Write> {
    w: W,
    version: Version,
    /// Bytes written so far.
    written: u64,
}

impl<W: Write> DiffWriter<W> {
    /// Writes the banner, the snapshot names that are given, and the size.
    ///
    /// # Errors
    /// Write errors; a snapshot name longer than [`MAX_NAME_LEN`].
    pub fn new(w: W, version: Version, from: Option<&str>, to: Option<&str>, size: u64) -> io::Result<Self> {
        let mut d = DiffWriter { w, version, written: 0 };
        d.put(match version {
            Version::V1 => BANNER_V1,
            Version::V2 => BANNER_V2,
        })?;
        for (tag, name) in [(TAG_FROM, from), (TAG_TO, to)] {
            let Some(name) = name else { continue };
            let n = u32::try_from(name.len()).ok().filter(|n| *n <= MAX_NAME_LEN).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("snapshot name of {} bytes is too long", name.len()))
            })?;
            d.tag(tag, 4 + u64::from(n))?;
            d.put(&n.to_le_bytes())?;
            d.put(name.as_bytes())?;
        }
        d.tag(TAG_SIZE, 8)?;
        d.put(&size.to_le_bytes())?;
        Ok(d)
    }

    /// A data record of `data` at `offset`.
    ///
    /// # Errors
    /// Write errors.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.tag(TAG_WRITE, 16 + data.len() as u64)?;
        self.put(&offset.to_le_bytes())?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.put(data)
    }

    /// A zero record over `[offset, offset + len)`.
    ///
    /// # Errors
    /// Write errors.
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.tag(TAG_ZERO, 16)?;
        self.put(&offset.to_le_bytes())?;
        self.put(&len.to_le_bytes())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the end record and flushes; returns the writer.
    ///
    /// # Errors
    /// Write errors.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[TAG_END])?;
        self.w.flush()?;
        Ok(self.w)
    }

    fn tag(&mut self, tag: u8, len: u64) -> io::Result<()> {
        self.put(&[tag])?;
        if self.version == Version::V2 {
            self.put(&len.to_le_bytes())?;
        }
        Ok(())
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }
}

/// Parses a whole stream held in memory, dropping the data: the header and
/// every record. For the fuzz target and tests.
///
/// # Errors
/// Any [`DiffError`].
pub fn parse_all(bytes: &[u8]) -> Result<(Header, Vec<Record>), DiffError> {
    let mut r = DiffReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(rec) = r.next()? {
        out.push(rec);
    }
    Ok((r.header().clone(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: Version) -> Vec<u8> {
        let mut w = DiffWriter::new(Vec::new(), version, Some("snap-a"), Some("snap-b"), 1 << 20).unwrap();
        w.write(4096, &[7u8; 100]).unwrap();
        w.zero(65536, 8192).unwrap();
        w.write((1 << 20) - 1, &[1]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_v1_and_v2() {
        for v in [Version::V1, Version::V2] {
            let bytes = sample(v);
            let mut r = DiffReader::new(&bytes[..]).unwrap();
            assert_eq!(
                r.header(),
                &Header { version: v, from: Some("snap-a".into()), to: Some("snap-b".into()), size: 1 << 20 }
            );
            assert_eq!(r.next().unwrap(), Some(Record::Write { offset: 4096, len: 100 }));
            let mut data = [0u8; 100];
            r.read_data(&mut data).unwrap();
            assert_eq!(data, [7u8; 100]);
            assert_eq!(r.next().unwrap(), Some(Record::Zero { offset: 65536, len: 8192 }));
            // an unread write record is skipped by the next call
            assert_eq!(r.next().unwrap(), Some(Record::Write { offset: (1 << 20) - 1, len: 1 }));
            assert_eq!(r.next().unwrap(), None);
            assert_eq!(r.position(), bytes.len() as u64);
        }
    }

    #[test]
    fn v1_layout_is_the_documented_one() {
        let w = DiffWriter::new(Vec::new(), Version::V1, None, Some("t"), 5).unwrap();
        let bytes = w.finish().unwrap();
        let mut want = b"rbd diff v1\n".to_vec();
        want.extend_from_slice(b"t\x01\x00\x00\x00t");
        want.extend_from_slice(b"s\x05\x00\x00\x00\x00\x00\x00\x00");
        want.push(b'e');
        assert_eq!(bytes, want);
        let w = DiffWriter::new(Vec::new(), Version::V2, None, None, 5).unwrap();
        let bytes = w.finish().unwrap();
        let mut want = b"rbd diff v2\n".to_vec();
        want.extend_from_slice(b"s\x08\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00");
        want.push(b'e');
        assert_eq!(bytes, want);
    }

    #[test]
    fn every_truncation_is_refused() {
        for v in [Version::V1, Version::V2] {
            let bytes = sample(v);
            for cut in 0..bytes.len() {
                assert!(parse_all(&bytes[..cut]).is_err(), "{v:?} cut at {cut} of {} parsed", bytes.len());
            }
            parse_all(&bytes).unwrap();
        }
    }

    #[test]
    fn structural_faults_are_refused() {
        let v1 = sample(Version::V1);
        let v2 = sample(Version::V2);
        // trailing bytes
        let mut b = v1.clone();
        b.push(0);
        assert!(matches!(parse_all(&b), Err(DiffError::TrailingBytes { .. })));
        // bad banner
        let mut b = v1.clone();
        b[10] = b'3';
        assert!(matches!(parse_all(&b), Err(DiffError::Banner { .. })));
        // unknown tag in v1 (the first record's tag, right after the banner)
        let mut b = v1.clone();
        b[12] = b'X';
        assert!(matches!(parse_all(&b), Err(DiffError::UnknownTag { tag: b'X', .. })));
        // a v2 length that disagrees with the record
        let mut b = v2.clone();
        b[13] = 99;
        assert!(matches!(parse_all(&b), Err(DiffError::BadLength { .. })), "{:?}", parse_all(&b));
        // a record past the size
        let mut w = DiffWriter::new(Vec::new(), Version::V1, None, None, 10).unwrap();
        w.zero(5, 6).unwrap();
        assert!(matches!(parse_all(&w.finish().unwrap()), Err(DiffError::OutOfRange { .. })));
        let mut w = DiffWriter::new(Vec::new(), Version::V1, None, None, 10).unwrap();
        w.zero(u64::MAX, 2).unwrap();
        assert!(matches!(parse_all(&w.finish().unwrap()), Err(DiffError::OutOfRange { .. })));
        // no size record
        let mut b = b"rbd diff v1\n".to_vec();
        b.push(b'e');
        assert!(matches!(parse_all(&b), Err(DiffError::MissingSize { .. })));
        // metadata after data
        let mut b = b"rbd diff v1\ns".to_vec();
        b.extend_from_slice(&10u64.to_le_bytes());
        b.push(b'z');
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b's');
        b.extend_from_slice(&10u64.to_le_bytes());
        b.push(b'e');
        assert!(matches!(parse_all(&b), Err(DiffError::MetadataAfterData { .. })));
        // a huge name length is refused before anything is allocated
        let mut b = b"rbd diff v1\nf".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse_all(&b), Err(DiffError::NameTooLong { .. })));
    }

    #[test]
    fn v2_skips_unknown_tags_and_reads_protection() {
        let mut b = b"rbd diff v2\n".to_vec();
        b.push(b'Q');
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"abc");
        b.push(b'p');
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(1);
        b.push(b's');
        b.extend_from_slice(&8u64.to_le_bytes());
        b.extend_from_slice(&100u64.to_le_bytes());
        b.push(b'Y');
        b.extend_from_slice(&0u64.to_le_bytes());
        b.push(b'z');
        b.extend_from_slice(&16u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&100u64.to_le_bytes());
        b.push(b'e');
        let (h, recs) = parse_all(&b).unwrap();
        assert_eq!(h.size, 100);
        assert_eq!(recs, vec![Record::Zero { offset: 0, len: 100 }]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut b = if bytes.first().is_some_and(|x| x & 1 == 1) { BANNER_V2.to_vec() } else { BANNER_V1.to_vec() };
            b.extend_from_slice(&bytes);
            let _ = parse_all(&b);
        }
    }
}
