//! Integration tests: the `blockvault` binary on real files (and, in
//! `rbd`, on a real Ceph cluster).

mod common;
mod compat;
mod clones;
mod crash;
mod daemon;
mod encryption;
mod errors;
mod exportdiff;
mod fs_safety;
mod gc_verify;
mod groups;
mod hooks;
mod lost_chunk;
mod operator;
mod polish;
mod prune;
mod rados_store;
mod qcow2;
mod rbd;
mod rbd_ahead;
mod rbd_scattered;
mod restore_image;
mod roundtrip;
mod run;
mod serve;
mod shared_store;
mod s3;
mod s3_agent;
mod store_faults;
mod store_truth;
