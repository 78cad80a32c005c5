//! Random-access reads of one committed backup.
//!
//! A [`BackupReader`] reads the block map once (checked against the
//! manifest's checksum and geometry), then serves `read_at` from verified
//! chunks: every chunk is loaded through [`Store::load_chunk`], which never
//! returns bytes that do not hash to the chunk's id. A few decoded blocks are
//! kept in a small LRU cache, so a client reading a block in small pieces
//! (an NBD client, a qcow2 writer) does not decode it once per piece.
//! The reader is `Sync`: several threads may read through one reader.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use blockvault_store::{BlockMap, ChunkId, Manifest, Store};

/// Decoded blocks kept by default.
pub const DEFAULT_CACHE_BLOCKS: usize = 8;

/// Loads and verifies block `b`'s chunk `id` into `plain`, checking that it
/// holds exactly the block's length. `what` names the backup.
pub(crate) fn load_block(
    store: &Store,
    what: &str,
    map: &BlockMap,
    b: usize,
    id: &ChunkId,
    raw: &mut Vec<u8>,
    plain: &mut Vec<u8>,
) -> Result<()> {
    let (off, len) = map.block_range(b);
    store
        .load_chunk(id, raw, plain)
        .with_context(|| format!("{what}: block {b} (offset {off}) cannot be restored"))?;
    if plain.len() != len {
        bail!("{what}: chunk {id} holds {} bytes, block {b} needs {len}", plain.len());
    }
    Ok(())
}

/// Whether a run of an image holds data or reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Backed by chunks.
    Data,
    /// Zero blocks: nothing stored, reads as zeros.
    Zero,
}

/// A maximal run of whole blocks of one kind (the last may be short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// Random-access, verified reads of one backup.
pub struct BackupReader<'s> {
    store: &'s Store,
    map: BlockMap,
    /// "backup N of image 'X'", for errors.
    what: String,
    cache: Mutex<Lru>,
}

/// Most recently used first; a handful of entries, so a linear scan.
struct Lru {
    cap: usize,
    blocks: VecDeque<(usize, Arc<Vec<u8>>)>,
}

impl Lru {
    fn get(&mut self, b: usize) -> Option<Arc<Vec<u8>>> {
        let i = self.blocks.iter().position(|(k, _)| *k == b)?;
        let e = self.blocks.remove(i)?;
        let data = Arc::clone(&e.1);
        self.blocks.push_front(e);
        Some(data)
    }
    fn put(&mut self, b: usize, data: Arc<Vec<u8>>) {
        if self.cap == 0 {
            return;
        }
        if let Some(i) = self.blocks.iter().position(|(k, _)| *k == b) {
            self.blocks.remove(i);
        }
        self.blocks.push_front((b, data));
        self.blocks.truncate(self.cap);
    }
}

impl<'s> BackupReader<'s> {
    /// Opens `manifest`'s backup in `store`, reading and checking its block
    /// map. The caller holds the shared store lock for as long as it reads
    /// (so a GC cannot remove the chunks).
    ///
    /// # Errors
    /// A missing or corrupt block map, naming the file.
    pub fn open(store: &'s Store, manifest: &Manifest) -> Result<Self> {
        Self::with_cache(store, manifest, DEFAULT_CACHE_BLOCKS)
    }

    /// As [`BackupReader::open`], keeping up to `cache_blocks` decoded blocks.
    ///
    /// # Errors
    /// As [`BackupReader::open`].
    pub fn with_cache(store: &'s Store, manifest: &Manifest, cache_blocks: usize) -> Result<Self> {
        let what = format!("backup {} of image '{}'", manifest.id, manifest.image);
        let map = store.read_blockmap(manifest).with_context(|| format!("{what}: reading its block map"))?;
        Ok(BackupReader { store, map, what, cache: Mutex::new(Lru { cap: cache_blocks, blocks: VecDeque::new() }) })
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.map.image_size()
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.map.block_size()
    }

    /// The backup's block map.
    pub fn block_map(&self) -> &BlockMap {
        &self.map
    }

    /// Fills `buf` with the image's bytes at `offset`, across block
    /// boundaries; zero blocks read as zeros without touching the store.
    ///
    /// # Errors
    /// A range past the end of the image; a missing or corrupt chunk, naming
    /// the chunk, the block and the backup. `buf` is then partly filled.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            bail!(
                "{}: read of {} bytes at offset {offset} goes past the end of the image ({} bytes)",
                self.what,
                buf.len(),
                self.size()
            );
        }
        let bs = u64::from(self.block_size());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = (pos / bs) as usize;
            let (boff, blen) = self.map.block_range(b);
            let in_block = (pos - boff) as usize;
            let n = (blen - in_block).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.map.get(b) {
                None => out.fill(0),
                Some(id) => {
                    let data = self.block(b, &id)?;
                    out.copy_from_slice(&data[in_block..in_block + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The decoded, verified bytes of data block `b`, from the cache or the
    /// store. Loaded outside the lock, so threads decode different blocks
    /// in parallel.
    fn block(&self, b: usize, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.lock_cache().get(b) {
            return Ok(d);
        }
        let (mut raw, mut plain) = (Vec::new(), Vec::new());
        load_block(self.store, &self.what, &self.map, b, id, &mut raw, &mut plain)?;
        let data = Arc::new(plain);
        self.lock_cache().put(b, Arc::clone(&data));
        Ok(data)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Lru> {
        // the cache holds only verified, immutable blocks: a panic elsewhere
        // while it was held cannot leave it wrong
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The image as maximal runs of data and zero blocks, in order, covering
    /// `[0, size)` exactly.
    pub fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for b in 0..self.map.len() {
            let (off, len) = self.map.block_range(b);
            let kind = if self.map.get(b).is_some() { ExtentKind::Data } else { ExtentKind::Zero };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += len as u64,
                _ => out.push(Extent { offset: off, len: len as u64, kind }),
            }
        }
        out
    }
}
