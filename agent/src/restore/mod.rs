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

pub mod export_diff;
pub mod file;
mod preflight;
pub mod qcow2;
pub mod rbd;
pub mod reader;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use blockvault_catalog::BackupRow;
use blockvault_store::{chunk, BackupId, BlockMap, Manifest, Store, StoreLock};

use crate::config::Source;
use crate::context::Ctx;
use crate::error::Error;
use crate::lookup::{self, BackupRef};
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
                Source::Rbd { snap: Some(_), .. } => bail!("restore target {to} must name an image, not a snapshot"),
                Source::Rbd { pool, namespace, image, snap: None } => Ok(TargetSpec::Rbd { pool, namespace, image }),
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

/// How a restore runs.
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions<'a> {
    /// Overwrite an existing, non-empty target.
    pub force: bool,
    /// Mode of a new file target (default [`DEFAULT_MODE`]).
    pub mode: Option<u32>,
    /// Blocks loaded, decoded and written at once: each worker holds one
    /// block's stored and decoded bytes, so memory is bounded by
    /// `threads` × 2 blocks.
    pub threads: usize,
    /// Checked between blocks: set, the restore stops with
    /// [`Error::Cancelled`] and leaves no complete-looking target.
    pub cancel: &'a AtomicBool,
    /// Granularity of the holes left inside a block (`--sparse-size`, as
    /// `rbd import`'s): every aligned piece of this size that is all zeros
    /// is skipped on a fresh target (zeroed on an overwritten one), and the
    /// runs between them are written one call each. A power of two of at
    /// least [`DEFAULT_SPARSE_SIZE`]. Larger pieces mean fewer, larger
    /// writes (an RBD write is one OSD op) and a less sparse target.
    pub sparse_size: usize,
}

/// The default `--sparse-size`: a 4 KiB page, what `rbd import` uses and
/// what filesystems and bluestore allocate in.
pub const DEFAULT_SPARSE_SIZE: usize = 4096;

/// Parses a `--sparse-size` (`4096`, `64K`, `1M`).
///
/// # Errors
/// Not a size, or not a power of two between 4 KiB and 64 MiB.
pub fn parse_sparse_size(s: &str) -> std::result::Result<usize, String> {
    let n = crate::config::parse_size(s)?;
    if !n.is_power_of_two() || !(DEFAULT_SPARSE_SIZE as u64..=64 << 20).contains(&n) {
        return Err(format!("sparse size {s} must be a power of two from 4K to 64M"));
    }
    Ok(n as usize)
}

/// One committed backup opened for restore: its catalog row and its
/// manifest, checked against each other, under the shared store lock (so a
/// concurrent prune and GC cannot sweep its chunks) for as long as it lives.
pub struct OpenBackup {
    pub row: BackupRow,
    pub manifest: Manifest,
    _lock: StoreLock,
}

impl OpenBackup {
    /// Finds the backup `r` names (the latest committed one for `IMAGE`),
    /// takes the shared store lock and reads its manifest. A corrupt
    /// manifest is replaced by one made from the block map (which has its
    /// own header and checksum) and the catalog row's geometry.
    ///
    /// # Errors
    /// The typed lookup errors of [`crate::lookup`]; a manifest that does
    /// not read and cannot be stood in for, or one of another backup or
    /// image ([`check_manifest`]).
    pub fn open(ctx: &Ctx, r: &BackupRef) -> Result<OpenBackup> {
        let row = lookup::committed_backup(ctx, r)?;
        let lock = ctx.store.lock_shared_for_reading()?;
        let manifest = match ctx.store.read_manifest(row.id) {
            Ok(m) => m,
            Err(e) if e.is_corruption() || matches!(e, blockvault_store::Error::UnsupportedVersion { .. }) => {
                let source = ctx.catalog.image(&row.image)?.map(|i| i.source).unwrap_or_default();
                let m = ctx
                    .store
                    .manifest_from_blockmap(row.id, &row.image, &source, row.image_size, row.block_size)
                    .map_err(Error::from_store)
                    .with_context(|| format!("backup {}: {e}; its block map cannot stand in for it either", row.id))?;
                tracing::warn!(backup = row.id.0, error = %e, "manifest unreadable: restoring from the block map, checked against the catalog's image and block size");
                m
            }
            Err(e) => return Err(Error::from_store(e)),
        };
        check_manifest(&manifest, &row.image, row.id)?;
        Ok(OpenBackup { row, manifest, _lock: lock })
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.image_size
    }

