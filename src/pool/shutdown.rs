//! Stopping a pool: graceful (`shutdown`), bounded (`shutdown_timeout`), or
//! abortive (dropping the last handle).
//!
//! All three close the pool to new requests, wake every worker, join every
//! worker thread, then mark the pool stopped and resolve anything a racing
//! submitter left in a queue (see `IslePool::after_push`). They differ in
//! when the `abort` flag goes up: never, after the grace period, or at once.
//! With `abort` up, each VM's hook interrupts its running request and the
//! workers resolve queued requests with `Shutdown` instead of running them.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::{IslePool, PoolInner};
use crate::request::owner::on_owner_thread;
use crate::IsleError;

impl IslePool {
    /// Stops accepting requests, lets everything queued finish, and joins
    /// every worker thread. Blocks until then. Calling it again (or from
    /// another handle) waits for the same shutdown and returns `Ok`.
    ///
    /// A worker found wedged meanwhile (stuck in a stopped request past
    /// [`stop_grace`](crate::IslePoolBuilder::stop_grace)) is not waited
    /// for: it is detached and named in the error.
    ///
    /// # Errors
    /// [`IsleError::Reentrant`] from one of the pool's own VM threads;
    /// [`IsleError::Panic`] if a worker thread died from a panic outside any
    /// request; [`IsleError::Wedged`] naming the worker threads that were
    /// detached instead of joined.
    pub fn shutdown(&self) -> Result<(), IsleError> {
        self.inner.stop(None)
    }

    /// Like [`shutdown`](Self::shutdown), but after `limit` it interrupts
    /// whatever still runs and resolves whatever is still queued with
    /// [`IsleError::Shutdown`], then joins. Blocks for `limit` plus
    /// [`stop_grace`](crate::IslePoolBuilder::stop_grace) at most: a worker
    /// still inside Rust or C code by then is detached, not joined. A limit
    /// too large to represent (such as `Duration::MAX`) waits as `shutdown`
    /// does.
    ///
    /// # Errors
    /// As for [`shutdown`](Self::shutdown).
    pub fn shutdown_timeout(&self, limit: Duration) -> Result<(), IsleError> {
        self.inner.stop(Instant::now().checked_add(limit))
    }
}

impl PoolInner {
    fn stop(&self, abort_at: Option<Instant>) -> Result<(), IsleError> {
        if on_owner_thread(self.owner.id) {
            return Err(IsleError::Reentrant);
        }
        let shared = &self.shared;
        shared.closed.store(true, Ordering::SeqCst);
        shared.sleep.wake_all();
        // Waited for without the thread lock: another caller may be
        // waiting too, and a replacement in progress must finish first.
        let ids = self.thread_ids();
        let exits = &self.spawner.exits;
        if !exits.wait(&ids, abort_at) {
            self.abort();
            exits.wait(&ids, Instant::now().checked_add(self.owner.timer.grace()));
        }
        self.join_or_detach()
    }

    /// (slot, generation) of the current worker threads.
    fn thread_ids(&self) -> Vec<(usize, u64)> {
        self.threads
            .lock()
            .iter()
            .map(|t| (t.index, t.generation))
            .collect()
    }

    /// Raises the abort flag, stops every running request (including Rust
    /// callbacks polling their token) and wakes every worker.
    fn abort(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
        for slot in self.shared.interrupts.iter() {
            if let Some(i) = slot.lock().as_ref() {
                i.abort_running();
            }
        }
        self.shared.sleep.wake_all();
    }

    /// Joins the worker threads that have ended and detaches the others
    /// (stuck in Rust or C code past every limit), then finishes. The first
    /// caller does it; later ones find nothing left and return `Ok`.
    fn join_or_detach(&self) -> Result<(), IsleError> {
        let mut threads = self.threads.lock();
        if threads.is_empty() {
            return Ok(());
        }
        let me = std::thread::current().id();
        let mut result = Ok(());
        let mut detached = Vec::new();
        for t in threads.drain(..) {
            if t.handle.thread().id() == me {
                // The last handle was dropped on a worker thread (inside an
                // `exec` closure); that thread exits by itself afterwards.
            } else if self.spawner.exits.ended(&t) {
                if let Err(p) = t.handle.join() {
                    result = Err(IsleError::from_panic(&*p));
                }
            } else {
                detached.push(t.handle.thread().name().unwrap_or("?").to_string());
            }
        }
        drop(threads);
        self.finish();
        if !detached.is_empty() {
            result = Err(IsleError::Wedged(format!(
                "worker thread(s) {} did not stop within {:?} after being interrupted \
                 (inside Rust or C code that does not return); detached: each frees \
                 its VM if it ever gets back",
                detached.join(", "),
                self.owner.timer.grace()
            )));
        }
        result
    }

    /// After the workers are gone: resolve leftovers, stop the deadline
    /// thread.
    fn finish(&self) {
        // ORDERING: pairs with `IslePool::after_push`.
        self.shared.stopped.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.shared.drain();
        self.owner.timer.shutdown();
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.abort();
        let ids = self.thread_ids();
        self.spawner
            .exits
            .wait(&ids, Instant::now().checked_add(self.owner.timer.grace()));
        let _ = self.join_or_detach();
    }
}
