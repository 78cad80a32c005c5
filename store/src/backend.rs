//! Where the store keeps its objects: the [`Backend`] trait and its
//! implementations.
//!
//! Everything the store's safety rests on is a promise of the backend, and
//! nothing above this trait (chunks, block maps, manifests, GC in
//! [`crate::store`] and [`crate::gc`]) touches a file or a path:
//!
//! * **chunks** are put-if-absent: [`Backend::put_chunk`] never overwrites
//!   a chunk, and a chunk becomes visible ([`Backend::chunk_exists`],
//!   [`Backend::get_chunk`], [`Backend::list_chunks`]) only once all of its
//!   bytes are durable. Puts may be staged: they are visible at the latest
//!   when [`Backend::sync`] returns. A write that fails half-way (a *torn*
//!   write) never becomes visible; what it leaves behind is a temp object
//!   that [`Backend::remove_temp_files`] removes.
//! * **metadata objects** (the store meta, block maps, manifests, markers)
//!   are named by a key such as `backups/000000000001.json` and are
//!   replaced atomically and durably ([`Backend::put_object`]): a reader
//!   sees the old bytes or the new, never a mix, and the new ones survive
//!   a crash once the call returns. Deletes are durable on return too.
//! * **locks**: the store lock, shared or exclusive, and named exclusive
//!   locks, with the semantics of `flock(2)`: held until the [`StoreLock`]
//!   is dropped, by one handle, and a handle waiting for an exclusive lock
//!   waits for every shared holder (see the locking rules in the crate
//!   docs).
//!
//! A crash is modelled by dropping a backend handle without calling
//! [`Backend::sync`]: staged chunks are lost (their temp objects stay), and
//! everything acknowledged as durable stays.
//!
//! Implementations: [`dir::DirBackend`] (the store directory, the format
//! blockvault has always written), [`memory::MemoryBackend`] (in-process,
//! for tests), [`fault::FaultBackend`] (a wrapper that fails the Nth
//! operation, tears writes, and so tests the layers above) and, with the
//! `rados` feature, `rados::RadosBackend` (a pool of a Ceph cluster,
//! shared by many hosts; locks are leases).

pub mod dir;
pub mod fault;
pub mod lease;
pub mod memory;
pub mod sealed;
pub mod s3;
#[cfg(feature = "rados")]
pub mod rados;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::ChunkId;

/// Shared or exclusive, as `flock(2)`'s `LOCK_SH` and `LOCK_EX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A held lock; released on drop.
pub struct StoreLock {
    _held: Box<dyn Send + Sync>,
    /// Set by a lease-based lock (RADOS) whose lease ran out unrenewed.
    lost: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl StoreLock {
    /// Wraps whatever keeps a backend's lock held (a locked file, a guard).
    pub fn new(held: impl Send + Sync + 'static) -> StoreLock {
        StoreLock { _held: Box::new(held), lost: None }
    }

    /// A lock held by a lease that `held` renews; `lost` is set when the
    /// lease ran out before a renewal (others may hold the lock since).
    pub fn with_lease(held: impl Send + Sync + 'static, lost: Arc<std::sync::atomic::AtomicBool>) -> StoreLock {
        StoreLock { _held: Box::new(held), lost: Some(lost) }
    }

    /// True when the lock's lease ran out before it was renewed.
    pub fn is_lost(&self) -> bool {
        self.lost.as_ref().is_some_and(|l| l.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Checks that the lock is still held, before a step whose safety rests
    /// on it (a commit, a removal).
    ///
    /// # Errors
    /// `LockLost` naming `what` when the lease ran out.
    pub fn ensure_held(&self, what: &str) -> Result<()> {
        if self.is_lost() {
            return Err(Error::LockLost { lock: what.to_string() });
        }
        Ok(())
    }
}

impl fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreLock")
    }
}

/// One chunk as listed: id, stored size, last modification (see
/// [`Backend::touch_chunk`]).
pub type ChunkEntry = (ChunkId, u64, SystemTime);

/// The objects of one store. See the module docs for the promises every
/// implementation keeps. Errors name the object (`location()` joined with
/// the key or chunk path) and the cause.
pub trait Backend: Send + Sync {
    /// Where the store is, for messages: its directory, or a name such as
    /// `memory:` for a backend that has none.
    fn location(&self) -> &Path;

