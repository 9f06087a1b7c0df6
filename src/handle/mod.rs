//! `LuaHandle`: a `Send + Sync` handle to one Lua value (a function, a
//! table, a userdata) that remembers the VM (and session) holding it, and
//! reaches it through the same request path as every other request.

mod held;
pub(crate) mod route;

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mlua::{FromLua, FromLuaMulti, IntoLua, IntoLuaMulti, Lua, ObjectLike, Value};

use crate::host::call_path::callable;
use crate::host::submit::{lua_err, Work};
use crate::request::owner::{next_owner_id, on_owner_thread};
use crate::request::timer::Timer;
use crate::request::Request;
use crate::vm::{Ctx, Run};
use crate::{IsleError, SessionKey, Task};
use held::{Held, Use};
use route::Place;

/// A handle to a Lua function, table or userdata living in an isle's or
/// pool's VM: `Send + Sync + Clone`, usable from any thread.
///
/// `mlua::Function` and `mlua::Table` cannot leave their VM's thread; a
/// `LuaHandle` can. A request returns one like any other value (it
/// implements [`mlua::FromLua`], so also inside tuples, `Vec`s and
/// `Option`s); in an `exec` closure, make one with
/// `LuaHandle::from_lua(value, lua)` (not in `init`: the VM does not serve
/// anyone yet). Its requests then run where the value lives:
///
/// - made by an [`Isle`](crate::Isle): on that isle's VM;
/// - made by a pool's unkeyed request: on the same worker VM (queued on
///   that worker like a [`broadcast`](crate::IslePool::broadcast): after
///   the session work already queued on it, never stolen by another
///   worker);
/// - made by a [`Session`](crate::Session)'s request: as a request of that
///   session, in order with its other requests, in its environment.
///
/// The requests are those of the crate's other handles (tasks, time
/// limits, cancel, queue capacity, metrics, [`IsleError::Reentrant`] on the
/// VM's own thread): [`call`](Self::call) (a table or userdata with a
/// `__call` metamethod is callable too), [`get`](Self::get) (a field,
/// `__index` honoured), [`call_method`](Self::call_method) (`obj:name(...)`)
/// and [`exec`](Self::exec) for anything else, each with a `spawn_*` form.
///
/// Passed as an argument (`isle.call::<i64>("apply", (f.clone(), 3))`), a
/// handle becomes its value again, on its own VM (and, for a session's
/// handle, in that session's requests only); anywhere else the request
/// fails with an [`IsleError::Lua`] of kind
/// [`Conversion`](crate::LuaErrorKind::Conversion) saying where it belongs.
///
/// ```
/// use mlua_isle::{Isle, LuaHandle};
///
/// let isle = Isle::spawn(|lua| {
///     lua.load("function apply(f, x) return f(x) end").exec()
/// })?;
/// let double: LuaHandle = isle.eval("return function(x) return x * 2 end")?;
/// assert_eq!(double.call::<i64>(21)?, 42);
///
/// // Any thread, any number of clones (one Lua reference between them).
/// let d = double.clone();
/// let n = std::thread::spawn(move || d.call::<i64>(5)).join().unwrap()?;
/// assert_eq!(n, 10);
///
/// // Back into Lua as an argument, on its own VM.
/// assert_eq!(isle.call::<i64>("apply", (double.clone(), 4))?, 8);
///
/// // Tables: fields and methods.
/// let counter: LuaHandle = isle.eval(
///     "return { n = 0, add = function(self, k) self.n = self.n + k; return self.n end }",
/// )?;
/// counter.call_method::<i64>("add", 5)?;
/// assert_eq!(counter.get::<i64>("n")?, 5);
/// # Ok::<(), mlua_isle::IsleError>(())
/// ```
///
/// # Lifetime
///
/// The value stays alive (in its VM's registry) while any clone of the
/// handle does, and counts toward its VM's memory (`memory_limit`,
/// `recycle_when_memory_above`); the VM frees it before its next request
/// after the last clone is dropped (from any thread, its own included). A handle does not keep its isle or
/// pool alive: once the owner is shut down or its last handle dropped,
/// requests resolve [`IsleError::Shutdown`]. A value is gone when its VM
/// is: after the pool recycled that VM
/// ([`recycle_after`](crate::IslePoolBuilder::recycle_after),
/// [`recycle_when_memory_above`](crate::IslePoolBuilder::recycle_when_memory_above)),
/// after a wedged VM was replaced, or (a session's handle) after its
/// session was closed, expired or lost; requests then resolve
/// [`IsleError::HandleLost`].
///
/// # What a handle gives access to
///
/// A handle is the value itself, not a copy: a table reached through it is
/// the VM's table. [`call`](Self::call), [`get`](Self::get) and
/// [`call_method`](Self::call_method) reach it as Lua code would, through
/// its metamethods; the handle offers no way to write. A handle to one of
/// the sandbox's read-only views (a library table such as `string`, or a
/// table `init` put in the globals, as request code sees them) reads
/// through the view, and a write into the view from [`exec`](Self::exec)
/// (`Table::set`) is refused as Lua code's is. But `exec` hands the raw
/// value to Rust code, which can do whatever mlua allows with it
/// (`raw_set`, `set_metatable`, ...): the sandbox guards against Lua code,
/// and Rust code holding a handle is the host's own. Tenants cannot use a
/// handle across sessions: a session's handle, passed as an argument to
/// any other session's (or unkeyed) request, is refused, and so is a
/// handle made by unkeyed work passed to a session's request.
#[derive(Clone)]
pub struct LuaHandle {
    held: Arc<Held>,
}

