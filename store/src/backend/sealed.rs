//! A wrapper that seals every object of an encrypted store on its way to
//! any backend (directory, RADOS, S3, memory, fault), and opens and
//! authenticates it on the way back (layout in [`crate::crypto`]).
//!
//! Chunks are sealed with their id as associated data, metadata objects
//! with their key: an object altered, truncated, or copied over another
//! one fails to open, with an error naming it. The store meta
//! (`blockvault-store.json`) passes through as it is: it must be readable
//! without the key, and the store authenticates it itself after unlocking.
//!
//! Names, sizes (plus [`SEAL_OVERHEAD`]), listings, locks and deletes
//! pass through, so GC, quarantine and copying objects as they are work
//! on the inner backend unchanged. Raw access (a `store copy` that copies
//! sealed objects without the key) goes to the inner backend:
//! [`crate::Store::raw_backend`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::backend::{Backend, ChunkEntry, LockMode, StoreLock};
use crate::crypto::{chunk_ad, object_ad, Sealer, SEAL_OVERHEAD};
use crate::error::{Error, Result};
use crate::ChunkId;

/// Seals what it stores in `inner`, except the objects named in `plain`.
pub struct SealedBackend {
    inner: Arc<dyn Backend>,
    sealer: Sealer,
    plain: &'static [&'static str],
}

impl SealedBackend {
    /// Wraps `inner`; objects whose key is in `plain` are stored as they are.
    pub fn new(inner: Arc<dyn Backend>, sealer: Sealer, plain: &'static [&'static str]) -> SealedBackend {
        SealedBackend { inner, sealer, plain }
    }

    /// The backend below, which holds the sealed bytes.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// Seals an encoded chunk's bytes in place, for [`SealedBackend::put_sealed_chunk`]:
    /// what [`Backend::put_chunk`] does before it stores, done by the
    /// caller's thread. The backup pipeline seals in its parallel hash
    /// workers this way, so the single chunk-writer thread only writes, and
    /// no 4 MiB chunk is copied for sealing.
    pub fn seal_chunk(&self, id: &ChunkId, bytes: &mut Vec<u8>) {
        self.sealer.seal_in_place(&chunk_ad(id), bytes);
    }

    /// Stores a chunk that [`SealedBackend::seal_chunk`] sealed for `id`,
    /// as [`Backend::put_chunk`] would store its plaintext.
    ///
    /// # Errors
    /// As [`Backend::put_chunk`].
    pub fn put_sealed_chunk(&self, id: &ChunkId, sealed: &[u8]) -> Result<bool> {
        self.inner.put_chunk(id, sealed)
    }

    fn is_plain(&self, key: &str) -> bool {
        self.plain.contains(&key)
    }

    fn open_object(&self, key: &str, limit: u64, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
        let path = self.inner.object_name(key);
        if bytes.len() as u64 > limit.saturating_add(SEAL_OVERHEAD as u64) {
            return Err(Error::CorruptFile {
                path,
                reason: format!("the sealed object is longer than {limit} bytes of content"),
            });
        }
        self.sealer
            .open_in_place(&object_ad(key), &mut bytes)
            .map_err(|reason| Error::CorruptFile { path, reason })?;
        Ok(bytes)
    }
}

impl Backend for SealedBackend {
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn dir(&self) -> Option<&Path> {
        self.inner.dir()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn object_name(&self, key: &str) -> PathBuf {
        self.inner.object_name(key)
    }

    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        self.inner.chunk_exists(id)
    }
    fn chunk_group_stamp(&self, prefix: u16) -> Result<Option<u128>> {
        self.inner.chunk_group_stamp(prefix)
    }
    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        self.inner.put_chunk(id, &self.sealer.seal(&chunk_ad(id), bytes))
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn staged_bytes(&self) -> u64 {
        self.inner.staged_bytes()
    }
    fn sync_early(&self) -> Result<()> {
        self.inner.sync_early()
    }

