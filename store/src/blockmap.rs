//! Block maps: one chunk id (or "zero") per fixed-size block of an image.

use crate::error::{Error, Result};
use crate::format::{check_block_size, BLOCKMAP_HEADER_LEN, BLOCKMAP_MAGIC, BLOCKMAP_VERSION};
use crate::ChunkId;

/// The block map of one backup, held in memory (32 bytes per block: 512 KiB
/// for a 64 GiB image at the default 4 MiB block size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    image_size: u64,
    block_size: u32,
    entries: Vec<Option<ChunkId>>,
}

/// Number of blocks of an image.
pub fn block_count(image_size: u64, block_size: u32) -> u64 {
    image_size.div_ceil(block_size as u64)
}

impl BlockMap {
    /// A map of `image_size` bytes in which every block is zero.
    pub fn new_zeroed(image_size: u64, block_size: u32) -> Self {
        let n = block_count(image_size, block_size) as usize;
        BlockMap { image_size, block_size, entries: vec![None; n] }
    }

    /// A map for a new version of the image, inheriting every block from
    /// `parent` (resized: blocks past the old end are zero; a block that the
    /// old end cut short must be re-read by the caller).
    pub fn inherit(parent: &BlockMap, image_size: u64) -> Self {
        let mut m = BlockMap::new_zeroed(image_size, parent.block_size);
        let n = m.entries.len().min(parent.entries.len());
        m.entries[..n].copy_from_slice(&parent.entries[..n]);
        m
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn get(&self, block: usize) -> Option<ChunkId> {
        self.entries[block]
    }
    /// Sets a block by position; workers may finish in any order.
    pub fn set(&mut self, block: usize, id: Option<ChunkId>) {
        self.entries[block] = id;
    }
    pub fn entries(&self) -> &[Option<ChunkId>] {
        &self.entries
    }
    /// Byte range of a block inside the image.
    pub fn block_range(&self, block: usize) -> (u64, usize) {
        let off = block as u64 * self.block_size as u64;
        let len = (self.image_size - off).min(self.block_size as u64) as usize;
        (off, len)
    }
    /// Distinct chunk ids referenced by this map.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.entries.iter().flatten()
    }

    /// Serialises the map (see `format` for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCKMAP_HEADER_LEN + self.entries.len() * 32 + 32);
        out.extend_from_slice(&BLOCKMAP_MAGIC);
        out.extend_from_slice(&BLOCKMAP_VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            match e {
                Some(id) => out.extend_from_slice(id.as_bytes()),
                None => out.extend_from_slice(&[0u8; 32]),
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and checks a serialised map. `what` names it in errors.
    ///
    /// # Errors
    /// `CorruptFile` on a bad magic, version, size or checksum.
    pub fn decode(what: &std::path::Path, bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptFile { path: what.to_path_buf(), reason };
        if bytes.len() < BLOCKMAP_HEADER_LEN + 32 {
            return Err(corrupt(format!("truncated block map ({} bytes)", bytes.len())));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(corrupt("block map checksum mismatch".into()));
        }
        if body[0..8] != BLOCKMAP_MAGIC {
            return Err(corrupt("bad block map magic".into()));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().unwrap());
        if version != BLOCKMAP_VERSION {
            return Err(corrupt(format!("unsupported block map version {version}")));
        }
        let block_size = u32::from_le_bytes(body[12..16].try_into().unwrap());
        check_block_size(block_size).map_err(|e| corrupt(e.to_string()))?;
        let image_size = u64::from_le_bytes(body[16..24].try_into().unwrap());
        let count = u64::from_le_bytes(body[24..32].try_into().unwrap());
        if count != block_count(image_size, block_size) {
            return Err(corrupt(format!("block count {count} does not match image size {image_size}")));
        }
        let ents = &body[BLOCKMAP_HEADER_LEN..];
        if ents.len() as u64 != count * 32 {
            return Err(corrupt(format!("{} entry bytes for {count} blocks", ents.len())));
        }
        let entries = ents
            .chunks_exact(32)
            .map(|e| {
                let id: [u8; 32] = e.try_into().unwrap();
                (id != [0u8; 32]).then_some(ChunkId(id))
            })
            .collect();
        Ok(BlockMap { image_size, block_size, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    proptest! {
        #[test]
        fn blockmap_roundtrip(size in 0u64..(1 << 30), seeds in proptest::collection::vec(any::<(usize, u8)>(), 0..50)) {
            let mut m = BlockMap::new_zeroed(size, 65536);
            for (i, s) in seeds {
                if !m.is_empty() {
                    let b = i % m.len();
                    m.set(b, Some(ChunkId::of(&[s])));
                }
            }
            let enc = m.encode();
            let dec = BlockMap::decode(Path::new("t"), &enc).unwrap();
            prop_assert_eq!(dec, m);
        }
    }

    #[test]
    fn corrupt_maps_are_refused() {
        let mut m = BlockMap::new_zeroed(1 << 20, 65536);
        m.set(3, Some(ChunkId::of(b"x")));
        let enc = m.encode();
        for i in 0..enc.len() {
            let mut b = enc.clone();
            b[i] ^= 0x10;
            assert!(BlockMap::decode(Path::new("t"), &b).is_err(), "flip at {i} not caught");
        }
        assert!(BlockMap::decode(Path::new("t"), &enc[..enc.len() - 1]).is_err());
    }

    #[test]
    fn ranges_and_inherit() {
        let m = BlockMap::new_zeroed(65536 * 2 + 100, 65536);
        assert_eq!(m.len(), 3);
        assert_eq!(m.block_range(2), (131072, 100));
        let mut p = m.clone();
        p.set(0, Some(ChunkId::of(b"a")));
        let grown = BlockMap::inherit(&p, 65536 * 5);
        assert_eq!(grown.len(), 5);
        assert_eq!(grown.get(0), p.get(0));
        assert_eq!(grown.get(4), None);
        let shrunk = BlockMap::inherit(&p, 10);
        assert_eq!(shrunk.len(), 1);
    }
}
