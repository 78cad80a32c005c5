//! Opening the store and catalog named by the config.

use anyhow::{bail, Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::Store;
use tracing::warn;

use crate::config::Config;

/// The store and catalog of one config.
pub struct Ctx {
    pub cfg: Config,
    pub store: Store,
    pub catalog: Catalog,
}

impl Ctx {
    /// Opens the store and catalog; a catalog that is empty while the store
    /// holds backups (deleted or lost) is rebuilt from the store first.
    ///
    /// # Errors
    /// When the store is not initialised or either cannot be opened.
    pub fn open(cfg: Config) -> Result<Ctx> {
        let store = open_store(&cfg)?;
        let cat_path = cfg.catalog_path();
        let catalog_existed = cat_path.exists();
        let mut catalog = Catalog::open(&cat_path).with_context(|| format!("opening catalog {}", cat_path.display()))?;
        if !catalog_existed || catalog.backup_count()? == 0 {
            let ids = store.list_backups()?;
            if !ids.is_empty() {
                warn!(
                    catalog = %cat_path.display(),
                    backups = ids.len(),
                    "catalog is empty but the store holds backups: rebuilding the catalog from the store"
                );
                let r = crate::rebuild::rebuild(&store, &mut catalog)?;
                for (id, why) in &r.unreadable {
                    warn!(backup = id.0, "backup {} in the store could not be imported: {why}", id.0);
                }
            }
        }
        catalog.bind_store(&store.meta().uuid)?;
        Ok(Ctx { cfg, store, catalog })
    }
}

/// Opens the configured store with an error that says what to do.
///
/// # Errors
/// When the store is missing or unreadable.
pub fn open_store(cfg: &Config) -> Result<Store> {
    match Store::open(&cfg.store.path) {
        Ok(s) => Ok(s),
        Err(blockvault_store::Error::NotAStore { path, .. }) => bail!(
            "no blockvault store at {} (run `blockvault --config {} init` first)",
            path.display(),
            cfg.path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("opening store {}", cfg.store.path.display())),
    }
}
