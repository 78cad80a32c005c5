//! Raw image files and block devices.
//!
//! Files have no change tracking: every backup reads every allocated extent
//! (found with SEEK_DATA / SEEK_HOLE) and lets deduplication find what is
//! unchanged. Holes are planned as zero blocks without reading them.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{BackupId, Store};
use rustix::fs::SeekFrom;

use super::{ImageSource, Job, Parent, Source};
use crate::plan::{Changes, Extent, FullReason};

/// A raw image file or block device, read in place (no point-in-time copy:
/// the operator quiesces it, as for any file backup).
pub struct FileSource {
    path: PathBuf,
    file: File,
    size: u64,
    is_block_device: bool,
}

impl FileSource {
    /// Opens a raw image file or block device read-only.
    ///
    /// # Errors
    /// When the path is missing, unreadable, or not a file or block device.
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).with_context(|| format!("opening source {}", path.display()))?;
        let md = file.metadata().with_context(|| format!("stat of source {}", path.display()))?;
        let ft = md.file_type();
        let (size, is_block_device) = if ft.is_block_device() {
            let size = rustix::fs::seek(&file, SeekFrom::End(0))
                .map_err(io::Error::from)
                .with_context(|| format!("size of block device {}", path.display()))?;
            (size, true)
        } else if ft.is_file() {
            (md.len(), false)
        } else {
            anyhow::bail!("source {} is neither a regular file nor a block device", path.display());
        };
        Ok(FileSource { path: path.to_path_buf(), file, size, is_block_device })
    }

    /// The extents that hold allocated data (found with SEEK_DATA /
    /// SEEK_HOLE); a block device, or a filesystem that cannot tell, is one
    /// extent over everything.
    ///
    /// # Errors
    /// When SEEK_DATA fails for another reason than "no more data".
    pub fn allocated(&self) -> Result<Vec<Extent>> {
        let everything = vec![Extent::changed(0, self.size)];
        if self.is_block_device {
            return Ok(everything);
        }
        let mut extents = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break, // no data after pos
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOTSUP) => {
                    // the filesystem cannot tell: read everything
                    return Ok(everything);
                }
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("SEEK_DATA on {}", self.path.display())),
            };
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h,
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("SEEK_HOLE on {}", self.path.display())),
            };
            extents.push(Extent::changed(data, hole.min(self.size).saturating_sub(data)));
            pos = hole;
        }
        Ok(extents)
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        ImageSource::describe(self)
    }
    fn freeze(&mut self, _catalog: &Catalog, _job: &Job, _backup: BackupId) -> Result<u64> {
        Ok(self.size)
    }
    /// Files have no change tracking: always everything allocated.
    fn changes(&mut self, _since: Option<&Parent>, _ahead: Option<&super::StoreAhead<'_>>) -> Result<Changes> {
        Ok(Changes::Full { extents: self.allocated()?, reason: FullReason::NoChangeTracking })
    }
    fn reader<'a>(&'a self, _store: &'a Store) -> Result<Box<dyn ImageSource + 'a>> {
        Ok(Box::new(self))
    }
}

impl ImageSource for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        // A backup reads each byte once: drop what it read from the page
        // cache so that a large image does not push out the host's working
        // set (and, on virtual machines, does not make the guest fault in
        // gigabytes of fresh page-cache memory). Advice only: an error is
        // harmless and ignored.
        if let Some(len) = std::num::NonZeroU64::new(buf.len() as u64) {
            let _ = rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::DontNeed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BlockAction;
    use std::io::Write;

    #[test]
    fn holes_become_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut f = File::create(&p).unwrap();
        f.set_len(10 * 65536).unwrap();
        f.write_all_at(b"x", 3 * 65536 + 10).unwrap();
        f.flush().unwrap();
        drop(f);
        let mut src = FileSource::open(&p).unwrap();
        let changes = src.changes(None, None).unwrap();
        let plan = crate::plan::plan(&changes, src.size, 65536, None).unwrap();
        assert_eq!(plan.actions[3], BlockAction::Read);
        // a filesystem may report a larger data extent than written, but never miss one
        assert!(plan.count(BlockAction::Read) < 10);
    }
}
