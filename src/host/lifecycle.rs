//! The owner's life as its VM threads and its handles share it: the
//! shutdown flags, which thread holds each slot, and which threads have
//! ended. See the module docs of `host` for the protocol.

use std::collections::HashSet;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::interrupt::Interrupt;
use crate::request::Cancel;

/// What an owner's VM threads and handles share; see the module docs.
pub(crate) struct Lifecycle {
    /// Set by shutdown: new requests resolve `Shutdown` without queueing,
    /// and an idle VM thread exits once nothing is queued for it.
    closed: AtomicBool,
    /// Set to abort (last handle dropped, or `shutdown_timeout` expired):
    /// each VM's hook stops its running request, and VM threads resolve
    /// queued requests `Shutdown` instead of running them. Shared with each
    /// VM's hook.
    abort: Arc<AtomicBool>,
    /// Set once no VM thread serves the queues any more (joined or
    /// detached): whoever finds a job queued after that resolves it.
    stopped: AtomicBool,
    /// Per slot, the generation of the thread that holds it; moved on when
    /// a wedged thread is replaced, which then exits as soon as it gets
    /// back.
    generations: Box<[AtomicU64]>,
    /// The last generation given out: each VM thread started after the
    /// first ones has its own, so an exit report names one thread only.
    last_generation: AtomicU64,
    /// Per slot, the interrupt state of the VM serving it: to stop its
    /// running request (even a Rust callback polling its token), and to
    /// tell whether it still runs a stopped request.
    interrupts: Box<[Mutex<Option<Arc<Interrupt>>>]>,
    /// VM threads (slot, generation) that have ended, or were found wedged
    /// while shutting down: shutdown waits on these, never on a join that
    /// might not return.
    exits: Mutex<Exits>,
    exited: Condvar,
}

#[derive(Default)]
struct Exits {
    ended: HashSet<(usize, u64)>,
    wedged: HashSet<(usize, u64)>,
}

