//! The state every worker and handle of one pool shares: the queues, the
//! sleep/wake slots, the session table and the counters.

use std::iter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Steal, Stealer, Worker as Deque};
use crossbeam_utils::CachePadded;

use super::fair::FairSlot;
use super::metrics::{PoolMetrics, StripedCounter, WorkerCounters};
use super::reload::{Control, Reloads};
use super::session::{Binding, Sessions};
use super::sleep::Sleep;
use crate::host::Lifecycle;
use crate::metrics::LatencyHistogram;
use crate::request::{Admission, Room};
use crate::vm::Job;
use crate::IsleError;

/// Work only one worker may run: never stolen.
pub(super) enum Pinned {
    /// A session request, run in the session's environment.
    Session(Arc<Binding>, Job),
    /// One VM's share of a broadcast.
    Broadcast(Job),
    /// Drop the environment of this session (by binding id).
    Close(u64),
    /// A request for a value this VM holds (a `LuaHandle`'s, made by
    /// unkeyed work): served as a broadcast is, but counted as a request.
    Direct(Job),
}

/// What a worker found to do.
pub(super) enum Found {
    Unkeyed(Job),
    Pinned(Pinned),
}

pub(super) struct Shared {
    /// Unkeyed work from outside the pool.
    pub(super) injector: Injector<Job>,
    /// Thieves' ends of the workers' deques.
    pub(super) stealers: Box<[Stealer<Job>]>,
    /// Each worker's session/broadcast queue: where submitters put it.
    pub(super) pinned: Box<[Injector<Pinned>]>,
    /// Each worker's session work, moved from `pinned` and served fairly
    /// across keys (see `fair.rs`).
    pub(super) fair: Box<[CachePadded<FairSlot>]>,
    /// Each worker's control queue (reloads): taken before other work.
    pub(super) control: Box<[Injector<Control>]>,
    /// With a `session_idle_timeout`: each worker's sessions bound since it
    /// last swept (see `bind`), so that one that never runs a request there
    /// (opened by a reservation) expires too.
    pub(super) bound: Box<[Injector<Arc<Binding>>]>,
    /// The committed reloads and the one in flight.
    pub(super) reloads: Reloads,
    /// The version of the code each worker's VM runs (see `reload`).
    pub(super) versions: Arc<[AtomicU64]>,
    pub(super) sleep: Sleep,
    /// Shutdown flags, slot generations and VM interrupts (see `host`).
    pub(super) life: Arc<Lifecycle>,
    pub(super) sessions: Sessions,
    pub(super) counters: Box<[CachePadded<WorkerCounters>]>,
    pub(super) submitted: StripedCounter,
    pub(super) rejected: AtomicU64,
    pub(super) discarded: AtomicU64,
    pub(super) sessions_expired: AtomicU64,
    /// The room `queue_capacity` gives (`None`: unbounded).
    pub(super) room: Option<Arc<Room>>,
    /// `session_queue_capacity`: each session's own bound.
    pub(super) session_capacity: Option<usize>,
    /// `session_idle_timeout`.
    pub(super) idle_timeout: Option<Duration>,
    /// `recycle_after` (requests) and `recycle_when_memory_above` (bytes).
    pub(super) recycle_after: Option<u64>,
    pub(super) recycle_above: Option<usize>,
    /// Zero point of session `last_used` stamps.
    pub(super) epoch: Instant,
    /// `fifo_sessions`: pinned work is taken in arrival order, not fairly.
    pub(super) fifo_sessions: bool,
    /// The pool, for the `LuaHandle`s its VMs make.
    pub(super) home: crate::handle::route::HomeCell,
}

impl Shared {
    pub(super) fn workers(&self) -> usize {
        self.pinned.len()
    }

