//! Replacing a wedged worker: one still inside a request that was stopped a
//! grace period ago (stuck in a Rust callback or a C function no hook
//! reaches).
//!
//! The stopper has answered the request's caller already. What is left is
//! the VM's queue: a fresh worker thread (its VM started with `init`) takes
//! the slot, the stuck thread's generation is retired so it exits when it
//! gets back (freeing its VM; see `Worker::retire`), and the sessions bound
//! to the slot are marked lost: their state was in the stuck VM.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_deque::Worker as Deque;

use super::builder::WorkerSlot;
use super::PoolInner;
use crate::host::Starting;
use crate::request::Cancel;
use crate::sync::Parker;

impl PoolInner {
    /// The timer's wedge check for `req`, stopped one grace period ago.
    pub(super) fn replace_if_running(&self, req: &Arc<dyn Cancel>) {
        let shared = &*self.shared;
        self.host.replace_if_running(
            req,
            |w, generation| {
                let parker = Parker::new();
                let unparker = parker.unparker().clone();
                let (go_tx, go_rx) = crossbeam_channel::bounded(1);
                let slot = WorkerSlot {
                    index: w,
                    generation,
                    local: Deque::new_fifo(),
                    parker,
                    batch: false,
                };
                // The new thread waits for `go`, which carries the sessions
                // lost with the stuck VM: marked only once it takes over.
                match self
                    .spawner
                    .spawn(slot, Some(go_rx))
                    .and_then(Starting::ready)
                {
                    Ok(fresh) => Some((fresh, (go_tx, unparker))),
                    Err(_) => {
                        // `init` failed (or no thread): the stuck worker
                        // keeps the slot.
                        shared.counters[w]
                            .recycle_failures
                            .fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            },
            |w, (go, unparker)| {
                let lost = shared.sessions.mark_lost(w);
                for b in &lost {
                    b.uncount(shared);
                }
                let counters = &shared.counters[w];
                counters.running.store(false, Ordering::Relaxed);
                counters.wedged.fetch_add(1, Ordering::Relaxed);
                // The stuck VM's suspended requests were stopped with the
                // hand-over (`Lifecycle::hand_over_if_running`) and are
                // never counted by it (it drops them if it gets back):
                // counted here, as stopped, and the fresh VM has none.
                // ORDERING: Relaxed: a statistic; the stuck worker no longer
                // writes it (`Worker::count_suspended` once replaced).
                for _ in 0..counters.suspended.swap(0, Ordering::Relaxed) {
                    counters.record(crate::vm::Outcome::Cancelled, std::time::Duration::ZERO);
                }
                shared.sleep.replace(w, unparker);
                let _ = go.send(lost);
            },
        );
    }
}
