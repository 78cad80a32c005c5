//! The backup planner: a pure function from what the source reports (the
//! extents that changed, or "read everything") to one action per block.
//! No I/O: the property tests below and the `planner` fuzz target check it
//! against a naive byte-by-byte model of the image.
//!
//! The model, for an incremental against a parent backup of `old` bytes and a
//! new version of `size` bytes, block by block of the new version:
//! * a block with any byte the source reports as changed is read;
//! * a block whose every byte is gone (the diff reports it as no longer
//!   existing: discarded, or cut off by a shrink) or past the old end (grown:
//!   never written, reads as zeros) is zero, without reading;
//! * a block none of whose bytes is reported, and that has the same length
//!   in the parent, takes the parent's entry (inherited, not read);
//! * every other block is read: partly gone (the rest may hold data), or its
//!   length changed with a resize.
//!
//! The safety rule behind the second and last cases, a place where other
//! tools lost data: an extent reported as gone becomes zeros, never
//! "unchanged"; a partly gone block is read.
//!
//! For a full read (no usable parent), a block with any byte reported as
//! holding data is read; every other block is a hole and zero.

use std::fmt;

use blockvault_store::{BackupId, BlockMap};

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

/// What the source reports about a byte range of the new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Changed since the parent (incremental), or holds data (full read).
    Changed,
    /// No longer exists since the parent: reads as zeros. Ignored by a full
    /// read, where an unreported range is a hole anyway.
    Gone,
}

/// A byte range of the new version; ranges may overlap, touch, straddle
/// block edges and run past the end of the image (clamped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub off: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn changed(off: u64, len: u64) -> Extent {
        Extent { off, len, kind: ExtentKind::Changed }
    }
    pub fn gone(off: u64, len: u64) -> Extent {
        Extent { off, len, kind: ExtentKind::Gone }
    }
}

/// Why a backup reads every allocated extent instead of only what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FullReason {
    /// The image has no committed backup yet.
    FirstBackup,
    /// The source cannot tell what changed (files, block devices).
    NoChangeTracking,
    /// The parent backup names no RBD snapshot.
    ParentHasNoSnapshot { parent: BackupId },
    /// The parent's snapshot is gone from the cluster (or the catalog).
    BaseSnapshotGone { snapshot: String, parent: BackupId },
    /// The parent's block size differs from the image's.
    BlockSizeChanged { snapshot: String },
    /// The object map or fast-diff is flagged invalid.
    MapInvalid,
    /// A sampled block the diff called unchanged differs from the parent.
    UntrustedDiff { block: usize, parent: BackupId },
    /// An imported `rbd export-diff` stream without a from-snapshot: it
    /// holds the whole image.
    WholeStream,
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FullReason::FirstBackup => f.write_str("first backup of this image"),
            FullReason::NoChangeTracking => f.write_str("the source does not track changes"),
            FullReason::ParentHasNoSnapshot { parent } => write!(f, "parent backup {parent} has no RBD snapshot"),
            FullReason::BaseSnapshotGone { snapshot, parent } => {
                write!(f, "base snapshot {snapshot} of parent backup {parent} is gone")
            }
            FullReason::BlockSizeChanged { snapshot } => write!(f, "the block size of the backup of {snapshot} differs"),
            FullReason::MapInvalid => f.write_str("the object map or fast-diff is flagged invalid"),
            FullReason::UntrustedDiff { block, parent } => {
                write!(f, "block {block} differs from parent backup {parent} although the diff called it unchanged")
            }
            FullReason::WholeStream => f.write_str("the imported stream has no from-snapshot: it holds the whole image"),
        }
    }
}

/// What a source reports for the version it froze.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Read every block holding data: `extents` are the allocated ones
    /// (`Changed`); everything else is a hole.
    Full { extents: Vec<Extent>, reason: FullReason },
    /// What changed since the parent backup; everything unreported is
    /// unchanged.
    Since { extents: Vec<Extent> },
}

