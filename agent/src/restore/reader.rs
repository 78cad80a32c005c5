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
        .map_err(crate::error::Error::from_store)
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

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_store::format::MANIFEST_VERSION;
    use blockvault_store::{chunk, BackupId, InitOptions};
    use rand::{Rng, RngCore, SeedableRng};

    const BS: u32 = 65536;
    /// Blocks left as zeros (holes) in the test image.
    const ZERO_BLOCKS: [usize; 3] = [2, 3, 7];

    /// A store holding one backup of a random image of 9 full blocks and a
    /// short last one, with [`ZERO_BLOCKS`] stored as zero blocks.
    fn store_with_backup() -> (tempfile::TempDir, Store, Manifest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), &InitOptions { default_block_size: BS }).unwrap();
        let size = 9 * u64::from(BS) + 1000;
        let mut image = vec![0u8; size as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        rng.fill_bytes(&mut image);
        let mut map = BlockMap::new_zeroed(size, BS);
        for b in 0..map.len() {
            let (off, len) = map.block_range(b);
            let block = &mut image[off as usize..off as usize + len];
            if ZERO_BLOCKS.contains(&b) {
                block.fill(0);
                continue;
            }
            let id = store.chunk_id(block);
            store.put_chunk(&chunk::encode(block, id, 1, None).unwrap()).unwrap();
            map.set(b, Some(id));
        }
        let mut m = Manifest {
            format: MANIFEST_VERSION,
            set: None,
            id: BackupId(3),
            image: "vm".into(),
            source: "file:/srv/vm.img".into(),
            created: "2026-01-01T00:00:00Z".into(),
            finished: "2026-01-01T00:00:01Z".into(),
            parent: None,
            image_size: 0,
            block_size: BS,
            blockmap_blake3: String::new(),
            snapshot: None,
            stats: Default::default(),
            rbd: None,
        };
        store.write_backup(&mut m, &map).unwrap();
        (dir, store, m, image)
    }

    #[test]
    fn reads_at_random_offsets_equal_the_image() {
        let (_d, store, m, image) = store_with_backup();
        let r = BackupReader::with_cache(&store, &m, 2).unwrap();
        assert_eq!(r.size(), image.len() as u64);
        assert_eq!(r.block_size(), BS);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for i in 0..500 {
            // every fifth read is large enough to span several blocks
            let max = if i % 5 == 0 { image.len() } else { 3 * BS as usize };
            let len = rng.gen_range(0..=max.min(image.len()));
            let off = rng.gen_range(0..=image.len() - len);
            let mut buf = vec![0xAAu8; len];
            r.read_at(off as u64, &mut buf).unwrap();
            assert!(buf == image[off..off + len], "read of {len} bytes at {off} differs from the image");
        }
        // the short last block, to the last byte, and the whole image
        let mut tail = vec![0u8; 1000];
        r.read_at(9 * u64::from(BS), &mut tail).unwrap();
        assert_eq!(tail, image[9 * BS as usize..]);
        let mut all = vec![0u8; image.len()];
        r.read_at(0, &mut all).unwrap();
        assert!(all == image);
    }

    #[test]
    fn reads_past_the_end_are_refused() {
        let (_d, store, m, image) = store_with_backup();
        let r = BackupReader::open(&store, &m).unwrap();
        let mut buf = [0u8; 2];
        let e = format!("{:#}", r.read_at(image.len() as u64 - 1, &mut buf).unwrap_err());
        assert!(e.contains("past the end") && e.contains("backup 3"), "{e}");
        assert!(r.read_at(u64::MAX, &mut buf).is_err());
        r.read_at(image.len() as u64, &mut []).unwrap();
    }

    #[test]
    fn extents_match_the_zero_blocks() {
        let (_d, store, m, image) = store_with_backup();
        let r = BackupReader::open(&store, &m).unwrap();
        let bs = u64::from(BS);
        let e = |b: u64, n: u64, kind| Extent { offset: b * bs, len: n * bs, kind };
        let last = Extent { offset: 8 * bs, len: bs + 1000, kind: ExtentKind::Data };
        assert_eq!(
            r.extents(),
            vec![
                e(0, 2, ExtentKind::Data),
                e(2, 2, ExtentKind::Zero),
                e(4, 3, ExtentKind::Data),
                e(7, 1, ExtentKind::Zero),
                last
            ]
        );
        // and the zero extents read as zeros, the data ones as the image
        for x in r.extents() {
            let mut buf = vec![0xAAu8; x.len as usize];
            r.read_at(x.offset, &mut buf).unwrap();
            let want = &image[x.offset as usize..(x.offset + x.len) as usize];
            assert!(buf == want);
            assert_eq!(x.kind == ExtentKind::Zero, chunk::is_zero(want));
        }
    }

    #[test]
    fn a_corrupt_chunk_gives_an_error_naming_the_chunk_and_the_backup() {
        let (_d, store, m, _image) = store_with_backup();
        let r = BackupReader::open(&store, &m).unwrap();
        let id = r.block_map().get(5).unwrap();
        // flip a byte near the end of the stored chunk (its payload)
        let p = store.chunk_path(&id);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let mut buf = vec![0u8; 100];
        let e = format!("{:#}", r.read_at(5 * u64::from(BS) + 10, &mut buf).unwrap_err());
        assert!(e.contains(&id.to_hex()) && e.contains("backup 3 of image 'vm'") && e.contains("block 5"), "{e}");
        // other blocks still read
        r.read_at(0, &mut buf).unwrap();
    }

    #[test]
    fn a_cached_block_is_not_read_from_the_store_again_and_the_cache_is_bounded() {
        let (_d, store, m, image) = store_with_backup();
        let r = BackupReader::with_cache(&store, &m, 2).unwrap();
        let mut buf = vec![0u8; 10];
        for b in [0u64, 1, 4] {
            r.read_at(b * u64::from(BS), &mut buf).unwrap();
        }
        // blocks 1 and 4 are cached, block 0 was evicted: removing their
        // chunks shows which reads reach the store
        for b in [0usize, 1, 4] {
            std::fs::remove_file(store.chunk_path(&r.block_map().get(b).unwrap())).unwrap();
        }
        for b in [1u64, 4] {
            r.read_at(b * u64::from(BS) + 5, &mut buf).unwrap();
            assert_eq!(buf, image[(b * u64::from(BS) + 5) as usize..][..10]);
        }
        assert!(r.read_at(0, &mut buf).is_err(), "block 0 should have been evicted (cache of 2)");
        assert_eq!(r.lock_cache().blocks.len(), 2);
    }

    #[test]
    fn several_threads_read_through_one_reader() {
        fn assert_sync<T: Sync>(_: &T) {}
        let (_d, store, m, image) = store_with_backup();
        let r = BackupReader::with_cache(&store, &m, 3).unwrap();
        assert_sync(&r);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (r, image) = (&r, &image);
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                    for _ in 0..100 {
                        let len = rng.gen_range(1..=2 * BS as usize);
                        let off = rng.gen_range(0..=image.len() - len);
                        let mut buf = vec![0u8; len];
                        r.read_at(off as u64, &mut buf).unwrap();
                        assert!(buf == image[off..off + len]);
                    }
                });
            }
        });
    }
}
