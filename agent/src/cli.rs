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
mod export_diff;
mod import_diff;
mod key;
mod serve;
mod store;
// issue 14, part 2
mod annotate;
mod man;
mod stats;
mod release;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, DEFAULT_CONFIG};

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
    /// Write the change between two backups as an `rbd export-diff` stream.
    ExportDiff(export_diff::ExportDiffArgs),
    /// Apply an `rbd export-diff` stream to an image's latest backup, as a new backup.
    ImportDiff(import_diff::ImportDiffArgs),
    /// Key slots of an encrypted store: list, add, remove, passwd, export (--paper).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Serve backups read-only over NBD (IMAGE or IMAGE@ID, each an export).
    Serve(serve::ServeArgs),
    /// Drop blockvault's RBD snapshots of an image (the next backup is a full read).
    Release(release::ReleaseArgs),
    /// Operations on the store as a whole (`store copy`).
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Per store and per image: sizes, stored bytes, dedup and compression ratios, chunks, oldest and newest backup.
    Stats(stats::StatsArgs),
    /// Set or remove labels (KEY=VALUE) of a backup (IMAGE@ID).
    Label(annotate::LabelArgs),
    /// Set or remove the note of a backup (IMAGE@ID).
    Note(annotate::NoteArgs),
    /// Write the man pages (blockvault.1 and one per subcommand) to a directory.
    #[command(hide = true)]
    Man(man::ManArgs),
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
        Command::ExportDiff(a) => export_diff::run(g, a),
        Command::ImportDiff(a) => import_diff::run(g, a),
        Command::Key(c) => key::run(g, c),
        Command::Serve(a) => serve::run(g, a),
        Command::Store(c) => store::run(g, c),
        Command::Stats(a) => stats::run(g, a),
        Command::Label(a) => annotate::label(g, a),
        Command::Note(a) => annotate::note(g, a),
        Command::Man(a) => man::run(a),
        Command::Release(a) => release::run(g, a),
    }
}

/// Splits `IMAGE[@ID]` (see [`crate::lookup::BackupRef`], which commands
/// resolve through [`crate::lookup`]).
///
/// # Errors
/// When what follows `@` is not a number.
pub fn parse_backup_ref(s: &str) -> Result<(String, Option<u64>)> {
    let r = crate::lookup::BackupRef::parse(s)?;
    Ok((r.image, r.id.map(|id| id.0)))
}
