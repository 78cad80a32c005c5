//! The backup planner (`blockvault::plan::plan`) against the naive
//! byte-by-byte reference model (`blockvault::plan::model`). Properties:
//! * the plan has one action per block and equals the model's, for
//!   incrementals (grow, shrink, discards, straddling and overlapping
//!   extents, extents past the end) and for full reads;
//! * an extent reported as gone is never inherited; a partly gone block is
//!   read (the model encodes it; checked here on its own too);
//! * bad input (block size 0) is an error, never a panic.
//!
//! Input: byte 0 picks the block size (0 = the error case), bytes 1..5 the
//! parent's and the new image size (at most 64 KiB each, so the model stays
//! cheap), byte 5 full read or incremental, then 5 bytes per extent: offset
//! and length (u16, scaled by 3 so they reach past the end) and its kind.
#![no_main]

use blockvault::plan::{model, plan, BlockAction, Changes, Extent, ExtentKind, FullReason, PlanError};
use blockvault_store::BlockMap;
use libfuzzer_sys::fuzz_target;

const BLOCK_SIZES: [u32; 8] = [0, 1, 7, 64, 100, 512, 4096, 65536];

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let bs = BLOCK_SIZES[data[0] as usize % BLOCK_SIZES.len()];
    let old = u16::from_le_bytes([data[1], data[2]]) as u64;
    let size = u16::from_le_bytes([data[3], data[4]]) as u64;
    let full = data[5] & 1 == 1;
    let extents: Vec<Extent> = data[6..]
        .chunks_exact(5)
        .map(|c| {
            let off = u16::from_le_bytes([c[0], c[1]]) as u64 * 3 / 2;
            let len = u16::from_le_bytes([c[2], c[3]]) as u64 * 3 / 2;
            if c[4] & 1 == 1 {
                Extent::gone(off, len)
            } else {
                Extent::changed(off, len)
            }
        })
        .collect();
    let changes = if full {
        Changes::Full { extents: extents.clone(), reason: FullReason::FirstBackup }
    } else {
        Changes::Since { extents: extents.clone() }
    };
    if bs == 0 {
        let parent = BlockMap::new_zeroed(old, 512);
        assert_eq!(plan(&changes, size, bs, Some(&parent)), Err(PlanError::ZeroBlockSize));
        return;
    }
    let parent = BlockMap::new_zeroed(old, bs);
    let p = plan(&changes, size, bs, Some(&parent)).expect("valid input plans");
    assert_eq!(p.actions.len() as u64, size.div_ceil(bs as u64));
    assert_eq!(p.full_read, full);
    assert_eq!(p.actions, model::expected(&changes, size, bs, old), "plan differs from the model");
    if !full {
        let bsz = bs as u64;
        for (b, a) in p.actions.iter().enumerate() {
            let (s, t) = (b as u64 * bsz, ((b as u64 + 1) * bsz).min(size));
            let gone = |i: u64| extents.iter().any(|e| e.kind == ExtentKind::Gone && e.off <= i && i < e.off + e.len);
            if (s..t).any(gone) {
                assert_ne!(*a, BlockAction::Inherit, "block {b} touched by a gone extent is inherited");
                if !(s..t).all(|i| i >= old || gone(i)) && *a != BlockAction::Read {
                    panic!("partly gone block {b} is not read");
                }
            }
        }
    }
});
