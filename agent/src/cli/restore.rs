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
    if let Some(mode) = a.clone {
        let TargetSpec::Rbd { pool, namespace, image: name } = &to else {
            bail!("--clone needs an rbd:POOL/IMAGE target, not {}", a.to);
        };
        match crate::restore::rbd::restore_clone(&ctx, &manifest, (pool, namespace.as_deref(), name), a.flatten)? {
            crate::restore::rbd::CloneOutcome::Cloned { parent } => {
                let how = if a.flatten { "cloned and flattened" } else { "cloned" };
                println!("restored backup {} of image '{image}' to {} ({how} from {parent})", row.id, a.to);
                return Ok(ExitCode::SUCCESS);
            }
            crate::restore::rbd::CloneOutcome::NoSnapshot(why) if mode == CloneMode::Auto => {
                tracing::warn!("cannot clone: {why}; --clone=auto: writing the data from the store instead");
            }
            crate::restore::rbd::CloneOutcome::NoSnapshot(why) => {
                bail!("cannot restore by clone: {why}; restore without --clone (or with --clone=auto) to write the data from the store");
            }
        }
    }
    let threads = ctx.cfg.workers() * 2;
    let bar = Bar::new(manifest.image_size, &image, !g.no_progress);
    let res = crate::restore::restore_to(&ctx, &manifest, &to, a.force, a.mode, threads, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{image}' ({} bytes) to {}", row.id, manifest.image_size, a.to);
    Ok(ExitCode::SUCCESS)
}
