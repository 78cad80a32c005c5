//! An in-memory backend, for tests: the same promises as the directory
//! backend, in process.
//!
//! The stored objects live in a state shared by every handle made with
//! [`MemoryBackend::reopen`], as a directory is shared by the processes
//! that open it; what a handle has staged (its pending chunks) is its own,
//! as a process's is. Dropping a handle without [`Backend::sync`] is a
//! crash: its staged chunks are lost, their temp objects stay until
//! [`Backend::remove_temp_files`]. [`MemoryBackend::fork`] copies the
//! stored state, to run many trials from one starting point.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use super::{Backend, ChunkEntry, LockMode, StoreLock};
use crate::error::{Error, Result};
use crate::ChunkId;

/// A handle on an in-memory store.
pub struct MemoryBackend {
    shared: Arc<Shared>,
    location: PathBuf,
    /// Staged chunks of this handle: (temp object, chunk).
    pending: Mutex<Vec<(u64, ChunkId)>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    locks: Mutex<HashMap<String, Held>>,
    lock_released: Condvar,
}

#[derive(Clone, Default)]
struct State {
    chunks: HashMap<ChunkId, (Vec<u8>, SystemTime)>,
    quarantined: HashMap<ChunkId, Vec<u8>>,
    objects: BTreeMap<String, Vec<u8>>,
    /// Temp objects: staged chunks, and what torn writes left.
    tmp: BTreeMap<u64, Vec<u8>>,
    next_tmp: u64,
}

#[derive(Default)]
struct Held {
    shared: usize,
    exclusive: bool,
}

/// Keeps a memory lock held; releases it on drop.
struct MemLockGuard {
    shared: Arc<Shared>,
    name: String,
    mode: LockMode,
}

impl Drop for MemLockGuard {
    fn drop(&mut self) {
        let mut locks = self.shared.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = locks.get_mut(&self.name) {
            match self.mode {
                LockMode::Shared => h.shared -= 1,
                LockMode::Exclusive => h.exclusive = false,
            }
        }
        self.shared.lock_released.notify_all();
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

impl MemoryBackend {
    /// An empty store (not yet initialised: see [`crate::Store::init_with_backend`]).
    pub fn new() -> MemoryBackend {
        MemoryBackend::with_shared(Arc::new(Shared::default()))
    }

    fn with_shared(shared: Arc<Shared>) -> MemoryBackend {
        MemoryBackend { shared, location: PathBuf::from("memory:"), pending: Mutex::new(Vec::new()) }
    }

    /// Another handle on the same stored objects and locks, with nothing
    /// staged: what a second process opening the store gets.
    pub fn reopen(&self) -> MemoryBackend {
        MemoryBackend::with_shared(self.shared.clone())
    }

    /// An independent copy of the stored objects (staged chunks of any
    /// handle are not copied; locks are not held in the copy).
    pub fn fork(&self) -> MemoryBackend {
        let state = self.state().clone();
        MemoryBackend::with_shared(Arc::new(Shared { state: Mutex::new(state), ..Shared::default() }))
    }

    /// Number of temp objects (staged chunks and leftovers of torn writes).
    pub fn temp_objects(&self) -> usize {
        self.state().tmp.len()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves no half-done update: each
        // operation changes the maps in one step.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn chunk_name(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.location.join("chunks").join(&h[..4]).join(h)
    }

    fn tmp_name(&self, n: u64) -> PathBuf {
        self.location.join("tmp").join(n.to_string())
    }

    fn stage(&self, bytes: &[u8]) -> u64 {
        let mut st = self.state();
        let n = st.next_tmp;
        st.next_tmp += 1;
        st.tmp.insert(n, bytes.to_vec());
        n
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> &Path {
        &self.location
    }

    fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.state().chunks.contains_key(id))
    }

    fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        if self.chunk_exists(id)? {
            return Ok(false);
        }
        let n = self.stage(bytes);
        self.pending.lock().unwrap().push((n, *id));
        Ok(true)
    }

    fn sync(&self) -> Result<()> {
        let staged = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut st = self.state();
        for (n, id) in staged {
            // removed by `remove_temp_files` meanwhile: as a rename of a
            // vanished temp file fails
            let Some(bytes) = st.tmp.remove(&n) else {
                return Err(Error::io("rename", self.tmp_name(n), std::io::ErrorKind::NotFound.into()));
            };
            st.chunks.entry(id).or_insert((bytes, SystemTime::now()));
        }
        Ok(())
    }

    fn discard_pending(&self) {
        let staged = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut st = self.state();
        for (n, _) in staged {
            st.tmp.remove(&n);
        }
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        let st = self.state();
        let (bytes, _) = st.chunks.get(id).ok_or(Error::ChunkMissing { id: *id })?;
        let n = usize::try_from(crate::format::MAX_CHUNK_OBJECT_LEN + 1).unwrap_or(usize::MAX);
        out.clear();
        out.extend_from_slice(&bytes[..bytes.len().min(n)]);
        Ok(())
    }

    fn list_chunks(&self) -> Result<Vec<ChunkEntry>> {
        Ok(self.state().chunks.iter().map(|(id, (b, t))| (*id, b.len() as u64, *t)).collect())
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.state().chunks.remove(id);
        Ok(())
    }

    fn touch_chunk(&self, id: &ChunkId) -> Result<()> {
        match self.state().chunks.get_mut(id) {
            Some((_, t)) => {
                *t = SystemTime::now();
                Ok(())
            }
            None => Err(Error::ChunkMissing { id: *id }),
        }
    }

    fn chunk_modified(&self, id: &ChunkId) -> Result<Option<SystemTime>> {
        Ok(self.state().chunks.get(id).map(|(_, t)| *t))
    }

