use std::process::ExitCode;

use anyhow::{Context, Result};
use blockvault_catalog::Catalog;
use clap::Subcommand;
use tracing::warn;

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
            let store = crate::context::open_store(&cfg)?;
            let _lock = store.lock_shared_for_reading()?;
            let path = cfg.catalog_path();
            let open = |p: &std::path::Path| Catalog::open(p).with_context(|| format!("opening catalog {}", p.display()));
            let mut cat = match Catalog::open(&path) {
                Ok(c) => c,
                Err(e) if e.is_corrupt() => {
                    let aside = crate::rebuild::move_aside(&path)?;
                    warn!(catalog = %path.display(), moved_to = %aside.display(), error = %e, "catalog is damaged: moved aside, building a new one");
                    open(&path)?
                }
                Err(e) => return Err(e).with_context(|| format!("opening catalog {}", path.display())),
            };
            let r = match crate::rebuild::rebuild(&store, &mut cat) {
                Ok(r) => r,
                Err(e) if e.downcast_ref::<blockvault_catalog::Error>().is_some_and(|e| e.is_corrupt()) => {
                    drop(cat);
                    let aside = crate::rebuild::move_aside(&path)?;
                    warn!(catalog = %path.display(), moved_to = %aside.display(), error = %format!("{e:#}"), "catalog is damaged: moved aside, building a new one");
                    let mut cat = open(&path)?;
                    crate::rebuild::rebuild(&store, &mut cat)?
                }
                Err(e) => return Err(e),
            };
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
