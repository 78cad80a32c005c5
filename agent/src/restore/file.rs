//! Restore targets on the local machine: a regular file (written to a temp
//! file beside it and renamed over it when complete) or an existing block
//! device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use blockvault_store::{Manifest, Store};

use super::preflight::{check_path, partial_file, target_dir, PathTarget};
use super::{restore_map, RestoreOptions, RestoreTarget};
use crate::pipeline::Progress;

struct FileTarget {
    file: File,
    /// The target starts out all zeros (new sparse file).
    fresh: bool,
}

impl RestoreTarget for FileTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.fresh {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    fn block_done(&self, offset: u64, len: u64) {
        // Start writing the block out now (DONTNEED on dirty pages starts
        // writeback without waiting) and drop it from the page cache once
        // clean: the final fsync then has little left to do, and a restore
        // of a large image does not fill memory with pages nobody will read.
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ = rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
}

/// Mode of a new restore target when the operator gives none: a disk image
/// holds everything its filesystem holds, so only its owner may read it.
pub const DEFAULT_MODE: u32 = 0o600;

/// Restores a backup to a path: a regular file (new, or replaced with
/// `force`) or an existing block device (only with `force`).
///
/// A file is written to a temp file in the target's directory, created
/// exclusively (`O_EXCL`, so never through a planted symlink) under a random
/// name, and renamed over the target once complete and durable. A replaced
/// file keeps its mode and owner; a new one gets `mode` (default
/// [`DEFAULT_MODE`]) whatever the umask. A target that is a symbolic link is
/// followed only to a block device (`/dev/disk/by-id/...`); a link to
/// anything else is refused, so a restore never writes where a link points.
///
/// # Errors
/// When the target exists without `force`, is a directory or a link to a
/// non-device, or any chunk or write fails.
pub fn restore_to_path(
    store: &Store,
    manifest: &Manifest,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let (force, mode) = (opts.force, opts.mode);
    let map = store.read_blockmap(manifest)?;
    let PathTarget { old: md, is_dev } = check_path("restore target", to, force, true)?;
    if is_dev {
        if mode.is_some() {
            bail!("--mode applies to a new file; block device {} keeps its own", to.display());
        }
        let file = OpenOptions::new().write(true).open(to).with_context(|| format!("opening {}", to.display()))?;
        let dev_size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0)).map_err(std::io::Error::from)?;
        if dev_size < map.image_size() {
            bail!("block device {} has {dev_size} bytes, backup {} needs {}", to.display(), manifest.id, map.image_size());
        }
        let t = FileTarget { file, fresh: false };
        restore_map(store, manifest, &map, &t, opts, progress)?;
        t.file.sync_all().with_context(|| format!("fsync of {}", to.display()))?;
        return Ok(());
    }
    let dir = target_dir(to);
    let tmp = partial_file("restore target", to)?;
    let tmp_path = tmp.path().to_path_buf();
    tmp.as_file().set_len(map.image_size()).with_context(|| format!("sizing {}", tmp_path.display()))?;
    set_owner_and_mode(tmp.as_file(), md.as_ref(), mode).with_context(|| format!("setting owner and mode of {}", tmp_path.display()))?;
    let t = FileTarget { file: tmp.reopen().with_context(|| format!("opening {}", tmp_path.display()))?, fresh: true };
    restore_map(store, manifest, &map, &t, opts, progress)?;
    t.file.sync_all().with_context(|| format!("fsync of {}", tmp_path.display()))?;
    let _ = rustix::fs::fadvise(&t.file, 0, None, rustix::fs::Advice::DontNeed);
    tmp.persist(to).map_err(|e| e.error).with_context(|| format!("renaming {} to {}", tmp_path.display(), to.display()))?;
    File::open(&dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of {}", dir.display()))?;
    Ok(())
}

/// Gives the temp file the replaced target's owner and mode, or `mode` (or
/// [`DEFAULT_MODE`]) for a new target. The owner first: chown clears the
/// set-id bits a chmod sets. An explicit `mode` wins over the old one.
pub(super) fn set_owner_and_mode(f: &File, old: Option<&std::fs::Metadata>, mode: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Some(old) = old {
        let me = f.metadata()?;
        if (me.uid(), me.gid()) != (old.uid(), old.gid()) {
            std::os::unix::fs::fchown(f, Some(old.uid()), Some(old.gid()))?;
        }
    }
    let mode = mode.or(old.map(|o| o.mode() & 0o7777)).unwrap_or(DEFAULT_MODE);
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

