use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::lookup::{self, BackupRef};

#[derive(Args, Debug)]
pub struct ProtectArgs {
    /// IMAGE@BACKUP_ID.
    pub backup: String,
}

/// Sets or clears the protection of a backup, in the store (a marker file,
/// so a rebuilt catalog keeps it) and in the catalog. The order makes an
/// interruption err on the protected side: protect writes the store marker
/// first, unprotect clears the catalog flag first.
pub fn run(g: &GlobalArgs, a: ProtectArgs, protect: bool) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let BackupRef { image, id } = BackupRef::parse(&a.backup)?;
    let Some(id) = id else { bail!("'{}': name the backup as IMAGE@ID (see `blockvault list {image}`)", a.backup) };
    lookup::committed_by_id(&ctx, &image, id)?;
    let what = if protect { "protecting" } else { "unprotecting" };
    let res = if protect {
        ctx.store.set_protected(id, true).map_err(anyhow::Error::from).and_then(|()| Ok(ctx.catalog.set_protected(id, true)?))
    } else {
        ctx.catalog.set_protected(id, false).map_err(anyhow::Error::from).and_then(|()| Ok(ctx.store.set_protected(id, false)?))
    };
    res.with_context(|| format!("{what} backup {id} of image '{image}'"))?;
    println!("backup {id} of image '{image}' is {}", if protect { "protected" } else { "no longer protected" });
    Ok(ExitCode::SUCCESS)
}
