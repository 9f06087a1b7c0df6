//! The one request path: every `eval`, `call` and `exec` of `Isle`,
//! `IslePool` and `Session` is built here (work + request + task) and handed
//! to the front-end's queue. Front-ends differ only in `enqueue`.

use std::sync::Arc;
use std::time::Duration;

use mlua::{FromLuaMulti, IntoLuaMulti, Lua, Table, Value};

use crate::request::owner::next_owner_id;
use crate::request::owner::on_owner_thread;
use crate::request::timer::Timer;
use crate::request::Request;
use crate::vm::config::VmConfig;
use crate::vm::{Ctx, Job};
use crate::{IsleError, Task};

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
        F: FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static,
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

    /// Queues `job`, or drops it (it then resolves `Shutdown`) or abandons
    /// it with another error (`QueueFull`).
    fn enqueue(&self, job: Job);

    /// Builds the request for `work`, queues it, and returns its task.
    fn spawn<T, F>(&self, work: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static,
    {
        let (task, job) = self.owner().request(work);
        self.enqueue(job);
        task
    }

    /// `spawn` + `wait`, refusing at once on the owner's own VM thread.
    fn run<T, F>(&self, work: F) -> Result<T, IsleError>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static,
    {
        if on_owner_thread(self.owner().id) {
            return Err(IsleError::Reentrant);
        }
        self.spawn(work).wait()
    }
}

/// Converts the error a request's work ended with (see
/// `hook::request_error`).
fn lua_err(lua: &Lua) -> impl Fn(mlua::Error) -> IsleError + '_ {
    move |e| crate::interrupt::request_error(lua, &e)
}

/// Work for `eval`: the source runs as an expression if it parses as one,
/// else as a block (`"1 + 1"` and `"return 1 + 1"` both give 2). A source
/// this VM compiled before for the same environment is not compiled again.
pub(crate) fn eval<T>(
    code: String,
) -> impl FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static
where
    T: FromLuaMulti + Send + 'static,
{
    move |ctx| {
        let function = ctx.chunks.load(ctx.lua, ctx.env, &code)?;
        function.call::<T>(()).map_err(lua_err(ctx.lua))
    }
}

/// Looks the global function `name` up (in the session environment,
/// falling back to globals).
fn global_function(ctx: &Ctx<'_>, name: &str) -> Result<mlua::Function, IsleError> {
    match ctx
        .with_scope(|scope| scope.get::<Value>(name))
        .map_err(lua_err(ctx.lua))?
    {
        Value::Nil => Err(IsleError::NotFound(name.to_string())),
        Value::Function(f) => Ok(f),
        other => Err(IsleError::from_lua(&mlua::Error::runtime(format!(
            "global `{name}` is not a function (it is a value of type {})",
            other.type_name()
        )))),
    }
}

/// Work for `call`: looks `name` up (in the session environment, falling
/// back to globals) and calls it.
pub(crate) fn call<A, T>(
    name: String,
    args: A,
) -> impl FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static
where
    A: IntoLuaMulti + Send + 'static,
    T: FromLuaMulti + Send + 'static,
{
    move |ctx| {
        global_function(ctx, &name)?
            .call::<T>(args)
            .map_err(lua_err(ctx.lua))
    }
}