    fn quarantine_chunk(&self, id: &ChunkId) -> Result<Option<PathBuf>> {
        let mut st = self.state();
        let Some((bytes, _)) = st.chunks.remove(id) else { return Ok(None) };
        st.quarantined.insert(*id, bytes);
        let p = self.chunk_name(id);
        Ok(Some(p.with_file_name(format!("{id}.bad"))))
    }

    fn get_object(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let n = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX);
        Ok(self.state().objects.get(key).map(|b| b[..b.len().min(n)].to_vec()))
    }

    fn object_exists(&self, key: &str) -> Result<bool> {
        Ok(self.state().objects.contains_key(key))
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.state().objects.insert(key.to_owned(), bytes.to_vec());
        Ok(())
    }

    fn create_object(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let mut st = self.state();
        if st.objects.contains_key(key) {
            return Ok(false);
        }
        st.objects.insert(key.to_owned(), bytes.to_vec());
        Ok(true)
    }

    fn delete_object(&self, key: &str) -> Result<bool> {
        Ok(self.state().objects.remove(key).is_some())
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let st = self.state();
        Ok(st
            .objects
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .collect())
    }

    fn remove_temp_files(&self) -> Result<usize> {
        let mut st = self.state();
        let n = st.tmp.len();
        st.tmp.clear();
        Ok(n)
    }

    fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        let mut locks = self.shared.locks.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let h = locks.entry(name.to_owned()).or_default();
            let free = match mode {
                LockMode::Shared => !h.exclusive,
                LockMode::Exclusive => !h.exclusive && h.shared == 0,
            };
            if free {
                match mode {
                    LockMode::Shared => h.shared += 1,
                    LockMode::Exclusive => h.exclusive = true,
                }
                let guard = MemLockGuard { shared: self.shared.clone(), name: name.to_owned(), mode };
                return Ok(Some(StoreLock::new(guard)));
            }
            if !wait {
                return Ok(None);
            }
            locks = self.shared.lock_released.wait(locks).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn put_chunk_torn(&self, id: &ChunkId, bytes: &[u8], keep: usize) -> Error {
        // the partial bytes land in a temp object that is never staged
        self.stage(&bytes[..keep.min(bytes.len())]);
        super::injected(self.chunk_name(id), "write", rustix::io::Errno::NOSPC)
    }

    fn put_object_torn(&self, key: &str, bytes: &[u8], keep: usize) -> Error {
        self.stage(&bytes[..keep.min(bytes.len())]);
        super::injected(self.object_name(key), "write", rustix::io::Errno::NOSPC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Put-if-absent for metadata objects, on the in-memory and directory
    /// backends alike: the first create wins, a second one writes nothing.
    #[test]
    fn create_object_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let d = crate::backend::dir::DirBackend::new(&dir.path().join("s"));
        d.create_layout().unwrap();
        let m = MemoryBackend::new();
        for b in [&d as &dyn Backend, &m as &dyn Backend] {
            assert!(b.create_object("backups/000000000001.claim", b"first").unwrap());
            assert!(!b.create_object("backups/000000000001.claim", b"second").unwrap());
            assert_eq!(b.get_object("backups/000000000001.claim", 100).unwrap().unwrap(), b"first");
            assert!(b.list_objects("backups/").unwrap().iter().all(|n| !n.starts_with('.')), "no temp file is left");
        }
    }

    #[test]
    fn locks_behave_as_flock() {
        let a = MemoryBackend::new();
        let b = a.reopen();
        let s1 = a.lock("store", LockMode::Shared, false).unwrap().unwrap();
        let _s2 = b.lock("store", LockMode::Shared, false).unwrap().unwrap();
        assert!(b.lock("store", LockMode::Exclusive, false).unwrap().is_none());
        // other names are independent
        let img = a.lock("image-x", LockMode::Exclusive, false).unwrap().unwrap();
        assert!(b.lock("image-x", LockMode::Exclusive, false).unwrap().is_none());
        drop(img);
        assert!(b.lock("image-x", LockMode::Exclusive, false).unwrap().is_some());
        drop(s1);
        drop(_s2);
        let x = a.lock("store", LockMode::Exclusive, false).unwrap().unwrap();
        assert!(b.lock("store", LockMode::Shared, false).unwrap().is_none());
        // a waiter gets the lock once the holder lets go
        std::thread::scope(|sc| {
            let w = sc.spawn(|| b.lock("store", LockMode::Shared, true).unwrap().is_some());
            drop(x);
            assert!(w.join().unwrap());
        });
        // a fork shares nothing
        let f = a.fork();
        let _x = a.lock("store", LockMode::Exclusive, false).unwrap().unwrap();
        assert!(f.lock("store", LockMode::Exclusive, false).unwrap().is_some());
    }

    #[test]
    fn staged_chunks_are_visible_only_after_sync_and_lost_in_a_crash() {
        let a = MemoryBackend::new();
        let id = ChunkId::of(b"x");
        assert!(a.put_chunk(&id, b"bytes").unwrap());
        assert!(!a.chunk_exists(&id).unwrap());
        let crashed = a.reopen();
        let other = ChunkId::of(b"y");
        assert!(crashed.put_chunk(&other, b"other").unwrap());
        drop(crashed);
        a.sync().unwrap();
        assert!(a.chunk_exists(&id).unwrap() && !a.chunk_exists(&other).unwrap());
        // put-if-absent: an existing chunk is never replaced
        assert!(!a.put_chunk(&id, b"different").unwrap());
        let mut out = Vec::new();
        a.get_chunk(&id, &mut out).unwrap();
        assert_eq!(out, b"bytes");
        assert_eq!(a.temp_objects(), 1, "the crashed handle's staged chunk stays as a temp object");
        assert_eq!(a.remove_temp_files().unwrap(), 1);
    }
}
