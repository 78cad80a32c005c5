//! The local directory store.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::blockmap::BlockMap;
use crate::chunk::{self, EncodedChunk};
use crate::error::{Error, Result};
use crate::format::{self, STORE_MARKER, STORE_VERSION};
use crate::manifest::Manifest;
use crate::{BackupId, ChunkId};

/// The store's own record of its format and settings (`blockvault-store.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreMeta {
    pub format: u32,
    /// Random id; the catalog records it to catch a catalog paired with the wrong store.
    pub uuid: String,
    pub created: String,
    /// Hash of chunk plaintexts.
    pub hash: String,
    /// Codec of chunk payloads.
    pub codec: String,
    /// Block size given to images that do not set their own.
    pub default_block_size: u32,
}

/// Options for [`Store::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub default_block_size: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { default_block_size: format::DEFAULT_BLOCK_SIZE }
    }
}

/// A content-addressed chunk store with the block maps and manifests of
/// every backup, in one directory.
pub struct Store {
    root: PathBuf,
    meta: StoreMeta,
    /// Chunks written to `tmp/` but not yet made durable and moved into
    /// `chunks/` (see [`Store::sync`]).
    pending: Mutex<Pending>,
    tmp_seq: AtomicU64,
    poisoned: AtomicBool,
}

/// Chunk files written to `tmp/`, waiting for the next flush.
#[derive(Default)]
struct Pending {
    /// (temp file, final path)
    files: Vec<(PathBuf, PathBuf)>,
    bytes: u64,
}

/// Pending chunk bytes that trigger a flush: bounds the data a crash can
/// leave in `tmp/` and makes new chunks visible to concurrent backups soon.
const FLUSH_PENDING_BYTES: u64 = 1 << 30;

/// A held lock; released on drop. On a read-only store a reader's lock
/// holds nothing (see [`Store::lock_shared_for_reading`]).
#[derive(Debug)]
pub struct StoreLock {
    _file: Option<File>,
}

fn fsync_dir(path: &Path) -> Result<()> {
    let d = File::open(path).map_err(|e| Error::io("open directory", path, e))?;
    d.sync_all().map_err(|e| Error::io("fsync directory", path, e))
}

/// Mode of every directory the store creates: private whatever the umask
/// (a store holds every byte of every image it backs up).
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates a directory with [`DIR_MODE`]; an existing one is left alone.
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r,
    }
}

/// Creates a new file exclusively (`O_EXCL`: never through a symlink or
/// into an existing file) with [`FILE_MODE`].
fn create_new_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path)
}

