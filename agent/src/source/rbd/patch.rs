//! Partly changed blocks of an RBD incremental, patched from the parent.
//!
//! The block-level plan says which blocks changed since the base snapshot.
//! With fast-diff that answer is per object (4 MiB by default), so a single
//! 4 KiB write marks a whole 4 MiB block for reading. Here an exact diff
//! (not whole-object) of just those blocks finds the bytes that changed.
//! A block whose changed bytes cover at most half of it is then built from
//! the parent backup's chunk (read from the local store and checked against
//! its id), with only the changed extents read from the cluster. The block
//! is then hashed and stored like any other: the result is the same bytes a
//! whole-block read gives, for a fraction of the cluster traffic.
//!
//! The trust this puts in the diff is the trust an inherited block already
//! needs (the diff said the rest of the block is unchanged since the base
//! snapshot, and the parent backup holds the base snapshot's content), and
//! it is checked the same way: a sample of patched blocks is also read
//! whole and compared before the pipeline starts; one mismatch drops every
//! patch (whole-block reads, logged). A parent chunk that does not load
//! (missing, corrupt) makes that block a whole-block read, logged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;

use anyhow::{Context, Result};
use blockvault_store::{BlockMap, ChunkId, Store};
use rand::seq::SliceRandom;
use tracing::warn;

use crate::plan::{BlockAction, Extent};
use crate::rbd::Image;

/// A block is patched when its changed extents cover at most this share of it
/// (in 1/8ths); above, reading the whole block from the cluster is cheaper
/// than loading and decompressing the parent's chunk first.
const MAX_CHANGED_EIGHTHS: u64 = 4;
/// Patched blocks also read whole and compared before the run: this many at
/// least, and one in a hundred.
const MIN_PATCH_SAMPLES: usize = 4;
const PATCH_SAMPLE_PERCENT: usize = 1;

/// One partly changed block: the parent's entry and the changed extents
/// (offset inside the block, length), in increasing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub parent: Option<ChunkId>,
    pub extents: Vec<(u32, u32)>,
}

impl Patch {
    fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1 as u64).sum()
    }
}

/// Finds, among the blocks `actions` marks for reading, those that changed
/// only in part, from an exact diff of their ranges against `base`.
///
/// `exact` is the whole image's exact diff against `base` when the plan was
/// made from one (block size below the object size): it is used as it is,
/// instead of diffing every run of changed blocks again (one round trip to
/// an OSD per object).
///
/// Only blocks that are whole in both the parent and the new version are
/// considered (a resize edge is always read whole).
///
/// # Errors
/// When the diff fails.
pub fn plan_patches(
    at: &Image,
    base: &str,
    parent: &BlockMap,
    actions: &[BlockAction],
    size: u64,
    exact: Option<&[Extent]>,
) -> Result<HashMap<usize, Patch>> {
    let bs = parent.block_size() as u64;
    let whole_blocks = (parent.image_size().min(size) / bs) as usize;
    let mut changed = ChangedExtents { bs, whole_blocks, actions, blocks: HashMap::new() };
    match exact {
        Some(extents) => {
            // gone or not, a changed extent is read from the snapshot: it reads as
            // whatever the snapshot holds there (zeros for a discarded range)
            for e in extents {
                changed.add(e.off, e.len);
            }
        }
        None => {
            let mut b = 0;
            while b < whole_blocks.min(actions.len()) {
                if actions[b] != BlockAction::Read {
                    b += 1;
                    continue;
                }
                let first = b;
                while b < whole_blocks && actions[b] == BlockAction::Read {
                    b += 1;
                }
                // blocks first..b are a run to read: diff it exactly
                let (run_off, run_end) = (first as u64 * bs, b as u64 * bs);
                at.diff_iterate(Some(base), run_off, run_end - run_off, false, |off, len, _exists| {
                    let start = off.max(run_off);
                    changed.add(start, (off + len).min(run_end).saturating_sub(start));
                    true
                })?;
            }
        }
    }
    Ok(changed.patches(parent))
}

/// The changed extents of each whole block marked for reading.
struct ChangedExtents<'a> {
    bs: u64,
    whole_blocks: usize,
    actions: &'a [BlockAction],
    blocks: HashMap<usize, Vec<(u32, u32)>>,
}

impl ChangedExtents<'_> {
    fn add(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.whole_blocks as u64 * self.bs);
        let mut pos = off;
        while pos < end {
            let blk = (pos / self.bs) as usize;
            let bend = (blk as u64 + 1) * self.bs;
            let n = end.min(bend) - pos;
            if self.actions.get(blk) == Some(&BlockAction::Read) {
                self.blocks.entry(blk).or_default().push(((pos % self.bs) as u32, n as u32));
            }
            pos += n;
        }
    }

    /// Every block marked for reading that is whole and changed in at most
    /// [`MAX_CHANGED_EIGHTHS`] of its bytes.
    fn patches(mut self, parent: &BlockMap) -> HashMap<usize, Patch> {
        let mut patches = HashMap::new();
        let limit = self.bs * MAX_CHANGED_EIGHTHS;
        for b in (0..self.whole_blocks.min(self.actions.len())).filter(|&b| self.actions[b] == BlockAction::Read) {
            let mut ex = self.blocks.remove(&b).unwrap_or_default();
            ex.sort_unstable();
            let p = Patch { parent: parent.get(b), extents: coalesce(ex) };
            if p.changed_bytes() * 8 <= limit {
                patches.insert(b, p);
            }
        }
        patches
    }
}

/// Merges overlapping and touching extents (sorted by offset).
fn coalesce(ex: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ex.len());
    for (off, len) in ex {
        match out.last_mut() {
            Some(last) if off <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(off + len);
                last.1 = end - last.0;
            }
            _ => out.push((off, len)),
        }
    }
    out
}