/// Reads `value[key]` (metamethods honoured).
fn field<T: FromLua>(value: &Value, key: impl IntoLua) -> mlua::Result<T> {
    match value {
        Value::Table(t) => ObjectLike::get(t, key),
        Value::UserData(ud) => ObjectLike::get(ud, key),
        other => Err(mlua::Error::runtime(format!(
            "this handle holds a {}, which has no fields",
            other.type_name()
        ))),
    }
}

impl LuaHandle {
    /// The Lua type of the value: `"function"`, `"table"` or `"userdata"`.
    pub fn type_name(&self) -> &'static str {
        self.held.kind
    }

    /// The session whose request made the handle (its requests run in that
    /// session), if a session's did.
    pub fn session(&self) -> Option<&SessionKey> {
        match &self.held.place {
            Place::Session(b) => Some(&b.key),
            _ => None,
        }
    }

    /// Calls the value with `args` and converts its result to `T`. Blocks
    /// until it has run. A table or userdata is called through its
    /// `__call` metamethod.
    ///
    /// # Errors
    /// [`IsleError::Lua`] when the call fails or the value is not callable;
    /// [`IsleError::HandleLost`] when its VM or session is gone;
    /// [`IsleError::Shutdown`] once its isle or pool has shut down (or was
    /// dropped); [`IsleError::Reentrant`] on its VM's own thread; otherwise
    /// as for [`Isle::eval`](crate::Isle::eval).
    pub fn call<T>(&self, args: impl IntoLuaMulti + Send + 'static) -> Result<T, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        self.run(self.call_work(args))
    }

    /// Like [`call`](Self::call), but returns at once with a [`Task`].
    pub fn spawn_call<T>(&self, args: impl IntoLuaMulti + Send + 'static) -> Task<T>
    where
        T: FromLuaMulti + Send + 'static,
    {
        self.spawn(self.call_work(args))
    }

    /// Reads the field `key` of the value (a table or userdata; `__index`
    /// honoured) and converts it to `T`. Blocks until it has run.
    ///
    /// # Errors
    /// As for [`call`](Self::call); [`IsleError::Lua`] of kind
    /// [`Conversion`](crate::LuaErrorKind::Conversion) when the field does
    /// not convert to `T`.
    pub fn get<T>(&self, key: impl IntoLua + Send + 'static) -> Result<T, IsleError>
    where
        T: FromLua + Send + 'static,
    {
        self.run(self.get_work(key))
    }

    /// Like [`get`](Self::get), but returns at once with a [`Task`].
    pub fn spawn_get<T>(&self, key: impl IntoLua + Send + 'static) -> Task<T>
    where
        T: FromLua + Send + 'static,
    {
        self.spawn(self.get_work(key))
    }

    /// Calls the method `name` of the value with `args`, as Lua's
    /// `value:name(args)` (the value first; the method found through
    /// `__index` too). Blocks until it has run.
    ///
    /// # Errors
    /// As for [`call`](Self::call); [`IsleError::Lua`] when the value has
    /// no such method.
    pub fn call_method<T>(
        &self,
        name: impl Into<String>,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Result<T, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        self.run(self.method_work(name.into(), args))
    }

    /// Like [`call_method`](Self::call_method), but returns at once with a
    /// [`Task`].
    pub fn spawn_call_method<T>(
        &self,
        name: impl Into<String>,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Task<T>
    where
        T: FromLuaMulti + Send + 'static,
    {
        self.spawn(self.method_work(name.into(), args))
    }

    /// Runs `f` on the value's VM with the VM and the value, and returns
    /// what it returns. Blocks until it has run. For a session's handle,
    /// the request is the session's (its environment is not passed: use
    /// [`Session::exec`](crate::Session::exec) for it).
    ///
    /// # Errors
    /// The closure's error as [`IsleError::Lua`]; [`IsleError::Panic`] if
    /// it panics; otherwise as for [`call`](Self::call).
    pub fn exec<T, F>(&self, f: F) -> Result<T, IsleError>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Value) -> mlua::Result<T> + Send + 'static,
    {
        self.run(self.exec_work(f))
    }

    /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
    pub fn spawn_exec<T, F>(&self, f: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Value) -> mlua::Result<T> + Send + 'static,
    {
        self.spawn(self.exec_work(f))
    }

    /// Work run with the value, on its VM.
    fn with_value<T, F>(&self, f: F) -> impl Work<T>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>, Value) -> Run<T> + Send + 'static,
    {
        let held = self.held.clone();
        move |ctx: &Ctx<'_>| match held.value(ctx.lua, Use::Own) {
            Ok(value) => f(ctx, value),
            Err(e) => Run::Done(Err(lua_err(ctx.lua)(e))),
        }
    }

    fn call_work<A, T>(&self, args: A) -> impl Work<T>
    where
        A: IntoLuaMulti + Send + 'static,
        T: FromLuaMulti + Send + 'static,
    {
        self.with_value(move |ctx, value| {
            match callable(ctx.lua, &"the handle's value", value, Vec::new()) {
                Ok(target) => target.call(ctx, args),
                Err(e) => Run::Done(Err(e)),
            }
        })
    }

    fn get_work<K, T>(&self, key: K) -> impl Work<T>
    where
        K: IntoLua + Send + 'static,
        T: FromLua + Send + 'static,
    {
        self.with_value(move |ctx, value| {
            Run::Done(
                field::<Value>(&value, key)
                    .map_err(lua_err(ctx.lua))
                    .and_then(|v| ctx.convert(v)),
            )
        })
    }

    fn method_work<A, T>(&self, name: String, args: A) -> impl Work<T>
    where
        A: IntoLuaMulti + Send + 'static,
        T: FromLuaMulti + Send + 'static,
    {
        self.with_value(move |ctx, value| {
            let method = match field::<Value>(&value, name.as_str()) {
                Ok(Value::Nil) => Err(IsleError::from_lua(&mlua::Error::runtime(format!(
                    "this {} has no method `{name}` (the field is nil)",
                    value.type_name()
                )))),
                Ok(m) => callable(ctx.lua, &format_args!("method `{name}`"), m, vec![value]),
                Err(e) => Err(lua_err(ctx.lua)(e)),
            };
            match method {
                Ok(target) => target.call(ctx, args),
                Err(e) => Run::Done(Err(e)),
            }
        })
    }

    fn exec_work<T, F>(&self, f: F) -> impl Work<T>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Value) -> mlua::Result<T> + Send + 'static,
    {
        self.with_value(move |ctx, value| Run::Done(f(ctx.lua, &value).map_err(lua_err(ctx.lua))))
    }

    /// Queues `work` where the value lives.
    fn spawn<T: Send + 'static>(&self, work: impl Work<T>) -> Task<T> {
        let Some(home) = self.held.home.upgrade() else {
            return resolved(IsleError::Shutdown);
        };
        let (task, job) = home.owner().request(work);
        home.send(job, &self.held.place);
        task
    }

    /// `spawn` + `wait`, refusing at once on the value's own VM thread.
    fn run<T: Send + 'static>(&self, work: impl Work<T>) -> Result<T, IsleError> {
        if on_owner_thread(self.held.owner) {
            return Err(IsleError::Reentrant);
        }
        self.spawn(work).wait()
    }
}

/// A task resolved at once with `err` (its owner is gone).
fn resolved<T: Send + 'static>(err: IsleError) -> Task<T> {
    // An owner of its own, no thread's: waiting on it is never reentrant.
    static NOBODY: OnceLock<(u64, Timer)> = OnceLock::new();
    // Its timer is stopped: a time limit set on such a task starts no
    // thread (the task has resolved anyway).
    let (owner, timer) = NOBODY.get_or_init(|| {
        let id = next_owner_id();
        let timer = Timer::new("mlua-isle-handle".to_string(), id, Duration::ZERO);
        timer.shutdown();
        (id, timer)
    });
    let req = Arc::new(Request::new(*owner, crate::interrupt::alarm::raise));
    req.abandon(err);
    Task::new(req, timer.clone())
}

impl fmt::Debug for LuaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LuaHandle");
        d.field("type", &self.held.kind).field("vm", &self.held.vm);
        match &self.held.place {
            Place::Isle => {}
            Place::Worker(w) => {
                d.field("worker", w);
            }
            Place::Session(b) => {
                d.field("session", &b.key);
            }
        }
        d.finish()
    }
}
