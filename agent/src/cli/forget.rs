use std::process::ExitCode;

use anyhow::{bail, Result};
use blockvault_catalog::BackupState;
use blockvault_store::BackupId;
use clap::Args;

use super::{load_config, parse_backup_ref, GlobalArgs};
use crate::context::Ctx;

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
    let _lock = ctx.store.lock_shared()?;
    let rec = crate::rebuild::reconcile(&ctx.store, &ctx.catalog)?;
    let (image, id) = parse_backup_ref(&a.backup)?;
    let mut targets: Vec<BackupId> = Vec::new();
    let mut _image_lock = None;
    if a.all {
        if id.is_some() || image.is_empty() {
            bail!("'{}': --all takes an IMAGE, not IMAGE@ID", a.backup);
        }
        if ctx.catalog.image(&image)?.is_none() {
            bail!("image '{image}' is not in the catalog (see `blockvault list`)");
        }
        _image_lock = ctx.store.try_lock_named(&crate::backup::image_lock_name(&image))?;
        if _image_lock.is_none() {
            bail!("a backup of image '{image}' is running; forget it once that ends");
        }
        targets.extend(ctx.catalog.committed_backups(Some(&image))?.iter().map(|r| r.id));
        if targets.is_empty() {
            bail!("image '{image}' has no committed backup");
        }
    } else {
        let Some(n) = id else { bail!("'{}': name the backup as IMAGE@ID, or use --all", a.backup) };
        let id = BackupId(n);
        match ctx.catalog.backup(id)? {
            Some(r) if r.image != image => {
                bail!("backup {id} belongs to image '{}', not '{image}' (see `blockvault list`)", r.image)
            }
            Some(r) if r.state == BackupState::Running => bail!("backup {id} of image '{image}' is running"),
            Some(_) => {}
            None if rec.unreadable.iter().any(|(u, _)| *u == id) => {
                // no catalog row and no readable manifest: the image is unknown
                if !image.is_empty() {
                    eprintln!("note: backup {id}'s manifest is unreadable, so its image cannot be checked against '{image}'");
                }
            }
            None => bail!("backup {id} does not exist for image '{image}' (see `blockvault list {image}`)"),
        }
        targets.push(id);
    }
    let protected: Vec<String> = targets
        .iter()
        .filter(|id| ctx.store.is_protected(**id) || matches!(ctx.catalog.backup(**id), Ok(Some(r)) if r.protected))
        .map(|id| id.to_string())
        .collect();
    if !protected.is_empty() && !a.force {
        bail!(
            "backup{} {} {} protected: `blockvault unprotect IMAGE@ID` first, or forget --force",
            if protected.len() == 1 { "" } else { "s" },
            protected.join(", "),
            if protected.len() == 1 { "is" } else { "are" }
        );
    }
    for id in &targets {
        crate::prune::remove_backup(&ctx, *id).map_err(|e| e.context(format!("forgetting backup {id}")))?;
        println!("forgot backup {id}{}", if image.is_empty() { String::new() } else { format!(" of image '{image}'") });
    }
    println!("`blockvault gc` frees their chunks");
    Ok(ExitCode::SUCCESS)
}
