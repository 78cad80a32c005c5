//! Block map decoding. Properties:
//! * a decoded map re-encodes to exactly the input (the format is canonical);
//! * its geometry is within the format's limits and its length matches;
//! * any map built from the input round-trips through encode/decode.
//!
//! The input is tried twice: as it is, and with its trailing blake3 fixed
//! up, so the fuzzer gets past the checksum into the header checks.
#![no_main]

use std::path::Path;

use blockvault_store::blockmap::{block_count, encoded_len};
use blockvault_store::format::{MAX_IMAGE_SIZE, MIN_BLOCK_SIZE};
use blockvault_store::{BlockMap, ChunkId};
use libfuzzer_sys::fuzz_target;

fn check_decoded(input: &[u8]) {
    let Ok(m) = BlockMap::decode(Path::new("fuzz.blockmap"), input) else { return };
    assert_eq!(m.encode(), input, "decode then encode changed the bytes");
    assert!(m.image_size() <= MAX_IMAGE_SIZE);
    assert_eq!(m.len() as u64, block_count(m.image_size(), m.block_size()));
    assert_eq!(encoded_len(m.image_size(), m.block_size()), Ok(input.len() as u64));
    if let Some(last) = m.len().checked_sub(1) {
        let (off, len) = m.block_range(last);
        assert!(len > 0 && len <= m.block_size() as usize);
        assert_eq!(off + len as u64, m.image_size());
    }
}

fuzz_target!(|data: &[u8]| {
    check_decoded(data);
    if data.len() >= 32 {
        let mut fixed = data.to_vec();
        let body = fixed.len() - 32;
        let sum = blake3::hash(&fixed[..body]);
        fixed[body..].copy_from_slice(sum.as_bytes());
        check_decoded(&fixed);
    }

    // a map built from the input: geometry from the first bytes (at most
    // 4096 blocks), entries from the rest
    if data.len() >= 3 {
        let bs = MIN_BLOCK_SIZE << (data[0] % 7);
        let size = u16::from_le_bytes([data[1], data[2]]) as u64 * (bs as u64 / 16);
        let mut m = BlockMap::new_zeroed(size, bs);
        for (i, b) in data[3..].iter().enumerate() {
            if !m.is_empty() && *b != 0 {
                m.set(i % m.len(), Some(ChunkId::of(&[*b])));
            }
        }
        let enc = m.encode();
        assert_eq!(BlockMap::decode(Path::new("fuzz.blockmap"), &enc).expect("an encoded map decodes"), m);
    }
});
