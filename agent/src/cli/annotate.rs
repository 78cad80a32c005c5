//! `blockvault label IMAGE@ID k=v... [--remove KEY]` and `blockvault note
//! IMAGE@ID TEXT`: change a committed backup's labels or note.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::lookup::{self, BackupRef};

#[derive(Args, Debug)]
pub struct LabelArgs {
    /// IMAGE@BACKUP_ID.
    pub backup: String,
    /// Labels to set, KEY=VALUE (an existing key is replaced).
    pub labels: Vec<String>,
    /// Remove the label KEY (repeatable).
    #[arg(long, value_name = "KEY")]
    pub remove: Vec<String>,
}

#[derive(Args, Debug)]
pub struct NoteArgs {
    /// IMAGE@BACKUP_ID.
    pub backup: String,
    /// The note (replaces the old one); an empty string removes it.
    pub text: String,
}

fn target(ctx: &Ctx, spec: &str) -> Result<(String, blockvault_store::BackupId)> {
    let BackupRef { image, id } = BackupRef::parse(spec)?;
    let Some(id) = id else { bail!("'{spec}': name the backup as IMAGE@ID (see `blockvault list {image}`)") };
    lookup::committed_by_id(ctx, &image, id)?;
    Ok((image, id))
}

pub fn label(g: &GlobalArgs, a: LabelArgs) -> Result<ExitCode> {
    if a.labels.is_empty() && a.remove.is_empty() {
        bail!("give labels to set (KEY=VALUE) or --remove KEY");
    }
    let set: Vec<(String, String)> = a.labels.iter().map(|l| crate::annotate::parse_label(l)).collect::<Result<_>>()?;
    let ctx = Ctx::open(load_config(g)?)?;
    let (image, id) = target(&ctx, &a.backup)?;
    let _l = ctx.store.lock_shared()?;
    let mut ann = ctx.store.annotations(id)?;
    for k in &a.remove {
        ann.labels.remove(k);
    }
    ann.labels.extend(set);
    ctx.store.set_annotations(id, &ann).with_context(|| format!("labelling backup {id} of image '{image}'"))?;
    println!("backup {id} of image '{image}': labels {}", crate::annotate::labels_cell(&ann));
    Ok(ExitCode::SUCCESS)
}

pub fn note(g: &GlobalArgs, a: NoteArgs) -> Result<ExitCode> {
    crate::annotate::check_note(&a.text)?;
    let ctx = Ctx::open(load_config(g)?)?;
    let (image, id) = target(&ctx, &a.backup)?;
    let _l = ctx.store.lock_shared()?;
    let mut ann = ctx.store.annotations(id)?;
    ann.note = Some(a.text.clone()).filter(|t| !t.is_empty());
    ctx.store.set_annotations(id, &ann).with_context(|| format!("setting the note of backup {id} of image '{image}'"))?;
    println!("backup {id} of image '{image}': note {}", if ann.note.is_some() { "set" } else { "removed" });
    Ok(ExitCode::SUCCESS)
}
