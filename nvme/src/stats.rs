//! I/O statistics: counters and latency histograms per channel.
//!
//! Each channel owns its counters and is their only writer, so an update is a
//! relaxed load and store (plain moves on x86, no locked instruction) and
//! nobody takes a lock on the I/O path. Readers on other threads (the control
//! plane) sum the channels of a bdev with relaxed loads; a snapshot may be a
//! few I/Os out of step between fields, never torn within one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::bdev::IoType;

/// Sub-buckets per power of two: values are kept to within 1/16 (6.25%).
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Buckets covering all of u64.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

#[inline]
fn bump(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

#[inline]
fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        v as usize
    } else {
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        (((msb - SUB_BITS + 1) as usize) << SUB_BITS) | ((v >> shift) as usize & (SUB - 1))
    }
}

/// Smallest value that falls into bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    if b < SUB {
        b as u64
    } else {
        let group = (b >> SUB_BITS) as u32; // msb - SUB_BITS + 1
        let sub = (b & (SUB - 1)) as u64;
        let shift = group - 1;
        ((SUB as u64) | sub) << shift
    }
}

/// A log-linear latency histogram with a single writer (see the module docs).
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), max: AtomicU64::new(0) }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("count", &self.snapshot().count()).finish()
    }
}

impl Histogram {
    /// Records one value. Only the owning thread may call this.
    #[inline]
    pub fn record(&self, v: u64) {
        bump(&self.counts[bucket_of(v)], 1);
        if v > self.max.load(Ordering::Relaxed) {
            self.max.store(v, Ordering::Relaxed);
        }
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment; mergeable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    counts: Vec<u64>,
    max: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS], max: 0 }
    }
}

impl HistogramSnapshot {
    /// Adds another snapshot's counts.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Largest value recorded (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value below which a fraction `q` (0..=1) of the values lie, to
    /// within the bucket width (6.25%). Zero when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // Report the middle of the bucket, but never beyond the true max.
                let lo = bucket_floor(b);
                let hi = if b + 1 < BUCKETS { bucket_floor(b + 1) } else { u64::MAX };
                return (lo + (hi - lo) / 2).min(self.max);
            }
        }
        self.max
    }
}

/// Counters of one op type.
#[derive(Debug, Default)]
struct OpCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    latency_ns: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// Statistics of one channel (single writer).
#[derive(Debug, Default)]
pub struct IoStats {
    per_op: [OpCounters; 5],
    timeouts: AtomicU64,
    queued: AtomicU64,
}

impl IoStats {
    /// Records a finished I/O.
    #[inline]
    pub fn record(&self, op: IoType, bytes: u64, latency_ns: u64, ok: bool) {
        let c = &self.per_op[op.index()];
        bump(&c.ops, 1);
        bump(&c.bytes, bytes);
        bump(&c.latency_ns, latency_ns);
        if !ok {
            bump(&c.errors, 1);
        }
        c.latency.record(latency_ns);
    }

    /// Records an I/O that timed out.
    pub fn record_timeout(&self) {
        bump(&self.timeouts, 1);
    }

    /// Records an I/O that waited because the backend was full.
    pub fn record_queued(&self) {
        bump(&self.queued, 1);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for (i, c) in self.per_op.iter().enumerate() {
            let o = &mut s.per_op[i];
            o.ops = c.ops.load(Ordering::Relaxed);
            o.bytes = c.bytes.load(Ordering::Relaxed);
            o.latency_ns = c.latency_ns.load(Ordering::Relaxed);
            o.errors = c.errors.load(Ordering::Relaxed);
            o.latency = c.latency.snapshot();
        }
        s.timeouts = self.timeouts.load(Ordering::Relaxed);
        s.queued = self.queued.load(Ordering::Relaxed);
        s
    }
}

