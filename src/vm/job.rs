//! A request on its way to a VM: the type-erased job that carries the
//! caller's work and the request it resolves, and what the work sees on the
//! VM thread.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use mlua::{FromLuaMulti, Function, IntoLuaMulti, Lua, MultiValue, Table};

use super::chunk::ChunkCache;
use super::scope::{self, Scope};
use crate::interrupt::Interrupt;
use crate::request::{Admission, CancelToken, Header, Request};
use crate::sandbox::print::{Capture, Ended};
use crate::IsleError;

#[cfg(feature = "async")]
pub(crate) use suspended::{Paused, Work};

/// What a job's work sees on the VM thread.
pub(crate) struct Ctx<'a> {
    pub(crate) lua: &'a Lua,
    /// The session's environment, for session work; `None` for plain work.
    /// Read through [`env`](Self::env).
    pub(crate) session_env: Option<&'a SessionEnv<'a>>,
    /// The session, for session work (see `scope.rs`).
    pub(crate) session: Option<super::scope::SessionTag>,
    /// The VM's compiled `eval` chunks.
    pub(crate) chunks: &'a ChunkCache,
    /// The VM's memory limit: results are converted within it.
    pub(crate) memory_limit: Option<usize>,
    /// Under a memory limit (else `None`), collects the garbage when the
    /// request has eaten much of the room (`true`: it ran out of memory).
    /// Called by the request itself once its work is done, before it
    /// resolves: the collection is C work a stop must reach like any other.
    pub(crate) keep_room: KeepRoom<'a>,
    /// The VM's request coroutines, and the waker that takes this request
    /// up again if it suspends (the `async` feature).
    #[cfg(feature = "async")]
    pub(crate) coroutines: &'a std::rc::Rc<super::coroutine::Coroutines>,
    #[cfg(feature = "async")]
    pub(crate) waker: &'a std::task::Waker,
}

/// A session's environment as its request sees it: handed to the request,
/// or opened by the request itself once it has started (`Pending::run`).
/// The session's first request makes it there: making it allocates, so
/// collection steps (and the finalizers of whatever a tenant left behind)
/// may run, and a stop must reach them as it reaches any of the request's
/// work. (A pool on Lua 5.1 or LuaJIT opens every session's environment
/// there too: see the pool's `Kept`.)
pub(crate) struct SessionEnv<'a> {
    table: std::cell::OnceCell<Table>,
    open: &'a dyn Fn(&Lua) -> Result<Table, IsleError>,
}

impl<'a> SessionEnv<'a> {
    /// The environment `table`, if the request is handed it; else `open`
    /// gives it once the request has started.
    pub(crate) fn new(
        table: Option<Table>,
        open: &'a dyn Fn(&Lua) -> Result<Table, IsleError>,
    ) -> SessionEnv<'a> {
        SessionEnv {
            table: table.map(Into::into).unwrap_or_default(),
            open,
        }
    }

    /// The environment, unless the request could not open it.
    pub(crate) fn into_table(self) -> Option<Table> {
        self.table.into_inner()
    }

    /// Opens the environment, unless the request was handed it.
    fn open(&self, lua: &Lua) -> Result<(), IsleError> {
        if self.table.get().is_none() {
            let _ = self.table.set((self.open)(lua)?);
        }
        Ok(())
    }
}

