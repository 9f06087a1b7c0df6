//! An isle's counters ([`IsleCounters`], kept by its VM thread) and their
//! snapshot ([`IsleMetrics`], from `Isle::metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{LatencyHistogram, LatencyRecorder};
use crate::vm::Outcome;

/// A snapshot of an isle's counters, from [`Isle::metrics`](crate::Isle::metrics).
///
/// The counters cover the requests the VM thread took from its queue; the
/// histograms, those of them that started running (see below). A request
/// is counted just after its caller has its result, so a snapshot taken at
/// once may miss it; once the isle is quiet (nothing queued, running or
/// suspended) they add up:
///
/// `run_time.count() == queue_wait.count()` is `completed + failed +
/// cancelled` less the requests resolved before they started (cancelled or
/// timed out while queued, or shut down unstarted).
///
/// A request that suspends (the `async` feature) is in the histograms from
/// its first poll, with that poll's run time (as in `busy`); its time
/// suspended and its later polls are not in them. It is counted as
/// completed, failed or cancelled when it resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IsleMetrics {
    /// Requests that ran and returned a value.
    pub completed: u64,
    /// Requests that ran and failed (Lua error, panic, `NotFound`, ...).
    pub failed: u64,
    /// Requests cancelled, timed out or shut down, whether queued or
    /// running, once the VM thread took them up.
    pub cancelled: u64,
    /// Time spent running requests.
    pub busy: Duration,
    /// For each request that started: the time from its submission to its
    /// start on the VM.
    pub queue_wait: LatencyHistogram,
    /// For each request that started: the time it ran on the VM (until it
    /// resolved, or first suspended).
    pub run_time: LatencyHistogram,
}

/// The live counters of an isle; written by its VM thread, read by anyone.
#[derive(Default)]
pub(crate) struct IsleCounters {
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    busy_ns: AtomicU64,
    pub(crate) latency: LatencyRecorder,
}

impl IsleCounters {
    /// A request ended with `outcome` after running for `busy`.
    pub(crate) fn record(&self, outcome: Outcome, busy: Duration) {
        // ORDERING: Relaxed: plain statistics, no data hangs on them.
        let counter = match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Failed | Outcome::OutOfMemory => &self.failed,
            Outcome::Cancelled | Outcome::Skipped => &self.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.add_busy(busy);
    }

    /// Run time of a request that suspended (it is counted when it resolves).
    pub(crate) fn add_busy(&self, busy: Duration) {
        if !busy.is_zero() {
            // ORDERING: Relaxed, as in `record`.
            self.busy_ns
                .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> IsleMetrics {
        // ORDERING: Relaxed, as in `record`. The counters first: a request
        // is in the histograms before it is counted.
        let completed = self.completed.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let cancelled = self.cancelled.load(Ordering::Relaxed);
        let busy = Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed));
        let (queue_wait, run_time) = self.latency.snapshot();
        IsleMetrics {
            completed,
            failed,
            cancelled,
            busy,
            queue_wait,
            run_time,
        }
    }
}
