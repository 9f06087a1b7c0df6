//! A request on its way to a VM: the type-erased job that carries the
//! caller's work and the request it resolves, and what the work sees on the
//! VM thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use mlua::{Lua, Table};

use super::chunk::ChunkCache;
use crate::interrupt::Interrupt;
use crate::request::{Admission, CancelToken, Header, Request};
use crate::IsleError;

/// What a job's work sees on the VM thread.
pub(crate) struct Ctx<'a> {
    pub(crate) lua: &'a Lua,
    /// The session's environment, for session work; `None` for plain work.
    pub(crate) env: Option<&'a Table>,
    /// The VM's compiled `eval` chunks.
    pub(crate) chunks: &'a ChunkCache,
}

impl Ctx<'_> {
    /// Runs `f` with the table globals resolve in: the session's
    /// environment, or the VM's globals.
    pub(crate) fn with_scope<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        match self.env {
            Some(env) => f(env),
            None => f(&self.lua.globals()),
        }
    }
}

/// How a job ended, for the pool's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Ran and produced its value.
    Completed,
    /// Ran and failed (Lua error, panic, ...).
    Failed,
    /// Ran out of memory: failed, and the VM should collect its garbage.
    OutOfMemory,
    /// Was stopped while running (cancel, time limit, shutdown).
    Cancelled,
    /// Had been resolved while queued; not run.
    Skipped,
}

impl Outcome {
    fn of<T>(result: &Result<T, IsleError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Completed,
            Err(IsleError::Cancelled | IsleError::Timeout | IsleError::Shutdown) => {
                Outcome::Cancelled
            }
            Err(IsleError::MemoryLimit(_)) => Outcome::OutOfMemory,
            Err(_) => Outcome::Failed,
        }
    }
}

/// A request on its way to a VM: the work plus the request it resolves.
pub(crate) struct Job(Box<dyn Runnable>);

trait Runnable: Send {
    fn run(self: Box<Self>, ctx: &Ctx<'_>, interrupt: &Interrupt) -> Outcome;
    fn abandon(&self, err: IsleError);
    fn header(&self) -> &Header;
}

struct Pending<T, F> {
    req: Arc<Request<T>>,
    work: Option<F>,
}

impl Job {
    pub(crate) fn new<T, F>(req: Arc<Request<T>>, work: F) -> Job
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static,
    {
        Job(Box::new(Pending {
            req,
            work: Some(work),
        }))
    }

    /// Runs the work on the VM thread and resolves the request, unless it
    /// was resolved while queued (then the work is dropped unrun).
    pub(super) fn run(self, ctx: &Ctx<'_>, interrupt: &Interrupt) -> Outcome {
        self.0.run(ctx, interrupt)
    }

    /// Counts the request against a pool's `queue_capacity` while it is
    /// queued (see `Header::admit`).
    pub(crate) fn admit(&self, count: &Admission) {
        self.0.header().admit(count);
    }

    /// Resolves the request with `err` without running it (no-op if it
    /// already started or finished), and drops the work.
    ///
    /// Both wake the caller's waker and drop the user's closure, which may
    /// panic: that is caught here, so a VM or pool thread calling this never
    /// unwinds. The request is resolved before either can happen.
    pub(crate) fn abandon(self, err: IsleError) {
        let _ = catch_unwind(AssertUnwindSafe(move || {
            self.0.abandon(err);
            drop(self);
        }));
    }
}

impl<T, F> Runnable for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static,
{
    fn run(mut self: Box<Self>, ctx: &Ctx<'_>, interrupt: &Interrupt) -> Outcome {
        let req = &self.req;
        if !req.start(interrupt.prepare()) {
            return Outcome::Skipped; // resolved while queued
        }
        let Some(work) = self.work.take() else {
            unreachable!("a job's work is taken only here, once")
        };
        // Values this request drops are user types whose `Drop` may panic:
        // keep them until the request has resolved.
        let mut garbage: (Option<T>, Option<Box<dyn std::any::Any + Send>>) = (None, None);
        let result = match req.header().reason() {
            // Stopped between the caller's stop() and our CAS: never run it.
            Some(reason) => Err(reason.error()),
            None => {
                interrupt.enter(&CancelToken::of(req.clone()));
                let here = req.running_here();
                let out = catch_unwind(AssertUnwindSafe(|| work(ctx)));
                drop(here);
                let interrupted = interrupt.leave();
                let result = match out {
                    Ok(r) => r,
                    Err(payload) => {
                        let e = IsleError::from_panic(&*payload);
                        garbage.1 = Some(payload);
                        Err(e)
                    }
                };
                // After a stop request, an error is the interruption (or a
                // callback giving up because of it), and a value produced
                // after swallowing the interruption is not trustworthy:
                // report why it was stopped. A panic is a bug and is never
                // hidden.
                match (result, req.header().reason()) {
                    (Err(IsleError::Panic(m)), _) => Err(IsleError::Panic(m)),
                    (Err(_), Some(reason)) => Err(reason.error()),
                    (Ok(v), Some(reason)) if interrupted => {
                        garbage.0 = Some(v);
                        Err(reason.error())
                    }
                    (r, _) => r,
                }
            }
        };
        // A stopper that got here first has answered the caller with its
        // reason: this result is late, and is dropped (after the claim, like
        // garbage); the outcome is what the caller was told.
        let outcome = Outcome::of(&result);
        match req.finish(result) {
            Ok(()) => {
                drop(garbage);
                outcome
            }
            Err(late) => {
                drop((late, garbage));
                match req.header().reason() {
                    Some(reason) => Outcome::of::<()>(&Err(reason.error())),
                    None => unreachable!("only a stop resolves a running request"),
                }
            }
        }
    }

    fn abandon(&self, err: IsleError) {
        self.req.abandon(err);
    }

    fn header(&self) -> &Header {
        self.req.header()
    }
}

impl<T, F> Drop for Pending<T, F> {
    fn drop(&mut self) {
        // A job dropped without running (its queue was discarded, its VM
        // died) still resolves: nothing is lost silently.
        if self.work.is_some() {
            self.req.abandon(IsleError::Shutdown);
        }
    }
}
