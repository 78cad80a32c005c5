use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::{load_config, GlobalArgs};

#[derive(Subcommand, Debug)]
pub enum CatalogCommand {
    /// Recreate the catalog from the store's manifests.
    Rebuild,
}

pub fn run(g: &GlobalArgs, c: CatalogCommand) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    match c {
        CatalogCommand::Rebuild => {
            let store = crate::context::open_store(&cfg)?;
            let _lock = store.lock_shared_for_reading()?;
            let n = crate::rebuild::rebuild(&store, &cfg.catalog_path())?;
            println!("catalog {} rebuilt: {n} backups", cfg.catalog_path().display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
