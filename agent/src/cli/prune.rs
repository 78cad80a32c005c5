use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::logging::printable;
use crate::prune;
use crate::retention::render_plan;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only this image (every image in the catalog by default).
    pub image: Option<String>,
    /// Show what would be kept and removed; remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// JSON output: an array with one object per image.
    #[arg(long)]
    pub json: bool,
}

/// Applies each image's retention policy (its `retention`, else that of
/// `[defaults]`) and prints, for every committed backup, keep or remove and
/// the rule that decided. Removed backups' chunks are freed by `gc`.
pub fn run(g: &GlobalArgs, a: PruneArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    // the store is the truth: a backup only the store holds is pruned too
    crate::rebuild::reconcile(&ctx.store, &ctx.catalog)?;
    let images: Vec<String> = match &a.image {
        Some(name) => {
            if ctx.catalog.image(name)?.is_none() && ctx.cfg.image(name).is_err() {
                bail!("image '{name}' is neither configured nor in the catalog");
            }
            vec![name.clone()]
        }
        None => ctx.catalog.images()?.into_iter().map(|i| i.name).collect(),
    };
    let mut json = Vec::new();
    let mut first_err = None;
    for name in &images {
        let policy = prune::policy_for(&ctx.cfg, name);
        let plan = prune::plan_image(&ctx, name, &policy)?;
        let removed = if a.dry_run {
            Ok(0)
        } else {
            prune::apply(&ctx, &plan)
        };
        if a.json {
            json.push(plan.to_json(a.dry_run));
        } else {
            println!("image '{}': {policy}", printable(name));
            if plan.items.is_empty() {
                println!("no committed backups");
            } else {
                print!("{}", render_plan(&plan.items));
            }
            match &removed {
                _ if a.dry_run => println!("dry run: nothing removed"),
                Ok(0) => {}
                Ok(n) => println!("removed {n} backups (`blockvault gc` frees their chunks)"),
                Err(e) => println!("removal failed: {}", printable(&format!("{e:#}"))),
            }
            println!();
        }
        if let Err(e) = removed {
            first_err.get_or_insert(e);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if !a.dry_run {
        crate::metrics::write_logged(&ctx);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}
