//! The store: chunks, block maps and manifests, over a [`Backend`].
//!
//! Nothing here touches a file: the directory layout, durability and locks
//! are the backend's ([`crate::backend`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::backend::dir::DirBackend;
use crate::backend::{Backend, LockMode};
pub use crate::backend::StoreLock;
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
/// every backup, kept by a [`Backend`] (normally a directory).
pub struct Store {
    backend: Box<dyn Backend>,
    meta: StoreMeta,
    poisoned: AtomicBool,
}

/// Key of the store meta object.
const META_KEY: &str = STORE_MARKER;

fn backup_key(id: BackupId, ext: &str) -> String {
    format!("backups/{:012}.{ext}", id.0)
}

impl Store {
    /// Creates a new, empty store in directory `path` (which may exist if
    /// empty).
    ///
    /// # Errors
    /// `AlreadyExists` when `path` already holds a store; `Io` when it cannot be created.
    pub fn init(path: &Path, opts: &InitOptions) -> Result<Store> {
        format::check_block_size(opts.default_block_size)?;
        let backend = DirBackend::new(path);
        if backend.object_exists(META_KEY)? {
            return Err(Error::AlreadyExists { path: path.to_path_buf() });
        }
        backend.create_layout()?;
        Store::init_with_backend(Box::new(backend), opts)
    }

