//! What every restore target on the local filesystem checks before it
//! writes a byte, and the per-block loop every restore runs: one place for
//! both, shared by the file ([`super::file`]) and qcow2 ([`super::qcow2`])
//! targets.

use std::fs::Metadata;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use blockvault_store::BlockMap;
use tempfile::NamedTempFile;

use super::RestoreOptions;

/// Block numbers queued per restore worker: enough that a worker never
/// waits for the feeding thread, which only counts.
const QUEUE_PER_WORKER: usize = 4;

/// A path target that passed [`check_path`].
pub(super) struct PathTarget {
    /// Its metadata (links followed) when it exists.
    pub old: Option<Metadata>,
    /// It is an existing block device (written in place, never replaced).
    pub is_dev: bool,
}

/// Checks a path target before anything is written: `label` names it in
/// errors ("restore target", "qcow2 target"). A symbolic link is refused,
/// except one to a block device when `allow_device` (`/dev/disk/by-id/...`);
/// so is a directory or any other file that is neither a regular file nor
/// (with `allow_device`) a block device. An existing non-empty file, and
/// any block device, needs `force`.
///
/// # Errors
/// When the target is refused, saying why.
pub(super) fn check_path(label: &str, to: &Path, force: bool, allow_device: bool) -> Result<PathTarget> {
    let old = std::fs::metadata(to).ok();
    let is_dev = allow_device && old.as_ref().is_some_and(|m| m.file_type().is_block_device());
    let is_link = std::fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && !is_dev {
        let what = if allow_device { " (to a file or to nothing)" } else { "" };
        bail!("{label} {} is a symbolic link{what}: give the real path, or remove the link", to.display());
    }
    if let Some(md) = &old {
        if md.is_dir() {
            bail!("{label} {} is a directory", to.display());
        }
        if !md.is_file() && !is_dev {
            let or_dev = if allow_device { " nor a block device" } else { "" };
            bail!("{label} {} exists and is neither a regular file{or_dev}", to.display());
        }
        if (is_dev || md.len() > 0) && !force {
            bail!("{label} {} already exists and is not empty (use --force to overwrite it)", to.display());
        }
    }
    Ok(PathTarget { old, is_dev })
}

/// The directory a file target `to` is written in (its temp files and the
/// final rename).
pub(super) fn target_dir(to: &Path) -> PathBuf {
    match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates the temp file that becomes `to` once complete: in `to`'s
/// directory, `O_CREAT|O_EXCL` under a random name with mode 0600, so
/// whoever can write the directory cannot make us write through a link or
/// into their file. Dropping it (a failure) removes it.
///
/// # Errors
/// A missing directory (named with its target), a target without a file
/// name, the create itself.
pub(super) fn partial_file(label: &str, to: &Path) -> Result<NamedTempFile> {
    let dir = target_dir(to);
    let name = to.file_name().with_context(|| format!("{label} {} has no file name", to.display()))?;
    // named here: the temp file's own error would name its random path
    if !dir.is_dir() {
        bail!("the directory {} of {label} {} does not exist (create it first)", dir.display(), to.display());
    }
    tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".blockvault-partial")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))
}

/// Runs `f(raw, plain, block)` for every block of `map` on `opts.threads`
/// workers of the worker pool ([`crate::pool`]), each with its own pair of
/// buffers (a block's stored and decoded bytes, so memory is bounded by
/// `threads` × 2 blocks). The first error stops every worker; so does the
/// cancel flag, checked before each block (then the error is
/// [`crate::error::Error::Cancelled`], naming `operation`).
///
/// # Errors
/// The first error `f` returns; cancellation.
pub(super) fn for_each_block<F>(map: &BlockMap, opts: &RestoreOptions, stage: &str, operation: &str, f: F) -> Result<()>
where
    F: Fn(&mut Vec<u8>, &mut Vec<u8>, usize) -> Result<()> + Send + Sync,
{
    let threads = opts.threads.max(1);
    crate::pool::for_each(
        opts.cancel,
        stage,
        threads,
        threads * QUEUE_PER_WORKER,
        0..map.len(),
        || (Vec::new(), Vec::new()),
        |(raw, plain), b| f(raw, plain, b),
    )
    .map_err(|e| crate::error::Error::cancelled_as(e, || operation.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_targets_are_checked_alike_for_every_target() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("new.img");
        let t = check_path("restore target", &new, false, true).unwrap();
        assert!(t.old.is_none() && !t.is_dev);

        let full = d.path().join("full.img");
        std::fs::write(&full, b"x").unwrap();
        let e = format!("{:#}", check_path("qcow2 target", &full, false, false).err().unwrap());
        assert!(e.contains("qcow2 target") && e.contains("already exists and is not empty"), "{e}");
        assert!(check_path("qcow2 target", &full, true, false).unwrap().old.is_some());
        let empty = d.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(check_path("restore target", &empty, false, true).is_ok());

        let e = format!("{:#}", check_path("restore target", d.path(), true, true).err().unwrap());
        assert!(e.contains("is a directory"), "{e}");

        let link = d.path().join("link.img");
        std::os::unix::fs::symlink(&full, &link).unwrap();
        for allow_device in [true, false] {
            let e = format!("{:#}", check_path("restore target", &link, true, allow_device).err().unwrap());
            assert!(e.contains("symbolic link") && e.contains("link.img"), "{e}");
        }
        let dangling = d.path().join("dangling.img");
        std::os::unix::fs::symlink(d.path().join("nothing"), &dangling).unwrap();
        assert!(check_path("restore target", &dangling, true, true).is_err());

        // a character device (or a fifo) is neither a file nor a block device:
        // a restore must never rename a temp file over it
        let e = format!("{:#}", check_path("restore target", Path::new("/dev/null"), true, true).err().unwrap());
        assert!(e.contains("neither a regular file nor a block device"), "{e}");
    }

    #[test]
    fn the_partial_file_sits_beside_its_target_and_a_missing_directory_is_named() {
        let d = tempfile::tempdir().unwrap();
        let to = d.path().join("vm.img");
        let tmp = partial_file("restore target", &to).unwrap();
        assert_eq!(tmp.path().parent(), Some(d.path()));
        let name = tmp.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".vm.img.") && name.ends_with(".blockvault-partial"), "{name}");
        let e = format!("{:#}", partial_file("qcow2 target", &d.path().join("no/vm.qcow2")).err().unwrap());
        assert!(e.contains("does not exist") && e.contains("qcow2 target"), "{e}");
        assert_eq!(target_dir(Path::new("vm.img")), PathBuf::from("."));
    }
}
