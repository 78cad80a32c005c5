#![forbid(unsafe_code)]
//! # blockvault-store
//!
//! The chunk store of blockvault: content-addressed, deduplicated chunks,
//! plus the block map and manifest of every backup. The store alone is
//! enough to restore any backup and to rebuild the catalog.
//!
//! ## Model
//! An image is cut into fixed, aligned blocks (a power of two from 64 KiB to
//! 4 MiB, fixed per image at its first backup). A block that is all zeros is
//! never stored: the block map marks it "zero". Every other block is a chunk
//! whose id is the blake3 hash of its plaintext; the chunk object holds the
//! zstd-compressed payload (or the raw bytes when compression does not help)
//! behind a checked header (see [`format`]).
//!
//! ## Layout of a store directory
//! ```text
//! blockvault-store.json        format version, uuid, hash, codec, default block size
//! chunks/<4 hex>/<64 hex>      chunk objects, never rewritten once present
//! backups/<id:012>.blockmap    block map of backup <id>
//! backups/<id:012>.json        manifest of backup <id>; written last
//! backups/<id:012>.protected   empty marker: backup <id> is protected from pruning
//! tmp/                         temp files of chunk writes in progress
//! locks/                       flock(2) files
//! ```
//!
//! ## Durability order of a backup
//! 1. each new chunk: temp file, fsync, rename into `chunks/` ([`Store::put_chunk`]);
//! 2. fsync of every chunk directory that received one ([`Store::sync`]);
//! 3. block map, then manifest: temp file, fsync, rename, fsync of `backups/`
//!    ([`Store::write_backup`]);
//! 4. the catalog row is switched to committed (by the agent).
//!
//! A crash before 3 leaves only unreferenced chunks (removed by GC after its
//! grace period) and temp files (removed by the next run). A crash between 3
//! and 4 leaves a complete backup in the store that the catalog still calls
//! running; the next run rolls it forward. Invariant: a manifest exists only
//! when every chunk its block map references is durable.
//!
//! ## Locking rules
//! * `locks/store.lock` (flock): backups, prunes and restores hold it
//!   **shared** for their whole run; GC's sweep holds it **exclusive**.
//! * `locks/<name>.lock`: one exclusive lock per image, held by the backup
//!   of that image, so two runs of one image never overlap.
//! * `tmp/` is emptied only under the exclusive store lock.
//!
//! See the `gc` module for why GC cannot delete a chunk that a committing
//! backup references.

pub mod blockmap;
pub mod chunk;
pub mod error;
pub mod format;
pub mod id;
pub mod manifest;
pub mod store;

pub use blockmap::BlockMap;
pub use chunk::EncodedChunk;
pub use error::{Error, Result};
pub use id::{BackupId, ChunkId};
pub use manifest::{BackupStats, Manifest, RbdInfo};
pub use store::{InitOptions, Store, StoreLock, StoreMeta};
