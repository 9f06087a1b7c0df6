//! Latency histograms: [`LatencyHistogram`], the snapshot users read, and
//! [`LatencyRecorder`], what a VM thread records into.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use super::pending::Sample;
use crate::vm::Outcome;

/// Significant decimal digits kept for each value: a value is within 0.1%.
const SIGFIGS: u8 = 3;

/// The largest value recorded as itself, in nanoseconds (one hour); a longer
/// one is recorded as one hour. The histogram grows to the largest value
/// seen, so short requests cost only the memory their range needs.
const HIGHEST_NS: u64 = 3_600 * 1_000_000_000;

/// A distribution of durations (queue wait or run time of requests), from
/// [`PoolMetrics`](crate::PoolMetrics), [`WorkerMetrics`](crate::WorkerMetrics)
/// or [`IsleMetrics`](crate::IsleMetrics).
///
/// Values are kept in nanoseconds to 3 significant digits (a quantile is
/// within 0.1% of the true value, rounded up); a value above one hour is
/// counted as one hour, so none is ever lost. An empty histogram answers
/// zero for every quantile.
///
/// Histograms [`merge`](Self::merge): the pool's is the sum of its workers'.
///
/// ```
/// let pool = mlua_isle::IslePool::new(1, |_| Ok(()))?;
/// pool.eval::<()>("x = 1")?;
/// // Counted just after the caller has its result: soon, not at once.
/// let run = pool.metrics().run_time;
/// assert!(run.p50() <= run.p99() && run.p99() <= run.max());
/// println!("{} requests, p99 {:?}", run.count(), run.p99());
/// # Ok::<(), mlua_isle::IsleError>(())
/// ```
#[derive(Clone, Default)]
pub struct LatencyHistogram {
    /// `None` until the first value: an idle VM allocates nothing. Boxed,
    /// so that an idle VM's metrics hold a pointer, not a histogram's
    /// 90-odd bytes (two per VM, in every isle and pool worker).
    hist: Option<Box<Histogram<u64>>>,
}

impl LatencyHistogram {
    pub(super) fn record(&mut self, value: Duration) {
        let hist = self.hist.get_or_insert_with(|| {
            let mut h = Histogram::new(SIGFIGS).expect("3 significant figures are valid");
            h.auto(true);
            Box::new(h)
        });
        let ns = u64::try_from(value.as_nanos())
            .unwrap_or(u64::MAX)
            .min(HIGHEST_NS);
        // Within range, growing (rarely) to take it; cannot fail, but a
        // value must never be lost: clamp if it somehow did.
        if hist.record(ns).is_err() {
            hist.saturating_record(ns);
        }
    }

    /// How many durations it holds.
    pub fn count(&self) -> u64 {
        self.hist.as_ref().map_or(0, |h| h.len())
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The duration that a fraction `q` (0.0 to 1.0) of the values are at or
    /// below: `quantile(0.99)` is the 99th percentile. `q` outside 0 to 1
    /// is clamped; zero for an empty histogram.
    pub fn quantile(&self, q: f64) -> Duration {
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        self.hist
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(Duration::ZERO, |h| {
                Duration::from_nanos(h.value_at_quantile(q))
            })
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 90th percentile.
    pub fn p90(&self) -> Duration {
        self.quantile(0.9)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// The 99.9th percentile.
    pub fn p999(&self) -> Duration {
        self.quantile(0.999)
    }

    /// The largest value (to the histogram's precision, rounded up).
    pub fn max(&self) -> Duration {
        self.quantile(1.0)
    }

    /// The mean; zero for an empty histogram.
    pub fn mean(&self) -> Duration {
        self.hist
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(Duration::ZERO, |h| {
                Duration::from_nanos(h.mean().round() as u64)
            })
    }

    /// Adds `other`'s values to this one's.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        let Some(theirs) = other.hist.as_ref().filter(|h| !h.is_empty()) else {
            return;
        };
        match &mut self.hist {
            None => self.hist = Some(theirs.clone()),
            Some(mine) => {
                // Same precision, auto-resizing: cannot fail. Value by
                // value otherwise, so no count is lost.
                if mine.add(&**theirs).is_err() {
                    for v in theirs.iter_recorded() {
                        mine.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                    }
                }
            }
        }
    }

    fn values(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.hist.iter().flat_map(|h| {
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
        })
    }
}

/// Equal when they hold the same values (to the histogram's precision).
impl PartialEq for LatencyHistogram {
    fn eq(&self, other: &Self) -> bool {
        self.count() == other.count() && self.values().eq(other.values())
    }
}

impl Eq for LatencyHistogram {}

/// A summary (count, mean, percentiles, max), not the buckets.
impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .field("mean", &self.mean())
            .field("p50", &self.p50())
            .field("p90", &self.p90())
            .field("p99", &self.p99())
            .field("p999", &self.p999())
            .field("max", &self.max())
            .finish()
    }
}

