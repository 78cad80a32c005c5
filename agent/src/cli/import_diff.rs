use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::Args;

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::progress::Bar;
use crate::source::diff::{DiffSource, Input};

#[derive(Args, Debug)]
pub struct ImportDiffArgs {
    /// The configured image the new backup is of.
    pub image: String,
    /// The stream (`rbd diff v1` or `v2`), or `-` for standard input.
    pub file: PathBuf,
    /// Apply the stream even when its from-snapshot is not the latest backup's snapshot.
    #[arg(long)]
    pub force: bool,
}

pub fn run(g: &GlobalArgs, a: ImportDiffArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let img = super::backup::select_images(&cfg, std::slice::from_ref(&a.image), false)?
        .pop()
        .with_context(|| format!("image '{}' is not in the config", a.image))?;
    let input = if a.file.as_os_str() == "-" {
        Input::Pipe(Box::new(std::io::stdin()))
    } else {
        let md = std::fs::metadata(&a.file).with_context(|| format!("stream {}", a.file.display()))?;
        if md.is_file() {
            Input::File(a.file.clone())
        } else {
            // a FIFO or a character device: read once, spooled
            Input::Pipe(Box::new(std::fs::File::open(&a.file).with_context(|| format!("opening {}", a.file.display()))?))
        }
    };
    let mut ctx = Ctx::open(cfg)?;
    let cancel = AtomicBool::new(false);
    let bar = Bar::new(0, &a.image, !g.no_progress);
    let res = crate::backup::backup_image_from(&mut ctx, &img, Box::new(DiffSource::new(input, a.force)), &bar, &cancel);
    bar.finish();
    let m = res?;
    println!(
        "{}: backup {} committed from {}: snapshot {}, {} bytes, {} new chunks ({} stored)",
        a.image,
        m.id,
        m.source,
        m.snapshot.as_deref().unwrap_or("(none)"),
        m.image_size,
        m.stats.new_chunks,
        m.stats.new_bytes
    );
    Ok(ExitCode::SUCCESS)
}