    /// The store's directory, for a backend that is one.
    fn dir(&self) -> Option<&Path> {
        None
    }

    /// True when nothing can change the store (a read-only mount): then no
    /// lock can be taken and none is needed by a reader.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Human-readable name of an object, for error messages.
    fn object_name(&self, key: &str) -> PathBuf {
        self.location().join(key)
    }

    // ---- chunks ------------------------------------------------------

    /// True when the chunk is visible.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    fn chunk_exists(&self, id: &ChunkId) -> Result<bool>;

    /// A stamp of the chunk group `prefix` (the chunks whose ids begin
    /// with these two bytes, big-endian) that changes whenever a chunk of
    /// the group is added or removed: two equal stamps, taken at two
    /// instants, mean the group held the same chunks in between. Never 0.
    ///
    /// `None` when the backend keeps no such stamp, when the group is
    /// empty, or when it changed too recently for the stamp to be trusted
    /// (a filesystem's timestamps are only as fine as its clock's tick):
    /// the caller then looks each chunk up. The default is `None`.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    fn chunk_group_stamp(&self, prefix: u16) -> Result<Option<u128>> {
        let _ = prefix;
        Ok(None)
    }

    /// Stores a chunk unless it is already visible; never overwrites one.
    /// The chunk may be staged until [`Backend::sync`]. Returns true when
    /// it was written (staged).
    ///
    /// # Errors
    /// `Io`; the chunk is then not visible, now or after a sync.
    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool>;

    /// Makes every staged chunk durable and visible, and every chunk that
    /// is visible durable (another writer's, or this handle's early syncs'):
    /// it comes before a commit that may reference any of them.
    ///
    /// # Errors
    /// `Io`; chunks already made visible stay visible and complete.
    fn sync(&self) -> Result<()>;

    /// Drops the staged chunks of this handle (a failed or cancelled
    /// backup): nothing references them.
    fn discard_pending(&self);

    /// Bytes of chunks staged by [`Backend::put_chunk`] and not yet made
    /// durable by [`Backend::sync`], for a writer that syncs early, while
    /// it still writes, so the sync before its commit has little left to
    /// do. A backend whose sync gains nothing from that says 0.
    fn staged_bytes(&self) -> u64 {
        0
    }

    /// [`Backend::sync`] while the writer still writes: the staged chunks
    /// become durable and visible, and what the backend can leave to the
    /// next sync it may (the directory backend: the durability of the
    /// renames). Only a [`Backend::sync`] comes before a commit.
    ///
    /// # Errors
    /// As [`Backend::sync`].
    fn sync_early(&self) -> Result<()> {
        self.sync()
    }

    /// Reads a visible chunk's stored bytes into `out`, at most
    /// [`crate::format::MAX_CHUNK_OBJECT_LEN`] + 1 of them (the chunk
    /// decoder refuses anything longer).
    ///
    /// # Errors
    /// `ChunkMissing` when it is not visible, `Io` otherwise.
    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()>;

    /// [`Backend::put_chunk`] of a chunk that will be read again soon (an
    /// index chunk of a block map: the image's next backup reads it): a
    /// backend with a cache keeps it there.
    ///
    /// # Errors
    /// As [`Backend::put_chunk`].
    fn put_chunk_hot(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        self.put_chunk(id, bytes)
    }

    /// [`Backend::get_chunk`] of a chunk that will be read again soon (see
    /// [`Backend::put_chunk_hot`]).
    ///
    /// # Errors
    /// As [`Backend::get_chunk`].
    fn get_chunk_hot(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.get_chunk(id, out)
    }