impl Ctx<'_> {
    /// The session's environment, for session work (`None` for plain
    /// work).
    pub(crate) fn env(&self) -> Option<&Table> {
        self.session_env.map(|env| {
            env.table
                .get()
                .expect("a session's request opens its environment before its work runs")
        })
    }

    /// Runs `f` with the table globals resolve in: the session's
    /// environment, or the VM's globals.
    pub(crate) fn with_scope<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        match self.env() {
            Some(env) => f(env),
            None => f(&self.lua.globals()),
        }
    }

    /// Calls `f` with `args` for the request. With the `async` feature, as
    /// a coroutine polled once here: if an async Rust function it calls is
    /// pending, the request suspends (`Run::Wait`). With a memory limit, the
    /// results are converted within it (see `result.rs`).
    pub(crate) fn call<T>(&self, f: &Function, args: impl IntoLuaMulti) -> Run<T>
    where
        T: FromLuaMulti + 'static,
    {
        match self.result_limit::<T>() {
            None => self.call_then(f, args, |_, r: T| Ok(r)),
            Some(limit) => self.call_then(f, args, move |lua, r: MultiValue| {
                super::result::convert(lua, r, limit)
            }),
        }
    }

    /// Converts one value the request produced (within the memory limit,
    /// as [`call`](Self::call) does).
    pub(crate) fn convert<T: mlua::FromLua + 'static>(
        &self,
        value: mlua::Value,
    ) -> Result<T, IsleError> {
        match self.result_limit::<T>() {
            Some(limit) => super::result::convert_one(self.lua, value, limit),
            None => T::from_lua(value, self.lua)
                .map_err(|e| crate::interrupt::request_error(self.lua, &e)),
        }
    }

    /// The memory limit this request's results are converted within, for
    /// results of type `T` (see `result.rs`).
    pub(crate) fn result_limit<T: 'static>(&self) -> Option<usize> {
        super::result::limit_for::<T>(self.memory_limit)
    }

    /// [`call`](Self::call), with the results as `R`, then `then` on them.
    fn call_then<R, T>(
        &self,
        f: &Function,
        args: impl IntoLuaMulti,
        then: impl FnOnce(&Lua, R) -> Result<T, IsleError> + 'static,
    ) -> Run<T>
    where
        R: FromLuaMulti + 'static,
        T: 'static,
    {
        #[cfg(not(feature = "async"))]
        {
            Run::Done(
                f.call::<R>(args)
                    .map_err(|e| crate::interrupt::request_error(self.lua, &e))
                    .and_then(|r| then(self.lua, r)),
            )
        }
        #[cfg(feature = "async")]
        {
            use std::future::Future;
            use std::task::{Context, Poll};
            let lua = self.lua.clone();
            let finish = move |r: mlua::Result<R>| {
                r.map_err(|e| crate::interrupt::request_error(&lua, &e))
                    .and_then(|r| then(&lua, r))
            };
            let mut call = match self.coroutines.call::<R>(f, args) {
                Ok(call) => call,
                Err(e) => return Run::Done(finish(Err(e))),
            };
            match std::pin::Pin::new(&mut call).poll(&mut Context::from_waker(self.waker)) {
                Poll::Ready(r) => Run::Done(finish(r)),
                Poll::Pending => Run::Wait(Box::pin(async move { finish(call.await) })),
            }
        }
    }

    /// The request waits on `future`: polled once here, it is done, or the
    /// request suspends on it (its waker is this request's).
    #[cfg(feature = "async")]
    pub(crate) fn wait<T>(&self, mut future: Work<T>) -> Run<T> {
        use std::task::{Context, Poll};
        match future.as_mut().poll(&mut Context::from_waker(self.waker)) {
            Poll::Ready(r) => Run::Done(r),
            Poll::Pending => Run::Wait(future),
        }
    }
}

/// A call through the VM's coroutines, for work that goes on after its
/// request first suspended (where there is no [`Ctx`]), its results
/// converted as [`Ctx::call`] converts them: within `limit`, from
/// [`Ctx::result_limit`].
#[cfg(feature = "async")]
pub(crate) async fn call_later<T: FromLuaMulti + 'static>(
    lua: &Lua,
    coroutines: &std::rc::Rc<super::coroutine::Coroutines>,
    f: &Function,
    args: MultiValue,
    limit: Option<usize>,
) -> Result<T, IsleError> {
    let err = |e: mlua::Error| crate::interrupt::request_error(lua, &e);
    match limit {
        None => coroutines
            .call::<T>(f, args)
            .map_err(err)?
            .await
            .map_err(err),
        Some(limit) => {
            let values = coroutines
                .call::<MultiValue>(f, args)
                .map_err(err)?
                .await
                .map_err(err)?;
            super::result::convert(lua, values, limit)
        }
    }
}

/// What a request's work gives back: its result, or (the `async` feature)
/// the future that will produce it, on which the request waits suspended.
pub(crate) enum Run<T> {
    Done(Result<T, IsleError>),
    #[cfg(feature = "async")]
    Wait(Work<T>),
}

impl<T> From<Result<T, IsleError>> for Run<T> {
    fn from(r: Result<T, IsleError>) -> Run<T> {
        Run::Done(r)
    }
}

