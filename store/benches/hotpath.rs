//! The hot path of a backup, per core: `chunk::encode` (zero check, zstd,
//! framing) plus the blake3 hash, next to raw blake3 and raw zstd at the same
//! level, so the pipeline's own overhead is visible.
//!
//! `cargo bench -p blockvault-store --bench hotpath`

use blockvault_store::chunk;
use blockvault_store::ChunkId;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BLOCK: usize = 4 << 20;
const LEVEL: i32 = 3;

fn random_block() -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    blake3::Hasher::new().update(b"bench").finalize_xof().fill(&mut v);
    v
}

/// Text-like data: repeated lines with varying numbers, compresses ~5-10x.
fn text_block() -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    let mut i = 0u64;
    while v.len() < BLOCK {
        v.extend_from_slice(format!("{i:08} the quick brown fox jumps over the lazy dog {}\n", i * 7919 % 1000).as_bytes());
        i += 1;
    }
    v.truncate(BLOCK);
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hotpath");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.sample_size(20);
    for (name, data) in [("random", random_block()), ("text", text_block())] {
        g.bench_with_input(BenchmarkId::new("blake3", name), &data, |b, d| b.iter(|| blake3::hash(d)));
        let mut out = vec![0u8; zstd::zstd_safe::compress_bound(BLOCK)];
        g.bench_with_input(BenchmarkId::new("zstd-3", name), &data, |b, d| {
            b.iter(|| zstd::bulk::compress_to_buffer(d, &mut out, LEVEL).unwrap())
        });
        let mut comp = zstd::bulk::Compressor::new(LEVEL).unwrap();
        g.bench_with_input(BenchmarkId::new("hash+encode", name), &data, |b, d| {
            b.iter(|| {
                let zero = chunk::is_zero(d);
                let id = ChunkId::of(d);
                (zero, chunk::encode(d, id, LEVEL, Some(&mut comp)).unwrap().bytes.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
