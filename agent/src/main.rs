//! blockvault: incremental, deduplicating backups of Ceph RBD images and
//! local disk images. The engine is the `blockvault` library; this is its
//! command line.

use std::process::ExitCode;

use blockvault::{cli, logging};
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
