//! `store copy`: an incremental, resumable, checked copy of a store (or of
//! some images' backups) into another store, of any kind (directory → S3
//! off-site, RADOS → directory, ...).
//!
//! The copy works on raw objects through the [`Backend`] trait: chunk
//! bytes go across as stored, never decoded, so a store whose objects are
//! sealed (encrypted) copies without its key, and the target is a replica
//! of the source (the same store meta, uuid included), restorable on its
//! own.
//!
//! Order, per backup, oldest first: every chunk of its block map that the
//! target lacks, then the block map, then its markers (protected,
//! verified), and **the manifest last**. A backup is in the target only
//! once its manifest is, and then everything it references is too: the
//! store invariant holds on the target at every moment, so a copy killed
//! at any point leaves a valid store, and the next run skips what is there
//! (chunks by id, backups by manifest) and copies only what was left.
//!
//! Every object written is read back from the target and compared with
//! the source's bytes (blake3); a mismatch stops the copy before the
//! backup's manifest is written. Both stores' locks are held shared for
//! the whole copy, so neither side's GC can remove a chunk the copy has
//! counted on (the target's chunks of a not yet copied manifest are
//! unreferenced there until it lands).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use blockvault_store::format::STORE_MARKER;
use blockvault_store::{Backend, BackupId, ChunkId, Store};
use serde::Serialize;

/// Parallel chunk copies: S3 and RADOS round trips overlap.
pub const COPY_THREADS: usize = 8;

/// What to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Only the backups of these images; empty: all.
    pub images: Vec<String>,
}

/// What a copy did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CopyReport {
    pub backups_copied: u64,
    pub backups_present: u64,
    pub chunks_copied: u64,
    pub chunks_present: u64,
    /// Bytes of chunk objects written to the target.
    pub chunk_bytes: u64,
    /// Block maps, manifests and markers written.
    pub objects_copied: u64,
}

fn backup_key(id: BackupId, ext: &str) -> String {
    format!("backups/{:012}.{ext}", id.0)
}

