//! The manifest: the self-describing record of one backup in the store.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{MAX_MANIFEST_LEN, MANIFEST_VERSION, MANIFEST_VERSION_SET};
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
    /// The set this backup belongs to (a `[[group]]` of images snapshotted
    /// at one point in time); only in manifests of format
    /// [`MANIFEST_VERSION_SET`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<SetRef>,
}

/// Membership of a backup in a set: the backups of every image of a group,
/// taken between one pre-snapshot and one post-snapshot hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRef {
    /// The group's name.
    pub group: String,
    /// The set's id: the id of the backup allocated first for it (unique in
    /// the store, like every backup id).
    pub id: BackupId,
    /// Every image of the set, in the group's order: the set is complete
    /// when each has a committed backup with this set id.
    pub images: Vec<String>,
}

impl Manifest {
    /// The format version a manifest with these fields is written as:
    /// [`MANIFEST_VERSION_SET`] with a set, else [`MANIFEST_VERSION`].
    pub fn version_for(set: Option<&SetRef>) -> u32 {
        if set.is_some() {
            MANIFEST_VERSION_SET
        } else {
            MANIFEST_VERSION
        }
    }
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
            set: None,
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
        // version 1 (no set) is still read; a version-2 document must carry
        // its set and a version-1 one must not
        let ok = match m.format {
            MANIFEST_VERSION => m.set.is_none(),
            MANIFEST_VERSION_SET => m.set.is_some(),
            _ => false,
        };
        if !ok {
            if m.format == MANIFEST_VERSION || m.format == MANIFEST_VERSION_SET {
                return Err(Error::CorruptFile {
                    path: path.to_path_buf(),
                    reason: format!("manifest format {} with{} a set record", m.format, if m.set.is_some() { "" } else { "out" }),
                });
            }
            return Err(Error::UnsupportedVersion { path: path.to_path_buf(), found: m.format, supported: MANIFEST_VERSION_SET });
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
        if let Some(set) = &self.set {
            check_image_name(&set.group).map_err(|e| format!("group name {e}"))?;
            if set.images.is_empty() || set.images.len() > 1024 {
                return Err(format!("set {} of group '{}' names {} images", set.id, set.group, set.images.len()));
            }
            for i in &set.images {
                check_image_name(i).map_err(|e| format!("set member {e}"))?;
            }
            if !set.images.contains(&self.image) {
                return Err(format!("set {} of group '{}' does not name the manifest's image", set.id, set.group));
            }
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
    fn set_members_are_format_2_and_format_1_is_still_read() {
        let p = Path::new("backups/000000000009.json");
        let base = r#""id": 9, "image": "a", "source": "rbd:p/a", "created": "2026-12-01T10:00:00Z",
            "finished": "2026-12-01T10:00:01Z", "parent": null, "image_size": 4096, "block_size": 65536,
            "blockmap_blake3": "", "snapshot": "blockvault-x""#;
        let set = r#", "set": {"group": "vm", "id": 9, "images": ["a", "b"]}"#;
        let v1 = Manifest::parse(p, format!("{{\"format\": 1, {base}}}").as_bytes()).unwrap();
        assert!(v1.set.is_none());
        assert_eq!(Manifest::version_for(v1.set.as_ref()), 1);
        let v2 = Manifest::parse(p, format!("{{\"format\": 2, {base}{set}}}").as_bytes()).unwrap();
        assert_eq!(v2.set.as_ref().unwrap().images, ["a", "b"]);
        assert_eq!(Manifest::version_for(v2.set.as_ref()), MANIFEST_VERSION_SET);
        assert!(v2.check().is_ok());
        // a round trip keeps the set; a version-1 document never carries one
        let again = Manifest::parse(p, &serde_json::to_vec(&v2).unwrap()).unwrap();
        assert_eq!(again, v2);
        assert!(serde_json::to_string(&v1).unwrap().find("\"set\"").is_none());
        for bad in [format!("{{\"format\": 1, {base}{set}}}"), format!("{{\"format\": 2, {base}}}")] {
            let e = Manifest::parse(p, bad.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("set record"), "{e}");
        }
        let e = Manifest::parse(p, format!("{{\"format\": 3, {base}{set}}}").as_bytes()).unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { found: 3, .. }), "{e}");
        // a set that does not name the manifest's image is refused
        let other = r#", "set": {"group": "vm", "id": 9, "images": ["b"]}"#;
        let m = Manifest::parse(p, format!("{{\"format\": 2, {base}{other}}}").as_bytes()).unwrap();
        assert!(m.check().unwrap_err().contains("does not name"));
    }

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
