//! The one request path: every `eval`, `call` and `exec` of `Isle`,
//! `IslePool` and `Session` is built here (work + request + task) and handed
//! to the front-end's queue. Front-ends differ only in `enqueue`.

use std::sync::Arc;
use std::time::Duration;

use mlua::{FromLuaMulti, IntoLuaMulti, Lua, Table};

use crate::host::call_path;
use crate::request::owner::next_owner_id;
use crate::request::owner::on_owner_thread;
use crate::request::timer::Timer;
use crate::request::{Admission, Request, Room};
use crate::vm::config::VmConfig;
use crate::vm::{Ctx, Job, Run};
use crate::{Chunk, IsleError, Task};

/// What every request of one isle or pool shares.
pub(crate) struct Owner {
    pub(crate) id: u64,
    pub(crate) timer: Timer,
    pub(crate) default_timeout: Option<Duration>,
}

impl Owner {
    /// A new owner with a fresh id, its timer thread named after the VMs'
    /// threads.
    pub(crate) fn new(config: &VmConfig) -> Owner {
        let id = next_owner_id();
        Owner {
            id,
            timer: Timer::new(config.name.clone(), id, config.stop_grace),
            default_timeout: config.default_timeout,
        }
    }

    /// Builds one request: its task (with the default time limit) and the
    /// job that will run `work` and resolve it.
    pub(crate) fn request<T, F>(&self, work: F) -> (Task<T>, Job)
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static,
    {
        let req = Arc::new(Request::new(self.id, crate::interrupt::alarm::raise));
        let task = Task::new(req.clone(), self.timer.clone());
        let task = match self.default_timeout {
            Some(d) => task.timeout(d),
            None => task,
        };
        (task, Job::new(req, work))
    }
}

/// A front-end that can queue jobs.
pub(crate) trait Submit {
    fn owner(&self) -> &Owner;

    /// The room of the front-end's queue; `None` without a
    /// `queue_capacity` (unbounded).
    fn room(&self) -> Option<&Arc<Room>>;

    /// Room a request takes before the queue's: a session's own, with the
    /// pool's `session_queue_capacity`. Taken in that order, and both held.
    fn first_room(&self) -> Option<Arc<Room>> {
        None
    }

    /// True if the caller is a request of this very session (running on
    /// its VM): room in the session's own queue is then held by requests
    /// that wait behind it, and waiting for it would never end.
    fn waits_on_itself(&self) -> bool {
        false
    }

    /// True once shutdown has begun.
    fn is_closed(&self) -> bool;

    /// Queues `job`, or drops it (it then resolves `Shutdown`) or abandons
    /// it with another error. With `admission` (a permit's), the job holds
    /// that room; without, it takes room itself in a bounded queue, and
    /// resolves `QueueFull` when there is none.
    fn enqueue(&self, job: Job, admission: Option<Admission>);

    /// Builds the request for `work`, queues it, and returns its task.
    fn spawn<T, F>(&self, work: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static,
    {
        self.spawn_admitted(work, None)
    }

    /// `spawn`, the request holding `admission` if given (see `enqueue`).
    fn spawn_admitted<T, F>(&self, work: F, admission: Option<Admission>) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static,
    {
        let (task, job) = self.owner().request(work);
        self.enqueue(job, admission);
        task
    }

    /// `spawn` + `wait`, refusing at once on the owner's own VM thread.
    fn run<T, F>(&self, work: F) -> Result<T, IsleError>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static,
    {
        if on_owner_thread(self.owner().id) {
            return Err(IsleError::Reentrant);
        }
        self.spawn(work).wait()
    }
}

/// The room `job` may hold in `front`'s queue: `admission` if given, else
/// room taken now (`None`: there is none; `Some` of an empty admission: an
/// unbounded queue).
pub(crate) fn take_room(front: &impl Submit, admission: Option<Admission>) -> Option<Admission> {
    match (admission, front.room()) {
        (Some(a), _) => Some(a),
        (None, None) => Some(Admission::none()),
        (None, Some(room)) => room.try_acquire(),
    }
}

/// Converts the error a request's work ended with (see
/// `hook::request_error`).
pub(crate) fn lua_err(lua: &Lua) -> impl Fn(mlua::Error) -> IsleError + '_ {
    move |e| crate::interrupt::request_error(lua, &e)
}