/// Counters of one op type at one moment.
#[derive(Debug, Clone, Default)]
pub struct OpSnapshot {
    /// Completed operations (including failed ones).
    pub ops: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Sum of latencies.
    pub latency_ns: u64,
    /// Failed operations.
    pub errors: u64,
    /// Latency distribution.
    pub latency: HistogramSnapshot,
}

/// Statistics at one moment, summable across channels.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// Indexed by [`IoType::index`].
    pub per_op: [OpSnapshot; 5],
    /// I/Os that timed out.
    pub timeouts: u64,
    /// I/Os that waited for room in the backend.
    pub queued: u64,
}

impl StatsSnapshot {
    /// Adds another snapshot.
    pub fn merge(&mut self, other: &StatsSnapshot) {
        for (a, b) in self.per_op.iter_mut().zip(&other.per_op) {
            a.ops += b.ops;
            a.bytes += b.bytes;
            a.latency_ns += b.latency_ns;
            a.errors += b.errors;
            a.latency.merge(&b.latency);
        }
        self.timeouts += other.timeouts;
        self.queued += other.queued;
    }

    /// The counters of one op type.
    pub fn op(&self, op: IoType) -> &OpSnapshot {
        &self.per_op[op.index()]
    }
}

/// The statistics of a bdev: its live channels plus what closed channels left.
#[derive(Debug, Default)]
pub struct BdevStats {
    live: Mutex<Vec<Arc<IoStats>>>,
    retired: Mutex<StatsSnapshot>,
}

impl BdevStats {
    /// Adds a channel's counters.
    pub fn attach(&self) -> Arc<IoStats> {
        let stats = Arc::new(IoStats::default());
        self.live.lock().unwrap_or_else(|p| p.into_inner()).push(stats.clone());
        stats
    }

    /// Folds a closing channel's counters into the retired total.
    pub fn detach(&self, stats: &Arc<IoStats>) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = live.iter().position(|s| Arc::ptr_eq(s, stats)) {
            live.swap_remove(i);
            self.retired.lock().unwrap_or_else(|p| p.into_inner()).merge(&stats.snapshot());
        }
    }

    /// The sum over all channels, past and present.
    pub fn snapshot(&self) -> StatsSnapshot {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = self.retired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for s in live.iter() {
            total.merge(&s.snapshot());
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut prev = 0;
        for v in [0u64, 1, 15, 16, 17, 31, 32, 33, 1000, 1 << 20, u64::MAX / 3, u64::MAX] {
            let b = bucket_of(v);
            assert!(b >= prev, "{v}");
            assert!(bucket_floor(b) <= v, "{v}: floor {}", bucket_floor(b));
            if b + 1 < BUCKETS {
                assert!(bucket_floor(b + 1) > v, "{v}");
            }
            prev = b;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    proptest! {
        #[test]
        fn quantiles_are_within_a_bucket_of_the_truth(mut values in proptest::collection::vec(1u64..10_000_000, 1..500), q in 0.0f64..1.0) {
            let h = Histogram::default();
            for &v in &values { h.record(v); }
            values.sort_unstable();
            let rank = ((q * values.len() as f64).ceil() as usize).max(1);
            let truth = values[rank - 1];
            let est = h.snapshot().quantile(q);
            prop_assert!(est.abs_diff(truth) <= truth / 8 + 1, "q={q} truth={truth} est={est}");
        }
    }

    #[test]
    fn bdev_stats_keep_retired_channels() {
        let b = BdevStats::default();
        let a = b.attach();
        let c = b.attach();
        a.record(IoType::Read, 4096, 100, true);
        c.record(IoType::Read, 4096, 300, false);
        c.record_timeout();
        b.detach(&a);
        let s = b.snapshot();
        assert_eq!(s.op(IoType::Read).ops, 2);
        assert_eq!(s.op(IoType::Read).errors, 1);
        assert_eq!(s.op(IoType::Read).latency.max(), 300);
        assert_eq!(s.timeouts, 1);
    }
}
