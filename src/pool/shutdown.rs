//! Stopping a pool: graceful (`shutdown`), bounded (`shutdown_timeout`), or
//! abortive (dropping the last handle). The protocol is the VM threads'
//! lifecycle (`host`); the pool gives it its queues.

use std::time::{Duration, Instant};

use super::shared::Shared;
use super::{IslePool, PoolInner};
use crate::host::Queues;
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
        self.inner.host.stop(None, &*self.inner.shared)
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
        self.inner
            .host
            .stop(Instant::now().checked_add(limit), &*self.inner.shared)
    }
}

impl Queues for Shared {
    fn wake_all(&self) {
        // Callers waiting for room resolve `Shutdown`.
        if let Some(room) = &self.room {
            room.close();
        }
        self.sleep.wake_all();
    }

    fn drain(&self) {
        Shared::drain(self);
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.host.stop_now(&*self.shared);
    }
}
