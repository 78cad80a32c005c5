//! Block maps: one chunk id (or "zero") per fixed-size block of an image.

use crate::error::{Error, Result};
use crate::format::{check_block_size, BLOCKMAP_HEADER_LEN, BLOCKMAP_MAGIC, BLOCKMAP_VERSION, MAX_IMAGE_SIZE};
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

/// Length of the encoded block map of an image of this geometry, after
/// checking the geometry against the format's limits (block size allowed,
/// image size at most `format::MAX_IMAGE_SIZE`). A reader checks a block
/// map's length against it before reading the file.
///
/// # Errors
/// The reason, when the geometry is outside the format's limits.
pub fn encoded_len(image_size: u64, block_size: u32) -> std::result::Result<u64, String> {
    check_block_size(block_size).map_err(|e| e.to_string())?;
    if image_size > MAX_IMAGE_SIZE {
        return Err(format!("image size {image_size} is larger than the format allows ({MAX_IMAGE_SIZE})"));
    }
    // at most 2^44 blocks of 32 bytes: no overflow
    Ok(BLOCKMAP_HEADER_LEN as u64 + block_count(image_size, block_size) * 32 + 32)
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
        let image_size = u64::from_le_bytes(body[16..24].try_into().unwrap());
        let want = encoded_len(image_size, block_size).map_err(corrupt)?;
        let count = u64::from_le_bytes(body[24..32].try_into().unwrap());
        if count != block_count(image_size, block_size) {
            return Err(corrupt(format!("block count {count} does not match image size {image_size}")));
        }
        // the entries are counted against the bytes present before any is
        // decoded, so what is allocated is bounded by the file's length
        if bytes.len() as u64 != want {
            return Err(corrupt(format!(
                "{} entry bytes for {count} blocks",
                body.len() - BLOCKMAP_HEADER_LEN
            )));
        }
        let ents = &body[BLOCKMAP_HEADER_LEN..];
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

    /// A header with a valid checksum whose geometry claims more blocks than
    /// the file holds, or an image larger than the format allows, is refused
    /// before any entry is decoded.
    #[test]
    fn crafted_block_count_is_rejected_before_allocating() {
        let craft = |image_size: u64, count: u64, entries: usize| {
            let mut b = BLOCKMAP_MAGIC.to_vec();
            b.extend_from_slice(&BLOCKMAP_VERSION.to_le_bytes());
            b.extend_from_slice(&65536u32.to_le_bytes());
            b.extend_from_slice(&image_size.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b.resize(b.len() + entries * 32, 7);
            let sum = blake3::hash(&b);
            b.extend_from_slice(sum.as_bytes());
            b
        };
        let huge = 1u64 << 59;
        let msg = BlockMap::decode(Path::new("t"), &craft(huge, huge / 65536, 2)).unwrap_err().to_string();
        assert!(msg.contains("64 entry bytes for 8796093022208 blocks"), "{msg}");
        let over = MAX_IMAGE_SIZE + 1;
        let msg = BlockMap::decode(Path::new("t"), &craft(over, block_count(over, 65536), 1)).unwrap_err().to_string();
        assert!(msg.contains("larger than the format allows"), "{msg}");
        assert!(BlockMap::decode(Path::new("t"), &craft(3 * 65536, 3, 3)).is_ok());
        assert!(encoded_len(1 << 20, 0).is_err());
        assert_eq!(encoded_len(1 << 20, 65536), Ok(32 + 16 * 32 + 32));
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
