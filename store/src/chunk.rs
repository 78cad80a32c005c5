//! Chunk encoding: hash, compress, frame with a checked header.

use crate::error::{Error, Result};
use crate::format::{ChunkHeader, CHUNK_HEADER_LEN, CODEC_RAW, CODEC_ZSTD};
use crate::ChunkId;

/// A block ready to be stored: its id and its framed bytes (header + payload).
#[derive(Debug)]
pub struct EncodedChunk {
    pub id: ChunkId,
    pub plain_len: usize,
    pub bytes: Vec<u8>,
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR 64-byte groups together word by word: the compiler vectorises this,
    // and an early exit keeps non-zero blocks cheap.
    let mut groups = data.chunks_exact(64);
    for g in &mut groups {
        let acc = g
            .chunks_exact(8)
            .fold(0u64, |acc, w| acc | u64::from_le_bytes(w.try_into().unwrap()));
        if acc != 0 {
            return false;
        }
    }
    groups.remainder().iter().all(|&b| b == 0)
}

/// Compresses `plain` with zstd at `level` (0 stores it raw) and frames it.
/// The payload is stored raw whenever compression does not make it smaller,
/// so incompressible data costs no decompression on restore.
///
/// `id` is passed in when the caller already hashed the block.
pub fn encode(plain: &[u8], id: ChunkId, level: i32, compressor: Option<&mut zstd::bulk::Compressor<'_>>) -> Result<EncodedChunk> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + plain.len() + 64);
    out.resize(CHUNK_HEADER_LEN, 0);
    let mut codec = CODEC_RAW;
    if level != 0 && looks_compressible(plain) {
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        out.resize(CHUNK_HEADER_LEN + bound, 0);
        let res = match compressor {
            Some(c) => c.compress_to_buffer(plain, &mut out[CHUNK_HEADER_LEN..]),
            None => zstd::bulk::compress_to_buffer(plain, &mut out[CHUNK_HEADER_LEN..], level),
        };
        let n = res.map_err(|e| Error::CorruptChunk { id, reason: format!("zstd compression failed: {e}") })?;
        if n < plain.len() {
            out.truncate(CHUNK_HEADER_LEN + n);
            codec = CODEC_ZSTD;
        } else {
            out.truncate(CHUNK_HEADER_LEN);
        }
    }
    if codec == CODEC_RAW {
        out.extend_from_slice(plain);
    }
    let payload = &out[CHUNK_HEADER_LEN..];
    let header = ChunkHeader {
        codec,
        plain_len: plain.len() as u32,
        payload_len: payload.len() as u32,
        payload_crc: crc32fast::hash(payload),
    };
    out[..CHUNK_HEADER_LEN].copy_from_slice(&header.encode());
    Ok(EncodedChunk { id, plain_len: plain.len(), bytes: out })
}

/// Blocks at least this large are probed before they are compressed.
const PROBE_MIN: usize = 256 * 1024;
/// Bytes taken from each of the probe's sample points.
const PROBE_PIECE: usize = 8 * 1024;

/// A cheap guess whether zstd will shrink a block: four 8 KiB samples spread
/// over it, compressed at level 1. Incompressible data (already compressed or
/// encrypted guests) then costs one small compression instead of a full one.
/// A wrong "no" only stores a block raw; it never loses data.
fn looks_compressible(plain: &[u8]) -> bool {
    if plain.len() < PROBE_MIN {
        return true;
    }
    let step = plain.len() / 4;
    let mut sample = Vec::with_capacity(4 * PROBE_PIECE);
    for i in 0..4 {
        sample.extend_from_slice(&plain[i * step..i * step + PROBE_PIECE]);
    }
    match zstd::bulk::compress(&sample, 1) {
        Ok(c) => c.len() * 100 < sample.len() * 97,
        Err(_) => true,
    }
}

