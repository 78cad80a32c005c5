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
use rustix::fs::SeekFrom;

use super::{mark_range, BlockAction, ImageSource};

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

    /// Plans a full read of every block that holds allocated data; blocks
    /// entirely inside holes are zero.
    ///
    /// # Errors
    /// When SEEK_DATA fails for another reason than "no more data".
    pub fn plan(&self, block_size: u32) -> Result<Vec<BlockAction>> {
        let n = blockvault_store::blockmap::block_count(self.size, block_size) as usize;
        if self.is_block_device {
            return Ok(vec![BlockAction::Read; n]);
        }
        let mut actions = vec![BlockAction::Zero; n];
        let mut pos = 0u64;
        while pos < self.size {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break, // no data after pos
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOTSUP) => {
                    // the filesystem cannot tell: read everything
                    return Ok(vec![BlockAction::Read; n]);
                }
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("SEEK_DATA on {}", self.path.display())),
            };
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h,
                Err(e) => return Err(io::Error::from(e)).with_context(|| format!("SEEK_HOLE on {}", self.path.display())),
            };
            mark_range(&mut actions, block_size, data, hole.min(self.size) - data, BlockAction::Read);
            pos = hole;
        }
        Ok(actions)
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
        let src = FileSource::open(&p).unwrap();
        let plan = src.plan(65536).unwrap();
        assert_eq!(plan[3], BlockAction::Read);
        // a filesystem may report a larger data extent than written, but never miss one
        assert!(plan.iter().filter(|a| **a == BlockAction::Read).count() < 10);
    }
}
