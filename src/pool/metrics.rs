//! Pool metrics: counters kept by the workers, read by `IslePool::metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::metrics::{LatencyHistogram, LatencyRecorder};
use crate::vm::Outcome;

/// A snapshot of the pool's counters, from [`IslePool::metrics`](crate::IslePool::metrics).
///
/// Counters are read one by one while the pool runs, so a snapshot taken
/// under load is approximate; once the pool is quiet they add up:
/// `submitted == rejected + discarded + Σ(completed + failed + cancelled) +
/// queued + running`, where `queued` counts requests still in a queue (including
/// cancelled ones that no worker has discarded yet).
///
/// The latency histograms (`queue_wait`, `run_time`, here and per worker)
/// hold one value per request that started running on a worker. A worker
/// hands them over 32 requests at a time, and all it holds before it
/// sleeps (it spins ~50 µs first): under load they lag the counters by up
/// to 31 requests per worker. Once the pool is quiet (nothing queued,
/// running or suspended) and its workers asleep, per worker and so
/// pool-wide, `run_time.count() == queue_wait.count()` is `completed +
/// failed + cancelled` less the requests resolved before they started:
/// those cancelled or timed out while queued, shut down before they
/// started, and session requests that failed before running (`SessionLost`,
/// or their environment could not be made). A request that suspends (the
/// `async` feature) is in the histograms from its first poll, with that
/// poll's run time, not its time suspended or later polls (which count in
/// `busy` and in its session's `run_time`); it is counted in the counters
/// when it resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolMetrics {
    /// One entry per worker (VM), in worker order.
    pub workers: Vec<WorkerMetrics>,
    /// Unkeyed requests waiting in the global queue.
    pub unkeyed_queued: usize,
    /// Sessions currently bound to a VM.
    pub sessions_open: usize,
    /// Sessions closed by `session_idle_timeout`.
    pub sessions_expired: u64,
    /// Requests submitted (session and unkeyed; not broadcasts, nor
    /// reloads).
    pub submitted: u64,
    /// Requests refused with `QueueFull` (a `reserve_timeout` that gave up
    /// submitted nothing, and is not counted).
    pub rejected: u64,
    /// Callers waiting for room in the queue now (`reserve`,
    /// `reserve_timeout`, `reserve_deadline`).
    pub waiting_for_room: usize,
    /// Requests the pool resolved `Shutdown` without a worker taking them:
    /// submitted after shutdown began, or still queued when it ended.
    pub discarded: u64,
    /// The committed version of the pool's code: the number of reloads
    /// that succeeded ([`IslePool::reload`](crate::IslePool::reload); 0:
    /// `init` alone).
    pub version: u64,
    /// Every worker's `queue_wait`, merged.
    pub queue_wait: LatencyHistogram,
    /// Every worker's `run_time`, merged.
    pub run_time: LatencyHistogram,
}

/// One worker's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerMetrics {
    /// Requests waiting in this worker's own queues (its deque of unkeyed
    /// work and its session queue).
    pub queued: usize,
    /// 1 while a request runs on this VM, else 0.
    pub running: usize,
    /// Requests that ran and returned a value.
    pub completed: u64,
    /// Requests that ran and failed (Lua error, panic, `NotFound`, ...).
    pub failed: u64,
    /// Requests this worker discarded or stopped: cancelled, timed out or
    /// shut down, whether queued or running.
    pub cancelled: u64,
    /// Time spent running requests.
    pub busy: Duration,
    /// Sessions bound to this VM.
    pub sessions: usize,
    /// Times this worker replaced its VM (`recycle_after`,
    /// `recycle_when_memory_above`).
    pub recycled: u64,
    /// Times a replacement VM failed to start (its `init` failed). When
    /// recycling, the old VM kept serving. When replacing a wedged VM, the
    /// stuck thread keeps the slot (its queue waits for it), shutdown no
    /// longer waits for it, and the pool tries again every `stop_grace`
    /// while it stays stuck.
    pub recycle_failures: u64,
    /// Times this worker's VM was wedged (it did not let go of a stopped
    /// request within `stop_grace`) and a fresh VM took over.
    pub wedged: u64,
    /// Requests suspended on this VM, waiting for a future (the `async`
    /// feature; see `max_suspended`).
    pub suspended: usize,
    /// The version of the code this worker's VM runs (see
    /// [`IslePool::reload`](crate::IslePool::reload)): the pool's version,
    /// or during a reload the one before or the one in flight.
    pub version: u64,
    /// For each request that started on this worker: the time from its
    /// submission to its start (see [`PoolMetrics`] for which requests).
    pub queue_wait: LatencyHistogram,
    /// For each request that started on this worker: the time it ran (until
    /// it resolved, or first suspended).
    pub run_time: LatencyHistogram,
}