    /// Restores this backup to `to`.
    ///
    /// # Errors
    /// As [`restore_to`].
    pub fn restore_to(&self, ctx: &Ctx, to: &TargetSpec, opts: &RestoreOptions, progress: &dyn Progress) -> Result<()> {
        restore_to(ctx, &self.manifest, to, opts, progress)
    }
}

/// Restores `manifest`'s backup to `to`; the caller holds the shared store
/// lock ([`OpenBackup`] does). `opts.mode` applies to a new file only.
///
/// # Errors
/// As [`restore_to_path`] and [`rbd::restore`]; `mode` with an RBD target.
pub fn restore_to(ctx: &Ctx, manifest: &Manifest, to: &TargetSpec, opts: &RestoreOptions, progress: &dyn Progress) -> Result<()> {
    match to {
        TargetSpec::Rbd { pool, namespace, image } => {
            if opts.mode.is_some() {
                bail!("--mode applies to a file target, not to {to}");
            }
            rbd::restore(ctx, manifest, (pool, namespace.as_deref(), image), opts, progress)
        }
        TargetSpec::Qcow2(path) => qcow2::restore(ctx, manifest, path, &qcow2::Qcow2Options::default(), opts, progress).map(|_| ()),
        TargetSpec::Path(path) => restore_to_path(&ctx.store, manifest, path, opts, progress)
            .with_context(|| format!("restoring backup {} of image '{}' to {}", manifest.id, manifest.image, path.display())),
    }
}

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

/// Writes the non-zero `piece`-sized pieces of `data` (a block at
/// `offset`, aligned to `piece`), one call per run of them, and zeroes the
/// zero pieces (a target that starts out zeroed does nothing for them).
fn write_sparse(t: &dyn RestoreTarget, offset: u64, data: &[u8], piece: usize) -> std::io::Result<()> {
    let piece = piece.max(1);
    let zero_at = |k: usize| chunk::is_zero(&data[k..(k + piece).min(data.len())]);
    let mut i = 0;
    let mut zero = zero_at(0);
    while i < data.len() {
        // extend the run; the piece that ends it is scanned once, and
        // starts the next run
        let mut j = (i + piece).min(data.len());
        let mut next = zero;
        while j < data.len() {
            next = zero_at(j);
            if next != zero {
                break;
            }
            j = (j + piece).min(data.len());
        }
        if zero {
            t.zero(offset + i as u64, (j - i) as u64)?;
        } else {
            t.write_at(offset + i as u64, &data[i..j])?;
        }
        i = j;
        zero = next;
    }
    Ok(())
}

