//! blockvault: incremental, deduplicating backups of Ceph RBD images and
//! local disk images. The engine is the `blockvault` library; this is its
//! command line.

use std::process::ExitCode;

use blockvault::{cli, logging};
use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    logging::init(&args.global);
    let json = matches!(args.global.log_format, cli::LogFormat::Json);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // under --log-format json the last line is JSON too (config
            // errors included), so a log shipper parses every line
            if json {
                tracing::error!(error = %format!("{e:#}"), "blockvault failed");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
