//! Chunk encoding: hash, compress, frame with a checked header.

use crate::error::{Error, Result};
use crate::format::{
    zstd_compress_bound, ChunkHeader, CHUNK_HEADER_LEN, CODEC_RAW, CODEC_ZSTD, MAX_CHUNK_OBJECT_LEN, MAX_CHUNK_PLAIN_LEN,
};
use crate::id::ChunkHasher;
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
    if plain.len() > MAX_CHUNK_PLAIN_LEN as usize {
        return Err(Error::CorruptChunk {
            id,
            reason: format!("{} bytes is more than a chunk can hold ({MAX_CHUNK_PLAIN_LEN})", plain.len()),
        });
    }
    // The spare 64 bytes leave room for the seal trailer of an encrypted
    // store (crate::crypto::SEAL_OVERHEAD), so sealing in place
    // (Store::prepare_chunk) never reallocates a raw 4 MiB chunk.
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

/// Blocks at least this large are probed before they are compressed; a
/// smaller one is compressed whole (a probe of it would be a few hundred
/// bytes, too little to tell).
const PROBE_MIN: usize = 32 * 1024;
/// Bytes taken from each of the probe's four sample points, at most; a
/// block below 256 KiB gives 1/32 of itself to each (2 KiB of a 64 KiB
/// block), so the probe stays an eighth of the block.
const PROBE_PIECE: usize = 8 * 1024;

