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
//! The same thread watches for wedged VMs. A stop answers a running
//! request's caller at once (`request/state.rs`), and the stopper then asks the
//! request's owner to `watch` it: one grace period later, if a VM is still
//! inside that request, the owner's `on_overdue` handler replaces the VM.
//! Owners are found by id in a small registry, so a request carries no
//! reference to its owner (taken only on this slow path).
//!
//! The thread starts on the first deadline and is joined by `shutdown`, which
//! the owner calls after its VM threads have finished.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{Cancel, CancelToken, Reason};

/// Cheap-to-clone handle to the deadline thread of one isle or pool.
#[derive(Clone)]
pub(crate) struct Timer {
    shared: Arc<TimerState>,
}

struct TimerState {
    /// Thread name, for the lazily started thread.
    name: String,
    /// The owner (isle or pool) this timer serves.
    owner: u64,
    /// How long a VM may take to let go of a stopped request.
    grace: Duration,
    /// Called (on the timer thread) with a request a VM still runs one grace
    /// period after it was stopped.
    on_overdue: Mutex<Option<Overdue>>,
    state: Mutex<State>,
    /// Signalled when an earlier deadline arrives or on shutdown.
    cond: Condvar,
}

/// An owner's handler for a VM that did not let go of a stopped request.
pub(crate) type Overdue = Arc<dyn Fn(&Arc<dyn Cancel>) + Send + Sync>;

/// Every live timer by owner id, for `watch`.
static OWNERS: Mutex<Option<HashMap<u64, Weak<TimerState>>>> = Mutex::new(None);

/// Has `req`'s owner check, one grace period from now, that its VM has let
/// go of it (it was stopped while running). Slow path: a registry lookup.
pub(crate) fn watch(req: &Arc<dyn Cancel>) {
    let owner = req.header().owner;
    let timer = OWNERS
        .lock()
        .as_ref()
        .and_then(|m| m.get(&owner).and_then(Weak::upgrade));
    if let Some(shared) = timer {
        // A grace too long to represent means "never wedged".
        if let Some(at) = Instant::now().checked_add(shared.grace) {
            Timer { shared }.push(TimerEntry {
                at,
                req: Arc::downgrade(req),
                kind: Kind::Watch,
            });
        }
    }
}

struct State {
    heap: BinaryHeap<TimerEntry>,
    /// Compact when the heap grows past this.
    compact_at: usize,
    thread: Option<JoinHandle<()>>,
    stopped: bool,
}

struct TimerEntry {
    at: Instant,
    req: Weak<dyn Cancel>,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A time limit: stop the request with `Timeout`.
    Deadline,
    /// A stopped request: is a VM still inside it?
    Watch,
}

// Min-heap on `at`.
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for TimerEntry {}

impl TimerEntry {
    fn live(&self) -> bool {
        match self.kind {
            Kind::Deadline => self.req.upgrade().is_some_and(|r| !r.header().is_done()),
            // Done already (the stopper resolved it); the VM may still run it.
            Kind::Watch => self.req.strong_count() > 0,
        }
    }
}

const MIN_COMPACT: usize = 1024;

impl Timer {
    /// The timer of owner `owner`, whose VMs get `grace` to let go of a
    /// stopped request.
    pub(crate) fn new(name: String, owner: u64, grace: Duration) -> Timer {
        let shared = Arc::new(TimerState {
            name,
            owner,
            grace,
            on_overdue: Mutex::new(None),
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                compact_at: MIN_COMPACT,
                thread: None,
                stopped: false,
            }),
            cond: Condvar::new(),
        });
        OWNERS
            .lock()
            .get_or_insert_with(HashMap::new)
            .insert(owner, Arc::downgrade(&shared));
        Timer { shared }
    }

    /// Sets the handler for VMs that do not let go of a stopped request.
    pub(crate) fn on_overdue(&self, handler: Overdue) {
        *self.shared.on_overdue.lock() = Some(handler);
    }

    /// The grace period VMs get to let go of a stopped request.
    pub(crate) fn grace(&self) -> Duration {
        self.shared.grace
    }

    /// Stops the request with `Timeout` at `at` (now, if `at` has passed).
    pub(crate) fn schedule(&self, at: Instant, token: &CancelToken) {
        if at <= Instant::now() {
            token.stop(Reason::Timeout);
            return;
        }
        self.push(TimerEntry {
            at,
            req: token.downgrade(),
            kind: Kind::Deadline,
        });
    }

    fn push(&self, entry: TimerEntry) {
        let at = entry.at;
        let mut st = self.shared.state.lock();
        if st.stopped {
            // The owner has shut down; every request of it has resolved.
            return;
        }
        let earliest = st.heap.peek().is_none_or(|e| at < e.at);
        st.heap.push(entry);
        if st.heap.len() > st.compact_at {
            st.heap.retain(TimerEntry::live);
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
        if let Some(m) = OWNERS.lock().as_mut() {
            m.remove(&self.shared.owner);
        }
        *self.shared.on_overdue.lock() = None;
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

impl TimerState {
    /// Runs the owner's handler for a request a VM did not let go of, on a
    /// thread of its own: replacing the VM runs `init`, which may take long
    /// (or never end), and the deadlines of the owner's other requests must
    /// not wait for it. If no thread can be started, it runs here.
    fn overdue(&self, handler: Overdue, req: Arc<dyn Cancel>) {
        let (h, r) = (handler.clone(), req.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{}-wedge", self.name))
            .spawn(move || h(&r));
        if spawned.is_err() {
            handler(&req);
        }
    }

    fn run(&self) {
        let mut st = self.state.lock();
        let mut due = Vec::new();
        while !st.stopped {
            let now = Instant::now();
            while st.heap.peek().is_some_and(|e| e.at <= now) {
                if let Some(e) = st.heap.pop() {
                    due.push((e.req, e.kind));
                }
            }
            if !due.is_empty() {
                // Stop outside the lock: stopping resolves and wakes tasks.
                parking_lot::MutexGuard::unlocked(&mut st, || {
                    for (req, kind) in due.drain(..) {
                        let Some(req) = req.upgrade() else { continue };
                        // Stopping wakes the caller's waker, and may drop
                        // the request: user code. Keep this thread alive
                        // whatever it does.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| match kind {
                            Kind::Deadline => CancelToken::of(req).stop(Reason::Timeout),
                            Kind::Watch => {
                                let handler = self.on_overdue.lock().clone();
                                if let Some(handler) = handler {
                                    self.overdue(handler, req);
                                }
                            }
                        }));
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
