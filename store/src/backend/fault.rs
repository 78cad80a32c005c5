//! A fault-injecting wrapper around any backend, to test the layers above
//! it: fails the Nth operation with `ENOSPC` or `EIO` (once, or that one
//! and every later one, as a dead disk does), or tears the first write at
//! or after the Nth operation (the write stops half-way and fails).
//!
//! Operations are counted from 1 across every method that can fail, reads
//! and lock calls included, so sweeping N from 1 to the count of a clean
//! run puts a failure at every step of it. A crash is dropping the store
//! (and this wrapper) without a sync, then opening the inner backend's
//! stored state again (for [`super::memory::MemoryBackend`], with
//! `reopen`).
//!
//! The model is redb's `FuzzerBackend` (a countdown of writes) and its
//! crash tests (only what was synced survives); the fault is injected
//! before the inner call, except a tear, which the inner backend carries
//! out ([`Backend::put_chunk_torn`]) so that it leaves behind exactly what
//! a real half-done write leaves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{injected, Backend, ChunkEntry, LockMode, StoreLock};
use crate::error::{Error, Result};
use crate::ChunkId;

/// What to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// `ENOSPC`.
    NoSpace,
    /// `EIO`.
    Io,
    /// A write (chunk or object) that stops after half its bytes and fails
    /// with `ENOSPC`; the first write at or after the planned operation.
    Tear,
    /// The process dies at the planned operation: it and every later one
    /// fail with `EIO` and reach nothing, and [`Backend::discard_pending`]
    /// does nothing (a dead process cleans nothing up). Drop the store
    /// afterwards and open the inner backend's state again.
    Crash,
}

/// When and what to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    /// 1-based number of the operation that fails.
    pub at: u64,
    pub kind: FaultKind,
    /// Every operation after `at` fails too (always for `Crash`, never for
    /// `Tear`).
    pub sticky: bool,
}

/// Shared control of a [`FaultBackend`]: the plan, and what happened.
#[derive(Debug, Default)]
pub struct FaultControl {
    ops: AtomicU64,
    plan: Mutex<Option<FaultPlan>>,
    fired: Mutex<Option<(u64, &'static str)>>,
    log: Mutex<Vec<&'static str>>,
}

impl FaultControl {
    /// Arms a fault, counting operations from now.
    pub fn arm(&self, plan: FaultPlan) {
        self.ops.store(0, Ordering::SeqCst);
        *self.fired.lock().unwrap() = None;
        self.log.lock().unwrap().clear();
        *self.plan.lock().unwrap() = Some(plan);
    }

    /// Counts operations from now, with no fault planned.
    pub fn reset(&self) {
        self.ops.store(0, Ordering::SeqCst);
        *self.fired.lock().unwrap() = None;
        self.log.lock().unwrap().clear();
        *self.plan.lock().unwrap() = None;
    }

    /// Names of the operations counted since the last arm or reset, in
    /// order: entry `i` is operation `i + 1`. Writes are `put chunk` and
    /// `write`.
    pub fn log(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }

    /// True when a planned crash has happened.
    pub fn crashed(&self) -> bool {
        matches!(*self.plan.lock().unwrap(), Some(FaultPlan { kind: FaultKind::Crash, .. })) && self.fired().is_some()
    }

    /// No fault from now on (the count goes on).
    pub fn disarm(&self) {
        *self.plan.lock().unwrap() = None;
    }

    /// Operations counted since the last [`FaultControl::arm`] (or since
    /// the start).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Number and name of the operation that got the (first) fault.
    pub fn fired(&self) -> Option<(u64, &'static str)> {
        *self.fired.lock().unwrap()
    }

    fn decide(&self, op: &'static str, is_write: bool) -> Decision {
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        self.log.lock().unwrap().push(op);
        let Some(plan) = *self.plan.lock().unwrap() else { return Decision::Pass };
        let mut fired = self.fired.lock().unwrap();
        let hit = match plan.kind {
            FaultKind::Tear => is_write && n >= plan.at && fired.is_none(),
            FaultKind::Crash => n >= plan.at,
            _ => n == plan.at || (plan.sticky && n > plan.at),
        };
        if !hit {
            return Decision::Pass;
        }
        fired.get_or_insert((n, op));
        match plan.kind {
            FaultKind::NoSpace => Decision::Fail(rustix::io::Errno::NOSPC),
            FaultKind::Io | FaultKind::Crash => Decision::Fail(rustix::io::Errno::IO),
            FaultKind::Tear => Decision::Tear,
        }
    }
}

enum Decision {
    Pass,
    Fail(rustix::io::Errno),
    Tear,
}

/// Wraps a backend and injects the faults its [`FaultControl`] plans.
pub struct FaultBackend<B> {
    inner: B,
    control: Arc<FaultControl>,
}

impl<B: Backend> FaultBackend<B> {
    /// Wraps `inner`, with no fault planned.
    pub fn new(inner: B) -> FaultBackend<B> {
        FaultBackend { inner, control: Arc::new(FaultControl::default()) }
    }