/// How a job's run on its VM ended.
pub(crate) enum Ran {
    /// Resolved (or found resolved while queued).
    Done(Outcome),
    /// Suspended: its work waits for a future; the VM keeps it and polls it
    /// when it wakes.
    #[cfg(feature = "async")]
    Suspended(Paused),
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
    pub(super) fn of<T>(result: &Result<T, IsleError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Completed,
            Err(IsleError::Cancelled | IsleError::Timeout | IsleError::Shutdown) => {
                Outcome::Cancelled
            }
            Err(IsleError::MemoryLimit(_)) => Outcome::OutOfMemory,
            Err(_) => Outcome::Failed,
        }
    }

    /// The outcome of a request whose prints were captured
    /// (`host/capture.rs`): it resolves with a value holding its work's
    /// result, which counts.
    pub(super) fn judged(self, capture: Option<&Capture>) -> Outcome {
        match (self, capture.map(Capture::ended)) {
            (Outcome::Completed, Some(Ended::Failed)) => Outcome::Failed,
            (Outcome::Completed, Some(Ended::OutOfMemory)) => Outcome::OutOfMemory,
            (outcome, _) => outcome,
        }
    }
}

/// See [`Ctx::keep_room`].
pub(crate) type KeepRoom<'a> = Option<&'a dyn Fn(bool)>;

/// Calls `keep_room`, if any, for a request whose work ended with `result`
/// (its own, or the captured one a request with captured prints resolves
/// with).
fn keep_room<T>(keep_room: KeepRoom<'_>, result: &Result<T, IsleError>, capture: Option<&Capture>) {
    if let Some(keep_room) = keep_room {
        keep_room(Outcome::of(result).judged(capture) == Outcome::OutOfMemory);
    }
}

/// A request on its way to a VM: the work plus the request it resolves.
pub(crate) struct Job(Box<dyn Runnable>);

