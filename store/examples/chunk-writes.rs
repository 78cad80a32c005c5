//! The chunk-write throughput of a store backend, on its own: what a
//! backup's writer stage can reach when nothing else (reading the image,
//! hashing, compressing) competes with it. `bench/rados-store.sh` puts it
//! next to `rados bench write` on the same pool.
//!
//!   cargo run --release -p blockvault-store --features rados --example chunk-writes -- \
//!       rados:POOL[/NAMESPACE] | s3:http://HOST:PORT/BUCKET | DIR   [COUNT] [SIZE_KIB]
//!
//! Writes COUNT (default 256) new chunks of SIZE_KIB (default 4096) through
//! `Backend::put_chunk` and one `sync`, prints the seconds and MiB/s, then
//! deletes them. The chunks are framed random bytes with random ids (the
//! backend neither hashes nor checks them), so the figure is the backend's
//! and the cluster's alone. RADOS takes its cluster from `CEPH_CONF`, S3 its
//! keys from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.

use std::time::Instant;

use blockvault_store::backend::Backend;
use blockvault_store::{chunk, ChunkId, StoreUrl};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(url) = args.first() else {
        return Err("usage: chunk-writes URL|DIR [COUNT] [SIZE_KIB]".into());
    };
    let count: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let size: usize = args.get(2).map_or(Ok(4096), |s| s.parse::<usize>())? * 1024;
    let backend = open(&StoreUrl::parse(url)?)?;

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

fn open(url: &StoreUrl) -> Result<Box<dyn Backend>, Box<dyn std::error::Error>> {
    Ok(match url {
        StoreUrl::Dir(p) => {
            std::fs::create_dir_all(p.join("chunks"))?;
            Box::new(blockvault_store::backend::dir::DirBackend::new(p))
        }
        #[cfg(feature = "rados")]
        StoreUrl::Rados { pool, namespace } => {
            let ceph = blockvault_ceph::CephOptions {
                conf: std::env::var_os("CEPH_CONF").map(Into::into),
                client_id: "admin".into(),
                keyring: None,
                timeout_secs: 30,
            };
            let opts = blockvault_store::backend::rados::RadosOptions::default();
            Box::new(blockvault_store::backend::rados::RadosBackend::connect(&ceph, pool, namespace.as_deref(), &opts)?)
        }
        #[cfg(not(feature = "rados"))]
        StoreUrl::Rados { .. } => return Err("built without the rados feature".into()),
        StoreUrl::S3 { endpoint, bucket, prefix } => {
            use blockvault_store::backend::s3::{S3Backend, S3Location, S3Options};
            let loc = S3Location { endpoint: endpoint.clone(), bucket: bucket.clone(), prefix: prefix.clone().unwrap_or_default() };
            Box::new(S3Backend::from_env(loc, &S3Options::default())?)
        }
    })
}
