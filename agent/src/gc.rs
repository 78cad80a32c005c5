//! `gc`: removes chunks that no backup in the store references and that
//! are older than `store.gc-grace`, then temp files and orphaned backup
//! files. Safe while backups and prunes run: the locking is the store
//! crate's (see its `gc` module); this takes the store's `gc` lock so two
//! collections never run at once.

use std::time::Duration;

use anyhow::{Context, Result};
use blockvault_store::gc::{self, GcOptions, GcReport, GcStats, LiveSet};
use blockvault_store::Store;

use crate::config::Config;
use crate::error::Error;

/// Name of the store lock one gc holds.
pub const GC_LOCK: &str = "gc";

/// What a gc found and did.
#[derive(Clone, Debug)]
pub struct GcOutcome {
    /// What the plan found (chunks live, recent, garbage, missing).
    pub stats: GcStats,
    /// What was removed; `None` for a dry run.
    pub report: Option<GcReport>,
    /// The grace period applied.
    pub grace: Duration,
}

/// Plans a gc of `store` and, unless `dry_run`, applies it.
///
/// # Errors
/// [`Error::Locked`] when another gc runs; a backup whose block map does
/// not read (gc then removes nothing); store errors, naming the object.
pub fn run(cfg: &Config, store: &Store, dry_run: bool) -> Result<GcOutcome> {
    let Some(_gc_lock) = store.try_lock_named(GC_LOCK)? else {
        return Err(Error::Locked {
            lock: GC_LOCK.into(),
            message: format!("another gc is running on store {}", store.root().display()),
        }
        .into());
    };
    let opts = GcOptions { grace: cfg.store.gc_grace.0 };
    // The live set comes from the store's manifests, not from the catalog: a
    // backup is durable in the store a moment before its catalog row commits.
    let live = LiveSet::from_store(store).context(
        "gc needs the block map of every backup in the store and stopped before removing anything; \
         check the backup with `blockvault verify`, and remove it if it cannot be repaired",
    )?;
    let plan = gc::plan(store, live, &opts)?;
    let stats = plan.stats.clone();
    let report = if dry_run { None } else { Some(gc::apply(store, plan)?) };
    Ok(GcOutcome { stats, report, grace: opts.grace })
}
