//! The store: chunks, block maps and manifests, over a [`Backend`].
//!
//! Nothing here touches a file: the directory layout, durability and locks
//! are the backend's ([`crate::backend`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::dir::DirBackend;
use crate::backend::{Backend, LockMode};
pub use crate::backend::StoreLock;
use crate::blockmap::BlockMap;
use crate::chunk::{self, EncodedChunk};
use crate::error::{Error, Result};
use crate::backend::sealed::SealedBackend;
use crate::crypto::{self, DataKey, EncryptionMeta, KeyFile, KeySlot, AEAD_AES_NAME, AEAD_NAME, KEYED_HASH_NAME};
use crate::format::{self, STORE_MARKER, STORE_VERSION, STORE_VERSION_ENCRYPTED, STORE_VERSION_ENCRYPTED_AES};
use crate::id::ChunkHasher;
use zeroize::Zeroizing;
use crate::manifest::Manifest;
use crate::{BackupId, ChunkId};

/// The store's own record of its format and settings (`blockvault-store.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreMeta {
    pub format: u32,
    /// Random id; the catalog records it to catch a catalog paired with the wrong store.
    pub uuid: String,
    pub created: String,
    /// Hash of chunk plaintexts: `blake3`, or `blake3-keyed` in an encrypted store.
    pub hash: String,
    /// Codec of chunk payloads.
    pub codec: String,
    /// Block size given to images that do not set their own.
    pub default_block_size: u32,
    /// Set in an encrypted store (format 2), absent (not even `null`) in
    /// an unencrypted one, whose meta stays byte-identical to format 1's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionMeta>,
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

/// Where the passphrase of a key slot comes from, when one is needed: the
/// caller's (an environment variable, a terminal prompt). `Err` says why
/// there is none.
pub type PassphraseSource<'a> = &'a dyn Fn() -> std::result::Result<Zeroizing<String>, String>;

/// What opens an encrypted store: a key file, and a passphrase when its
/// slot has one. An unencrypted store needs neither.
#[derive(Clone, Copy)]
pub struct Unlock<'a> {
    pub key_file: Option<&'a Path>,
    pub passphrase: PassphraseSource<'a>,
}

fn no_passphrase() -> std::result::Result<Zeroizing<String>, String> {
    Err("no passphrase was given".into())
}

impl Unlock<'static> {
    /// No key: opens unencrypted stores only.
    pub fn none() -> Unlock<'static> {
        Unlock { key_file: None, passphrase: &no_passphrase }
    }
}

/// A new encrypted store's first key ([`Store::init_encrypted`]).
#[derive(Clone, Copy, Debug)]
pub struct NewKey<'a> {
    /// Written there (mode 0600), never over an existing file.
    pub key_file: &'a Path,
    /// When set, the key slot also needs this passphrase.
    pub passphrase: Option<&'a str>,
}

/// A content-addressed chunk store with the block maps and manifests of
/// every backup, kept by a [`Backend`] (normally a directory).
///
/// In an encrypted store every object but the meta goes through a
/// [`SealedBackend`] and chunk ids are keyed ([`ChunkHasher`]); callers see
/// the same plaintext API either way.
pub struct Store {
    /// What everything reads and writes through: the sealed view in an
    /// encrypted store, the backend itself otherwise.
    backend: Box<dyn Backend>,
    /// The backend as it is (sealed bytes in an encrypted store).
    raw: Arc<dyn Backend>,
    /// The sealing view `backend` is, in an encrypted store: for chunks
    /// sealed by the caller's thread ([`Store::prepare_chunk`]).
    sealed: Option<Arc<SealedBackend>>,
    meta: StoreMeta,
    hasher: ChunkHasher,
    data_key: Option<DataKey>,
    poisoned: AtomicBool,
}

/// [`Store::has_chunk`] of a store, owned: see [`Store::chunk_checker`].
#[derive(Clone)]
pub struct ChunkChecker {
    backend: Arc<dyn Backend>,
}

impl ChunkChecker {
    /// True when the store holds the chunk.
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.backend.chunk_exists(id)
    }

    /// The stamp of a chunk group: see [`Backend::chunk_group_stamp`].
    ///
    /// # Errors
    /// `Io` on anything but "not found".
    pub fn group_stamp(&self, prefix: u16) -> Result<Option<u128>> {
        self.backend.chunk_group_stamp(prefix)
    }
}

/// A chunk in the form its store keeps it ([`Store::prepare_chunk`]):
/// sealed in an encrypted store, the encoded chunk itself otherwise.
#[derive(Debug)]
pub struct ReadyChunk {
    pub id: ChunkId,
    /// Length of the block it holds.
    pub plain_len: usize,
    /// Length of the encoded chunk (header and payload) before any sealing,
    /// as [`EncodedChunk::bytes`] had it.
    pub encoded_len: usize,
    bytes: Vec<u8>,
    sealed: bool,
}

