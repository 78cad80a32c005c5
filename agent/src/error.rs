//! Errors of the backup path that callers branch on. Everything else travels
//! as `anyhow::Error` with context; these sit inside that chain, and
//! [`BackupError::find`] digs them out.

use blockvault_store::BackupId;

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

    /// Whether `e` is (or was caused by) a cancellation.
    pub fn is_cancelled(e: &anyhow::Error) -> bool {
        matches!(Self::find(e), Some(BackupError::Cancelled))
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
}
