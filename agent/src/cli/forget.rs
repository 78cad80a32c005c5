use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::lookup::BackupRef;

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// IMAGE@ID; IMAGE with --all; `@ID` for a backup the store holds with
    /// an unreadable manifest that no catalog row names.
    pub backup: String,
    /// Every backup of IMAGE (a decommissioned image).
    #[arg(long)]
    pub all: bool,
    /// Remove protected backups too.
    #[arg(long)]
    pub force: bool,
}

/// Removes backups: catalog row and store files (manifest, block map,
/// markers) in one catalog transaction, as prune does. Protected backups
/// are refused without `--force`. A backup whose manifest does not read
/// can be removed by id. Chunks are freed by the next `gc`.
pub fn run(g: &GlobalArgs, a: ForgetArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let spec = BackupRef::parse(&a.backup)?;
    let plan = crate::prune::forget(&ctx, &spec, a.all, a.force)?;
    if let Some(note) = &plan.note {
        eprintln!("note: {note}");
    }
    let image = &spec.image;
    for id in &plan.targets {
        plan.remove(*id)?;
        println!("forgot backup {id}{}", if image.is_empty() { String::new() } else { format!(" of image '{image}'") });
    }
    println!("`blockvault gc` frees their chunks");
    Ok(ExitCode::SUCCESS)
}