trait Runnable: Send {
    fn run(self: Box<Self>, ctx: &Ctx<'_>, interrupt: &Arc<Interrupt>) -> Ran;
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
        F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static,
    {
        Job(Box::new(Pending {
            req,
            work: Some(work),
        }))
    }

    /// Runs the work on the VM thread and resolves the request, unless it
    /// was resolved while queued (then the work is dropped unrun), or its
    /// work suspends.
    pub(super) fn run(self, ctx: &Ctx<'_>, interrupt: &Arc<Interrupt>) -> Ran {
        self.0.run(ctx, interrupt)
    }

    /// Lets the request hold `admission` (room in a queue with a
    /// `queue_capacity`) while it is queued (see `Header::admit`).
    pub(crate) fn admit(&self, admission: Admission) {
        self.0.header().admit(admission);
    }

    /// The request's owner id and when it was submitted (for its queue
    /// wait). Reading the header before the run costs a fetch of its cache
    /// line from the submitting core: see [`take_started`] instead.
    #[cfg(feature = "tracing")]
    pub(crate) fn owner_and_submitted(&self) -> (u64, std::time::Instant) {
        let header = self.0.header();
        (header.owner, header.submitted)
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

thread_local! {
    /// When the request this thread last started was submitted.
    static STARTED: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// When the request whose run just returned on this thread was submitted,
/// if it started (`None` for one resolved while queued). Taken here, once
/// the run has returned, its header is in this core's cache already (the
/// start claimed it); read before the run, it would be fetched from the
/// submitting core once for the read and again for the claim, which costs
/// a tiny request's round trip ~4%.
pub(crate) fn take_started() -> Option<std::time::Instant> {
    STARTED.take()
}

/// Values a request drops are user types whose `Drop` may panic: they are
/// kept until the request has resolved.
type Garbage<T> = (Option<T>, Option<Box<dyn Any + Send>>);

/// What the work's run (or a poll of its future) gave: its result, or a
/// panic's message with the payload kept as garbage.
fn caught<T>(
    out: std::thread::Result<Result<T, IsleError>>,
    garbage: &mut Garbage<T>,
) -> Result<T, IsleError> {
    match out {
        Ok(r) => r,
        Err(payload) => {
            let e = IsleError::from_panic(&*payload);
            garbage.1 = Some(payload);
            Err(e)
        }
    }
}

/// Resolves a request that ran (or was stopped before it could), and says
/// how it ended. `interrupted`: its interruption was raised.
///
/// After a stop request, an error is the interruption (or a callback giving
/// up because of it), and a value produced after swallowing the
/// interruption is not trustworthy: the request resolves with why it was
/// stopped. A panic is a bug and is never hidden. A stopper that got here
/// first has answered the caller with its reason: this result is late, and
/// is dropped (after the claim, like garbage); the outcome is what the
/// caller was told.
fn settle<T>(
    req: &Request<T>,
    result: Result<T, IsleError>,
    interrupted: bool,
    mut garbage: Garbage<T>,
) -> Outcome {
    let result = match (result, req.header().reason()) {
        (Err(IsleError::Panic(m)), _) => Err(IsleError::Panic(m)),
        (Err(_), Some(reason)) => Err(reason.error()),
        (Ok(v), Some(reason)) if interrupted => {
            garbage.0 = Some(v);
            Err(reason.error())
        }
        (r, _) => r,
    };
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

impl<T, F> Runnable for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static,
{
    fn run(mut self: Box<Self>, ctx: &Ctx<'_>, interrupt: &Arc<Interrupt>) -> Ran {
        let req = &self.req;
        if !req.start(interrupt.prepare()) {
            return Ran::Done(Outcome::Skipped); // resolved while queued
        }
        STARTED.set(Some(req.header().submitted));
        let Some(work) = self.work.take() else {
            unreachable!("a job's work is taken only here, once")
        };
        let mut garbage: Garbage<T> = (None, None);
        if let Some(reason) = req.header().reason() {
            // Stopped between the caller's stop() and our CAS: never run it.
            return Ran::Done(settle(req, Err(reason.error()), false, garbage));
        }
        let token = CancelToken::of(req.clone());
        interrupt.enter(&token);
        let here = req.running_here();
        let entered = scope::enter(Scope {
            session: ctx.session.clone(),
            capture: None,
        });
        // Children `task.spawn` made (the `async` feature) belong to the
        // request: polled with it while it waits, dropped when it ends.
        #[cfg(feature = "async")]
        let mut children = crate::vm::tasks::Children::default();
        let out = catch_unwind(AssertUnwindSafe(|| {
            // Opening the session's environment is the crate's work, not
            // the request's: not charged to its instruction budget.
            let opened = ctx
                .session_env
                .map(|env| interrupt.uncounted(|| env.open(ctx.lua)));
            let run = match opened {
                Some(Err(e)) => Run::Done(Err(e)),
                _ => work(ctx),
            };
            #[cfg(feature = "async")]
            {
                children.adopt();
                match &run {
                    Run::Wait(_) => children.poll(&mut std::task::Context::from_waker(ctx.waker)),
                    Run::Done(_) => {
                        children.cancel_all();
                        crate::vm::coroutine::close_terminated();
                    }
                }
            }
            run
        }));
        drop(here);
        // Its scope, with its prints' capture if the work made one
        // (current until now, so that the children's prints are the
        // request's too).
        let scope = entered.leave();
        match out {
            #[cfg(feature = "async")]
            Ok(Run::Wait(future)) => {
                let executed = interrupt.executed();
                let interrupted = interrupt.leave();
                let waiting = suspended::Waiting {
                    req: self.req.clone(),
                    token,
                    work: Some(future),
                    children,
                    executed,
                    scope,
                };
                suspended::park(waiting, interrupted, ctx, interrupt)
            }
            Ok(Run::Done(result)) => {
                keep_room(ctx.keep_room, &result, scope.capture.as_deref());
                let interrupted = interrupt.leave();
                let outcome = settle(req, result, interrupted, garbage);
                Ran::Done(outcome.judged(scope.capture.as_deref()))
            }
            Err(payload) => {
                #[cfg(feature = "async")]
                {
                    crate::vm::tasks::discard_spawned();
                    drop(children);
                }
                let result = caught(Err(payload), &mut garbage);
                keep_room(ctx.keep_room, &result, None);
                let interrupted = interrupt.leave();
                Ran::Done(settle(req, result, interrupted, garbage))
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

#[cfg(feature = "async")]
mod suspended;
