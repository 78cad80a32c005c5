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

/// Displays an error with every cause in its chain, each once:
/// `outer: cause: root cause`. Library errors name the object and leave the
/// cause to their `source()` (so `{:#}` of an `anyhow::Error` prints each
/// once); use this where a library error is logged or kept as text.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// Text from the store, the catalog or the cluster (image, snapshot and
/// source names), made safe to print: control characters (newlines, escape
/// codes) are shown escaped, so a hostile name cannot fake output lines or
/// colours. Ordinary text is returned as is.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable("vm-1:a+b.c_d"), "vm-1:a+b.c_d");
        assert_eq!(printable("ünï cödé"), "ünï cödé");
        assert_eq!(printable("a\nb\x1b[31mc\r"), "a\\nb\\u{1b}[31mc\\r");
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let e = blockvault_store::Error::Io {
            op: "write",
            path: "/s/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let s = Chain(&e).to_string();
        assert_eq!(s.matches("No space left on device").count(), 1, "{s}");
        assert!(s.starts_with("/s/x: write failed: "), "{s}");
    }
}
