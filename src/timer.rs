//! Time limits: one deadline thread per isle or pool, not a timer per
//! request.
//!
//! A deadline is a heap entry holding a weak reference to its request. The
//! thread sleeps until the earliest entry is due and then stops that request
//! with `Reason::Timeout`, exactly as a cancel would: a queued request
//! resolves `Timeout` at once, a running one is interrupted by the VM's hook.
//!
//! Entries of requests that finish early stay in the heap until they are due
//! or until the heap is compacted; compaction runs when the heap has doubled
//! since the last one, so its cost is amortised O(1) per entry and the heap
//! stays within twice the number of requests that still have a live deadline.
//!
//! The thread starts on the first deadline and is joined by `shutdown`, which
//! the owner calls after its VM threads have finished.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::request::Cancel;
use crate::token::{CancelToken, Reason};

/// Cheap-to-clone handle to the deadline thread of one isle or pool.
#[derive(Clone)]
pub(crate) struct Timer {
    shared: Arc<Shared>,
}

struct Shared {
    /// Thread name, for the lazily started thread.
    name: String,
    state: Mutex<State>,
    /// Signalled when an earlier deadline arrives or on shutdown.
    cond: Condvar,
}

struct State {
    heap: BinaryHeap<Entry>,
    /// Compact when the heap grows past this.
    compact_at: usize,
    thread: Option<JoinHandle<()>>,
    stopped: bool,
}

struct Entry {
    at: Instant,
    req: Weak<dyn Cancel>,
}

// Min-heap on `at`.
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}

impl Entry {
    fn live(&self) -> bool {
        self.req.upgrade().is_some_and(|r| !r.header().is_done())
    }
}

const MIN_COMPACT: usize = 1024;

impl Timer {
    pub(crate) fn new(name: String) -> Timer {
        Timer {
            shared: Arc::new(Shared {
                name,
                state: Mutex::new(State {
                    heap: BinaryHeap::new(),
                    compact_at: MIN_COMPACT,
                    thread: None,
                    stopped: false,
                }),
                cond: Condvar::new(),
            }),
        }
    }

    /// Stops the request with `Timeout` at `at` (now, if `at` has passed).
    pub(crate) fn schedule(&self, at: Instant, token: &CancelToken) {
        if at <= Instant::now() {
            token.stop(Reason::Timeout);
            return;
        }
        let mut st = self.shared.state.lock();
        if st.stopped {
            // The owner has shut down; every request of it has resolved.
            return;
        }
        let earliest = st.heap.peek().is_none_or(|e| at < e.at);
        st.heap.push(Entry {
            at,
            req: token.downgrade(),
        });
        if st.heap.len() > st.compact_at {
            st.heap.retain(Entry::live);
            st.compact_at = (st.heap.len() * 2).max(MIN_COMPACT);
        }
        if st.thread.is_none() {
            let shared = self.shared.clone();
            // If the thread cannot start, deadlines wait for the next
            // schedule() to try again; nothing else depends on it.
            st.thread = std::thread::Builder::new()
                .name(format!("{}-deadline", self.shared.name))
                .spawn(move || shared.run())
                .ok();
        } else if earliest {
            self.shared.cond.notify_one();
        }
    }

    /// Stops the thread and joins it. Idempotent.
    pub(crate) fn shutdown(&self) {
        let thread = {
            let mut st = self.shared.state.lock();
            st.stopped = true;
            st.heap.clear();
            st.thread.take()
        };
        self.shared.cond.notify_one();
        if let Some(t) = thread {
            // The last handle of the owner can be dropped on this very
            // thread (by a waker); it then ends on its own.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Shared {
    fn run(&self) {
        let mut st = self.state.lock();
        let mut due = Vec::new();
        while !st.stopped {
            let now = Instant::now();
            while st.heap.peek().is_some_and(|e| e.at <= now) {
                if let Some(e) = st.heap.pop() {
                    due.push(e.req);
                }
            }
            if !due.is_empty() {
                // Stop outside the lock: stopping resolves and wakes tasks.
                parking_lot::MutexGuard::unlocked(&mut st, || {
                    for req in due.drain(..) {
                        if let Some(req) = req.upgrade() {
                            // Stopping wakes the caller's waker, and may drop
                            // the request: user code. Keep this thread alive
                            // whatever it does.
                            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                req.stop(Reason::Timeout)
                            }));
                        }
                    }
                });
                continue;
            }
            match st.heap.peek().map(|e| e.at) {
                Some(at) => {
                    self.cond.wait_until(&mut st, at);
                }
                None => self.cond.wait(&mut st),
            }
        }
    }
}
