//! The chunk-write throughput of a store backend, on its own: what a
//! backup's writer stage can reach when nothing else (reading the image,
//! hashing, compressing) competes with it. `bench/rados-store.sh` puts it
//! next to `rados bench write` on the same pool.
//!
//!   cargo run --release -p blockvault --example chunk-writes -- \
//!       CONFIG  rados:POOL[/NAMESPACE] | s3:http://HOST:PORT/BUCKET | DIR   [COUNT] [SIZE_KIB]
//!
//! Writes COUNT (default 256) new chunks of SIZE_KIB (default 4096) through
//! `Backend::put_chunk` and one `sync`, prints the seconds and MiB/s, then
//! deletes them. The chunks are framed random bytes with random ids (the
//! backend neither hashes nor checks them), so the figure is the backend's
//! and the cluster's alone. The backend is opened as `store copy --to URL`
//! opens it: RADOS with CONFIG's `[store.ceph]` (else `[ceph]`), S3 with
//! the keys from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.

use std::path::Path;
use std::time::Instant;

use blockvault::config::Config;
use blockvault::context::{prepare_store, remote_backend};
use blockvault_store::{chunk, ChunkId, StoreUrl};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(config), Some(url)) = (args.first(), args.get(1)) else {
        return Err("usage: chunk-writes CONFIG URL|DIR [COUNT] [SIZE_KIB]".into());
    };
    let count: usize = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let size: usize = args.get(3).map_or(Ok(4096), |s| s.parse::<usize>())? * 1024;
    let cfg = Config::load(Path::new(config))?;
    let url = StoreUrl::parse(url)?;
    if let StoreUrl::Dir(p) = &url {
        for d in ["chunks", "tmp"] {
            std::fs::create_dir_all(p.join(d))?;
        }
    }
    prepare_store(&cfg, &url)?;
    let backend = remote_backend(&cfg, &url)?;

    let mut plain = vec![0u8; size];
    rand::Rng::fill(&mut rand::thread_rng(), &mut plain[..]);
    let bytes = chunk::encode(&plain, ChunkId([0; 32]), 0, None)?.bytes;
    let ids: Vec<ChunkId> = (0..count).map(|_| ChunkId(rand::random())).collect();

    let start = Instant::now();
    for id in &ids {
        backend.put_chunk(id, &bytes)?;
    }
    backend.sync()?;
    let secs = start.elapsed().as_secs_f64();
    let mib = (count * bytes.len()) as f64 / (1 << 20) as f64;
    println!("{count} chunks of {} bytes: {secs:.2} s, {:.1} MiB/s", bytes.len(), mib / secs);
    for id in &ids {
        backend.delete_chunk(id)?;
    }
    Ok(())
}
