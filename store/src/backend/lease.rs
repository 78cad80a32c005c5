//! Leases: the store's locks across hosts, built only on what every object
//! store offers, put-if-absent ([`Backend::create_object`]), get, put,
//! list. Used by the S3 backend, whose buckets have no locks.
//!
//! ## The protocol
//! A lock `NAME` is the set of objects under `locks/NAME/`:
//!
//! * `x.<generation:016>`: an **exclusive** lease. The holder of the lock
//!   is the writer of the highest generation, while that lease is live
//!   (not released, not expired). To take the lock, a process lists the
//!   generations, reads the highest, `N`, and when it is released or
//!   expired (or there is none) creates `x.<N+1>` with put-if-absent: of
//!   all the processes that saw `N` free, exactly one creation succeeds
//!   (the store's conditional put), and the others see a live `N+1` on
//!   their next look. The highest generation is never deleted (a release
//!   rewrites it as released), so "the highest" never goes back and no two
//!   processes can both win; the winner of `N+1` deletes the generations
//!   below it.
//! * `s.<token>`: a **shared** lease (the `store` lock's shared mode). A
//!   shared taker first checks that no exclusive lease is live, creates its
//!   own `s.` object, then checks again; when an exclusive lease appeared
//!   meanwhile it deletes its object and waits. An exclusive taker first
//!   wins its generation, then waits until no live `s.` object is left.
//!   Each writes before it reads what the other writes (Dekker's
//!   handshake), so with a store whose listings show every completed put
//!   (AWS S3 since 2020, radosgw through its bucket index), at least one
//!   of two racing takers sees the other: a shared holder and an exclusive
//!   one never both proceed. A waiting exclusive taker keeps its
//!   generation, so new shared takers queue behind it and it gets the lock
//!   once the running holders are done, as the directory store's GC does.
//!
//! Every lease names its holder (program, host, pid) and carries an expiry
//! time: a thread owned by the [`StoreLock`] rewrites the lease every third
//! of its duration, and dropping the lock stops the thread and releases
//! the lease. A holder killed with `-9` renews nothing: its lease expires
//! and only then can another process take the lock. Expiry is judged by
//! the wall clock of the reader against the holder's wall clock, so the
//! hosts' clocks must agree to well within a third of the lease (NTP).
//! A holder whose renewals stop for longer than its lease (a frozen VM)
//! loses the lock; its renewal thread notices that a higher generation
//! exists, logs it, and stops renewing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Backend, LockMode, StoreLock};
use crate::error::Result;

/// Default lease duration (the agent's `[store] lock-lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Largest lease record read back (they are ~200 bytes).
const MAX_LEASE_LEN: u64 = 4096;

/// What a lease object holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Random, unique to one taking of the lock.
    pub token: String,
    /// The program holding it and why (`blockvault`).
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// Milliseconds since the epoch, by the holder's clock.
    pub expires_ms: u64,
    pub released: bool,
}

impl LeaseRecord {
    fn live(&self, now_ms: u64) -> bool {
        !self.released && self.expires_ms > now_ms
    }

    /// "pid 123 on host h (lease expires in 41 s)", for messages.
    pub fn describe(&self) -> String {
        let left = self.expires_ms.saturating_sub(now_ms());
        format!(
            "{} pid {} on host {} (lease expires in {:.1} s unless renewed)",
            self.holder,
            self.pid,
            self.host,
            left as f64 / 1000.0
        )
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// This host's name, for lease records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn gen_key(name: &str, gen: u64) -> String {
    format!("locks/{name}/x.{gen:016}")
}

/// The leases of one lock, on one backend.
pub struct Leases<B: Backend + ?Sized + 'static> {
    backend: Arc<B>,
    lease: Duration,
    poll: Duration,
}

/// Who holds a lock, as found: `None` when it is free.
pub type Holder = Option<LeaseRecord>;