/// The work every request method builds: run once on the VM thread, it
/// gives the result, or (the `async` feature) a future to wait on.
pub(crate) trait Work<T>: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static {}
impl<T, F: FnOnce(&Ctx<'_>) -> Run<T> + Send + 'static> Work<T> for F {}

/// Work for `eval` and `eval_with`: the source runs as an expression if it
/// parses as one, else as a block (`"1 + 1"` and `"return 1 + 1"` both give
/// 2), with `args` as its `...`. A chunk (source and name) this VM compiled
/// before for the same environment is not compiled again, whatever the
/// arguments.
pub(crate) fn eval<A, T>(chunk: Chunk, args: A) -> impl Work<T>
where
    A: IntoLuaMulti + Send + 'static,
    T: FromLuaMulti + Send + 'static,
{
    move |ctx| match ctx.chunks.load(ctx.lua, ctx.env(), &chunk) {
        Ok(function) => ctx.call(&function, args),
        Err(e) => Run::Done(Err(e)),
    }
}

/// Work for `call`: resolves `path` (see `call_path`) and calls it.
pub(crate) fn call<A, T>(path: String, args: A) -> impl Work<T>
where
    A: IntoLuaMulti + Send + 'static,
    T: FromLuaMulti + Send + 'static,
{
    move |ctx| match call_path::resolve(ctx, &path) {
        Ok(target) => target.call(ctx, args),
        Err(e) => Run::Done(Err(e)),
    }
}

/// Work for one batch of `map`: resolves `path` once and calls it with
/// each input, in order. A Lua error fails that input only; once the
/// request must stop (cancel, time limit, shutdown), the batch ends and the
/// whole request resolves with that reason.
// Without `async`, `Run` has one variant and the loop never moves `inputs`.
#[cfg_attr(
    not(feature = "async"),
    allow(clippy::while_let_on_iterator, clippy::infallible_destructuring_match)
)]
pub(crate) fn call_each<A, T>(
    path: Arc<str>,
    inputs: Vec<A>,
) -> impl Work<Vec<Result<T, IsleError>>>
where
    A: IntoLuaMulti + Send + 'static,
    T: FromLuaMulti + Send + 'static,
{
    move |ctx| {
        let target = match call_path::resolve(ctx, &path) {
            Ok(target) => target,
            Err(e) => return Run::Done(Err(e)),
        };
        let token = crate::interrupt::current_token(ctx.lua);
        let stopped = move |r: &Result<T, IsleError>| {
            r.is_err() && token.as_ref().is_some_and(|t| t.is_cancelled())
        };
        let mut out = Vec::with_capacity(inputs.len());
        let mut inputs = inputs.into_iter();
        while let Some(args) = inputs.next() {
            let r = match target.call::<A, T>(ctx, args) {
                Run::Done(r) => r,
                // An input waits for a future: the rest of the batch goes
                // on as one future, input after input.
                #[cfg(feature = "async")]
                Run::Wait(first) => {
                    let (lua, coroutines) = (ctx.lua.clone(), ctx.coroutines.clone());
                    // Each input's results within the memory limit, as
                    // before the batch suspended.
                    let limit = ctx.result_limit::<T>();
                    return ctx.wait(Box::pin(async move {
                        let r = first.await;
                        if stopped(&r) {
                            return Err(IsleError::Cancelled);
                        }
                        out.push(r);
                        for args in inputs {
                            let f = target.function();
                            let r = match target.args(&lua, args) {
                                Ok(args) => {
                                    crate::vm::call_later::<T>(&lua, &coroutines, f, args, limit)
                                        .await
                                }
                                Err(e) => Err(crate::interrupt::request_error(&lua, &e)),
                            };
                            if stopped(&r) {
                                return Err(IsleError::Cancelled); // replaced by the stop reason
                            }
                            out.push(r);
                        }
                        Ok(out)
                    }));
                }
            };
            if stopped(&r) {
                return Run::Done(Err(IsleError::Cancelled)); // replaced by the stop reason
            }
            out.push(r);
        }
        Run::Done(Ok(out))
    }
}

/// Work for `exec`: a closure given the VM.
pub(crate) fn exec<T, F>(f: F) -> impl Work<T>
where
    T: Send + 'static,
    F: FnOnce(&Lua) -> mlua::Result<T> + Send + 'static,
{
    move |ctx| Run::Done(f(ctx.lua).map_err(lua_err(ctx.lua)))
}

