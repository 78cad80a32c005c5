//! Restoring to qcow2 (version 3): one flat image, or a chain of layers.
//!
//! `restore SPEC --to qcow2:PATH` writes backup SPEC as one self-contained
//! qcow2 file. With `--chain`, it writes one layer per backup of SPEC's chain
//! (from the first backup, or from `--since ID`): the bottom layer holds its
//! backup whole, each layer above holds only the blocks whose block map entry
//! differs from the layer below (same chunk id = same bytes, so equal entries
//! are skipped without reading them), and PATH is the top. Lower layers sit
//! beside PATH, named PATH's stem + `.<BACKUP_ID>.qcow2` (`vm.qcow2` over
//! `vm.7.qcow2` over `vm.3.qcow2`); each names its backing file by file name
//! only, which qemu resolves relative to the overlay's own directory, so the
//! chain can be moved as a directory. The backing format ("qcow2") is
//! recorded in the header extension, so nothing probes it.
//!
//! What a guest cluster becomes, for cluster size `cs`:
//!
//! | the cluster in this backup             | flat / bottom layer | upper layer      |
//! |----------------------------------------|---------------------|------------------|
//! | in a block equal to the layer below    | (no layer below)    | unallocated      |
//! | all zeros (zero block, or zero pages)  | unallocated         | ZERO flag        |
//! | data                                   | allocated, written  | allocated        |
//!
//! An unallocated cluster of an image without a backing file reads as zeros;
//! in an upper layer it would show the layer below, so blocks that became
//! zero get the L2 "reads as zeros" flag (bit 0) and hide what is under them.
//!
//! The writer knows the whole image before it starts, so it writes each
//! file in one pass and never reads it back: cluster 0 is the header; data
//! clusters follow from cluster 1 in the order worker threads finish their
//! blocks (each block's data clusters are contiguous); then the L2 tables
//! that have any entry, the L1 table, the refcount blocks and the refcount
//! table, every cluster with refcount 1 (16-bit refcounts). The header goes
//! in last. Each file is written to a temp file beside its target and renamed
//! only when every layer is complete and durable (lower layers first, the
//! top last), so a failed restore leaves no file that looks whole.
//!
//! The cluster size is the backup's block size when that is at most 2 MiB
//! (qemu's limit), else 64 KiB. Block sizes are powers of two of at least
//! 64 KiB, so a cluster never spans two blocks. The virtual size is the
//! image size rounded up to 512 bytes (qemu counts sizes in 512-byte
//! sectors); the padding reads as zeros.
//!
//! Every chunk is verified as it is read ([`super::reader::load_block`], as
//! [`super::BackupReader`] does), before a byte of it is written.

// qcow2 stores every number big-endian (its specification, "General").
#![allow(clippy::big_endian_bytes)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use blockvault_catalog::BackupState;
use blockvault_store::{chunk, BackupId, BlockMap, ChunkId, Manifest, Store};

use super::file::set_owner_and_mode;
use super::reader::load_block;
use super::{RestoreOptions, QUEUE_PER_WORKER};
use crate::context::Ctx;
use crate::pipeline::Progress;

const MAGIC: &[u8; 4] = b"QFI\xfb";
const VERSION: u32 = 3;
/// Header length of a version 3 header without optional fields.
const HEADER_LEN: usize = 104;
/// 16-bit refcounts (`refcount_bits = 1 << 4`), qemu's default.
const REFCOUNT_ORDER: u32 = 4;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// L1/L2 entry bit 63: the table or cluster has refcount exactly one.
const COPIED: u64 = 1 << 63;
/// L2 standard cluster descriptor bit 0: the cluster reads as zeros.
const ZERO: u64 = 1;
/// Cluster size when the block size is larger than qemu accepts.
const DEFAULT_CLUSTER: u32 = 64 << 10;
/// Largest cluster size qemu opens.
const MAX_CLUSTER: u32 = 2 << 20;

/// Cluster size of a qcow2 restored from a backup with `block_size` blocks.
pub fn cluster_size_for(block_size: u32) -> u32 {
    if block_size.is_power_of_two() && (512..=MAX_CLUSTER).contains(&block_size) {
        block_size
    } else {
        DEFAULT_CLUSTER
    }
}