impl ReadyChunk {
    /// The bytes as stored.
    pub fn stored_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Key of the store meta object.
const META_KEY: &str = STORE_MARKER;
/// Objects an encrypted store keeps unsealed: the meta says how to unlock.
const PLAIN_OBJECTS: &[&str] = &[META_KEY];

/// Ids [`Store::claim_backup_id`] tries above its hint before it lists
/// `backups/`.
pub const CLAIM_PROBES: u32 = 8;

fn backup_key(id: BackupId, ext: &str) -> String {
    format!("backups/{:012}.{ext}", id.0)
}

/// Reads and parses the store meta of `backend`, without unlocking
/// anything: what a tool that copies a store as it is needs, and what says
/// whether a store is encrypted.
///
/// # Errors
/// `NotAStore`, `CorruptFile`, `UnsupportedVersion`, `Io`.
pub fn read_meta(backend: &dyn Backend) -> Result<StoreMeta> {
    let Some(bytes) = backend.get_object(META_KEY, format::MAX_MANIFEST_LEN)? else {
        return Err(Error::NotAStore { path: backend.location().to_path_buf(), marker: STORE_MARKER });
    };
    let marker = backend.object_name(META_KEY);
    let meta: StoreMeta =
        serde_json::from_slice(&bytes).map_err(|e| Error::CorruptFile { path: marker.clone(), reason: e.to_string() })?;
    match (meta.format, &meta.encryption) {
        (STORE_VERSION, None) | (STORE_VERSION_ENCRYPTED | STORE_VERSION_ENCRYPTED_AES, Some(_)) => Ok(meta),
        (STORE_VERSION, Some(_)) | (STORE_VERSION_ENCRYPTED | STORE_VERSION_ENCRYPTED_AES, None) => Err(Error::CorruptFile {
            path: marker,
            reason: format!("format {} with{} encryption settings", meta.format, if meta.encryption.is_some() { "" } else { "out" }),
        }),
        (found, _) => Err(Error::UnsupportedVersion { path: marker, found, supported: STORE_VERSION_ENCRYPTED_AES }),
    }
}

/// The bytes the meta MAC covers: the meta with an empty `mac`.
fn mac_input(meta: &StoreMeta) -> Vec<u8> {
    let mut m = meta.clone();
    if let Some(e) = m.encryption.as_mut() {
        e.mac.clear();
    }
    serde_json::to_vec(&m).expect("meta serialises")
}

/// Checks that `meta` belongs to `dk` (key check) and that nobody changed
/// it (MAC).
fn authenticate_meta(marker: &Path, meta: &StoreMeta, dk: &DataKey) -> Result<()> {
    let enc = meta.encryption.as_ref().expect("checked by read_meta");
    let bad = |reason: &str| Error::CorruptFile { path: marker.to_path_buf(), reason: reason.into() };
    if dk.key_check() != enc.key_check {
        return Err(bad("the key check does not match the unlocked data key"));
    }
    if dk.meta_mac(&mac_input(meta)) != enc.mac {
        return Err(bad("the store meta was altered: its MAC does not match"));
    }
    let aead_of_format = match meta.format {
        STORE_VERSION_ENCRYPTED => AEAD_NAME,
        _ => AEAD_AES_NAME,
    };
    if meta.hash != KEYED_HASH_NAME || enc.aead != aead_of_format {
        return Err(bad(&format!("unsupported hash '{}' or cipher '{}'", meta.hash, enc.aead)));
    }
    Ok(())
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
            encryption: None,
        };
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        backend.put_object(META_KEY, &json)?;
        Store::with_backend(backend)
    }

    /// Creates a new, empty encrypted store in directory `path`, writing its
    /// first key file.
    ///
    /// # Errors
    /// As [`Store::init_encrypted_with_backend`].
    pub fn init_encrypted(path: &Path, opts: &InitOptions, key: &NewKey<'_>) -> Result<Store> {
        format::check_block_size(opts.default_block_size)?;
        let backend = DirBackend::new(path);
        if backend.object_exists(META_KEY)? {
            return Err(Error::AlreadyExists { path: path.to_path_buf() });
        }
        // refused before the store directory is made
        if key.key_file.symlink_metadata().is_ok() {
            return Err(Error::KeyFile { path: key.key_file.into(), reason: "already exists: refusing to overwrite a key file".into() });
        }
        backend.create_layout()?;
        Store::init_encrypted_with_backend(Box::new(backend), opts, key)
    }

    /// Creates a new, empty encrypted store on `backend`: a random data key,
    /// wrapped into one key slot for a new key file written to
    /// `key.key_file` (before anything is written to the store).
    ///
    /// # Errors
    /// `AlreadyExists`; `KeyFile` when the key file exists or cannot be
    /// written (the store is then not created); `Io`.
    pub fn init_encrypted_with_backend(backend: Box<dyn Backend>, opts: &InitOptions, key: &NewKey<'_>) -> Result<Store> {
        Store::init_encrypted_format(backend, opts, key, STORE_VERSION_ENCRYPTED_AES)
    }

    /// As [`Store::init_encrypted_with_backend`], but a store of format 2
    /// (XChaCha20-Poly1305), as blockvault wrote before format 3: for the
    /// tests that check such stores still open, read and take backups.
    #[doc(hidden)]
    pub fn init_encrypted_format2_with_backend(backend: Box<dyn Backend>, opts: &InitOptions, key: &NewKey<'_>) -> Result<Store> {
        Store::init_encrypted_format(backend, opts, key, STORE_VERSION_ENCRYPTED)
    }

    fn init_encrypted_format(backend: Box<dyn Backend>, opts: &InitOptions, key: &NewKey<'_>, format: u32) -> Result<Store> {
        format::check_block_size(opts.default_block_size)?;
        if backend.object_exists(META_KEY)? {
            return Err(Error::AlreadyExists { path: backend.location().to_path_buf() });
        }
        let uuid = format!("{:032x}", rand::random::<u128>());
        let dk = DataKey::generate();
        let kf = KeyFile::generate(key.key_file, &uuid);
        let slot = crypto::make_slot(&uuid, &dk, &kf, key.passphrase)?;
        kf.write_new()?;
        let mut meta = StoreMeta {
            format,
            uuid,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            hash: KEYED_HASH_NAME.into(),
            codec: "zstd".into(),
            default_block_size: opts.default_block_size,
            encryption: Some(EncryptionMeta {
                aead: if format == STORE_VERSION_ENCRYPTED { AEAD_NAME } else { AEAD_AES_NAME }.into(),
                key_check: dk.key_check(), slots: vec![slot], mac: String::new() }),
        };
        let mac = dk.meta_mac(&mac_input(&meta));
        meta.encryption.as_mut().expect("just set").mac = mac;
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        backend.put_object(META_KEY, &json)?;
        Ok(Store::from_parts(Arc::from(backend), meta, Some(dk)))
    }

    fn from_parts(raw: Arc<dyn Backend>, meta: StoreMeta, data_key: Option<DataKey>) -> Store {
        let (backend, sealed, hasher): (Box<dyn Backend>, _, ChunkHasher) = match &data_key {
            None => (Box::new(raw.clone()), None, ChunkHasher::Plain),
            Some(dk) => {
                let aead = meta.encryption.as_ref().map_or("", |e| e.aead.as_str());
                // checked by authenticate_meta (or just written by init)
                let sealer = dk.sealer_for(aead).expect("a known cipher");
                let sealed = Arc::new(SealedBackend::new(raw.clone(), sealer, PLAIN_OBJECTS));
                (Box::new(sealed.clone()), Some(sealed), ChunkHasher::Keyed(dk.chunk_id_key()))
            }
        };
        Store { backend, raw, sealed, meta, hasher, data_key, poisoned: AtomicBool::new(false) }
    }

    /// Opens the existing store in directory `path`.
    ///
    /// # Errors
    /// `NotAStore` when the marker file is missing, `UnsupportedVersion` for a newer format.
    pub fn open(path: &Path) -> Result<Store> {
        Store::with_backend(Box::new(DirBackend::new(path)))
    }

    /// Opens the existing store in directory `path`, unlocking it when it
    /// is encrypted.
    ///
    /// # Errors
    /// As [`Store::with_backend_unlocked`].
    pub fn open_unlocked(path: &Path, unlock: &Unlock<'_>) -> Result<Store> {
        Store::with_backend_unlocked(Box::new(DirBackend::new(path)), unlock)
    }

    /// Opens the existing (unencrypted) store on `backend`.
    ///
    /// # Errors
    /// As [`Store::open`]; `KeyRequired` for an encrypted store.
    pub fn with_backend(backend: Box<dyn Backend>) -> Result<Store> {
        Store::with_backend_unlocked(backend, &Unlock::none())
    }

    /// Opens the existing store on `backend`; an encrypted one is unlocked
    /// with `unlock` before anything but its meta is read.
    ///
    /// # Errors
    /// `NotAStore`, `UnsupportedVersion`, `CorruptFile` (a meta that does
    /// not parse or authenticate); for an encrypted store `KeyRequired`
    /// without a key file, `KeyFile` for one that does not read, `WrongKey`
    /// for a key file or passphrase that does not open it.
    pub fn with_backend_unlocked(backend: Box<dyn Backend>, unlock: &Unlock<'_>) -> Result<Store> {
        let raw: Arc<dyn Backend> = Arc::from(backend);
        let meta = read_meta(&*raw)?;
        let Some(enc) = &meta.encryption else { return Ok(Store::from_parts(raw, meta, None)) };
        let Some(kf_path) = unlock.key_file else {
            return Err(Error::KeyRequired { path: raw.location().to_path_buf() });
        };
        let kf = KeyFile::read(kf_path)?;
        let wrong = |reason: String| Error::WrongKey { store: raw.location().to_path_buf(), key_file: kf_path.to_path_buf(), reason };
        if kf.store != meta.uuid {
            return Err(wrong(format!("the key file is for store {}, this store is {}", kf.store, meta.uuid)));
        }
        let Some(slot) = enc.slots.iter().find(|s| s.id == kf.slot()) else {
            return Err(wrong(format!("the store has no key slot {} for it (removed with `key remove`?)", kf.slot())));
        };
        let dk = crypto::open_slot(&meta.uuid, slot, &kf, unlock.passphrase).map_err(|e| match e {
            crypto::SlotError::NoPassphrase(why) => wrong(format!("its key slot needs a passphrase: {why}")),
            crypto::SlotError::Rejected(why) => wrong(why),
        })?;
        authenticate_meta(&raw.object_name(META_KEY), &meta, &dk)?;
        Ok(Store::from_parts(raw, meta, Some(dk)))
    }

    /// True for an encrypted store.
    pub fn is_encrypted(&self) -> bool {
        self.data_key.is_some()
    }

    /// The id of a plaintext block in this store: the plain blake3 hash in
    /// an unencrypted store, blake3 keyed with the store's chunk id key in
    /// an encrypted one. Every chunk id looked up or stored comes from here.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        self.hasher.id(data)
    }

    /// The chunk hasher ([`Store::chunk_id`]), for threads that hash.
    pub fn hasher(&self) -> &ChunkHasher {
        &self.hasher
    }

    /// The key slots of an encrypted store (none for an unencrypted one).
    pub fn key_slots(&self) -> &[KeySlot] {
        self.meta.encryption.as_ref().map(|e| e.slots.as_slice()).unwrap_or(&[])
    }

    /// Adds a key slot for a new key file written to `key.key_file`.
    /// Returns the new slot's id.
    ///
    /// # Errors
    /// `NotEncrypted`; `KeyFile` when the file exists or cannot be written
    /// (the store is then unchanged); `CorruptFile` when the meta changed
    /// under us and no longer authenticates; `Io`.
    pub fn add_key(&mut self, key: &NewKey<'_>) -> Result<String> {
        let uuid = self.meta.uuid.clone();
        let kf = KeyFile::generate(key.key_file, &uuid);
        let slot = crypto::make_slot(&uuid, self.data_key()?, &kf, key.passphrase)?;
        let id = slot.id.clone();
        kf.write_new()?;
        self.update_slots(|slots| {
            slots.push(slot);
            Ok(())
        })?;
        Ok(id)
    }

    /// Removes key slot `id`: its key file no longer opens the store. The
    /// last slot is never removed.
    ///
    /// # Errors
    /// `NotEncrypted`; `InvalidSetting` for an unknown or the last slot; `Io`.
    pub fn remove_key(&mut self, id: &str) -> Result<()> {
        self.update_slots(|slots| {
            if !slots.iter().any(|s| s.id == id) {
                return Err(Error::InvalidSetting { key: "slot", reason: format!("the store has no key slot {id}") });
            }
            if slots.len() == 1 {
                return Err(Error::InvalidSetting {
                    key: "slot",
                    reason: format!("{id} is the store's only key slot: removing it would lock every backup away"),
                });
            }
            slots.retain(|s| s.id != id);
            Ok(())
        })
    }

    /// Re-wraps the data key in the slot of key file `kf` under a new
    /// passphrase (`None`: the key file alone opens it). The key file is
    /// unchanged; the old passphrase no longer opens the slot.
    ///
    /// # Errors
    /// `NotEncrypted`; `InvalidSetting` when `kf` has no slot; `Io`.
    pub fn change_passphrase(&mut self, kf: &KeyFile, new: Option<&str>) -> Result<()> {
        let uuid = self.meta.uuid.clone();
        let slot = crypto::make_slot(&uuid, self.data_key()?, kf, new)?;
        self.update_slots(|slots| {
            let Some(s) = slots.iter_mut().find(|s| s.id == slot.id) else {
                return Err(Error::InvalidSetting { key: "key-file", reason: format!("the store has no key slot {} for {}", slot.id, kf.path.display()) });
            };
            *s = slot;
            Ok(())
        })
    }

    fn data_key(&self) -> Result<&DataKey> {
        self.data_key.as_ref().ok_or_else(|| Error::NotEncrypted { path: self.root().to_path_buf() })
    }

    /// Changes the key slots in the meta under the `keys` lock: re-reads
    /// the meta (another host may have changed it), checks it, applies `f`,
    /// and replaces it atomically with a new MAC.
    fn update_slots(&mut self, f: impl FnOnce(&mut Vec<KeySlot>) -> Result<()>) -> Result<()> {
        let _keys = self.lock_named("keys")?;
        let dk = self.data_key()?;
        let mut meta = read_meta(&*self.raw)?;
        let marker = self.raw.object_name(META_KEY);
        if meta.uuid != self.meta.uuid || meta.encryption.is_none() {
            return Err(Error::CorruptFile { path: marker, reason: "the store meta changed to another store's".into() });
        }
        authenticate_meta(&marker, &meta, dk)?;
        let enc = meta.encryption.as_mut().expect("checked");
        f(&mut enc.slots)?;
        let mac = dk.meta_mac(&mac_input(&meta));
        meta.encryption.as_mut().expect("checked").mac = mac;
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        self.raw.put_object(META_KEY, &json)?;
        self.meta = meta;
        Ok(())
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

    /// The backend the store keeps its objects on, as the store sees it:
    /// in an encrypted store the sealing view, which takes and returns
    /// plaintext.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// The backend below any sealing: objects exactly as stored (sealed in
    /// an encrypted store). For copying a store as it is, without its key.
    pub fn raw_backend(&self) -> &Arc<dyn Backend> {
        &self.raw
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

    /// Removes the staged chunk writes left by crashed writers (`tmp/`; the
    /// few small temp files of torn manifest and block map writes are left
    /// to GC, see [`Backend::remove_staged_temp_files`]). Only safe while no
    /// other writer runs, so it takes the store lock exclusive without
    /// waiting and does nothing when it cannot.
    ///
    /// # Errors
    /// `Io` when a temp file cannot be removed.
    pub fn clean_tmp(&self) -> Result<usize> {
        let Some(_guard) = self.try_lock_exclusive()? else { return Ok(0) };
        // the staged chunks; small temp files elsewhere are left to GC
        // ([`Backend::remove_staged_temp_files`])
        self.backend.remove_staged_temp_files()
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

    /// A handle that answers [`Store::has_chunk`] from any thread, for as
    /// long as it lives (a check that runs while the caller goes on).
    pub fn chunk_checker(&self) -> ChunkChecker {
        ChunkChecker { backend: self.raw.clone() }
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
        self.put_chunk_as(chunk, false)
    }

    /// [`Store::put_chunk`]; a `hot` chunk (an index chunk, which the
    /// image's next backup reads) is kept in the backend's cache.
    fn put_chunk_as(&self, chunk: &EncodedChunk, hot: bool) -> Result<bool> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Poisoned);
        }
        let res = if hot { self.backend.put_chunk_hot(&chunk.id, &chunk.bytes) } else { self.backend.put_chunk(&chunk.id, &chunk.bytes) };
        if res.is_err() {
            self.poisoned.store(true, Ordering::Relaxed);
        }
        res
    }

    /// Turns an encoded chunk into the bytes the store keeps: sealed in
    /// place in an encrypted store, as they are otherwise. CPU work (the
    /// whole chunk is encrypted), so call it from a worker thread; then
    /// [`Store::put_ready_chunk`] only writes.
    pub fn prepare_chunk(&self, chunk: EncodedChunk) -> ReadyChunk {
        let EncodedChunk { id, plain_len, mut bytes } = chunk;
        let encoded_len = bytes.len();
        if let Some(s) = &self.sealed {
            s.seal_chunk(&id, &mut bytes);
        }
        ReadyChunk { id, plain_len, encoded_len, bytes, sealed: self.sealed.is_some() }
    }

    /// [`Store::put_chunk`] of a chunk [`Store::prepare_chunk`] made.
    ///
    /// # Errors
    /// As [`Store::put_chunk`]; `InvalidSetting` for a chunk prepared by a
    /// store of the other kind (encrypted or not).
    pub fn put_ready_chunk(&self, chunk: &ReadyChunk) -> Result<bool> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Poisoned);
        }
        // never store plaintext in an encrypted store, nor sealed bytes in a plain one
        if chunk.sealed != self.sealed.is_some() {
            return Err(Error::InvalidSetting {
                key: "chunk",
                reason: format!("chunk {} was prepared for a store that is{} encrypted", chunk.id, if chunk.sealed { "" } else { " not" }),
            });
        }
        let res = match &self.sealed {
            Some(s) => s.put_sealed_chunk(&chunk.id, &chunk.bytes),
            None => self.backend.put_chunk(&chunk.id, &chunk.bytes),
        };
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

    /// Bytes of new chunks written and not yet made durable by
    /// [`Store::sync`] (0 where an early sync gains nothing).
    pub fn staged_bytes(&self) -> u64 {
        self.backend.staged_bytes()
    }

    /// [`Store::sync`] for a writer that still writes (the pipeline's
    /// flusher): what the backend can leave to the next sync it leaves
    /// ([`Backend::sync_early`]). Only [`Store::sync`] comes before a
    /// block map is written.
    ///
    /// # Errors
    /// As [`Store::sync`]; the store is then poisoned.
    pub fn sync_early(&self) -> Result<()> {
        self.poisoning(|| self.backend.sync_early())
    }

    /// Makes every chunk written since the last call durable and visible in
    /// `chunks/`. Called before a block map that references them is written.
    ///
    /// # Errors
    /// `Io` when a sync or rename fails; the store is then poisoned.
    pub fn sync(&self) -> Result<()> {
        self.poisoning(|| self.backend.sync())
    }

    /// Runs a sync unless the store is poisoned, and poisons it when the
    /// sync fails: what was staged may be half visible.
    fn poisoning(&self, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(Error::Poisoned);
        }
        let r = sync();
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
        self.decode_chunk(id, scratch, out)
    }

    /// Checks and decompresses a chunk's stored bytes (as
    /// [`Store::read_chunk_raw`] gives them) into `out`, checking the
    /// plaintext against `id` with the store's hasher.
    ///
    /// # Errors
    /// `CorruptChunk`.
    pub fn decode_chunk(&self, id: &ChunkId, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
        chunk::decode_with(&self.hasher, id, bytes, out)
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
        self.write_backup_ahead(manifest, map, &IndexAhead::default())
    }

    /// [`Store::write_backup`] for a backup that stored some of its index
    /// chunks while its pipeline ran ([`Store::put_index_group`]): a group
    /// whose chunk `ahead` names is neither looked up nor stored again.
    ///
    /// # Errors
    /// As [`Store::write_backup`].
    pub fn write_backup_ahead(&self, manifest: &mut Manifest, map: &BlockMap, ahead: &IndexAhead) -> Result<()> {
        let mkey = backup_key(manifest.id, "json");
        if self.backend.object_exists(&mkey)? {
            return Err(Error::BackupExists { id: manifest.id.0 });
        }
        let enc = match map.index_fanout() {
            None => {
                self.sync()?;
                map.encode()
            }
            Some(fanout) => {
                let t = std::time::Instant::now();
                let (groups, stored_ahead) = self.put_index_chunks(map, fanout, ahead)?;
                let put_ms = t.elapsed().as_millis() as u64;
                self.sync()?;
                tracing::debug!(groups = groups.len(), stored_ahead, put_ms, sync_ms = t.elapsed().as_millis() as u64 - put_ms, "index chunks stored, pending chunks durable");
                map.encode_indexed(fanout, &groups)
            }
        };
        manifest.blockmap_blake3 = blake3::hash(&enc).to_hex().to_string();
        manifest.image_size = map.image_size();
        manifest.block_size = map.block_size();
        self.backend.put_object(&backup_key(manifest.id, "blockmap"), &enc)?;
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        self.backend.put_object(&mkey, &json)
    }

    /// Stores the index chunks of an indexed block map (those the store
    /// lacks; an unchanged group's chunk is already there, and `ahead`
    /// names those this backup stored already) and returns their ids, one
    /// per group, and how many `ahead` had. Durable after the next
    /// [`Store::sync`].
    fn put_index_chunks(&self, map: &BlockMap, fanout: u32, ahead: &IndexAhead) -> Result<(Vec<Option<ChunkId>>, usize)> {
        let mut groups = Vec::with_capacity(map.len().div_ceil(fanout as usize));
        let mut stored_ahead = 0;
        for (g, group) in map.index_groups(fanout).enumerate() {
            if group.iter().all(Option::is_none) {
                groups.push(None);
                continue;
            }
            let plain = crate::blockmap::encode_index_chunk(group);
            let id = self.chunk_id(&plain);
            if ahead.get(g) == Some(&id) {
                stored_ahead += 1;
            } else {
                self.put_index_plain(&plain, &id)?;
            }
            groups.push(Some(id));
        }
        Ok((groups, stored_ahead))
    }

    /// Stores the index chunk of one group of an indexed block map (a
    /// [`BlockMap::index_groups`] group whose entries are final) unless the
    /// store has it, and returns its id (`None`: every block of it is zero,
    /// there is no chunk). A backup does this while its pipeline runs, so
    /// its commit has only the last groups left to store; the chunk is
    /// durable after the next [`Store::sync`], as a data chunk is.
    ///
    /// # Errors
    /// As [`Store::put_chunk`].
    pub fn put_index_group(&self, group: &[Option<ChunkId>]) -> Result<Option<ChunkId>> {
        if group.iter().all(Option::is_none) {
            return Ok(None);
        }
        let plain = crate::blockmap::encode_index_chunk(group);
        let id = self.chunk_id(&plain);
        self.put_index_plain(&plain, &id)?;
        Ok(Some(id))
    }

    fn put_index_plain(&self, plain: &[u8], id: &ChunkId) -> Result<()> {
        if !self.has_chunk(id)? {
            // ids are random bytes: stored raw; kept in the backend's
            // cache, as the image's next backup reads it
            self.put_chunk_as(&chunk::encode(plain, *id, 0, None)?, true)?;
        }
        Ok(())
    }

    /// Decodes a block map of either version, loading the index chunks of an
    /// indexed one (each checked against its id).
    fn decode_blockmap(&self, p: &Path, bytes: &[u8]) -> Result<BlockMap> {
        match BlockMap::decode_any(p, bytes)? {
            crate::blockmap::Decoded::Flat(m) => Ok(m),
            crate::blockmap::Decoded::Indexed(ix) => {
                let (mut raw, mut plain) = (Vec::new(), Vec::new());
                ix.expand(p, |id| {
                    // kept in the backend's cache: the next backup reads it again
                    self.backend.get_chunk_hot(id, &mut raw).and_then(|()| self.decode_chunk(id, &raw, &mut plain)).map_err(|e| match e {
                        // an I/O error stays one (it names the chunk object and the cause)
                        e @ Error::Io { .. } => e,
                        e => Error::CorruptFile { path: p.to_path_buf(), reason: format!("index chunk {id} does not load: {e}") },
                    })?;
                    Ok(std::mem::take(&mut plain))
                })
            }
        }
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
    /// `at_least` is the caller's hint (the catalog's highest id plus one).
    /// The store is first probed from there, without listing `backups/`:
    /// the first id whose claim this call creates and that has no other
    /// object in `backups/` is taken. Claims are handed out one above the
    /// other, so above the highest id a current catalog knows the only ids
    /// are other agents' claims, and the first free one found is the one a
    /// listing would give. When [`CLAIM_PROBES`] probes in a row find the
    /// id taken (a catalog far behind the store: a new host, a catalog
    /// restored from an old copy), the store is listed, as before. Listing
    /// `backups/` on every backup made a backup's cost grow with the number
    /// of backups in the store (`bench/fleet.sh`: half of a backup's CPU
    /// time in a store of 2,000 backups was `getdents`).
    ///
    /// # Errors
    /// `Io`.
    pub fn claim_backup_id(&self, at_least: u64) -> Result<BackupId> {
        let mut next = at_least.max(1);
        for _ in 0..CLAIM_PROBES {
            if self.try_claim(next)? {
                if self.id_unused(next)? {
                    return Ok(BackupId(next));
                }
                // an id from before claims existed: the claim just left
                // marks it as seen, which it was already
            }
            next += 1;
        }
        let seen = self
            .backend
            .list_objects("backups/")?
            .iter()
            .filter_map(|n| n.split_once('.')?.0.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let mut next = seen.saturating_add(1).max(at_least).max(1);
        loop {
            if self.try_claim(next)? {
                return Ok(BackupId(next));
            }
            next += 1; // another agent claimed it first
        }
    }

    /// Creates `backups/<id>.claim` exclusively; false when it exists.
    fn try_claim(&self, id: u64) -> Result<bool> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let body = serde_json::json!({
            "host": host.trim(),
            "pid": std::process::id(),
            "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
        self.backend.create_object(&backup_key(BackupId(id), "claim"), body.to_string().as_bytes())
    }

    /// True when `backups/` holds no object of backup `id` but its claim.
    fn id_unused(&self, id: u64) -> Result<bool> {
        for ext in ["json", "blockmap", "protected", "verify"] {
            if self.backend.object_exists(&backup_key(BackupId(id), ext))? {
                return Ok(false);
            }
        }
        Ok(true)
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
        let len = crate::blockmap::max_encoded_len(manifest.image_size, manifest.block_size)
            .map_err(|reason| Error::CorruptFile { path: self.backend.object_name(&backup_key(manifest.id, "json")), reason })?;
        let Some(bytes) = self.backend.get_object(&key, len)? else { return Err(Error::BackupMissing { id: manifest.id.0 }) };
        let p = self.backend.object_name(&key);
        if blake3::hash(&bytes).to_hex().as_str() != manifest.blockmap_blake3 {
            return Err(Error::CorruptFile { path: p, reason: "block map does not match its manifest's checksum".into() });
        }
        let map = self.decode_blockmap(&p, &bytes)?;
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
        for ext in ["json", "blockmap", "protected", "verify", "labels"] {
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

    /// Writes a backup's labels and note (`backups/<id>.labels`, atomically);
    /// empty annotations remove the object.
    ///
    /// # Errors
    /// `BackupMissing` when the store does not hold the backup; `Io`.
    pub fn set_annotations(&self, id: BackupId, a: &crate::Annotations) -> Result<()> {
        let key = backup_key(id, "labels");
        if a.is_empty() {
            return self.backend.delete_object(&key).map(|_| ());
        }
        if !self.try_has_backup(id)? {
            return Err(Error::BackupMissing { id: id.0 });
        }
        let json = serde_json::to_vec(a).expect("annotations serialise");
        self.backend.put_object(&key, &json)
    }

    /// A backup's labels and note; empty when it has none.
    ///
    /// # Errors
    /// `CorruptFile` for an object that does not parse, `Io`.
    pub fn annotations(&self, id: BackupId) -> Result<crate::Annotations> {
        let key = backup_key(id, "labels");
        let Some(bytes) = self.backend.get_object(&key, format::MAX_MANIFEST_LEN)? else { return Ok(Default::default()) };
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::CorruptFile { path: self.backend.object_name(&key), reason: e.to_string() })
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
        let len = crate::blockmap::max_encoded_len(image_size, block_size)
            .map_err(|reason| Error::CorruptFile { path: p.clone(), reason })?;
        let Some(bytes) = self.backend.get_object(&key, len)? else { return Err(Error::BackupMissing { id: id.0 }) };
        let map = self.decode_blockmap(&p, &bytes)?;
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
            image_size,
            blockmap_blake3: blake3::hash(&bytes).to_hex().to_string(),
            ..Manifest::new(id, image, source, block_size)
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

/// The index chunks a backup stored while its pipeline ran, by group
/// ([`Store::put_index_group`]), for [`Store::write_backup_ahead`].
#[derive(Debug, Default)]
pub struct IndexAhead(Vec<Option<ChunkId>>);

impl IndexAhead {
    /// Records that group `group`'s index chunk `id` is stored.
    pub fn set(&mut self, group: usize, id: ChunkId) {
        if self.0.len() <= group {
            self.0.resize(group + 1, None);
        }
        self.0[group] = Some(id);
    }

    /// The stored index chunk of group `group`, if one was recorded.
    pub fn get(&self, group: usize) -> Option<&ChunkId> {
        self.0.get(group).and_then(Option::as_ref)
    }

    /// Groups recorded.
    pub fn len(&self) -> usize {
        self.0.iter().filter(|g| g.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod encryption_tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::chunk;

    fn pass(p: &'static str) -> impl Fn() -> std::result::Result<Zeroizing<String>, String> {
        move || Ok(Zeroizing::new(p.to_string()))
    }

    #[test]
    fn an_encrypted_store_opens_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let kf = dir.path().join("key");
        let mem = Arc::new(MemoryBackend::new());
        let s = Store::init_encrypted_with_backend(Box::new(mem.clone()), &InitOptions::default(), &NewKey { key_file: &kf, passphrase: None })
            .unwrap();
        assert!(s.is_encrypted());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777, 0o600);
        let data = b"some block".repeat(100);
        let id = s.chunk_id(&data);
        assert_ne!(id, ChunkId::of(&data), "an encrypted store's ids are keyed");
        s.put_chunk(&chunk::encode(&data, id, 3, None).unwrap()).unwrap();
        s.sync().unwrap();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        s.load_chunk(&id, &mut scratch, &mut out).unwrap();
        assert_eq!(out, data);
        // below the sealing, the bytes are not the plain encoded chunk
        mem.get_chunk(&id, &mut scratch).unwrap();
        assert!(chunk::check_frame(&id, &scratch).is_err());
        drop(s);

        // no key, another store's key, a key file that is not one
        let e = Store::with_backend(Box::new(mem.clone())).err().unwrap();
        assert!(matches!(e, Error::KeyRequired { .. }), "{e}");
        let other = dir.path().join("other");
        Store::init_encrypted_with_backend(Box::new(MemoryBackend::new()), &InitOptions::default(), &NewKey { key_file: &other, passphrase: None })
            .unwrap();
        let e = Store::with_backend_unlocked(Box::new(mem.clone()), &Unlock { key_file: Some(&other), passphrase: &pass("") })
            .err()
            .unwrap();
        assert!(matches!(e, Error::WrongKey { .. }) && e.to_string().contains("is for store"), "{e}");
        // the right one
        let s = Store::with_backend_unlocked(Box::new(mem.clone()), &Unlock { key_file: Some(&kf), passphrase: &pass("") }).unwrap();
        s.load_chunk(&id, &mut scratch, &mut out).unwrap();
        assert_eq!(out, data);
        // a key file is never overwritten
        let e = Store::init_encrypted_with_backend(Box::new(MemoryBackend::new()), &InitOptions::default(), &NewKey { key_file: &kf, passphrase: None })
            .err()
            .unwrap();
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    }

    #[test]
    fn key_slots_add_remove_and_passphrase_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mem = Arc::new(MemoryBackend::new());
        let mut s =
            Store::init_encrypted_with_backend(Box::new(mem.clone()), &InitOptions::default(), &NewKey { key_file: &a, passphrase: Some("one") })
                .unwrap();
        let open = |kf: &Path, p: &'static str| Store::with_backend_unlocked(Box::new(mem.clone()), &Unlock { key_file: Some(kf), passphrase: &pass(p) });
        let e = open(&a, "two").err().unwrap();
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        let slot_b = s.add_key(&NewKey { key_file: &b, passphrase: None }).unwrap();
        assert_eq!(s.key_slots().len(), 2);
        open(&b, "").unwrap();
        open(&a, "one").unwrap();
        // passwd on a's slot
        s.change_passphrase(&KeyFile::read(&a).unwrap(), Some("two")).unwrap();
        assert!(open(&a, "one").is_err());
        open(&a, "two").unwrap();
        // remove b: b no longer opens
        s.remove_key(&slot_b).unwrap();
        let e = open(&b, "").err().unwrap();
        assert!(e.to_string().contains("no key slot"), "{e}");
        // the last slot stays
        let slot_a = KeyFile::read(&a).unwrap().slot();
        assert!(s.remove_key(&slot_a).unwrap_err().to_string().contains("only key slot"));
        // a meta altered without the key is refused after unlocking
        let mut meta = read_meta(&*mem).unwrap();
        meta.default_block_size = 65536;
        mem.put_object(META_KEY, &serde_json::to_vec(&meta).unwrap()).unwrap();
        let e = open(&a, "two").err().unwrap();
        assert!(e.to_string().contains("altered"), "{e}");
    }

    #[test]
    fn prepared_chunks_store_as_put_chunk_does() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"a block of an image ".repeat(5000);
        let other = b"another block".repeat(7000);
        // unencrypted: the stored bytes are the encoded chunk itself
        let mem = Arc::new(MemoryBackend::new());
        let s = Store::init_with_backend(Box::new(mem.clone()), &InitOptions::default()).unwrap();
        let enc = chunk::encode(&data, s.chunk_id(&data), 3, None).unwrap();
        let expect = enc.bytes.clone();
        let ready = s.prepare_chunk(enc);
        assert_eq!((ready.encoded_len, ready.stored_len()), (expect.len(), expect.len()));
        assert!(s.put_ready_chunk(&ready).unwrap());
        s.sync().unwrap();
        let mut raw = Vec::new();
        mem.get_chunk(&ready.id, &mut raw).unwrap();
        assert_eq!(raw, expect);
        let plain_ready = ready;

        // encrypted: sealed, opens through the store, not below it
        let kf = dir.path().join("key");
        let emem = Arc::new(MemoryBackend::new());
        let e = Store::init_encrypted_with_backend(Box::new(emem.clone()), &InitOptions::default(), &NewKey { key_file: &kf, passphrase: None })
            .unwrap();
        let id = e.chunk_id(&data);
        let ready = e.prepare_chunk(chunk::encode(&data, id, 0, None).unwrap());
        assert_eq!(ready.stored_len(), ready.encoded_len + crypto::SEAL_OVERHEAD);
        assert!(e.put_ready_chunk(&ready).unwrap());
        e.sync().unwrap();
        assert!(!e.put_ready_chunk(&ready).unwrap(), "never rewritten");
        // and one through the old path, side by side
        let oid = e.chunk_id(&other);
        e.put_chunk(&chunk::encode(&other, oid, 0, None).unwrap()).unwrap();
        e.sync().unwrap();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        e.load_chunk(&id, &mut scratch, &mut out).unwrap();
        assert_eq!(out, data);
        e.load_chunk(&oid, &mut scratch, &mut out).unwrap();
        assert_eq!(out, other);
        emem.get_chunk(&id, &mut raw).unwrap();
        assert!(!raw.windows(19).any(|w| w == b"a block of an image"), "plaintext below the seal");
        assert!(chunk::check_frame(&id, &raw).is_err());

        // a chunk prepared by the other kind of store is refused, nothing written
        let err = e.put_ready_chunk(&plain_ready).unwrap_err().to_string();
        assert!(err.contains("not encrypted"), "{err}");
        assert!(!emem.chunk_exists(&plain_ready.id).unwrap());
        let err = s.put_ready_chunk(&ready).unwrap_err().to_string();
        assert!(err.contains("is encrypted"), "{err}");
    }

    #[test]
    fn new_stores_are_aes_format3_and_format2_stores_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"block of format two ".repeat(3000);
        for (n, format2) in [(0, false), (1, true)] {
            let kf = dir.path().join(format!("key{n}"));
            let mem = Arc::new(MemoryBackend::new());
            let key = NewKey { key_file: &kf, passphrase: None };
            let s = if format2 {
                Store::init_encrypted_format2_with_backend(Box::new(mem.clone()), &InitOptions::default(), &key)
            } else {
                Store::init_encrypted_with_backend(Box::new(mem.clone()), &InitOptions::default(), &key)
            }
            .unwrap();
            let (format, aead, version) =
                if format2 { (2, AEAD_NAME, crypto::SEAL_VERSION) } else { (3, AEAD_AES_NAME, crypto::SEAL_VERSION_AES) };
            assert_eq!(s.meta().format, format);
            assert_eq!(s.meta().encryption.as_ref().unwrap().aead, aead);
            let id = s.chunk_id(&data);
            s.put_ready_chunk(&s.prepare_chunk(chunk::encode(&data, id, 3, None).unwrap())).unwrap();
            s.backend().put_object("backups/x.verify", b"{}").unwrap();
            s.sync().unwrap();
            drop(s);
            // the objects below carry the format's seal version
            let mut raw = Vec::new();
            mem.get_chunk(&id, &mut raw).unwrap();
            assert_eq!(raw[raw.len() - 5], version);
            let obj = mem.get_object("backups/x.verify", 1000).unwrap().unwrap();
            assert_eq!(obj[obj.len() - 5], version);
            // reopened: reads what it wrote, and a meta claiming the other cipher is refused
            let unlock = Unlock { key_file: Some(&kf), passphrase: &pass("") };
            let s = Store::with_backend_unlocked(Box::new(mem.clone()), &unlock).unwrap();
            let (mut scratch, mut out) = (Vec::new(), Vec::new());
            s.load_chunk(&id, &mut scratch, &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(s.backend().get_object("backups/x.verify", 1000).unwrap().unwrap(), b"{}");
            drop(s);
            let mut meta = read_meta(&*mem).unwrap();
            meta.format = if format2 { 3 } else { 2 };
            mem.put_object(META_KEY, &serde_json::to_vec(&meta).unwrap()).unwrap();
            let e = Store::with_backend_unlocked(Box::new(mem.clone()), &unlock).err().unwrap();
            assert!(e.is_corruption(), "{e}");
        }
    }

    #[test]
    fn an_unencrypted_meta_is_unchanged() {
        let mem = Arc::new(MemoryBackend::new());
        Store::init_with_backend(Box::new(mem.clone()), &InitOptions::default()).unwrap();
        let text = String::from_utf8(mem.get_object(META_KEY, 1 << 20).unwrap().unwrap()).unwrap();
        assert!(!text.contains("encryption") && text.contains("\"format\": 1"), "{text}");
    }
}

/// Backup ids from the store: the probe from the caller's hint and the
/// listing it falls back to (see [`Store::claim_backup_id`]).
#[cfg(test)]
mod claim_tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;

    fn store() -> (Arc<MemoryBackend>, Store) {
        let mem = Arc::new(MemoryBackend::new());
        let s = Store::init_with_backend(Box::new(mem.clone()), &InitOptions::default()).unwrap();
        (mem, s)
    }

    #[test]
    fn ids_follow_each_other_from_a_current_hint() {
        let (_m, s) = store();
        let mut hint = 1;
        for want in 1..=5 {
            let id = s.claim_backup_id(hint).unwrap();
            assert_eq!(id, BackupId(want));
            hint = id.0 + 1;
        }
        // a hint above the store's ids is honoured
        assert_eq!(s.claim_backup_id(40).unwrap(), BackupId(40));
    }

    /// Another agent of a shared store claimed ids this catalog does not
    /// know: the probe steps over them (few), or lists (many).
    #[test]
    fn a_stale_hint_still_gets_an_id_above_every_claim() {
        let (_m, s) = store();
        for _ in 0..3 {
            s.claim_backup_id(1).unwrap();
        }
        assert_eq!(s.claim_backup_id(1).unwrap(), BackupId(4), "probed past 3 claims");
        for i in 5..=30 {
            assert_eq!(s.claim_backup_id(i).unwrap(), BackupId(i));
        }
        // 30 ids above the hint: more than CLAIM_PROBES, so the store is listed
        assert!(30 > CLAIM_PROBES as u64);
        assert_eq!(s.claim_backup_id(1).unwrap(), BackupId(31));
        // the failed probes left claims only on ids that were taken already
        let claims = s.backend.list_objects("backups/").unwrap().iter().filter(|n| n.ends_with(".claim")).count();
        assert_eq!(claims, 31);
    }

    /// A store written before ids were claimed has manifests, block maps
    /// and markers but no claims: none of their ids is handed out again,
    /// not even one whose only trace is a marker.
    #[test]
    fn ids_of_backups_without_claims_are_never_handed_out() {
        let (m, s) = store();
        m.put_object(&backup_key(BackupId(1), "json"), b"{}").unwrap();
        m.put_object(&backup_key(BackupId(2), "blockmap"), b"").unwrap();
        m.put_object(&backup_key(BackupId(3), "verify"), b"{}").unwrap();
        m.put_object(&backup_key(BackupId(4), "protected"), b"").unwrap();
        assert_eq!(s.claim_backup_id(1).unwrap(), BackupId(5));
        // and through the listing: a hint far below many old ids
        for i in 6..=20 {
            m.put_object(&backup_key(BackupId(i), "json"), b"{}").unwrap();
        }
        assert_eq!(s.claim_backup_id(1).unwrap(), BackupId(21));
    }
}

/// What a backup's cleanup removes on the directory store, and what it
/// leaves to GC.
#[cfg(test)]
mod clean_tmp_tests {
    use super::*;

    #[test]
    fn a_backup_removes_staged_chunks_and_gc_the_torn_manifest_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::init(&dir.path().join("s"), &InitOptions::default()).unwrap();
        let root = s.root().to_path_buf();
        std::fs::write(root.join("tmp/123-0-abc"), b"partial chunk").unwrap();
        std::fs::write(root.join("backups/.000000000009.json.tmp.1"), b"{").unwrap();
        assert_eq!(s.clean_tmp().unwrap(), 1, "the staged chunk");
        assert!(!root.join("tmp/123-0-abc").exists());
        assert!(root.join("backups/.000000000009.json.tmp.1").exists(), "left to gc");
        let lock = s.lock_exclusive().unwrap();
        assert_eq!(s.remove_temp_files(&lock).unwrap(), 1, "gc's cleanup");
        assert!(!root.join("backups/.000000000009.json.tmp.1").exists());
    }
}
