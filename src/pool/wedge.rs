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
use crossbeam_utils::sync::Parker;

use super::builder::Slot;
use super::PoolInner;
use crate::request::Cancel;

impl PoolInner {
    /// The timer's wedge check for `req`, stopped one grace period ago.
    pub(super) fn replace_if_running(&self, req: &Arc<dyn Cancel>) {
        let shared = &*self.shared;
        let Some(w) = (0..shared.workers()).find(|&w| {
            shared.interrupts[w]
                .lock()
                .as_ref()
                .is_some_and(|i| i.runs(req))
        }) else {
            return; // its VM let go in time
        };
        // Serialised with shutdown, which reads the thread list.
        let mut threads = self.threads.lock();
        let Some(pos) = threads.iter().position(|t| t.index == w) else {
            return;
        };
        if shared.closed.load(Ordering::Acquire) {
            // No replacement while shutting down: shutdown stops waiting
            // for this VM instead.
            self.spawner.exits.wedged((w, threads[pos].generation));
            return;
        }
        let generation = threads[pos].generation + 1;
        let parker = Parker::new();
        let unparker = parker.unparker().clone();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded(1);
        let slot = Slot {
            index: w,
            generation,
            local: Deque::new_fifo(),
            parker,
            batch: false,
        };
        // The new thread waits for `go`, which carries the sessions lost
        // with the stuck VM: marked only once the new VM runs.
        let spawned = self.spawner.spawn(slot, ready_tx, Some(go_rx));
        let Ok(fresh) = spawned else {
            shared.counters[w]
                .recycle_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !matches!(ready_rx.recv(), Ok((_, Ok(())))) {
            // `init` failed: the stuck worker keeps the slot.
            shared.counters[w]
                .recycle_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        // ORDERING: Release pairs with `Worker::is_current`'s Acquire.
        shared.generations[w].store(generation, Ordering::Release);
        let lost = shared.sessions.mark_lost(w);
        shared.counters[w]
            .sessions
            .fetch_sub(lost.len(), Ordering::Relaxed);
        shared.counters[w].running.store(false, Ordering::Relaxed);
        shared.counters[w].wedged.fetch_add(1, Ordering::Relaxed);
        shared.sleep.replace(w, unparker);
        let _ = go_tx.send(lost);
        // Dropping the stuck thread's handle detaches it.
        drop(std::mem::replace(&mut threads[pos], fresh));
    }
}
