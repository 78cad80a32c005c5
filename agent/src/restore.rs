//! Restoring a backup to a file or block device.
//!
//! Every chunk is verified (header and payload checksums, then the blake3 of
//! the plaintext against its id) before a byte of it is written. Regular
//! files are written to a temp file beside the target and renamed over it
//! only when complete, so a failed restore never leaves a file that looks
//! whole. Zero blocks, and zero 4 KiB pages inside blocks, are left as
//! holes.

pub mod rbd;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use blockvault_store::{chunk, BackupId, BlockMap, Manifest, Store};

use crate::pipeline::Progress;

/// Granularity of holes punched inside a restored block.
const PAGE: usize = 4096;

/// Where restored bytes go.
pub trait RestoreTarget: Sync {
    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// I/O errors.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros. Targets that start out
    /// zeroed (a new sparse file) do nothing.
    ///
    /// # Errors
    /// I/O errors.
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Called once a whole block has been written.
    fn block_done(&self, _offset: u64, _len: u64) {}
}

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

/// Writes the non-zero pages of `data` (a block at `offset`), and zeroes the
/// zero pages unless the target is fresh.
fn write_sparse(t: &dyn RestoreTarget, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut i = 0;
    while i < data.len() {
        let zero = chunk::is_zero(&data[i..(i + PAGE).min(data.len())]);
        let mut j = i;
        while j < data.len() && chunk::is_zero(&data[j..(j + PAGE).min(data.len())]) == zero {
            j = (j + PAGE).min(data.len());
        }
        if zero {
            t.zero(offset + i as u64, (j - i) as u64)?;
        } else {
            t.write_at(offset + i as u64, &data[i..j])?;
        }
        i = j;
    }
    Ok(())
}

