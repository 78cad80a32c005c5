use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{load_config, GlobalArgs};

#[derive(Args, Debug)]
pub struct DaemonArgs {}

/// Runs the configured schedules until SIGTERM; SIGHUP reloads the config.
pub fn run(g: &GlobalArgs, _a: DaemonArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    crate::daemon::run(cfg)
}
