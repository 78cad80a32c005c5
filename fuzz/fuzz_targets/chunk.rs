//! Chunk decoding (header + payload + checks). Properties:
//! * a chunk that decodes has plaintext that hashes to its id, of the
//!   length its header says, at most one block of the largest block size;
//! * decoding anything allocates at most one block's plaintext (issue 9
//!   item 7: a crafted length must not make a reader allocate 4 GiB);
//! * a rejected chunk's error names the chunk;
//! * encode then decode gives back the input, at every compression level.
//!
//! The input is tried as a stored object, and as header fields + payload
//! framed with valid checksums, so the fuzzer reaches the length checks
//! and the decompressor.
#![no_main]

use blockvault_store::chunk::{check_frame, decode_into, encode};
use blockvault_store::format::{ChunkHeader, MAX_CHUNK_PLAIN_LEN};
use blockvault_store::ChunkId;
use libfuzzer_sys::fuzz_target;

fn check_decode(id: &ChunkId, bytes: &[u8]) {
    let mut out = Vec::new();
    match decode_into(id, bytes, &mut out) {
        Ok(()) => {
            assert_eq!(ChunkId::of(&out), *id, "decoded plaintext does not hash to the id");
            let h = check_frame(id, bytes).expect("a decoded chunk's frame checks");
            assert_eq!(out.len(), h.plain_len as usize);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&id.to_hex()), "error does not name the chunk: {msg}");
        }
    }
    assert!(
        out.capacity() <= MAX_CHUNK_PLAIN_LEN as usize,
        "{} bytes allocated while decoding a {}-byte object",
        out.capacity(),
        bytes.len()
    );
}

fuzz_target!(|data: &[u8]| {
    // as a stored object, under the id of its own bytes and of its payload
    check_decode(&ChunkId::of(data), data);
    if data.len() > 24 {
        check_decode(&ChunkId::of(&data[24..]), data);
    }

    // as header fields + payload with valid checksums
    if data.len() >= 5 {
        let payload = &data[5..];
        let h = ChunkHeader {
            codec: data[0] % 3,
            plain_len: u32::from_le_bytes(data[1..5].try_into().unwrap()),
            payload_len: payload.len() as u32,
            payload_crc: crc32fast::hash(payload),
        };
        let mut framed = h.encode().to_vec();
        framed.extend_from_slice(payload);
        // a raw payload decodes under its own hash when the length matches
        check_decode(&ChunkId::of(payload), &framed);
        if let Ok(plain) = zstd::bulk::decompress(payload, MAX_CHUNK_PLAIN_LEN as usize) {
            check_decode(&ChunkId::of(&plain), &framed);
        }
    }

    // round trip of the input as a block's plaintext
    let level = data.first().map_or(0, |b| (*b % 5) as i32);
    let id = ChunkId::of(data);
    let enc = encode(data, id, level, None).expect("a block of at most 4 MiB encodes");
    let mut out = Vec::new();
    decode_into(&id, &enc.bytes, &mut out).expect("an encoded chunk decodes");
    assert_eq!(out, data);
});
