//! Opening the store and catalog named by the config.

use anyhow::{bail, Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::{Store, Unlock};
use tracing::warn;

use crate::config::Config;

/// The store and catalog of one config.
pub struct Ctx {
    pub cfg: Config,
    pub store: Store,
    pub catalog: Catalog,
    /// The catalog lives in memory, built from the store, because its file
    /// cannot be written (read-only filesystem): nothing recorded in it
    /// outlives the process.
    pub catalog_in_memory: bool,
}

impl Ctx {
    /// Opens the store and catalog; a catalog that is empty while the store
    /// holds backups (deleted or lost) is rebuilt from the store first.
    /// A catalog on a read-only filesystem (a read-only store's own
    /// catalog, present or not) is replaced by one built in memory from
    /// the store, with a warning: list, restore and verify then work, and
    /// what verify finds is reported but not recorded.
    ///
    /// # Errors
    /// When the store is not initialised or either cannot be opened.
    pub fn open(cfg: Config) -> Result<Ctx> {
        let store = open_store(&cfg)?;
        let cat_path = cfg.catalog_path();
        if on_read_only_fs(&cat_path) {
            warn!(
                catalog = %cat_path.display(),
                "catalog is on a read-only filesystem: using a catalog built in memory from the store (nothing is recorded)"
            );
            let catalog = crate::rebuild::rebuild_in_memory(&store)?;
            return Ok(Ctx { cfg, store, catalog, catalog_in_memory: true });
        }
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
        Ok(Ctx { cfg, store, catalog, catalog_in_memory: false })
    }
}

/// True when `path` (or, while it does not exist, its nearest existing
/// ancestor) is on a filesystem mounted read-only.
fn on_read_only_fs(path: &std::path::Path) -> bool {
    let mut p = path;
    loop {
        match rustix::fs::statvfs(p) {
            Ok(s) => return s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY),
            Err(_) => match p.parent() {
                Some(up) if !up.as_os_str().is_empty() => p = up,
                _ => return false,
            },
        }
    }
}

/// Opens the configured store with an error that says what to do.
///
/// # Errors
/// When the store is missing or unreadable.
pub fn open_store(cfg: &Config) -> Result<Store> {
    let key_file = cfg.store.key_file.as_deref();
    let pass = crate::keys::existing(key_file.unwrap_or(std::path::Path::new("")));
    let unlock = Unlock { key_file, passphrase: &pass };
    match Store::open_unlocked(&cfg.store.path, &unlock) {
        Ok(s) => {
            if let (false, Some(k)) = (s.is_encrypted(), key_file) {
                warn!(key_file = %k.display(), "the store is not encrypted: [store] key-file is not used");
            }
            Ok(s)
        }
        Err(blockvault_store::Error::KeyRequired { path }) => bail!(
            "store {} is encrypted: set [store] key-file in {} to one of its key files",
            path.display(),
            cfg.path.display()
        ),
        Err(blockvault_store::Error::NotAStore { path, .. }) => bail!(
            "no blockvault store at {} (run `blockvault --config {} init` first)",
            path.display(),
            cfg.path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("opening store {}", cfg.store.path.display())),
    }
}
