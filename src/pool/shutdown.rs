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

use crossbeam_channel::RecvTimeoutError;

use super::{IslePool, PoolInner};
use crate::vm::on_owner_thread;
use crate::IsleError;

impl IslePool {
    /// Stops accepting requests, lets everything queued finish, and joins
    /// every worker thread. Blocks until then. Calling it again (or from
    /// another handle) waits for the same shutdown and returns `Ok`.
    ///
    /// # Errors
    /// [`IsleError::Reentrant`] from one of the pool's own VM threads;
    /// [`IsleError::Panic`] if a worker thread died from a panic outside any
    /// request.
    pub fn shutdown(&self) -> Result<(), IsleError> {
        self.inner.stop(None)
    }

    /// Like [`shutdown`](Self::shutdown), but after `grace` it interrupts
    /// whatever still runs and resolves whatever is still queued with
    /// [`IsleError::Shutdown`], then joins. Blocks for about `grace` at most
    /// (plus the time for running Rust code to return; Lua code stops at
    /// its next hook tick).
    ///
    /// # Errors
    /// As for [`shutdown`](Self::shutdown).
    pub fn shutdown_timeout(&self, grace: Duration) -> Result<(), IsleError> {
        self.inner.stop(Some(Instant::now() + grace))
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
        if let Some(at) = abort_at {
            // Waited for without the join lock: another caller may hold it,
            // joining workers stuck in long requests that only an abort
            // ends. Each worker's exit signal disconnects once it has ended,
            // so every waiter learns when all have.
            loop {
                match self.exits.recv_deadline(at) {
                    Ok(_) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {
                        self.abort();
                        break;
                    }
                }
            }
        }
        let mut threads = self.threads.lock();
        if threads.is_empty() {
            return Ok(());
        }
        let mut result = Ok(());
        for t in threads.drain(..) {
            if let Err(p) = t.join() {
                result = Err(IsleError::from_panic(&*p));
            }
        }
        self.finish();
        result
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
        let me = std::thread::current().id();
        for t in self.threads.get_mut().drain(..) {
            // The last handle may be dropped on a worker thread (inside an
            // `exec` closure); that thread exits by itself afterwards.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        self.finish();
    }
}
