use std::process::ExitCode;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::logging::printable;
use crate::lookup::BackupRef;
use crate::verify::{self, CheckedState, VerifyOptions};

/// Threads that read and decode chunks: enough to overlap reads with
/// decompression and hashing without taking every core from running backups.
const MAX_VERIFY_THREADS: usize = 4;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// IMAGE or IMAGE@BACKUP_ID (every committed backup by default).
    pub backup: Option<String>,
    /// Read and decode every chunk (each once), not only check that it exists.
    #[arg(long)]
    pub deep: bool,
    /// Compare RBD backups with their snapshots, where those still exist.
    #[arg(long)]
    pub source: bool,
    /// Without --deep: read and decode this percentage of the chunks in
    /// full, picked at random (e.g. 5: the whole store over about 20 runs).
    #[arg(long, value_name = "PERCENT", conflicts_with = "deep", value_parser = parse_percent)]
    pub deep_percent: Option<f64>,
    /// JSON output: one object with the findings.
    #[arg(long)]
    pub json: bool,
}

/// Checks backups (see `crate::verify`), marks each `ok` or `invalid` in the
/// catalog, and exits non-zero when anything is wrong.
pub fn run(g: &GlobalArgs, a: VerifyArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let spec = a.backup.as_deref().map(BackupRef::parse).transpose()?;
    let never = AtomicBool::new(false);
    let opts = VerifyOptions {
        deep: a.deep,
        deep_percent: a.deep_percent.unwrap_or(0.0),
        source: a.source,
        threads: ctx.cfg.workers().clamp(1, MAX_VERIFY_THREADS),
        progress: !g.no_progress && !a.json,
        cancel: &never,
    };
    let report = verify::run(&ctx, spec.as_ref(), &opts)?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["ok"] = report.is_clean().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for f in &report.findings {
            // findings quote names and errors read from the store
            println!("{}", printable(&f.to_string()));
        }
        for s in &report.skipped {
            println!("skipped: {}", printable(s));
        }
        for b in &report.backups {
            println!("backup {} of image '{}': {}", b.id, printable(&b.image), b.state);
        }
        let others: Vec<String> = report
            .invalid
            .iter()
            .filter(|id| !report.backups.iter().any(|b| b.id == **id))
            .map(u64::to_string)
            .collect();
        if !others.is_empty() {
            println!("also marked invalid (they reference a bad chunk): backups {}", others.join(", "));
        }
        let sampled = if report.deep_sampled > 0 { format!(" ({} read in full)", report.deep_sampled) } else { String::new() };
        println!(
            "verified {} backups, {} chunks{}{sampled}: {} problems found",
            report.backups.len(),
            report.chunks,
            if a.deep { " (deep)" } else { "" },
            report.findings.len()
        );
    }
    if report.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    if report.findings.is_empty() {
        // nothing wrong now, but marks from an earlier verify that this run
        // could not clear: say which run clears them
        let mut by_need: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (id, need) in &report.stale_invalid {
            by_need.entry(verify::recheck_flags(*need)).or_default().push(id.to_string());
        }
        let runs: Vec<String> = by_need
            .iter()
            .map(|(flags, ids)| format!("`blockvault verify {flags}` for backup{} {}", if ids.len() == 1 { "" } else { "s" }, ids.join(", ")))
            .collect();
        eprintln!(
            "error: no problem found now, but {} backups stay marked invalid by an earlier verify that found a fault \
             this run does not check; they are not used as the base of an incremental until {} finds them sound",
            report.stale_invalid.len(),
            runs.join(" and ")
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut invalid: std::collections::BTreeSet<u64> = report.invalid.iter().copied().collect();
    invalid.extend(report.backups.iter().filter(|b| b.state == CheckedState::Invalid).map(|b| b.id));
    eprintln!(
        "error: verify found {} problems; {} backups are marked invalid and will not be used as the base of an incremental",
        report.findings.len(),
        invalid.len()
    );
    Ok(ExitCode::FAILURE)
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim_end_matches('%').parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{v} is not between 0 and 100"));
    }
    Ok(v)
}
