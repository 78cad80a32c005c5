//! Read throttling (`read-bandwidth`, `read-iops`): a backup that reads at
//! full speed hurts the production IO it protects.
//!
//! [`Throttled`] wraps the [`ImageSource`] a backup's pipeline reads from
//! and implements the same trait, so every reader thread goes through one
//! shared [`Limiter`]: a token bucket per limit, kept as a "theoretical
//! arrival time" (GCRA): each read advances it by `cost / rate`, and a read
//! that pushes it more than [`BURST`] ahead of now sleeps off the
//! difference. Reads are charged after they complete, with what they
//! really read from the source (a block patched from the parent backup
//! costs only the bytes it read): over a backup the source sees at most
//! `rate × elapsed + one burst + one read per reader thread`.
//!
//! What is not throttled: the sampled trust checks and the exact-diff
//! probes of an incremental read a few blocks directly (at most a few
//! dozen per backup), and metadata calls (diffs, snapshot listing).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::info;

use crate::source::{BlockRead, ImageSource};

/// How far ahead of the configured rate the reads may run (a short burst
/// smooths scheduling jitter without letting the rate drift).
pub const BURST: Duration = Duration::from_millis(50);

/// A throttled read sleeps in slices of at most this, checking for
/// cancellation between them (one 4 MiB block at 1 MiB/s is 4 s).
const SLEEP_SLICE: Duration = Duration::from_millis(100);

/// The configured limits of one image (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u32>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

/// One token bucket as a theoretical arrival time (pure: the caller gives
/// the time, which makes it testable without sleeping).
#[derive(Debug)]
pub struct Bucket {
    /// Units per second.
    rate: f64,
    /// When the reads charged so far would have finished at exactly `rate`.
    tat: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        Bucket { rate: rate.max(1) as f64, tat: None }
    }

    /// Charges `cost` units at `now`; returns how long the caller must
    /// wait so that the reads stay within the rate (plus [`BURST`]).
    pub fn charge(&mut self, now: Instant, cost: u64) -> Duration {
        let start = self.tat.map_or(now, |t| t.max(now));
        let tat = start + Duration::from_secs_f64(cost as f64 / self.rate);
        self.tat = Some(tat);
        tat.saturating_duration_since(now).saturating_sub(BURST)
    }
}

/// The buckets of one backup, shared by its reader threads, and what they
/// counted.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    buckets: Mutex<(Option<Bucket>, Option<Bucket>)>,
    /// Bytes and reads charged, and the time reader threads slept (summed
    /// over threads).
    pub bytes: AtomicU64,
    pub ops: AtomicU64,
    pub slept_us: AtomicU64,
}

impl Limiter {
    pub fn new(limits: Limits) -> Limiter {
        Limiter {
            limits,
            buckets: Mutex::new((limits.bytes_per_sec.map(Bucket::new), limits.ops_per_sec.map(|o| Bucket::new(o.into())))),
            bytes: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            slept_us: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Charges one read of `bytes` and sleeps as long as the limits ask
    /// (less when `cancel` becomes set: the pipeline then stops).
    pub fn charge(&self, bytes: u64, cancel: &AtomicBool) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let wait = {
            let now = Instant::now();
            let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let wb = b.0.as_mut().map_or(Duration::ZERO, |b| b.charge(now, bytes));
            let wo = b.1.as_mut().map_or(Duration::ZERO, |b| b.charge(now, 1));
            wb.max(wo)
        };
        if wait.is_zero() {
            return;
        }
        let from = Instant::now();
        let until = from + wait;
        while !cancel.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(SLEEP_SLICE));
        }
        self.slept_us.fetch_add(from.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Logs what was charged (once, at the end of a backup).
    pub fn log(&self, image: &str) {
        info!(
            image,
            read_bandwidth = self.limits.bytes_per_sec,
            read_iops = self.limits.ops_per_sec,
            throttled_bytes = self.bytes.load(Ordering::Relaxed),
            throttled_reads = self.ops.load(Ordering::Relaxed),
            slept_ms = self.slept_us.load(Ordering::Relaxed) / 1000,
            "reads were throttled"
        );
    }
}

/// An [`ImageSource`] whose reads go through a [`Limiter`].
pub struct Throttled<'a, S: ?Sized> {
    inner: &'a S,
    limiter: &'a Limiter,
    cancel: &'a AtomicBool,
}

