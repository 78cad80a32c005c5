//! Rebuilding the catalog from the store alone.

use std::path::Path;

use anyhow::{Context, Result};
use blockvault_catalog::Catalog;
use blockvault_store::Store;
use tracing::{info, warn};

/// Builds a new catalog at `path` from every manifest in the store, then
/// replaces the old one atomically. A manifest or block map that does not
/// read back is skipped with a warning (the backup is not restorable).
///
/// # Errors
/// When the store cannot be listed or the catalog cannot be written.
pub fn rebuild(store: &Store, path: &Path) -> Result<usize> {
    let tmp = path.with_extension("rebuild.tmp");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", tmp.display()));
    }
    let mut cat = Catalog::open(&tmp).with_context(|| format!("creating catalog {}", tmp.display()))?;
    cat.bind_store(&store.meta().uuid)?;
    let mut n = 0;
    for id in store.list_backups()? {
        let m = match store.read_manifest(id) {
            Ok(m) => m,
            Err(e) => {
                warn!(backup = id.0, error = %e, "skipping unreadable manifest");
                continue;
            }
        };
        if let Err(e) = store.read_blockmap(&m) {
            warn!(backup = id.0, error = %e, "skipping backup whose block map does not read back");
            continue;
        }
        cat.import_manifest(&m)?;
        // protection lives in the store too (a marker file), so it survives
        if store.is_protected(id) {
            cat.set_protected(id, true)?;
        }
        n += 1;
    }
    // fold the WAL into the main file before moving it into place
    drop(cat);
    let c = rusqlite_checkpoint(&tmp);
    if let Err(e) = c {
        warn!(error = %e, "checkpoint of rebuilt catalog failed");
    }
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("moving rebuilt catalog to {}", path.display()))?;
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", tmp.display()));
    }
    info!(backups = n, catalog = %path.display(), "catalog rebuilt from store");
    Ok(n)
}

fn rusqlite_checkpoint(path: &Path) -> Result<()> {
    // Opening and closing the last connection checkpoints the WAL; the
    // catalog crate does the opening.
    let c = Catalog::open(path)?;
    c.checkpoint()?;
    Ok(())
}