/// Makes `target` a replica of `src`'s store: writes the source's store
/// meta when the target has none, and refuses a target that is another
/// store. Returns the opened target.
///
/// # Errors
/// When the target holds a different store, or cannot be written.
pub fn open_target(src: &Store, target: Box<dyn Backend>) -> Result<Store> {
    let meta = src
        .backend()
        .get_object(STORE_MARKER, blockvault_store::format::MAX_MANIFEST_LEN)?
        .with_context(|| format!("store {} has no {STORE_MARKER}", src.root().display()))?;
    let where_ = target.location().display().to_string();
    match target.get_object(STORE_MARKER, blockvault_store::format::MAX_MANIFEST_LEN)? {
        Some(theirs) if theirs == meta => {}
        Some(theirs) => {
            let uuid = |b: &[u8]| {
                serde_json::from_slice::<serde_json::Value>(b)
                    .ok()
                    .and_then(|v| v.get("uuid").and_then(|u| u.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "?".into())
            };
            bail!(
                "{where_} holds another store (uuid {}, the source's is {}): a copy target must be empty or an \
                 earlier copy of the same store",
                uuid(&theirs),
                uuid(&meta)
            );
        }
        None => {
            if !target.create_object(STORE_MARKER, &meta)? {
                bail!("{where_}: another process created a store there while this copy started");
            }
        }
    }
    Ok(Store::with_backend(target)?)
}

/// Copies what `dst` lacks of `src` (see the module docs).
///
/// # Errors
/// The first failed read, write or check, naming the object; what was
/// copied before it stays (a later run resumes).
pub fn copy(src: &Store, dst: &Store, opts: &CopyOptions) -> Result<CopyReport> {
    let _src_lock = src.lock_shared_for_reading()?;
    let _dst_lock = dst.lock_shared()?;
    let mut report = CopyReport::default();
    // chunks known to be in the target (copied or seen) during this run
    let mut present: HashSet<ChunkId> = HashSet::new();
    let mut wanted_seen = HashSet::new();
    for id in src.list_backups()? {
        let manifest = src.read_manifest(id).with_context(|| format!("reading backup {id} on {}", src.root().display()))?;
        if !opts.images.is_empty() && !opts.images.iter().any(|i| *i == manifest.image) {
            continue;
        }
        wanted_seen.insert(manifest.image.clone());
        if dst.try_has_backup(id)? {
            report.backups_present += 1;
            continue;
        }
        let map = src.read_blockmap(&manifest).with_context(|| format!("reading backup {id}'s block map"))?;
        let mut todo: Vec<ChunkId> = Vec::new();
        let mut uniq = HashSet::new();
        for c in map.chunk_ids() {
            if !present.contains(c) && uniq.insert(*c) {
                todo.push(*c);
            }
        }
        let (copied, seen, bytes) = copy_chunks(src, dst, &todo)?;
        report.chunks_copied += copied;
        report.chunks_present += seen;
        report.chunk_bytes += bytes;
        present.extend(todo);
        dst.backend().sync()?;
        // block map and markers, then the manifest: the commit point
        let mut keys = vec![backup_key(id, "blockmap")];
        for ext in ["protected", "verify", "labels"] {
            if src.backend().object_exists(&backup_key(id, ext))? {
                keys.push(backup_key(id, ext));
            }
        }
        keys.push(backup_key(id, "json"));
        for key in keys {
            copy_object(src, dst, &key)?;
            report.objects_copied += 1;
        }
        report.backups_copied += 1;
        tracing::info!(backup = id.0, image = %manifest.image, chunks_copied = copied, "backup copied");
    }
    for i in &opts.images {
        if !wanted_seen.contains(i) {
            bail!("store {} has no backup of image '{i}'", src.root().display());
        }
    }
    Ok(report)
}

/// Copies one metadata object and checks it on the target.
fn copy_object(src: &Store, dst: &Store, key: &str) -> Result<()> {
    let limit = blockvault_store::format::MAX_CHUNK_OBJECT_LEN.max(1 << 30);
    let bytes = src
        .backend()
        .get_object(key, limit)?
        .with_context(|| format!("{} vanished during the copy", src.backend().object_name(key).display()))?;
    dst.backend().put_object(key, &bytes)?;
    let back = dst.backend().get_object(key, bytes.len() as u64)?;
    if back.as_deref().map(blake3::hash) != Some(blake3::hash(&bytes)) {
        bail!("{}: the copy reads back different bytes than were written", dst.backend().object_name(key).display());
    }
    Ok(())
}

/// Copies the chunks of `ids` the target lacks, on [`COPY_THREADS`]
/// threads; returns (copied, already present, bytes written).
fn copy_chunks(src: &Store, dst: &Store, ids: &[ChunkId]) -> Result<(u64, u64, u64)> {
    let next = AtomicU64::new(0);
    let (copied, seen, bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let failed = || first_err.lock().unwrap_or_else(|p| p.into_inner()).is_some();
    std::thread::scope(|sc| {
        for _ in 0..COPY_THREADS.min(ids.len()) {
            sc.spawn(|| {
                let (mut buf, mut back) = (Vec::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= ids.len() || failed() {
                        return;
                    }
                    let r = copy_chunk(src, dst, &ids[i], &mut buf, &mut back);
                    match r {
                        Ok(None) => {
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Some(n)) => {
                            copied.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
                            g.get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((copied.into_inner(), seen.into_inner(), bytes.into_inner()))
}

/// One chunk: `None` when the target has it, else the bytes written.
fn copy_chunk(src: &Store, dst: &Store, id: &ChunkId, buf: &mut Vec<u8>, back: &mut Vec<u8>) -> Result<Option<u64>> {
    let (s, d) = (src.backend(), dst.backend());
    if d.chunk_exists(id)? {
        return Ok(None);
    }
    s.get_chunk(id, buf).with_context(|| format!("reading chunk {id} from {}", src.root().display()))?;
    d.put_chunk(id, buf)?;
    // staged backends (a directory) make it visible at sync: check after it
    d.sync()?;
    d.get_chunk(id, back).with_context(|| format!("reading chunk {id} back from {}", dst.root().display()))?;
    if blake3::hash(back) != blake3::hash(buf) {
        bail!("chunk {id} on {}: the copy reads back different bytes than were written", dst.root().display());
    }
    Ok(Some(buf.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_store::backend::memory::MemoryBackend;
    use blockvault_store::{BlockMap, InitOptions, Manifest};

    fn backup(store: &Store, id: u64, image: &str, blocks: &[&[u8]]) {
        let bs = 64 * 1024;
        let mut map = BlockMap::new_zeroed(bs as u64 * blocks.len() as u64, bs);
        for (i, b) in blocks.iter().enumerate() {
            let mut plain = b.repeat(bs as usize / b.len());
            plain.resize(bs as usize, 0);
            let cid = ChunkId::of(&plain);
            let enc = blockvault_store::chunk::encode(&plain, cid, 1, None).unwrap();
            store.put_chunk(&enc).unwrap();
            map.set(i, Some(cid));
        }
        store.sync().unwrap();
        let mut m = Manifest::new(BackupId(id), image, &format!("file:/{image}"), bs).at("2026-01-01T00:00:00Z");
        store.write_backup(&mut m, &map).unwrap();
    }

    #[test]
    fn copies_only_what_the_target_lacks_and_resumes() {
        let src = Store::init_with_backend(Box::new(MemoryBackend::new()), &InitOptions::default()).unwrap();
        backup(&src, 1, "a", &[b"one", b"two"]);
        backup(&src, 2, "a", &[b"one", b"three"]);
        backup(&src, 3, "b", &[b"four"]);
        let target = MemoryBackend::new();
        let dst = open_target(&src, Box::new(target.reopen())).unwrap();
        // 64 KiB blocks: each block map is indexed (format 3), and its index
        // chunk is a chunk to copy like the blocks' own: backup 1 brings
        // one, two and its index; backup 2 three and its index
        let r = copy(&src, &dst, &CopyOptions { images: vec!["a".into()] }).unwrap();
        assert_eq!((r.backups_copied, r.chunks_copied, r.chunks_present), (2, 5, 0));
        for id in [1, 2] {
            // the indexed map reads on the target: its index chunks came along
            let m = dst.read_manifest(BackupId(id)).unwrap();
            assert_eq!(dst.read_blockmap(&m).unwrap(), src.read_blockmap(&src.read_manifest(BackupId(id)).unwrap()).unwrap());
        }
        assert!(!dst.has_backup(BackupId(3)));
        let r = copy(&src, &dst, &CopyOptions::default()).unwrap();
        assert_eq!((r.backups_copied, r.backups_present, r.chunks_copied), (1, 2, 2));
        let r = copy(&src, &dst, &CopyOptions::default()).unwrap();
        assert_eq!((r.backups_copied, r.chunks_copied, r.objects_copied), (0, 0, 0));
        // an interrupted copy: chunks there, no manifest; the rerun writes no chunk
        let dst2 = open_target(&src, Box::new(MemoryBackend::new())).unwrap();
        for c in src.read_blockmap(&src.read_manifest(BackupId(1)).unwrap()).unwrap().chunk_ids() {
            let mut b = Vec::new();
            src.backend().get_chunk(c, &mut b).unwrap();
            dst2.backend().put_chunk(c, &b).unwrap();
        }
        dst2.backend().sync().unwrap();
        let r = copy(&src, &dst2, &CopyOptions { images: vec!["a".into()] }).unwrap();
        assert_eq!((r.chunks_copied, r.chunks_present), (2, 3));
        // another store is refused
        let other = Store::init_with_backend(Box::new(MemoryBackend::new()), &InitOptions::default()).unwrap();
        let Err(e) = open_target(&other, Box::new(target.reopen())) else { panic!("another store was accepted") };
        let e = e.to_string();
        assert!(e.contains("another store"), "{e}");
        assert!(copy(&src, &dst, &CopyOptions { images: vec!["zz".into()] }).is_err());
    }
}