impl<'a, S: ImageSource + ?Sized> Throttled<'a, S> {
    pub fn new(inner: &'a S, limiter: &'a Limiter, cancel: &'a AtomicBool) -> Self {
        Throttled { inner, limiter, cancel }
    }
}

impl<S: ImageSource + ?Sized> ImageSource for Throttled<'_, S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)?;
        self.limiter.charge(buf.len() as u64, self.cancel);
        Ok(())
    }
    fn read_block(&self, offset: u64, buf: &mut [u8]) -> io::Result<BlockRead> {
        let r = self.inner.read_block(offset, buf)?;
        let cost = match r {
            BlockRead::Whole => buf.len() as u64,
            BlockRead::Patched { source_bytes } => source_bytes,
        };
        self.limiter.charge(cost, self.cancel);
        Ok(r)
    }
    /// None are stored ahead for a throttled image (see
    /// [`crate::source::StoreAhead`]); any would already be paid for.
    fn take_stored(&self) -> Vec<crate::source::StoredBlock> {
        self.inner.take_stored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums the waits of `n` reads of `cost` charged back to back by a
    /// reader that sleeps what it is told (simulated time).
    fn simulate(rate: u64, cost: u64, n: usize) -> Duration {
        let mut b = Bucket::new(rate);
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..n {
            now += b.charge(now, cost);
        }
        now - t0
    }

    #[test]
    fn the_rate_is_kept_over_many_reads() {
        // 100 MiB in 4 MiB reads at 10 MiB/s: 10 s, minus at most one burst
        let t = simulate(10 << 20, 4 << 20, 25);
        let want = Duration::from_secs(10);
        assert!(t <= want && t + BURST + Duration::from_millis(1) >= want, "{t:?}");
        // small reads: the same
        let t = simulate(1 << 20, 4096, 2560);
        assert!(t <= want && t + BURST + Duration::from_millis(1) >= want, "{t:?}");
    }

    #[test]
    fn idle_time_is_not_saved_up() {
        let mut b = Bucket::new(1000);
        let t0 = Instant::now();
        assert_eq!(b.charge(t0, 10), Duration::ZERO);
        // a long pause: the next reads start from now, not from the old debt or credit
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.charge(later, 50), Duration::ZERO);
        assert_eq!(b.charge(later, 1000), Duration::from_millis(1050) - BURST);
    }

    #[test]
    fn iops_limit() {
        // 100 reads at 20/s: 5 s
        let t = simulate(20, 1, 100);
        assert!(t <= Duration::from_secs(5) && t + BURST + Duration::from_millis(1) >= Duration::from_secs(5), "{t:?}");
    }

    struct Zeros(u64);
    impl ImageSource for Zeros {
        fn describe(&self) -> String {
            "zeros".into()
        }
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    #[test]
    fn throttled_reads_are_charged_and_cancel_cuts_the_sleep() {
        let l = Limiter::new(Limits { bytes_per_sec: Some(1000), ops_per_sec: None });
        let cancel = AtomicBool::new(true);
        let src = Zeros(1 << 20);
        let t = Throttled::new(&src, &l, &cancel);
        let mut buf = vec![1u8; 4096];
        for i in 0..3 {
            assert_eq!(t.read_block(i * 4096, &mut buf).unwrap(), BlockRead::Whole);
        }
        // 12 KiB at 1000 B/s would be 12 s of sleep; cancelled, none
        assert_eq!(l.slept_us.load(Ordering::Relaxed), 0);
        assert_eq!(l.bytes.load(Ordering::Relaxed), 3 * 4096);
        assert_eq!(l.ops.load(Ordering::Relaxed), 3);
        assert!(buf.iter().all(|&b| b == 0));
    }
}
