use std::process::ExitCode;

use anyhow::{Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::InitOptions;
use clap::Args;

use super::{load_config, GlobalArgs};

#[derive(Args, Debug)]
pub struct InitArgs {}

pub fn run(g: &GlobalArgs, _a: InitArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let block_size = cfg.defaults.block_size.map(|b| b.0).unwrap_or(blockvault_store::format::DEFAULT_BLOCK_SIZE);
    let url = cfg.store_url();
    let (store, created) = crate::context::init_store(&cfg, &InitOptions { default_block_size: block_size })?;
    if created {
        println!("initialised store {url} (uuid {})", store.meta().uuid);
    } else {
        println!("store {url} already initialised (uuid {})", store.meta().uuid);
    }
    // the default catalog of a store that is not a directory is in /var/lib/blockvault
    if let Some(parent) = cfg.catalog_path().parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let cat_path = cfg.catalog_path();
    let cat = Catalog::open(&cat_path).with_context(|| format!("creating catalog {}", cat_path.display()))?;
    cat.bind_store(&store.meta().uuid)?;
    println!("catalog {}", cat_path.display());
    Ok(ExitCode::SUCCESS)
}
