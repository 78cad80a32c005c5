//! The parent's chunk check: every distinct chunk a parent's block map
//! references must be in the store before a backup inherits its blocks (a
//! lost chunk must never spread into new backups).
//!
//! A lookup per chunk is 262,144 path walks for a 16 GiB image at 64 KiB
//! blocks, most of a small incremental's CPU. A memo makes the next check
//! cheap: for each chunk group whose chunks were all found, the group's
//! stamp ([`Backend::chunk_group_stamp`], a shard directory's inode and
//! ctime in a directory store), taken before its chunks were looked up.
//! The next check of a parent whose every chunk was seen in the store after
//! those stamps were taken skips each group whose stamp is unchanged:
//! nothing was added to it or removed from it since. Those parents are the
//! backup that made the memo (its chunks were inherited from the checked
//! parent, found by a lookup or written, all after the stamps) and the
//! parent it checked. Groups that changed, and backends without stamps,
//! are looked up chunk by chunk.
//!
//! The memo lives beside the catalog (host-local, a cache): it names the
//! store, the image and both backups, and is checksummed; anything else is
//! ignored and the check looks every chunk up.
//!
//! [`Backend::chunk_group_stamp`]: blockvault_store::Backend::chunk_group_stamp

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Result;
use blockvault_store::{BackupId, BlockMap, ChunkChecker, ChunkId};
use tracing::debug;

use crate::pipeline::KnownChunks;
use crate::pool;

/// Chunk groups: the first two bytes of an id.
const GROUPS: usize = 1 << 16;
const MEMO_MAGIC: &[u8; 8] = b"BVMEMO1\n";

/// What a check found.
#[derive(Debug)]
pub struct Checked {
    /// The map's distinct block chunk ids, sorted.
    pub known: KnownChunks,
    /// Those the store lacks, sorted.
    pub missing: Vec<ChunkId>,
    /// For a memo: each group's stamp where every chunk looked up was
    /// found (or the group was vouched for), 0 elsewhere.
    pub stamps: Vec<u128>,
    /// Chunks skipped because their group's stamp had not changed.
    pub vouched: usize,
}

/// The map's distinct block chunk ids (see [`KnownChunks`]), checked on
/// `threads` threads, group by group. `memo`: stamps of a memo that vouches
/// for this map (see the module's text). Without `stamp`, no group stamp
/// is taken (nothing will keep them): every chunk is looked up.
///
/// # Errors
/// A store error other than "not found".
pub fn check(store: &ChunkChecker, map: &BlockMap, threads: usize, memo: Option<&[u128]>, stamp: bool) -> Result<Checked> {
    /// Groups per work item: one channel message per group would cost
    /// more than the lookups of a small group.
    const GROUPS_PER_ITEM: usize = 64;
    // the blocks' chunks: the index chunks of an indexed map are checked,
    // and rewritten when missing, by the commit of the map that reuses them
    let known = KnownChunks::of_map(map);
    let ids = known.ids();
    let mut groups: Vec<(u16, &[ChunkId])> = Vec::new();
    let mut start = 0;
    while start < ids.len() {
        let prefix = group_of(&ids[start]);
        let len = ids[start..].partition_point(|id| group_of(id) == prefix);
        groups.push((prefix, &ids[start..start + len]));
        start += len;
    }
    let memo = memo.filter(|m| m.len() == GROUPS);
    let found = Mutex::new((Vec::new(), Vec::new(), 0usize));
    let never = AtomicBool::new(false);
    pool::for_each(&never, "chunk check", threads, threads * 2, groups.chunks(GROUPS_PER_ITEM), || (), |_, part: &[(u16, &[ChunkId])]| {
        let (mut missing, mut stamps, mut vouched) = (Vec::new(), Vec::new(), 0);
        for &(prefix, ids) in part {
            // the stamp first: a chunk removed after it changes it
            let stamp = if stamp || memo.is_some() { store.group_stamp(prefix)? } else { None };
            if let (Some(s), Some(m)) = (stamp, memo) {
                if m[prefix as usize] == s {
                    vouched += ids.len();
                    continue;
                }
            }
            let before = missing.len();
            for id in ids {
                if !store.has_chunk(id)? {
                    missing.push(*id);
                }
            }
            if let (Some(s), true) = (stamp, missing.len() == before) {
                stamps.push((prefix, s));
            }
        }
        let mut f = found.lock().unwrap_or_else(|p| p.into_inner());
        f.0.extend(missing);
        f.1.extend(stamps);
        f.2 += vouched;
        Ok(())
    })?;
    let (mut missing, new, vouched) = found.into_inner().unwrap_or_else(|p| p.into_inner());
    missing.sort();
    let mut stamps = vec![0u128; GROUPS];
    if let Some(m) = memo {
        // a vouched-for group keeps its stamp
        for &(prefix, _) in &groups {
            stamps[prefix as usize] = m[prefix as usize];
        }
    }
    for (prefix, s) in new {
        stamps[prefix as usize] = s;
    }
    Ok(Checked { known, missing, stamps, vouched })
}

fn group_of(id: &ChunkId) -> u16 {
    let b = id.as_bytes();
    (u16::from(b[0]) << 8) | u16::from(b[1])
}

