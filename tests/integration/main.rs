//! Integration tests: the `blockvault` binary on real files (and, in
//! `rbd`, on a real Ceph cluster).

mod common;
mod compat;
mod crash;
mod daemon;
mod errors;
mod exportdiff;
mod fs_safety;
mod gc_verify;
mod lost_chunk;
mod operator;
mod prune;
mod qcow2;
mod rbd;
mod restore_image;
mod roundtrip;
mod run;
mod store_truth;
