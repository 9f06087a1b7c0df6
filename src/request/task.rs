//! `Task<T>`: the caller's handle to one request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::owner::on_owner_thread;
use super::timer::Timer;
use super::{CancelToken, Request};
use crate::IsleError;

/// A request in flight; resolves exactly once to `Ok(T)` or an
/// [`IsleError`].
///
/// - Block on it with [`wait`](Self::wait), [`wait_timeout`](Self::wait_timeout)
///   or [`wait_deadline`](Self::wait_deadline); poll it with
///   [`try_result`](Self::try_result); or `.await` it: `Task` is a
///   [`Future`] woken by std's `Waker`, so it works on any executor.
/// - Stop it with [`cancel`](Self::cancel) (or a [`CancelToken`] from
///   [`cancel_token`](Self::cancel_token)), or give it a time limit with
///   [`timeout`](Self::timeout).
/// - Dropping a `Task` that has not finished cancels the request; call
///   [`detach`](Self::detach) to let it run to the end unobserved.
///
/// The result is handed out once: after `try_result`, `wait_timeout` or
/// `wait_deadline` has returned it, they return `None`; polling the future
/// again after it returned `Ready` panics, as futures may.
#[must_use = "dropping a Task cancels its request; use detach() to let it run"]
pub struct Task<T> {
    req: Arc<Request<T>>,
    token: CancelToken,
    timer: Timer,
    detached: bool,
}

impl<T: Send + 'static> Task<T> {
    pub(crate) fn new(req: Arc<Request<T>>, timer: Timer) -> Task<T> {
        let token = CancelToken::of(req.clone());
        Task {
            req,
            token,
            timer,
            detached: false,
        }
    }

    /// Blocks until the request resolves and returns its result.
    ///
    /// # Errors
    /// The request's error; or [`IsleError::Reentrant`] (at once) if called
    /// on the VM thread that would have to run the request. In that case
    /// the task is gone, which cancels the request: to keep it, use
    /// [`wait_timeout`](Self::wait_timeout) (which leaves the task in place)
    /// or [`detach`](Self::detach).
    ///
    /// # Panics
    /// If the result was handed out already (by `wait_timeout`,
    /// `wait_deadline` or `try_result`), as a future polled after it
    /// returned `Ready` may.
    pub fn wait(mut self) -> Result<T, IsleError> {
        match self.wait_until(None) {
            Some(r) => r,
            None => panic!(
                "Task::wait called after the task's result was handed out (by wait_timeout, wait_deadline or try_result)"
            ),
        }
    }

    /// Blocks for at most `timeout`. Returns `None` if the request has not
    /// resolved by then (or at once, if its result was handed out already);
    /// it keeps running (see [`timeout`](Self::timeout) to
    /// stop it instead).
    ///
    /// # Errors
    /// As for [`wait`](Self::wait), inside the `Some`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<T, IsleError>> {
        // Too long to represent: wait without a deadline.
        self.wait_until(Instant::now().checked_add(timeout))
    }

    /// Blocks until `deadline` at most; see [`wait_timeout`](Self::wait_timeout).
    ///
    /// # Errors
    /// As for [`wait`](Self::wait), inside the `Some`.
    pub fn wait_deadline(&mut self, deadline: Instant) -> Option<Result<T, IsleError>> {
        self.wait_until(Some(deadline))
    }

    /// Returns the result if the request has resolved, without blocking;
    /// `None` while it runs, and once the result was handed out.
    ///
    /// # Errors
    /// As for [`wait`](Self::wait), inside the `Some`.
    pub fn try_result(&mut self) -> Option<Result<T, IsleError>> {
        self.req.try_take()
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> Option<Result<T, IsleError>> {
        let owner = self.req.header().owner;
        if !self.req.is_ready() && on_owner_thread(owner) {
            return Some(Err(IsleError::Reentrant));
        }
        // A wait that can end only with the result: from an isle's VM, it
        // must not close a cycle of isles waiting on each other.
        let _waiting = match deadline {
            None if !self.req.is_ready() => match super::owner::blocking_on(owner) {
                Ok(w) => w,
                Err(e) => return Some(Err(e)),
            },
            _ => None,
        };
        if self.req.wait(deadline) {
            self.req.try_take()
        } else {
            None
        }
    }

    /// True once the request has resolved (its result may already have been
    /// taken).
    pub fn is_finished(&self) -> bool {
        self.req.is_ready()
    }

    /// Cancels the request: a queued request never runs, a running one is
    /// interrupted as soon as its Lua code next reaches a check (see
    /// [`CancelToken`] for when that is). The task then resolves
    /// [`IsleError::Cancelled`], unless the request finished first, in which
    /// case its result is kept. Never blocks (see [`CancelToken::cancel`]: at
    /// most a 20 µs spin).
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// The request's cancel token, to cancel it from elsewhere.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.token
    }

    /// Gives the request a time limit, counted from its submission (time
    /// spent queued counts). When it passes, the request stops as if
    /// cancelled and resolves [`IsleError::Timeout`] at once, even if its
    /// VM is inside a Rust callback or a long C function (see
    /// [`stop_grace`](crate::IsleBuilder::stop_grace)). A limit that has
    /// already passed stops it at once; one too large to represent (such as
    /// `Duration::MAX`) is no limit.
    pub fn timeout(self, limit: Duration) -> Task<T> {
        if let Some(at) = self.req.header().submitted.checked_add(limit) {
            self.timer.schedule(at, &self.token);
        }
        self
    }

    /// Lets the request run to the end without anyone waiting for it; its
    /// result is dropped (a panic while dropping it is caught, wherever the
    /// drop happens, as for any result nobody takes).
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if !self.detached && !self.req.is_ready() {
            self.token.cancel();
        }
        // A result nobody took is dropped here if it is in already (else by
        // the VM, which catches a panicking drop too): either way, the
        // same, whichever side lets go of the request last.
        if self.req.is_ready() {
            let result = self.req.try_take();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(result)));
        }
    }
}

impl<T: Send + 'static> Future for Task<T> {
    type Output = Result<T, IsleError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.req.poll_take(cx.waker()) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

impl<T> fmt::Debug for Task<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("finished", &self.req.is_ready())
            .field("cancelled", &self.token.is_cancelled())
            .field("detached", &self.detached)
            .finish()
    }
}
