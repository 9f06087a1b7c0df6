//! Suspended requests (the `async` feature): a request whose work waits
//! for a future is parked on its VM, which polls it again when the future
//! wakes, and stops it (dropping the future) when it is stopped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::*;

/// The future a suspended request waits on. Not `Send`: it lives and
/// dies on its VM thread.
pub(crate) type Work<T> = Pin<Box<dyn Future<Output = Result<T, IsleError>>>>;

/// Whether a stopped suspended request's futures are dropped under the
/// stop machinery (see `Waiting::stop`).
const DROP_UNDER_STOP: bool = cfg!(any(feature = "lua54", feature = "lua55"));

/// A suspended request, kept by its VM.
pub(crate) struct Paused(Box<dyn Resume>);

trait Resume {
    fn poll(
        &mut self,
        lua: &Lua,
        interrupt: &Arc<Interrupt>,
        waker: &Waker,
        keep_room: KeepRoom<'_>,
    ) -> Option<Outcome>;
    fn stop(&mut self, lua: &Lua, interrupt: &Arc<Interrupt>) -> Outcome;
    fn token(&self) -> &CancelToken;
}

pub(super) struct Waiting<T> {
    pub(super) req: Arc<Request<T>>,
    pub(super) token: CancelToken,
    pub(super) work: Option<Work<T>>,
    /// What `task.spawn` started for the request.
    pub(super) children: crate::vm::tasks::Children,
    /// Instructions run so far, for `max_instructions`.
    pub(super) executed: u64,
    /// Its session and print capture (`vm/scope.rs`): current around
    /// every poll of its work and children, and while they are dropped.
    pub(super) scope: Scope,
}

impl Paused {
    /// Polls the work again (its future woke). `Some` once the request
    /// has resolved (done, failed, or found stopped). `keep_room` as in
    /// `Ctx`.
    pub(crate) fn poll(
        &mut self,
        lua: &Lua,
        interrupt: &Arc<Interrupt>,
        waker: &Waker,
        keep_room: KeepRoom<'_>,
    ) -> Option<Outcome> {
        self.0.poll(lua, interrupt, waker, keep_room)
    }

    /// Stops the request (if nobody has) with `Shutdown` and drops its
    /// work.
    pub(crate) fn stop(mut self, lua: &Lua, interrupt: &Arc<Interrupt>) -> Outcome {
        self.0.token().stop(crate::request::Reason::Shutdown);
        self.0.stop(lua, interrupt)
    }

    pub(crate) fn token(&self) -> &CancelToken {
        self.0.token()
    }
}

/// The first run of a request's work returned a future, which is
/// pending: park the request, unless it was stopped meanwhile.
pub(super) fn park<T: Send + 'static>(
    mut waiting: Waiting<T>,
    interrupted: bool,
    ctx: &Ctx<'_>,
    interrupt: &Arc<Interrupt>,
) -> Ran {
    if !interrupted && waiting.req.suspend(ctx.waker) {
        return Ran::Suspended(Paused(Box::new(waiting)));
    }
    Ran::Done(waiting.stop(ctx.lua, interrupt))
}