    fn discard_pending(&self) {
        self.inner.discard_pending()
    }
    fn put_chunk_hot(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        self.inner.put_chunk_hot(id, &self.sealer.seal(&chunk_ad(id), bytes))
    }
    fn get_chunk_hot(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.inner.get_chunk_hot(id, out)?;
        self.sealer
            .open_in_place(&chunk_ad(id), out)
            .map_err(|reason| Error::CorruptChunk { id: *id, reason })
    }
    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        // The inner read is bounded by the largest chunk object; a sealed
        // chunk is its encoded chunk (at most header + one raw block, well
        // under that bound) plus the seal's overhead, so it always fits.
        self.inner.get_chunk(id, out)?;
        self.sealer
            .open_in_place(&chunk_ad(id), out)
            .map_err(|reason| Error::CorruptChunk { id: *id, reason })
    }
    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
        self.inner.list_chunks()
    }
    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.inner.delete_chunk(id)
    }
    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        self.inner.touch_chunk(id)
    }
    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        self.inner.chunk_modified(id)
    }
    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        self.inner.quarantine_chunk(id)
    }

    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        if self.is_plain(key) {
            return self.inner.get_object(key, limit);
        }
        match self.inner.get_object(key, limit.saturating_add(SEAL_OVERHEAD as u64))? {
            None => Ok(None),
            Some(b) => self.open_object(key, limit, b).map(Some),
        }
    }
    fn object_exists(&self, key: &str) -> Result<bool> {
        self.inner.object_exists(key)
    }
    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        if self.is_plain(key) {
            return self.inner.put_object(key, bytes);
        }
        self.inner.put_object(key, &self.sealer.seal(&object_ad(key), bytes))
    }
    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        if self.is_plain(key) {
            return self.inner.create_object(key, bytes);
        }
        self.inner.create_object(key, &self.sealer.seal(&object_ad(key), bytes))
    }
    fn delete_object(&self, key: &str) -> Result<bool> {
        self.inner.delete_object(key)
    }
    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list_objects(prefix)
    }
    fn remove_temp_files(&self) -> Result<usize> {
        self.inner.remove_temp_files()
    }
    fn remove_staged_temp_files(&self) -> Result<usize> {
        self.inner.remove_staged_temp_files()
    }
    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        self.inner.lock(name, mode, wait)
    }
    fn put_chunk_torn(&self, id: &ChunkId, bytes: &[u8], keep: usize) -> Error {
        self.inner.put_chunk_torn(id, &self.sealer.seal(&chunk_ad(id), bytes), keep)
    }
    fn put_object_torn(&self, key: &str, bytes: &[u8], keep: usize) -> Error {
        self.inner.put_object_torn(key, &self.sealer.seal(&object_ad(key), bytes), keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::crypto::DataKey;

    fn pair() -> (Arc<dyn Backend>, SealedBackend) {
        let inner: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let sealed = SealedBackend::new(inner.clone(), DataKey::generate().sealer(), &["meta"]);
        (inner, sealed)
    }

    #[test]
    fn objects_are_sealed_below_and_open_above() {
        let (inner, s) = pair();
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        s.put_chunk(&a, b"chunk a bytes").unwrap();
        s.put_chunk(&b, b"chunk b bytes").unwrap();
        s.sync().unwrap();
        s.put_object("backups/1.json", b"{\"manifest\":1}").unwrap();
        s.put_object("meta", b"plain meta").unwrap();
        let mut out = Vec::new();
        inner.get_chunk(&a, &mut out).unwrap();
        assert!(!out.windows(5).any(|w| w == b"chunk"));
        s.get_chunk(&a, &mut out).unwrap();
        assert_eq!(out, b"chunk a bytes");
        assert!(!inner.get_object("backups/1.json", 100).unwrap().unwrap().windows(8).any(|w| w == b"manifest"));
        assert_eq!(s.get_object("backups/1.json", 100).unwrap().unwrap(), b"{\"manifest\":1}");
        assert_eq!(inner.get_object("meta", 100).unwrap().unwrap(), b"plain meta");
        assert_eq!(s.get_object("meta", 100).unwrap().unwrap(), b"plain meta");
        assert!(s.get_object("backups/2.json", 100).unwrap().is_none());
        // a limit below the content is refused, not cut
        let e = s.get_object("backups/1.json", 4).unwrap_err().to_string();
        assert!(e.contains("backups/1.json") && e.contains("longer"), "{e}");
    }

    #[test]
    fn swapped_objects_fail_naming_the_object() {
        let (inner, s) = pair();
        s.put_object("backups/1.json", b"one").unwrap();
        s.put_object("backups/2.json", b"two").unwrap();
        let one = inner.get_object("backups/1.json", 100).unwrap().unwrap();
        inner.put_object("backups/2.json", &one).unwrap();
        let e = s.get_object("backups/2.json", 100).unwrap_err();
        assert!(e.is_corruption());
        let msg = e.to_string();
        assert!(msg.contains("backups/2.json") && msg.contains("authentication failed"), "{msg}");

        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        s.put_chunk(&a, b"aaaa").unwrap();
        s.sync().unwrap();
        let mut raw = Vec::new();
        inner.get_chunk(&a, &mut raw).unwrap();
        inner.put_chunk(&b, &raw).unwrap();
        inner.sync().unwrap();
        let e = s.get_chunk(&b, &mut raw).unwrap_err();
        assert!(matches!(e, Error::CorruptChunk { id, .. } if id == b), "{e}");
    }

    #[test]
    fn a_chunk_sealed_by_the_caller_reads_as_one_put_whole() {
        let (inner, s) = pair();
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let mut bytes = b"chunk a bytes".to_vec();
        s.seal_chunk(&a, &mut bytes);
        assert!(!bytes.windows(5).any(|w| w == b"chunk"));
        assert!(s.put_sealed_chunk(&a, &bytes).unwrap());
        s.sync().unwrap();
        assert!(!s.put_sealed_chunk(&a, &bytes).unwrap(), "put-if-absent as put_chunk");
        s.put_chunk(&b, b"chunk b bytes").unwrap();
        s.sync().unwrap();
        let mut out = Vec::new();
        s.get_chunk(&a, &mut out).unwrap();
        assert_eq!(out, b"chunk a bytes");
        // the two paths store the same layout: same length below
        let (mut ra, mut rb) = (Vec::new(), Vec::new());
        inner.get_chunk(&a, &mut ra).unwrap();
        inner.get_chunk(&b, &mut rb).unwrap();
        assert_eq!(ra.len(), rb.len());
        // sealed for one id, stored under another: refused on the way back
        let c = ChunkId::of(b"c");
        let mut wrong = b"chunk c bytes".to_vec();
        s.seal_chunk(&a, &mut wrong);
        s.put_sealed_chunk(&c, &wrong).unwrap();
        s.sync().unwrap();
        let e = s.get_chunk(&c, &mut out).unwrap_err();
        assert!(matches!(e, Error::CorruptChunk { id, .. } if id == c), "{e}");
    }
}
