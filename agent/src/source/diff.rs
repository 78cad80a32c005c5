//! An `rbd export-diff` stream as the source of a backup (`blockvault
//! import-diff`): the new version is the parent backup (the image's latest)
//! with the stream's records laid over it.
//!
//! [`Source::freeze`] reads and checks the whole stream before anything is
//! planned or stored ([`crate::diffstream::DiffReader`]): a truncated or
//! malformed stream fails the backup with nothing committed. Data records
//! stay where they are in a regular file; from a pipe they are spooled to
//! an unnamed temp file (in `$TMPDIR`, gone when the process ends). The
//! records become an overlay of non-overlapping pieces (a later record wins
//! where records overlap), and [`Source::changes`] reports them to the
//! planner: data records as changed, zero records as gone. A block only
//! partly covered is read through [`DiffImage`]: the parent's verified
//! chunk, patched with the stream's bytes.
//!
//! The stream must start from the parent's snapshot (its RBD snapshot
//! name, or `blockvault-backup-ID`), unless forced; a stream without a
//! from-snapshot is a whole image and needs no parent.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{BackupId, Manifest, Store};

use super::{ImageSource, Job, Parent, Source};
use crate::diffstream::{DiffReader, Header, Record};
use crate::plan::{Changes, Extent, FullReason};
use crate::restore::export_diff::stream_snap_name;
use crate::restore::BackupReader;

/// Where the stream comes from.
pub enum Input {
    /// A regular file: data records are read from it in place.
    File(PathBuf),
    /// A pipe or other unseekable reader (standard input): data is spooled.
    Pipe(Box<dyn Read + Send>),
}

/// What covers a piece of the new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Bytes of the data file, starting at this offset.
    Data { at: u64 },
    Zero,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    end: u64,
    kind: Kind,
}

/// Non-overlapping pieces by start offset; a later insert wins.
#[derive(Default, Debug)]
struct Overlay(BTreeMap<u64, Piece>);

impl Overlay {
    fn insert(&mut self, start: u64, end: u64, kind: Kind) {
        if start >= end {
            return;
        }
        // pieces are disjoint and sorted, so their ends are sorted too: walking
        // back from `end`, the overlapping ones come first
        let hit: Vec<u64> = self.0.range(..end).rev().take_while(|(_, p)| p.end > start).map(|(k, _)| *k).collect();
        for k in hit {
            let Some(p) = self.0.remove(&k) else { continue };
            if k < start {
                self.0.insert(k, Piece { end: start, kind: p.kind });
            }
            if p.end > end {
                let kind = match p.kind {
                    Kind::Data { at } => Kind::Data { at: at + (end - k) },
                    Kind::Zero => Kind::Zero,
                };
                self.0.insert(end, Piece { end: p.end, kind });
            }
        }
        self.0.insert(start, Piece { end, kind });
    }

    /// The pieces overlapping `[start, end)`, in order.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &Piece)> {
        let first = self.0.range(..=start).next_back().filter(|(_, p)| p.end > start).map(|(k, _)| *k).unwrap_or(start);
        self.0.range(first..end).map(|(k, p)| (*k, p)).filter(move |(_, p)| p.end > start)
    }
}

/// The stream source of one `import-diff`.
pub struct DiffSource {
    name: String,
    input: Option<Input>,
    force: bool,
    header: Option<Header>,
    overlay: Overlay,
    /// Where data pieces' bytes are: the stream file, or the spool.
    data: Option<File>,
    /// The backup the stream is laid over (none: an empty image).
    base: Option<Manifest>,
}

impl DiffSource {
    /// A source reading `input`; `force` applies a stream whose
    /// from-snapshot is not the parent's.
    pub fn new(input: Input, force: bool) -> DiffSource {
        // the manifest records this as the source: no control characters
        // (a manifest with them does not read back), and bounded
        let name = match &input {
            Input::File(p) => {
                let p: String = p.display().to_string().chars().map(|c| if c.is_control() { '?' } else { c }).take(1024).collect();
                format!("import-diff:{p}")
            }
            Input::Pipe(_) => "import-diff:stdin".to_string(),
        };
        DiffSource { name, input: Some(input), force, header: None, overlay: Overlay::default(), data: None, base: None }
    }