/// One session's counters, from [`IslePool::session_metrics`](crate::IslePool::session_metrics)
/// or [`Session::metrics`](crate::Session::metrics).
///
/// They count the requests of the session's current binding: closing the
/// session (or its expiry, or the loss of its VM) starts them afresh with
/// the next binding. Like the pool's, they are read one by one while the
/// VM runs; once the session is quiet, `requests == completed + failed +
/// cancelled`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionMetrics {
    /// The VM (worker index) the session is bound to.
    pub worker: usize,
    /// Requests its VM has resolved: ran, failed, or found stopped.
    pub requests: u64,
    /// Those that returned a value.
    pub completed: u64,
    /// Those that failed: a Lua error, a panic, `NotFound`, the memory
    /// limit, `SessionLost`.
    pub failed: u64,
    /// Those cancelled, timed out or shut down (while queued or running).
    pub cancelled: u64,
    /// The VM time its requests took: the session's share of the VM. For a
    /// request that awaited futures (the `async` feature), the time its
    /// polls ran, not the time it was suspended.
    pub run_time: Duration,
    /// Callers waiting for room in the session's own queue
    /// (`session_queue_capacity`; see `Session::reserve`).
    pub waiting_for_room: usize,
}

/// A session's live counters, kept in its binding; written by its VM's
/// worker, read by anyone.
#[derive(Default)]
pub(super) struct KeyCounters {
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    run_ns: AtomicU64,
}

impl KeyCounters {
    /// A request of the session ran for `ran` (before it resolved or
    /// suspended).
    pub(super) fn ran(&self, ran: Duration) {
        // ORDERING: Relaxed: plain statistics, no data hangs on them.
        self.run_ns
            .fetch_add(ran.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A request of the session resolved with `outcome`.
    pub(super) fn resolved(&self, outcome: Outcome) {
        // ORDERING: Relaxed: as above.
        outcome_counter(outcome, &self.completed, &self.failed, &self.cancelled)
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self, worker: usize) -> SessionMetrics {
        let (completed, failed, cancelled) = (
            self.completed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.cancelled.load(Ordering::Relaxed),
        );
        SessionMetrics {
            worker,
            requests: completed + failed + cancelled,
            completed,
            failed,
            cancelled,
            run_time: Duration::from_nanos(self.run_ns.load(Ordering::Relaxed)),
            waiting_for_room: 0,
        }
    }
}

/// Which of three counters an outcome counts in.
fn outcome_counter<'a>(
    outcome: Outcome,
    completed: &'a AtomicU64,
    failed: &'a AtomicU64,
    cancelled: &'a AtomicU64,
) -> &'a AtomicU64 {
    match outcome {
        Outcome::Completed => completed,
        Outcome::Failed | Outcome::OutOfMemory => failed,
        Outcome::Cancelled | Outcome::Skipped => cancelled,
    }
}

/// The live counters of one worker; written by that worker (and session
/// binding for `sessions`), read by anyone.
#[derive(Default)]
pub(super) struct WorkerCounters {
    pub(super) running: AtomicBool,
    pub(super) completed: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) cancelled: AtomicU64,
    pub(super) busy_ns: AtomicU64,
    pub(super) sessions: AtomicUsize,
    pub(super) recycled: AtomicU64,
    pub(super) recycle_failures: AtomicU64,
    pub(super) wedged: AtomicU64,
    /// Session-close markers in this worker's pinned queue: not requests,
    /// so not counted as queued.
    pub(super) closes_queued: AtomicUsize,
    pub(super) suspended: AtomicUsize,
    pub(super) latency: LatencyRecorder,
}

impl WorkerCounters {
    pub(super) fn record(&self, outcome: Outcome, busy: Duration) {
        // ORDERING: Relaxed: plain statistics, no data hangs on them.
        outcome_counter(outcome, &self.completed, &self.failed, &self.cancelled)
            .fetch_add(1, Ordering::Relaxed);
        self.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The metrics, given the length of the worker's queues (close markers
    /// included) and the version its VM runs.
    pub(super) fn snapshot(&self, in_queues: usize, version: u64) -> WorkerMetrics {
        let mut m = WorkerMetrics {
            queued: in_queues.saturating_sub(self.closes_queued.load(Ordering::Relaxed)),
            running: usize::from(self.running.load(Ordering::Relaxed)),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            sessions: self.sessions.load(Ordering::Relaxed),
            recycled: self.recycled.load(Ordering::Relaxed),
            recycle_failures: self.recycle_failures.load(Ordering::Relaxed),
            wedged: self.wedged.load(Ordering::Relaxed),
            suspended: self.suspended.load(Ordering::Relaxed),
            version,
            queue_wait: LatencyHistogram::default(),
            run_time: LatencyHistogram::default(),
        };
        // After the counters: a request is in these before it is counted.
        (m.queue_wait, m.run_time) = self.latency.snapshot();
        m
    }
}

/// A counter many threads bump: striped over cache lines so submitters on
/// different threads do not fight over one.
pub(super) struct StripedCounter {
    stripes: [CachePadded<AtomicU64>; STRIPES],
}

const STRIPES: usize = 8;

impl StripedCounter {
    pub(super) fn new() -> Self {
        StripedCounter {
            stripes: std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0))),
        }
    }

    pub(super) fn add(&self, n: u64) {
        thread_local! {
            static STRIPE: usize = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::thread::current().id().hash(&mut h);
                h.finish() as usize % STRIPES
            };
        }
        let i = STRIPE.with(|s| *s);
        self.stripes[i].fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn sum(&self) -> u64 {
        self.stripes.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}
