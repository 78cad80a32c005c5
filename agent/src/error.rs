//! Errors that callers branch on: [`BackupError`] on the backup path,
//! [`Error`] on lookup (IMAGE@ID), restore and verify. Everything else
//! travels as `anyhow::Error` with context; these sit inside that chain,
//! and [`BackupError::find`] / [`Error::find`] dig them out.

use blockvault_catalog::BackupState;
use blockvault_store::BackupId;

/// Errors of lookup, restore and verify that a caller (the CLI, the
/// daemon, a test) branches on. Each names the object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `IMAGE@ID` with an `ID` that is not a number.
    #[error("'{spec}': the backup id after '@' must be a number")]
    BadBackupRef { spec: String },
    /// Neither the config nor the catalog knows the image.
    #[error("image '{image}' is neither configured nor in the catalog")]
    ImageNotFound { image: String },
    /// The image has no committed backup (the latest was asked for).
    #[error("image '{image}' has no committed backup")]
    NoCommittedBackup { image: String },
    /// No backup with this id exists for this image.
    #[error("backup {id} does not exist for image '{image}' (see `blockvault list {image}`)")]
    BackupNotFound { image: String, id: BackupId },
    /// The backup exists but belongs to another image.
    #[error("backup {id} belongs to image '{actual}', not '{image}' (see `blockvault list`)")]
    WrongImage { image: String, id: BackupId, actual: String },
    /// The backup exists but is not committed (running, failed).
    #[error("backup {id} of image '{image}' is {state:?}, not committed")]
    NotCommitted { image: String, id: BackupId, state: BackupState },
    /// A lock another process holds: `lock` is its name in the store,
    /// `message` says who holds it and what to do.
    #[error("{message}")]
    Locked { lock: String, message: String },
    /// Stored data that does not decode or does not match its checksum:
    /// `object` is the chunk or file.
    #[error("{object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    /// Stored data that should be there and is not.
    #[error("{object} is missing from the store")]
    Missing { object: String },
    /// The cancel flag was set (SIGTERM, SIGINT, daemon shutdown).
    #[error("{operation} cancelled")]
    Cancelled { operation: String },
    /// The catalog failed (I/O, a damaged file) while looking something up.
    #[error(transparent)]
    Catalog(#[from] blockvault_catalog::Error),
}

impl Error {
    /// The `Error` in an error's chain, if any.
    pub fn find(e: &anyhow::Error) -> Option<&Error> {
        e.chain().find_map(|c| c.downcast_ref::<Error>())
    }

    /// A store error as the agent reports it: corruption and missing
    /// chunks become [`Error::Corrupt`] / [`Error::Missing`] (same
    /// message), anything else stays the store's error.
    pub fn from_store(e: blockvault_store::Error) -> anyhow::Error {
        use blockvault_store::Error as S;
        match e {
            S::CorruptChunk { id, reason } => Error::Corrupt { object: format!("chunk {id}"), reason }.into(),
            S::CorruptFile { path, reason } => Error::Corrupt { object: path.display().to_string(), reason }.into(),
            S::ChunkMissing { id } => Error::Missing { object: format!("chunk {id}") }.into(),
            e => e.into(),
        }
    }

    /// `e` with a cancellation of the pool ([`BackupError::Cancelled`])
    /// turned into `Cancelled { operation }`; other errors unchanged.
    pub fn cancelled_as(e: anyhow::Error, operation: impl FnOnce() -> String) -> anyhow::Error {
        if BackupError::is_cancelled(&e) {
            Error::Cancelled { operation: operation() }.into()
        } else {
            e
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The cancel flag was set (SIGTERM, SIGINT, daemon shutdown): nothing
    /// of the backup is committed.
    #[error("backup cancelled")]
    Cancelled,
    /// Another process holds the image lock.
    #[error("another backup of image '{image}' is running")]
    Locked { image: String },
    /// A sampled block the diff called unchanged differs from the parent
    /// backup: the diff is not trusted, and the backup reads everything.
    #[error("the diff of {image} is not trusted: block {block} differs from parent backup {parent} although the diff called it unchanged")]
    UntrustedDiff { image: String, block: usize, parent: BackupId },
}

impl BackupError {
    /// The `BackupError` in an error's chain, if any.
    pub fn find(e: &anyhow::Error) -> Option<&BackupError> {
        e.chain().find_map(|c| c.downcast_ref::<BackupError>())
    }

    /// Whether `e` is (or was caused by) a cancellation (of a backup, or of
    /// a restore or verify: [`Error::Cancelled`]).
    pub fn is_cancelled(e: &anyhow::Error) -> bool {
        e.chain().any(|c| {
            matches!(c.downcast_ref::<BackupError>(), Some(BackupError::Cancelled))
                || matches!(c.downcast_ref::<Error>(), Some(Error::Cancelled { .. }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_backup_error_is_found_under_context() {
        let e = Err::<(), _>(anyhow::Error::from(BackupError::Cancelled))
            .context("backup 3 of image 'a' failed")
            .unwrap_err();
        assert!(BackupError::is_cancelled(&e));
        assert_eq!(format!("{e:#}"), "backup 3 of image 'a' failed: backup cancelled");
        let other = anyhow::anyhow!("disk full").context("writing chunk");
        assert!(BackupError::find(&other).is_none());
    }

    #[test]
    fn store_corruption_becomes_a_typed_error_with_the_same_message() {
        let id = blockvault_store::ChunkId::of(b"x");
        let store_err = blockvault_store::Error::CorruptChunk { id, reason: "bad payload checksum".into() };
        let want = store_err.to_string();
        let e = Error::from_store(store_err).context("restoring block 3");
        assert!(matches!(Error::find(&e), Some(Error::Corrupt { object, .. }) if object == &format!("chunk {id}")), "{e:#}");
        assert_eq!(format!("{e:#}"), format!("restoring block 3: {want}"));
        let e = Error::from_store(blockvault_store::Error::ChunkMissing { id });
        assert!(matches!(Error::find(&e), Some(Error::Missing { .. })), "{e:#}");
        let e = Error::cancelled_as(BackupError::Cancelled.into(), || "restore of backup 4".into());
        assert_eq!(e.to_string(), "restore of backup 4 cancelled");
        assert!(BackupError::is_cancelled(&e));
    }
}
