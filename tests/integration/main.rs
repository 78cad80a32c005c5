//! Integration tests: the `blockvault` binary on real files (and, in
//! `rbd`, on a real Ceph cluster).

mod common;
mod crash;
mod daemon;
mod errors;
mod fs_safety;
mod gc_verify;
mod prune;
mod rbd;
mod roundtrip;
mod run;
