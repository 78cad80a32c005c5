use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use tracing::error;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::progress::Bar;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Images to back up (names from the config).
    pub images: Vec<String>,
    /// Back up every configured image.
    #[arg(long, conflicts_with = "images")]
    pub all: bool,
    /// Label the new backups KEY=VALUE (repeatable; added to the image's
    /// configured `labels`). Shown and filtered by `list --label`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// A note on the new backups, shown by `list`.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
}

pub fn run(g: &GlobalArgs, a: BackupArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    if !a.all && a.images.is_empty() {
        bail!("name at least one image to back up, or use --all");
    }
    let labels: Vec<(String, String)> = a.label.iter().map(|l| crate::annotate::parse_label(l)).collect::<Result<_>>()?;
    if let Some(n) = &a.note {
        crate::annotate::check_note(n)?;
    }
    let images = select_images(&cfg, &a.images, a.all)?;
    let names: Vec<String> = images.iter().map(|i| i.name.clone()).collect();
    let mut ctx = Ctx::open(cfg)?;
    // SIGTERM/SIGINT cancel the backup in progress (cleanly) and skip the rest
    let cancel = crate::cancel::on_signals();
    let mut failures = 0;
    for (n, img) in names.iter().zip(images) {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(image = %n, "stopping: not started");
            failures += 1;
            continue;
        }
        let bar = Bar::for_plan(n, !g.no_progress);
        match crate::backup::backup_image(&mut ctx, &img, &bar, &cancel) {
            Ok(m) => {
                bar.finish();
                let ann = crate::annotate::for_backup(&img, &labels, a.note.as_deref());
                if let Err(e) = crate::annotate::record(&ctx, m.id, &ann) {
                    // the backup itself is committed and restorable
                    error!(image = %n, backup = m.id.0, "{e:#}");
                    failures += 1;
                }
                println!("{n}: {}", crate::progress::summary(&m));
            }
            Err(e) => {
                bar.finish();
                failures += 1;
                error!(image = %n, "{e:#}");
                crate::notify::backup_failed(&ctx.cfg, &img, &e);
                if names.len() == 1 {
                    return Err(e);
                }
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} backups failed", names.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// The configured images to work on: all of them, or the named ones (checked
/// before any work starts). Glob sources are expanded only when needed.
///
/// # Errors
/// When a name is not configured, or a glob cannot be expanded.
pub fn select_images(cfg: &crate::config::Config, names: &[String], all: bool) -> Result<Vec<crate::config::ImageConfig>> {
    let plain = |n: &String| cfg.images.iter().find(|i| &i.name == n && !i.source.is_glob()).cloned();
    if !all && names.iter().all(|n| plain(n).is_some()) {
        return Ok(names.iter().filter_map(plain).collect());
    }
    let expanded = crate::source::rbd::expand_images(cfg)?;
    if all {
        return Ok(expanded);
    }
    names
        .iter()
        .map(|n| match expanded.iter().find(|i| &i.name == n) {
            Some(i) => Ok(i.clone()),
            None => cfg.image(n).cloned(),
        })
        .collect()
}