/// Work for a session's `exec`: a closure given the VM and the session's
/// environment.
pub(crate) fn exec_env<T, F>(f: F) -> impl Work<T>
where
    T: Send + 'static,
    F: FnOnce(&Lua, &Table) -> mlua::Result<T> + Send + 'static,
{
    move |ctx| {
        Run::Done(
            ctx.with_scope(|env| f(ctx.lua, env))
                .map_err(lua_err(ctx.lua)),
        )
    }
}

/// Work for `spawn_exec_async`: an async closure given the VM, whose
/// future runs on the VM thread (suspending the request while pending).
#[cfg(feature = "async")]
pub(crate) fn exec_async<T, F, Fut>(f: F) -> impl Work<T>
where
    T: Send + 'static,
    F: FnOnce(Lua) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
{
    move |ctx| {
        let lua = ctx.lua.clone();
        let future = f(lua.clone());
        ctx.wait(Box::pin(async move {
            future
                .await
                .map_err(|e| crate::interrupt::request_error(&lua, &e))
        }))
    }
}

/// Work for a session's `spawn_exec_async`: as [`exec_async`], given the
/// session's environment too.
#[cfg(feature = "async")]
pub(crate) fn exec_env_async<T, F, Fut>(f: F) -> impl Work<T>
where
    T: Send + 'static,
    F: FnOnce(Lua, Table) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
{
    move |ctx| {
        let lua = ctx.lua.clone();
        let future = f(lua.clone(), ctx.with_scope(Table::clone));
        ctx.wait(Box::pin(async move {
            future
                .await
                .map_err(|e| crate::interrupt::request_error(&lua, &e))
        }))
    }
}

