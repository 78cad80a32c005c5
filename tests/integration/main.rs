//! Integration tests: the `blockvault` binary on real files (and, in
//! `rbd`, on a real Ceph cluster).

mod common;
mod compat;
mod crash;
mod daemon;
mod encryption;
mod errors;
mod exportdiff;
mod fs_safety;
mod gc_verify;
mod lost_chunk;
mod operator;
mod prune;
mod rados_store;
mod qcow2;
mod rbd;
mod rbd_scattered;
mod restore_image;
mod roundtrip;
mod run;
mod serve;
mod s3;
mod s3_agent;
mod store_truth;
