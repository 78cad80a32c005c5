use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blockvault_catalog::BackupState;
use blockvault_store::BackupId;
use clap::Args;

use super::{load_config, parse_backup_ref, GlobalArgs};
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
    let (image, id) = parse_backup_ref(&a.backup)?;
    let to = TargetSpec::parse(&a.to)?;
    let row = match id {
        Some(id) => {
            let row = ctx.catalog.backup(BackupId(id))?;
            match row {
                Some(r) if r.image == image && r.state == BackupState::Committed => r,
                Some(r) if r.image == image => bail!("backup {id} of image '{image}' is {:?}, not committed: nothing to restore", r.state),
                _ => bail!("backup {id} does not exist for image '{image}' (see `blockvault list {image}`)"),
            }
        }
        None => match ctx.catalog.committed_backups(Some(&image))?.pop() {
            Some(r) => r,
            None => bail!("image '{image}' has no committed backup"),
        },
    };
    // shared store lock: a concurrent prune + GC cannot sweep the chunks of
    // the backup being restored until it is done
    let _lock = ctx.store.lock_shared_for_reading()?;
    let manifest = match ctx.store.read_manifest(row.id) {
        Ok(m) => m,
        // a corrupt manifest: the block map has its own header and checksum,
        // and the catalog row the geometry to check it against
        Err(e) if e.is_corruption() || matches!(e, blockvault_store::Error::UnsupportedVersion { .. }) => {
            let source = ctx.catalog.image(&row.image)?.map(|i| i.source).unwrap_or_default();
            let m = ctx
                .store
                .manifest_from_blockmap(row.id, &row.image, &source, row.image_size, row.block_size)
                .with_context(|| format!("backup {}: {e}; its block map cannot stand in for it either", row.id))?;
            tracing::warn!(backup = row.id.0, error = %e, "manifest unreadable: restoring from the block map, checked against the catalog's image and block size");
            m
        }
        Err(e) => return Err(e.into()),
    };
    crate::restore::check_manifest(&manifest, &row.image, row.id)?;
    let threads = ctx.cfg.workers() * 2;
    let bar = Bar::new(manifest.image_size, &image, !g.no_progress);
    let res = crate::restore::restore_to(&ctx, &manifest, &to, a.force, a.mode, threads, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{image}' ({} bytes) to {}", row.id, manifest.image_size, a.to);
    Ok(ExitCode::SUCCESS)
}
