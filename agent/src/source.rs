//! Image sources and backup plans.
//!
//! A source gives random-access reads of one image version. The plan says,
//! per block, whether to read it, to take it as zeros (a hole, or an extent
//! the RBD diff reports as no longer existing), or to inherit the parent
//! backup's entry (unchanged since the parent's snapshot).

pub mod file;

use std::io;

/// What the pipeline does with one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAction {
    /// Take the parent block map's entry without reading.
    Inherit,
    /// The block is all zeros; don't read it.
    Zero,
    /// Read, hash, and store the block if the store lacks it.
    Read,
}

/// Random-access reads of one image version.
pub trait ImageSource: Sync {
    /// Human-readable name for logs and errors.
    fn describe(&self) -> String;
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// An I/O error; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Whole blocks that `read_at` built from the parent backup instead of
    /// reading them, and the bytes it did read from the source for them.
    fn patched(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Marks every block touched by `[off, off + len)` with `action`.
pub fn mark_range(actions: &mut [BlockAction], block_size: u32, off: u64, len: u64, action: BlockAction) {
    if len == 0 || actions.is_empty() {
        return;
    }
    let bs = block_size as u64;
    let first = (off / bs) as usize;
    let last = (((off + len - 1) / bs) as usize).min(actions.len() - 1);
    for a in actions.iter_mut().take(last + 1).skip(first) {
        *a = action;
    }
}

#[cfg(test)]
/// Marks with `action` only the blocks that `[off, off + len)` covers
/// entirely (a partly covered block keeps its current action).
pub fn mark_covered(actions: &mut [BlockAction], block_size: u32, image_size: u64, off: u64, len: u64, action: BlockAction) {
    let bs = block_size as u64;
    let end = (off + len).min(image_size);
    let first = off.div_ceil(bs);
    // the last block may be short: it is covered when the range reaches the image end
    let last_excl = if end == image_size { image_size.div_ceil(bs) } else { end / bs };
    for b in first..last_excl {
        if let Some(a) = actions.get_mut(b as usize) {
            *a = action;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockAction::*;

    #[test]
    fn marking_aligns_to_blocks() {
        let mut a = vec![Inherit; 5];
        mark_range(&mut a, 100, 150, 100, Read); // touches blocks 1 and 2
        assert_eq!(a, vec![Inherit, Read, Read, Inherit, Inherit]);
        let mut a = vec![Read; 5];
        mark_covered(&mut a, 100, 450, 50, 300, Zero); // covers 1 and 2 entirely
        assert_eq!(a, vec![Read, Zero, Zero, Read, Read]);
        let mut a = vec![Read; 5];
        mark_covered(&mut a, 100, 450, 400, 50, Zero); // short last block fully covered
        assert_eq!(a, vec![Read, Read, Read, Read, Zero]);
        let mut a = vec![Read; 2];
        mark_range(&mut a, 100, 0, 1000, Zero); // clamps at the end
        assert_eq!(a, vec![Zero, Zero]);
    }
}
