use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::list::human;
use super::{load_config, GlobalArgs};
use crate::context::open_store;

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Report what would be removed; remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// JSON output: one object with the figures.
    #[arg(long)]
    pub json: bool,
}

/// Removes chunks that no backup in the store references and that are older
/// than `store.gc-grace`, then temp files and orphaned backup files. Safe
/// while backups and prunes run: see the `gc` module of the store crate.
pub fn run(g: &GlobalArgs, a: GcArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let store = open_store(&cfg)?;
    let crate::gc::GcOutcome { stats, report, grace } = crate::gc::run(&cfg, &store, a.dry_run)?;
    if a.json {
        let mut v = serde_json::to_value(&stats)?;
        let o = v.as_object_mut().expect("stats are an object");
        o.insert("dry_run".into(), json!(a.dry_run));
        o.insert("grace_seconds".into(), json!(grace.as_secs()));
        if let Some(r) = &report {
            for (k, val) in serde_json::to_value(r)?.as_object().expect("report is an object") {
                o.insert(k.clone(), val.clone());
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "store {}: {} chunks ({}), {} backups; {} chunks live ({}), {} recent ({}, younger than {}s), {} garbage ({})",
        store.root().display(),
        stats.chunks,
        human(stats.bytes),
        stats.backups,
        stats.live_chunks,
        human(stats.live_bytes),
        stats.recent_chunks,
        human(stats.recent_bytes),
        grace.as_secs(),
        stats.garbage_chunks,
        human(stats.garbage_bytes),
    );
    if stats.missing_chunks > 0 {
        println!("warning: {} chunks referenced by backups are missing from the store; run `blockvault verify`", stats.missing_chunks);
    }
    match report {
        None => println!("dry run: would remove {} chunks ({}); nothing removed", stats.garbage_chunks, human(stats.garbage_bytes)),
        Some(r) => {
            println!("removed {} chunks ({})", r.removed_chunks, human(r.removed_bytes));
            if r.rescued_chunks > 0 {
                println!(
                    "kept {} chunks that became referenced or were touched while gc ran ({} backups committed meanwhile)",
                    r.rescued_chunks, r.late_backups
                );
            }
            if r.orphan_files + r.temp_files > 0 {
                println!("removed {} backup files without a manifest and {} temp files", r.orphan_files, r.temp_files);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
