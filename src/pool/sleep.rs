//! How idle workers sleep and how new work wakes them, without lost
//! wake-ups.
//!
//! Each worker has a flag `sleeping[w]` and a `Parker`; `count` is the number
//! of raised flags (a fast "anyone asleep?" check for submitters).
//!
//! Worker `w`, finding no work after its spin:
//! 1. raises `sleeping[w]`, increments `count`;
//! 2. `fence(SeqCst)`;
//! 3. looks at every queue it may take from once more; if any has work (or
//!    the pool is closing) it lowers its flag and goes back to work;
//! 4. otherwise parks. On waking, it lowers its flag if still raised.
//!
//! A submitter:
//! 1. pushes the job;
//! 2. `fence(SeqCst)`;
//! 3. for unkeyed work, if `count > 0`, lowers the first raised flag it finds
//!    (swap, so exactly one submitter claims each sleeper) and unparks that
//!    worker; for pinned work (sessions, broadcast), it does the same for the
//!    one worker that must run it.
//!
//! Why nothing is lost: the two fences order "raise flag; look at queues"
//! against "push; look at flags" (the store-buffer pattern). Either the
//! worker's step 3 sees the job, or the submitter's step 3 sees the flag. A
//! `Parker` keeps one pending unpark, so an unpark that lands between the
//! worker's step 3 and its `park` makes the park return at once.
//!
//! A worker that takes a batch from the global queue into its own deque also
//! wakes a sleeper when the deque is not empty afterwards, so the batch is
//! shared even if it then runs a long request; and a worker about to run any
//! job wakes a sleeper if unkeyed work still waits (the wake-up it consumed
//! may have been meant for that work). Both are hand-offs on top of the
//! protocol, not part of its guarantee.
//!
//! `sleep/loom_tests.rs` checks the protocol under loom (`src/sync/mod.rs`).

use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::sync::{fence, AtomicBool, AtomicUsize, Mutex, Ordering, Parker, Unparker};

pub(super) struct Sleep {
    sleeping: Box<[CachePadded<AtomicBool>]>,
    /// Replaced when a wedged worker's slot gets a new thread; locked only
    /// to unpark, which costs a system call anyway.
    unparkers: Box<[Mutex<Unparker>]>,
    count: CachePadded<AtomicUsize>,
}

impl Sleep {
    /// One slot per worker; returns the parkers, one per worker in order.
    pub(super) fn new(workers: usize) -> (Sleep, Vec<Parker>) {
        let parkers: Vec<Parker> = (0..workers).map(|_| Parker::new()).collect();
        let sleep = Sleep {
            sleeping: (0..workers)
                .map(|_| CachePadded::new(AtomicBool::new(false)))
                .collect(),
            unparkers: parkers
                .iter()
                .map(|p| Mutex::new(p.unparker().clone()))
                .collect(),
            count: CachePadded::new(AtomicUsize::new(0)),
        };
        (sleep, parkers)
    }

    /// Worker side: sleep unless `has_work()` says otherwise after the flag
    /// is raised. `timeout` bounds the sleep (for periodic housekeeping).
    pub(super) fn sleep(
        &self,
        w: usize,
        parker: &Parker,
        timeout: Option<Duration>,
        has_work: impl FnOnce() -> bool,
    ) {
        // ORDERING: SeqCst on the flag and the count, then a SeqCst fence
        // before reading the queues: see the module docs. The flag is raised
        // with a swap, not a store: the same instruction on x86 (a SeqCst
        // store is an `xchg`), and loom misorders a plain store racing a
        // submitter's swap (loom issue #254), raising false alarms.
        self.sleeping[w].swap(true, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !has_work() {
            match timeout {
                Some(t) => parker.park_timeout(t),
                None => parker.park(),
            }
        }
        self.lower(w);
    }

    /// Lowers `w`'s flag if raised; true if this call lowered it.
    fn lower(&self, w: usize) -> bool {
        if self.sleeping[w].swap(false, Ordering::SeqCst) {
            self.count.fetch_sub(1, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Submitter side, after pushing unkeyed work: wake one sleeper, if any.
    pub(super) fn wake_any(&self) {
        // ORDERING: pairs with the worker's fence; see the module docs.
        fence(Ordering::SeqCst);
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        for w in 0..self.sleeping.len() {
            if self.lower(w) {
                self.unparkers[w].lock().unpark();
                return;
            }
        }
    }

    /// True if some worker is (about to be) asleep. A hint: a worker that
    /// falls asleep after this returned false re-checks the queues first.
    pub(super) fn anyone_asleep(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Submitter side, after pushing work only worker `w` may run.
    pub(super) fn wake(&self, w: usize) {
        // ORDERING: pairs with the worker's fence; see the module docs. The
        // flag is read before it is swapped: a worker that is awake (the
        // busy case) costs its submitters a read of a shared line, not a
        // write to it.
        fence(Ordering::SeqCst);
        if self.sleeping[w].load(Ordering::SeqCst) && self.lower(w) {
            self.unparkers[w].lock().unpark();
        }
    }

    /// Gives slot `w` to a new thread, woken through `unparker`.
    pub(super) fn replace(&self, w: usize, unparker: Unparker) {
        *self.unparkers[w].lock() = unparker;
        self.wake(w);
    }

    /// Wakes every worker (shutdown).
    pub(super) fn wake_all(&self) {
        fence(Ordering::SeqCst);
        for w in 0..self.sleeping.len() {
            self.lower(w);
            self.unparkers[w].lock().unpark();
        }
    }
}

#[cfg(all(test, mlua_isle_loom))]
mod loom_tests;
