//! A progress bar on a terminal; nothing otherwise (logs carry the figures).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pipeline::Progress;

/// A byte progress bar, cleared when done (or dropped).
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// A byte progress bar of `total` bytes, shown only when stderr is a
    /// terminal and `enabled`.
    pub fn new(total: u64, label: &str, enabled: bool) -> Bar {
        let b = Bar::for_plan(label, enabled);
        b.start(total);
        b
    }

    /// The bar of one backup: hidden until the pipeline knows the plan
    /// ([`Progress::start`] gives the total), so no `0 B/0 B` bar is drawn
    /// while the backup takes its snapshot and logs.
    pub fn for_plan(label: &str, enabled: bool) -> Bar {
        if !enabled || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = ProgressBar::hidden();
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_prefix(label.to_string());
        Bar(Some(pb))
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(total);
            pb.set_position(0);
            pb.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // an error path that returns early still leaves no bar behind
        self.finish();
    }
}

/// Bytes in binary units with one decimal (`1.5 GiB`, `512 B`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Milliseconds as `850 ms`, `12.3 s`, `4m 05s`.
pub fn human_duration_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{}m {:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

/// The one-line summary of a committed backup, in human units:
/// `backup 7 committed: read 443.2 MiB, 111 new chunks (19.2 KiB stored), 2.1 s`.
pub fn summary(m: &blockvault_store::Manifest) -> String {
    let s = &m.stats;
    format!(
        "backup {} committed: read {}, {} new chunk{} ({} stored){}, {}",
        m.id,
        human_bytes(s.read_bytes),
        s.new_chunks,
        if s.new_chunks == 1 { "" } else { "s" },
        human_bytes(s.new_bytes),
        // a file source is always read whole: worth saying only for RBD
        if s.full_read && m.snapshot.is_some() { ", full read" } else { "" },
        human_duration_ms(s.duration_ms)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(464_715_776), "443.2 MiB");
        assert_eq!(human_bytes(19_701), "19.2 KiB");
        assert_eq!(human_duration_ms(850), "850 ms");
        assert_eq!(human_duration_ms(12_345), "12.3 s");
        assert_eq!(human_duration_ms(245_000), "4m 05s");
    }
}
