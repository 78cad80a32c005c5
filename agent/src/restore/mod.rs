//! Restoring a backup: the restore loop ([`restore_map`]) writes every
//! block of a backup into a [`RestoreTarget`], chosen by a parsed
//! [`TargetSpec`]: a file or block device ([`file`]) or an RBD image
//! ([`rbd`]), or a qcow2 file or chain of layers ([`qcow2`]).
//! [`reader::BackupReader`] reads one backup at random offsets, for targets that pull bytes rather than receive them (NBD, qcow2,
//! export-diff).
//!
//! Every chunk is verified (header and payload checksums, then the blake3 of
//! the plaintext against its id) before a byte of it is written. Regular
//! files are written to a temp file beside the target and renamed over it
//! only when complete, so a failed restore never leaves a file that looks
//! whole. Zero blocks, and zero 4 KiB pages inside blocks, are left as
//! holes.

pub mod file;
pub mod qcow2;
pub mod rbd;
pub mod reader;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use blockvault_store::{chunk, BackupId, BlockMap, Manifest, Store};

use crate::config::Source;
use crate::context::Ctx;
use crate::pipeline::Progress;

pub use file::{restore_to_path, DEFAULT_MODE};
pub use reader::BackupReader;

/// Where a restore writes, parsed from `restore --to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A file or block device (`/path`, `./rel`, or `file:/path`).
    Path(PathBuf),
    /// One RBD image: `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`.
    Rbd { pool: String, namespace: Option<String>, image: String },
    /// A qcow2 file (`qcow2:PATH`), flat or the top of a chain of layers.
    Qcow2(PathBuf),
}

impl TargetSpec {
    /// Parses a `--to` argument. Anything not starting with `rbd:` or
    /// `qcow2:` is a path (a leading `file:` is dropped).
    ///
    /// # Errors
    /// A malformed `rbd:` spec, or one with a glob (a restore writes one image).
    pub fn parse(to: &str) -> Result<TargetSpec> {
        if to.starts_with("rbd:") {
            let src = Source::parse(to).map_err(|e| anyhow::anyhow!("restore target {e}"))?;
            if src.is_glob() {
                bail!("restore target {to} must name one image");
            }
            return match src {
                Source::Rbd { pool, namespace, image } => Ok(TargetSpec::Rbd { pool, namespace, image }),
                Source::File(_) => bail!("restore target {to}: not an RBD image spec"),
            };
        }
        if let Some(path) = to.strip_prefix("qcow2:") {
            if path.is_empty() {
                bail!("restore target '{to}': empty path");
            }
            return Ok(TargetSpec::Qcow2(PathBuf::from(path)));
        }
        let path = to.strip_prefix("file:").unwrap_or(to);
        if path.is_empty() {
            bail!("restore target '{to}': empty path");
        }
        Ok(TargetSpec::Path(PathBuf::from(path)))
    }
}

impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetSpec::Path(p) => write!(f, "{}", p.display()),
            TargetSpec::Rbd { pool, namespace: Some(ns), image } => write!(f, "rbd:{pool}/{ns}/{image}"),
            TargetSpec::Rbd { pool, namespace: None, image } => write!(f, "rbd:{pool}/{image}"),
            TargetSpec::Qcow2(p) => write!(f, "qcow2:{}", p.display()),
        }
    }
}

/// Restores `manifest`'s backup to `to`; the caller holds the shared store
/// lock. `mode` applies to a new file only.
///
/// # Errors
/// As [`restore_to_path`] and [`rbd::restore`]; `mode` with an RBD target.
pub fn restore_to(
    ctx: &Ctx,
    manifest: &Manifest,
    to: &TargetSpec,
    force: bool,
    mode: Option<u32>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<()> {
    match to {
        TargetSpec::Rbd { pool, namespace, image } => {
            if mode.is_some() {
                bail!("--mode applies to a file target, not to {to}");
            }
            rbd::restore(ctx, manifest, (pool, namespace.as_deref(), image), force, threads, progress)
        }
        TargetSpec::Qcow2(path) => {
            qcow2::restore(ctx, manifest, path, &qcow2::Qcow2Options::default(), force, mode, threads, progress).map(|_| ())
        }
        TargetSpec::Path(path) => restore_to_path(&ctx.store, manifest, path, force, mode, threads, progress)
            .with_context(|| format!("restoring backup {} of image '{}' to {}", manifest.id, manifest.image, path.display())),
    }
}

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
                        Some(id) => reader::load_block(store, &what, map, b, &id, &mut raw, &mut plain).and_then(|()| {
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

    #[test]
    fn restore_target_spec_is_parsed_not_prefix_matched() {
        let rbd = |pool: &str, ns: Option<&str>, image: &str| TargetSpec::Rbd {
            pool: pool.into(),
            namespace: ns.map(Into::into),
            image: image.into(),
        };
        assert_eq!(TargetSpec::parse("rbd:pool/img").unwrap(), rbd("pool", None, "img"));
        assert_eq!(TargetSpec::parse("rbd:pool/ns/img").unwrap(), rbd("pool", Some("ns"), "img"));
        assert_eq!(TargetSpec::parse("rbd:pool/ns/img").unwrap().to_string(), "rbd:pool/ns/img");
        assert_eq!(TargetSpec::parse("/dev/sdb").unwrap(), TargetSpec::Path("/dev/sdb".into()));
        assert_eq!(TargetSpec::parse("file:/srv/vm.img").unwrap(), TargetSpec::Path("/srv/vm.img".into()));
        assert_eq!(TargetSpec::parse("out/vm.img").unwrap(), TargetSpec::Path("out/vm.img".into()));
        // a relative file whose name merely contains "rbd:" is a path
        assert_eq!(TargetSpec::parse("./rbd:pool/img").unwrap(), TargetSpec::Path("./rbd:pool/img".into()));
        for bad in ["rbd:pool", "rbd:/img", "rbd:a/b/c/d", "rbd:"] {
            let e = format!("{:#}", TargetSpec::parse(bad).unwrap_err());
            assert!(e.contains("restore target") && e.contains("rbd:POOL/IMAGE"), "{bad}: {e}");
        }
        let e = format!("{:#}", TargetSpec::parse("rbd:pool/vm-*").unwrap_err());
        assert!(e.contains("must name one image"), "{e}");
        assert!(TargetSpec::parse("file:").is_err());
        assert_eq!(TargetSpec::parse("qcow2:out/vm.qcow2").unwrap(), TargetSpec::Qcow2("out/vm.qcow2".into()));
        assert_eq!(TargetSpec::parse("qcow2:/srv/vm.qcow2").unwrap().to_string(), "qcow2:/srv/vm.qcow2");
        assert!(TargetSpec::parse("qcow2:").is_err());
    }
}