/// Restores `map` into `target` on `opts.threads` workers of the worker
/// pool ([`preflight::for_each_block`]): each loads, verifies and decodes
/// one block's chunk and writes it at its offset (`pwrite` for a file, one
/// in-flight write per worker for RBD), so as many writes are in flight as
/// there are workers. The first error stops every worker; so does the
/// cancel flag, checked before each block.
///
/// # Errors
/// The first chunk or write error, naming the chunk, the block and the
/// backup; [`Error::Cancelled`].
pub fn restore_map(
    store: &Store,
    manifest: &Manifest,
    map: &BlockMap,
    target: &dyn RestoreTarget,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let what = format!("backup {} of image '{}'", manifest.id, manifest.image);
    preflight::for_each_block(map, opts, "restore", &format!("restore of {what}"), |raw, plain, b| {
        let (off, len) = map.block_range(b);
        match map.get(b) {
            None => target.zero(off, len as u64).with_context(|| format!("{what}: zeroing block {b} at offset {off}"))?,
            Some(id) => {
                reader::load_block(store, &what, map, b, &id, raw, plain)?;
                write_sparse(target, off, plain, opts.sparse_size).with_context(|| format!("{what}: writing block {b} at offset {off}"))?;
                target.block_done(off, len as u64);
            }
        }
        progress.advance(len as u64);
        Ok(())
    })
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
        Manifest::new(BackupId(id), image, &format!("file:/srv/{image}.img"), 65536)
    }

    #[test]
    fn restore_refuses_a_manifest_of_another_image_or_backup() {
        assert!(check_manifest(&manifest(7, "alpha"), "alpha", BackupId(7)).is_ok());
        let e = format!("{:#}", check_manifest(&manifest(7, "beta"), "alpha", BackupId(7)).unwrap_err());
        assert!(e.contains("'alpha'") && e.contains("'beta'") && e.contains("backup 7"), "{e}");
        let e = format!("{:#}", check_manifest(&manifest(8, "alpha"), "alpha", BackupId(7)).unwrap_err());
        assert!(e.contains("backup 7") && e.contains("backup 8"), "{e}");
    }

    /// Records what a restore asks of its target.
    #[derive(Default)]
    struct Recorder {
        fresh: bool,
        calls: std::sync::Mutex<Vec<(&'static str, u64, u64)>>,
    }

    impl RestoreTarget for Recorder {
        fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(("write", offset, data.len() as u64));
            Ok(())
        }
        fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
            if !self.fresh {
                self.calls.lock().unwrap().push(("zero", offset, len));
            }
            Ok(())
        }
    }

    #[test]
    fn write_sparse_skips_zero_pieces_of_the_given_size() {
        // a 256 KiB block at 1 MiB: data in pages 0-1, 3 and 20, and the
        // last page; zeros elsewhere
        let mut block = vec![0u8; 256 << 10];
        for page in [0usize, 1, 3, 20, 63] {
            block[page * 4096 + 100] = 1;
        }
        let calls = |piece: usize, fresh: bool| {
            let t = Recorder { fresh, ..Recorder::default() };
            write_sparse(&t, 1 << 20, &block, piece).unwrap();
            t.calls.into_inner().unwrap()
        };
        let m = 1u64 << 20;
        assert_eq!(
            calls(4096, true),
            [("write", m, 8192), ("write", m + 3 * 4096, 4096), ("write", m + 20 * 4096, 4096), ("write", m + 63 * 4096, 4096)]
        );
        assert_eq!(
            calls(4096, false),
            [
                ("write", m, 8192),
                ("zero", m + 8192, 4096),
                ("write", m + 3 * 4096, 4096),
                ("zero", m + 4 * 4096, 16 * 4096),
                ("write", m + 20 * 4096, 4096),
                ("zero", m + 21 * 4096, 42 * 4096),
                ("write", m + 63 * 4096, 4096),
            ]
        );
        // 64 KiB pieces: pages 0-15 and 16-31 hold data, 32-47 are zero,
        // 48-63 hold data
        assert_eq!(calls(64 << 10, true), [("write", m, 128 << 10), ("write", m + (192 << 10), 64 << 10)]);
        assert_eq!(
            calls(64 << 10, false),
            [("write", m, 128 << 10), ("zero", m + (128 << 10), 64 << 10), ("write", m + (192 << 10), 64 << 10)]
        );
        // pieces larger than the block: one write of the whole block
        assert_eq!(calls(1 << 20, true), [("write", m, 256 << 10)]);
        // the whole block is written back byte for byte
        let mut out = vec![0u8; block.len()];
        struct Into<'a>(std::sync::Mutex<&'a mut [u8]>);
        impl RestoreTarget for Into<'_> {
            fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
                let o = offset as usize - (1 << 20);
                self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
                Ok(())
            }
            fn zero(&self, _: u64, _: u64) -> std::io::Result<()> {
                Ok(())
            }
        }
        for piece in [4096, 16 << 10, 64 << 10] {
            out.fill(0);
            write_sparse(&Into(std::sync::Mutex::new(&mut out)), 1 << 20, &block, piece).unwrap();
            assert_eq!(out, block, "piece {piece}");
        }
    }

    #[test]
    fn sparse_size_is_a_power_of_two_from_4k_to_64m() {
        assert_eq!(parse_sparse_size("4096"), Ok(4096));
        assert_eq!(parse_sparse_size("64K"), Ok(65536));
        assert_eq!(parse_sparse_size("4M"), Ok(4 << 20));
        for bad in ["0", "2048", "3000", "96K", "128M", "x"] {
            assert!(parse_sparse_size(bad).is_err(), "{bad}");
        }
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
