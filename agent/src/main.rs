//! blockvault: incremental, deduplicating backups of Ceph RBD images and
//! local disk images.

mod backup;
mod cli;
mod config;
mod context;
mod daemon;
mod job;
mod logging;
mod metrics;
mod pipeline;
mod progress;
mod prune;
mod rbd;
mod rbd_backup;
mod rbd_patch;
mod rebuild;
mod restore;
mod retention;
mod schedule;
mod source;
mod verify;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logging::init(&args.global);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
