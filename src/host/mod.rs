//! The VM thread's lifecycle, one for `Isle` (one slot) and `IslePool` (a
//! slot per worker): starting VM threads, replacing a wedged one, and
//! stopping them all with a grace period.
//!
//! # Shutdown
//!
//! Three flags of [`Lifecycle`], each raised once, in this order:
//!
//! 1. `closed` (shutdown begins): submitters resolve new requests
//!    `Shutdown` without queueing them; VM threads, woken, finish what is
//!    queued and exit.
//! 2. `abort` (at once when the last handle is dropped; after the limit of
//!    `shutdown_timeout`; never for `shutdown`): each VM's hook stops its
//!    running request, and VM threads resolve queued requests `Shutdown`
//!    instead of running them.
//! 3. `stopped` (every VM thread joined, or detached after the grace
//!    period): the owner drains the queues once; a submitter that queued a
//!    job meanwhile sees `stopped` after its push and drains too
//!    ([`Lifecycle::after_push`]). The two SeqCst fences make sure one of
//!    them sees the job: the store-buffer pattern, as in `pool/sleep.rs`.
//!
//! The owner never joins a thread that has not ended: threads report their
//! end to the lifecycle (also when they panic), and shutdown waits for
//! those reports with deadlines, then joins the ended ones and detaches the
//! rest (`IsleError::Wedged`). A VM thread found wedged during shutdown is
//! reported too, so a graceful shutdown stops waiting for it. The last
//! handle may be dropped on a VM thread itself (inside an `exec` closure):
//! that thread is neither joined nor waited for; it exits on its own.
//!
//! # Wedged VMs
//!
//! A stop answers its caller on time, and asks the owner's timer to look
//! again one grace period later (`request/timer.rs`). If a VM is still
//! inside that request then, it is stuck in Rust or C code no hook reaches:
//! [`Host::replace_if_running`] starts a fresh VM thread for the slot
//! (`init` re-run) and, if the stuck VM is *still* inside the request once
//! the fresh one is ready, hands it the slot under the lock the stuck VM
//! takes to leave a request. The stuck thread is detached; when it gets
//! back, it sees the slot is no longer its own and exits, dropping its VM.
//! A VM that got back while its replacement was starting keeps its slot,
//! and the replacement exits unserved: never do two VMs serve one slot.

pub(crate) mod call_path;
pub(crate) mod capture;
mod lifecycle;
pub(crate) mod reserve;
pub(crate) mod submit;
mod thread;

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

pub(crate) use lifecycle::Lifecycle;
pub(crate) use thread::{Spawn, Starting, VmThread};

use crate::request::owner::on_owner_thread;
use crate::request::Cancel;
use crate::IsleError;
use submit::Owner;

/// An owner's queues, as its lifecycle needs them.
pub(crate) trait Queues {
    /// Wakes every VM thread, so that it sees `closed` (or `abort`).
    fn wake_all(&self);
    /// Resolves every queued job `Shutdown`; called once no VM thread
    /// serves the queues.
    fn drain(&self);
}

/// The owner's side of its VM threads.
pub(crate) struct Host {
    pub(crate) owner: Owner,
    pub(crate) life: Arc<Lifecycle>,
    /// The current thread of each slot; a wedged one is replaced (and
    /// detached), and shutdown takes them all.
    threads: Mutex<Vec<VmThread>>,
}

impl Host {
    pub(crate) fn new(owner: Owner, life: Arc<Lifecycle>, threads: Vec<VmThread>) -> Host {
        Host {
            owner,
            life,
            threads: Mutex::new(threads),
        }
    }

    /// Shuts down: closes, lets the VM threads finish what is queued, and
    /// joins them. With `abort_at`, aborts at that instant if they have not
    /// finished, then waits one grace period more at most. Blocks until
    /// then; a second caller waits as long and returns `Ok`.
    ///
    /// # Errors
    /// `Reentrant` on one of the owner's VM threads; `Panic` if a VM thread
    /// died from a panic outside any request; `Wedged` naming the threads
    /// detached instead of joined.
    pub(crate) fn stop(
        &self,
        abort_at: Option<Instant>,
        queues: &dyn Queues,
    ) -> Result<(), IsleError> {
        if on_owner_thread(self.owner.id) {
            return Err(IsleError::Reentrant);
        }
        self.life.close();
        queues.wake_all();
        // Waited for without the thread lock: another caller may be waiting
        // too, and a replacement in progress must finish first.
        let ids = self.thread_ids();
        if !self.life.wait(&ids, abort_at) {
            self.abort(queues);
            self.life.wait(&ids, self.grace_deadline());
        }
        self.join_or_detach(queues)
    }