impl<T: Send + 'static> Resume for Waiting<T> {
    fn poll(
        &mut self,
        lua: &Lua,
        interrupt: &Arc<Interrupt>,
        waker: &Waker,
        keep_room: KeepRoom<'_>,
    ) -> Option<Outcome> {
        if !self.req.unsuspend() {
            return Some(self.stop(lua, interrupt));
        }
        let Some(work) = self.work.as_mut() else {
            unreachable!("a parked request has its work")
        };
        let _ = interrupt.prepare();
        interrupt.enter_again(&self.token, self.executed);
        let here = self.req.running_here();
        let children = &mut self.children;
        let entered = scope::enter(std::mem::take(&mut self.scope));
        let out = catch_unwind(AssertUnwindSafe(|| {
            let mut cx = Context::from_waker(waker);
            let mut polled = work.as_mut().poll(&mut cx);
            children.adopt();
            match &mut polled {
                Poll::Pending => children.poll(&mut cx),
                Poll::Ready(result) => {
                    // Errors of children are never lost.
                    if let (Ok(_), Some(e)) = (&result, children.unjoined_error()) {
                        *result = Err(crate::interrupt::request_error(lua, &e));
                    }
                    children.cancel_all();
                    crate::vm::coroutine::close_terminated();
                }
            }
            polled
        }));
        self.scope = entered.leave();
        drop(here);
        self.executed = interrupt.executed();
        let mut garbage: Garbage<T> = (None, None);
        let result = match out {
            Ok(Poll::Pending) => {
                let interrupted = interrupt.leave();
                if !interrupted && self.req.suspend(waker) {
                    return None;
                }
                return Some(self.stop(lua, interrupt));
            }
            Ok(Poll::Ready(r)) => Ok(r),
            Err(payload) => Err(payload),
        };
        // The work is done: drop what is left of it (its coroutine,
        // closed) before resolving.
        self.work = None;
        let result = caught(result, &mut garbage);
        // Inside the request, as for one that never suspended (`Ctx`).
        super::keep_room(keep_room, &result, self.scope.capture.as_deref());
        let interrupted = interrupt.leave();
        let outcome = settle(&self.req, result, interrupted, garbage);
        Some(outcome.judged(self.scope.capture.as_deref()))
    }

    /// Drops the work of a request that must stop, inside the stop
    /// machinery: its coroutine's `__close` handlers run interruptible,
    /// as they would while the interruption climbs; then resolves it
    /// with its reason (unless a stopper already did).
    fn stop(&mut self, lua: &Lua, interrupt: &Arc<Interrupt>) -> Outcome {
        let reason = self
            .req
            .header()
            .reason()
            .unwrap_or(crate::request::Reason::Shutdown);
        self.token.stop(reason);
        // What it prints while it stops is its own (and kept by nobody).
        let entered = scope::enter(std::mem::take(&mut self.scope));
        let arm = || {
            let _ = interrupt.prepare();
            interrupt.enter_again(&self.token, self.executed);
            Interrupt::arm_stop(interrupt, lua);
        };
        // Its futures (its work's, its children's) first. Dropping a
        // pending future resumes mlua's wrapper of its async function,
        // which must get to drop it (`vm/coroutine.rs`); on Lua 5.4 and
        // 5.5 the stop never raises in that wrapper (`alarm::raise`), so
        // they are dropped under the stop machinery: mlua closes the Lua
        // threads of pending `call_async` futures as it drops them, and
        // their `__close` handlers are interrupted. Elsewhere a tick could
        // raise in the wrapper, so no request is current; those Lua
        // versions have no `__close` handlers.
        if DROP_UNDER_STOP {
            arm();
        } else {
            interrupt.quiet();
        }
        let here = DROP_UNDER_STOP.then(|| self.req.running_here());
        let work = self.work.take();
        let children = &mut self.children;
        let dropped = catch_unwind(AssertUnwindSafe(move || {
            drop(work);
            children.cancel_all();
            crate::vm::tasks::discard_spawned();
        }));
        drop(dropped);
        // Then, under the stop machinery, what Lua code is left to run:
        // the coroutines' `__close` handlers.
        if !DROP_UNDER_STOP {
            arm();
        }
        let here = here.unwrap_or_else(|| self.req.running_here());
        let dropped = catch_unwind(AssertUnwindSafe(crate::vm::coroutine::close_terminated));
        drop(here);
        interrupt.leave();
        self.scope = entered.leave();
        drop(dropped);
        let reason = self.req.header().reason().unwrap_or(reason);
        settle(&self.req, Err(reason.error()), true, (None, None))
    }

    fn token(&self) -> &CancelToken {
        &self.token
    }
}

impl<T> Drop for Waiting<T> {
    fn drop(&mut self) {
        // Dropped with its work (its VM went away without stopping
        // it): it still resolves.
        if self.work.is_some() {
            let _ = self.req.finish(Err(IsleError::Shutdown));
        }
    }
}
