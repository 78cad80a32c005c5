use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{find_backup, load_config, GlobalArgs};
use crate::context::Ctx;
use crate::progress::Bar;
use crate::restore::TargetSpec;

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
    let to = TargetSpec::parse(&a.to)?;
    // shared store lock: a concurrent prune + GC cannot sweep the chunks of
    // the backup being restored until it is done
    let _lock = ctx.store.lock_shared_for_reading()?;
    let (row, manifest) = find_backup(&ctx, &a.backup)?;
    let image = row.image.clone();
    let threads = ctx.cfg.workers() * 2;
    let bar = Bar::new(manifest.image_size, &image, !g.no_progress);
    let res = crate::restore::restore_to(&ctx, &manifest, &to, a.force, a.mode, threads, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{image}' ({} bytes) to {}", row.id, manifest.image_size, a.to);
    Ok(ExitCode::SUCCESS)
}
