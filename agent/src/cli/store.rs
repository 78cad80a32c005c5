//! `blockvault store copy --to URL [IMAGE...]`: see [`crate::copy`].

use std::process::ExitCode;

use anyhow::{Context, Result};
use blockvault_store::StoreUrl;
use clap::{Args, Subcommand};

use super::{load_config, GlobalArgs};
use crate::context::open_store;
use crate::copy::{self, CopyOptions};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy the store's backups (or some images') to another store, e.g. an
    /// off-site S3 bucket: only what the target lacks, resumable after an
    /// interruption, every object read back and checked. The target is
    /// created (a replica of this store) when it does not exist.
    Copy(CopyArgs),
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The target store: a directory, rados:POOL[/NAMESPACE] (the cluster
    /// of [store.ceph], else [ceph]) or s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]
    /// (keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    pub to: String,
    /// Only these images' backups (default: all).
    pub images: Vec<String>,
    /// JSON output: one object with the counts.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, c: StoreCommand) -> Result<ExitCode> {
    match c {
        StoreCommand::Copy(a) => run_copy(g, a),
    }
}

fn run_copy(g: &GlobalArgs, a: CopyArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let src = open_store(&cfg)?;
    let url = StoreUrl::parse(&a.to)?;
    crate::context::prepare_store(&cfg, &url)?;
    let backend = crate::context::remote_backend(&cfg, &url)?;
    let dst = copy::open_target(&src, backend).with_context(|| format!("opening copy target {url}"))?;
    let r = copy::copy(&src, &dst, &CopyOptions { images: a.images })
        .with_context(|| format!("copying store {} to {url} (run the same command again to resume)", src.root().display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "copied {} backups to {url} ({} already there): {} chunks copied ({} bytes), {} already there, {} other objects",
            r.backups_copied, r.backups_present, r.chunks_copied, r.chunk_bytes, r.chunks_present, r.objects_copied
        );
    }
    Ok(ExitCode::SUCCESS)
}
