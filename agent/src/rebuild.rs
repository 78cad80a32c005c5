//! The catalog from the store: rebuilding it, and reconciling it with the
//! store. The store is the truth; the catalog is its index.
//!
//! ## Rebuild in place
//! `catalog rebuild` (and the automatic rebuild of an empty catalog) works
//! on the live catalog, in one IMMEDIATE transaction
//! ([`Catalog::with_write_lock`]): every finished backup row is deleted and
//! every manifest in the store imported again, with its protection and
//! verify markers. Other processes' writes wait on SQLite's lock until it
//! commits, so none is lost; nothing is renamed and no journal file is
//! touched. `running` rows survive, so a backup in progress still commits
//! and lists. Manifests and block maps are read before the transaction
//! (it stays short), and the store's list is read again inside it: prune
//! and forget remove a backup's row and its store files under that same
//! lock, so a backup removed meanwhile is not brought back.
//!
//! ## Reconcile
//! `list`, `prune` and `verify` first import what the store holds and the
//! catalog lacks (a prune killed between its catalog delete and its store
//! removal, or a commit whose catalog update failed), and report catalog
//! rows whose manifest is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use blockvault_catalog::{BackupState, Catalog, VerifyState};
use blockvault_store::{BackupId, Manifest, Store, VerifyResult};
use tracing::{info, warn};

/// What a rebuild did.
#[derive(Debug, Default)]
pub struct RebuildReport {
    pub imported: usize,
    /// Running rows kept (backups in progress).
    pub running: usize,
    /// Backups in the store that could not be imported, with the reason.
    pub unreadable: Vec<(BackupId, Unreadable)>,
}

/// Why a backup in the store cannot be imported.
#[derive(Clone, Debug)]
pub enum Unreadable {
    Manifest(String),
    BlockMap(String),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Manifest(e) => write!(f, "manifest unreadable: {e}"),
            Unreadable::BlockMap(e) => write!(f, "block map unreadable: {e}"),
        }
    }
}

/// Reads a backup's manifest and checks that its block map reads back.
fn load(store: &Store, id: BackupId) -> Result<Manifest, Unreadable> {
    let m = store.read_manifest(id).map_err(|e| Unreadable::Manifest(e.to_string()))?;
    store.read_blockmap(&m).map_err(|e| Unreadable::BlockMap(e.to_string()))?;
    Ok(m)
}

/// Imports one backup with its store markers.
fn import(store: &Store, cat: &Catalog, m: &Manifest) -> Result<()> {
    cat.import_manifest(m)?;
    // protection and verify results live in the store too (marker files)
    if store.is_protected(m.id) {
        cat.set_protected(m.id, true)?;
    }
    let state = match store.verify_mark(m.id) {
        Ok(None) => VerifyState::Unverified,
        Ok(Some(mark)) => match mark.state {
            VerifyResult::Ok => VerifyState::Ok,
            VerifyResult::Invalid => VerifyState::Invalid,
        },
        Err(e) => {
            warn!(backup = m.id.0, error = %e, "verify marker unreadable: treating the backup as invalid until verified");
            VerifyState::Invalid
        }
    };
    if state != VerifyState::Unverified {
        cat.set_verify_state(m.id, state)?;
    }
    Ok(())
}

/// Rebuilds `cat` in place from every manifest in the store (see the
/// module docs). A backup whose manifest or block map does not read back is
/// not imported and is reported in [`RebuildReport::unreadable`].
///
/// # Errors
/// When the store cannot be listed or the catalog cannot be written.
pub fn rebuild(store: &Store, cat: &mut Catalog) -> Result<RebuildReport> {
    let mut pre: BTreeMap<BackupId, Result<Manifest, Unreadable>> = BTreeMap::new();
    for id in store.list_backups()? {
        pre.insert(id, load(store, id));
    }
    let uuid = store.meta().uuid.clone();
    let report = cat.with_write_lock(|c| -> Result<RebuildReport> {
        let mut r = RebuildReport::default();
        c.rebind_store(&uuid)?;
        c.delete_finished_backups()?;
        let running: BTreeSet<BackupId> = c.backup_states()?.into_iter().map(|(id, _)| id).collect();
        r.running = running.len();
        for id in store.list_backups()? {
            if running.contains(&id) {
                continue; // its backup commits it
            }
            match pre.remove(&id).unwrap_or_else(|| load(store, id)) {
                Ok(m) => {
                    import(store, c, &m)?;
                    r.imported += 1;
                }
                Err(why) => r.unreadable.push((id, why)),
            }
        }
        Ok(r)
    })?;
    for (id, why) in &report.unreadable {
        warn!(backup = id.0, error = %why, "backup in the store not imported: it cannot be read");
    }
    info!(backups = report.imported, running = report.running, catalog = %cat.path().display(), "catalog rebuilt from store");
    Ok(report)
}

/// Moves a damaged catalog file (and its journal files) aside to
/// `<name>.corrupt-<time>*`, so a new one can be built. Returns the new name.
///
/// # Errors
/// When the rename fails.
pub fn move_aside(path: &Path) -> Result<std::path::PathBuf> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let aside = std::path::PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside).with_context(|| format!("moving damaged catalog {} aside", path.display()))?;
    for ext in ["-wal", "-shm", "-journal"] {
        let from = format!("{}{ext}", path.display());
        if Path::new(&from).exists() {
            let to = format!("{}{ext}", aside.display());
            std::fs::rename(&from, &to).with_context(|| format!("moving {from} aside"))?;
        }
    }
    Ok(aside)
}

