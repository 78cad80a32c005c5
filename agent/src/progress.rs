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