/// What one written layer holds, in clusters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub cluster_size: u32,
    /// Clusters with data written in this layer.
    pub data: u64,
    /// Clusters flagged "reads as zeros".
    pub zero: u64,
    /// Blocks equal to the layer below, not read.
    pub blocks_skipped: u64,
    /// Size of the file.
    pub file_bytes: u64,
}

/// One qcow2 file being written: data clusters as they come, metadata at
/// [`Writer::finish`].
struct Writer<'f> {
    file: &'f File,
    cluster_bits: u32,
    /// Virtual size (image size rounded up to 512).
    size: u64,
    /// The L2 tables, each made when a worker first sets one of its
    /// entries: memory follows what the file holds, not the image size.
    l2: Vec<OnceLock<Box<[AtomicU64]>>>,
    /// Guest clusters in the image.
    guest: u64,
    /// Next free host cluster (cluster 0 is the header).
    next: AtomicU64,
}

impl<'f> Writer<'f> {
    fn new(file: &'f File, cluster_size: u32, image_size: u64) -> Result<Self> {
        if !cluster_size.is_power_of_two() || !(512..=MAX_CLUSTER).contains(&cluster_size) {
            bail!("qcow2 cluster size {cluster_size} is not a power of two in 512..=2 MiB");
        }
        let size = image_size.div_ceil(512) * 512;
        let guest = size.div_ceil(u64::from(cluster_size));
        let tables = usize::try_from(guest.div_ceil(u64::from(cluster_size) / 8))
            .context("image too large for a qcow2 L1 table in memory")?;
        Ok(Writer {
            file,
            cluster_bits: cluster_size.trailing_zeros(),
            size,
            l2: (0..tables).map(|_| OnceLock::new()).collect(),
            guest,
            next: AtomicU64::new(1),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Sets the L2 entry of guest cluster `g`.
    fn set(&self, g: u64, entry: u64) {
        debug_assert!(g < self.guest);
        let per_l2 = self.cluster_size() / 8;
        let table = self.l2[(g / per_l2) as usize].get_or_init(|| (0..per_l2).map(|_| AtomicU64::new(0)).collect());
        table[(g % per_l2) as usize].store(entry, Ordering::Relaxed);
    }

    /// Reserves `n` consecutive host clusters; returns the first one's index.
    fn alloc(&self, n: u64) -> u64 {
        self.next.fetch_add(n, Ordering::Relaxed)
    }

    /// Writes `data` (at most one cluster per `cs` bytes, starting on a guest
    /// cluster boundary at `guest_off`) into freshly allocated host clusters.
    fn write_data(&self, guest_off: u64, data: &[u8]) -> std::io::Result<()> {
        let cs = self.cluster_size();
        let n = (data.len() as u64).div_ceil(cs);
        let host = self.alloc(n);
        self.file.write_all_at(data, host << self.cluster_bits)?;
        for i in 0..n {
            let g = (guest_off >> self.cluster_bits) + i;
            self.set(g, ((host + i) << self.cluster_bits) | COPIED);
        }
        Ok(())
    }

    /// Marks guest cluster `g` as reading zeros.
    fn set_zero(&self, g: u64) {
        self.set(g, ZERO);
    }

    /// Writes the L2 tables, L1 table, refcounts and header; returns the
    /// file size. `backing` is the backing file's name, stored as given.
    fn finish(self, backing: Option<&str>) -> std::io::Result<u64> {
        let cs = self.cluster_size();
        let used: Vec<bool> = self.l2.iter().map(|t| t.get().is_some()).collect();
        let data_end = self.next.load(Ordering::Relaxed);
        let layout = Layout::plan(self.cluster_bits, &used, data_end);

        let mut buf = vec![0u8; cs as usize];
        for (table, host) in self.l2.iter().zip(&layout.l2_tables) {
            let (Some(table), Some(host)) = (table.get(), host) else { continue };
            for (k, e) in table.iter().enumerate() {
                buf[k * 8..k * 8 + 8].copy_from_slice(&e.load(Ordering::Relaxed).to_be_bytes());
            }
            self.file.write_all_at(&buf, host << self.cluster_bits)?;
        }
        let mut l1 = vec![0u8; (layout.l1_clusters * cs) as usize];
        for (i, host) in layout.l1_entries().enumerate() {
            l1[i * 8..i * 8 + 8].copy_from_slice(&host.to_be_bytes());
        }
        self.file.write_all_at(&l1, layout.l1_start << self.cluster_bits)?;

        // refcount 1 for clusters 0..total, 16 bits each
        let per_rb = cs / 2;
        for b in 0..layout.refblocks {
            buf.fill(0);
            let first = b * per_rb;
            let n = layout.total.saturating_sub(first).min(per_rb);
            for k in 0..n as usize {
                buf[k * 2..k * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            self.file.write_all_at(&buf, (layout.refblock_start + b) << self.cluster_bits)?;
        }
        let mut rt = vec![0u8; (layout.reftable_clusters * cs) as usize];
        for b in 0..layout.refblocks as usize {
            rt[b * 8..b * 8 + 8].copy_from_slice(&((layout.refblock_start + b as u64) << self.cluster_bits).to_be_bytes());
        }
        self.file.write_all_at(&rt, layout.reftable_start << self.cluster_bits)?;
        let file_bytes = layout.total << self.cluster_bits;
        self.file.set_len(file_bytes)?;

        let header = header(self.cluster_bits, self.size, &layout, backing)?;
        self.file.write_all_at(&header, 0)?;
        Ok(file_bytes)
    }
}

/// Where the metadata of one file goes, in host cluster indexes.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    cluster_bits: u32,
    /// Host cluster of each L2 table, `None` for a table with no entry.
    l2_tables: Vec<Option<u64>>,
    l1_start: u64,
    l1_clusters: u64,
    /// Entries in the L1 table.
    l1_size: u64,
    refblock_start: u64,
    refblocks: u64,
    reftable_start: u64,
    reftable_clusters: u64,
    /// Clusters in the file; each has refcount 1.
    total: u64,
}

impl Layout {
    /// Places the metadata after `data_end` host clusters (header and data),
    /// for an L1 table of `used.len()` entries, `used[i]` telling whether
    /// L2 table `i` has any entry.
    fn plan(cluster_bits: u32, used: &[bool], data_end: u64) -> Layout {
        let cs = 1u64 << cluster_bits;
        let mut next = data_end;
        let l2_tables: Vec<Option<u64>> = used
            .iter()
            .map(|&u| {
                u.then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        let l1_size = l2_tables.len() as u64;
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let l1_start = next;
        next += l1_clusters;
        // the refcount blocks and table count themselves: grow until stable
        let per_rb = cs / 2;
        let (mut refblocks, mut reftable_clusters) = (1u64, 1u64);
        loop {
            let total = next + refblocks + reftable_clusters;
            let rb = total.div_ceil(per_rb);
            let rt = (rb * 8).div_ceil(cs);
            if (rb, rt) == (refblocks, reftable_clusters) {
                break;
            }
            (refblocks, reftable_clusters) = (rb.max(refblocks), rt.max(reftable_clusters));
        }
        let refblock_start = next;
        let reftable_start = next + refblocks;
        Layout {
            cluster_bits,
            l2_tables,
            l1_start,
            l1_clusters,
            l1_size,
            refblock_start,
            refblocks,
            reftable_start,
            reftable_clusters,
            total: reftable_start + reftable_clusters,
        }
    }

    /// The L1 table's entries (host offsets with the COPIED bit, or 0).
    fn l1_entries(&self) -> impl Iterator<Item = u64> + '_ {
        let cb = self.cluster_bits;
        self.l2_tables.iter().map(move |t| t.map_or(0, |h| (h << cb) | COPIED))
    }

}

/// The header cluster's bytes up to the end of the backing file name.
fn header(cluster_bits: u32, size: u64, l: &Layout, backing: Option<&str>) -> std::io::Result<Vec<u8>> {
    let mut h = Vec::with_capacity(HEADER_LEN + 64);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, set below
    h.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, set below
    h.extend_from_slice(&cluster_bits.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&u32::try_from(l.l1_size).map_err(std::io::Error::other)?.to_be_bytes());
    h.extend_from_slice(&(l.l1_start << cluster_bits).to_be_bytes());
    h.extend_from_slice(&(l.reftable_start << cluster_bits).to_be_bytes());
    h.extend_from_slice(&u32::try_from(l.reftable_clusters).map_err(std::io::Error::other)?.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN);
    if let Some(name) = backing {
        if name.is_empty() || name.len() > 1023 {
            return Err(std::io::Error::other(format!("backing file name '{name}' must be 1 to 1023 bytes")));
        }
        let fmt = b"qcow2";
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        h.extend_from_slice(fmt);
        h.resize(h.len().next_multiple_of(8), 0);
    }
    h.extend_from_slice(&[0u8; 8]); // end of header extensions
    if let Some(name) = backing {
        let off = h.len() as u64;
        h[8..16].copy_from_slice(&off.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    Ok(h)
}

/// Writes `map` (of `manifest`'s backup) as one qcow2 file into `file`.
/// With `parent` (the block map of the layer below), only the blocks whose
/// entry differs are written, and `backing` names the layer below's file.
fn write_layer(
    store: &Store,
    manifest: &Manifest,
    map: &BlockMap,
    below: Option<(&BlockMap, &str)>,
    file: &File,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<LayerStats> {
    let cs = cluster_size_for(map.block_size());
    if map.block_size() % cs != 0 {
        bail!("block size {} of backup {} is not a multiple of the qcow2 cluster size {cs}", map.block_size(), manifest.id);
    }
    let w = Writer::new(file, cs, map.image_size())?;
    let what = format!("backup {} of image '{}'", manifest.id, manifest.image);
    let upper = below.is_some();
    let parent = below.map(|(m, _)| m);
    let (data, zero, skipped) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let cs64 = u64::from(cs);
    let threads = opts.threads.max(1);
    crate::pool::for_each(
        opts.cancel,
        "restore-qcow2",
        threads,
        threads * QUEUE_PER_WORKER,
        0..map.len(),
        || (Vec::new(), Vec::new()),
        |(raw, plain), b| {
            let (off, len) = map.block_range(b);
            let cur = map.get(b);
            // the entry the layer below has for this block: `None` when it
            // cannot be compared (another block size)
            let under: Option<Option<ChunkId>> = match parent {
                None => Some(None),
                Some(p) if p.block_size() == map.block_size() => Some(if b < p.len() { p.get(b) } else { None }),
                Some(_) => None,
            };
            if under == Some(cur) {
                skipped.fetch_add(1, Ordering::Relaxed);
            } else if let Some(id) = cur {
                load_block(store, &what, map, b, &id, raw, plain)?;
                write_block(&w, off, plain, upper, &data, &zero)
                    .with_context(|| format!("{what}: writing block {b} (offset {off}) to the qcow2 file"))?;
            } else {
                // a zero block over a layer that has data here
                for c in 0..(len as u64).div_ceil(cs64) {
                    w.set_zero((off + c * cs64) / cs64);
                    zero.fetch_add(1, Ordering::Relaxed);
                }
            }
            progress.advance(len as u64);
            Ok(())
        },
    )
    .map_err(|e| crate::error::Error::cancelled_as(e, || format!("qcow2 restore of {what}")))?;
    let file_bytes = w.finish(below.map(|(_, name)| name)).with_context(|| format!("{what}: writing the qcow2 metadata"))?;
    Ok(LayerStats {
        cluster_size: cs,
        data: data.into_inner(),
        zero: zero.into_inner(),
        blocks_skipped: skipped.into_inner(),
        file_bytes,
    })
}

/// Writes the clusters of one decoded block at guest offset `off`: runs of
/// non-zero clusters as data, zero clusters as ZERO in an `upper` layer
/// (left unallocated in a flat or bottom one, where that reads as zeros).
fn write_block(w: &Writer<'_>, off: u64, plain: &[u8], upper: bool, data: &AtomicU64, zero: &AtomicU64) -> std::io::Result<()> {
    let cs = w.cluster_size() as usize;
    let mut i = 0;
    while i < plain.len() {
        let is_zero = |at: usize| chunk::is_zero(&plain[at..(at + cs).min(plain.len())]);
        if is_zero(i) {
            if upper {
                w.set_zero((off + i as u64) >> w.cluster_bits);
                zero.fetch_add(1, Ordering::Relaxed);
            }
            i += cs;
            continue;
        }
        let mut j = i + cs;
        while j < plain.len() && !is_zero(j) {
            j += cs;
        }
        let j = j.min(plain.len());
        w.write_data(off + i as u64, &plain[i..j])?;
        data.fetch_add(((j - i) as u64).div_ceil(cs as u64), Ordering::Relaxed);
        i = j;
    }
    Ok(())
}

/// Options of a qcow2 restore (`restore --to qcow2:PATH`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qcow2Options {
    /// One layer per backup of the chain instead of one flat file.
    pub chain: bool,
    /// The chain's bottom layer (default: the chain's first backup).
    pub since: Option<BackupId>,
}

/// The backups of `top`'s chain, oldest first, ending with `top`: parent
/// links followed back to a backup without a parent, or to `since`. A
/// parent that is no longer a committed backup (pruned) is replaced by the
/// nearest earlier committed backup of the image: every block map is whole,
/// so a layer can be taken against any earlier backup.
///
/// # Errors
/// `since` not in the chain; a manifest that cannot be read or is of
/// another backup or image.
pub fn chain_of(ctx: &Ctx, top: &Manifest, since: Option<BackupId>) -> Result<Vec<Manifest>> {
    let committed: Vec<BackupId> = ctx
        .catalog
        .committed_backups(Some(&top.image))?
        .into_iter()
        .filter(|r| r.state == BackupState::Committed)
        .map(|r| r.id)
        .collect();
    let mut chain = vec![top.clone()];
    loop {
        let cur = chain.last().expect("never empty");
        if since == Some(cur.id) {
            break;
        }
        let below = match cur.parent {
            Some(p) if p < cur.id && committed.contains(&p) => p,
            Some(_) => match committed.iter().copied().filter(|&id| id < cur.id).max() {
                Some(id) => id,
                None => break,
            },
            None => break,
        };
        let m = ctx.store.read_manifest(below).with_context(|| format!("reading the manifest of backup {below} (chain of backup {})", top.id))?;
        super::check_manifest(&m, &top.image, below)?;
        chain.push(m);
    }
    chain.reverse();
    if let Some(since) = since {
        if chain[0].id != since {
            let ids: Vec<String> = chain.iter().map(|m| m.id.to_string()).collect();
            bail!(
                "--since {since}: backup {since} is not in the chain of backup {} of image '{}' (its chain: {})",
                top.id,
                top.image,
                ids.join(" <- ")
            );
        }
    }
    Ok(chain)
}

/// File names of the layers for `chain` with `top` the top layer: the lower
/// ones are `top`'s stem + `.<ID>.qcow2` beside it.
pub fn layer_paths(top: &Path, chain: &[Manifest]) -> Result<Vec<PathBuf>> {
    let stem = top
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("qcow2 target {}: needs a file name in UTF-8 (it is written into the layer above)", top.display()))?;
    let dir = top.parent().unwrap_or(Path::new(""));
    Ok(chain
        .iter()
        .enumerate()
        .map(|(i, m)| if i + 1 == chain.len() { top.to_path_buf() } else { dir.join(format!("{stem}.{}.qcow2", m.id)) })
        .collect())
}

/// Checks a layer's target: a regular file (not a link) that is new or
/// empty, or any file with `force`. Returns its metadata when it exists.
fn check_target(to: &Path, force: bool) -> Result<Option<std::fs::Metadata>> {
    if std::fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("qcow2 target {} is a symbolic link: give the real path, or remove the link", to.display());
    }
    let md = std::fs::metadata(to).ok();
    if let Some(md) = &md {
        if !md.is_file() {
            bail!("qcow2 target {} exists and is not a regular file", to.display());
        }
        if md.len() > 0 && !force {
            bail!("qcow2 target {} already exists and is not empty (use --force to overwrite it)", to.display());
        }
    }
    Ok(md)
}

/// Writes `chain` (oldest first) as qcow2 layers, the last one at `top`, or
/// one flat file when the chain has one backup. Returns each layer's path
/// and what it holds, bottom first.
///
/// # Errors
/// A target that exists without `force`, any chunk, write or rename error;
/// nothing is renamed into place unless every layer was written.
pub fn write_chain(
    store: &Store,
    chain: &[Manifest],
    top: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Vec<(PathBuf, LayerStats)>> {
    let paths = layer_paths(top, chain)?;
    let old: Vec<Option<std::fs::Metadata>> = paths.iter().map(|p| check_target(p, opts.force)).collect::<Result<_>>()?;
    let dir = match top.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut done = Vec::with_capacity(chain.len());
    let mut below: Option<BlockMap> = None;
    for (i, m) in chain.iter().enumerate() {
        let path = &paths[i];
        let map = store.read_blockmap(m).with_context(|| format!("backup {} of image '{}': reading its block map", m.id, m.image))?;
        let name = path.file_name().and_then(|n| n.to_str()).with_context(|| format!("{}: no file name", path.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".blockvault-partial")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a temp file in {}", dir.display()))?;
        set_owner_and_mode(tmp.as_file(), old[i].as_ref(), opts.mode)
            .with_context(|| format!("setting owner and mode of {}", tmp.path().display()))?;
        let backing = if i > 0 { paths[i - 1].file_name().and_then(|n| n.to_str()) } else { None };
        let under = below.as_ref().zip(backing);
        let stats = write_layer(store, m, &map, under, tmp.as_file(), opts, progress)
            .with_context(|| format!("restoring backup {} of image '{}' to qcow2 {}", m.id, m.image, path.display()))?;
        tmp.as_file().sync_all().with_context(|| format!("fsync of {}", tmp.path().display()))?;
        let _ = rustix::fs::fadvise(tmp.as_file(), 0, None, rustix::fs::Advice::DontNeed);
        tracing::info!(
            backup = m.id.0,
            path = %path.display(),
            cluster_size = stats.cluster_size,
            clusters_data = stats.data,
            clusters_zero = stats.zero,
            blocks_skipped = stats.blocks_skipped,
            "qcow2 layer written"
        );
        done.push((tmp, path.clone(), stats));
        below = Some(map);
    }
    // lower layers first: a top that is in place always has its backing files
    let mut out = Vec::with_capacity(done.len());
    for (tmp, path, stats) in done {
        let tmp_path = tmp.path().to_path_buf();
        tmp.persist(&path).map_err(|e| e.error).with_context(|| format!("renaming {} to {}", tmp_path.display(), path.display()))?;
        out.push((path, stats));
    }
    File::open(&dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of {}", dir.display()))?;
    Ok(out)
}

/// Restores `top` to qcow2 at `path`: flat, or with `opts.chain` as layers.
///
/// # Errors
/// As [`chain_of`] and [`write_chain`].
pub fn restore(
    ctx: &Ctx,
    top: &Manifest,
    path: &Path,
    qopts: &Qcow2Options,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Vec<(PathBuf, LayerStats)>> {
    let chain = plan(ctx, top, qopts)?;
    write_chain(&ctx.store, &chain, path, opts, progress)
}

/// The backups a qcow2 restore of `top` writes, oldest first.
///
/// # Errors
/// `--since` without `--chain`; as [`chain_of`].
pub fn plan(ctx: &Ctx, top: &Manifest, opts: &Qcow2Options) -> Result<Vec<Manifest>> {
    if opts.chain {
        chain_of(ctx, top, opts.since)
    } else if opts.since.is_some() {
        bail!("--since needs --chain (a flat qcow2 holds one backup)")
    } else {
        Ok(vec![top.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// A minimal reader of what [`Writer`] writes, independent of its
    /// layout code: follows the header to the L1, L2 and refcount tables,
    /// checks that every cluster is referenced exactly as often as its
    /// refcount says, and returns (guest bytes, L2 entries, backing name).
    fn read_back(f: &[u8]) -> (Vec<u8>, Vec<u64>, Option<String>) {
        assert_eq!(&f[..4], MAGIC);
        assert_eq!(be32(f, 4), 3);
        let cb = be32(f, 20);
        let cs = 1usize << cb;
        assert_eq!(f.len() % cs, 0, "the file ends on a cluster boundary");
        let size = be64(f, 24);
        let l1_size = be32(f, 36) as usize;
        let l1_off = be64(f, 40) as usize;
        let rt_off = be64(f, 48) as usize;
        let rt_clusters = be32(f, 56) as usize;
        assert_eq!(be32(f, 96), REFCOUNT_ORDER);
        assert_eq!(be32(f, 100) as usize, HEADER_LEN);
        let backing = (be64(f, 8) != 0).then(|| {
            let (o, n) = (be64(f, 8) as usize, be32(f, 16) as usize);
            String::from_utf8(f[o..o + n].to_vec()).unwrap()
        });
        let clusters = f.len() / cs;
        let mut refs = vec![0u16; clusters];
        let mut take = |off: usize, n: usize| {
            assert_eq!(off % cs, 0, "metadata at {off} is not cluster-aligned");
            for c in off / cs..off / cs + n {
                refs[c] += 1;
            }
        };
        take(0, 1);
        take(l1_off, (l1_size * 8).div_ceil(cs));
        take(rt_off, rt_clusters);
        let per_l2 = cs / 8;
        let guest = size.div_ceil(cs as u64) as usize;
        assert!(l1_size * per_l2 >= guest, "the L1 table covers the image");
        let mut l2 = vec![0u64; guest];
        let mut data = vec![0u8; size as usize];
        for i in 0..l1_size {
            let e = be64(f, l1_off + i * 8);
            if e == 0 {
                continue;
            }
            assert_ne!(e & COPIED, 0);
            let t = (e & !COPIED) as usize;
            take(t, 1);
            for k in 0..per_l2 {
                let g = i * per_l2 + k;
                let e = be64(f, t + k * 8);
                if g >= guest {
                    assert_eq!(e, 0, "an L2 entry past the end of the image");
                    continue;
                }
                l2[g] = e;
                if e & !ZERO != 0 {
                    assert_ne!(e & COPIED, 0);
                    let host = (e & !COPIED & !ZERO) as usize;
                    take(host, 1);
                    let n = cs.min(size as usize - g * cs);
                    data[g * cs..g * cs + n].copy_from_slice(&f[host..host + n]);
                }
            }
        }
        let per_rb = cs / 2;
        let mut counted = vec![0u16; clusters];
        for i in 0..rt_clusters * cs / 8 {
            let rb = be64(f, rt_off + i * 8) as usize;
            if rb == 0 {
                continue;
            }
            refs[rb / cs] += 1;
            for k in 0..per_rb {
                let c = i * per_rb + k;
                let v = u16::from_be_bytes(f[rb + 2 * k..rb + 2 * k + 2].try_into().unwrap());
                if c < clusters {
                    counted[c] = v;
                } else {
                    assert_eq!(v, 0, "refcount for cluster {c} past the end of the file");
                }
            }
        }
        assert_eq!(refs, counted, "refcounts differ from the references");
        assert!(refs.iter().all(|&r| r == 1), "every cluster used exactly once");
        (data, l2, backing)
    }

    #[test]
    fn cluster_size_follows_the_block_size_up_to_2_mib() {
        assert_eq!(cluster_size_for(64 << 10), 64 << 10);
        assert_eq!(cluster_size_for(1 << 20), 1 << 20);
        assert_eq!(cluster_size_for(2 << 20), 2 << 20);
        assert_eq!(cluster_size_for(4 << 20), 64 << 10);
        assert_eq!(cluster_size_for(3 << 20), 64 << 10);
    }

    #[test]
    fn refcounts_cover_the_refcount_blocks_themselves() {
        // 512-byte clusters: 256 refcounts per block, 64 entries per table
        for data_end in [1u64, 2, 250, 251, 252, 253, 254, 255, 256, 257, 600, 20_000, 70_000] {
            let l = Layout::plan(9, &[false, false], data_end);
            assert!(l.refblocks * 256 >= l.total, "{data_end}: {l:?}");
            assert!(l.reftable_clusters * 64 >= l.refblocks, "{data_end}: {l:?}");
            // and not more than needed
            assert!((l.refblocks - 1) * 256 < l.total, "{data_end}: {l:?}");
            assert_eq!(l.total, data_end + l.l1_clusters + l.refblocks + l.reftable_clusters);
        }
    }

    /// Writes `image` through [`Writer`] and [`write_block`] as a flat or an
    /// upper layer with `cs`-byte clusters, and reads it back.
    fn write_image(image: &[u8], cs: u32, upper: bool) -> (Vec<u8>, Vec<u64>, Option<String>, u64, u64) {
        let tmp = tempfile::tempfile().unwrap();
        let w = Writer::new(&tmp, cs, image.len() as u64).unwrap();
        let (data, zero) = (AtomicU64::new(0), AtomicU64::new(0));
        // blocks of 4 clusters, written in reverse order as threads might
        let bs = 4 * cs as usize;
        let blocks: Vec<usize> = (0..image.len().div_ceil(bs)).rev().collect();
        for b in blocks {
            let end = ((b + 1) * bs).min(image.len());
            write_block(&w, (b * bs) as u64, &image[b * bs..end], upper, &data, &zero).unwrap();
        }
        w.finish(upper.then_some("lower.qcow2")).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(tmp), &mut bytes).unwrap();
        let (back, l2, backing) = read_back(&bytes);
        (back, l2, backing, data.into_inner(), zero.into_inner())
    }

    #[test]
    fn a_written_image_reads_back_with_exact_refcounts() {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // 512-byte clusters so the tables span several clusters: 700
        // clusters and a short one; zero runs of 1, 3 and 9 clusters
        let cs = 512usize;
        let mut image = vec![0u8; 700 * cs + 100];
        rng.fill_bytes(&mut image);
        for (c, n) in [(0usize, 1usize), (40, 3), (300, 9), (699, 1)] {
            image[c * cs..(c + n) * cs].fill(0);
        }
        image[200 * cs + 7] = 0; // a zero byte inside a data cluster
        let same = |back: &[u8]| back.len() == 701 * cs && back[..image.len()] == image[..] && chunk::is_zero(&back[image.len()..]);
        let (back, l2, backing, data, zero) = write_image(&image, cs as u32, false);
        assert!(same(&back), "the image read back differs");
        assert_eq!(backing, None);
        assert_eq!((data, zero), (701 - 14, 0));
        // flat: zero clusters unallocated, never flagged
        for g in [0usize, 40, 41, 42, 300, 308, 699] {
            assert_eq!(l2[g], 0, "cluster {g}");
        }
        // upper layer: the same zero clusters flagged, nothing else changes
        let (back, l2, backing, data, zero) = write_image(&image, cs as u32, true);
        assert!(same(&back), "the upper layer read back differs");
        assert_eq!(backing.as_deref(), Some("lower.qcow2"));
        assert_eq!((data, zero), (701 - 14, 14));
        for g in [0usize, 40, 41, 42, 300, 308, 699] {
            assert_eq!(l2[g], ZERO, "cluster {g}");
        }
        assert_ne!(l2[700] & !ZERO, 0, "the short last cluster holds data");
    }

    #[test]
    fn an_empty_or_all_zero_image_is_valid() {
        for len in [0usize, 1, 512, 4096 * 3 + 5] {
            let (back, l2, _, data, _) = write_image(&vec![0u8; len], 512, false);
            assert_eq!(back.len(), len.div_ceil(512) * 512);
            assert!(back.iter().all(|&b| b == 0));
            assert!(l2.iter().all(|&e| e == 0));
            assert_eq!(data, 0);
        }
    }

    #[test]
    fn layer_paths_sit_beside_the_top() {
        let m = |id: u64| Manifest {
            format: blockvault_store::format::MANIFEST_VERSION,
            set: None,
            id: BackupId(id),
            image: "vm".into(),
            source: String::new(),
            created: String::new(),
            finished: String::new(),
            parent: None,
            image_size: 0,
            block_size: 65536,
            blockmap_blake3: String::new(),
            snapshot: None,
            stats: Default::default(),
            rbd: None,
        };
        let p = layer_paths(Path::new("/out/vm.qcow2"), &[m(3), m(7), m(9)]).unwrap();
        assert_eq!(p, [PathBuf::from("/out/vm.3.qcow2"), "/out/vm.7.qcow2".into(), "/out/vm.qcow2".into()]);
        let p = layer_paths(Path::new("disk"), &[m(1), m(2)]).unwrap();
        assert_eq!(p, [PathBuf::from("disk.1.qcow2"), "disk".into()]);
    }
}