/// What a reconcile found.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Store backups the catalog lacked (or called failed), now committed rows.
    pub imported: Vec<BackupId>,
    /// Committed catalog rows whose manifest is not in the store.
    pub missing: Vec<BackupId>,
    /// Store backups not in the catalog whose manifest or block map does not read.
    pub unreadable: Vec<(BackupId, Unreadable)>,
}

/// Brings the catalog in line with the store (see the module docs): under
/// the catalog's write lock, every backup the store holds and the catalog
/// does not list as running or committed is imported.
///
/// # Errors
/// Store listing or catalog errors.
pub fn reconcile(store: &Store, cat: &Catalog) -> Result<ReconcileReport> {
    // Without a lock first: when store and catalog agree (the usual case)
    // no write lock is taken. What looks off is looked at again under the
    // lock (a prune in progress removes a row and its files in one
    // transaction, so only a locked look is conclusive).
    {
        let states: BTreeMap<BackupId, BackupState> = cat.backup_states()?.into_iter().collect();
        let in_store: BTreeSet<BackupId> = store.list_backups()?.into_iter().collect();
        let store_only = in_store
            .iter()
            .any(|id| !matches!(states.get(id), Some(BackupState::Running | BackupState::Committed)));
        let missing = states.iter().any(|(id, s)| *s == BackupState::Committed && !in_store.contains(id));
        if !store_only && !missing {
            return Ok(ReconcileReport::default());
        }
    }
    let report = cat.with_write_lock(|c| -> Result<ReconcileReport> {
        let mut r = ReconcileReport::default();
        let states: BTreeMap<BackupId, BackupState> = c.backup_states()?.into_iter().collect();
        let in_store: BTreeSet<BackupId> = store.list_backups()?.into_iter().collect();
        for &id in &in_store {
            match states.get(&id) {
                Some(BackupState::Running | BackupState::Committed) => continue,
                Some(BackupState::Failed) | None => {}
            }
            match load(store, id) {
                Ok(m) => {
                    if states.contains_key(&id) {
                        // marked failed, yet complete in the store
                        c.commit_backup(&m)?;
                    } else {
                        import(store, c, &m)?;
                    }
                    r.imported.push(id);
                }
                Err(why) => r.unreadable.push((id, why)),
            }
        }
        r.missing = states
            .iter()
            .filter(|(id, s)| **s == BackupState::Committed && !in_store.contains(id))
            .map(|(id, _)| *id)
            .collect();
        Ok(r)
    })?;
    for id in &report.imported {
        warn!(backup = id.0, "backup found in the store but not in the catalog: imported");
    }
    for id in &report.missing {
        warn!(backup = id.0, "the catalog lists backup {} but the store has no manifest: it cannot be restored (`blockvault forget` removes the row)", id.0);
    }
    Ok(report)
}

/// A catalog in memory, built from the store: what list, restore and verify
/// use when the catalog cannot be written (a read-only store whose catalog
/// lives inside it, or is missing there).
///
/// # Errors
/// When the store cannot be listed.
pub fn rebuild_in_memory(store: &Store) -> Result<Catalog> {
    let mut cat = Catalog::open(Path::new(":memory:")).context("creating an in-memory catalog")?;
    let r = rebuild(store, &mut cat)?;
    info!(backups = r.imported, "catalog built in memory from the store");
    Ok(cat)
}

/// `catalog rebuild`: rebuilds the config's catalog from its store in one
/// transaction ([`rebuild`]), under the shared store lock. A catalog file
/// too damaged to open or to rebuild in is moved aside and a new one built.
/// Returns the catalog's path and what was imported.
///
/// # Errors
/// The store does not open; catalog or store errors.
pub fn rebuild_catalog(cfg: &crate::config::Config) -> Result<(std::path::PathBuf, RebuildReport)> {
    let store = crate::context::open_store(cfg)?;
    let _lock = store.lock_shared_for_reading()?;
    let path = cfg.catalog_path();
    let open = |p: &Path| Catalog::open(p).with_context(|| format!("opening catalog {}", p.display()));
    let mut cat = match Catalog::open(&path) {
        Ok(c) => c,
        Err(e) if e.is_corrupt() => {
            let aside = move_aside(&path)?;
            tracing::warn!(catalog = %path.display(), moved_to = %aside.display(), error = %e, "catalog is damaged: moved aside, building a new one");
            open(&path)?
        }
        Err(e) => return Err(e).with_context(|| format!("opening catalog {}", path.display())),
    };
    let r = match rebuild(&store, &mut cat) {
        Ok(r) => r,
        Err(e) if e.downcast_ref::<blockvault_catalog::Error>().is_some_and(|e| e.is_corrupt()) => {
            drop(cat);
            let aside = move_aside(&path)?;
            tracing::warn!(catalog = %path.display(), moved_to = %aside.display(), error = %format!("{e:#}"), "catalog is damaged: moved aside, building a new one");
            let mut cat = open(&path)?;
            rebuild(&store, &mut cat)?
        }
        Err(e) => return Err(e),
    };
    Ok((path, r))
}
