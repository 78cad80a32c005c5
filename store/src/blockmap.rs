//! Block maps: one chunk id (or "zero") per fixed-size block of an image.

use crate::error::{Error, Result};
use crate::format::{
    check_block_size, BLOCKMAP_HEADER_LEN, BLOCKMAP_INDEXED_HEADER_LEN, BLOCKMAP_MAGIC, BLOCKMAP_VERSION,
    BLOCKMAP_VERSION_INDEXED, BLOCKMAP_VERSION_INDEXED_WIDE, INDEX_GROUP_BYTES, INDEX_MIN_FANOUT, MAX_IMAGE_SIZE,
};
use crate::ChunkId;

/// The block map of one backup, held in memory (32 bytes per block: 512 KiB
/// for a 64 GiB image at the default 4 MiB block size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    image_size: u64,
    block_size: u32,
    entries: Vec<Option<ChunkId>>,
    /// The index chunks an indexed (version 2 or 3) map was read through; empty
    /// for a version 1 map and for a map built in memory.
    index: Vec<ChunkId>,
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
        BlockMap { image_size, block_size, entries: vec![None; n], index: Vec::new() }
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
    /// Chunk ids referenced by this map (not deduplicated): the blocks'
    /// chunks, then the index chunks it was read through.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.entries.iter().flatten().chain(self.index.iter())
    }

    /// The blocks' chunk ids only (not deduplicated), without the index
    /// chunks: what the image's data is made of.
    pub fn block_chunk_ids(&self) -> impl Iterator<Item = &ChunkId> {
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
        Ok(BlockMap { image_size, block_size, entries, index: Vec::new() })
    }

    /// Blocks per index chunk when this map is written indexed (version 3),
    /// `None` when it is written flat (version 1: blocks of
    /// [`INDEX_GROUP_BYTES`]).
    pub fn index_fanout(&self) -> Option<u32> {
        index_fanout(self.block_size)
    }

    /// The groups of entries an indexed map puts in one index chunk each.
    pub fn index_groups(&self, fanout: u32) -> std::slice::Chunks<'_, Option<ChunkId>> {
        self.entries.chunks(fanout as usize)
    }

    /// Group `group` of [`BlockMap::index_groups`].
    pub fn index_group(&self, fanout: u32, group: usize) -> &[Option<ChunkId>] {
        let start = group * fanout as usize;
        &self.entries[start..(start + fanout as usize).min(self.entries.len())]
    }

    /// Index chunks this map was read through (version 2 or 3), for GC and
    /// verify.
    pub fn index_chunks(&self) -> &[ChunkId] {
        &self.index
    }

    /// Serialises an indexed map (version 3): `groups` holds the index
    /// chunk id of each group of [`BlockMap::index_groups`] at
    /// [`BlockMap::index_fanout`] (`None`: every block of it is zero).
    pub fn encode_indexed(&self, fanout: u32, groups: &[Option<ChunkId>]) -> Vec<u8> {
        self.encode_indexed_as(BLOCKMAP_VERSION_INDEXED_WIDE, fanout, groups)
    }

    /// [`BlockMap::encode_indexed`] in the given indexed version, whose
    /// rule `fanout` must follow: tests write version 2 maps with it.
    #[doc(hidden)]
    pub fn encode_indexed_as(&self, version: u32, fanout: u32, groups: &[Option<ChunkId>]) -> Vec<u8> {
        assert_eq!(Some(fanout), indexed_fanout(version, self.block_size), "the fanout of version {version}'s rule");
        assert_eq!(groups.len(), self.entries.len().div_ceil(fanout as usize), "one index chunk per group");
        let mut out = Vec::with_capacity(BLOCKMAP_INDEXED_HEADER_LEN + groups.len() * 32 + 32);
        out.extend_from_slice(&BLOCKMAP_MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out.extend_from_slice(&fanout.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for g in groups {
            out.extend_from_slice(g.as_ref().map_or(&[0u8; 32], |id| id.as_bytes()));
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and checks a serialised map of any version. `what` names
    /// it in errors.
    ///
    /// # Errors
    /// `CorruptFile` on a bad magic, version, size or checksum.
    pub fn decode_any(what: &std::path::Path, bytes: &[u8]) -> Result<Decoded> {
        let corrupt = |reason: String| Error::CorruptFile { path: what.to_path_buf(), reason };
        if bytes.len() >= 12 && bytes[0..8] == BLOCKMAP_MAGIC {
            let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            if version == BLOCKMAP_VERSION_INDEXED || version == BLOCKMAP_VERSION_INDEXED_WIDE {
                return IndexedMap::decode(what, version, bytes).map(Decoded::Indexed);
            }
        }
        BlockMap::decode(what, bytes).map(Decoded::Flat).map_err(|e| match e {
            Error::CorruptFile { reason, .. } => corrupt(reason),
            e => e,
        })
    }
}

/// Blocks per index chunk of a new map for `block_size` (version 3),
/// `None` for a flat map.
pub fn index_fanout(block_size: u32) -> Option<u32> {
    indexed_fanout(BLOCKMAP_VERSION_INDEXED_WIDE, block_size)
}

/// Blocks per index chunk of an indexed map of `version` (2 or 3) for
/// `block_size`, `None` where that version has no indexed maps.
pub fn indexed_fanout(version: u32, block_size: u32) -> Option<u32> {
    if block_size == 0 || block_size >= INDEX_GROUP_BYTES {
        return None;
    }
    match version {
        BLOCKMAP_VERSION_INDEXED => Some(INDEX_GROUP_BYTES / block_size),
        BLOCKMAP_VERSION_INDEXED_WIDE => Some((INDEX_GROUP_BYTES / block_size).max(INDEX_MIN_FANOUT)),
        _ => None,
    }
}

/// Largest encoded length of a map of this geometry, of any version (a
/// read limit).
///
/// # Errors
/// As [`encoded_len`].
pub fn max_encoded_len(image_size: u64, block_size: u32) -> std::result::Result<u64, String> {
    let flat = encoded_len(image_size, block_size)?;
    // version 2's groups are the narrower: the more of them
    let groups = match indexed_fanout(BLOCKMAP_VERSION_INDEXED, block_size) {
        Some(f) => block_count(image_size, block_size).div_ceil(f as u64),
        None => 0,
    };
    Ok(flat.max(BLOCKMAP_INDEXED_HEADER_LEN as u64 + groups * 32 + 32))
}

/// The plaintext of an index chunk: the group's entries, 32 bytes each.
pub fn encode_index_chunk(group: &[Option<ChunkId>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(group.len() * 32);
    for e in group {
        out.extend_from_slice(e.as_ref().map_or(&[0u8; 32], |id| id.as_bytes()));
    }
    out
}

/// A block map as read from the store.
#[derive(Debug)]
pub enum Decoded {
    /// Version 1: every entry in the map.
    Flat(BlockMap),
    /// Version 2 or 3: the entries are in index chunks, to be loaded.
    Indexed(IndexedMap),
}

/// An indexed (version 2 or 3) block map before its index chunks are loaded.
#[derive(Debug)]
pub struct IndexedMap {
    pub image_size: u64,
    pub block_size: u32,
    pub fanout: u32,
    /// One index chunk id per group (`None`: every block of it is zero).
    pub groups: Vec<Option<ChunkId>>,
}

impl IndexedMap {
    fn decode(what: &std::path::Path, version: u32, bytes: &[u8]) -> Result<IndexedMap> {
        let corrupt = |reason: String| Error::CorruptFile { path: what.to_path_buf(), reason };
        if bytes.len() < BLOCKMAP_INDEXED_HEADER_LEN + 32 {
            return Err(corrupt(format!("truncated block map ({} bytes)", bytes.len())));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(corrupt("block map checksum mismatch".into()));
        }
        let block_size = u32::from_le_bytes(body[12..16].try_into().unwrap());
        let image_size = u64::from_le_bytes(body[16..24].try_into().unwrap());
        encoded_len(image_size, block_size).map_err(corrupt)?;
        let count = u64::from_le_bytes(body[24..32].try_into().unwrap());
        if count != block_count(image_size, block_size) {
            return Err(corrupt(format!("block count {count} does not match image size {image_size}")));
        }
        let fanout = u32::from_le_bytes(body[32..36].try_into().unwrap());
        if Some(fanout) != indexed_fanout(version, block_size) {
            return Err(corrupt(format!("fanout {fanout} does not fit block size {block_size} in block map format {version}")));
        }
        if body[36..40] != [0u8; 4] {
            return Err(corrupt("reserved header bytes are not zero".into()));
        }
        let groups = count.div_ceil(fanout as u64);
        if (body.len() - BLOCKMAP_INDEXED_HEADER_LEN) as u64 != groups * 32 {
            return Err(corrupt(format!("{} index bytes for {groups} groups", body.len() - BLOCKMAP_INDEXED_HEADER_LEN)));
        }
        let groups = body[BLOCKMAP_INDEXED_HEADER_LEN..]
            .chunks_exact(32)
            .map(|e| {
                let id: [u8; 32] = e.try_into().unwrap();
                (id != [0u8; 32]).then_some(ChunkId(id))
            })
            .collect();
        Ok(IndexedMap { image_size, block_size, fanout, groups })
    }

    /// Entries in group `g`.
    pub fn group_len(&self, g: usize) -> usize {
        let count = block_count(self.image_size, self.block_size) as usize;
        (count - g * self.fanout as usize).min(self.fanout as usize)
    }

    /// The full map, each index chunk's plaintext given by `load` (checked
    /// against its id by the caller's store).
    ///
    /// # Errors
    /// What `load` returns; `CorruptFile` (naming `what`) when an index
    /// chunk holds the wrong number of bytes.
    pub fn expand(self, what: &std::path::Path, mut load: impl FnMut(&ChunkId) -> Result<Vec<u8>>) -> Result<BlockMap> {
        let mut map = BlockMap::new_zeroed(self.image_size, self.block_size);
        for (g, id) in self.groups.iter().enumerate() {
            let Some(id) = id else { continue };
            let n = self.group_len(g);
            let plain = load(id)?;
            if plain.len() != n * 32 {
                return Err(Error::CorruptFile {
                    path: what.to_path_buf(),
                    reason: format!("index chunk {id} of group {g} holds {} bytes, not {}", plain.len(), n * 32),
                });
            }
            let first = g * self.fanout as usize;
            for (i, e) in plain.chunks_exact(32).enumerate() {
                let e: [u8; 32] = e.try_into().unwrap();
                map.entries[first + i] = (e != [0u8; 32]).then_some(ChunkId(e));
            }
            map.index.push(*id);
        }
        Ok(map)
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