/// Input the planner refuses (a bug in the caller, never a panic).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    #[error("block size 0")]
    ZeroBlockSize,
    #[error("an image of {size} bytes has more than {MAX_BLOCKS} blocks of {block_size} bytes")]
    TooManyBlocks { size: u64, block_size: u32 },
    #[error("an incremental plan needs the parent's block map")]
    NoParent,
    #[error("the parent's block size {parent} differs from {block_size}")]
    ParentBlockSize { parent: u32, block_size: u32 },
}

/// More blocks than this is an absurd image (16 PiB at 4 MiB blocks).
pub const MAX_BLOCKS: u64 = u32::MAX as u64;

/// One action per block, and the new block map with the inherited entries
/// filled in (the pipeline fills the rest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<BlockAction>,
    pub map: BlockMap,
    pub full_read: bool,
}

impl Plan {
    /// Number of blocks planned as `action`.
    pub fn count(&self, action: BlockAction) -> usize {
        self.actions.iter().filter(|a| **a == action).count()
    }
}

/// Plans a backup of a version of `size` bytes (see the module docs).
///
/// # Errors
/// A zero block size, an absurd block count, or an incremental without a
/// parent map of the same block size.
pub fn plan(changes: &Changes, size: u64, block_size: u32, parent: Option<&BlockMap>) -> Result<Plan, PlanError> {
    if block_size == 0 {
        return Err(PlanError::ZeroBlockSize);
    }
    let n = size.div_ceil(block_size as u64);
    if n > MAX_BLOCKS {
        return Err(PlanError::TooManyBlocks { size, block_size });
    }
    match changes {
        Changes::Full { extents, .. } => Ok(Plan {
            actions: plan_full(extents, size, block_size, n as usize),
            map: BlockMap::new_zeroed(size, block_size),
            full_read: true,
        }),
        Changes::Since { extents } => {
            let parent = parent.ok_or(PlanError::NoParent)?;
            if parent.block_size() != block_size {
                return Err(PlanError::ParentBlockSize { parent: parent.block_size(), block_size });
            }
            Ok(Plan {
                actions: plan_since(extents, size, block_size, n as usize, parent.image_size()),
                map: BlockMap::inherit(parent, size),
                full_read: false,
            })
        }
    }
}

/// `[off, off + len)` clamped to `[0, end)`, or `None` when empty.
fn clamp(e: &Extent, end: u64) -> Option<(u64, u64)> {
    let s = e.off.min(end);
    let t = e.off.saturating_add(e.len).min(end);
    (s < t).then_some((s, t))
}

/// Blocks touched by `[s, t)` (t > s).
fn blocks(s: u64, t: u64, bs: u64) -> std::ops::Range<usize> {
    (s / bs) as usize..(t.div_ceil(bs)) as usize
}

fn plan_full(extents: &[Extent], size: u64, block_size: u32, n: usize) -> Vec<BlockAction> {
    let bs = block_size as u64;
    let mut actions = vec![BlockAction::Zero; n];
    for e in extents.iter().filter(|e| e.kind == ExtentKind::Changed) {
        if let Some((s, t)) = clamp(e, size) {
            actions[blocks(s, t, bs)].fill(BlockAction::Read);
        }
    }
    actions
}

