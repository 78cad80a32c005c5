use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

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
}

pub fn run(g: &GlobalArgs, a: BackupArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let names: Vec<String> = if a.all {
        cfg.images.iter().map(|i| i.name.clone()).collect()
    } else {
        a.images.clone()
    };
    if names.is_empty() {
        bail!("name at least one image to back up, or use --all");
    }
    // check every name before starting any work
    for n in &names {
        cfg.image(n)?;
    }
    let mut ctx = Ctx::open(cfg)?;
    let cancel = AtomicBool::new(false);
    let mut failures = 0;
    for n in &names {
        let img = ctx.cfg.image(n)?.clone();
        let bar = Bar::new(0, n, !g.no_progress);
        match crate::backup::backup_image(&mut ctx, &img, &bar, &cancel) {
            Ok(m) => {
                bar.finish();
                println!(
                    "{}: backup {} committed: {} read, {} new chunks ({} stored), {} ms",
                    n, m.id, m.stats.read_bytes, m.stats.new_chunks, m.stats.new_bytes, m.stats.duration_ms
                );
            }
            Err(e) => {
                bar.finish();
                failures += 1;
                error!(image = %n, "{e:#}");
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
