//! On-disk formats of the store.
//!
//! ==========================  DO NOT MODIFY  ==========================
//! Every constant and layout in this file is part of the store format.
//! Stores written by every released version must stay readable: a change
//! here needs a new format version and a reader for the old one.
//! ======================================================================
//!
//! All integers are little-endian.
//!
//! Chunk object (`chunks/<first 4 hex digits>/<64 hex digits>`):
//!
//! | bytes  | field                                         |
//! |--------|-----------------------------------------------|
//! | 0..4   | magic `BVCK`                                  |
//! | 4      | chunk format version (1)                      |
//! | 5      | codec: 0 = stored raw, 1 = zstd               |
//! | 6..8   | reserved, zero                                |
//! | 8..12  | plaintext length (u32)                        |
//! | 12..16 | payload length (u32)                          |
//! | 16..20 | crc32 (IEEE) of the payload                   |
//! | 20..24 | crc32 (IEEE) of bytes 0..20                   |
//! | 24..   | payload                                       |
//!
//! The chunk id is the blake3 hash of the plaintext, so a reader checks the
//! header crc, then the payload crc (before decompressing untrusted bytes),
//! then decompresses and checks the length and the hash.
//!
//! Block map (`backups/<id>.blockmap`):
//!
//! | bytes          | field                                        |
//! |----------------|----------------------------------------------|
//! | 0..8           | magic `BVBLKMAP`                             |
//! | 8..12          | block map format version (1)                 |
//! | 12..16         | block size in bytes (u32, power of two)      |
//! | 16..24         | image size in bytes (u64)                    |
//! | 24..32         | block count (u64) = ceil(image size / block) |
//! | 32..32+32n     | one 32-byte chunk id per block; 32 zero bytes mean an all-zero block |
//! | last 32 bytes  | blake3 of every byte before it               |
//!
//! The last block may be shorter than the block size; its chunk then holds
//! only the bytes inside the image.
//!
//! Indexed block map (block map format version 2, written for block sizes
//! below [`INDEX_GROUP_BYTES`]; version 1 maps stay readable): the blocks
//! are taken in groups of `fanout` = `INDEX_GROUP_BYTES / block size`
//! (64 blocks of 64 KiB), and each group's ids live in an *index chunk*,
//! an ordinary chunk object (the layout above, id = hash of its plaintext)
//! whose plaintext is the group's 32-byte entries (the last group may be
//! shorter). The map itself holds one index chunk id per group: 32 bytes
//! per 4 MiB of image whatever the block size, and an unchanged group
//! keeps its index chunk, deduplicated like any chunk. Every backup still
//! has a complete map: its own groups name every block through chunks the
//! store holds. GC, verify and copy count the index chunks as chunks of the
//! backup ([`crate::BlockMap::chunk_ids`]).
//!
//! | bytes          | field                                        |
//! |----------------|----------------------------------------------|
//! | 0..8           | magic `BVBLKMAP`                             |
//! | 8..12          | block map format version (2)                 |
//! | 12..16         | block size in bytes (u32, power of two)      |
//! | 16..24         | image size in bytes (u64)                    |
//! | 24..32         | block count (u64) = ceil(image size / block) |
//! | 32..36         | fanout (u32) = INDEX_GROUP_BYTES / block size |
//! | 36..40         | reserved, zero                               |
//! | 40..40+32g     | one index chunk id per group, g = ceil(count / fanout); 32 zero bytes mean every block of the group is zero |
//! | last 32 bytes  | blake3 of every byte before it               |
//!
//! Block map format version 3, written since 2026-12-07 for block sizes
//! below [`INDEX_GROUP_BYTES`], is version 2 with wider groups: `fanout` =
//! the larger of `INDEX_GROUP_BYTES / block size` and
//! [`INDEX_MIN_FANOUT`] (512 blocks of 64 KiB, 32 MiB of image, per 16 KiB
//! index chunk; 4 KiB blocks keep 1,024). Version 2's groups of 64 blocks
//! at 64 KiB made an incremental of scattered writes store one 2 KiB index
//! chunk file per touched 4 MiB: 730 files beside 1,280 data chunks for
//! 80 MiB changed in a 4 GiB image. Version 2 maps stay readable, with the
//! fanout of their own rule; a backup whose parent has a version-2 map
//! stores all its groups anew, once.

use crate::error::{Error, Result};
use crate::ChunkId;

/// Magic of a chunk object.
pub const CHUNK_MAGIC: [u8; 4] = *b"BVCK";
/// Version of the chunk object layout.
pub const CHUNK_VERSION: u8 = 1;
/// Size of the chunk header.
pub const CHUNK_HEADER_LEN: usize = 24;
/// Codec byte: payload is the plaintext.
pub const CODEC_RAW: u8 = 0;
/// Codec byte: payload is one zstd frame.
pub const CODEC_ZSTD: u8 = 1;

/// Magic of a block map.
pub const BLOCKMAP_MAGIC: [u8; 8] = *b"BVBLKMAP";
/// Version of the block map layout.
pub const BLOCKMAP_VERSION: u32 = 1;
/// Size of the block map header.
pub const BLOCKMAP_HEADER_LEN: usize = 32;
/// Version of the indexed block map layout (groups of blocks in index
/// chunks), groups of [`INDEX_GROUP_BYTES`]: read, no longer written.
pub const BLOCKMAP_VERSION_INDEXED: u32 = 2;
/// Version of the indexed block map layout with groups of at least
/// [`INDEX_MIN_FANOUT`] blocks: written for every block size below
/// [`INDEX_GROUP_BYTES`].
pub const BLOCKMAP_VERSION_INDEXED_WIDE: u32 = 3;
/// Fewest blocks per index chunk in a version-3 map.
pub const INDEX_MIN_FANOUT: u32 = 512;
/// Size of the indexed block map header.
pub const BLOCKMAP_INDEXED_HEADER_LEN: usize = 40;
/// Bytes of image per index chunk of an indexed block map (RBD's default
/// object size): maps of smaller blocks are written indexed.
pub const INDEX_GROUP_BYTES: u32 = 4 * 1024 * 1024;

