//! One helper for every parallel stage: N worker threads over a bounded
//! channel, the first error wins, cancellation is checked (PBS's
//! `ParallelHandler` is the model).
//!
//! A [`Stop`] is shared by the stages of one job. The first error any
//! worker returns is kept in it and stops every stage; the cancel flag stops
//! them with [`BackupError::Cancelled`]. A stopped worker keeps draining
//! its input without working on it, so an upstream stage blocked on a full
//! queue always gets unstuck and no stage waits forever. Items dropped that
//! way are dropped normally (a buffer that returns itself to a buffer pool
//! on `Drop` comes back).
//!
//! ```text
//! let stop = Stop::new(&cancel);
//! thread::scope(|s| {
//!     let hash = WorkerPool::spawn(s, &stop, "hash", 4, 8, || Compressor::new(), |c, block| …);
//!     let feed = hash.feed();
//!     for b in blocks { if feed.send(b).is_err() { break } }
//!     drop(feed);
//!     hash.finish();
//! });
//! stop.result()?;
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use anyhow::Result;
use crossbeam_channel::{bounded, Sender};

use crate::error::BackupError;

/// The shared stop state of one job's stages.
pub struct Stop<'c> {
    cancel: &'c AtomicBool,
    stopped: AtomicBool,
    /// The first error; later ones are dropped (they are usually caused by
    /// the stop itself).
    first: Mutex<Option<anyhow::Error>>,
}

impl<'c> Stop<'c> {
    pub fn new(cancel: &'c AtomicBool) -> Stop<'c> {
        Stop { cancel, stopped: AtomicBool::new(false), first: Mutex::new(None) }
    }

    /// Records `e` (if it is the first error) and stops every stage.
    pub fn fail(&self, e: anyhow::Error) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(e);
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Whether the stages should stop: an error happened, or the cancel flag
    /// is set (recorded as [`BackupError::Cancelled`] if nothing failed first).
    pub fn is_stopped(&self) -> bool {
        if self.stopped.load(Ordering::Relaxed) {
            return true;
        }
        if self.cancel.load(Ordering::Relaxed) {
            self.fail(BackupError::Cancelled.into());
            return true;
        }
        false
    }

    /// The first error, or `Cancelled` when the cancel flag is set.
    ///
    /// # Errors
    /// The first error a stage returned, or `Cancelled`.
    pub fn result(self) -> Result<()> {
        if let Some(e) = self.first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(BackupError::Cancelled.into());
        }
        Ok(())
    }
}

/// The pool was stopped (an error elsewhere, or cancellation): stop feeding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// A handle that feeds a pool; cloneable, so an upstream stage's workers can
/// each hold one. The pool's workers exit once every feed is dropped.
pub struct Feed<'s, T> {
    tx: Sender<T>,
    stop: &'s Stop<'s>,
}

impl<T> Clone for Feed<'_, T> {
    fn clone(&self) -> Self {
        Feed { tx: self.tx.clone(), stop: self.stop }
    }
}

impl<T> Feed<'_, T> {
    /// Queues `item`, blocking while the queue is full.
    ///
    /// # Errors
    /// [`Stopped`] when the job is stopping (the item is dropped).
    pub fn send(&self, item: T) -> Result<(), Stopped> {
        if self.stop.is_stopped() {
            return Err(Stopped);
        }
        self.tx.send(item).map_err(|_| Stopped)
    }

    /// Queues `item` unless the queue is full (then it is dropped and
    /// false returned): for a hint that one queued copy already stands for.
    pub fn offer(&self, item: T) -> bool {
        !self.stop.is_stopped() && self.tx.try_send(item).is_ok()
    }
}

