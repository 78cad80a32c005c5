use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::{load_config, GlobalArgs};

#[derive(Subcommand, Debug)]
pub enum CatalogCommand {
    /// Recreate the catalog from the store's manifests (in place; safe beside running jobs).
    Rebuild,
}

/// `catalog rebuild`: rebuilds the live catalog in one transaction (see
/// `crate::rebuild`). A catalog file too damaged to open is moved aside and
/// a new one built. Exits non-zero when a backup in the store could not be
/// imported (its manifest or block map does not read): the catalog is
/// rebuilt without it, and each one is named.
pub fn run(g: &GlobalArgs, c: CatalogCommand) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    match c {
        CatalogCommand::Rebuild => {
            let (path, r) = crate::rebuild::rebuild_catalog(&cfg)?;
            for (id, why) in &r.unreadable {
                println!("backup {}: NOT imported: {why}", id.0);
            }
            println!("catalog {} rebuilt: {} backups", path.display(), r.imported);
            if !r.unreadable.is_empty() {
                eprintln!(
                    "error: {} backups in the store cannot be read and are not in the catalog; `blockvault verify` reports them, `blockvault forget @ID` removes one",
                    r.unreadable.len()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