/// The queue-wait and run-time histograms of one VM thread: written by
/// that thread a batch of requests at a time (see `Pending`), read by
/// `metrics()`.
///
/// One lock for both histograms: a snapshot sees both at the same request
/// boundary, and no value is lost.
#[derive(Default)]
pub(crate) struct LatencyRecorder {
    pair: Mutex<(LatencyHistogram, LatencyHistogram)>,
}

impl LatencyRecorder {
    /// (queue wait, run time).
    pub(crate) fn snapshot(&self) -> (LatencyHistogram, LatencyHistogram) {
        self.pair.lock().clone()
    }
}

impl RunSink for LatencyRecorder {
    fn ran(&self, samples: &[Sample]) {
        let mut pair = self.pair.lock();
        for s in samples.iter().filter(|s| started(s.outcome)) {
            pair.0.record(s.queue_wait);
            pair.1.record(s.run_time);
        }
    }
}

/// Where a VM thread's samples go: see [`Pending`](super::Pending).
pub(crate) trait RunSink {
    /// Records requests whose runs returned (under one lock).
    fn ran(&self, samples: &[Sample]);
}

/// Whether a request whose run returned `outcome` started: one resolved
/// while queued (`Skipped`) never ran, and is in no histogram.
pub(super) fn started(outcome: Option<Outcome>) -> bool {
    outcome != Some(Outcome::Skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(values_us: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for &v in values_us {
            h.record(Duration::from_micros(v));
        }
        h
    }

    #[test]
    fn an_empty_histogram_answers_zero() {
        let h = LatencyHistogram::default();
        assert_eq!(
            (h.count(), h.p50(), h.max(), h.mean()),
            (0, Duration::ZERO, Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(h, of(&[]));
    }

    #[test]
    fn quantiles_are_within_the_precision_and_rounded_up() {
        let h = of(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(h.count(), 1000);
        for (q, want) in [
            (0.5, 500),
            (0.9, 900),
            (0.99, 990),
            (0.999, 999),
            (1.0, 1000),
        ] {
            let got = h.quantile(q).as_nanos() as f64;
            let want = want as f64 * 1000.0;
            assert!(
                got >= want && got <= want * 1.001,
                "q {q}: {got} ns, want {want}"
            );
        }
        assert!(
            h.p50() <= h.p90() && h.p90() <= h.p99() && h.p99() <= h.p999() && h.p999() <= h.max()
        );
    }

    #[test]
    fn a_huge_value_counts_as_an_hour() {
        let mut h = of(&[1]);
        h.record(Duration::MAX);
        h.record(Duration::from_secs(10 * 3600));
        assert_eq!(h.count(), 3);
        let max = h.max();
        assert!(
            max >= Duration::from_secs(3600) && max < Duration::from_secs(3605),
            "{max:?}"
        );
    }

    #[test]
    fn merging_adds_the_values() {
        let (a, b) = (of(&[1, 2, 3]), of(&[1_000_000, 5]));
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.count(), 5);
        assert_eq!(m, of(&[1, 2, 3, 5, 1_000_000]));
        let mut n = LatencyHistogram::default();
        n.merge(&b);
        n.merge(&a);
        assert_eq!(n, m);
        assert_ne!(a, b);
    }
}