/// `threads` workers over a queue of `queue` items.
pub struct WorkerPool<'scope, T> {
    feed: Option<Feed<'scope, T>>,
    handles: Vec<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope, T: Send + 'scope> WorkerPool<'scope, T> {
    /// Starts `threads` (at least one) workers named `name` in `scope`. Each
    /// makes its own state with `init` (a compressor, a scratch buffer) and
    /// calls `work` on every item it receives. An error from `work` stops
    /// the job ([`Stop::fail`]).
    pub fn spawn<'env, S, I, F>(
        scope: &'scope Scope<'scope, 'env>,
        stop: &'scope Stop<'scope>,
        name: &str,
        threads: usize,
        queue: usize,
        init: I,
        work: F,
    ) -> WorkerPool<'scope, T>
    where
        I: Fn() -> S + Send + Sync + 'scope,
        F: Fn(&mut S, T) -> Result<()> + Send + Sync + 'scope,
    {
        let (tx, rx) = bounded::<T>(queue);
        let shared = Arc::new((init, work));
        let handles = (0..threads.max(1))
            .map(|i| {
                let (rx, shared) = (rx.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("{name} {i}"))
                    .spawn_scoped(scope, move || {
                        let (init, work) = &*shared;
                        let mut state = init();
                        for item in rx.iter() {
                            // stopped: keep draining so that no feeder blocks forever
                            if stop.is_stopped() {
                                continue;
                            }
                            if let Err(e) = work(&mut state, item) {
                                stop.fail(e);
                            }
                        }
                    })
                    .unwrap_or_else(|e| panic!("cannot start a {name} thread: {e}"))
            })
            .collect();
        WorkerPool { feed: Some(Feed { tx, stop }), handles }
    }

    /// A handle to feed the pool (clone it for every feeding thread).
    pub fn feed(&self) -> Feed<'scope, T> {
        self.feed.clone().expect("feed taken only by finish")
    }

    /// Closes this handle's side of the queue and waits for the workers;
    /// they exit once every [`Feed`] is dropped. The job's result is
    /// [`Stop::result`].
    ///
    /// # Panics
    /// Re-raises a worker's panic.
    pub fn finish(mut self) {
        self.feed = None;
        for h in self.handles.drain(..) {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

/// Runs `work` on every item on `threads` workers (each with its own state
/// from `init`), feeding from the calling thread; stops at the first error
/// or when `cancel` is set.
///
/// # Errors
/// The first error `work` returned, or [`BackupError::Cancelled`].
pub fn for_each<T, S, It, I, F>(cancel: &AtomicBool, name: &str, threads: usize, queue: usize, items: It, init: I, work: F) -> Result<()>
where
    T: Send,
    It: IntoIterator<Item = T>,
    I: Fn() -> S + Send + Sync,
    F: Fn(&mut S, T) -> Result<()> + Send + Sync,
{
    let stop = Stop::new(cancel);
    std::thread::scope(|s| {
        let pool = WorkerPool::spawn(s, &stop, name, threads, queue, init, work);
        let feed = pool.feed();
        for item in items {
            if feed.send(item).is_err() {
                break;
            }
        }
        drop(feed);
        pool.finish();
    });
    stop.result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_item_is_worked_on_once() {
        let sum = AtomicUsize::new(0);
        let cancel = AtomicBool::new(false);
        for_each(&cancel, "t", 3, 2, 1..=1000usize, || (), |_, i| {
            sum.fetch_add(i, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(sum.into_inner(), 500_500);
    }

    #[test]
    fn the_first_error_wins_and_stops_the_feed() {
        let cancel = AtomicBool::new(false);
        let worked = AtomicUsize::new(0);
        let e = for_each(&cancel, "t", 1, 1, 0..100_000usize, || (), |_, i| {
            worked.fetch_add(1, Ordering::Relaxed);
            if i >= 10 {
                anyhow::bail!("item {i} failed");
            }
            Ok(())
        })
        .unwrap_err();
        // one worker: items come in order, so the first failure is item 10
        assert_eq!(e.to_string(), "item 10 failed");
        // the feed stopped long before the end (at most the queue and the
        // item in hand got through after the failure)
        assert!(worked.into_inner() <= 13);
    }

    #[test]
    fn cancellation_is_a_typed_error() {
        let cancel = AtomicBool::new(false);
        let e = for_each(&cancel, "t", 2, 2, 0..100_000usize, || (), |_, i| {
            if i == 5 {
                cancel.store(true, Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap_err();
        assert!(BackupError::is_cancelled(&e), "{e:#}");
    }

    /// A stopped downstream stage keeps draining: an upstream stage that
    /// feeds it through a queue of one never blocks, so the job ends.
    #[test]
    fn a_failing_downstream_stage_does_not_block_upstream() {
        let cancel = AtomicBool::new(false);
        let stop = Stop::new(&cancel);
        std::thread::scope(|s| {
            let down = WorkerPool::spawn(s, &stop, "down", 1, 1, || (), |_, _: usize| anyhow::bail!("disk full"));
            let to_down = down.feed();
            let up = WorkerPool::spawn(s, &stop, "up", 2, 1, || (), move |_, i: usize| {
                let _ = to_down.send(i);
                Ok(())
            });
            let feed = up.feed();
            for i in 0..10_000 {
                if feed.send(i).is_err() {
                    break;
                }
            }
            drop(feed);
            up.finish();
            down.finish();
        });
        assert_eq!(stop.result().unwrap_err().to_string(), "disk full");
    }

    #[test]
    fn per_thread_state() {
        let cancel = AtomicBool::new(false);
        let made = AtomicUsize::new(0);
        for_each(&cancel, "t", 4, 4, 0..100usize, || made.fetch_add(1, Ordering::Relaxed), |_, _| Ok(())).unwrap();
        assert_eq!(made.into_inner(), 4);
    }
}