/// Restores `map` into `target` with `threads` parallel readers.
///
/// # Errors
/// The first chunk or write error, naming the chunk, the block and the backup.
pub fn restore_map(
    store: &Store,
    manifest: &Manifest,
    map: &BlockMap,
    target: &dyn RestoreTarget,
    threads: usize,
    progress: &dyn Progress,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let what = format!("backup {} of image '{}'", manifest.id, manifest.image);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let (mut raw, mut plain) = (Vec::new(), Vec::new());
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= map.len() || abort.load(Ordering::Relaxed) {
                        return;
                    }
                    let (off, len) = map.block_range(b);
                    let r = match map.get(b) {
                        None => target.zero(off, len as u64).with_context(|| format!("zeroing block {b} at offset {off}")),
                        Some(id) => store
                            .load_chunk(&id, &mut raw, &mut plain)
                            .with_context(|| format!("{what}: block {b} (offset {off}) cannot be restored"))
                            .and_then(|()| {
                                if plain.len() != len {
                                    bail!("{what}: chunk {id} holds {} bytes, block {b} needs {len}", plain.len());
                                }
                                write_sparse(target, off, &plain).with_context(|| format!("writing block {b} at offset {off}"))?;
                                target.block_done(off, len as u64);
                                Ok(())
                            }),
                    };
                    match r {
                        Ok(()) => progress.advance(len as u64),
                        Err(e) => {
                            abort.store(true, Ordering::Relaxed);
                            first_err.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    match first_err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Checks that the manifest read from the store is the backup the catalog
/// (or the user) asked for: same backup id, same image. A catalog row that
/// points at another image's backup (a damaged or hand-edited catalog, a
/// store swapped under it) would otherwise restore that image's data onto
/// this image's target without a word.
///
/// # Errors
/// When the id or the image differs, naming both sides.
pub fn check_manifest(manifest: &Manifest, image: &str, id: BackupId) -> Result<()> {
    if manifest.id != id {
        bail!(
            "the catalog's backup {id} of image '{image}' has a manifest in the store for backup {} of image '{}': \
             refusing to restore (the catalog does not match the store; `blockvault catalog rebuild` recreates it from the store)",
            manifest.id,
            manifest.image
        );
    }
    if manifest.image != image {
        bail!(
            "backup {id} is listed in the catalog as image '{image}' but its manifest in the store is of image '{}' \
             (source {}): refusing to restore another image's data (the catalog does not match the store; \
             `blockvault catalog rebuild` recreates it from the store)",
            manifest.image,
            manifest.source
        );
    }
    Ok(())
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
    force: bool,
    mode: Option<u32>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<()> {
    let map = store.read_blockmap(manifest)?;
    let md = std::fs::metadata(to).ok();
    let is_dev = md.as_ref().is_some_and(|m| m.file_type().is_block_device());
    let is_link = std::fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && !is_dev {
        bail!(
            "restore target {} is a symbolic link (to a file or to nothing): give the real path, or remove the link",
            to.display()
        );
    }
    if let Some(md) = &md {
        if md.is_dir() {
            bail!("restore target {} is a directory", to.display());
        }
        if (is_dev || md.len() > 0) && !force {
            bail!("restore target {} already exists and is not empty (use --force to overwrite it)", to.display());
        }
    }
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
        restore_map(store, manifest, &map, &t, threads, progress)?;
        t.file.sync_all().with_context(|| format!("fsync of {}", to.display()))?;
        return Ok(());
    }
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = to.file_name().with_context(|| format!("restore target {} has no file name", to.display()))?;
    // O_CREAT|O_EXCL under a random name, mode 0600: whoever can write the
    // directory cannot make us write through a link or into their file.
    // Dropped (failure) removes it.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".blockvault-partial")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let tmp_path = tmp.path().to_path_buf();
    tmp.as_file().set_len(map.image_size()).with_context(|| format!("sizing {}", tmp_path.display()))?;
    set_owner_and_mode(tmp.as_file(), md.as_ref(), mode).with_context(|| format!("setting owner and mode of {}", tmp_path.display()))?;
    let t = FileTarget { file: tmp.reopen().with_context(|| format!("opening {}", tmp_path.display()))?, fresh: true };
    restore_map(store, manifest, &map, &t, threads, progress)?;
    t.file.sync_all().with_context(|| format!("fsync of {}", tmp_path.display()))?;
    let _ = rustix::fs::fadvise(&t.file, 0, None, rustix::fs::Advice::DontNeed);
    tmp.persist(to).map_err(|e| e.error).with_context(|| format!("renaming {} to {}", tmp_path.display(), to.display()))?;
    File::open(&dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of {}", dir.display()))?;
    Ok(())
}

/// Gives the temp file the replaced target's owner and mode, or `mode` (or
/// [`DEFAULT_MODE`]) for a new target. The owner first: chown clears the
/// set-id bits a chmod sets. An explicit `mode` wins over the old one.
fn set_owner_and_mode(f: &File, old: Option<&std::fs::Metadata>, mode: Option<u32>) -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: u64, image: &str) -> Manifest {
        Manifest {
            format: blockvault_store::format::MANIFEST_VERSION,
            id: BackupId(id),
            image: image.into(),
            source: format!("file:/srv/{image}.img"),
            created: String::new(),
            finished: String::new(),
            parent: None,
            image_size: 0,
            block_size: 65536,
            blockmap_blake3: String::new(),
            snapshot: None,
            stats: Default::default(),
            rbd: None,
        }
    }

    #[test]
    fn restore_refuses_a_manifest_of_another_image_or_backup() {
        assert!(check_manifest(&manifest(7, "alpha"), "alpha", BackupId(7)).is_ok());
        let e = format!("{:#}", check_manifest(&manifest(7, "beta"), "alpha", BackupId(7)).unwrap_err());
        assert!(e.contains("'alpha'") && e.contains("'beta'") && e.contains("backup 7"), "{e}");
        let e = format!("{:#}", check_manifest(&manifest(8, "alpha"), "alpha", BackupId(7)).unwrap_err());
        assert!(e.contains("backup 7") && e.contains("backup 8"), "{e}");
    }
}