fn plan_since(extents: &[Extent], size: u64, block_size: u32, n: usize, old: u64) -> Vec<BlockAction> {
    let bs = block_size as u64;
    let range = |b: usize| {
        let s = b as u64 * bs;
        (s, (s + bs).min(size))
    };
    let mut actions = vec![BlockAction::Inherit; n];
    for (b, a) in actions.iter_mut().enumerate() {
        let (s, t) = range(b);
        if s >= old {
            *a = BlockAction::Zero; // grown: never written, reads as zeros
        } else if (s + bs).min(old) != t {
            *a = BlockAction::Read; // its length changed with the resize
        }
    }

    // Gone ranges inside the old size (past it everything is zero anyway),
    // merged so that overlapping reports are not counted twice.
    let live = old.min(size);
    let mut gone: Vec<(u64, u64)> =
        extents.iter().filter(|e| e.kind == ExtentKind::Gone).filter_map(|e| clamp(e, live)).collect();
    gone.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(gone.len());
    for (s, t) in gone {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(t),
            _ => merged.push((s, t)),
        }
    }
    // Per touched block: zero when gone and grown bytes cover all of it,
    // else read (the rest of the block may hold data). `merged` is sorted,
    // so the blocks come in order and each block's bytes are summed in a run.
    let mut cur: Option<(usize, u64)> = None;
    let settle = |actions: &mut [BlockAction], b: usize, gone_bytes: u64| {
        let (s, t) = range(b);
        let grown = t.saturating_sub(s.max(old));
        actions[b] = if gone_bytes + grown >= t - s { BlockAction::Zero } else { BlockAction::Read };
    };
    for &(s, t) in &merged {
        for b in blocks(s, t, bs) {
            let (bs_, bt) = range(b);
            let bytes = t.min(bt) - s.max(bs_);
            cur = match cur {
                Some((cb, sum)) if cb == b => Some((b, sum + bytes)),
                Some((cb, sum)) => {
                    settle(&mut actions, cb, sum);
                    Some((b, bytes))
                }
                None => Some((b, bytes)),
            };
        }
    }
    if let Some((cb, sum)) = cur {
        settle(&mut actions, cb, sum);
    }

    // Changed ranges are read, whatever else was said about their blocks.
    for e in extents.iter().filter(|e| e.kind == ExtentKind::Changed) {
        if let Some((s, t)) = clamp(e, size) {
            actions[blocks(s, t, bs)].fill(BlockAction::Read);
        }
    }
    actions
}

/// The naive reference model of the module docs, byte by byte: what the
/// property tests and the `planner` fuzz target check [`plan`] against.
/// Only for small images (it allocates a byte per image byte).
#[doc(hidden)]
pub mod model {
    use super::{BlockAction, Changes, ExtentKind};

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Byte {
        Unreported,
        Changed,
        Gone,
    }

