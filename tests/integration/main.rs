//! Integration tests: the `blockvault` binary on real files (and, in
//! `rbd`, on a real Ceph cluster).

mod common;
mod crash;
mod errors;
mod gc_verify;
mod rbd;
mod roundtrip;
