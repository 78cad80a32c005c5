use std::process::ExitCode;

use anyhow::{Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{InitOptions, Store};
use clap::Args;

use super::{load_config, GlobalArgs};

#[derive(Args, Debug)]
pub struct InitArgs {}

pub fn run(g: &GlobalArgs, _a: InitArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let block_size = cfg.defaults.block_size.map(|b| b.0).unwrap_or(blockvault_store::format::DEFAULT_BLOCK_SIZE);
    let store = match Store::open(&cfg.store.path) {
        Ok(s) => {
            println!("store {} already initialised (uuid {})", cfg.store.path.display(), s.meta().uuid);
            s
        }
        Err(blockvault_store::Error::NotAStore { .. }) => {
            let s = Store::init(&cfg.store.path, &InitOptions { default_block_size: block_size })
                .with_context(|| format!("initialising store {}", cfg.store.path.display()))?;
            println!("initialised store {} (uuid {})", cfg.store.path.display(), s.meta().uuid);
            s
        }
        Err(e) => return Err(e).with_context(|| format!("opening store {}", cfg.store.path.display())),
    };
    let cat_path = cfg.catalog_path();
    let cat = Catalog::open(&cat_path).with_context(|| format!("creating catalog {}", cat_path.display()))?;
    cat.bind_store(&store.meta().uuid)?;
    println!("catalog {}", cat_path.display());
    Ok(ExitCode::SUCCESS)
}
