//! Ceph RBD access for the agent: the safe API of the `blockvault-ceph`
//! crate (librados and librbd loaded at run time; all `unsafe` code is in
//! that crate's FFI module), re-exported so the RBD source, restore and
//! verify reach it as `crate::rbd`.

pub use blockvault_ceph::*;
