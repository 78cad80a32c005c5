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
    /// With --to qcow2:PATH: one qcow2 layer per backup of the chain, PATH
    /// the top, the lower ones beside it as STEM.<ID>.qcow2.
    #[arg(long)]
    pub chain: bool,
    /// With --chain: start the chain at this backup (default: its first).
    #[arg(long, value_name = "ID", requires = "chain")]
    pub since: Option<u64>,
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
    if let TargetSpec::Qcow2(path) = &to {
        return restore_qcow2(&ctx, g, &a, &manifest, path, threads);
    }
    if a.chain {
        bail!("--chain applies to a qcow2 target (--to qcow2:PATH), not to {to}");
    }
    let bar = Bar::new(manifest.image_size, &image, !g.no_progress);
    let res = crate::restore::restore_to(&ctx, &manifest, &to, a.force, a.mode, threads, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{image}' ({} bytes) to {}", row.id, manifest.image_size, a.to);
    Ok(ExitCode::SUCCESS)
}

fn restore_qcow2(
    ctx: &Ctx,
    g: &GlobalArgs,
    a: &RestoreArgs,
    manifest: &blockvault_store::Manifest,
    path: &std::path::Path,
    threads: usize,
) -> Result<ExitCode> {
    use crate::restore::qcow2;
    let opts = qcow2::Qcow2Options { chain: a.chain, since: a.since.map(BackupId) };
    let chain = qcow2::plan(ctx, manifest, &opts)?;
    let bar = Bar::new(chain.iter().map(|m| m.image_size).sum(), &manifest.image, !g.no_progress);
    let res = qcow2::write_chain(&ctx.store, &chain, path, a.force, a.mode, threads, &bar);
    bar.finish();
    let layers = res?;
    for ((p, s), m) in layers.iter().zip(&chain) {
        println!(
            "backup {} -> {} ({} data clusters, {} zero clusters of {} bytes; {} blocks unchanged from the layer below)",
            m.id,
            p.display(),
            s.data,
            s.zero,
            s.cluster_size,
            s.blocks_skipped
        );
    }
    println!(
        "restored backup {} of image '{}' ({} bytes) to {} as qcow2 ({} layer{})",
        manifest.id,
        manifest.image,
        manifest.image_size,
        path.display(),
        layers.len(),
        if layers.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}
