use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blockvault_catalog::BackupRow;
use blockvault_store::{BackupId, Manifest};
use clap::{Args, ValueEnum};

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::diffstream::Version;
use crate::progress::Bar;
use crate::restore::export_diff::{export_diff, stream_snap_name};

#[derive(Args, Debug)]
pub struct ExportDiffArgs {
    /// IMAGE or IMAGE@BACKUP_ID (the latest backup by default).
    pub backup: String,
    /// The backup the diff starts from: an id of the same image, or `none`
    /// for everything (default: the backup's parent).
    #[arg(long)]
    pub from: Option<String>,
    /// Write the stream here (default: standard output).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Stream format: 1 is what `rbd import-diff` reads; 2 is the
    /// length-prefixed variant (read by `blockvault import-diff`).
    #[arg(long, value_enum, default_value = "1")]
    pub format: FormatArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    #[value(name = "1")]
    V1,
    #[value(name = "2")]
    V2,
}

/// The committed backup `IMAGE[@ID]` names (the latest without an id).
///
/// # Errors
/// When there is no such committed backup (the typed errors of [`crate::lookup`]).
pub(crate) fn committed_backup(ctx: &Ctx, image: &str, id: Option<u64>) -> Result<BackupRow> {
    let r = crate::lookup::BackupRef { image: image.to_string(), id: id.map(BackupId) };
    Ok(crate::lookup::committed_backup(ctx, &r)?)
}

fn manifest(ctx: &Ctx, row: &BackupRow) -> Result<Manifest> {
    let m = ctx.store.read_manifest(row.id).with_context(|| format!("reading backup {} of image '{}'", row.id, row.image))?;
    crate::restore::check_manifest(&m, &row.image, row.id)?;
    Ok(m)
}

pub fn run(g: &GlobalArgs, a: ExportDiffArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    let spec = crate::lookup::BackupRef::parse(&a.backup)?;
    let image = spec.image.clone();
    let to_row = crate::lookup::committed_backup(&ctx, &spec)?;
    let from_row = match a.from.as_deref() {
        Some("none") => None,
        Some(s) => {
            let id = s.parse::<u64>().map_err(|_| anyhow::anyhow!("--from '{s}': expected a backup id or `none`"))?;
            Some(committed_backup(&ctx, &image, Some(id)).context("--from")?)
        }
        None => match to_row.parent {
            Some(p) => Some(
                committed_backup(&ctx, &image, Some(p.0))
                    .with_context(|| format!("the parent of backup {} (give --from ID or --from none)", to_row.id))?,
            ),
            None => None,
        },
    };
    if from_row.as_ref().is_some_and(|f| f.id == to_row.id) {
        bail!("--from {} is the backup being exported: the diff would be empty", to_row.id);
    }
    let _lock = ctx.store.lock_shared_for_reading()?;
    let to = manifest(&ctx, &to_row)?;
    let from = from_row.as_ref().map(|r| manifest(&ctx, r)).transpose()?;
    let version = match a.format {
        FormatArg::V1 => Version::V1,
        FormatArg::V2 => Version::V2,
    };
    let bar = Bar::new(to.image_size, &image, !g.no_progress);
    // A file is written beside its final name and renamed when complete, so
    // a failed export never leaves a stream that looks whole.
    let stats = match &a.output {
        None => {
            let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            let (mut out, stats) = export_diff(&ctx.store, from.as_ref(), &to, version, out, &bar)?;
            out.flush().context("writing to standard output")?;
            stats
        }
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a temp file in {}", dir.display()))?;
            let out = std::io::BufWriter::with_capacity(1 << 20, tmp);
            let (out, stats) = export_diff(&ctx.store, from.as_ref(), &to, version, out, &bar)?;
            let tmp = out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", path.display()))?;
            tmp.as_file().sync_all().with_context(|| format!("syncing {}", path.display()))?;
            tmp.persist(path).map_err(|e| e.error).with_context(|| format!("renaming the stream to {}", path.display()))?;
            stats
        }
    };
    bar.finish();
    tracing::info!(
        from = ?from.as_ref().map(stream_snap_name),
        to = %stream_snap_name(&to),
        data_blocks = stats.data_blocks,
        data_bytes = stats.data_bytes,
        zero_records = stats.zero_records,
        stream_bytes = stats.stream_bytes,
        "export-diff done"
    );
    Ok(ExitCode::SUCCESS)
}
