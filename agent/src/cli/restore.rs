use std::process::ExitCode;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::lookup::BackupRef;
use crate::progress::Bar;
use crate::restore::{OpenBackup, RestoreOptions, TargetSpec};

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// IMAGE or IMAGE@BACKUP_ID (the latest backup by default).
    pub backup: String,
    /// Target: a file path, or a block device (needs --force).
    #[arg(long)]
    pub to: String,
    /// Overwrite an existing, non-empty target.
    #[arg(long)]
    pub force: bool,
    /// Mode of the restored file, in octal (default: 600 for a new file;
    /// a file replaced with --force keeps its mode and owner).
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("'{s}' is not an octal file mode (e.g. 600 or 0640)")),
    }
}

pub fn run(g: &GlobalArgs, a: RestoreArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let spec = BackupRef::parse(&a.backup)?;
    let to = TargetSpec::parse(&a.to)?;
    let backup = OpenBackup::open(&ctx, &spec)?;
    let never = AtomicBool::new(false);
    let opts = RestoreOptions { force: a.force, mode: a.mode, threads: ctx.cfg.workers() * 2, cancel: &never };
    let bar = Bar::new(backup.size(), &spec.image, !g.no_progress);
    let res = backup.restore_to(&ctx, &to, &opts, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{}' ({} bytes) to {}", backup.row.id, spec.image, backup.size(), a.to);
    Ok(ExitCode::SUCCESS)
}
