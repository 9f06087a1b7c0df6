//! The requests a VM holds suspended (the `async` feature), and how their
//! futures wake the VM.
//!
//! Each suspended request has a slot; its waker pushes the slot onto the
//! VM's `Wakeups` list and *nudges* the VM thread (the isle sends its VM a
//! message; a pool worker is unparked), once until the VM takes the list.
//! The VM polls what woke between other requests (`Vm::resume_woken`).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Wake, Waker};

use parking_lot::Mutex;

use super::job::Paused;

/// What a VM's wakers share with it: which slots woke, and how to tell its
/// thread.
pub(crate) struct Wakeups {
    woken: Mutex<Vec<usize>>,
    /// Raised by a waker after pushing, lowered by the VM before it takes
    /// the list: while raised, the VM has wake-ups to see, and has been
    /// (or is being) nudged.
    nudged: AtomicBool,
    nudge: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Wakeups {
    /// True if some suspended request woke and the VM has not taken it yet.
    pub(crate) fn any(&self) -> bool {
        // ORDERING: SeqCst, paired with the one in `push`: a worker going
        // to sleep raises its flag, fences, then looks here; a waker pushes,
        // raises this, fences (in `Sleep::wake`), then looks at the flag.
        self.nudged.load(Ordering::SeqCst)
    }

    fn push(&self, slot: usize) {
        self.woken.lock().push(slot);
        // ORDERING: see `any`.
        if !self.nudged.swap(true, Ordering::SeqCst) {
            if let Some(nudge) = self.nudge.get() {
                nudge();
            }
        }
    }

    /// The VM takes what woke.
    fn take(&self) -> Vec<usize> {
        // ORDERING: lowered before the list is taken, so a wake-up after
        // the take nudges again.
        self.nudged.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.woken.lock())
    }
}

/// The waker of one slot.
struct SlotWaker {
    slot: usize,
    /// Set while the slot is on the list: one entry per wake-up burst.
    queued: AtomicBool,
    wakeups: Arc<Wakeups>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // ORDERING: AcqRel: the VM lowers it (Release) before polling, so a
        // wake-up during the poll queues the slot again.
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.wakeups.push(self.slot);
        }
    }
}

struct Slot {
    waker: Arc<SlotWaker>,
    paused: Option<(Paused, u64)>,
}

/// The suspended requests of one VM, by slot. A stale waker (of a request
/// that finished) may wake whatever holds its slot now: a spurious poll,
/// which futures allow.
pub(crate) struct Suspension {
    pub(super) wakeups: Arc<Wakeups>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    count: Cell<usize>,
}

impl Suspension {
    pub(super) fn new() -> Suspension {
        Suspension {
            wakeups: Arc::new(Wakeups {
                woken: Mutex::new(Vec::new()),
                nudged: AtomicBool::new(false),
                nudge: OnceLock::new(),
            }),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            count: Cell::new(0),
        }
    }

    /// Sets how a wake-up reaches the VM thread (once).
    pub(super) fn on_wake(&self, nudge: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wakeups.nudge.set(nudge);
    }

    /// A free slot and its waker, for a request about to run.
    pub(super) fn reserve(&self) -> (usize, Waker) {
        let mut slots = self.slots.borrow_mut();
        let slot = self.free.borrow_mut().pop().unwrap_or_else(|| {
            let slot = slots.len();
            slots.push(Slot {
                waker: Arc::new(SlotWaker {
                    slot,
                    queued: AtomicBool::new(false),
                    wakeups: self.wakeups.clone(),
                }),
                paused: None,
            });
            slots.len() - 1
        });
        (slot, Waker::from(slots[slot].waker.clone()))
    }

    /// Gives back a slot whose request did not suspend, or has resolved.
    pub(super) fn release(&self, slot: usize) {
        self.free.borrow_mut().push(slot);
    }

    /// Keeps a suspended request in its slot; `tag` is the owner's (a
    /// pool's session id, or 0).
    pub(super) fn park(&self, slot: usize, paused: Paused, tag: u64) {
        self.slots.borrow_mut()[slot].paused = Some((paused, tag));
        self.count.set(self.count.get() + 1);
    }

    /// Takes the request out of `slot` to poll it, with its waker.
    pub(super) fn unpark(&self, slot: usize) -> Option<(Paused, u64, Waker)> {
        let mut slots = self.slots.borrow_mut();
        let s = slots.get_mut(slot)?;
        // ORDERING: see `SlotWaker::wake_by_ref`.
        s.waker.queued.store(false, Ordering::Release);
        let (paused, tag) = s.paused.take()?;
        self.count.set(self.count.get() - 1);
        Some((paused, tag, Waker::from(s.waker.clone())))
    }

    /// The slots that woke since the last call.
    pub(super) fn woken(&self) -> Vec<usize> {
        self.wakeups.take()
    }

    /// Every occupied slot (to stop them all).
    pub(super) fn occupied(&self) -> Vec<usize> {
        let slots = self.slots.borrow();
        (0..slots.len())
            .filter(|&i| slots[i].paused.is_some())
            .collect()
    }

    /// How many requests are suspended.
    pub(super) fn count(&self) -> usize {
        self.count.get()
    }
}
