//! Blocks of an RBD incremental read while the exact diff still runs.
//!
//! The exact diff of the objects fast-diff reports changed costs one round
//! trip per object (200-300 ms for 730 objects of a 4 GiB image here), and
//! the pipeline cannot start before the plan, which needs the whole diff.
//! Meanwhile the cluster link and the CPU are mostly idle. So each piece of
//! the diff, once known, hands the blocks its changed extents cover whole
//! to a few reader threads, which read them from the snapshot into memory,
//! up to a budget; the pipeline's readers then take them from here instead
//! of the cluster.
//!
//! Correctness does not rest on the diff: a block read ahead holds what
//! the frozen snapshot holds at that offset, whatever the plan later does
//! with it. A block the plan does not read (a trust check that fails,
//! a patched block) is simply never taken and is freed with the snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::Receiver;
use tracing::debug;

use crate::plan::{Extent, ExtentKind};
use crate::rbd::Image;

/// Bytes read ahead at most, per backup.
pub const READ_AHEAD_BYTES: u64 = 64 << 20;
/// Reads in flight while the diff runs.
pub const READ_AHEAD_THREADS: usize = 8;

/// Blocks read from the frozen snapshot, by offset.
#[derive(Default)]
pub struct ReadAhead {
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
    /// Bytes read ahead so far (taken or not).
    read: AtomicU64,
    /// Bytes handed to the pipeline.
    taken: AtomicU64,
}

impl ReadAhead {
    /// The block at `off` of `len` bytes, if it was read ahead; removed.
    pub fn take(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        match blocks.get(&off) {
            Some(v) if v.len() == len => {
                let v = blocks.remove(&off);
                self.taken.fetch_add(len as u64, Ordering::Relaxed);
                v
            }
            _ => None,
        }
    }

    /// Bytes read ahead, and of those handed to the pipeline.
    pub fn counts(&self) -> (u64, u64) {
        (self.read.load(Ordering::Relaxed), self.taken.load(Ordering::Relaxed))
    }

    /// Takes `len` bytes of the budget; false once it is spent.
    fn reserve(&self, len: u64) -> bool {
        self.read
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| (r + len <= READ_AHEAD_BYTES).then_some(r + len))
            .is_ok()
    }

    /// Reads the blocks `(offset, length)` that arrive on `todo` from `image`
    /// until `stop` is set or `todo` closes. A failed read is left to the
    /// pipeline, which reads the block again and reports the error there.
    pub fn read_from(&self, image: &Image, todo: &Receiver<(u64, usize)>, stop: &AtomicBool) {
        while let Ok((off, len)) = todo.recv() {
            if stop.load(Ordering::Relaxed) || !self.reserve(len as u64) {
                break;
            }
            let mut buf = vec![0; len];
            match image.read_at(off, &mut buf) {
                Ok(()) => {
                    self.blocks.lock().unwrap_or_else(|p| p.into_inner()).insert(off, buf);
                }
                Err(e) => {
                    self.read.fetch_sub(len as u64, Ordering::Relaxed);
                    debug!(offset = off, error = %e, "a read ahead failed; the pipeline reads the block");
                }
            }
        }
    }
}

/// The blocks (of `bs` bytes, the last one cut at `size`) that the changed
/// extents of `extents` cover whole, as `(offset, length)`: adjacent changed
/// extents count as one.
pub fn covered_blocks(extents: &[Extent], bs: u64, size: u64) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |(start, end): (u64, u64), out: &mut Vec<(u64, usize)>| {
        let end = end.min(size);
        let mut b = start.div_ceil(bs);
        while b * bs < end {
            let (off, len) = (b * bs, bs.min(size - b * bs));
            if off + len > end {
                break;
            }
            out.push((off, len as usize));
            b += 1;
        }
    };
    for e in extents.iter().filter(|e| e.kind == ExtentKind::Changed && e.len > 0) {
        run = match run {
            Some((s, end)) if e.off <= end && e.off >= s => Some((s, end.max(e.off + e.len))),
            Some(r) => {
                flush(r, &mut out);
                Some((e.off, e.off + e.len))
            }
            None => Some((e.off, e.off + e.len)),
        };
    }
    if let Some(r) = run {
        flush(r, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn covered_blocks_are_whole_inside_changed_runs() {
        let bs = 64 * K;
        let size = 10 * bs + 100;
        let ex = [
            // a block and a half: only the first is whole
            Extent::changed(0, bs + bs / 2),
            // two halves that touch make block 3 whole
            Extent::changed(3 * bs, bs / 2),
            Extent::changed(3 * bs + bs / 2, bs / 2),
            // gone ranges are never read ahead
            Extent::gone(5 * bs, bs),
            // a run from inside block 6 to the end: 7, 8, 9 and the short last block
            Extent::changed(6 * bs + 1, 4 * bs + 99),
        ];
        assert_eq!(
            covered_blocks(&ex, bs, size),
            vec![(0, bs as usize), (3 * bs, bs as usize), (7 * bs, bs as usize), (8 * bs, bs as usize), (9 * bs, bs as usize), (10 * bs, 100)]
        );
        // a run one byte short of the end leaves the short block out
        assert_eq!(covered_blocks(&[Extent::changed(10 * bs, 99)], bs, size), vec![]);
        assert_eq!(covered_blocks(&[], bs, size), vec![]);
    }

    #[test]
    fn the_budget_bounds_what_is_read_and_take_removes() {
        let ra = ReadAhead::default();
        assert!(ra.reserve(READ_AHEAD_BYTES - 10));
        assert!(!ra.reserve(11));
        assert!(ra.reserve(10));
        ra.blocks.lock().unwrap().insert(0, vec![7; 4]);
        assert_eq!(ra.take(0, 5), None, "a length that differs is not served");
        assert_eq!(ra.take(0, 4), Some(vec![7; 4]));
        assert_eq!(ra.take(0, 4), None);
        assert_eq!(ra.counts(), (READ_AHEAD_BYTES, 4));
    }
}
