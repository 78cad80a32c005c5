//! The command line. One file per subcommand under `cli/`.

mod backup;
mod catalog;
mod init;
mod list;
mod restore;
mod run;
mod prune;
mod protect;
mod daemon;
mod snapshots;
mod gc;
mod verify;
mod forget;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blockvault_catalog::{BackupRow, BackupState};
use blockvault_store::{BackupId, Manifest};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, DEFAULT_CONFIG};
use crate::context::Ctx;

#[derive(Parser, Debug)]
#[command(name = "blockvault", version, about = "Incremental, deduplicating backups of Ceph RBD images and disk images")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Config file.
    #[arg(long, short = 'c', global = true, env = "BLOCKVAULT_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// More logging (-v debug, -vv trace). BLOCKVAULT_LOG takes a tracing filter.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// Never draw a progress bar.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Text.
    Auto,
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the store and the catalog named by the config.
    Init(init::InitArgs),
    /// Back up configured images now.
    Backup(backup::BackupArgs),
    /// List committed backups.
    List(list::ListArgs),
    /// Restore a backup to a file or block device.
    Restore(restore::RestoreArgs),
    /// RBD snapshots per image: blockvault's, and foreign ones (never touched).
    Snapshots(snapshots::SnapshotsArgs),
    /// Remove chunks that no backup references (after the grace period).
    Gc(gc::GcArgs),
    /// Check backups: metadata, chunks (--deep), RBD snapshots (--source).
    Verify(verify::VerifyArgs),
    /// Catalog maintenance.
    #[command(subcommand)]
    Catalog(catalog::CatalogCommand),
    /// One scheduled pass (systemd timers): back up, prune if configured, write metrics.
    Run(run::RunArgs),
    /// Run the configured schedules (systemd service); SIGHUP reloads the config.
    Daemon(daemon::DaemonArgs),
    /// Remove backups the retention policy does not keep.
    Prune(prune::PruneArgs),
    /// Protect a backup (IMAGE@ID) from pruning.
    Protect(protect::ProtectArgs),
    /// Lift the protection of a backup (IMAGE@ID).
    Unprotect(protect::ProtectArgs),
    /// Remove one backup (IMAGE@ID) or every backup of an image (IMAGE --all).
    Forget(forget::ForgetArgs),
    /// Serve backups read-only over NBD (IMAGE or IMAGE@ID, each an export).
    Serve(serve::ServeArgs),
}

pub fn load_config(g: &GlobalArgs) -> Result<Config> {
    Config::load(&g.config)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => init::run(g, a),
        Command::Backup(a) => backup::run(g, a),
        Command::List(a) => list::run(g, a),
        Command::Restore(a) => restore::run(g, a),
        Command::Catalog(c) => catalog::run(g, c),
        Command::Run(a) => run::run(g, a),
        Command::Daemon(a) => daemon::run(g, a),
        Command::Prune(a) => prune::run(g, a),
        Command::Protect(a) => protect::run(g, a, true),
        Command::Unprotect(a) => protect::run(g, a, false),
        Command::Snapshots(a) => snapshots::run(g, a),
        Command::Gc(a) => gc::run(g, a),
        Command::Verify(a) => verify::run(g, a),
        Command::Forget(a) => forget::run(g, a),
        Command::Serve(a) => serve::run(g, a),
    }
}

/// The committed backup `spec` (`IMAGE` for the latest, `IMAGE@ID`) names,
/// with its manifest from the store, checked against the catalog row (a
/// corrupt manifest is stood in for by the block map, checked against the
/// catalog's image and block size). The caller holds the store lock shared,
/// so the backup cannot be swept between this lookup and its reads.
///
/// # Errors
/// An unknown image or backup, one not committed, a manifest that does not
/// match the catalog.
pub fn find_backup(ctx: &Ctx, spec: &str) -> Result<(BackupRow, Manifest)> {
    let (image, id) = parse_backup_ref(spec)?;
    let row = match id {
        Some(id) => {
            let row = ctx.catalog.backup(BackupId(id))?;
            match row {
                Some(r) if r.image == image && r.state == BackupState::Committed => r,
                Some(r) if r.image == image => bail!("backup {id} of image '{image}' is {:?}, not committed: nothing to read", r.state),
                _ => bail!("backup {id} does not exist for image '{image}' (see `blockvault list {image}`)"),
            }
        }
        None => match ctx.catalog.committed_backups(Some(&image))?.pop() {
            Some(r) => r,
            None => bail!("image '{image}' has no committed backup"),
        },
    };
    let manifest = match ctx.store.read_manifest(row.id) {
        Ok(m) => m,
        // a corrupt manifest: the block map has its own header and checksum,
        // and the catalog row the geometry to check it against
        Err(e) if e.is_corruption() || matches!(e, blockvault_store::Error::UnsupportedVersion { .. }) => {
            let source = ctx.catalog.image(&row.image)?.map(|i| i.source).unwrap_or_default();
            let m = ctx
                .store
                .manifest_from_blockmap(row.id, &row.image, &source, row.image_size, row.block_size)
                .with_context(|| format!("backup {}: {e}; its block map cannot stand in for it either", row.id))?;
            tracing::warn!(backup = row.id.0, error = %e, "manifest unreadable: reading the backup through its block map, checked against the catalog's image and block size");
            m
        }
        Err(e) => return Err(e.into()),
    };
    crate::restore::check_manifest(&manifest, &row.image, row.id)?;
    Ok((row, manifest))
}

/// Splits `IMAGE[@ID]`.
pub fn parse_backup_ref(s: &str) -> Result<(String, Option<u64>)> {
    match s.rsplit_once('@') {
        None => Ok((s.to_string(), None)),
        Some((img, id)) => {
            let id = id
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("'{s}': the backup id after '@' must be a number"))?;
            Ok((img.to_string(), Some(id)))
        }
    }
}