impl Lifecycle {
    /// A lifecycle for `slots` VM threads, each at generation 0.
    pub(crate) fn new(slots: usize) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            closed: AtomicBool::new(false),
            abort: Arc::new(AtomicBool::new(false)),
            stopped: AtomicBool::new(false),
            generations: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            last_generation: AtomicU64::new(0),
            interrupts: (0..slots).map(|_| Mutex::new(None)).collect(),
            exits: Mutex::new(Exits::default()),
            exited: Condvar::new(),
        })
    }

    /// True once shutdown has begun.
    pub(crate) fn is_closed(&self) -> bool {
        // ORDERING: Acquire pairs with the SeqCst store in `close`; a flag
        // checked again under the queues' own synchronisation.
        self.closed.load(Ordering::Acquire)
    }

    /// True once the owner aborts: queued requests are not to be run.
    pub(crate) fn is_aborting(&self) -> bool {
        // ORDERING: as in `is_closed`.
        self.abort.load(Ordering::Acquire)
    }

    /// The abort flag, for the hooks of the VMs this owner starts.
    pub(crate) fn abort_flag(&self) -> Arc<AtomicBool> {
        self.abort.clone()
    }

    /// A generation no VM thread has had (the first ones have 0).
    pub(super) fn new_generation(&self) -> u64 {
        // ORDERING: Relaxed: only uniqueness matters.
        self.last_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// False once a replacement has taken `slot` from `generation`.
    pub(crate) fn is_current(&self, slot: usize, generation: u64) -> bool {
        // ORDERING: Acquire pairs with the Release store in `hand_over`.
        self.generations[slot].load(Ordering::Acquire) == generation
    }

    /// Gives `slot` to `generation` if its VM is still inside `req`, and
    /// returns whether it did. Decided under the lock the VM takes to leave
    /// a request: a VM that gets back after this sees it was replaced (it
    /// checks `is_current` after each request) and exits; one that got back
    /// before keeps its slot, and serves on alone.
    pub(super) fn hand_over_if_running(
        &self,
        slot: usize,
        generation: u64,
        req: &Arc<dyn Cancel>,
    ) -> bool {
        let Some(interrupt) = self.interrupts[slot].lock().clone() else {
            return false;
        };
        let handed = interrupt.while_running(req, || {
            // ORDERING: Release pairs with `is_current`'s Acquire (the lock
            // `while_running` holds orders it before the VM's next look).
            self.generations[slot].store(generation, Ordering::Release);
        });
        // The stuck VM's suspended requests (the `async` feature) cannot
        // go on while it is stuck: they resolve now (`Shutdown`), and it
        // drops their work if it ever gets back.
        #[cfg(feature = "async")]
        if handed {
            interrupt.stop_suspended(crate::request::Reason::Shutdown);
        }
        handed
    }

    /// Records the VM now serving `slot` (its first, a recycled one, or a
    /// replacement).
    pub(crate) fn serve_with(&self, slot: usize, interrupt: Arc<Interrupt>) {
        *self.interrupts[slot].lock() = Some(interrupt);
    }

    /// The slot whose VM is still inside `req`, if any.
    pub(super) fn running(&self, req: &Arc<dyn Cancel>) -> Option<usize> {
        (0..self.interrupts.len()).find(|&s| {
            self.interrupts[s]
                .lock()
                .as_ref()
                .is_some_and(|i| i.runs(req))
        })
    }

    /// Call after queueing a job (and waking its VM thread): if the owner
    /// stopped meanwhile, nobody else will see the job, so `drain` resolves
    /// it.
    pub(crate) fn after_push(&self, drain: impl FnOnce()) {
        // ORDERING: the fence orders the push before the load; it pairs with
        // the one in `Host::finish`: either its drain sees our job, or we
        // see `stopped` and drain it ourselves.
        fence(Ordering::SeqCst);
        if self.stopped.load(Ordering::SeqCst) {
            drain();
        }
    }

    /// Shutdown begins (see the module docs).
    pub(crate) fn close(&self) {
        // ORDERING: SeqCst, before the wake-ups that make idle VM threads
        // look at it.
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Raises the abort flag and stops every running request.
    pub(crate) fn abort(&self) {
        // ORDERING: SeqCst: `Interrupt::enter` reads it after publishing its
        // token, and `abort_running` takes that token's lock: either the
        // request sees the flag, or we see its token.
        self.abort.store(true, Ordering::SeqCst);
        for slot in self.interrupts.iter() {
            if let Some(i) = slot.lock().as_ref() {
                i.abort_running();
            }
        }
    }

    /// No VM thread serves the queues any more.
    pub(super) fn stop(&self) {
        // ORDERING: pairs with the fence in `after_push`.
        self.stopped.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// VM thread (slot, generation) has ended, however it ended.
    pub(super) fn ended(&self, thread: (usize, u64)) {
        self.exits.lock().ended.insert(thread);
        self.exited.notify_all();
    }

    /// True once VM thread (slot, generation) has ended.
    pub(super) fn has_ended(&self, thread: (usize, u64)) -> bool {
        self.exits.lock().ended.contains(&thread)
    }

    /// VM thread (slot, generation) will not stop on its own: shutdown
    /// stops waiting for it.
    pub(super) fn wedged(&self, thread: (usize, u64)) {
        self.exits.lock().wedged.insert(thread);
        self.exited.notify_all();
    }

    /// Blocks until every thread of `threads` has ended or been found
    /// wedged (true), or `deadline` passes (false).
    pub(super) fn wait(&self, threads: &[(usize, u64)], deadline: Option<Instant>) -> bool {
        let mut exits = self.exits.lock();
        loop {
            if threads
                .iter()
                .all(|t| exits.ended.contains(t) || exits.wedged.contains(t))
            {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.exited.wait_until(&mut exits, d).timed_out() {
                        return false;
                    }
                }
                None => self.exited.wait(&mut exits),
            }
        }
    }
}