    /// Creates a new, empty store on `backend`.
    ///
    /// # Errors
    /// `AlreadyExists` when the backend already holds a store; `Io`.
    pub fn init_with_backend(backend: Box<dyn Backend>, opts: &InitOptions) -> Result<Store> {
        format::check_block_size(opts.default_block_size)?;
        if backend.object_exists(META_KEY)? {
            return Err(Error::AlreadyExists { path: backend.location().to_path_buf() });
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
        backend.put_object(META_KEY, &json)?;
        Store::with_backend(backend)
    }

    /// Opens the existing store in directory `path`.
    ///
    /// # Errors
    /// `NotAStore` when the marker file is missing, `UnsupportedVersion` for a newer format.
    pub fn open(path: &Path) -> Result<Store> {
        Store::with_backend(Box::new(DirBackend::new(path)))
    }

    /// Opens the existing store on `backend`.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn with_backend(backend: Box<dyn Backend>) -> Result<Store> {
        let Some(bytes) = backend.get_object(META_KEY, format::MAX_MANIFEST_LEN)? else {
            return Err(Error::NotAStore { path: backend.location().to_path_buf(), marker: STORE_MARKER });
        };
        let marker = backend.object_name(META_KEY);
        let meta: StoreMeta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::CorruptFile { path: marker.clone(), reason: e.to_string() })?;
        if meta.format != STORE_VERSION {
            return Err(Error::UnsupportedVersion { path: marker, found: meta.format, supported: STORE_VERSION });
        }
        Ok(Store { backend, meta, poisoned: AtomicBool::new(false) })
    }

    /// Where the store is: its directory, or for a backend without one a
    /// name such as `memory:`. For messages; see [`Store::dir`].
    pub fn root(&self) -> &Path {
        self.backend.location()
    }

    /// The store's directory, when its backend is one.
    pub fn dir(&self) -> Option<&Path> {
        self.backend.dir()
    }

    /// The backend the store keeps its objects on.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }

    // ---- locks -------------------------------------------------------

    fn lock(&self, name: &str, mode: LockMode) -> Result<StoreLock> {
        match self.backend.lock(name, mode, true)? {
            Some(l) => Ok(l),
            // a waiting lock call only returns once it holds the lock
            None => Err(Error::io("lock", self.root().join("locks").join(name), std::io::ErrorKind::WouldBlock.into())),
        }
    }

    /// The store lock, shared: held by every backup, prune and restore.
    /// GC takes it exclusive for its sweep (see the crate docs).
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock("store", LockMode::Shared)
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
            tracing::warn!(store = %self.root().display(), "store is read-only: not locking");
            return Ok(StoreLock::new(()));
        }
        self.lock_shared()
    }

    /// True when the store's filesystem is mounted read-only.
    pub fn is_read_only(&self) -> bool {
        self.backend.is_read_only()
    }

    /// The store lock, exclusive (blocking).
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock("store", LockMode::Exclusive)
    }

    /// The store lock, exclusive, without waiting: `None` when anyone holds it.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        self.backend.lock("store", LockMode::Exclusive, false)
    }

    /// A named exclusive lock (e.g. one per image), without waiting:
    /// `None` when another process holds it. `name` must be a safe file name.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn try_lock_named(&self, name: &str) -> Result<Option<StoreLock>> {
        self.backend.lock(name, LockMode::Exclusive, false)
    }

    /// A named exclusive lock, waiting for it. `name` must be a safe file name.
    ///
    /// # Errors
    /// `Io` when the lock file cannot be opened.
    pub fn lock_named(&self, name: &str) -> Result<StoreLock> {
        self.lock(name, LockMode::Exclusive)
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
        self.backend.remove_temp_files()
    }

    // ---- chunks ------------------------------------------------------

    /// Path of a chunk object, `chunks/<4 hex>/<64 hex>` under
    /// [`Store::root`] (a real file for the directory backend).
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.root().join("chunks").join(&h[..4]).join(h)
    }

    /// True when the store holds the chunk.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.backend.chunk_exists(id)
    }

    /// Stores a chunk durably unless the store already has it; an existing
    /// chunk is never rewritten. Returns true when it was written.
    /// The chunk is durable and visible after the next [`Store::sync`].
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
        let res = self.backend.put_chunk(&chunk.id, &chunk.bytes);
        if res.is_err() {
            self.poisoned.store(true, Ordering::Relaxed);
        }
        res
    }

    /// Removes the temp files of chunks not yet flushed (a backup that failed
    /// or was cancelled): nothing references them.
    pub fn discard_pending(&self) {
        self.backend.discard_pending()
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
        let r = self.backend.sync();
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
        self.backend.get_chunk(id, out)
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
        self.backend.list_chunks()
    }

    /// Removes a chunk (GC only).
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn remove_chunk(&self, id: &ChunkId) -> Result<()> {
        self.backend.delete_chunk(id)
    }

    /// Marks a chunk as recently used (updates its mtime), so that a GC
    /// running concurrently with the backup that reuses it keeps it.
    ///
    /// # Errors
    /// `ChunkMissing` when it vanished, `Io` otherwise.
    pub fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        self.backend.touch_chunk(id)
    }

    /// A chunk's mtime, or `None` when the store does not hold it.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn chunk_modified(&self, id: &ChunkId) -> Result<Option<std::time::SystemTime>> {
        self.backend.chunk_modified(id)
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
        self.backend.quarantine_chunk(id)
    }

    // ---- backups -----------------------------------------------------

    /// Commits a backup to the store: makes pending chunks durable, then
    /// writes the block map, then the manifest (each atomically). Once this
    /// returns, the backup is restorable from the store alone.
    ///
    /// # Errors
    /// `BackupExists` when the id is taken; `Io` on any failed write.
    pub fn write_backup(&self, manifest: &mut Manifest, map: &BlockMap) -> Result<()> {
        let mkey = backup_key(manifest.id, "json");
        if self.backend.object_exists(&mkey)? {
            return Err(Error::BackupExists { id: manifest.id.0 });
        }
        self.sync()?;
        let enc = map.encode();
        manifest.blockmap_blake3 = blake3::hash(&enc).to_hex().to_string();
        manifest.image_size = map.image_size();
        manifest.block_size = map.block_size();
        self.backend.put_object(&backup_key(manifest.id, "blockmap"), &enc)?;
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        self.backend.put_object(&mkey, &json)
    }

    /// Allocates the id of a new backup in the store: the lowest id above
    /// every id the store has seen (manifests, block maps, markers, earlier
    /// claims) and at least `at_least`, claimed by creating
    /// `backups/<id>.claim` exclusively ([`Backend::create_object`]). Two
    /// agents that pick the same id race on that create and exactly one
    /// wins; the other takes the next id. Claims are never removed (GC
    /// leaves them), so an id is never handed out twice, not even after its
    /// backup was pruned: `IMAGE@ID` always means one backup.
    ///
    /// # Errors
    /// `Io`.
    pub fn claim_backup_id(&self, at_least: u64) -> Result<BackupId> {
        let seen = self
            .backend
            .list_objects("backups/")?
            .iter()
            .filter_map(|n| n.split_once('.')?.0.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let mut next = seen.saturating_add(1).max(at_least).max(1);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        loop {
            let body = serde_json::json!({
                "host": host.trim(),
                "pid": std::process::id(),
                "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            });
            if self.backend.create_object(&backup_key(BackupId(next), "claim"), body.to_string().as_bytes())? {
                return Ok(BackupId(next));
            }
            next += 1; // another agent claimed it first
        }
    }

    /// True when the store holds the backup's manifest (false when that
    /// cannot be found out; see [`Store::try_has_backup`]).
    pub fn has_backup(&self, id: BackupId) -> bool {
        self.try_has_backup(id).unwrap_or(false)
    }

    /// True when the store holds the backup's manifest.
    ///
    /// # Errors
    /// `Io`.
    pub fn try_has_backup(&self, id: BackupId) -> Result<bool> {
        self.backend.object_exists(&backup_key(id, "json"))
    }

    /// Reads a backup's manifest.
    ///
    /// # Errors
    /// `BackupMissing`, `CorruptFile` or `Io`.
    pub fn read_manifest(&self, id: BackupId) -> Result<Manifest> {
        let key = backup_key(id, "json");
        let Some(bytes) = self.backend.get_object(&key, format::MAX_MANIFEST_LEN)? else {
            return Err(Error::BackupMissing { id: id.0 });
        };
        let p = self.backend.object_name(&key);
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
        let key = backup_key(manifest.id, "blockmap");
        // the manifest's geometry bounds the read (checked against the map below)
        let len = crate::blockmap::encoded_len(manifest.image_size, manifest.block_size)
            .map_err(|reason| Error::CorruptFile { path: self.backend.object_name(&backup_key(manifest.id, "json")), reason })?;
        let Some(bytes) = self.backend.get_object(&key, len)? else { return Err(Error::BackupMissing { id: manifest.id.0 }) };
        let p = self.backend.object_name(&key);
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
        let mut ids: Vec<BackupId> = self
            .backend
            .list_objects("backups/")?
            .iter()
            .filter_map(|name| name.strip_suffix(".json")?.parse::<u64>().ok().map(BackupId))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Names of the objects in `backups/` (manifests, block maps, markers),
    /// without temp files.
    ///
    /// # Errors
    /// `Io` when the directory cannot be read.
    pub fn list_backup_files(&self) -> Result<Vec<String>> {
        self.backend.list_objects("backups/")
    }

    /// Removes one object of `backups/` (GC: files without a manifest);
    /// false when it was not there.
    ///
    /// # Errors
    /// `Io`.
    pub(crate) fn remove_backup_file(&self, name: &str) -> Result<bool> {
        self.backend.delete_object(&format!("backups/{name}"))
    }

    /// Removes a backup from the store: manifest first (so a crash leaves at
    /// worst an unreferenced block map), then the block map. Its chunks stay
    /// until GC.
    ///
    /// # Errors
    /// `Io` on a failed removal.
    pub fn remove_backup(&self, id: BackupId) -> Result<()> {
        for ext in ["json", "blockmap", "protected", "verify"] {
            self.backend.delete_object(&backup_key(id, ext))?;
        }
        Ok(())
    }

    /// Protects a backup from pruning, or lifts the protection, by writing
    /// or removing its empty `backups/<id>.protected` marker. The catalog
    /// keeps the same flag; the marker lets a rebuilt catalog keep it.
    ///
    /// # Errors
    /// `BackupMissing` when the store does not hold the backup; `Io`.
    pub fn set_protected(&self, id: BackupId, protected: bool) -> Result<()> {
        let key = backup_key(id, "protected");
        if protected {
            if !self.try_has_backup(id)? {
                return Err(Error::BackupMissing { id: id.0 });
            }
            return self.backend.put_object(&key, b"");
        }
        self.backend.delete_object(&key).map(|_| ())
    }

    /// True when the backup carries a protection marker (false when that
    /// cannot be found out; see [`Store::try_is_protected`]).
    pub fn is_protected(&self, id: BackupId) -> bool {
        self.try_is_protected(id).unwrap_or(false)
    }

    /// True when the backup carries a protection marker.
    ///
    /// # Errors
    /// `Io`.
    pub fn try_is_protected(&self, id: BackupId) -> Result<bool> {
        self.backend.object_exists(&backup_key(id, "protected"))
    }

    /// Records the result of a verify in `backups/<id>.verify` (atomically).
    /// A backup whose manifest is gone (pruned meanwhile) gets no marker.
    ///
    /// # Errors
    /// `Io`.
    pub fn set_verify_mark(&self, id: BackupId, mark: &crate::VerifyMark) -> Result<()> {
        if !self.try_has_backup(id)? {
            return Ok(());
        }
        let json = serde_json::to_vec(mark).expect("verify mark serialises");
        self.backend.put_object(&backup_key(id, "verify"), &json)
    }

    /// The result of the last verify of a backup; `None` when never verified.
    ///
    /// # Errors
    /// `CorruptFile` for a marker that does not parse, `Io`.
    pub fn verify_mark(&self, id: BackupId) -> Result<Option<crate::VerifyMark>> {
        let key = backup_key(id, "verify");
        let Some(bytes) = self.backend.get_object(&key, format::MAX_MANIFEST_LEN)? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::CorruptFile { path: self.backend.object_name(&key), reason: e.to_string() })
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
        let key = backup_key(id, "blockmap");
        let p = self.backend.object_name(&key);
        // the catalog's geometry bounds the read (checked against the map below)
        let len = crate::blockmap::encoded_len(image_size, block_size)
            .map_err(|reason| Error::CorruptFile { path: p.clone(), reason })?;
        let Some(bytes) = self.backend.get_object(&key, len)? else { return Err(Error::BackupMissing { id: id.0 }) };
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

    /// Reads the whole of a small metadata object, by its path relative to
    /// the store root (`blockvault-store.json`).
    ///
    /// # Errors
    /// `Io`, also when it does not exist.
    pub fn read_meta_file(&self, rel: &str) -> Result<Vec<u8>> {
        match self.backend.get_object(rel, format::MAX_MANIFEST_LEN)? {
            Some(b) => Ok(b),
            None => Err(Error::io("read", self.backend.object_name(rel), std::io::ErrorKind::NotFound.into())),
        }
    }
}
