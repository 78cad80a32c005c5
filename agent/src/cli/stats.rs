use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::list::human;
use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::logging::printable;

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Only these images in the per-image table (the store's figures cover all).
    pub images: Vec<String>,
    /// JSON output: one object, the store's figures and `per_image`.
    #[arg(long)]
    pub json: bool,
}

/// Figures per store and per image: sizes, stored bytes, dedup and
/// compression ratios, chunk counts, oldest and newest backup (see `crate::stats`).
pub fn run(g: &GlobalArgs, a: StatsArgs) -> Result<ExitCode> {
    let ctx = Ctx::open(load_config(g)?)?;
    let s = crate::stats::gather(&ctx, &a.images)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let t = &s.store;
    println!("store {}: {} backups of {} images", printable(&t.store), t.backups, t.images);
    println!("  chunks: {} ({} stored), {} referenced ({} plain, {} stored)", t.chunks, human(t.stored_bytes), t.referenced_chunks, human(t.referenced_plain_bytes), human(t.referenced_stored_bytes));
    if t.index_chunks > 0 {
        println!("  {} index chunks of block maps ({} stored)", t.index_chunks, human(t.index_stored_bytes));
    }
    if t.unreferenced_chunks > 0 {
        println!("  {} chunks ({}) no backup references: gc frees them after the grace period", t.unreferenced_chunks, human(t.unreferenced_bytes));
    }
    if t.missing_chunks > 0 {
        println!("  warning: {} referenced chunks are missing from the store; run `blockvault verify`", t.missing_chunks);
    }
    println!(
        "  logical {} in all backups; dedup {:.2}x, compression {:.2}x, {:.2}x in all",
        human(t.logical_bytes),
        t.dedup_ratio,
        t.compression_ratio,
        t.dedup_ratio * t.compression_ratio
    );
    if let (Some(o), Some(n)) = (&t.oldest, &t.newest) {
        println!("  oldest backup {}, newest {}", printable(o), printable(n));
    }
    if !t.unreadable_backups.is_empty() {
        let ids: Vec<String> = t.unreadable_backups.iter().map(u64::to_string).collect();
        println!("  warning: backups {} do not read and are left out; run `blockvault verify`", ids.join(", "));
    }
    println!(
        "{:<20} {:>7} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>7} {:>7}  {:<20} {:<20}",
        "IMAGE", "BACKUPS", "SIZE", "LOGICAL", "CHUNKS", "STORED", "UNIQUE", "SHARED", "DEDUP", "COMPR", "OLDEST", "NEWEST"
    );
    for i in &s.per_image {
        println!(
            "{:<20} {:>7} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>6.2}x {:>6.2}x  {:<20} {:<20}",
            printable(&i.image),
            i.backups,
            human(i.size),
            human(i.logical_bytes),
            i.chunks,
            human(i.stored_bytes),
            human(i.unique_stored_bytes),
            human(i.shared_stored_bytes),
            i.dedup_ratio,
            i.compression_ratio,
            printable(i.oldest.as_deref().unwrap_or("-")),
            printable(i.newest.as_deref().unwrap_or("-")),
        );
    }
    Ok(ExitCode::SUCCESS)
}
