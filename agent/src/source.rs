//! Where a backup reads from: the [`Source`] trait, one implementation per
//! kind of image (a file or block device in [`file`], an RBD image in
//! [`rbd`]), and [`ImageSource`], the random-access reads of one frozen
//! version that the pipeline runs on.
//!
//! The backup flow (`backup_image` in the `backup` module) drives a source through its steps, in
//! this order: [`Source::recover`] (what a crashed run left) →
//! [`Source::freeze`] (the point in time) → [`Source::changes`] (what
//! changed since the parent, for the planner in [`crate::plan`]) →
//! [`Source::check`] (sampled trust checks of the plan) →
//! [`Source::reader`] (for the pipeline) → [`Source::finish`].

pub mod diff;
pub mod file;
pub mod rbd;

use std::io;

use anyhow::{bail, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{BackupId, BlockMap, Manifest, RbdInfo, Store};

use crate::config::{self, Config};
use crate::plan::{Changes, Plan};

pub use crate::plan::BlockAction;

/// A committed parent backup, with its verified block map.
pub struct Parent {
    pub manifest: Manifest,
    pub map: BlockMap,
}

/// The image a backup is for, as the catalog knows it.
#[derive(Clone, Debug)]
pub struct Job {
    /// The configured image name.
    pub image: String,
    /// Its catalog row.
    pub image_id: i64,
    /// Its block size, fixed at its first backup.
    pub block_size: u32,
    /// The name of its lock in the store (held for the whole backup).
    pub image_lock: String,
}

/// How a backup ended, for [`Source::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Failed,
}

/// Parallel reads of a local file or block device: more only queue up on
/// the same disk.
pub const DEFAULT_READERS: usize = 2;

/// One kind of image a backup reads. The caller holds the store lock and
/// the image lock for the whole life of a `Source`.
pub trait Source {
    /// Human-readable name for logs and errors.
    fn describe(&self) -> String;

    /// Cleans up what a crashed or failed earlier run of this image left on
    /// the source side (RBD: the snapshots of uncommitted backups).
    ///
    /// # Errors
    /// Source or catalog errors.
    fn recover(&mut self, _store: &Store, _catalog: &Catalog, _job: &Job) -> Result<()> {
        Ok(())
    }

    /// Fixes the point in time that `backup` reads and returns its size in
    /// bytes (RBD: records the snapshot intent, then creates the snapshot).
    ///
    /// # Errors
    /// Source or catalog errors.
    fn freeze(&mut self, catalog: &Catalog, job: &Job, backup: BackupId) -> Result<u64>;

    /// What changed in the frozen version since `since`, or everything
    /// (with the reason) when there is no usable base.
    ///
    /// With `ahead`, a source whose change list takes long to learn (RBD's
    /// exact diff) may meanwhile read blocks it already knows changed and
    /// store them ([`StoreAhead`]); the pipeline then takes them from
    /// [`ImageSource::take_stored`] instead of reading them.
    ///
    /// # Errors
    /// Source errors, and the first store error of a block stored ahead.
    fn changes(&mut self, since: Option<&Parent>, ahead: Option<&StoreAhead<'_>>) -> Result<Changes>;

    /// Sampled checks that an incremental plan can be trusted. An
    /// untrustworthy diff is [`crate::error::BackupError::UntrustedDiff`]:
    /// the caller then reads everything instead.
    ///
    /// # Errors
    /// `UntrustedDiff`, or source errors.
    fn check(&mut self, _store: &Store, _parent: &Parent, _plan: &Plan) -> Result<()> {
        Ok(())
    }

    /// Random-access reads of the frozen version, for the pipeline.
    ///
    /// # Errors
    /// When called before [`Source::freeze`].
    fn reader<'a>(&'a self, store: &'a Store) -> Result<Box<dyn ImageSource + 'a>>;

    /// The snapshots an incremental can diff from, after [`Source::recover`]
    /// (RBD: the blockvault snapshots still held on the cluster); `None`
    /// for a source without snapshots, for which any parent will do.
    fn held_snapshots(&self) -> Option<Vec<String>> {
        None
    }

    /// For a clone: its parent snapshot as a source spec
    /// (`rbd:POOL[/NS]/IMAGE@SNAP`), whose backup, when the store holds
    /// one, is the base of the clone's first backup (then
    /// [`Source::changes`] gets that backup as `since`, and reports only
    /// what the clone itself wrote). `None` when not a clone.
    ///
    /// # Errors
    /// Source errors.
    fn clone_parent(&mut self) -> Result<Option<String>> {
        Ok(None)
    }

    /// The snapshot the backup is of, for the manifest.
    fn snapshot(&self) -> Option<String> {
        None
    }

    /// What the manifest records as the backup's source (`None`: the
    /// image's configured source).
    fn source_name(&self) -> Option<String> {
        None
    }

    /// What a restore to RBD needs to recreate the image, for the manifest.
    fn rbd_info(&self) -> Option<RbdInfo> {
        None
    }

    /// Parallel reads the pipeline runs when `[store] readers` is not set:
    /// enough to hide one read's latency at this block size.
    fn default_readers(&self, _block_size: u32) -> usize {
        DEFAULT_READERS
    }

    /// Ends the run on the source side (RBD: demotes older snapshots after a
    /// commit, removes the snapshot of a failed run). Recoverable problems
    /// are logged; the next run retries.
    ///
    /// # Errors
    /// Catalog errors.
    fn finish(&mut self, _catalog: &Catalog, _job: &Job, _outcome: Outcome) -> Result<()> {
        Ok(())
    }
}

/// Where a source may store blocks before the pipeline runs (see
/// [`Source::changes`]): the backup's store, and how the pipeline would
/// compress. Not given for a throttled image, whose every read goes
/// through the pipeline's limiter.
pub struct StoreAhead<'a> {
    pub store: &'a Store,
    pub compression_level: i32,
}

