//! The tracing subscriber: human-readable on a terminal, JSON lines or plain
//! text otherwise. Only the binary installs one.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::{GlobalArgs, LogFormat};

pub fn init(g: &GlobalArgs) {
    let level = match (g.quiet, g.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("BLOCKVAULT_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::stderr().is_terminal();
    let json = match g.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => false,
    };
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        b.json().flatten_event(true).with_current_span(true).init();
    } else {
        b.with_target(false).init();
    }
}
