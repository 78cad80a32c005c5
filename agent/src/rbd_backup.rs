//! RBD sources: snapshot, diff, read changed blocks, demote old snapshots.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Result};
use blockvault_store::Manifest;

use crate::config::ImageConfig;
use crate::context::Ctx;
use crate::pipeline::Progress;

pub fn backup(_ctx: &mut Ctx, img: &ImageConfig, _progress: &dyn Progress, _cancel: &AtomicBool) -> Result<Manifest> {
    bail!("image '{}': RBD sources are not implemented in this build yet", img.name)
}

pub fn restore(_ctx: &Ctx, _m: &Manifest, to: &str, _force: bool, _threads: usize, _p: &dyn Progress) -> Result<()> {
    bail!("restore to {to}: RBD targets are not implemented in this build yet")
}