/// The request methods every front-end shares (`eval`, `eval_with`, `call`
/// and their `spawn_*` forms; with `exec`, also `exec`/`spawn_exec` taking `&Lua`).
/// Each is a thin wrapper over `Submit` (or, for a `Permit`, its own `run`
/// and `spawn`). A session's `exec` also gets its environment, and is
/// written beside it.
///
/// `request_methods!(exec)` and `request_methods!()` take `&self`;
/// `request_methods!(@exec [self] self)` and `(@plain [self] self)` write
/// them taking `self` (a permit, used up). The receiver is passed in, with
/// the `self` the bodies use, so that both come from one place (macro
/// hygiene).
macro_rules! request_methods {
    (exec) => {
        crate::host::submit::request_methods!(@exec [&self] self);
    };
    () => {
        crate::host::submit::request_methods!(@plain [&self] self);
    };
    (@exec [$($recv:tt)+] $s:ident) => {
        crate::host::submit::request_methods!(@plain [$($recv)+] $s);

        /// Runs `f` with the VM on its thread and returns what it returns.
        /// Blocks until it has run.
        ///
        /// # Errors
        /// The closure's error as [`IsleError::Lua`]; [`IsleError::Panic`] if
        /// it panics (the VM keeps serving); otherwise as for
        /// [`eval`](Self::eval).
        pub fn exec<T, F>($($recv)+, f: F) -> Result<T, IsleError>
        where
            T: Send + 'static,
            F: FnOnce(&mlua::Lua) -> mlua::Result<T> + Send + 'static,
        {
            $s.run(crate::host::submit::exec(f))
        }

        /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
        pub fn spawn_exec<T, F>($($recv)+, f: F) -> Task<T>
        where
            T: Send + 'static,
            F: FnOnce(&mlua::Lua) -> mlua::Result<T> + Send + 'static,
        {
            $s.spawn(crate::host::submit::exec(f))
        }

        /// Runs the async closure `f` on the VM thread and returns at once
        /// with a [`Task`] for what its future gives (the `async` feature).
        ///
        /// The future is polled on the VM thread (it need not be `Send`):
        /// while it is pending, the request is suspended and the VM serves
        /// other requests; any waker may wake it. Cancel, time limits and
        /// shutdown drop the future.
        ///
        /// ```
        /// # #[cfg(feature = "async")] {
        /// let isle = mlua_isle::Isle::spawn(|_| Ok(()))?;
        /// let n: i64 = isle
        ///     .spawn_exec_async(|lua: mlua::Lua| async move { lua.load("return 6 * 7").eval_async().await })
        ///     .wait()?;
        /// assert_eq!(n, 42);
        /// # }
        /// # Ok::<(), mlua_isle::IsleError>(())
        /// ```
        #[cfg(feature = "async")]
        pub fn spawn_exec_async<T, F, Fut>($($recv)+, f: F) -> Task<T>
        where
            T: Send + 'static,
            F: FnOnce(mlua::Lua) -> Fut + Send + 'static,
            Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
        {
            $s.spawn(crate::host::submit::exec_async(f))
        }
    };
    (@plain [$($recv:tt)+] $s:ident) => {
        /// Evaluates a Lua chunk and converts its result to `T`. Blocks until
        /// it has run.
        ///
        /// The source may be an expression (`"1 + 1"`) or a block
        /// (`"return 1 + 1"`): a `&str`, a `String`, or a
        /// [`Chunk`](crate::Chunk) that names it. Errors carry the position
        /// as `eval:LINE:`, or under the chunk's name. A chunk evaluated
        /// before on the same VM (and environment) is not compiled again.
        ///
        /// # Errors
        /// [`IsleError::Lua`] for syntax, runtime and conversion errors;
        /// [`IsleError::Reentrant`] when called from this VM's own thread;
        /// [`IsleError::Timeout`] past the default time limit;
        /// [`IsleError::Shutdown`] after shutdown.
        pub fn eval<T>($($recv)+, chunk: impl Into<crate::Chunk>) -> Result<T, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            $s.run(crate::host::submit::eval(chunk.into(), ()))
        }

        /// Like [`eval`](Self::eval), but returns at once with a [`Task`].
        pub fn spawn_eval<T>($($recv)+, chunk: impl Into<crate::Chunk>) -> Task<T>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            $s.spawn(crate::host::submit::eval(chunk.into(), ()))
        }

        /// Evaluates a Lua chunk with arguments, which it sees as `...`, and
        /// converts its result to `T`. Blocks until it has run.
        ///
        /// Arguments are data, never source: pass input this way rather than
        /// pasting it into the source. The chunk is compiled once per VM and
        /// shares its cache entry with a plain [`eval`](Self::eval) of the
        /// same source and name, whatever the arguments.
        ///
        /// ```
        /// let isle = mlua_isle::Isle::spawn(|_| Ok(()))?;
        /// assert_eq!(isle.eval_with::<i64>("... * 2", 21)?, 42);
        /// let (a, b): (i64, String) = isle.eval_with("local n, s = ... return n + 1, s:upper()", (1, "x"))?;
        /// assert_eq!((a, b.as_str()), (2, "X"));
        /// # Ok::<(), mlua_isle::IsleError>(())
        /// ```
        ///
        /// # Errors
        /// As for [`eval`](Self::eval); an argument that cannot be converted
        /// to Lua is an [`IsleError::Lua`] of kind
        /// [`Conversion`](crate::LuaErrorKind::Conversion).
        pub fn eval_with<T>(
            $($recv)+,
            chunk: impl Into<crate::Chunk>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Result<T, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            $s.run(crate::host::submit::eval(chunk.into(), args))
        }

        /// Like [`eval_with`](Self::eval_with), but returns at once with a
        /// [`Task`].
        pub fn spawn_eval_with<T>(
            $($recv)+,
            chunk: impl Into<crate::Chunk>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Task<T>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            $s.spawn(crate::host::submit::eval(chunk.into(), args))
        }

        /// Calls a Lua function with `args` and converts its result to `T`.
        /// Blocks until it has run.
        ///
        /// `path` names a global function (`"add"`), or a path to one:
        /// `"string.upper"`, `"a.b.c"` (each name after the first indexes
        /// the value before it, `__index` honoured), or a method,
        /// `"obj:get"` / `"a.b:get"` (the object is passed first, as Lua's
        /// `:` does). The first name is a global (in a session, its
        /// environment first). The target may also be a table or userdata
        /// with a `__call` metamethod, called as Lua would
        /// (`__call(t, args...)`; a `__call` that is itself callable is
        /// followed, up to 8 levels).
        ///
        /// # Errors
        /// [`IsleError::NotFound`] when a name on the path is `nil` (it
        /// holds the path up to that name); [`IsleError::Lua`] when the path
        /// is not well formed, a value midway cannot be indexed, the target
        /// is not callable, or the call fails; otherwise as for
        /// [`eval`](Self::eval).
        pub fn call<T>(
            $($recv)+,
            path: impl Into<String>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Result<T, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            $s.run(crate::host::submit::call(path.into(), args))
        }

        /// Like [`call`](Self::call), but returns at once with a [`Task`].
        pub fn spawn_call<T>(
            $($recv)+,
            path: impl Into<String>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Task<T>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            $s.spawn(crate::host::submit::call(path.into(), args))
        }
    };
}
pub(crate) use request_methods;
