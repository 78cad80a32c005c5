//! The verify marker `backups/<id>.verify`: the result of the last verify
//! of a backup, kept in the store so a rebuilt catalog keeps it. A small
//! JSON object, written atomically. No marker means "unverified" (stores
//! written before the marker existed have none).

use serde::{Deserialize, Serialize};

/// What a verify found about one backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyResult {
    Ok,
    Invalid,
}

/// Contents of a `.verify` marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyMark {
    pub state: VerifyResult,
    /// RFC 3339 UTC time of the verify that set it.
    pub at: String,
    /// Why the backup is invalid (the first finding), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For an invalid backup: the least check that can find it sound again
    /// (and so clear the mark). Absent in marks written before this field
    /// existed: those need `--deep` (and `--source` for an RBD backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recheck: Option<Recheck>,
}

/// Which verify can clear an `invalid` mark, from the least to the most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recheck {
    /// A plain verify: manifests, block maps, chunk existence (a chunk that
    /// was missing, a manifest that did not read).
    Metadata,
    /// `verify --deep`: chunk contents (a corrupt or unreadable chunk).
    Deep,
    /// `verify --deep --source`: the RBD snapshot (a source mismatch).
    Source,
}