    /// The stream's metadata, after [`Source::freeze`].
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Reads the whole stream, building the overlay.
    fn load(&mut self) -> Result<u64> {
        let input = self.input.take().context("the stream was already read")?;
        let (mut reader, spool): (DiffReader<Box<dyn Read + Send>>, Option<File>) = match input {
            Input::File(p) => {
                let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                let mut f2 = f.try_clone().with_context(|| format!("opening {}", p.display()))?;
                f2.seek(SeekFrom::Start(0))?;
                self.data = Some(f);
                let r: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 20, f2));
                (DiffReader::new(r)?, None)
            }
            Input::Pipe(r) => {
                let spool = tempfile::tempfile().context("creating a spool file for the stream in $TMPDIR")?;
                let r: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 20, r));
                (DiffReader::new(r)?, Some(spool))
            }
        };
        let header = reader.header().clone();
        if let Some(to) = &header.to {
            blockvault_store::manifest::check_image_name(to).map_err(|e| {
                anyhow::anyhow!("the stream's to-snapshot name {e}: blockvault keeps snapshot names to that rule")
            })?;
        }
        let mut spooled = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut out = match &spool {
            Some(f) => Some(io::BufWriter::with_capacity(1 << 20, f.try_clone().context("opening the spool file")?)),
            None => None,
        };
        while let Some(rec) = reader.next()? {
            match rec {
                Record::Zero { offset, len } => self.overlay.insert(offset, offset + len, Kind::Zero),
                Record::Write { offset, len } => {
                    let at = match &mut out {
                        None => reader.position(),
                        Some(w) => {
                            let at = spooled;
                            let mut left = len;
                            while left > 0 {
                                let n = left.min(buf.len() as u64) as usize;
                                reader.read_data(&mut buf[..n])?;
                                w.write_all(&buf[..n]).context("writing the spool file")?;
                                left -= n as u64;
                            }
                            spooled += len;
                            at
                        }
                    };
                    self.overlay.insert(offset, offset + len, Kind::Data { at });
                }
            }
        }
        if let Some(w) = out {
            w.into_inner().map_err(|e| e.into_error()).context("writing the spool file")?;
        }
        if let Some(s) = spool {
            self.data = Some(s);
        }
        let size = header.size;
        self.header = Some(header);
        Ok(size)
    }
}

impl Source for DiffSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn freeze(&mut self, _catalog: &Catalog, _job: &Job, _backup: BackupId) -> Result<u64> {
        let name = self.name.clone();
        self.load().with_context(|| format!("reading the stream {name}"))
    }

    fn changes(&mut self, since: Option<&Parent>, _ahead: Option<&super::StoreAhead<'_>>) -> Result<Changes> {
        let h = self.header.as_ref().context("changes before freeze")?;
        let extents = |data_only: bool| -> Vec<Extent> {
            self.overlay
                .0
                .iter()
                .filter(|(_, p)| !data_only || p.kind != Kind::Zero)
                .map(|(s, p)| match p.kind {
                    Kind::Data { .. } => Extent::changed(*s, p.end - s),
                    Kind::Zero => Extent::gone(*s, p.end - s),
                })
                .collect()
        };
        let Some(from) = &h.from else {
            self.base = None;
            return Ok(Changes::Full { extents: extents(true), reason: FullReason::WholeStream });
        };
        let Some(parent) = since else {
            bail!(
                "the stream starts from snapshot '{}' but the image has no valid backup to apply it to \
                 (a stream without a from-snapshot, `rbd export-diff` without --from-snap, makes a first backup)",
                from.escape_debug()
            );
        };
        let expected = stream_snap_name(&parent.manifest);
        if *from != expected {
            if !self.force {
                bail!(
                    "the stream starts from snapshot '{}' but the latest backup {} of the image is of '{expected}': \
                     refusing to apply it there (--force applies it anyway)",
                    from.escape_debug(),
                    parent.manifest.id
                );
            }
            tracing::warn!(from = %from.escape_debug(), expected, parent = parent.manifest.id.0,
                "--force: applying a stream that starts from another snapshot than the latest backup's");
        }
        self.base = Some(parent.manifest.clone());
        Ok(Changes::Since { extents: extents(false) })
    }

    fn reader<'a>(&'a self, store: &'a Store) -> Result<Box<dyn ImageSource + 'a>> {
        let h = self.header.as_ref().context("reader before freeze")?;
        let base = self.base.as_ref().map(|m| BackupReader::with_cache(store, m, 0)).transpose()?;
        Ok(Box::new(DiffImage { name: &self.name, size: h.size, base, overlay: &self.overlay, data: self.data.as_ref() }))
    }

    fn snapshot(&self) -> Option<String> {
        self.header.as_ref().and_then(|h| h.to.clone())
    }

    fn source_name(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

/// The new version: the base backup (or zeros) under the stream's pieces.
pub struct DiffImage<'a> {
    name: &'a str,
    size: u64,
    base: Option<BackupReader<'a>>,
    overlay: &'a Overlay,
    data: Option<&'a File>,
}