/// Checks the framing of a stored chunk without decompressing it.
///
/// # Errors
/// `CorruptChunk` when the header or the payload checksum is wrong.
pub fn check_frame(id: &ChunkId, bytes: &[u8]) -> Result<ChunkHeader> {
    let h = ChunkHeader::decode(id, bytes)?;
    let payload = &bytes[CHUNK_HEADER_LEN..];
    if payload.len() != h.payload_len as usize {
        return Err(Error::CorruptChunk {
            id: *id,
            reason: format!("payload is {} bytes, header says {}", payload.len(), h.payload_len),
        });
    }
    if crc32fast::hash(payload) != h.payload_crc {
        return Err(Error::CorruptChunk { id: *id, reason: "payload checksum mismatch".into() });
    }
    Ok(h)
}

/// Decodes a stored chunk into `out` (cleared first) and verifies that the
/// plaintext hashes to `id`. Never returns unverified data.
///
/// # Errors
/// `CorruptChunk` on any framing, decompression, length or hash mismatch.
pub fn decode_into(id: &ChunkId, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let h = check_frame(id, bytes)?;
    let payload = &bytes[CHUNK_HEADER_LEN..];
    out.clear();
    match h.codec {
        CODEC_RAW => out.extend_from_slice(payload),
        _ => {
            out.resize(h.plain_len as usize, 0);
            let n = zstd::bulk::decompress_to_buffer(payload, &mut out[..]).map_err(|e| Error::CorruptChunk {
                id: *id,
                reason: format!("zstd decompression failed: {e}"),
            })?;
            out.truncate(n);
        }
    }
    if out.len() != h.plain_len as usize {
        return Err(Error::CorruptChunk {
            id: *id,
            reason: format!("plaintext is {} bytes, header says {}", out.len(), h.plain_len),
        });
    }
    if ChunkId::of(out) != *id {
        return Err(Error::CorruptChunk { id: *id, reason: "content hash mismatch".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(data: &[u8], level: i32) {
        let id = ChunkId::of(data);
        let enc = encode(data, id, level, None).unwrap();
        let mut out = Vec::new();
        decode_into(&id, &enc.bytes, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 4096 + 7]));
        for pos in [0, 7, 8, 511, 512, 4095, 4096 + 6] {
            let mut v = vec![0u8; 4096 + 7];
            v[pos] = 1;
            assert!(!is_zero(&v), "missed a one at {pos}");
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let mut data = vec![0u8; 65536];
        blake3::Hasher::new().update(b"seed").finalize_xof().fill(&mut data);
        let id = ChunkId::of(&data);
        let enc = encode(&data, id, 3, None).unwrap();
        let h = check_frame(&id, &enc.bytes).unwrap();
        assert_eq!(h.codec, CODEC_RAW);
        roundtrip(&data, 3);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let data = b"hello blockvault, this compresses well well well well well".repeat(50);
        let id = ChunkId::of(&data);
        let enc = encode(&data, id, 3, None).unwrap();
        let mut out = Vec::new();
        for byte in 0..enc.bytes.len() {
            for bit in 0..8 {
                let mut b = enc.bytes.clone();
                b[byte] ^= 1 << bit;
                assert!(decode_into(&id, &b, &mut out).is_err(), "flip at {byte}:{bit} not caught");
            }
        }
    }

    proptest! {
        #[test]
        fn chunk_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..20000), level in 0i32..5) {
            roundtrip(&data, level);
        }

        #[test]
        fn zero_check_matches_naive(len in 0usize..5000, pos in any::<prop::sample::Index>()) {
            let mut v = vec![0u8; len];
            prop_assert!(is_zero(&v));
            if len > 0 {
                let p = pos.index(len);
                v[p] = 0x80;
                prop_assert!(!is_zero(&v));
            }
        }
    }
}
#[cfg(test)]
mod big_tests {
    use super::*;
    #[test]
    fn four_mib_partly_zero() {
        let mut data = vec![0u8; 4 << 20];
        blake3::Hasher::new().update(b"s").finalize_xof().fill(&mut data[..2 << 20]);
        let id = ChunkId::of(&data);
        let enc = encode(&data, id, 3, None).unwrap();
        let mut out = Vec::new();
        decode_into(&id, &enc.bytes, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