impl<B: Backend + ?Sized + 'static> Leases<B> {
    /// Leases of duration `lease` on `backend`.
    pub fn new(backend: Arc<B>, lease: Duration) -> Self {
        // waiters look again every quarter lease, at most every 2 s
        let poll = (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        Leases { backend, lease, poll }
    }

    fn read(&self, key: &str) -> Result<Option<LeaseRecord>> {
        let Some(bytes) = self.backend.get_object(key, MAX_LEASE_LEN)? else { return Ok(None) };
        // an unreadable lease (a foreign object) counts as expired: it can
        // never be renewed either
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// The generations of `name`, ascending.
    fn generations(&self, name: &str) -> Result<Vec<u64>> {
        let mut g: Vec<u64> = self
            .backend
            .list_objects(&format!("locks/{name}/"))?
            .iter()
            .filter_map(|k| k.strip_prefix("x.")?.parse().ok())
            .collect();
        g.sort_unstable();
        Ok(g)
    }

    /// The live exclusive lease of `name`, with its generation, if any; and
    /// the highest generation.
    fn exclusive_holder(&self, name: &str) -> Result<(u64, Holder)> {
        let Some(&top) = self.generations(name)?.last() else { return Ok((0, None)) };
        let rec = self.read(&gen_key(name, top))?.filter(|r| r.live(now_ms()));
        Ok((top, rec))
    }

    /// Live shared leases of `name`; expired ones are deleted on the way
    /// (their holders are dead or have lost them).
    fn shared_holders(&self, name: &str) -> Result<Vec<LeaseRecord>> {
        let mut live = Vec::new();
        for k in self.backend.list_objects(&format!("locks/{name}/"))? {
            if !k.starts_with("s.") {
                continue;
            }
            let key = format!("locks/{name}/{k}");
            match self.read(&key)? {
                Some(r) if r.live(now_ms()) => live.push(r),
                Some(_) | None => {
                    self.backend.delete_object(&key)?;
                }
            }
        }
        Ok(live)
    }

    /// Whoever holds `name` now (exclusive, else one shared holder), for
    /// messages.
    ///
    /// # Errors
    /// `Io`.
    pub fn holder(&self, name: &str) -> Result<Holder> {
        if let (_, Some(r)) = self.exclusive_holder(name)? {
            return Ok(Some(r));
        }
        Ok(self.shared_holders(name)?.into_iter().next())
    }

    fn record(&self) -> LeaseRecord {
        LeaseRecord {
            token: format!("{:032x}", rand::random::<u128>()),
            holder: "blockvault".into(),
            host: hostname(),
            pid: std::process::id(),
            expires_ms: now_ms() + self.lease.as_millis() as u64,
            released: false,
        }
    }

    /// Creates `key` holding `rec`; true when this call created it. A
    /// create whose answer was lost (a timeout after the store did it) is
    /// recognised by the token.
    fn create(&self, key: &str, rec: &LeaseRecord) -> Result<bool> {
        let bytes = serde_json::to_vec(rec).expect("lease serialises");
        match self.backend.create_object(key, &bytes) {
            Ok(won) => Ok(won),
            Err(e) => match self.read(key) {
                Ok(Some(r)) if r.token == rec.token => Ok(true),
                _ => Err(e),
            },
        }
    }

    /// Takes lock `name`; see the module docs. `None` when `!wait` and
    /// someone else holds it.
    ///
    /// # Errors
    /// `Io`.
    pub fn lock(&self, name: &str, mode: LockMode, wait: bool) -> Result<Option<StoreLock>> {
        match mode {
            LockMode::Exclusive => self.lock_exclusive(name, wait),
            LockMode::Shared => self.lock_shared(name, wait),
        }
    }

    fn lock_exclusive(&self, name: &str, wait: bool) -> Result<Option<StoreLock>> {
        let rec = loop {
            let (top, holder) = self.exclusive_holder(name)?;
            if holder.is_some() {
                if !wait {
                    return Ok(None);
                }
                std::thread::sleep(self.poll);
                continue;
            }
            let rec = self.record();
            let key = gen_key(name, top + 1);
            if self.create(&key, &rec)? {
                for g in self.generations(name)? {
                    if g <= top {
                        self.backend.delete_object(&gen_key(name, g))?;
                    }
                }
                break (key, rec);
            }
            // another taker won top + 1: look again
        };
        let guard = self.hold(rec.0, rec.1, Some(name.to_owned()));
        // the gate is ours; the store lock's shared holders must be gone too
        loop {
            if self.shared_holders(name)?.is_empty() {
                let lost = guard.lost.clone();
                return Ok(Some(StoreLock::with_lease(guard, lost)));
            }
            if !wait {
                return Ok(None); // dropping the guard releases the gate
            }
            std::thread::sleep(self.poll);
        }
    }

    fn lock_shared(&self, name: &str, wait: bool) -> Result<Option<StoreLock>> {
        loop {
            if self.exclusive_holder(name)?.1.is_some() {
                if !wait {
                    return Ok(None);
                }
                std::thread::sleep(self.poll);
                continue;
            }
            let rec = self.record();
            let key = format!("locks/{name}/s.{}", rec.token);
            if !self.create(&key, &rec)? {
                continue; // a token collision: draw another
            }
            if self.exclusive_holder(name)?.1.is_none() {
                let guard = self.hold(key, rec, None);
                let lost = guard.lost.clone();
                return Ok(Some(StoreLock::with_lease(guard, lost)));
            }
            // an exclusive taker got in between: let it go first
            self.backend.delete_object(&key)?;
            if !wait {
                return Ok(None);
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Starts the renewal thread of a lease just taken.
    fn hold(&self, key: String, rec: LeaseRecord, exclusive_of: Option<String>) -> LeaseGuard {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let lost = Arc::new(AtomicBool::new(false));
        let backend = self.backend.clone();
        let lease = self.lease;
        let (stop2, lost2, key2) = (stop.clone(), lost.clone(), key.clone());
        let thread = std::thread::Builder::new()
            .name("lease renewal".into())
            .spawn(move || {
                let leases = Leases { backend, lease, poll: lease };
                leases.renew_until_stopped(&key2, rec, exclusive_of.as_deref(), &stop2, &lost2);
            })
            .expect("spawn lease renewal thread");
        LeaseGuard { stop, thread: Some(thread), lost }
    }

    fn renew_until_stopped(
        &self,
        key: &str,
        mut rec: LeaseRecord,
        exclusive_of: Option<&str>,
        stop: &(Mutex<bool>, Condvar),
        lost: &AtomicBool,
    ) {
        let (m, cv) = stop;
        let mut stopped = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // `_while`: a stop set before this thread took the mutex (at
            // start, or while it renewed without it) is seen at once; a
            // plain wait would miss that notification and hold up the
            // drop of the lock for a whole period
            let (g, timeout) = cv.wait_timeout_while(stopped, self.lease / 3, |s| !*s).unwrap_or_else(|p| p.into_inner());
            stopped = g;
            if *stopped {
                break;
            }
            drop(stopped);
            if let Err(e) = self.renew(key, &mut rec, exclusive_of) {
                tracing::warn!(lease = key, error = %e, "renewing a store lock lease failed; retrying");
            }
            if self.is_lost(key, &rec, exclusive_of) {
                lost.store(true, Ordering::SeqCst);
                tracing::error!(lease = key, "store lock lost: the lease expired before it was renewed and another process took it");
                return;
            }
            let _ = timeout;
            stopped = m.lock().unwrap_or_else(|p| p.into_inner());
        }
        drop(stopped);
        // release: mark the lease released (the highest generation must stay)
        if !self.is_lost(key, &rec, exclusive_of) {
            rec.released = true;
            let res = if exclusive_of.is_some() {
                self.backend.put_object(key, &serde_json::to_vec(&rec).expect("lease serialises"))
            } else {
                self.backend.delete_object(key).map(|_| ())
            };
            if let Err(e) = res {
                tracing::warn!(lease = key, error = %e, "releasing a store lock lease failed; it expires by itself");
            }
        }
    }

    fn renew(&self, key: &str, rec: &mut LeaseRecord, exclusive_of: Option<&str>) -> Result<()> {
        if self.is_lost(key, rec, exclusive_of) {
            return Ok(());
        }
        rec.expires_ms = now_ms() + self.lease.as_millis() as u64;
        self.backend.put_object(key, &serde_json::to_vec(rec).expect("lease serialises"))
    }

    /// True when the lease is no longer ours: rewritten by another token,
    /// or (exclusive) a higher generation exists. Errors count as "not
    /// known lost".
    fn is_lost(&self, key: &str, rec: &LeaseRecord, exclusive_of: Option<&str>) -> bool {
        match self.read(key) {
            Ok(Some(r)) if r.token != rec.token => return true,
            Ok(None) => return true,
            _ => {}
        }
        if let Some(name) = exclusive_of {
            if let Ok(g) = self.generations(name) {
                let mine: u64 = key.rsplit("x.").next().and_then(|s| s.parse().ok()).unwrap_or(0);
                return g.last().is_some_and(|&top| top > mine);
            }
        }
        false
    }
}

/// Keeps a lease renewed; releases it on drop.
struct LeaseGuard {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    lost: Arc<AtomicBool>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.lost.load(Ordering::SeqCst) {
            tracing::error!("a store lock lease was lost while held (see the earlier error)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;

    fn leases(b: &Arc<MemoryBackend>) -> Leases<MemoryBackend> {
        Leases { backend: b.clone(), lease: Duration::from_millis(600), poll: Duration::from_millis(50) }
    }

    #[test]
    fn exclusive_and_shared_exclude_each_other() {
        let b = Arc::new(MemoryBackend::new());
        let l = leases(&b);
        let x = l.lock("img", LockMode::Exclusive, false).unwrap().unwrap();
        assert!(l.lock("img", LockMode::Exclusive, false).unwrap().is_none());
        let h = l.holder("img").unwrap().unwrap();
        assert_eq!(h.pid, std::process::id());
        assert!(h.describe().contains(&hostname()));
        drop(x);
        assert!(l.holder("img").unwrap().is_none());
        let x2 = l.lock("img", LockMode::Exclusive, false).unwrap().unwrap();
        drop(x2);
        // only the highest generation is left, released
        assert_eq!(b.list_objects("locks/img/").unwrap(), vec!["x.0000000000000002".to_string()]);

        let s1 = l.lock("store", LockMode::Shared, false).unwrap().unwrap();
        let s2 = l.lock("store", LockMode::Shared, false).unwrap().unwrap();
        assert!(l.lock("store", LockMode::Exclusive, false).unwrap().is_none());
        drop(s1);
        drop(s2);
        let x = l.lock("store", LockMode::Exclusive, false).unwrap().unwrap();
        assert!(l.lock("store", LockMode::Shared, false).unwrap().is_none());
        // a waiting shared taker proceeds once the exclusive one lets go
        std::thread::scope(|sc| {
            let w = sc.spawn(|| l.lock("store", LockMode::Shared, true).unwrap().is_some());
            std::thread::sleep(Duration::from_millis(200));
            drop(x);
            assert!(w.join().unwrap());
        });
    }

    #[test]
    fn renewed_leases_outlive_their_duration_and_dead_ones_expire() {
        let b = Arc::new(MemoryBackend::new());
        let l = leases(&b);
        let x = l.lock("gc", LockMode::Exclusive, false).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(1500)); // 2.5 leases
        assert!(l.lock("gc", LockMode::Exclusive, false).unwrap().is_none(), "renewal keeps it held");
        // a holder that dies renews nothing: forget the guard's thread by
        // leaking it is not possible, so write a dead holder's lease by hand
        drop(x);
        let mut dead = l.record();
        dead.pid = 999_999;
        dead.expires_ms = now_ms() + 400;
        assert!(l.create(&gen_key("gc", 10), &dead).unwrap());
        assert!(l.lock("gc", LockMode::Exclusive, false).unwrap().is_none(), "live until it expires");
        let t0 = std::time::Instant::now();
        let got = l.lock("gc", LockMode::Exclusive, true).unwrap();
        assert!(got.is_some());
        assert!(now_ms() >= dead.expires_ms, "taken over only after expiry ({:?})", t0.elapsed());
    }

    #[test]
    fn racing_takers_never_both_win() {
        use std::sync::atomic::AtomicUsize;
        let b = Arc::new(MemoryBackend::new());
        let inside = AtomicBool::new(false);
        let readers = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    let l = leases(&b);
                    for i in 0..20 {
                        let mode = if i % 3 == 0 { LockMode::Exclusive } else { LockMode::Shared };
                        let g = l.lock("store", mode, true).unwrap().unwrap();
                        if mode == LockMode::Exclusive {
                            assert!(!inside.swap(true, Ordering::SeqCst), "two exclusive holders");
                            assert_eq!(readers.load(Ordering::SeqCst), 0, "exclusive beside shared");
                            std::thread::sleep(Duration::from_millis(5));
                            inside.store(false, Ordering::SeqCst);
                        } else {
                            readers.fetch_add(1, Ordering::SeqCst);
                            assert!(!inside.load(Ordering::SeqCst), "shared beside exclusive");
                            std::thread::sleep(Duration::from_millis(2));
                            readers.fetch_sub(1, Ordering::SeqCst);
                        }
                        drop(g);
                    }
                });
            }
        });
    }
}