/// A cheap guess whether zstd will shrink a block: four samples spread over
/// it (8 KiB each, less in a block below 256 KiB), compressed at level 1.
/// Incompressible data (already compressed or encrypted guests, random
/// writes) then costs one small compression instead of a full one: for the
/// 64 KiB blocks of an RBD image, zstd level 3 on random data was a third
/// of the hash workers' time. A wrong "no" only stores a block raw; it
/// never loses data.
fn looks_compressible(plain: &[u8]) -> bool {
    if plain.len() < PROBE_MIN {
        return true;
    }
    let piece = PROBE_PIECE.min(plain.len() / 32);
    let step = plain.len() / 4;
    let mut sample = Vec::with_capacity(4 * piece);
    for i in 0..4 {
        sample.extend_from_slice(&plain[i * step..i * step + piece]);
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
    let corrupt = |reason: String| Error::CorruptChunk { id: *id, reason };
    if bytes.len() as u64 > MAX_CHUNK_OBJECT_LEN {
        return Err(corrupt(format!(
            "the object is at least {} bytes, larger than any chunk ({MAX_CHUNK_OBJECT_LEN} bytes at most)",
            bytes.len()
        )));
    }
    let h = ChunkHeader::decode(id, bytes)?;
    check_lengths(&h).map_err(corrupt)?;
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

/// Checks a header's lengths against the format's limits, so that nothing
/// is allocated from an untrusted length: the plaintext is at most one
/// block of the largest block size, a raw payload is exactly the plaintext,
/// a zstd payload at most zstd's worst case for the plaintext.
fn check_lengths(h: &ChunkHeader) -> std::result::Result<(), String> {
    if h.plain_len > MAX_CHUNK_PLAIN_LEN {
        return Err(format!(
            "header says {} plaintext bytes, more than the largest block ({MAX_CHUNK_PLAIN_LEN} bytes)",
            h.plain_len
        ));
    }
    match h.codec {
        CODEC_RAW if h.payload_len != h.plain_len => Err(format!(
            "header says a raw payload of {} bytes for {} plaintext bytes",
            h.payload_len, h.plain_len
        )),
        CODEC_ZSTD if h.payload_len > zstd_compress_bound(h.plain_len) => Err(format!(
            "header says a zstd payload of {} bytes, more than zstd's bound for {} plaintext bytes ({})",
            h.payload_len,
            h.plain_len,
            zstd_compress_bound(h.plain_len)
        )),
        _ => Ok(()),
    }
}

/// Decodes a chunk of an unencrypted store (plain blake3 ids): see
/// [`decode_with`].
///
/// # Errors
/// `CorruptChunk` on any framing, decompression, length or hash mismatch.
pub fn decode_into(id: &ChunkId, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    decode_with(&ChunkHasher::Plain, id, bytes, out)
}

/// Decodes a stored chunk into `out` (cleared first) and verifies that the
/// plaintext hashes to `id` under the store's `hasher`. Never returns
/// unverified data.
///
/// # Errors
/// `CorruptChunk` on any framing, decompression, length or hash mismatch.
pub fn decode_with(hasher: &ChunkHasher, id: &ChunkId, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let h = check_frame(id, bytes)?;
    let payload = &bytes[CHUNK_HEADER_LEN..];
    out.clear();
    match h.codec {
        CODEC_RAW => out.extend_from_slice(payload),
        _ => {
            // into `out`'s spare capacity: no zero-fill of a buffer that is
            // overwritten at once; a frame that decodes to more than
            // `plain_len` fails here or at the length check below
            out.reserve(h.plain_len as usize);
            zstd::bulk::Decompressor::new().and_then(|mut d| d.decompress_to_buffer(payload, out)).map_err(|e| Error::CorruptChunk {
                id: *id,
                reason: format!("zstd decompression failed: {e}"),
            })?;
        }
    }
    if out.len() != h.plain_len as usize {
        return Err(Error::CorruptChunk {
            id: *id,
            reason: format!("plaintext is {} bytes, header says {}", out.len(), h.plain_len),
        });
    }
    if hasher.id(out) != *id {
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
    fn the_probe_skips_random_blocks_and_keeps_compressible_ones() {
        let random = |n: usize| {
            let mut v = vec![0u8; n];
            blake3::Hasher::new().update(b"probe").finalize_xof().fill(&mut v);
            v
        };
        // 64 KiB blocks (RBD) are probed: random data is not compressed at all
        assert!(!looks_compressible(&random(65536)));
        assert!(!looks_compressible(&random(4 << 20)));
        // below the probe's size, every block goes to zstd
        assert!(looks_compressible(&random(PROBE_MIN - 1)));
        // text, and random data with a compressible quarter under each sample
        // point, are compressed, and shrink
        let text = b"ext4 inode table, log line 0042: backup committed\n".repeat(1400)[..65536].to_vec();
        let mut mixed = random(65536);
        for i in 0..4 {
            mixed[i * 16384..i * 16384 + 4096].fill(0);
        }
        for data in [text, mixed] {
            assert!(looks_compressible(&data));
            let id = ChunkId::of(&data);
            let h = check_frame(&id, &encode(&data, id, 3, None).unwrap().bytes).unwrap();
            assert_eq!(h.codec, CODEC_ZSTD);
            roundtrip(&data, 3);
        }
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

    /// Frames `payload` under a header with valid checksums that claims
    /// `plain_len` plaintext bytes.
    fn crafted(codec: u8, plain_len: u32, payload: &[u8]) -> Vec<u8> {
        let h = ChunkHeader { codec, plain_len, payload_len: payload.len() as u32, payload_crc: crc32fast::hash(payload) };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(payload);
        b
    }

    /// Issue 9 item 7: a header with valid checksums and `plain_len =
    /// 0xFFFFFFFF` made a reader size its output for 4 GiB before the
    /// decompression failed. Every untrusted length is now checked first:
    /// the output buffer never grows past what the real payload needs.
    #[test]
    fn crafted_chunk_length_is_rejected_before_allocating() {
        let data = b"a block that compresses well well well well well".repeat(100);
        let id = ChunkId::of(&data);
        let zstd_payload = zstd::bulk::compress(&data, 3).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (crafted(CODEC_ZSTD, u32::MAX, &zstd_payload), "4294967295 plaintext bytes"),
            (crafted(CODEC_ZSTD, MAX_CHUNK_PLAIN_LEN + 1, &zstd_payload), "more than the largest block"),
            (crafted(CODEC_RAW, u32::MAX, &data), "4294967295 plaintext bytes"),
            (crafted(CODEC_RAW, data.len() as u32 + 1, &data), "raw payload"),
            (crafted(CODEC_ZSTD, 10, &data[..200]), "more than zstd's bound"),
        ];
        for (bytes, why) in cases {
            // a fresh buffer per case: its capacity shows what was allocated
            let mut out = Vec::new();
            let err = decode_into(&id, &bytes, &mut out).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&id.to_hex()) && msg.contains(why), "{msg}");
            assert!(out.capacity() <= data.len(), "{} bytes allocated for a rejected chunk ({msg})", out.capacity());
        }
        // an object larger than any chunk is refused on its length alone
        let huge = vec![0u8; MAX_CHUNK_OBJECT_LEN as usize + 1];
        let msg = check_frame(&id, &huge).unwrap_err().to_string();
        assert!(msg.contains("larger than any chunk"), "{msg}");
        // the honest chunk still decodes
        let mut out = Vec::new();
        decode_into(&id, &crafted(CODEC_ZSTD, data.len() as u32, &zstd_payload), &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn largest_chunks_are_within_the_limits() {
        // incompressible and compressible blocks of the largest size, and
        // zstd's bound itself: every chunk the writer makes, the reader takes
        let mut data = vec![0u8; MAX_CHUNK_PLAIN_LEN as usize];
        blake3::Hasher::new().update(b"max").finalize_xof().fill(&mut data);
        roundtrip(&data, 3);
        roundtrip(&data[..1 << 16], 19);
        assert_eq!(zstd_compress_bound(1 << 20) as usize, zstd::zstd_safe::compress_bound(1 << 20));
        assert_eq!(zstd_compress_bound(100) as usize, zstd::zstd_safe::compress_bound(100));
        assert_eq!(zstd_compress_bound(MAX_CHUNK_PLAIN_LEN) as usize, zstd::zstd_safe::compress_bound(4 << 20));
        let too_big = vec![1u8; MAX_CHUNK_PLAIN_LEN as usize + 1];
        assert!(encode(&too_big, ChunkId::of(&too_big), 3, None).is_err());
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