    /// Expected actions for a version of `size` bytes; `old` is the parent's
    /// image size (unused for a full read). `block_size` must be > 0.
    pub fn expected(changes: &Changes, size: u64, block_size: u32, old: u64) -> Vec<BlockAction> {
        let (extents, full) = match changes {
            Changes::Full { extents, .. } => (extents, true),
            Changes::Since { extents } => (extents, false),
        };
        let mut bytes = vec![Byte::Unreported; size as usize];
        for e in extents {
            for i in e.off..e.off.saturating_add(e.len).min(size) {
                let b = &mut bytes[i as usize];
                *b = match (e.kind, *b) {
                    (ExtentKind::Changed, _) | (_, Byte::Changed) => Byte::Changed,
                    (ExtentKind::Gone, _) => Byte::Gone,
                };
            }
        }
        let bs = block_size as u64;
        let n = size.div_ceil(bs);
        (0..n)
            .map(|b| {
                let (s, t) = (b * bs, ((b + 1) * bs).min(size));
                let blk = &bytes[s as usize..t as usize];
                let any_changed = blk.contains(&Byte::Changed);
                if full {
                    return if any_changed { BlockAction::Read } else { BlockAction::Zero };
                }
                if any_changed {
                    return BlockAction::Read;
                }
                // zero: every byte gone, or past the old end
                let zero = (s..t).all(|i| i >= old || bytes[i as usize] == Byte::Gone);
                if zero {
                    return BlockAction::Zero;
                }
                let parent_len = if s < old { ((b + 1) * bs).min(old) - s } else { 0 };
                let untouched = blk.iter().all(|x| *x == Byte::Unreported);
                if untouched && parent_len == t - s {
                    BlockAction::Inherit
                } else {
                    BlockAction::Read
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use BlockAction::*;

    fn since(extents: Vec<Extent>) -> Changes {
        Changes::Since { extents }
    }

    fn parent(size: u64, bs: u32) -> BlockMap {
        BlockMap::new_zeroed(size, bs)
    }

    #[test]
    fn gone_extents_zero_whole_blocks_and_read_partial_ones() {
        // 50..250 of 400 bytes in 100-byte blocks: covers block 1, part of 0 and 2
        let p = plan(&since(vec![Extent::gone(50, 200)]), 400, 100, Some(&parent(400, 100))).unwrap();
        assert_eq!(p.actions, vec![Read, Zero, Read, Inherit]);
        // two gone extents that only together cover block 1
        let p = plan(&since(vec![Extent::gone(100, 40), Extent::gone(140, 60)]), 300, 100, Some(&parent(300, 100))).unwrap();
        assert_eq!(p.actions, vec![Inherit, Zero, Inherit]);
        // a changed extent wins over a gone one, whatever the order
        let p = plan(&since(vec![Extent::changed(120, 1), Extent::gone(100, 100)]), 300, 100, Some(&parent(300, 100))).unwrap();
        assert_eq!(p.actions, vec![Inherit, Read, Inherit]);
    }

    #[test]
    fn resize_edges_are_read_and_grown_space_is_zero() {
        // grown from 250 to 450 bytes: block 2 was short (50 bytes) and is read,
        // blocks 3 and 4 are new and zero
        let p = plan(&since(vec![]), 450, 100, Some(&parent(250, 100))).unwrap();
        assert_eq!(p.actions, vec![Inherit, Inherit, Read, Zero, Zero]);
        // shrunk from 400 to 250: block 2 is now short and is read
        let p = plan(&since(vec![]), 250, 100, Some(&parent(400, 100))).unwrap();
        assert_eq!(p.actions, vec![Inherit, Inherit, Read]);
        // shrunk to a block edge: nothing to read
        let p = plan(&since(vec![]), 200, 100, Some(&parent(400, 100))).unwrap();
        assert_eq!(p.actions, vec![Inherit, Inherit]);
    }

    #[test]
    fn full_read_reads_data_and_skips_holes() {
        let c = Changes::Full { extents: vec![Extent::changed(150, 100), Extent::gone(0, 100)], reason: FullReason::FirstBackup };
        let p = plan(&c, 450, 100, None).unwrap();
        assert_eq!(p.actions, vec![Zero, Read, Read, Zero, Zero]);
        assert!(p.full_read);
        // an extent running past the end is clamped (whole-object diffs)
        let c = Changes::Full { extents: vec![Extent::changed(400, 4096)], reason: FullReason::FirstBackup };
        assert_eq!(plan(&c, 450, 100, None).unwrap().actions, vec![Zero, Zero, Zero, Zero, Read]);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let full = Changes::Full { extents: vec![Extent::changed(u64::MAX - 1, u64::MAX)], reason: FullReason::FirstBackup };
        assert_eq!(plan(&full, 100, 0, None).unwrap_err(), PlanError::ZeroBlockSize);
        assert!(matches!(plan(&full, u64::MAX, 1, None), Err(PlanError::TooManyBlocks { .. })));
        assert_eq!(plan(&since(vec![]), 100, 10, None).unwrap_err(), PlanError::NoParent);
        assert!(matches!(plan(&since(vec![]), 100, 10, Some(&parent(100, 20))), Err(PlanError::ParentBlockSize { .. })));
        assert_eq!(plan(&full, 100, 10, None).unwrap().actions, vec![Zero; 10]);
    }

    /// Block sizes: powers of two and an odd one (every edge case of a short
    /// last block and of straddling extents shows up at small sizes).
    fn block_size() -> impl Strategy<Value = u32> {
        prop_oneof![Just(64u32), Just(100), Just(512), Just(4096)]
    }

    /// Random extents over `0..limit` (a little past the end too), in the
    /// styles the diffs produce: exact byte ranges, whole objects (aligned to
    /// an object size, possibly past the end), and discards.
    fn extents(limit: u64, object: u64) -> impl Strategy<Value = Vec<Extent>> {
        let exact = (0..limit + 64, 1..limit / 2 + 2, any::<bool>())
            .prop_map(|(off, len, gone)| if gone { Extent::gone(off, len) } else { Extent::changed(off, len) });
        let whole = (0..limit / object + 2, 1..3u64, any::<bool>()).prop_map(move |(o, k, gone)| {
            if gone {
                Extent::gone(o * object, k * object)
            } else {
                Extent::changed(o * object, k * object)
            }
        });
        proptest::collection::vec(prop_oneof![3 => exact, 1 => whole], 0..12)
    }

    fn case() -> impl Strategy<Value = (u32, u64, u64, u64, Vec<Extent>)> {
        // (block size, object size, old size, new size, extents)
        (block_size(), prop_oneof![Just(256u64), Just(4096)]).prop_flat_map(|(bs, object)| {
            let max = bs as u64 * 12 + 37;
            (Just(bs), Just(object), 0..max, 0..max).prop_flat_map(move |(bs, object, old, new)| {
                (Just(bs), Just(object), Just(old), Just(new), extents(new.max(old).max(1), object))
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// The planner agrees with the byte-by-byte model: discards and
        /// zeroed extents, grow and shrink, extents straddling block edges,
        /// whole-object and exact diffs.
        #[test]
        fn incremental_plan_matches_the_naive_model((bs, _object, old, size, ex) in case()) {
            let c = since(ex);
            let p = plan(&c, size, bs, Some(&parent(old, bs))).unwrap();
            prop_assert_eq!(&p.actions, &model::expected(&c, size, bs, old));
            prop_assert_eq!(p.map.len(), p.actions.len());
            prop_assert!(!p.full_read);
        }

        #[test]
        fn full_plan_matches_the_naive_model((bs, _object, _old, size, ex) in case()) {
            let c = Changes::Full { extents: ex, reason: FullReason::FirstBackup };
            let p = plan(&c, size, bs, None).unwrap();
            prop_assert_eq!(&p.actions, &model::expected(&c, size, bs, 0));
            prop_assert!(p.full_read);
            prop_assert!(p.map.entries().iter().all(Option::is_none));
        }

        /// The safety rule, stated on its own: a block an extent reported as
        /// gone touches is never inherited; one it covers only partly, with
        /// the rest neither gone nor grown, is read.
        #[test]
        fn a_gone_extent_is_never_unchanged((bs, _object, old, size, ex) in case()) {
            let c = since(ex.clone());
            let p = plan(&c, size, bs, Some(&parent(old, bs))).unwrap();
            let bsz = bs as u64;
            for (b, a) in p.actions.iter().enumerate() {
                let (s, t) = (b as u64 * bsz, ((b as u64 + 1) * bsz).min(size));
                let touched = ex.iter().any(|e| e.kind == ExtentKind::Gone && e.off < t && e.off.saturating_add(e.len) > s);
                if !touched {
                    continue;
                }
                prop_assert_ne!(*a, Inherit, "block {} touched by a gone extent is inherited", b);
                let all_zero = (s..t).all(|i| i >= old || ex.iter().any(|e| e.kind == ExtentKind::Gone && e.off <= i && i < e.off.saturating_add(e.len)));
                if !all_zero {
                    prop_assert_eq!(*a, Read, "partly gone block {} is not read", b);
                }
            }
        }

        /// Inherited entries are the parent's, and only inherited blocks
        /// keep an entry before the pipeline runs.
        #[test]
        fn inherited_blocks_keep_the_parents_entry((bs, _object, old, size, ex) in case()) {
            let mut pm = parent(old, bs);
            for b in 0..pm.len() {
                pm.set(b, Some(blockvault_store::ChunkId::of(&(b as u64).to_le_bytes())));
            }
            let p = plan(&since(ex), size, bs, Some(&pm)).unwrap();
            for (b, a) in p.actions.iter().enumerate() {
                if *a == Inherit {
                    prop_assert_eq!(p.map.get(b), pm.get(b));
                }
            }
        }
    }
}
