use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::{bail, Result};
use clap::Args;
use tracing::{error, warn};

use super::{load_config, GlobalArgs};
use crate::config::ImageConfig;
use crate::context::Ctx;
use crate::progress::Bar;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Images or groups to back up (names from the config; for a glob
    /// entry, its name template or one expanded name; a `[[group]]` name
    /// backs up its images as one set).
    pub images: Vec<String>,
    /// Every configured image and group (an image in a group is backed up
    /// with its group only).
    #[arg(long, conflicts_with = "images")]
    pub all: bool,
}

/// One pass, as a systemd timer starts it: back up each image, prune it if
/// `prune-after-backup` is set, write the metrics file. Every image is tried
/// even when an earlier one fails; the exit status says whether all worked.
/// SIGTERM or SIGINT cancels the backup in progress (it is recorded as
/// failed, nothing of it is committed) and skips the images not started.
pub fn run(g: &GlobalArgs, a: RunArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let requested: Vec<String> = if a.all {
        cfg.images
            .iter()
            .filter(|i| cfg.group_of(&i.name).is_none())
            .map(|i| i.name.clone())
            .chain(cfg.groups.iter().map(|g| g.name.clone()))
            .collect()
    } else {
        a.images.clone()
    };
    if requested.is_empty() {
        if a.all {
            bail!("config {} has no [[image]]", cfg.path.display());
        }
        bail!("name at least one image, or use --all");
    }
    // a typo is a config error: refuse before any work
    for n in &requested {
        if cfg.entry_for(n).is_none() && cfg.group(n).is_none() {
            cfg.image(n)?;
        }
    }
    let mut ctx = Ctx::open(cfg)?;
    let cancel = crate::cancel::on_signals();
    let mut failed: Vec<String> = Vec::new();
    let mut total = 0;
    let mut groups = 0;
    for n in &requested {
        if let Some(grp) = ctx.cfg.group(n).cloned() {
            total += 1;
            groups += 1;
            if cancel.load(Ordering::Relaxed) {
                warn!(group = %grp.name, "stopping: not started");
                failed.push(grp.name.clone());
                continue;
            }
            let bar = Bar::for_plan(&grp.name, !g.no_progress);
            let out = crate::job::run_group(&mut ctx, &grp, &bar, &cancel);
            bar.finish();
            if let Some(set) = out.set {
                for (img, res) in &out.backups {
                    match res {
                        Ok(m) => println!("{}@{set}: {img}: {}", grp.name, crate::progress::summary(m)),
                        Err(e) => println!("{}@{set}: {img}: failed: {e:#}", grp.name),
                    }
                }
            }
            if !out.ok() {
                failed.push(grp.name.clone());
            }
            continue;
        }
        let images = match targets(&ctx, n) {
            Ok(v) => v,
            Err(e) => {
                error!(image = %n, error = %format!("{e:#}"), "cannot list the images to back up");
                failed.push(n.clone());
                total += 1;
                // no job ran for it: the metrics say what the expansion recorded
                crate::metrics::write_logged(&ctx);
                continue;
            }
        };
        for img in images {
            total += 1;
            if cancel.load(Ordering::Relaxed) {
                warn!(image = %img.name, "stopping: not started");
                failed.push(img.name.clone());
                continue;
            }
            let bar = Bar::for_plan(&img.name, !g.no_progress);
            let out = crate::job::run_image(&mut ctx, &img, &bar, &cancel);
            bar.finish();
            if let Ok(m) = &out.backup {
                let pruned = match &out.pruned {
                    Some(Ok(k)) => format!(", {k} pruned"),
                    Some(Err(_)) => ", prune failed".into(),
                    None => String::new(),
                };
                println!("{}: {}{pruned}", img.name, crate::progress::summary(m));
            }
            if !out.ok() {
                failed.push(img.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        let what = if groups == 0 { "images" } else { "images or groups" };
        bail!("{} of {total} {what} failed: {}", failed.len(), failed.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// What one requested name stands for: a configured image, every image a
/// glob entry matches, or one expanded name of a glob entry.
fn targets(ctx: &Ctx, name: &str) -> Result<Vec<ImageConfig>> {
    if let Ok(entry) = ctx.cfg.image(name) {
        return crate::job::expand_for_run(ctx, entry);
    }
    let entry = ctx.cfg.entry_for(name).expect("checked before");
    let found: Vec<ImageConfig> =
        crate::job::expand_entry(&ctx.cfg, entry)?.into_iter().filter(|i| i.name == name).collect();
    if found.is_empty() {
        bail!("image '{name}': no RBD image matching '{}' has that name now", entry.source);
    }
    Ok(found)
}