    /// Nanoseconds since `epoch`.
    pub(super) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Counts a request against `queue_capacity`, holding `admission` (a
    /// permit's room) or room taken now; false if the queue is full. Only
    /// live queued requests count: the request gives its room back when it
    /// starts or resolves (see `Header::admit`), not when a worker happens
    /// to take it off a queue.
    pub(super) fn admit(&self, job: &Job, admission: Option<Admission>) -> bool {
        let admission = match (admission, &self.room) {
            (Some(a), _) => a,
            (None, None) => return true,
            (None, Some(room)) => match room.try_acquire() {
                Some(a) => a,
                None => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            },
        };
        if !admission.is_empty() {
            job.admit(admission);
        }
        true
    }

    /// Finds work for worker `w`: its pinned queue and its own deque first
    /// (alternating which comes first, so neither starves), then a batch
    /// from the global queue, then other workers' deques.
    ///
    /// A worker whose deque thieves cannot reach (one that replaced a wedged
    /// worker: `stealers[w]` still names the stuck one's deque) takes one
    /// job at a time from the global queue (`batch` false), so no job waits
    /// where only it can run it.
    ///
    /// Pinned work is taken fairly across session keys (`fair.rs`);
    /// `generation` is the worker's, which must report each session item it
    /// takes as done (`FairSlot::done`) before it looks for work again.
    pub(super) fn find(
        &self,
        w: usize,
        local: &Deque<Job>,
        pinned_first: bool,
        batch: bool,
        generation: u64,
    ) -> Option<Found> {
        let pinned = || {
            if self.fifo_sessions {
                steal_one(|| self.pinned[w].steal()).map(Found::Pinned)
            } else {
                self.fair[w]
                    .next(&self.pinned[w], generation)
                    .map(Found::Pinned)
            }
        };
        let own = || local.pop().map(Found::Unkeyed);
        let first = if pinned_first {
            pinned().or_else(own)
        } else {
            own().or_else(pinned)
        };
        first.or_else(|| self.steal_unkeyed(w, local, batch).map(Found::Unkeyed))
    }

    fn steal_unkeyed(&self, w: usize, local: &Deque<Job>, batch: bool) -> Option<Job> {
        let n = self.stealers.len();
        loop {
            let mut retry = false;
            let from_injector = if batch {
                self.injector.steal_batch_and_pop(local)
            } else {
                self.injector.steal()
            };
            match from_injector {
                Steal::Success(job) => {
                    if !local.is_empty() {
                        // Share the rest of the batch with a sleeper.
                        self.sleep.wake_any();
                    }
                    return Some(job);
                }
                Steal::Retry => retry = true,
                Steal::Empty => {}
            }
            // Other workers' deques, starting after our own, and last the
            // one `stealers[w]` names (ours, popped already; or that of the
            // stuck worker this one replaced).
            for i in (w + 1..n).chain(0..=w) {
                match self.stealers[i].steal() {
                    Steal::Success(job) => return Some(job),
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
            }
            if !retry {
                return None;
            }
        }
    }

    /// True if unkeyed work waits anywhere (global queue or a deque).
    pub(super) fn has_unkeyed_work(&self) -> bool {
        !self.injector.is_empty() || self.stealers.iter().any(|s| !s.is_empty())
    }

    /// Work on worker `w`'s control queue, if any.
    pub(super) fn control(&self, w: usize) -> Option<Control> {
        if self.control[w].is_empty() {
            return None;
        }
        steal_one(|| self.control[w].steal())
    }

    /// True if worker `w` could find anything to do.
    /// True if work only worker `w` may take waits: sessions' requests
    /// (also those released by a request that just resolved), closes,
    /// broadcasts, reloads.
    pub(super) fn has_pinned_work(&self, w: usize) -> bool {
        !self.control[w].is_empty() || !self.pinned[w].is_empty() || self.fair[w].ready() > 0
    }

    pub(super) fn has_work(&self, w: usize, local: &Deque<Job>) -> bool {
        !self.control[w].is_empty()
            || !self.pinned[w].is_empty()
            || self.fair[w].ready() > 0
            || !local.is_empty()
            || !self.injector.is_empty()
            || self.stealers.iter().any(|s| !s.is_empty())
    }

    /// Resolves everything still queued with `Shutdown` (after the workers
    /// have exited).
    pub(super) fn drain(&self) {
        let discard = |job: Job| {
            self.discarded.fetch_add(1, Ordering::Relaxed);
            job.abandon(IsleError::Shutdown);
        };
        while let Some(job) = steal_one(|| self.injector.steal()) {
            discard(job);
        }
        for s in self.stealers.iter() {
            while let Some(job) = steal_one(|| s.steal()) {
                discard(job);
            }
        }
        for q in self.control.iter() {
            while let Some(c) = steal_one(|| q.steal()) {
                match c {
                    Control::Reload(job) => job.abandon(IsleError::Shutdown),
                    // Dropped: a rollback's sender goes unsent.
                    Control::Rollback(..) | Control::Commit(_) => {}
                }
            }
        }
        for ((q, fair), counters) in
            iter::zip(self.pinned.iter(), self.fair.iter()).zip(self.counters.iter())
        {
            let queued = fair.take_all().into_iter();
            for p in queued.chain(iter::from_fn(|| steal_one(|| q.steal()))) {
                match p {
                    Pinned::Session(_, job) | Pinned::Direct(job) => discard(job),
                    Pinned::Broadcast(job) => job.abandon(IsleError::Shutdown),
                    Pinned::Close(_) => {
                        counters.closes_queued.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Requests (and session closes) waiting in worker `w`'s own queues.
    pub(super) fn queued_on(&self, w: usize) -> usize {
        self.stealers[w].len() + self.pinned[w].len() + self.fair[w].len()
    }

    pub(super) fn metrics(&self) -> PoolMetrics {
        let workers: Vec<_> = (0..self.workers())
            // ORDERING: Relaxed: statistics.
            .map(|w| {
                let version = self.versions[w].load(Ordering::Relaxed);
                self.counters[w].snapshot(self.queued_on(w), version)
            })
            .collect();
        let (mut queue_wait, mut run_time) = Default::default();
        for w in &workers {
            LatencyHistogram::merge(&mut queue_wait, &w.queue_wait);
            LatencyHistogram::merge(&mut run_time, &w.run_time);
        }
        PoolMetrics {
            queue_wait,
            run_time,
            workers,
            unkeyed_queued: self.injector.len(),
            sessions_open: self.sessions.len(),
            sessions_expired: self.sessions_expired.load(Ordering::Relaxed),
            submitted: self.submitted.sum(),
            rejected: self.rejected.load(Ordering::Relaxed),
            waiting_for_room: self.room.as_ref().map_or(0, |r| r.waiting()),
            discarded: self.discarded.load(Ordering::Relaxed),
            version: self.reloads.version(),
        }
    }
}

/// Steals one item, retrying while the queue says `Retry`.
pub(super) fn steal_one<T>(mut steal: impl FnMut() -> Steal<T>) -> Option<T> {
    loop {
        match steal() {
            Steal::Success(t) => return Some(t),
            Steal::Empty => return None,
            Steal::Retry => {}
        }
    }
}