/// Work for one batch of `map`: looks `name` up once and calls it with
/// each input, in order. A Lua error fails that input only; once the
/// request must stop (cancel, time limit, shutdown), the batch ends and the
/// whole request resolves with that reason.
pub(crate) fn call_each<A, T>(
    name: Arc<str>,
    inputs: Vec<A>,
) -> impl FnOnce(&Ctx<'_>) -> Result<Vec<Result<T, IsleError>>, IsleError> + Send + 'static
where
    A: IntoLuaMulti + Send + 'static,
    T: FromLuaMulti + Send + 'static,
{
    move |ctx| {
        let f = global_function(ctx, &name)?;
        let token = crate::interrupt::current_token(ctx.lua);
        let mut out = Vec::with_capacity(inputs.len());
        for args in inputs {
            let r = f.call::<T>(args).map_err(lua_err(ctx.lua));
            if r.is_err() && token.as_ref().is_some_and(|t| t.is_cancelled()) {
                return Err(IsleError::Cancelled); // replaced by the stop reason
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// Work for `exec`: a closure given the VM.
pub(crate) fn exec<T, F>(f: F) -> impl FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(&Lua) -> mlua::Result<T> + Send + 'static,
{
    move |ctx| f(ctx.lua).map_err(lua_err(ctx.lua))
}

/// Work for a session's `exec`: a closure given the VM and the session's
/// environment.
pub(crate) fn exec_env<T, F>(f: F) -> impl FnOnce(&Ctx<'_>) -> Result<T, IsleError> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(&Lua, &Table) -> mlua::Result<T> + Send + 'static,
{
    move |ctx| {
        ctx.with_scope(|env| f(ctx.lua, env))
            .map_err(lua_err(ctx.lua))
    }
}

/// The request methods every front-end shares (`eval`, `call` and their
/// `spawn_*` forms; with `exec`, also `exec`/`spawn_exec` taking `&Lua`).
/// Each is a thin wrapper over `Submit`. A session's `exec` also gets its
/// environment, and is written beside it.
macro_rules! request_methods {
    (exec) => {
        crate::host::submit::request_methods!();

        /// Runs `f` with the VM on its thread and returns what it returns.
        /// Blocks until it has run.
        ///
        /// # Errors
        /// The closure's error as [`IsleError::Lua`]; [`IsleError::Panic`] if
        /// it panics (the VM keeps serving); otherwise as for
        /// [`eval`](Self::eval).
        pub fn exec<T, F>(&self, f: F) -> Result<T, IsleError>
        where
            T: Send + 'static,
            F: FnOnce(&mlua::Lua) -> mlua::Result<T> + Send + 'static,
        {
            crate::host::submit::Submit::run(self, crate::host::submit::exec(f))
        }

        /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
        pub fn spawn_exec<T, F>(&self, f: F) -> Task<T>
        where
            T: Send + 'static,
            F: FnOnce(&mlua::Lua) -> mlua::Result<T> + Send + 'static,
        {
            crate::host::submit::Submit::spawn(self, crate::host::submit::exec(f))
        }
    };
    () => {
        /// Evaluates a Lua chunk and converts its result to `T`. Blocks until
        /// it has run.
        ///
        /// The source may be an expression (`"1 + 1"`) or a block
        /// (`"return 1 + 1"`). Errors carry the position as `eval:LINE:`.
        ///
        /// # Errors
        /// [`IsleError::Lua`] for syntax, runtime and conversion errors;
        /// [`IsleError::Reentrant`] when called from this VM's own thread;
        /// [`IsleError::Timeout`] past the default time limit;
        /// [`IsleError::Shutdown`] after shutdown.
        pub fn eval<T>(&self, code: impl Into<String>) -> Result<T, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            crate::host::submit::Submit::run(self, crate::host::submit::eval(code.into()))
        }

        /// Like [`eval`](Self::eval), but returns at once with a [`Task`].
        pub fn spawn_eval<T>(&self, code: impl Into<String>) -> Task<T>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            crate::host::submit::Submit::spawn(self, crate::host::submit::eval(code.into()))
        }

        /// Calls the global Lua function `name` with `args` and converts its
        /// result to `T`. Blocks until it has run.
        ///
        /// # Errors
        /// [`IsleError::NotFound`] when no such global exists;
        /// [`IsleError::Lua`] when it fails or is not a function; otherwise
        /// as for [`eval`](Self::eval).
        pub fn call<T>(
            &self,
            name: impl Into<String>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Result<T, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            crate::host::submit::Submit::run(self, crate::host::submit::call(name.into(), args))
        }

        /// Like [`call`](Self::call), but returns at once with a [`Task`].
        pub fn spawn_call<T>(
            &self,
            name: impl Into<String>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Task<T>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            crate::host::submit::Submit::spawn(self, crate::host::submit::call(name.into(), args))
        }
    };
}
pub(crate) use request_methods;