thread_local! {
    /// Per-thread buffers for loading parent chunks: (stored bytes, plaintext).
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Builds patched blocks: the parent's chunk (read through the backup's own
/// store handle) with the changed extents read from the snapshot over it.
pub struct Patcher {
    block_size: u64,
    patches: HashMap<usize, Patch>,
}

impl Patcher {
    pub fn new(block_size: u32, patches: HashMap<usize, Patch>) -> Patcher {
        Patcher { block_size: block_size as u64, patches }
    }

    pub fn len(&self) -> usize {
        self.patches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// Fills `buf` with the block at `offset` when it is a patched block and
    /// returns the bytes it read from the cluster for it; `Ok(None)` means
    /// "read it whole yourself".
    ///
    /// # Errors
    /// A cluster read error.
    pub fn read_patched(&self, store: &Store, image: &Image, offset: u64, buf: &mut [u8]) -> io::Result<Option<u64>> {
        if !offset.is_multiple_of(self.block_size) || buf.len() as u64 != self.block_size {
            return Ok(None);
        }
        let block = (offset / self.block_size) as usize;
        let Some(p) = self.patches.get(&block) else { return Ok(None) };
        match p.parent {
            None => buf.fill(0),
            Some(id) => {
                let loaded = SCRATCH.with(|s| {
                    let (raw, plain) = &mut *s.borrow_mut();
                    match store.load_chunk(&id, raw, plain) {
                        Ok(()) if plain.len() == buf.len() => {
                            buf.copy_from_slice(plain);
                            Ok(())
                        }
                        Ok(()) => Err(format!("chunk {id} holds {} bytes, the block {}", plain.len(), buf.len())),
                        Err(e) => Err(crate::logging::Chain(&e).to_string()),
                    }
                });
                if let Err(e) = loaded {
                    warn!(block, chunk = %id, error = %e, "parent chunk of a partly changed block does not load: reading the block whole");
                    return Ok(None);
                }
            }
        }
        for &(off, len) in &p.extents {
            let (s, e) = (off as usize, (off + len) as usize);
            image.read_at(offset + off as u64, &mut buf[s..e]).map_err(io::Error::other)?;
        }
        Ok(Some(p.changed_bytes()))
    }

    /// Checks a sample of patched blocks against whole-block reads of the
    /// snapshot. Returns the first block that differs.
    ///
    /// # Errors
    /// A cluster read error.
    pub fn sample_check(&self, store: &Store, image: &Image) -> Result<Option<usize>> {
        let mut blocks: Vec<usize> = self.patches.keys().copied().collect();
        blocks.sort_unstable();
        blocks.shuffle(&mut rand::thread_rng());
        let want = (blocks.len() * PATCH_SAMPLE_PERCENT / 100).max(MIN_PATCH_SAMPLES).min(blocks.len());
        let bs = self.block_size as usize;
        let (mut patched, mut whole) = (vec![0u8; bs], vec![0u8; bs]);
        for &b in &blocks[..want] {
            let off = b as u64 * self.block_size;
            if self.read_patched(store, image, off, &mut patched)?.is_none() {
                continue; // its parent chunk did not load: it will be read whole
            }
            image.read_at(off, &mut whole).with_context(|| format!("reading sample block {b}"))?;
            if patched != whole {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_coalesce() {
        assert_eq!(coalesce(vec![(0, 10), (10, 5), (20, 5), (22, 10)]), vec![(0, 15), (20, 12)]);
        assert_eq!(coalesce(vec![(0, 100), (10, 5)]), vec![(0, 100)]);
        assert_eq!(coalesce(vec![]), vec![]);
    }

    /// The whole-image exact diff, split per block: only whole blocks marked
    /// for reading count, extents crossing a block edge are cut there, and a
    /// block changed in more than half its bytes is read whole.
    #[test]
    fn exact_extents_become_patches() {
        const BS: u64 = 64 << 10;
        let size = 5 * BS + 100; // block 5 is a short tail
        let mut parent = BlockMap::new_zeroed(size, BS as u32);
        for b in 0..6 {
            parent.set(b, Some(ChunkId::of(&[b as u8])));
        }
        use BlockAction::{Inherit, Read};
        let actions = [Read, Inherit, Read, Read, Read, Read];
        let mut changed = ChangedExtents { bs: BS, whole_blocks: 5, actions: &actions, blocks: HashMap::new() };
        changed.add(500, 2000); // block 0, given out of order and overlapping
        changed.add(100, 1000);
        changed.add(BS + 10, 10); // block 1 inherits: ignored
        changed.add(2 * BS, BS / 2 + 1); // block 2: just over half changed
        changed.add(4 * BS - 8, 16); // crosses from block 3 into block 4
        changed.add(5 * BS + 10, 10); // the tail is never patched
        let patches = changed.patches(&parent);

        let want = |b: usize, extents: Vec<(u32, u32)>| Patch { parent: Some(ChunkId::of(&[b as u8])), extents };
        assert_eq!(patches.len(), 3, "{patches:?}");
        assert_eq!(patches[&0], want(0, vec![(100, 2400)]));
        assert_eq!(patches[&3], want(3, vec![(BS as u32 - 8, 8)]));
        assert_eq!(patches[&4], want(4, vec![(0, 8)]));
        assert!(!patches.contains_key(&1) && !patches.contains_key(&2) && !patches.contains_key(&5));

        // exactly half changed is still patched
        let mut half = ChangedExtents { bs: BS, whole_blocks: 5, actions: &actions, blocks: HashMap::new() };
        half.add(2 * BS, BS / 2);
        assert_eq!(half.patches(&parent)[&2], want(2, vec![(0, BS as u32 / 2)]));
    }
}
