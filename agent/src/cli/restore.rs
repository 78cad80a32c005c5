use std::process::ExitCode;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::lookup::BackupRef;
use crate::progress::Bar;
use crate::restore::{parse_sparse_size, OpenBackup, RestoreOptions, TargetSpec, DEFAULT_SPARSE_SIZE};

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// IMAGE or IMAGE@BACKUP_ID (the latest backup by default); or
    /// GROUP or GROUP@SET: every image of a set (the newest complete set by default).
    pub backup: String,
    /// Target: a file path, a block device (needs --force), rbd:POOL/IMAGE,
    /// or qcow2:PATH. For a set: rbd:POOL/{image} (`{image}` becomes each
    /// image's name) or a directory DIR/ (one file per image).
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
    /// To rbd:POOL/NEW: a clone of the backup's RBD snapshot, ready at once
    /// (fails when the snapshot is gone; --clone=auto then writes the data
    /// from the store).
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "yes")]
    pub clone: Option<CloneMode>,
    /// With --clone: copy the parent's data into the clone and detach it.
    #[arg(long, requires = "clone")]
    pub flatten: bool,
    /// Holes inside a block: aligned pieces of this size that are all
    /// zeros are not written (as `rbd import --sparse-size`). A power of two
    /// from 4K to 64M; larger means fewer, larger writes (to RBD, fewer OSD
    /// ops) and a less sparse target.
    #[arg(long, value_name = "BYTES", value_parser = parse_sparse_size, default_value_t = DEFAULT_SPARSE_SIZE)]
    pub sparse_size: usize,
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
    if ctx.catalog.image(&spec.image)?.is_none() && crate::group::is_group(&ctx, &spec.image)? {
        return restore_set(&ctx, g, &a, &spec);
    }
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
    let opts = RestoreOptions { force: a.force, mode: a.mode, threads: ctx.cfg.workers() * 2, cancel: &never, sparse_size: a.sparse_size };
    if let TargetSpec::Qcow2(path) = &to {
        return restore_qcow2(&ctx, g, &a, &backup.manifest, path, &opts);
    }
    if a.chain {
        anyhow::bail!("--chain applies to a qcow2 target (--to qcow2:PATH), not to {to}");
    }
    let bar = Bar::new(backup.size(), &spec.image, !g.no_progress);
    let res = backup.restore_to(&ctx, &to, &opts, &bar);
    bar.finish();
    res?;
    println!("restored backup {} of image '{}' ({} bytes) to {}", backup.row.id, spec.image, backup.size(), a.to);
    Ok(ExitCode::SUCCESS)
}

/// `restore GROUP[@SET] --to rbd:POOL/{image}|DIR/`: every backup of a
/// complete set, each to its own target, in the group's order.
fn restore_set(ctx: &Ctx, g: &GlobalArgs, a: &RestoreArgs, spec: &BackupRef) -> Result<ExitCode> {
    if a.clone.is_some() || a.chain {
        anyhow::bail!("--clone and --chain restore one image, not a set of group '{}'", spec.image);
    }
    let set = crate::group::find_set(ctx, &spec.image, spec.id)?;
    let target_of = |image: &str| -> Result<String> {
        if a.to.contains("{image}") {
            Ok(a.to.replace("{image}", image))
        } else if a.to.ends_with('/') && !a.to.starts_with("rbd:") && !a.to.starts_with("qcow2:") {
            Ok(format!("{}{image}", a.to))
        } else {
            anyhow::bail!("a set restores several images: name the targets with {{image}} (rbd:POOL/{{image}}) or a directory ending in '/', not {}", a.to)
        }
    };
    let targets: Vec<(String, TargetSpec)> = set
        .members
        .iter()
        .map(|m| {
            let t = target_of(&m.image)?;
            Ok((t.clone(), TargetSpec::parse(&t)?))
        })
        .collect::<Result<_>>()?;
    if let Some(dir) = a.to.strip_suffix('/').filter(|_| !a.to.contains("{image}")) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating directory {dir}: {e}"))?;
    }
    let never = AtomicBool::new(false);
    let opts = RestoreOptions { force: a.force, mode: a.mode, threads: ctx.cfg.workers() * 2, cancel: &never, sparse_size: a.sparse_size };
    for (m, (t, to)) in set.members.iter().zip(&targets) {
        let backup = OpenBackup::open(ctx, &BackupRef { image: m.image.clone(), id: Some(m.id) })?;
        let bar = Bar::new(backup.size(), &m.image, !g.no_progress);
        let res = backup.restore_to(ctx, to, &opts, &bar);
        bar.finish();
        res.map_err(|e| e.context(format!("restoring image '{}' of set {} of group '{}'", m.image, set.id, set.group)))?;
        println!("restored backup {} of image '{}' ({} bytes) to {t}", m.id, m.image, backup.size());
    }
    println!("restored set {} of group '{}' ({} images)", set.id, set.group, set.members.len());
    Ok(ExitCode::SUCCESS)
}

fn restore_qcow2(
    ctx: &Ctx,
    g: &GlobalArgs,
    a: &RestoreArgs,
    manifest: &blockvault_store::Manifest,
    path: &std::path::Path,
    ropts: &RestoreOptions,
) -> Result<ExitCode> {
    use crate::restore::qcow2;
    let opts = qcow2::Qcow2Options { chain: a.chain, since: a.since.map(blockvault_store::BackupId) };
    let chain = qcow2::plan(ctx, manifest, &opts)?;
    let bar = Bar::new(chain.iter().map(|m| m.image_size).sum(), &manifest.image, !g.no_progress);
    let res = qcow2::write_chain(&ctx.store, &chain, path, ropts, &bar);
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