/// Writes `bytes` to `path` atomically and durably: a temp file beside it
/// (created exclusively under a random name), fsync, rename, fsync of the
/// directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("path has a parent");
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{:016x}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let res = (|| {
        let mut f = create_new_private(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    fsync_dir(dir)
}

/// Reads at most `limit + 1` bytes of a file: enough for a decoder to see
/// that it is larger than `limit`, never more, so a crafted (or sparse)
/// file cannot make a reader allocate its length.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)?.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io("read", path, e))
}

impl Store {
    /// Creates a new, empty store at `path` (the directory may exist if empty).
    ///
    /// # Errors
    /// `AlreadyExists` when `path` already holds a store; `Io` when it cannot be created.
    pub fn init(path: &Path, opts: &InitOptions) -> Result<Store> {
        format::check_block_size(opts.default_block_size)?;
        if path.join(STORE_MARKER).exists() {
            return Err(Error::AlreadyExists { path: path.to_path_buf() });
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        }
        create_private_dir(path).map_err(|e| Error::io("create directory", path, e))?;
        // an existing empty directory becomes private too
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE)).map_err(|e| Error::io("chmod", path, e))?;
        }
        for sub in ["chunks", "backups", "tmp", "locks"] {
            let p = path.join(sub);
            create_private_dir(&p).map_err(|e| Error::io("create directory", &p, e))?;
        }
        let uuid = format!("{:032x}", rand::random::<u128>());
        let meta = StoreMeta {
            format: STORE_VERSION,
            uuid,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            hash: "blake3".into(),
            codec: "zstd".into(),
            default_block_size: opts.default_block_size,
        };
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        write_atomic(&path.join(STORE_MARKER), &json)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        Store::open(path)
    }

    /// Opens an existing store.
    ///
    /// # Errors
    /// `NotAStore` when the marker file is missing, `UnsupportedVersion` for a newer format.
    pub fn open(path: &Path) -> Result<Store> {
        let marker = path.join(STORE_MARKER);
        let bytes = match fs::read(&marker) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::NotAStore { path: path.to_path_buf(), marker: STORE_MARKER })
            }
            Err(e) => return Err(Error::io("read", &marker, e)),
        };
        let meta: StoreMeta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::CorruptFile { path: marker.clone(), reason: e.to_string() })?;
        if meta.format != STORE_VERSION {
            return Err(Error::UnsupportedVersion { path: marker, found: meta.format, supported: STORE_VERSION });
        }
        Ok(Store {
            root: path.to_path_buf(),
            meta,
            pending: Mutex::new(Pending::default()),
            tmp_seq: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }

    // ---- locks -------------------------------------------------------

    fn lock_file(&self, name: &str, op: FlockOperation) -> Result<Option<StoreLock>> {
        let path = self.root.join("locks").join(name);
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| Error::io("open lock", &path, e))?;
        match rustix::fs::flock(f.as_fd(), op) {
            Ok(()) => Ok(Some(StoreLock { _file: Some(f) })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("lock", &path, e.into())),
        }
    }

    /// The store lock, shared: held by every backup, prune and restore.
    /// GC takes it exclusive for its sweep (see the crate docs).
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        Ok(self.lock_file("store.lock", FlockOperation::LockShared)?.expect("blocking lock"))
    }

    /// The store lock, shared, for an operation that only reads the store
    /// (list, restore, verify): on a store mounted read-only (a snapshot of
    /// a backup disk, a disaster-recovery copy) no lock can be taken and
    /// none is needed, since nothing can change it, so it takes none and
    /// says so, like restic's `--no-lock`.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened on a writable store.
    pub fn lock_shared_for_reading(&self) -> Result<StoreLock> {
        if self.is_read_only() {
            tracing::warn!(store = %self.root.display(), "store is read-only: not locking");
            return Ok(StoreLock { _file: None });
        }
        self.lock_shared()
    }

    /// True when the store's filesystem is mounted read-only.
    pub fn is_read_only(&self) -> bool {
        rustix::fs::statvfs(&self.root).is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    }

    /// The store lock, exclusive (blocking).
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        Ok(self.lock_file("store.lock", FlockOperation::LockExclusive)?.expect("blocking lock"))
    }

    /// The store lock, exclusive, without waiting: `None` when anyone holds it.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        self.lock_file("store.lock", FlockOperation::NonBlockingLockExclusive)
    }

    /// A named exclusive lock (e.g. one per image), without waiting:
    /// `None` when another process holds it. `name` must be a safe file name.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn try_lock_named(&self, name: &str) -> Result<Option<StoreLock>> {
        debug_assert!(!name.contains('/'));
        self.lock_file(&format!("{name}.lock"), FlockOperation::NonBlockingLockExclusive)
    }

    /// A named exclusive lock, waiting for it. `name` must be a safe file name.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn lock_named(&self, name: &str) -> Result<StoreLock> {
        debug_assert!(!name.contains('/'));
        Ok(self.lock_file(&format!("{name}.lock"), FlockOperation::LockExclusive)?.expect("blocking lock"))
    }

    /// Removes temp files left by crashed writers. Only safe while no other
    /// writer runs, so it takes the store lock exclusive without waiting and
    /// does nothing when it cannot.
    ///
    /// # Errors
    /// `Io` when a temp file cannot be removed.
    pub fn clean_tmp(&self) -> Result<usize> {
        let Some(guard) = self.try_lock_exclusive()? else { return Ok(0) };
        self.remove_temp_files(&guard)
    }

    /// Removes temp files left by crashed writers (`tmp/*` and the
    /// `backups/.*` temp files of atomic writes). `_exclusive` must be the
    /// store lock held exclusive: then no writer is running, so every temp
    /// file belongs to a dead one.
    ///
    /// # Errors
    /// `Io` when a temp file cannot be removed.
    pub fn remove_temp_files(&self, _exclusive: &StoreLock) -> Result<usize> {
        let dir = self.root.join("tmp");
        let mut n = 0;
        for e in fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))? {
            let e = e.map_err(|e| Error::io("read directory", &dir, e))?;
            fs::remove_file(e.path()).map_err(|err| Error::io("remove", e.path(), err))?;
            n += 1;
        }
        let bdir = self.root.join("backups");
        for e in fs::read_dir(&bdir).map_err(|e| Error::io("read directory", &bdir, e))? {
            let e = e.map_err(|e| Error::io("read directory", &bdir, e))?;
            if e.file_name().to_string_lossy().starts_with('.') {
                fs::remove_file(e.path()).map_err(|err| Error::io("remove", e.path(), err))?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ---- chunks ------------------------------------------------------

    /// Path of a chunk object: `chunks/<4 hex>/<64 hex>`.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.root.join("chunks").join(&h[..4]).join(h)
    }

    /// True when the store holds the chunk.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        let p = self.chunk_path(id);
        match fs::symlink_metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", &p, e)),
        }
    }

    /// Stores a chunk durably unless the store already has it; an existing
    /// chunk is never rewritten. Returns true when it was written.
    /// The chunk's directory entry is made durable by the next [`Store::sync`].
    ///
    /// After a failed write the store refuses further writes (it is poisoned):
    /// a half-done write must not be followed by a commit.
    ///
    /// # Errors
    /// `Io` on a failed write, fsync or rename; `Poisoned` after one.
    pub fn put_chunk(&self, chunk: &EncodedChunk) -> Result<bool> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Poisoned);
        }
        let res = self.put_chunk_inner(chunk);
        if res.is_err() {
            self.poisoned.store(true, Ordering::Relaxed);
        }
        res
    }

    fn put_chunk_inner(&self, chunk: &EncodedChunk) -> Result<bool> {
        let dest = self.chunk_path(&chunk.id);
        if self.has_chunk(&chunk.id)? {
            return Ok(false);
        }
        let dir = dest.parent().unwrap();
        if !dir.exists() {
            // made durable by the syncfs of the next flush
            create_private_dir(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}-{}-{}", std::process::id(), seq, chunk.id));
        let mut f = create_new_private(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&chunk.bytes).map_err(|e| Error::io("write", &tmp, e))?;
        // Starts writeback now (DONTNEED on dirty pages writes them out
        // without waiting), so the flush's syncfs finds little left to do.
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        drop(f);
        let flush = {
            let mut p = self.pending.lock().unwrap();
            p.files.push((tmp, dest));
            p.bytes += chunk.bytes.len() as u64;
            p.bytes >= FLUSH_PENDING_BYTES
        };
        if flush {
            self.flush_pending()?;
        }
        Ok(true)
    }

    /// Makes pending chunks durable, then moves them into `chunks/`:
    /// syncfs (every temp file's data is on disk), rename each into place
    /// (never over an existing chunk), syncfs (the renames are on disk).
    /// One filesystem sync per batch instead of one fsync per chunk: on
    /// disks where an fsync costs tens of milliseconds this is the
    /// difference between I/O-bound and fsync-bound backups. A chunk is
    /// visible in `chunks/` only once its bytes are durable.
    fn flush_pending(&self) -> Result<()> {
        let files = {
            let mut p = self.pending.lock().unwrap();
            p.bytes = 0;
            std::mem::take(&mut p.files)
        };
        if files.is_empty() {
            return Ok(());
        }
        let root = File::open(&self.root).map_err(|e| Error::io("open", &self.root, e))?;
        rustix::fs::syncfs(&root).map_err(|e| Error::io("syncfs", &self.root, e.into()))?;
        for (tmp, _) in &files {
            // The chunk's pages are clean now: drop them from the page cache.
            // A backup writes gigabytes it will not read back soon. Advice only.
            if let Ok(f) = File::open(tmp) {
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            }
        }
        for (tmp, dest) in &files {
            // NOREPLACE: a chunk written meanwhile by another process (another
            // image's backup with the same block) is never replaced.
            match rustix::fs::renameat_with(rustix::fs::CWD, tmp, rustix::fs::CWD, dest, rustix::fs::RenameFlags::NOREPLACE) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => fs::remove_file(tmp).map_err(|e| Error::io("remove", tmp, e))?,
                Err(e) => return Err(Error::io("rename", dest, e.into())),
            }
        }
        rustix::fs::syncfs(&root).map_err(|e| Error::io("syncfs", &self.root, e.into()))?;
        tracing::debug!(chunks = files.len(), "flush: new chunks durable and moved into chunks/");
        Ok(())
    }

    /// Removes the temp files of chunks not yet flushed (a backup that failed
    /// or was cancelled): nothing references them.
    pub fn discard_pending(&self) {
        let files = {
            let mut p = self.pending.lock().unwrap();
            p.bytes = 0;
            std::mem::take(&mut p.files)
        };
        for (tmp, _) in files {
            let _ = fs::remove_file(tmp);
        }
    }

    /// Makes every chunk written since the last call durable and visible in
    /// `chunks/`. Called before a block map that references them is written.
    ///
    /// # Errors
    /// `Io` when a sync or rename fails; the store is then poisoned.
    pub fn sync(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Poisoned);
        }
        let r = self.flush_pending();
        if r.is_err() {
            self.poisoned.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Reads a chunk's stored bytes (header and payload), unverified.
    ///
    /// # Errors
    /// `ChunkMissing` when absent, `Io` otherwise.
    pub fn read_chunk_raw(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        let p = self.chunk_path(id);
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::ChunkMissing { id: *id }),
            Err(e) => return Err(Error::io("open", &p, e)),
        };
        out.clear();
        // bounded: chunk::check_frame refuses what is longer than any chunk
        (&mut f).take(format::MAX_CHUNK_OBJECT_LEN + 1).read_to_end(out).map_err(|e| Error::io("read", &p, e))?;
        // Restores and verifies read each chunk about once: keep the page
        // cache for the host's working set. Advice only.
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        Ok(())
    }

    /// Reads, checks and decompresses a chunk into `out`; `scratch` holds the
    /// stored bytes. Never returns data that does not hash to `id`.
    ///
    /// # Errors
    /// `ChunkMissing`, `CorruptChunk` or `Io`.
    pub fn load_chunk(&self, id: &ChunkId, scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<()> {
        self.read_chunk_raw(id, scratch)?;
        chunk::decode_into(id, scratch, out)
    }

    /// Every chunk id in the store, with its stored size and mtime.
    ///
    /// # Errors
    /// `Io` when a directory cannot be read.
    pub fn list_chunks(&self) -> Result<Vec<(ChunkId, u64, std::time::SystemTime)>> {
        let mut out = Vec::new();
        let cdir = self.root.join("chunks");
        for shard in fs::read_dir(&cdir).map_err(|e| Error::io("read directory", &cdir, e))? {
            let shard = shard.map_err(|e| Error::io("read directory", &cdir, e))?;
            let sp = shard.path();
            if !sp.is_dir() {
                continue;
            }
            for ent in fs::read_dir(&sp).map_err(|e| Error::io("read directory", &sp, e))? {
                let ent = ent.map_err(|e| Error::io("read directory", &sp, e))?;
                let name = ent.file_name();
                let Ok(id) = name.to_string_lossy().parse::<ChunkId>() else { continue };
                let md = ent.metadata().map_err(|e| Error::io("stat", ent.path(), e))?;
                out.push((id, md.len(), md.modified().map_err(|e| Error::io("stat", ent.path(), e))?));
            }
        }
        Ok(out)
    }

    /// Removes a chunk (GC only).
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn remove_chunk(&self, id: &ChunkId) -> Result<()> {
        let p = self.chunk_path(id);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &p, e)),
        }
    }

    /// Marks a chunk as recently used (updates its mtime), so that a GC
    /// running concurrently with the backup that reuses it keeps it.
    ///
    /// # Errors
    /// `ChunkMissing` when it vanished, `Io` otherwise.
    pub fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        let p = self.chunk_path(id);
        let f = match File::options().append(true).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::ChunkMissing { id: *id }),
            Err(e) => return Err(Error::io("open", &p, e)),
        };
        f.set_modified(std::time::SystemTime::now()).map_err(|e| Error::io("touch", &p, e))
    }

    /// A chunk's mtime, or `None` when the store does not hold it.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn chunk_modified(&self, id: &ChunkId) -> Result<Option<std::time::SystemTime>> {
        let p = self.chunk_path(id);
        match fs::symlink_metadata(&p) {
            Ok(md) => Ok(Some(md.modified().map_err(|e| Error::io("stat", &p, e))?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &p, e)),
        }
    }

    /// Moves a corrupt chunk aside to `<chunk path>.bad` (replacing an older
    /// `.bad` copy), so that the next backup that has its data writes a good
    /// copy instead of deduplicating against the bad one. A `.bad` file is
    /// never read, listed or removed by blockvault; it is kept for
    /// inspection. Returns the new path, or `None` when the chunk is absent.
    ///
    /// Callers hold the store lock exclusive (see the crate docs).
    ///
    /// # Errors
    /// `Io` when the rename or the directory fsync fails.
    pub fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        let p = self.chunk_path(id);
        let bad = p.with_file_name(format!("{id}.bad"));
        match fs::rename(&p, &bad) {
            Ok(()) => {
                fsync_dir(p.parent().expect("chunk path has a parent"))?;
                Ok(Some(bad))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("rename", &p, e)),
        }
    }

    // ---- backups -----------------------------------------------------

    fn backup_path(&self, id: BackupId, ext: &str) -> PathBuf {
        self.root.join("backups").join(format!("{:012}.{ext}", id.0))
    }

    /// Commits a backup to the store: makes pending chunks durable, then
    /// writes the block map, then the manifest (each atomically). Once this
    /// returns, the backup is restorable from the store alone.
    ///
    /// # Errors
    /// `BackupExists` when the id is taken; `Io` on any failed write.
    pub fn write_backup(&self, manifest: &mut Manifest, map: &BlockMap) -> Result<()> {
        let mpath = self.backup_path(manifest.id, "json");
        if mpath.exists() {
            return Err(Error::BackupExists { id: manifest.id.0 });
        }
        self.sync()?;
        let enc = map.encode();
        manifest.blockmap_blake3 = blake3::hash(&enc).to_hex().to_string();
        manifest.image_size = map.image_size();
        manifest.block_size = map.block_size();
        write_atomic(&self.backup_path(manifest.id, "blockmap"), &enc)?;
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        write_atomic(&mpath, &json)
    }

    /// True when the store holds the backup's manifest.
    pub fn has_backup(&self, id: BackupId) -> bool {
        self.backup_path(id, "json").exists()
    }

    /// Reads a backup's manifest.
    ///
    /// # Errors
    /// `BackupMissing`, `CorruptFile` or `Io`.
    pub fn read_manifest(&self, id: BackupId) -> Result<Manifest> {
        let p = self.backup_path(id, "json");
        let bytes = match read_bounded(&p, format::MAX_MANIFEST_LEN) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::BackupMissing { id: id.0 }),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        let m = Manifest::parse(&p, &bytes)?;
        if m.id != id {
            return Err(Error::CorruptFile { path: p, reason: format!("manifest names backup {}", m.id) });
        }
        m.check().map_err(|reason| Error::CorruptFile { path: p, reason })?;
        Ok(m)
    }

    /// Reads a backup's block map and checks it against the manifest.
    ///
    /// # Errors
    /// `BackupMissing`, `CorruptFile` or `Io`.
    pub fn read_blockmap(&self, manifest: &Manifest) -> Result<BlockMap> {
        let p = self.backup_path(manifest.id, "blockmap");
        // the manifest's geometry bounds the read (checked against the map below)
        let len = crate::blockmap::encoded_len(manifest.image_size, manifest.block_size)
            .map_err(|reason| Error::CorruptFile { path: self.backup_path(manifest.id, "json"), reason })?;
        let bytes = match read_bounded(&p, len) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::BackupMissing { id: manifest.id.0 }),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        if blake3::hash(&bytes).to_hex().as_str() != manifest.blockmap_blake3 {
            return Err(Error::CorruptFile { path: p, reason: "block map does not match its manifest's checksum".into() });
        }
        let map = BlockMap::decode(&p, &bytes)?;
        if map.image_size() != manifest.image_size || map.block_size() != manifest.block_size {
            return Err(Error::CorruptFile { path: p, reason: "block map geometry differs from its manifest".into() });
        }
        Ok(map)
    }

    /// Ids of every backup whose manifest is in the store, ascending.
    ///
    /// # Errors
    /// `Io` when the directory cannot be read.
    pub fn list_backups(&self) -> Result<Vec<BackupId>> {
        let dir = self.root.join("backups");
        let mut ids = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))? {
            let e = e.map_err(|e| Error::io("read directory", &dir, e))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".json") {
                if let Ok(n) = stem.parse::<u64>() {
                    ids.push(BackupId(n));
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Removes a backup from the store: manifest first (so a crash leaves at
    /// worst an unreferenced block map), then the block map. Its chunks stay
    /// until GC.
    ///
    /// # Errors
    /// `Io` on a failed removal.
    pub fn remove_backup(&self, id: BackupId) -> Result<()> {
        for ext in ["json", "blockmap", "protected", "verify"] {
            let p = self.backup_path(id, ext);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &p, e)),
            }
        }
        fsync_dir(&self.root.join("backups"))
    }

    /// Protects a backup from pruning, or lifts the protection, by writing
    /// or removing its empty `backups/<id>.protected` marker. The catalog
    /// keeps the same flag; the marker lets a rebuilt catalog keep it.
    ///
    /// # Errors
    /// `BackupMissing` when the store does not hold the backup; `Io`.
    pub fn set_protected(&self, id: BackupId, protected: bool) -> Result<()> {
        let p = self.backup_path(id, "protected");
        if protected {
            if !self.has_backup(id) {
                return Err(Error::BackupMissing { id: id.0 });
            }
            return write_atomic(&p, b"");
        }
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.root.join("backups")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &p, e)),
        }
    }

    /// True when the backup carries a protection marker.
    pub fn is_protected(&self, id: BackupId) -> bool {
        self.backup_path(id, "protected").exists()
    }

    /// Records the result of a verify in `backups/<id>.verify` (atomically).
    /// A backup whose manifest is gone (pruned meanwhile) gets no marker.
    ///
    /// # Errors
    /// `Io`.
    pub fn set_verify_mark(&self, id: BackupId, mark: &crate::VerifyMark) -> Result<()> {
        if !self.has_backup(id) {
            return Ok(());
        }
        let json = serde_json::to_vec(mark).expect("verify mark serialises");
        write_atomic(&self.backup_path(id, "verify"), &json)
    }

    /// The result of the last verify of a backup; `None` when never verified.
    ///
    /// # Errors
    /// `CorruptFile` for a marker that does not parse, `Io`.
    pub fn verify_mark(&self, id: BackupId) -> Result<Option<crate::VerifyMark>> {
        let p = self.backup_path(id, "verify");
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::CorruptFile { path: p, reason: e.to_string() })
    }

    /// A manifest standing in for an unreadable one, so that a backup whose
    /// manifest is corrupt but whose block map is intact can be restored by
    /// id: the block map is checked by its own header and checksum and
    /// against the geometry the catalog recorded (`image_size`,
    /// `block_size`). Stats and RBD geometry are unknown (defaults).
    ///
    /// # Errors
    /// `BackupMissing` without a block map, `CorruptFile` when it does not
    /// decode or its geometry differs, `Io`.
    pub fn manifest_from_blockmap(
        &self,
        id: BackupId,
        image: &str,
        source: &str,
        image_size: u64,
        block_size: u32,
    ) -> Result<Manifest> {
        let p = self.backup_path(id, "blockmap");
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::BackupMissing { id: id.0 }),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        let map = BlockMap::decode(&p, &bytes)?;
        if map.image_size() != image_size || map.block_size() != block_size {
            return Err(Error::CorruptFile {
                path: p,
                reason: format!(
                    "block map holds {} bytes in {}-byte blocks, the catalog {image_size} in {block_size}",
                    map.image_size(),
                    map.block_size()
                ),
            });
        }
        Ok(Manifest {
            format: format::MANIFEST_VERSION,
            id,
            image: image.into(),
            source: source.into(),
            created: String::new(),
            finished: String::new(),
            parent: None,
            image_size,
            block_size,
            blockmap_blake3: blake3::hash(&bytes).to_hex().to_string(),
            snapshot: None,
            stats: Default::default(),
            rbd: None,
        })
    }

    /// Reads the whole of a small metadata file relative to the store root.
    ///
    /// # Errors
    /// `Io`.
    pub fn read_meta_file(&self, rel: &str) -> Result<Vec<u8>> {
        read_file(&self.root.join(rel))
    }
}