/// The stamps a check left, for the next backup of one image.
#[derive(Debug, PartialEq)]
pub struct Memo {
    /// The store's uuid.
    pub store: String,
    pub image_id: i64,
    /// The backup whose check made the memo…
    pub made_by: BackupId,
    /// …and the parent it checked.
    pub checked: BackupId,
    /// [`Checked::stamps`] (on disk only the nonzero ones, with their
    /// group: 18 bytes each, ~1.1 MiB for a 16 GiB image at 64 KiB blocks).
    pub stamps: Vec<u128>,
}

impl Memo {
    /// Where the memo of `image_id` lives for the catalog at `catalog`.
    pub fn path(catalog: &Path, image_id: i64) -> PathBuf {
        let mut dir = catalog.as_os_str().to_owned();
        dir.push(".memo");
        PathBuf::from(dir).join(format!("parent-check-{image_id}"))
    }

    /// The stamps, if the memo at `path` is intact, of store `store` and
    /// image `image_id`, and vouches for `parent`'s chunks: `parent` is the
    /// backup that made it or the parent that backup checked.
    pub fn load_for(path: &Path, store: &str, image_id: i64, parent: BackupId) -> Option<Vec<u128>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                debug!(memo = %path.display(), error = %e, "parent check memo not read: every chunk is looked up");
                return None;
            }
        };
        match Memo::decode(&bytes) {
            Some(m) if m.store == store && m.image_id == image_id && (m.made_by == parent || m.checked == parent) => Some(m.stamps),
            Some(m) => {
                debug!(memo = %path.display(), made_by = m.made_by.0, checked = m.checked.0, parent = parent.0,
                    "parent check memo is of another backup: every chunk is looked up");
                None
            }
            None => {
                debug!(memo = %path.display(), "parent check memo is damaged: every chunk is looked up");
                None
            }
        }
    }

    /// Writes the memo (a cache: not made durable; a torn or lost one is
    /// only ignored).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = path.parent().expect("a memo path has a directory");
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r?,
        }
        let mut tmp = tempfile::Builder::new().prefix(".memo-").permissions(std::fs::Permissions::from_mode(0o600)).tempfile_in(dir)?;
        tmp.write_all(&self.encode())?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.store.len() + self.stamps.len() * 18 + 32);
        out.extend_from_slice(MEMO_MAGIC);
        out.extend_from_slice(&(self.store.len() as u32).to_le_bytes());
        out.extend_from_slice(self.store.as_bytes());
        out.extend_from_slice(&self.image_id.to_le_bytes());
        out.extend_from_slice(&self.made_by.0.to_le_bytes());
        out.extend_from_slice(&self.checked.0.to_le_bytes());
        // only the groups with a stamp: a small image's memo stays small
        let kept: Vec<(usize, &u128)> = self.stamps.iter().enumerate().filter(|(_, s)| **s != 0).collect();
        out.extend_from_slice(&(kept.len() as u32).to_le_bytes());
        for (prefix, s) in kept {
            out.extend_from_slice(&(prefix as u16).to_le_bytes());
            out.extend_from_slice(&s.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Memo> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader(body);
        if r.take(8)? != MEMO_MAGIC {
            return None;
        }
        let store_len = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        let store = String::from_utf8(r.take(store_len)?.to_vec()).ok()?;
        let image_id = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let made_by = BackupId(u64::from_le_bytes(r.take(8)?.try_into().ok()?));
        let checked = BackupId(u64::from_le_bytes(r.take(8)?.try_into().ok()?));
        let n = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        if n > GROUPS || r.0.len() != n * 18 {
            return None;
        }
        let mut stamps = vec![0u128; GROUPS];
        for e in r.0.chunks_exact(18) {
            let prefix = u16::from_le_bytes([e[0], e[1]]) as usize;
            stamps[prefix] = u128::from_le_bytes(e[2..].try_into().expect("16 bytes"));
        }
        Some(Memo { store, image_id, made_by, checked, stamps })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memo() -> Memo {
        let mut stamps = vec![0u128; GROUPS];
        stamps[7] = 42;
        stamps[GROUPS - 1] = u128::MAX;
        Memo { store: "uuid-1".into(), image_id: 3, made_by: BackupId(9), checked: BackupId(8), stamps }
    }

    #[test]
    fn memo_reads_back_only_for_its_store_image_and_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = Memo::path(&dir.path().join("catalog.sqlite"), 3);
        memo().save(&path).unwrap();
        assert_eq!(Memo::decode(&std::fs::read(&path).unwrap()), Some(memo()));
        // only the groups with a stamp are written
        assert!(std::fs::metadata(&path).unwrap().len() < 200, "a memo of two stamps is small");
        assert_eq!(Memo::load_for(&path, "uuid-1", 3, BackupId(9)).unwrap()[7], 42);
        assert!(Memo::load_for(&path, "uuid-1", 3, BackupId(8)).is_some());
        assert!(Memo::load_for(&path, "uuid-1", 3, BackupId(10)).is_none());
        assert!(Memo::load_for(&path, "uuid-2", 3, BackupId(9)).is_none());
        assert!(Memo::load_for(&path, "uuid-1", 4, BackupId(9)).is_none());
    }

    #[test]
    fn damaged_memo_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = Memo::path(&dir.path().join("catalog.sqlite"), 3);
        memo().save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        for at in [0, 20, bytes.len() / 2, bytes.len() - 1] {
            bytes[at] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
            assert!(Memo::load_for(&path, "uuid-1", 3, BackupId(9)).is_none(), "flipped byte {at}");
            bytes[at] ^= 1;
        }
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Memo::load_for(&path, "uuid-1", 3, BackupId(9)).is_none());
    }
}