    /// The control of this wrapper, to arm faults and read what happened.
    pub fn control(&self) -> Arc<FaultControl> {
        self.control.clone()
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn chunk_name(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.inner.location().join("chunks").join(&h[..4]).join(h)
    }

    /// Fails with the planned error when this operation is the one.
    fn gate(&self, op: &'static str, what: impl FnOnce() -> PathBuf) -> Result<()> {
        match self.control.decide(op, false) {
            Decision::Pass | Decision::Tear => Ok(()),
            Decision::Fail(errno) => Err(injected(what(), op, errno)),
        }
    }
}

impl<B: Backend> Backend for FaultBackend<B> {
    fn location(&self) -> &Path {
        self.inner.location()
    }

    fn dir(&self) -> Option<&Path> {
        self.inner.dir()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn object_name(&self, key: &str) -> PathBuf {
        self.inner.object_name(key)
    }

    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        self.gate("stat", || self.chunk_name(id))?;
        self.inner.chunk_exists(id)
    }

    fn chunk_group_stamp(&self, prefix: u16) -> Result<Option<u128>> {
        self.gate("stamp", || self.inner.location().join("chunks").join(format!("{prefix:04x}")))?;
        self.inner.chunk_group_stamp(prefix)
    }

    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        match self.control.decide("put chunk", true) {
            Decision::Pass => self.inner.put_chunk(id, bytes),
            Decision::Fail(errno) => Err(injected(self.chunk_name(id), "put chunk", errno)),
            Decision::Tear => Err(self.inner.put_chunk_torn(id, bytes, bytes.len() / 2)),
        }
    }

    fn sync(&self) -> Result<()> {
        self.gate("sync", || self.inner.location().to_path_buf())?;
        self.inner.sync()
    }

    fn staged_bytes(&self) -> u64 {
        self.inner.staged_bytes()
    }

    fn sync_early(&self) -> Result<()> {
        self.gate("sync", || self.inner.location().to_path_buf())?;
        self.inner.sync_early()
    }

    fn discard_pending(&self) {
        if !self.control.crashed() {
            self.inner.discard_pending()
        }
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.gate("read", || self.chunk_name(id))?;
        self.inner.get_chunk(id, out)
    }

    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
        self.gate("list chunks", || self.inner.location().join("chunks"))?;
        self.inner.list_chunks()
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.gate("remove", || self.chunk_name(id))?;
        self.inner.delete_chunk(id)
    }

    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        self.gate("touch", || self.chunk_name(id))?;
        self.inner.touch_chunk(id)
    }

    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        self.gate("stat", || self.chunk_name(id))?;
        self.inner.chunk_modified(id)
    }

    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        self.gate("rename", || self.chunk_name(id))?;
        self.inner.quarantine_chunk(id)
    }

    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.gate("read", || self.inner.object_name(key))?;
        self.inner.get_object(key, limit)
    }

    fn object_exists(&self, key: &str) -> Result<bool> {
        self.gate("stat", || self.inner.object_name(key))?;
        self.inner.object_exists(key)
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        match self.control.decide("write", true) {
            Decision::Pass => self.inner.put_object(key, bytes),
            Decision::Fail(errno) => Err(injected(self.inner.object_name(key), "write", errno)),
            Decision::Tear => Err(self.inner.put_object_torn(key, bytes, bytes.len() / 2)),
        }
    }

    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        match self.control.decide("write", true) {
            Decision::Pass => self.inner.create_object(key, bytes),
            Decision::Fail(errno) => Err(injected(self.inner.object_name(key), "write", errno)),
            // a torn exclusive create leaves no new object, as a torn replace keeps the old one
            Decision::Tear => Err(self.inner.put_object_torn(key, bytes, bytes.len() / 2)),
        }
    }

    fn delete_object(&self, key: &str) -> Result<bool> {
        self.gate("remove", || self.inner.object_name(key))?;
        self.inner.delete_object(key)
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        self.gate("read directory", || self.inner.object_name(prefix))?;
        self.inner.list_objects(prefix)
    }

    fn remove_temp_files(&self) -> Result<usize> {
        self.gate("remove temp files", || self.inner.location().join("tmp"))?;
        self.inner.remove_temp_files()
    }

    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        self.gate("lock", || self.inner.location().join("locks").join(format!("{name}.lock")))?;
        self.inner.lock(name, mode, wait)
    }

    fn lock_holder(&self, name: &str) -> Result<Option<String>> {
        self.inner.lock_holder(name)
    }

    fn put_chunk_torn(&self, id: &ChunkId, bytes: &[u8], keep: usize) -> Error {
        self.inner.put_chunk_torn(id, bytes, keep)
    }

    fn put_object_torn(&self, key: &str, bytes: &[u8], keep: usize) -> Error {
        self.inner.put_object_torn(key, bytes, keep)
    }
}