/// Version of the manifest JSON document.
pub const MANIFEST_VERSION: u32 = 1;
/// Version of a manifest that belongs to a set (a `[[group]]` backup): the
/// document of version 1 plus a `set` record. Only such manifests carry it,
/// so every other backup stays version 1 and a version-1 reader refuses
/// (rather than silently drops from its sets) what it cannot group.
pub const MANIFEST_VERSION_SET: u32 = 2;

/// Version of the store layout (`blockvault-store.json`) of an
/// unencrypted store.
pub const STORE_VERSION: u32 = 1;
/// Version of an encrypted store: the layout of format 1, every object but
/// `blockvault-store.json` sealed (layout in [`crate::crypto`]), chunk ids
/// keyed blake3, and an `encryption` record in the meta. A format-1 reader
/// refuses it on the version alone.
pub const STORE_VERSION_ENCRYPTED: u32 = 2;
/// Version of an encrypted store whose objects are sealed with AES-256-GCM
/// (sealed object version 2, [`crate::crypto`]) instead of format 2's
/// XChaCha20-Poly1305; otherwise format 2. Every new encrypted store. A
/// format-2 reader refuses it on the version alone; format-2 stores are
/// still read and written, with their own cipher.
pub const STORE_VERSION_ENCRYPTED_AES: u32 = 3;
/// Name of the file that marks a directory as a store.
pub const STORE_MARKER: &str = "blockvault-store.json";

/// Smallest and largest allowed block sizes.
pub const MIN_BLOCK_SIZE: u32 = 64 * 1024;
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
/// Default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4 * 1024 * 1024;

// ---- limits a reader checks before it allocates ------------------------
// Each is implied by the layouts above (no layout changes): they bound
// every length read from the store, so a crafted header cannot make a
// reader allocate more than one block's worth of memory.

/// Largest plaintext of a chunk: one block of the largest block size.
pub const MAX_CHUNK_PLAIN_LEN: u32 = MAX_BLOCK_SIZE;

/// zstd's worst-case compressed size of `n` bytes (`ZSTD_COMPRESSBOUND`).
pub const fn zstd_compress_bound(n: u32) -> u32 {
    let small = if n < (128 << 10) { ((128 << 10) - n) >> 11 } else { 0 };
    n + (n >> 8) + small
}

/// Largest payload of a chunk. A raw payload is exactly its plaintext; a
/// zstd payload is at most zstd's bound of its plaintext (the writer only
/// keeps one smaller than the plaintext, a reader accepts the bound).
pub const MAX_CHUNK_PAYLOAD_LEN: u32 = zstd_compress_bound(MAX_CHUNK_PLAIN_LEN);

/// Largest chunk object: header and largest payload.
pub const MAX_CHUNK_OBJECT_LEN: u64 = CHUNK_HEADER_LEN as u64 + MAX_CHUNK_PAYLOAD_LEN as u64;

/// Largest manifest file. A manifest is about 1 KiB (names are short).
pub const MAX_MANIFEST_LEN: u64 = 1 << 20;

/// Largest image size a block map may describe: 2^60 bytes (1 EiB). Its
/// block count, not this, is what bounds memory: a block map is read only
/// when its file length matches its block count.
pub const MAX_IMAGE_SIZE: u64 = 1 << 60;

/// Parsed chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub codec: u8,
    pub plain_len: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        h[0..4].copy_from_slice(&CHUNK_MAGIC);
        h[4] = CHUNK_VERSION;
        h[5] = self.codec;
        h[8..12].copy_from_slice(&self.plain_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        h[16..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        let hcrc = crc32fast::hash(&h[0..20]);
        h[20..24].copy_from_slice(&hcrc.to_le_bytes());
        h
    }

    /// Parses and checks a header; `id` only names the chunk in errors.
    pub fn decode(id: &ChunkId, h: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptChunk { id: *id, reason };
        if h.len() < CHUNK_HEADER_LEN {
            return Err(corrupt(format!("truncated: {} bytes, header needs {CHUNK_HEADER_LEN}", h.len())));
        }
        if h[0..4] != CHUNK_MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let hcrc = u32::from_le_bytes(h[20..24].try_into().unwrap());
        if crc32fast::hash(&h[0..20]) != hcrc {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if h[4] != CHUNK_VERSION {
            return Err(corrupt(format!("unsupported chunk version {}", h[4])));
        }
        let codec = h[5];
        if codec != CODEC_RAW && codec != CODEC_ZSTD {
            return Err(corrupt(format!("unknown codec {codec}")));
        }
        Ok(ChunkHeader {
            codec,
            plain_len: u32::from_le_bytes(h[8..12].try_into().unwrap()),
            payload_len: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            payload_crc: u32::from_le_bytes(h[16..20].try_into().unwrap()),
        })
    }
}

/// Checks that a block size is allowed.
///
/// # Errors
/// `InvalidSetting` naming `block-size` when it is not a power of two in 64 KiB..=4 MiB.
pub fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::InvalidSetting {
            key: "block-size",
            reason: format!("{bs} is not a power of two between 64 KiB and 4 MiB"),
        });
    }
    Ok(())
}
