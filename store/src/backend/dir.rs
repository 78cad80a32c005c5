//! The directory backend: the store as a directory of files, the layout
//! described in the crate docs. Keys map to paths under the root
//! (`backups/000000000001.json`), chunks to `chunks/<4 hex>/<64 hex>`.
//!
//! Chunk writes are batched: each goes to a temp file in `tmp/`, and a
//! flush (every [`FLUSH_PENDING_BYTES`] of new chunks, and at
//! [`Backend::sync`]) does one `syncfs`, renames every temp file into
//! `chunks/` (never over an existing chunk), and one more `syncfs`. A chunk
//! is in `chunks/` only once its bytes are on disk, and a write that failed
//! half-way is never renamed: its temp file stays in `tmp/` until
//! [`Backend::remove_temp_files`].

use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::{Backend, ChunkEntry, LockMode, StoreLock};
use crate::error::{Error, Result};
use crate::ChunkId;

/// Pending chunk bytes that trigger a flush: bounds the data a crash can
/// leave in `tmp/` and makes new chunks visible to concurrent backups soon.
pub const FLUSH_PENDING_BYTES: u64 = 1 << 30;

/// A store directory.
pub struct DirBackend {
    root: PathBuf,
    /// Chunks written to `tmp/` but not yet made durable and moved into
    /// `chunks/`.
    pending: Mutex<Pending>,
    tmp_seq: AtomicU64,
    /// `chunks/` and `tmp/`, opened on first use (`O_PATH`): chunk files are
    /// looked up relative to them, two path components instead of the
    /// root's whole path for each of the hundreds of thousands of chunks a
    /// backup at small blocks checks (the kernel's path walk was a fifth of
    /// an incremental's CPU time).
    chunks_dir: OnceLock<OwnedFd>,
    tmp_dir: OnceLock<OwnedFd>,
    /// `chunks/` is on a filesystem whose directory ctimes the chunk group
    /// stamps can rely on (see [`stamps_trusted_on`]); asked once.
    stamps_trusted: OnceLock<bool>,
    /// syncfs calls made, see [`DirBackend::syncfs_calls`]
    syncfs_calls: AtomicU64,
    /// held by the flush in progress
    flushing: Mutex<()>,
}

/// Chunk files written to `tmp/`, waiting for the next flush.
#[derive(Default)]
struct Pending {
    files: Vec<PendingChunk>,
    bytes: u64,
}

/// A chunk written to `tmp/`.
struct PendingChunk {
    /// name in `tmp/`
    tmp: CString,
    id: ChunkId,
    /// read again soon (an index chunk): its pages stay in the page cache
    hot: bool,
}

/// A chunk's name relative to `chunks/`, `<4 hex>/<64 hex>`, NUL-terminated.
struct ChunkName([u8; 70]);

impl ChunkName {
    fn new(id: &ChunkId) -> ChunkName {
        let mut b = [0u8; 70];
        hex::encode_to_slice(id.as_bytes(), &mut b[5..69]).expect("32 bytes are 64 hex digits");
        b.copy_within(5..9, 0);
        b[4] = b'/';
        ChunkName(b)
    }

    fn path(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.0).expect("one NUL, at the end")
    }

    /// The shard directory's name, `<4 hex>`.
    fn shard(&self) -> &str {
        std::str::from_utf8(&self.0[..4]).expect("hex digits")
    }
}