    /// The last handle is gone: closes, aborts, and joins the VM threads
    /// that end within the grace period (detaching the others).
    pub(crate) fn stop_now(&self, queues: &dyn Queues) {
        self.life.close();
        self.abort(queues);
        let ids = self.thread_ids();
        self.life.wait(&ids, self.grace_deadline());
        let _ = self.join_or_detach(queues);
    }

    /// The timer's wedge check for `req`, stopped one grace period ago: if
    /// a VM is still inside it, `start(slot, generation)` starts the slot's
    /// next VM thread (waiting, with its VM ready, for a go-ahead carried by
    /// `G`). If the stuck VM is still inside `req` then, the slot is handed
    /// over and `commit(go)` lets the new thread serve; the stuck one is
    /// detached, and exits if it ever gets back. If it got back meanwhile,
    /// it keeps the slot and the new thread, its go-ahead dropped, exits.
    /// While shutting down (found before or after the fresh VM started)
    /// there is no replacement: shutdown stops waiting for the stuck thread
    /// instead. The fresh VM's `init` runs without the thread list held, so
    /// a shutdown started meanwhile never waits for it.
    pub(crate) fn replace_if_running<G>(
        &self,
        req: &Arc<dyn Cancel>,
        start: impl FnOnce(usize, u64) -> Option<(VmThread, G)>,
        commit: impl FnOnce(usize, G),
    ) {
        let Some(slot) = self.life.running(req) else {
            return; // its VM let go in time
        };
        let stuck = {
            let threads = self.threads.lock();
            let Some(t) = threads.iter().find(|t| t.slot == slot) else {
                return;
            };
            if self.life.is_closed() {
                self.life.wedged(t.id());
                return;
            }
            t.id()
        };
        // The fresh VM starts (runs `init`) without the thread list held: a
        // shutdown meanwhile waits for no `init`.
        let next = self.life.new_generation();
        let Some((fresh, go)) = start(slot, next) else {
            // The fresh VM could not start (`init` failed, or no thread):
            // the stuck thread keeps the slot, and this check comes again
            // one grace period from now, for as long as the thread stays
            // in `req`: it tries again, or (once shutdown has begun) marks
            // the thread wedged, so that shutdown stops waiting for it.
            crate::request::timer::watch(req);
            return;
        };
        // Serialised with shutdown, which takes the thread list.
        let mut threads = self.threads.lock();
        let Some(pos) = threads.iter().position(|t| t.id() == stuck) else {
            return; // shut down meanwhile: `fresh` exits unserved
        };
        if self.life.is_closed() {
            // Still stuck after all this time: shutdown stops waiting for it.
            if self.life.running(req) == Some(slot) {
                self.life.wedged(stuck);
            }
            return;
        }
        if self.life.hand_over_if_running(slot, next, req) {
            commit(slot, go);
            // Dropping the stuck thread's handle detaches it.
            drop(std::mem::replace(&mut threads[pos], fresh));
        }
        // Else `go` and `fresh` are dropped: the new thread exits unserved.
    }

    fn grace_deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.owner.timer.grace())
    }

    /// (slot, generation) of the current VM threads, but the calling one:
    /// a thread dropping the last handle cannot wait for itself to end.
    fn thread_ids(&self) -> Vec<(usize, u64)> {
        let me = std::thread::current().id();
        self.threads
            .lock()
            .iter()
            .filter(|t| t.handle.thread().id() != me)
            .map(VmThread::id)
            .collect()
    }

    fn abort(&self, queues: &dyn Queues) {
        self.life.abort();
        queues.wake_all();
    }

    /// Joins the VM threads that have ended and detaches the others, then
    /// finishes. The first caller does it; later ones find nothing left.
    fn join_or_detach(&self, queues: &dyn Queues) -> Result<(), IsleError> {
        let mut threads = self.threads.lock();
        if threads.is_empty() {
            return Ok(());
        }
        let me = std::thread::current().id();
        let mut result = Ok(());
        let mut detached = Vec::new();
        for t in threads.drain(..) {
            if t.handle.thread().id() == me {
                // Dropped on this VM thread: it exits by itself afterwards.
            } else if self.life.has_ended(t.id()) {
                if let Err(p) = t.handle.join() {
                    result = Err(IsleError::from_panic(&*p));
                }
            } else {
                detached.push(t.name());
            }
        }
        drop(threads);
        self.finish(queues);
        if !detached.is_empty() {
            result = Err(IsleError::Wedged(format!(
                "VM thread(s) {} did not stop within {:?} after being interrupted \
                 (inside Rust or C code that does not return); detached: each frees \
                 its VM if it ever gets back",
                detached.join(", "),
                self.owner.timer.grace()
            )));
        }
        result
    }

    /// After the VM threads are gone: resolve what is left in the queues,
    /// stop the timer thread.
    fn finish(&self, queues: &dyn Queues) {
        self.life.stop();
        queues.drain();
        self.owner.timer.shutdown();
    }
}
