use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// The image (as the config or the catalog names it) whose blockvault
    /// snapshots are dropped from the cluster.
    pub image: String,
}

/// Drops blockvault's snapshot(s) of an image from the cluster, so that
/// they stop costing copy-on-write space and no longer block `rbd rm` or
/// `rbd trash purge`. The backups stay restorable; the next backup of the
/// image reads all of it.
pub fn run(g: &GlobalArgs, a: ReleaseArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let cluster = crate::source::rbd::connect(&ctx.cfg)?;
    let r = crate::release::release_image(&ctx, &cluster, &a.image)?;
    if r.removed.is_empty() {
        println!("{}: blockvault holds no snapshot of it on the cluster; nothing to release", a.image);
    } else {
        println!(
            "{}: removed snapshot{} {}{}; its backups stay restorable, and its next backup is a full read",
            a.image,
            if r.removed.len() == 1 { "" } else { "s" },
            r.removed.join(", "),
            if r.trashed { " (the image is in the RBD trash: it can be purged now)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