impl ImageSource for DiffImage<'_> {
    fn describe(&self) -> String {
        self.name.to_string()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the image"))?;
        // the base: the parent backup's bytes (verified chunks), zeros past its end
        let from_base = match &self.base {
            Some(b) if offset < b.size() => (b.size() - offset).min(buf.len() as u64) as usize,
            _ => 0,
        };
        if let Some(b) = &self.base {
            if from_base > 0 {
                b.read_at(offset, &mut buf[..from_base]).map_err(|e| io::Error::other(format!("{e:#}")))?;
            }
        }
        buf[from_base..].fill(0);
        // the stream's pieces over it
        for (start, p) in self.overlay.overlapping(offset, end) {
            let s = start.max(offset);
            let e = p.end.min(end);
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match p.kind {
                Kind::Zero => out.fill(0),
                Kind::Data { at } => {
                    let f = self.data.ok_or_else(|| io::Error::other("no data file"))?;
                    f.read_exact_at(out, at + (s - start))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The overlay against a byte-by-byte model: each byte is the id of
    /// the last record covering it (0: none), zero records negative.
    #[test]
    fn overlay_matches_a_byte_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..300 {
            const N: u64 = 200;
            let mut model = vec![0i64; N as usize];
            let mut ov = Overlay::default();
            // record i's data file starts at i * 1000, so `at` tells the record and position
            for i in 1..rng.gen_range(1..20i64) {
                let s = rng.gen_range(0..N);
                let e = rng.gen_range(s..=N);
                let zero = rng.gen_bool(0.3);
                for x in &mut model[s as usize..e as usize] {
                    *x = if zero { -i } else { i };
                }
                ov.insert(s, e, if zero { Kind::Zero } else { Kind::Data { at: i as u64 * 1000 } });
                // a later record wins, and pieces stay disjoint
                let mut last_end = 0;
                for (k, p) in &ov.0 {
                    assert!(*k >= last_end && p.end > *k);
                    last_end = p.end;
                }
            }
            let mut got = vec![0i64; N as usize];
            for (k, p) in &ov.0 {
                for x in *k..p.end {
                    got[x as usize] = match p.kind {
                        Kind::Zero => model[x as usize].min(0), // which zero record does not matter
                        Kind::Data { at } => {
                            let i = (at + (x - k)) / 1000;
                            i as i64
                        }
                    };
                }
            }
            let norm = |v: &[i64]| v.iter().map(|x| if *x < 0 { -1 } else { *x }).collect::<Vec<_>>();
            assert_eq!(norm(&got), norm(&model));
            // overlapping() returns exactly the pieces touching a range
            let s = rng.gen_range(0..N);
            let e = rng.gen_range(s..=N);
            let want: Vec<u64> = ov.0.iter().filter(|(k, p)| **k < e && p.end > s).map(|(k, _)| *k).collect();
            let have: Vec<u64> = ov.overlapping(s, e).map(|(k, _)| k).collect();
            assert_eq!(have, want, "range {s}..{e}");
        }
    }
}
