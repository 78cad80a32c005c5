//! `blockvault export-diff`: the change between two backups of an image as
//! an `rbd diff` stream ([`crate::diffstream`]), which `rbd import-diff`
//! applies to an image that holds the older backup's snapshot.
//!
//! The two block maps are compared block by block, without reading data:
//! a block whose chunk id differs (or whose length differs, at a resize)
//! becomes a data record of the new block, read and verified through
//! [`BackupReader`]; a block that became zero becomes a zero record
//! (adjacent ones merged). Without a from-backup every data block is
//! written and zero blocks are left out: the stream is for a new, empty
//! image.

use std::io::Write;

use anyhow::{bail, Context, Result};
use blockvault_store::{BlockMap, Manifest, Store};

use super::BackupReader;
use crate::diffstream::{DiffWriter, Version};
use crate::pipeline::Progress;

/// The snapshot name a backup goes by in a stream: its RBD snapshot, or
/// `blockvault-backup-ID` for a backup without one (a file source).
pub fn stream_snap_name(m: &Manifest) -> String {
    m.snapshot.clone().unwrap_or_else(|| format!("blockvault-backup-{}", m.id))
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub data_blocks: u64,
    pub data_bytes: u64,
    pub zero_records: u64,
    pub stream_bytes: u64,
}

/// One block's fate in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Same,
    Data,
    Zero,
}

/// Compares block `b` of `to` with the same block of `from`.
fn change(from: Option<&BlockMap>, to: &BlockMap, b: usize) -> Change {
    let new = to.get(b);
    let (_, len) = to.block_range(b);
    let old = match from {
        None => None,
        Some(f) if b < f.len() && f.block_range(b).1 == len => Some(f.get(b)),
        // past the old end, or a block whose length changed with a resize:
        // its old content is unknown here, so it is written (or zeroed)
        Some(_) => {
            return if new.is_some() { Change::Data } else { Change::Zero };
        }
    };
    match (old, new) {
        (Some(o), n) if o == n => Change::Same,
        (_, Some(_)) => Change::Data,
        (None, None) => Change::Same, // no from-backup: an empty image is zero already
        (Some(_), None) => Change::Zero,
    }
}

/// Writes the diff from `from` (`None`: an empty image) to `to` into `out`.
/// The caller holds the shared store lock.
///
/// # Errors
/// Block maps of different block sizes; a missing or corrupt chunk (named,
/// nothing of its block is written); write errors.
pub fn export_diff<W: Write>(
    store: &Store,
    from: Option<&Manifest>,
    to: &Manifest,
    version: Version,
    out: W,
    progress: &dyn Progress,
) -> Result<(W, ExportStats)> {
    let reader = BackupReader::with_cache(store, to, 0)?;
    let from_map = match from {
        Some(m) => {
            if m.block_size != to.block_size {
                bail!(
                    "backup {} has blocks of {} bytes and backup {} of {}: cannot compare them",
                    m.id,
                    m.block_size,
                    to.id,
                    to.block_size
                );
            }
            Some(store.read_blockmap(m).with_context(|| format!("backup {}: reading its block map", m.id))?)
        }
        None => None,
    };
    let from_name = from.map(stream_snap_name);
    let to_name = stream_snap_name(to);
    let map = reader.block_map();
    let mut w = DiffWriter::new(out, version, from_name.as_deref(), Some(&to_name), map.image_size())
        .context("writing the stream header")?;
    let mut stats = ExportStats::default();
    let mut zero_run: Option<(u64, u64)> = None;
    let mut buf = Vec::new();
    for b in 0..map.len() {
        let (off, len) = map.block_range(b);
        let c = change(from_map.as_ref(), map, b);
        if c != Change::Zero {
            if let Some((zo, zl)) = zero_run.take() {
                w.zero(zo, zl).context("writing the stream")?;
                stats.zero_records += 1;
            }
        }
        match c {
            Change::Same => {}
            Change::Zero => {
                zero_run = Some(match zero_run {
                    Some((zo, zl)) => (zo, zl + len as u64),
                    None => (off, len as u64),
                });
            }
            Change::Data => {
                buf.resize(len, 0);
                reader.read_at(off, &mut buf)?;
                w.write(off, &buf).context("writing the stream")?;
                stats.data_blocks += 1;
                stats.data_bytes += len as u64;
            }
        }
        progress.advance(len as u64);
    }
    if let Some((zo, zl)) = zero_run.take() {
        w.zero(zo, zl).context("writing the stream")?;
        stats.zero_records += 1;
    }
    stats.stream_bytes = w.written() + 1;
    let out = w.finish().context("finishing the stream")?;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_store::ChunkId;

    fn map(ids: &[Option<u8>], size: u64, bs: u32) -> BlockMap {
        let mut m = BlockMap::new_zeroed(size, bs);
        for (b, id) in ids.iter().enumerate() {
            m.set(b, id.map(|x| ChunkId::of(&[x])));
        }
        m
    }

    #[test]
    fn changes_between_block_maps() {
        let old = map(&[Some(1), Some(2), None, Some(4)], 4 * 16, 16);
        let new = map(&[Some(1), Some(9), Some(3), None, Some(5)], 5 * 16, 16);
        let got: Vec<Change> = (0..new.len()).map(|b| change(Some(&old), &new, b)).collect();
        assert_eq!(got, vec![Change::Same, Change::Data, Change::Data, Change::Zero, Change::Data]);
        // no from-backup: data blocks only
        let got: Vec<Change> = (0..new.len()).map(|b| change(None, &new, b)).collect();
        assert_eq!(got, vec![Change::Data, Change::Data, Change::Data, Change::Same, Change::Data]);
        // a short last block that grew: its old content is unknown, so
        // even a zero block is written as zeros
        let old = map(&[Some(1), Some(2)], 16 + 8, 16);
        let new = map(&[Some(1), None, None], 3 * 16, 16);
        let got: Vec<Change> = (0..new.len()).map(|b| change(Some(&old), &new, b)).collect();
        assert_eq!(got, vec![Change::Same, Change::Zero, Change::Zero]);
    }
}
