//! Labels and a note on a backup: `backups/<id>.labels`, a small JSON
//! object written atomically, beside the manifest. No object means no
//! labels and no note (every backup written before it existed), so the
//! manifest format and older stores are unchanged. Set by `backup --label
//! --note`, changed later by `label` and `note`; copied by `store copy`,
//! removed with the backup, read by a catalog rebuild through the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Contents of a `.labels` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotations {
    /// `key = value` labels, sorted by key.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Annotations {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.note.is_none()
    }
}
