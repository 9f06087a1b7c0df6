//! An isle's counters ([`IsleCounters`], kept by its VM thread) and their
//! snapshot ([`IsleMetrics`], from `Isle::metrics`).

use std::time::Duration;

use parking_lot::Mutex;

use super::latency::{started, RunSink};
use super::pending::Sample;
use super::LatencyHistogram;
use crate::vm::Outcome;

/// A snapshot of an isle's counters, from [`Isle::metrics`](crate::Isle::metrics).
///
/// The counters cover the requests the VM thread took from its queue; the
/// histograms, those of them that started running (see below). The VM
/// thread hands them over 32 requests at a time, and all it holds before
/// it sleeps (it spins ~50 µs first): a snapshot may lack the latest 31
/// requests of a busy isle, and is complete once the isle has been idle
/// for a moment. Counters and histograms are read together, so they add
/// up in every snapshot (once a suspended request has resolved):
///
/// `run_time.count() == queue_wait.count()` is `completed + failed +
/// cancelled` less the requests resolved before they started (cancelled or
/// timed out while queued, or shut down unstarted).
///
/// A request that suspends (the `async` feature) is in the histograms from
/// its first poll, with that poll's run time (as in `busy`); its time
/// suspended and its later polls are not in them. It is counted as
/// completed, failed or cancelled when it resolves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// resolved, or first suspended). A request the VM took straight after
    /// the previous one starts when that one ended: its run time includes
    /// taking it from the queue (a busy isle reads the clock once per
    /// request).
    pub run_time: LatencyHistogram,
}

/// The live counters of an isle, under one lock with its histograms: the
/// VM thread takes it once per batch of requests (see `Pending`), and a
/// snapshot always adds up.
#[derive(Default)]
pub(crate) struct IsleCounters {
    state: Mutex<IsleMetrics>,
}

impl IsleCounters {
    /// A request the VM thread took up was resolved without a run (`Shutdown`).
    pub(crate) fn discarded(&self) {
        self.state.lock().cancelled += 1;
    }

    /// A suspended request resolved with `outcome`.
    pub(crate) fn resolved(&self, outcome: Outcome) {
        count(&mut self.state.lock(), outcome);
    }

    pub(crate) fn snapshot(&self) -> IsleMetrics {
        self.state.lock().clone()
    }
}

impl RunSink for IsleCounters {
    fn ran(&self, samples: &[Sample]) {
        let mut m = self.state.lock();
        for s in samples {
            if started(s.outcome) {
                m.queue_wait.record(s.queue_wait);
                m.run_time.record(s.run_time);
            }
            m.busy += s.run_time;
            if let Some(outcome) = s.outcome {
                count(&mut m, outcome);
            }
        }
    }
}

fn count(m: &mut IsleMetrics, outcome: Outcome) {
    match outcome {
        Outcome::Completed => m.completed += 1,
        Outcome::Failed | Outcome::OutOfMemory => m.failed += 1,
        Outcome::Cancelled | Outcome::Skipped => m.cancelled += 1,
    }
}
