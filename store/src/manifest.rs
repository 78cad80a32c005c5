//! The manifest: the self-describing record of one backup in the store.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{MAX_MANIFEST_LEN, MANIFEST_VERSION};
use crate::BackupId;

/// Counters of one backup run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupStats {
    /// Bytes read from the source (of a patched block, only its changed
    /// extents).
    pub read_bytes: u64,
    /// Blocks read and hashed.
    pub read_blocks: u64,
    /// Blocks found to be all zeros (read, or known as holes or discards).
    pub zero_blocks: u64,
    /// Blocks taken from the parent block map without reading.
    pub inherited_blocks: u64,
    /// Blocks read whose chunk the store already had.
    pub dedup_blocks: u64,
    /// Chunks this backup added to the store.
    pub new_chunks: u64,
    /// Stored (compressed, framed) bytes of the new chunks.
    pub new_bytes: u64,
    /// Plaintext bytes of the new chunks.
    pub new_plain_bytes: u64,
    /// True when the backup read every allocated extent instead of a diff.
    pub full_read: bool,
    /// Wall time of the backup in milliseconds.
    pub duration_ms: u64,
    /// Blocks built from the parent's chunk with only their changed extents
    /// read from the source (RBD incrementals). Absent in manifests written
    /// before it existed: 0.
    pub patched_blocks: u64,
}

/// One backup as the store knows it. Written as JSON after the block map;
/// its presence means the backup is complete and every chunk it references
/// is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version (`format::MANIFEST_VERSION`).
    pub format: u32,
    pub id: BackupId,
    pub image: String,
    /// The source as configured, e.g. `file:/srv/disk.img` or `rbd:pool/img`.
    pub source: String,
    /// RFC 3339 UTC time when the backup started.
    pub created: String,
    /// RFC 3339 UTC time when the backup's data was complete.
    pub finished: String,
    pub parent: Option<BackupId>,
    pub image_size: u64,
    pub block_size: u32,
    /// blake3 of the encoded block map file, hex.
    pub blockmap_blake3: String,
    /// Name of the RBD snapshot the backup was read from, if any.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub stats: BackupStats,
    /// Geometry of an RBD source, so a restore to RBD can recreate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdInfo>,
}

/// What a restore to RBD needs to recreate the source image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdInfo {
    /// RBD feature bits of the source image.
    pub features: u64,
    /// Object size of the source image in bytes.
    pub object_size: u64,
}

impl Manifest {
    /// The manifest of backup `id` of `image` read from `source`, in the
    /// current format, before it is written: no parent, no snapshot, no
    /// times or counters yet; [`crate::Store::write_backup`] fills in the
    /// image size and the block map's checksum.
    pub fn new(id: BackupId, image: &str, source: &str, block_size: u32) -> Manifest {
        Manifest {
            format: MANIFEST_VERSION,
            id,
            image: image.into(),
            source: source.into(),
            created: String::new(),
            finished: String::new(),
            parent: None,
            image_size: 0,
            block_size,
            blockmap_blake3: String::new(),
            snapshot: None,
            stats: BackupStats::default(),
            rbd: None,
        }
    }

    /// This manifest with `time` (RFC 3339) as its start and finish times.
    #[must_use]
    pub fn at(mut self, time: &str) -> Manifest {
        self.created = time.into();
        self.finished = time.into();
        self
    }

    /// Parses and checks a manifest file's bytes; `path` names it in errors.
    /// The length is checked before parsing (a manifest is at most
    /// `format::MAX_MANIFEST_LEN` bytes), then the JSON, then the version.
    ///
    /// # Errors
    /// `CorruptFile` when too large or not a manifest, `UnsupportedVersion`.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() as u64 > MAX_MANIFEST_LEN {
            return Err(Error::CorruptFile {
                path: path.to_path_buf(),
                reason: format!("at least {} bytes, larger than any manifest ({MAX_MANIFEST_LEN} bytes at most)", bytes.len()),
            });
        }
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::CorruptFile { path: path.to_path_buf(), reason: e.to_string() })?;
        if m.format != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion { path: path.to_path_buf(), found: m.format, supported: MANIFEST_VERSION });
        }
        Ok(m)
    }
}

/// Checks an image name: 1 to 200 of letters, digits and `-_.:+`, not
/// starting with `.`. The config applies it to configured names and the
/// store to every manifest it reads, so a name read from the store never
/// carries a newline, an escape code or a path separator into output,
/// file names or the catalog.
///
/// # Errors
/// A message that says what is wrong (with the name escaped).
pub fn check_image_name(name: &str) -> Result<(), String> {
    check_name(name, "may only use letters, digits and - _ . : + (and not start with '.')")
}

fn check_name(name: &str, rule: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!("'{}' must be 1 to 200 characters", name.escape_debug()));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c)) || name.starts_with('.') {
        return Err(format!("'{}' {rule}", name.escape_debug()));
    }
    Ok(())
}

impl Manifest {
    /// Checks the fields a manifest brings into output and the catalog:
    /// the image name and the snapshot name (blockvault's own snapshot
    /// names follow the image-name rule), a source without control
    /// characters, and RFC 3339 times.
    ///
    /// # Errors
    /// A message naming the bad field, its value escaped.
    pub fn check(&self) -> Result<(), String> {
        check_image_name(&self.image).map_err(|e| format!("image name {e}"))?;
        if let Some(s) = &self.snapshot {
            check_name(s, "is not a snapshot name blockvault makes").map_err(|e| format!("snapshot name {e}"))?;
        }
        if self.source.is_empty() || self.source.len() > 4096 || self.source.chars().any(char::is_control) {
            return Err(format!("source '{}' is empty, too long or holds control characters", self.source.escape_debug()));
        }
        for (what, t) in [("created", &self.created), ("finished", &self.finished)] {
            if chrono::DateTime::parse_from_rfc3339(t).is_err() {
                return Err(format!("{what} time '{}' is not an RFC 3339 time", t.escape_debug()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_manifest_is_refused_before_parsing() {
        // valid JSON padded past the limit: refused on its length
        let mut big = b"{\"format\": 1".to_vec();
        big.resize(MAX_MANIFEST_LEN as usize + 1, b' ');
        big.push(b'}');
        let msg = Manifest::parse(Path::new("backups/000000000001.json"), &big).unwrap_err().to_string();
        assert!(msg.contains("000000000001.json") && msg.contains("larger than any manifest"), "{msg}");
    }
}