    /// Every visible chunk.
    ///
    /// # Errors
    /// `Io`.
    fn list_chunks(&self) -> Result<Vec<ChunkEntry>>;

    /// Deletes a chunk; a missing one is not an error.
    ///
    /// # Errors
    /// `Io`.
    fn delete_chunk(&self, id: &ChunkId) -> Result<()>;

    /// Sets a chunk's modification time to now.
    ///
    /// # Errors
    /// `ChunkMissing` when it is not visible, `Io` otherwise.
    fn touch_chunk(&self, id: &ChunkId) -> Result<()>;

    /// A chunk's modification time, `None` when it is not visible.
    ///
    /// # Errors
    /// `Io`.
    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>>;

    /// Moves a chunk aside (durably) where nothing reads, lists or removes
    /// it; returns the name it got, or `None` when it is not visible.
    ///
    /// # Errors
    /// `Io`.
    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>>;

    // ---- metadata objects --------------------------------------------

    /// The bytes of an object, at most `limit + 1` of them (enough for a
    /// decoder to see that it is longer than `limit`, never more, so a
    /// crafted object cannot make a reader allocate its length); `None`
    /// when it does not exist.
    ///
    /// # Errors
    /// `Io`.
    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>>;

    /// True when the object exists.
    ///
    /// # Errors
    /// `Io`.
    fn object_exists(&self, key: &str) -> Result<bool>;

    /// Creates or replaces an object atomically and durably.
    ///
    /// # Errors
    /// `Io`; the object then holds its old bytes (or does not exist).
    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()>;

    /// Creates an object only when no object of that name exists, atomically
    /// and durably (put-if-absent, as chunks): `O_EXCL` link on a directory,
    /// an exclusive create on RADOS, `If-None-Match: *` on S3. Returns
    /// false, writing nothing, when the object already existed. What ids
    /// and leases are claimed with, across processes and hosts.
    ///
    /// # Errors
    /// `Io`; the object then does not exist (or is another writer's).
    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool>;

    /// Deletes an object durably; returns false when it did not exist.
    ///
    /// # Errors
    /// `Io`.
    fn delete_object(&self, key: &str) -> Result<bool>;

    /// Names (without the prefix) of the objects under `prefix`, a folder
    /// such as `backups/`; temp objects are not listed.
    ///
    /// # Errors
    /// `Io`.
    fn list_objects(&self, prefix: &str) -> Result<Vec<String>>;

    /// Removes the temp objects of writes that never completed (staged
    /// chunks of dead writers, torn writes). Only safe while no writer
    /// runs: the caller holds the store lock exclusive.
    ///
    /// # Errors
    /// `Io`.
    fn remove_temp_files(&self) -> Result<usize>;

    /// Removes the temp objects a backup cleans up before it starts: at
    /// least the staged chunks of dead writers (the bulk of what a crash
    /// leaves). The default is [`Backend::remove_temp_files`]; a backend
    /// may leave small temp objects to it (GC removes them), as the
    /// directory backend leaves the `backups/.*` temp files of torn
    /// manifest and block map writes rather than list `backups/`, which
    /// grows with the number of backups, at every backup. Same locking as
    /// `remove_temp_files`.
    ///
    /// # Errors
    /// `Io`.
    fn remove_staged_temp_files(&self) -> Result<usize> {
        self.remove_temp_files()
    }

    // ---- locks -------------------------------------------------------

    /// Takes lock `name` (`store`, `gc`, `image-<name>`, ...): waits for
    /// it when `wait`, else returns `None` when someone else holds it.
    ///
    /// # Errors
    /// `Io`.
    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>>;

    /// Who holds lock `name` (host, process), for the message of a caller
    /// refused or kept waiting; `None` when unknown or free.
    ///
    /// # Errors
    /// `Io`.
    fn lock_holder(&self, name: &str) -> Result<Option<String>> {
        let _ = name;
        Ok(None)
    }

