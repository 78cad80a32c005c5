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
    /// Only this image or group (every image in the catalog and every
    /// configured group by default; a group's sets are kept or removed whole).
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
    let groups: Vec<crate::config::GroupConfig> = match &a.image {
        Some(name) => ctx.cfg.group(name).cloned().into_iter().collect(),
        None => ctx.cfg.groups.clone(),
    };
    let images: Vec<String> = match &a.image {
        Some(name) if !groups.is_empty() => {
            let _ = name;
            Vec::new()
        }
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
    for grp in &groups {
        let policy = grp.retention(&ctx.cfg.defaults).unwrap_or_default();
        let removed = crate::group::prune_group(&ctx, grp, a.dry_run);
        if a.json {
            json.push(serde_json::json!({
                "group": grp.name, "policy": policy.to_string(), "dry_run": a.dry_run,
                "removed": removed.as_ref().ok(), "error": removed.as_ref().err().map(|e| format!("{e:#}")),
            }));
        } else {
            match &removed {
                Ok(n) if a.dry_run => println!("group '{}': {policy}: dry run: would remove {n} backups (whole sets)", printable(&grp.name)),
                Ok(n) => println!("group '{}': {policy}: removed {n} backups (whole sets)", printable(&grp.name)),
                Err(e) => println!("group '{}': removal failed: {}", printable(&grp.name), printable(&format!("{e:#}"))),
            }
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
