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
//! ## Backends
//! The store keeps its objects on a [`Backend`] ([`backend`]): chunks
//! (put-if-absent, visible only when complete and durable), metadata
//! objects replaced atomically (store meta, block maps, manifests,
//! markers), and the locks below. [`Store`], block maps, manifests and
//! [`gc`] are written against the trait and touch no file. The directory
//! backend ([`backend::dir`], what [`Store::open`] and [`Store::init`]
//! use) keeps the layout below; [`backend::memory`] keeps a store in
//! process and [`backend::fault`] injects I/O errors, torn writes and
//! crashes into any backend, for tests ([`Store::with_backend`]).
//!
//! ## Encrypted stores
//! A store made with [`Store::init_encrypted`] (format 2) seals every
//! object but its meta with XChaCha20-Poly1305, the object's name as
//! associated data, through [`backend::sealed::SealedBackend`] over any
//! backend; chunk ids are blake3 keyed with a key derived from the store's
//! data key ([`ChunkHasher`]), so the same data in two stores has unrelated
//! ids. The meta stays plain (it tells how to unlock: key check, key
//! slots, Argon2id settings) and is authenticated by a MAC once unlocked.
//! Keys, key files and slots: [`crypto`]. The layout below is the same,
//! and so are the names; objects are [`crypto::SEAL_OVERHEAD`] bytes
//! longer. [`Store::raw_backend`] gives the sealed objects as they are.
//!
//! ## Layout of a store directory
//! ```text
//! blockvault-store.json        format version, uuid, hash, codec, default block size
//! chunks/<4 hex>/<64 hex>      chunk objects, never rewritten once present
//! chunks/<4 hex>/<64 hex>.bad  a chunk that verify found corrupt, moved aside
//! backups/<id:012>.blockmap    block map of backup <id>
//! backups/<id:012>.json        manifest of backup <id>; written last
//! backups/<id:012>.protected   empty marker: backup <id> is protected from pruning
//! backups/<id:012>.verify      JSON {"state":"ok"|"invalid","at":...,"reason":...}: the
//!                              last verify of backup <id> (none: unverified); see [`verify_mark`]
//! backups/<id:012>.labels      JSON {"labels":{k:v},"note":...}: labels and note of backup
//!                              <id> (none: neither); see [`annotations`]
//! backups/<id:012>.claim       JSON {host, pid, at}: id <id> was handed out (put-if-absent,
//!                              never removed), see [`Store::claim_backup_id`]
//! tmp/                         temp files of chunk writes in progress
//! locks/                       flock(2) files
//! ```
//!
//! ## Durability order of a backup
//! 1. each new chunk is written to a temp file in `tmp/` ([`Store::put_chunk`]);
//! 2. a flush (every 1 GiB of new chunks, and in [`Store::sync`]): `syncfs`,
//!    so every temp file's bytes are durable, then each is renamed into
//!    `chunks/` (never over an existing chunk), then `syncfs` again so the
//!    renames are durable. A chunk appears in `chunks/` only once its bytes
//!    are on disk, so no later backup can deduplicate against a torn chunk;
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
//!   A backup takes it before it reads its parent's block map or looks up
//!   a chunk, and lets go only after its manifest (and catalog row) are
//!   written: everything it learns about which chunks exist stays true
//!   until its manifest protects them. `verify` holds it shared while it
//!   checks.
//! * `locks/<name>.lock`: one exclusive lock per image, held by the backup
//!   of that image, so two runs of one image never overlap.
//!   `locks/gc.lock`: held by a GC run, so GCs run one at a time.
//! * Under the exclusive store lock, and only then: chunks are removed
//!   (GC) or moved aside as `.bad` (verify); `tmp/` and the `backups/.*`
//!   temp files are emptied; block maps, protection and verify markers
//!   without a manifest are removed. No writer runs then, so all of those belong to
//!   dead processes or to backups that no longer exist.
//! * A holder of the shared lock never waits for the exclusive one
//!   ([`Store::clean_tmp`] only tries it; verify lets go of the shared lock
//!   before it waits), so a waiting GC gets the lock once the running jobs
//!   end.
//!
//! ## Shared stores: many hosts, one store (RADOS)
//! A store in a RADOS pool (`backend::rados`, feature `rados`; `[store] url = "rados:POOL/NS"`)
//! is shared by the agents of many hosts. The rules above hold across hosts,
//! with leases instead of `flock`:
//! * every lock (`store` shared/exclusive, `gc`, `image-<name>`) is a
//!   cls_lock advisory lock on the object `locks/<name>`, held for a lease
//!   (`[store] lock-lease`, default 30 s) that the holder's [`StoreLock`]
//!   renews every third of the lease. The OSD expires a lease by its own
//!   clock: host clocks play no part. A holder that dies (kill -9, crash,
//!   cut off) keeps the lock until its lease runs out, and nobody gets it
//!   before then; a waiter or a refused caller names the holder's host and
//!   pid (its lock cookie).
//! * a holder whose lease ran out unrenewed (paused, or cut off from the
//!   cluster, for longer than the lease) finds its lock marked lost: a backup
//!   checks that before it writes its manifest, GC before each removal
//!   ([`StoreLock::ensure_held`]), and both stop. This is what keeps the
//!   argument below true when a lease is lost: a backup that lost its shared
//!   lock never commits a manifest naming chunks a GC may have swept, and a
//!   GC that lost its exclusive lock removes nothing more.
//! * backup ids are allocated in the store, not by a host's catalog:
//!   [`Store::claim_backup_id`] creates `backups/<id>.claim` exclusively
//!   (put-if-absent), probing upwards from the catalog's highest id + 1 and
//!   skipping any id that already has a claim or other file in `backups/`;
//!   after a few misses (a catalog far behind the store) it lists `backups/`
//!   and starts above every id there. Two agents that race for one id get
//!   two ids. Claims are never removed, so an id is never reused.
//! * a chunk is written by one exclusive-create operation with its whole
//!   content: two hosts writing the same chunk at once get one object, never
//!   a torn or replaced one.
//!
//! ### The GC-versus-prune race, across hosts
//! Proxmox Backup Server lost referenced chunks when a prune removed an index
//! while GC was marking, and a backup then reused chunks from that index
//! after the mark had passed: GC swept chunks a new backup referenced. Here
//! GC's live set is built from manifests, and the backup that reuses a
//! chunk (one it found in a parent block map or by `chunk_exists`) holds the
//! store lock shared from before it first relies on that chunk until its
//! manifest is written. GC re-reads manifests and sweeps only with the lock
//! exclusive, so every such backup has either written its manifest (read at
//! GC step 4, its chunks are live) or not yet looked at any chunk (it will
//! see only what survives; a parent pruned meanwhile still has its chunks
//! until the sweep, and the backup rewrites a chunk it finds missing). A
//! prune on another host removes a manifest, never a chunk, so it cannot
//! make a chunk a running backup relies on disappear: only the sweep removes
//! chunks, and the sweep waits for every shared holder on every host. The
//! leases make "holds the lock" true across hosts, and a lost lease stops
//! its holder before it acts on stale knowledge (above).
//!
//! ## Shared stores on S3
//! [`backend::s3`] keeps the same keys as objects in a bucket (under an
//! optional prefix). An S3 PUT is atomic, so every object, chunk or
//! manifest, is visible whole or not at all and there are no temp objects;
//! chunks are written with `If-None-Match: *` and never replaced. Locks are
//! leases ([`backend::lease`]): `locks/<name>/x.<generation>` objects won
//! by conditional create (exclusive) and `locks/<name>/s.<token>` objects
//! (shared), each naming holder, host and pid, renewed by a thread the
//! [`StoreLock`] owns and taken over only after they expire. The rules
//! above hold across hosts with "flock" read as "lease": a backup on any
//! host holds the `store` lease shared from before it relies on a chunk
//! until its manifest is written, and GC's sweep holds it exclusive, so
//! the GC safety argument of [`gc`] carries over unchanged; it adds one
//! assumption, that a holder's lease does not run out while it works
//! (renewals every third of the lease; clocks within a fraction of it).
//!
//! ## Garbage collection
//! A chunk is live when the block map of a backup whose manifest is in
//! `backups/` references it; the catalog plays no part, so a backup that
//! is durable in the store but not yet committed in the catalog is live.
//! GC ([`gc`]) builds the live set and lists the chunks without a lock,
//! then takes the store lock exclusive, adds the block maps of backups that
//! committed meanwhile, and removes unreferenced chunks older than a grace
//! period (default 24 h). Safety does not rest on the grace period or on
//! mtimes but on the lock: a backup holds it shared from before it first
//! relies on a chunk existing until its manifest is written, so at the
//! sweep every backup has either committed (and is read) or not started
//! (and will only see what survives). The full argument, including the
//! prune/GC race that lost chunks in Proxmox Backup Server, is in [`gc`].

pub mod backend;
pub mod blockmap;
pub mod chunk;
pub mod crypto;
pub mod error;
pub mod format;
pub mod gc;
pub mod id;
pub mod manifest;
pub mod store;
pub mod url;
pub mod verify_mark;
pub mod annotations;

pub use backend::{Backend, LockMode};
pub use blockmap::BlockMap;
pub use chunk::EncodedChunk;
pub use error::{Error, Result};
pub use id::{BackupId, ChunkId};
pub use manifest::{BackupStats, Manifest, RbdInfo, SetRef};
pub use id::ChunkHasher;
pub use store::{read_meta, ChunkChecker, IndexAhead, InitOptions, NewKey, ReadyChunk, Store, StoreLock, StoreMeta, Unlock};
pub use url::StoreUrl;
pub use verify_mark::{Recheck, VerifyMark, VerifyResult};
pub use annotations::Annotations;
