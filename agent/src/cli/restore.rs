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
    /// To rbd:POOL/NEW: a clone of the backup's RBD snapshot, ready at once
    /// (fails when the snapshot is gone; --clone=auto then writes the data
    /// from the store).
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "yes")]
    pub clone: Option<CloneMode>,
    /// With --clone: copy the parent's data into the clone and detach it.
    #[arg(long, requires = "clone")]
    pub flatten: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CloneMode {
    /// Clone, or fail when the snapshot is gone.
    Yes,
    /// Clone, or restore from the store when the snapshot is gone.
    Auto,
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
    if let Some(mode) = a.clone {
        let TargetSpec::Rbd { pool, namespace, image: name } = &to else {
            anyhow::bail!("--clone needs an rbd:POOL/IMAGE target, not {}", a.to);
        };
        match crate::restore::rbd::restore_clone(&ctx, &backup.manifest, (pool, namespace.as_deref(), name), a.flatten)? {
            crate::restore::rbd::CloneOutcome::Cloned { parent } => {
                let how = if a.flatten { "cloned and flattened" } else { "cloned" };
                println!("restored backup {} of image '{}' to {} ({how} from {parent})", backup.row.id, spec.image, a.to);
                return Ok(ExitCode::SUCCESS);
            }
            crate::restore::rbd::CloneOutcome::NoSnapshot(why) if mode == CloneMode::Auto => {
                tracing::warn!("cannot clone: {why}; --clone=auto: writing the data from the store instead");
            }
            crate::restore::rbd::CloneOutcome::NoSnapshot(why) => {
                anyhow::bail!("cannot restore by clone: {why}; restore without --clone (or with --clone=auto) to write the data from the store");
            }
        }
    }
    let never = AtomicBool::new(false);
    let opts = RestoreOptions { force: a.force, mode: a.mode, threads: ctx.cfg.workers() * 2, cancel: &never };
    let bar = Bar::new(backup.size(), &spec.image, !g.no_progress);
    let res = backup.restore_to(&ctx, &to, &opts, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{}' ({} bytes) to {}", backup.row.id, spec.image, backup.size(), a.to);
    Ok(ExitCode::SUCCESS)
}
