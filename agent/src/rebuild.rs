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
    let n = import_store(store, &mut cat)?;
    // fold the WAL into the main file before moving it into place
    drop(cat);
    let c = rusqlite_checkpoint(&tmp);
    if let Err(e) = c {
        warn!(error = %format!("{e:#}"), "checkpoint of rebuilt catalog failed");
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

/// A catalog in memory, built from the store: what list, restore and verify
/// use when the catalog cannot be written (a read-only store whose catalog
/// lives inside it, or is missing there).
///
/// # Errors
/// When the store cannot be listed.
pub fn rebuild_in_memory(store: &Store) -> Result<Catalog> {
    let mut cat = Catalog::open(Path::new(":memory:")).context("creating an in-memory catalog")?;
    let n = import_store(store, &mut cat)?;
    info!(backups = n, "catalog built in memory from the store");
    Ok(cat)
}

/// Imports every backup of the store that reads back into `cat`.
fn import_store(store: &Store, cat: &mut Catalog) -> Result<usize> {
    cat.bind_store(&store.meta().uuid)?;
    let mut n = 0;
    for id in store.list_backups()? {
        let m = match store.read_manifest(id) {
            Ok(m) => m,
            Err(e) => {
                warn!(backup = id.0, error = %crate::logging::Chain(&e), "skipping unreadable manifest");
                continue;
            }
        };
        if let Err(e) = store.read_blockmap(&m) {
            warn!(backup = id.0, error = %crate::logging::Chain(&e), "skipping backup whose block map does not read back");
            continue;
        }
        cat.import_manifest(&m)?;
        // protection lives in the store too (a marker file), so it survives
        if store.is_protected(id) {
            cat.set_protected(id, true)?;
        }
        n += 1;
    }
    Ok(n)
}

fn rusqlite_checkpoint(path: &Path) -> Result<()> {
    // Opening and closing the last connection checkpoints the WAL; the
    // catalog crate does the opening.
    let c = Catalog::open(path)?;
    c.checkpoint()?;
    Ok(())
}
