//! blockvault's engine as a library: incremental, deduplicating backups of
//! Ceph RBD images and local disk images. The `blockvault` binary
//! (`main.rs`) is a thin shell over [`cli`].
//!
//! The path of a backup through the tree:
//! [`config`] names the images → [`backup`] runs one backup, top to bottom,
//! of a [`source`] (a file, or an RBD image through the bindings in [`rbd`])
//! → [`plan`] turns what changed into per-block actions (pure) →
//! [`pipeline`] reads, hashes, compresses and stores chunks in the
//! `blockvault-store` crate, on worker threads from [`pool`] → the backup is
//! committed to the store, then to the `blockvault-catalog` crate. [`restore`], [`verify`], [`prune`] and
//! [`rebuild`] work on committed backups; [`daemon`] and [`job`] schedule
//! them.

pub mod backup;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod context;
pub mod copy;
pub mod daemon;
pub mod diffstream;
pub mod error;
pub mod gc;
pub mod group;
pub mod hook;
pub mod job;
pub mod keys;
pub mod logging;
pub mod lookup;
pub mod metrics;
pub mod parent_check;
pub mod pipeline;
pub mod plan;
pub mod pool;
pub mod progress;
pub mod prune;
pub mod rbd;
pub mod rebuild;
pub mod release;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod serve;
pub mod source;
pub mod throttle;
pub mod verify;

// issue 14 (operator polish, part 2)
pub mod annotate;
pub mod maintenance;
pub mod notify;
pub mod stats;
