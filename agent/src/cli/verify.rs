use std::process::ExitCode;

use anyhow::{bail, Result};
use blockvault_catalog::{BackupRow, BackupState};
use blockvault_store::BackupId;
use clap::Args;

use super::{load_config, parse_backup_ref, GlobalArgs};
use crate::context::Ctx;
use crate::rebuild::Unreadable;
use crate::logging::printable;
use crate::verify::{self, VerifyOptions};

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
    /// JSON output: one object with the findings.
    #[arg(long)]
    pub json: bool,
}

fn select(ctx: &Ctx, spec: Option<&str>) -> Result<Vec<BackupRow>> {
    let Some(spec) = spec else { return Ok(ctx.catalog.committed_backups(None)?) };
    let (image, id) = parse_backup_ref(spec)?;
    if ctx.catalog.image(&image)?.is_none() && ctx.cfg.image(&image).is_err() {
        bail!("image '{image}' is neither configured nor in the catalog");
    }
    match id {
        None => Ok(ctx.catalog.committed_backups(Some(&image))?),
        Some(id) => match ctx.catalog.backup(BackupId(id))? {
            Some(r) if r.image == image && r.state == BackupState::Committed => Ok(vec![r]),
            Some(r) if r.image == image => bail!("backup {id} of image '{image}' is {:?}, not committed", r.state),
            _ => bail!("backup {id} does not exist for image '{image}' (see `blockvault list {image}`)"),
        },
    }
}

/// Checks backups (see `crate::verify`), marks each `ok` or `invalid` in the
/// catalog, and exits non-zero when anything is wrong.
pub fn run(g: &GlobalArgs, a: VerifyArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let rec = crate::rebuild::reconcile(&ctx.store, &ctx.catalog).unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "could not reconcile the catalog with the store; verifying the catalog's backups");
        Default::default()
    });
    let rows = select(&ctx, a.backup.as_deref())?;
    let opts = VerifyOptions {
        deep: a.deep,
        source: a.source,
        threads: ctx.cfg.workers().clamp(1, MAX_VERIFY_THREADS),
        progress: !g.no_progress && !a.json,
    };
    let mut report = verify::verify(&ctx, &rows, &opts)?;
    if a.backup.is_none() {
        // backups the store holds but that do not read, so no catalog row
        // names them: findings too (`forget @ID` removes one)
        for (id, why) in rec.unreadable {
            report.findings.push(match why {
                Unreadable::Manifest(error) => verify::Finding::ManifestUnreadable { backup: id.0, error },
                Unreadable::BlockMap(error) => verify::Finding::BlockMapUnreadable { backup: id.0, error },
            });
            report.invalid.push(id.0);
        }
    }
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
        println!(
            "verified {} backups, {} chunks{}: {} problems",
            report.backups.len(),
            report.chunks,
            if a.deep { " (deep)" } else { "" },
            report.findings.len()
        );
    }
    if report.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    let mut invalid: std::collections::BTreeSet<u64> = report.invalid.iter().copied().collect();
    invalid.extend(report.backups.iter().filter(|b| b.state == "invalid").map(|b| b.id));
    eprintln!(
        "error: verify found {} problems; {} backups are marked invalid and will not be used as the base of an incremental",
        report.findings.len(),
        invalid.len()
    );
    Ok(ExitCode::FAILURE)
}