/// A block of the frozen version that its source already read and handed
/// to the store ([`crate::pipeline::store_block`]) before the pipeline ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    pub offset: u64,
    pub len: usize,
    pub outcome: BlockOutcome,
}

pub use crate::pipeline::BlockOutcome;

/// What reading one block cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRead {
    /// Read whole from the source.
    Whole,
    /// Built from the parent backup's chunk, with only `source_bytes` read
    /// from the source.
    Patched { source_bytes: u64 },
}

/// Random-access reads of one image version.
pub trait ImageSource: Sync {
    /// Human-readable name for logs and errors.
    fn describe(&self) -> String;
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// An I/O error; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads the block at `offset` for the pipeline (the same bytes as
    /// [`ImageSource::read_at`]) and says what that cost.
    ///
    /// # Errors
    /// As `read_at`.
    fn read_block(&self, offset: u64, buf: &mut [u8]) -> io::Result<BlockRead> {
        self.read_at(offset, buf)?;
        Ok(BlockRead::Whole)
    }
    /// The blocks stored before the pipeline ran (see [`StoreAhead`]), in
    /// no order; each is handed out once. Each holds what
    /// [`ImageSource::read_at`] reads at its offset, so the pipeline uses
    /// those of its blocks to read whose length matches instead of reading
    /// them.
    fn take_stored(&self) -> Vec<StoredBlock> {
        Vec::new()
    }
}

impl<T: ImageSource + ?Sized> ImageSource for &T {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn read_block(&self, offset: u64, buf: &mut [u8]) -> io::Result<BlockRead> {
        (**self).read_block(offset, buf)
    }
    fn take_stored(&self) -> Vec<StoredBlock> {
        (**self).take_stored()
    }
}

/// The versions of images that committed backups were read from, opened
/// again to compare a backup with its origin (`verify --source`). Only an
/// RBD snapshot is such a version, while it exists; a file has changed
/// since (it has no point in time to go back to).
pub struct Origins {
    rbd: Option<rbd::SnapshotOpener>,
}

impl Origins {
    /// Connects what opening origins needs: the Ceph cluster when
    /// `snapshots` (some backup to compare was read from an RBD snapshot);
    /// nothing otherwise.
    ///
    /// # Errors
    /// The cluster cannot be reached.
    pub fn connect(cfg: &Config, snapshots: bool) -> Result<Origins> {
        let needs_rbd = snapshots;
        let rbd = if needs_rbd { Some(rbd::SnapshotOpener::connect(cfg)?) } else { None };
        Ok(Origins { rbd })
    }

    /// Opens the version backup `m` was read from.
    ///
    /// # Errors
    /// Why it cannot be compared: not read from a snapshot, the snapshot is
    /// gone, the cluster fails.
    pub fn open(&self, m: &Manifest) -> Result<Box<dyn ImageSource + '_>> {
        let Some(snap) = &m.snapshot else { bail!("not read from an RBD snapshot") };
        let Ok(config::Source::Rbd { pool, namespace, image, .. }) = config::Source::parse(&m.source) else {
            bail!("source {} is not RBD", m.source)
        };
        let Some(opener) = &self.rbd else { bail!("not connected to the Ceph cluster") };
        Ok(Box::new(opener.open((&pool, namespace.as_deref(), &image), snap)?))
    }
}
