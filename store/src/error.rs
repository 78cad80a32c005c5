//! Errors of the store crate. Every variant names the object that failed.

use std::path::PathBuf;

use crate::ChunkId;

/// Result alias for store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
///
/// Corruption (`Corrupt*`) is kept apart from I/O (`Io`): a corrupt object
/// will never read correctly again, an I/O error may be transient.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {op} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {id} is missing from the store")]
    ChunkMissing { id: ChunkId },
    #[error("chunk {id} is corrupt: {reason}")]
    CorruptChunk { id: ChunkId, reason: String },
    #[error("{path} is corrupt: {reason}")]
    CorruptFile { path: PathBuf, reason: String },
    #[error("{path} is not a blockvault store (no {marker})")]
    NotAStore { path: PathBuf, marker: &'static str },
    #[error("{path} already holds a blockvault store")]
    AlreadyExists { path: PathBuf },
    #[error("{path}: store format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("backup {id} already exists in the store")]
    BackupExists { id: u64 },
    #[error("backup {id} is not in the store")]
    BackupMissing { id: u64 },
    #[error("invalid setting {key}: {reason}")]
    InvalidSetting { key: &'static str, reason: String },
    /// A lease-based lock (RADOS) ran out before it was renewed: others may
    /// hold it now, so what it protected must not go ahead.
    #[error("lost the store lock {lock}: its lease expired before it was renewed (the process was paused, or the cluster out of reach, for longer than the lease)")]
    LockLost { lock: String },
    #[error("writer is poisoned by an earlier failed write; refusing further writes")]
    Poisoned,
    #[error("store {path} is encrypted: set [store] key-file to one of its key files")]
    KeyRequired { path: PathBuf },
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("key file {key_file} does not open store {store}: {reason}")]
    WrongKey { store: PathBuf, key_file: PathBuf, reason: String },
    #[error("store {path} is not encrypted: it has no keys")]
    NotEncrypted { path: PathBuf },
    /// A backup whose manifest or block map does not read, met where every
    /// backup's chunk references must be known (garbage collection).
    #[error("backup {id} cannot be read, so the chunks it references are unknown")]
    BackupUnreadable {
        id: u64,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True when the error means the stored data is damaged (as opposed to an
    /// I/O failure or a missing object).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::CorruptChunk { .. } | Error::CorruptFile { .. })
    }
}