    // ---- fault injection ---------------------------------------------

    /// Fault injection ([`fault::FaultBackend`]): does what a
    /// [`Backend::put_chunk`] whose write fails after `keep` bytes does,
    /// leaving what such a write leaves (a partial temp object), and
    /// returns the error. The chunk must not become visible.
    fn put_chunk_torn(&self, id: &ChunkId, bytes: &[u8], keep: usize) -> Error {
        let _ = (bytes, keep);
        injected(self.location().join("chunks").join(id.to_hex()), "write", rustix::io::Errno::IO)
    }

    /// Fault injection: a [`Backend::put_object`] whose write fails after
    /// `keep` bytes. The object must keep its old bytes.
    fn put_object_torn(&self, key: &str, bytes: &[u8], keep: usize) -> Error {
        let _ = (bytes, keep);
        injected(self.object_name(key), "write", rustix::io::Errno::IO)
    }
}

/// An injected I/O error on `path`.
pub(crate) fn injected(path: PathBuf, op: &'static str, errno: rustix::io::Errno) -> Error {
    Error::Io { op, path, source: errno.into() }
}

macro_rules! forward_backend {
    ($ptr:ident) => {
impl<B: Backend + ?Sized> Backend for $ptr<B> {
    fn location(&self) -> &Path {
        (**self).location()
    }
    fn dir(&self) -> Option<&Path> {
        (**self).dir()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn object_name(&self, key: &str) -> PathBuf {
        (**self).object_name(key)
    }
    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        (**self).chunk_exists(id)
    }
    fn chunk_group_stamp(&self, prefix: u16) -> Result<Option<u128>> {
        (**self).chunk_group_stamp(prefix)
    }
    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        (**self).put_chunk(id, bytes)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn discard_pending(&self) {
        (**self).discard_pending()
    }
    fn staged_bytes(&self) -> u64 {
        (**self).staged_bytes()
    }
    fn sync_early(&self) -> Result<()> {
        (**self).sync_early()
    }
    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        (**self).get_chunk(id, out)
    }
    fn put_chunk_hot(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        (**self).put_chunk_hot(id, bytes)
    }
    fn get_chunk_hot(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        (**self).get_chunk_hot(id, out)
    }
    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
        (**self).list_chunks()
    }
    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        (**self).delete_chunk(id)
    }
    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        (**self).touch_chunk(id)
    }
    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        (**self).chunk_modified(id)
    }
    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        (**self).quarantine_chunk(id)
    }
    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        (**self).get_object(key, limit)
    }
    fn object_exists(&self, key: &str) -> Result<bool> {
        (**self).object_exists(key)
    }
    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        (**self).put_object(key, bytes)
    }
    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        (**self).create_object(key, bytes)
    }
    fn delete_object(&self, key: &str) -> Result<bool> {
        (**self).delete_object(key)
    }
    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        (**self).list_objects(prefix)
    }
    fn remove_temp_files(&self) -> Result<usize> {
        (**self).remove_temp_files()
    }
    fn remove_staged_temp_files(&self) -> Result<usize> {
        (**self).remove_staged_temp_files()
    }
    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        (**self).lock(name, mode, wait)
    }
    fn lock_holder(&self, name: &str) -> Result<Option<String>> {
        (**self).lock_holder(name)
    }
    fn put_chunk_torn(&self, id: &ChunkId, bytes: &[u8], keep: usize) -> Error {
        (**self).put_chunk_torn(id, bytes, keep)
    }
    fn put_object_torn(&self, key: &str, bytes: &[u8], keep: usize) -> Error {
        (**self).put_object_torn(key, bytes, keep)
    }
}
    };
}

// A boxed or shared backend is a backend too (a wrapper over a `Box<dyn
// Backend>`, a test that keeps a handle).
forward_backend!(Box);
forward_backend!(Arc);