/// How long a shard directory's ctime must lie in the past before
/// [`DirBackend::chunk_group_stamp`] vouches for it: far more than a
/// filesystem clock's tick (1–10 ms), and than a small clock adjustment.
const STAMP_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Filesystems (`statfs` magic) whose directory ctime moves with every
/// entry added or removed, as seen by every process of the host: ext2/3/4,
/// XFS, Btrfs, tmpfs, ZFS, F2FS. Elsewhere (NFS with its attribute cache,
/// FUSE filesystems, overlays) the stamps are not used.
fn stamps_trusted_on(fs_type: i64) -> bool {
    matches!(fs_type, 0xEF53 | 0x5846_5342 | 0x9123_683E | 0x0102_1994 | 0x2FC1_2FC1 | 0xF2F5_2010)
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

fn fsync_dir(path: &Path) -> Result<()> {
    let d = File::open(path).map_err(|e| Error::io("open directory", path, e))?;
    d.sync_all().map_err(|e| Error::io("fsync directory", path, e))
}

/// Temp file of an atomic write of `path`: a dot file beside it, under a
/// random name (created exclusively).
fn atomic_tmp(path: &Path) -> PathBuf {
    let dir = path.parent().expect("path has a parent");
    dir.join(format!(
        ".{}.tmp.{}.{:016x}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Writes `bytes` to `path` atomically and durably: a temp file beside it,
/// fsync, rename, fsync of the directory. With `tear`, the write stops
/// after that many bytes and fails, as a full disk would make it.
fn write_atomic(path: &Path, bytes: &[u8], tear: Option<usize>) -> Result<()> {
    let dir = path.parent().expect("path has a parent");
    let tmp = atomic_tmp(path);
    let res = (|| {
        let mut f = create_new_private(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        write_maybe_torn(&mut f, &tmp, bytes, tear)?;
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

fn write_maybe_torn(f: &mut File, path: &Path, bytes: &[u8], tear: Option<usize>) -> Result<()> {
    match tear {
        None => f.write_all(bytes).map_err(|e| Error::io("write", path, e)),
        Some(keep) => {
            f.write_all(&bytes[..keep.min(bytes.len())]).map_err(|e| Error::io("write", path, e))?;
            Err(super::injected(path.to_path_buf(), "write", rustix::io::Errno::NOSPC))
        }
    }
}

impl DirBackend {
    /// The store directory at `root`; nothing is read or created yet.
    pub fn new(root: &Path) -> DirBackend {
        DirBackend {
            root: root.to_path_buf(),
            pending: Mutex::new(Pending::default()),
            tmp_seq: AtomicU64::new(0),
            chunks_dir: OnceLock::new(),
            tmp_dir: OnceLock::new(),
            stamps_trusted: OnceLock::new(),
            syncfs_calls: AtomicU64::new(0),
            flushing: Mutex::new(()),
        }
    }

    /// `sub` of the root, opened once (`O_PATH`) and kept in `cell`.
    fn subdir<'a>(&self, cell: &'a OnceLock<OwnedFd>, sub: &str) -> std::result::Result<BorrowedFd<'a>, Errno> {
        if let Some(fd) = cell.get() {
            return Ok(fd.as_fd());
        }
        let fd = rustix::fs::open(self.root.join(sub), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        // a racing thread's fd wins; this one is closed
        let _ = cell.set(fd);
        Ok(cell.get().expect("just set").as_fd())
    }

    fn chunks_fd(&self) -> std::result::Result<BorrowedFd<'_>, Errno> {
        self.subdir(&self.chunks_dir, "chunks")
    }

    fn tmp_fd(&self) -> std::result::Result<BorrowedFd<'_>, Errno> {
        self.subdir(&self.tmp_dir, "tmp")
    }

    /// Creates the directory and its subdirectories (it may exist if
    /// empty), and makes its entry in the parent durable.
    ///
    /// # Errors
    /// `Io`.
    pub fn create_layout(&self) -> Result<()> {
        let path = &self.root;
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
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
        Ok(())
    }

    /// Path of a chunk object: `chunks/<4 hex>/<64 hex>`.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.root.join("chunks").join(&h[..4]).join(h)
    }

    fn put_chunk_inner(&self, id: &ChunkId, bytes: &[u8], tear: Option<usize>, hot: bool) -> Result<bool> {
        if self.chunk_exists(id)? {
            return Ok(false);
        }
        // The chunk's shard directory, made now, in the writer thread, while
        // the pipeline still reads (a lookup per new chunk, a mkdir when its
        // shard is new): made at flush time instead, when a rename found
        // it missing, the mkdirs of a small store's new shards took ~100 µs
        // each on the commit's path (68-103 ms for 880 chunks of a 1 GiB
        // image). Durable with the renames, by the flush's last syncfs.
        let chunks_dir = self.chunks_fd().map_err(|e| Error::io("open directory", &self.root.join("chunks"), e.into()))?;
        let dest = ChunkName::new(id);
        // looked up first: a lookup walks the dentry cache without a lock,
        // a mkdir takes chunks/'s lock exclusively even when the shard exists
        if rustix::fs::accessat(chunks_dir, dest.shard(), rustix::fs::Access::EXISTS, AtFlags::SYMLINK_NOFOLLOW).is_err() {
            match rustix::fs::mkdirat(chunks_dir, dest.shard(), Mode::from_raw_mode(DIR_MODE)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(Error::io("create directory", &self.root.join("chunks").join(dest.shard()), e.into())),
            }
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(format!("{}-{}-{}", std::process::id(), seq, id.to_hex())).expect("no NUL in a temp name");
        let tmp_path = || self.root.join("tmp").join(name.to_string_lossy().as_ref());
        let tmp_dir = self.tmp_fd().map_err(|e| Error::io("open directory", &self.root.join("tmp"), e.into()))?;
        // O_EXCL: never through a symlink or into an existing file
        let fd = rustix::fs::openat(
            tmp_dir,
            name.as_c_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| Error::io("create", &tmp_path(), e.into()))?;
        let mut f = File::from(fd);
        // A failed write leaves its temp file out of `pending`: it is never
        // renamed into chunks/.
        write_maybe_torn(&mut f, &tmp_path(), bytes, tear)?;
        if !hot {
            // Starts writeback now (DONTNEED on dirty pages writes them out
            // without waiting), so the flush's syncfs finds little left to do.
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        drop(f);
        let flush = {
            let mut p = self.pending.lock().unwrap();
            p.files.push(PendingChunk { tmp: name, id: *id, hot });
            p.bytes += bytes.len() as u64;
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
        self.flush_pending_as(true)
    }

    /// [`DirBackend::flush_pending`]; without `rename_durable` (an early
    /// flush, while the backup still writes), the last syncfs is left out.
    /// A chunk renamed into `chunks/` whose rename is not durable yet is
    /// safe to reference: its bytes are durable, and every commit syncs
    /// the whole filesystem first ([`Backend::sync`] always syncs once,
    /// even with nothing of its own staged), which makes the rename
    /// durable before any block map that names the chunk. A crash before
    /// that leaves the chunk in `tmp/`, referenced by nothing.
    fn flush_pending_as(&self, rename_durable: bool) -> Result<()> {
        // one flush at a time: a sync that returns while another thread's
        // flush still renames the chunks that flush took would let a block
        // map name chunks not yet in `chunks/`
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let files = {
            let mut p = self.pending.lock().unwrap();
            p.bytes = 0;
            std::mem::take(&mut p.files)
        };
        if files.is_empty() && !rename_durable {
            return Ok(());
        }
        let root = File::open(&self.root).map_err(|e| Error::io("open", &self.root, e))?;
        if files.is_empty() {
            // Nothing of ours to move, but a sync before a commit still
            // syncs once: chunks this handle's early flushes, or another
            // process, made visible may not be durable yet, and the commit
            // may reference them (the block map's own fsync covers no
            // other file's rename on every filesystem, btrfs's among them).
            return self.syncfs(&root);
        }
        let t0 = std::time::Instant::now();
        self.syncfs(&root)?;
        let sync1 = t0.elapsed().as_millis() as u64;
        let tmp_dir = self.tmp_fd().map_err(|e| Error::io("open directory", &self.root.join("tmp"), e.into()))?;
        let chunks_dir = self.chunks_fd().map_err(|e| Error::io("open directory", &self.root.join("chunks"), e.into()))?;
        for c in files.iter().filter(|c| !c.hot) {
            // The chunk's pages are clean now: drop them from the page cache.
            // A backup writes gigabytes it will not read back soon. Advice only.
            if let Ok(fd) = rustix::fs::openat(tmp_dir, c.tmp.as_c_str(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
                let _ = rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::DontNeed);
            }
        }
        for c in &files {
            let dest = ChunkName::new(&c.id);
            // NOREPLACE: a chunk written meanwhile by another process (another
            // image's backup with the same block) is never replaced.
            let rename = || rustix::fs::renameat_with(tmp_dir, c.tmp.as_c_str(), chunks_dir, dest.path(), rustix::fs::RenameFlags::NOREPLACE);
            let mut res = rename();
            if res == Err(Errno::NOENT) && rustix::fs::accessat(tmp_dir, c.tmp.as_c_str(), rustix::fs::Access::EXISTS, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                // the chunk's shard directory went missing since the put
                // (made durable by the syncfs below, with the renames)
                match rustix::fs::mkdirat(chunks_dir, dest.shard(), Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(Error::io("create directory", &self.root.join("chunks").join(dest.shard()), e.into())),
                }
                res = rename();
            }
            match res {
                Ok(()) => {}
                Err(Errno::EXIST) => rustix::fs::unlinkat(tmp_dir, c.tmp.as_c_str(), AtFlags::empty())
                    .map_err(|e| Error::io("remove", &self.root.join("tmp").join(c.tmp.to_string_lossy().as_ref()), e.into()))?,
                Err(e) => return Err(Error::io("rename", &self.chunk_path(&c.id), e.into())),
            }
        }
        let renamed = t0.elapsed().as_millis() as u64;
        if rename_durable {
            self.syncfs(&root)?;
        }
        let ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(chunks = files.len(), sync1_ms = sync1, rename_ms = renamed - sync1, sync2_ms = ms - renamed, early = !rename_durable, "flush: new chunks durable and moved into chunks/");
        Ok(())
    }

    fn syncfs(&self, root: &File) -> Result<()> {
        self.syncfs_calls.fetch_add(1, Ordering::Relaxed);
        rustix::fs::syncfs(root).map_err(|e| Error::io("syncfs", &self.root, e.into()))
    }

    /// Filesystem syncs this handle made (for tests and diagnostics).
    pub fn syncfs_calls(&self) -> u64 {
        self.syncfs_calls.load(Ordering::Relaxed)
    }

    /// Reads a chunk file; unless `hot`, its pages are dropped from the page
    /// cache afterwards (advice only).
    fn read_chunk(&self, id: &ChunkId, out: &mut Vec<u8>, hot: bool) -> Result<()> {
        let dir = match self.chunks_fd() {
            Ok(d) => d,
            Err(Errno::NOENT) => return Err(Error::ChunkMissing { id: *id }),
            Err(e) => return Err(Error::io("open directory", &self.root.join("chunks"), e.into())),
        };
        let name = ChunkName::new(id);
        let mut f = match rustix::fs::openat(dir, name.path(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT) => return Err(Error::ChunkMissing { id: *id }),
            Err(e) => return Err(Error::io("open", &self.chunk_path(id), e.into())),
        };
        out.clear();
        // bounded: chunk::check_frame refuses what is longer than any chunk
        (&mut f)
            .take(crate::format::MAX_CHUNK_OBJECT_LEN + 1)
            .read_to_end(out)
            .map_err(|e| Error::io("read", &self.chunk_path(id), e))?;
        if !hot {
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
        Ok(())
    }

    fn lock_file(&self, name: &str, op: FlockOperation) -> Result<Option<StoreLock>> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
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
            Ok(()) => Ok(Some(StoreLock::new(f))),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("lock", &path, e.into())),
        }
    }
}

impl Backend for DirBackend {
    fn location(&self) -> &Path {
        &self.root
    }

    fn dir(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn is_read_only(&self) -> bool {
        rustix::fs::statvfs(&self.root).is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    }

    /// The shard directory `chunks/<4 hex>` is the group: its inode and
    /// ctime, hashed. A directory's ctime moves on every entry added,
    /// removed or renamed over, and cannot be set back by `utimes`; a
    /// recreated directory is another inode. A ctime within
    /// [`STAMP_SETTLE`] of now (or ahead of it) is not trusted: a change in
    /// the same clock tick as a read would leave it equal.
    fn chunk_group_stamp(&self, prefix: u16) -> Result<Option<u128>> {
        let trusted = *self.stamps_trusted.get_or_init(|| {
            let chunks = self.root.join("chunks");
            let fs_type = rustix::fs::statfs(&chunks).map(|s| s.f_type as i64).ok();
            let trusted = fs_type.is_some_and(stamps_trusted_on);
            if !trusted {
                tracing::debug!(store = %self.root.display(), fs_type = ?fs_type.map(|t| format!("{t:#x}")),
                    "chunk shard stamps not used on this filesystem: every chunk is looked up");
            }
            trusted
        });
        if !trusted {
            return Ok(None);
        }
        let dir = match self.chunks_fd() {
            Ok(d) => d,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Error::io("open directory", &self.root.join("chunks"), e.into())),
        };
        let mut name = [0u8; 5];
        for (i, c) in name[..4].iter_mut().enumerate() {
            *c = b"0123456789abcdef"[usize::from(prefix >> (12 - 4 * i)) & 0xf];
        }
        let name = CStr::from_bytes_with_nul(&name).expect("one NUL, at the end");
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Error::io("stat", &self.root.join("chunks").join(format!("{prefix:04x}")), e.into())),
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
            return Ok(None);
        }
        let ctime = std::time::UNIX_EPOCH + std::time::Duration::new(st.st_ctime as u64, st.st_ctime_nsec as u32);
        if st.st_ctime < 0 || ctime + STAMP_SETTLE > SystemTime::now() {
            return Ok(None);
        }
        let mut h = blake3::Hasher::new();
        for v in [st.st_dev as u64, st.st_ino as u64, st.st_ctime as u64, st.st_ctime_nsec as u64, st.st_mtime as u64, st.st_mtime_nsec as u64] {
            h.update(&v.to_le_bytes());
        }
        let stamp = u128::from_le_bytes(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"));
        Ok(Some(stamp.max(1)))
    }

    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        let dir = match self.chunks_fd() {
            Ok(d) => d,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(Error::io("open directory", &self.root.join("chunks"), e.into())),
        };
        let name = ChunkName::new(id);
        // faccessat2: a path lookup without filling a stat buffer (the
        // parent check of an incremental at small blocks makes one per
        // block). Any other answer (a kernel before 5.8 has no faccessat2)
        // is asked again of lstat, which also names a real error.
        match rustix::fs::accessat(dir, name.path(), rustix::fs::Access::EXISTS, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(()) => return Ok(true),
            Err(Errno::NOENT) => return Ok(false),
            Err(_) => {}
        }
        match rustix::fs::statat(dir, name.path(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(Error::io("stat", &self.chunk_path(id), e.into())),
        }
    }

    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        self.put_chunk_inner(id, bytes, None, false)
    }

    fn put_chunk_hot(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        self.put_chunk_inner(id, bytes, None, true)
    }

    fn sync(&self) -> Result<()> {
        self.flush_pending()
    }

    fn staged_bytes(&self) -> u64 {
        self.pending.lock().unwrap().bytes
    }

    fn sync_early(&self) -> Result<()> {
        self.flush_pending_as(false)
    }

    fn discard_pending(&self) {
        let files = {
            let mut p = self.pending.lock().unwrap();
            p.bytes = 0;
            std::mem::take(&mut p.files)
        };
        let Ok(tmp_dir) = self.tmp_fd() else { return };
        for c in files {
            let _ = rustix::fs::unlinkat(tmp_dir, c.tmp.as_c_str(), AtFlags::empty());
        }
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        // Restores and verifies read each chunk about once: keep the page
        // cache for the host's working set.
        self.read_chunk(id, out, false)
    }

    fn get_chunk_hot(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.read_chunk(id, out, true)
    }

    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
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

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        let p = self.chunk_path(id);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &p, e)),
        }
    }

    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        let p = self.chunk_path(id);
        let f = match File::options().append(true).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::ChunkMissing { id: *id }),
            Err(e) => return Err(Error::io("open", &p, e)),
        };
        f.set_modified(SystemTime::now()).map_err(|e| Error::io("touch", &p, e))
    }

    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        let p = self.chunk_path(id);
        match fs::symlink_metadata(&p) {
            Ok(md) => Ok(Some(md.modified().map_err(|e| Error::io("stat", &p, e))?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &p, e)),
        }
    }

    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
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

    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let p = self.root.join(key);
        match read_bounded(&p, limit) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &p, e)),
        }
    }

    fn object_exists(&self, key: &str) -> Result<bool> {
        let p = self.root.join(key);
        match fs::metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", &p, e)),
        }
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.root.join(key), bytes, None)
    }

    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        // complete in a temp file first, then hard-link: link(2) fails with
        // EEXIST instead of replacing, so the name appears complete or not at all
        let path = self.root.join(key);
        let tmp = atomic_tmp(&path);
        let res = (|| {
            let mut f = create_new_private(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
            write_maybe_torn(&mut f, &tmp, bytes, None)?;
            f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
            drop(f);
            match fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(Error::io("link", &path, e)),
            }
        })();
        let _ = fs::remove_file(&tmp);
        let created = res?;
        if created {
            fsync_dir(path.parent().expect("key has a parent"))?;
        }
        Ok(created)
    }

    fn delete_object(&self, key: &str) -> Result<bool> {
        let p = self.root.join(key);
        match fs::remove_file(&p) {
            Ok(()) => {
                fsync_dir(p.parent().expect("key has a parent"))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &p, e)),
        }
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.root.join(prefix);
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))? {
            let e = e.map_err(|e| Error::io("read directory", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // dot files are the temp files of atomic writes
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn remove_temp_files(&self) -> Result<usize> {
        let mut n = self.remove_staged_temp_files()?;
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

    fn remove_staged_temp_files(&self) -> Result<usize> {
        let dir = self.root.join("tmp");
        let mut n = 0;
        for e in fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))? {
            let e = e.map_err(|e| Error::io("read directory", &dir, e))?;
            fs::remove_file(e.path()).map_err(|err| Error::io("remove", e.path(), err))?;
            n += 1;
        }
        Ok(n)
    }

    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        debug_assert!(!name.contains('/'));
        let op = match (mode, wait) {
            (LockMode::Shared, true) => FlockOperation::LockShared,
            (LockMode::Shared, false) => FlockOperation::NonBlockingLockShared,
            (LockMode::Exclusive, true) => FlockOperation::LockExclusive,
            (LockMode::Exclusive, false) => FlockOperation::NonBlockingLockExclusive,
        };
        self.lock_file(name, op)
    }

    fn put_chunk_torn(&self, id: &ChunkId, bytes: &[u8], keep: usize) -> Error {
        match self.put_chunk_inner(id, bytes, Some(keep), false) {
            Err(e) => e,
            // the chunk was already there: nothing was written, so tear nothing
            Ok(_) => super::injected(self.chunk_path(id), "write", rustix::io::Errno::NOSPC),
        }
    }

    fn put_object_torn(&self, key: &str, bytes: &[u8], keep: usize) -> Error {
        match write_atomic(&self.root.join(key), bytes, Some(keep)) {
            Err(e) => e,
            Ok(()) => super::injected(self.root.join(key), "write", rustix::io::Errno::NOSPC),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first: [u8; 2], last: u8) -> ChunkId {
        let mut b = [0u8; 32];
        b[..2].copy_from_slice(&first);
        b[31] = last;
        ChunkId(b)
    }

    #[test]
    fn stamps_only_on_local_filesystems() {
        assert!(stamps_trusted_on(0xEF53) && stamps_trusted_on(0x5846_5342), "ext4, XFS");
        assert!(!stamps_trusted_on(0x6969) && !stamps_trusted_on(0x6573_5546) && !stamps_trusted_on(0x794C_7630), "NFS, FUSE, overlayfs");
    }

    /// An early sync makes the staged chunks visible and leaves the syncfs
    /// of their renames to the next sync, which therefore syncs even with
    /// nothing staged; an early sync with nothing staged does nothing.
    #[test]
    fn early_sync_shows_chunks_and_the_next_sync_makes_their_renames_durable() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        b.create_layout().unwrap();
        let (one, two) = (id([0x10, 0x01], 1), id([0x20, 0x02], 2));
        assert!(b.put_chunk(&one, b"one").unwrap());
        assert!(b.put_chunk(&two, b"two!").unwrap());
        assert_eq!(b.staged_bytes(), 7);
        assert!(!b.chunk_exists(&one).unwrap(), "staged, not visible");
        let before = b.syncfs_calls();
        b.sync_early().unwrap();
        assert_eq!(b.syncfs_calls(), before + 1, "one syncfs: the bytes, before the renames");
        assert_eq!(b.staged_bytes(), 0);
        assert!(b.chunk_exists(&one).unwrap() && b.chunk_exists(&two).unwrap(), "visible after the early sync");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "nothing left in tmp/");
        b.sync_early().unwrap();
        assert_eq!(b.syncfs_calls(), before + 1, "an early sync with nothing staged does nothing");
        b.sync().unwrap();
        assert_eq!(b.syncfs_calls(), before + 2, "the sync before a commit syncs although nothing is staged");
        // a full flush: bytes, renames, then the renames
        b.put_chunk(&id([0x30, 0x03], 3), b"three").unwrap();
        b.sync().unwrap();
        assert_eq!(b.syncfs_calls(), before + 4);
    }

    /// A shard's stamp: none while it is missing or freshly changed, then
    /// steady while nothing changes, and different after a chunk is added
    /// or removed (once settled again).
    #[test]
    fn group_stamp_changes_with_the_shards_chunks_and_waits_to_settle() {
        let settle = || std::thread::sleep(STAMP_SETTLE + std::time::Duration::from_millis(300));
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        b.create_layout().unwrap();
        assert_eq!(b.chunk_group_stamp(0xab01).unwrap(), None, "no shard yet");
        b.put_chunk(&id([0xab, 0x01], 1), b"one").unwrap();
        b.sync().unwrap();
        assert_eq!(b.chunk_group_stamp(0xab01).unwrap(), None, "a shard changed just now is not vouched for");
        settle();
        let first = b.chunk_group_stamp(0xab01).unwrap().expect("a settled shard has a stamp");
        assert_eq!(b.chunk_group_stamp(0xab01).unwrap(), Some(first));
        // another shard's chunk leaves this one alone
        b.put_chunk(&id([0xab, 0x02], 1), b"other").unwrap();
        b.sync().unwrap();
        assert_eq!(b.chunk_group_stamp(0xab01).unwrap(), Some(first));

        b.put_chunk(&id([0xab, 0x01], 2), b"two").unwrap();
        b.sync().unwrap();
        assert_eq!(b.chunk_group_stamp(0xab01).unwrap(), None);
        settle();
        let second = b.chunk_group_stamp(0xab01).unwrap().expect("settled");
        assert_ne!(second, first, "an added chunk must change the stamp");

        fs::remove_file(dir.path().join("chunks/ab01").join(id([0xab, 0x01], 1).to_hex().to_string())).unwrap();
        settle();
        let third = b.chunk_group_stamp(0xab01).unwrap().expect("settled");
        assert!(third != second && third != first, "a removed chunk must change the stamp");
    }
}
