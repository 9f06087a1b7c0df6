//! Requests as coroutines (the `async` feature).
//!
//! With the feature on, a request's Lua function runs as a coroutine
//! driven by mlua's `AsyncThread`, so that an async Rust function it calls
//! (mlua's `create_async_function`), at any depth of Lua calls, can be
//! pending: mlua's wrapper of that function yields, `AsyncThread::poll`
//! returns `Pending`, and the request suspends (`vm/job.rs`).
//!
//! Coroutines are reused: a request that finishes leaves its (finished)
//! coroutine to the next one of the same tenant (the same session, or
//! unkeyed work), so a request that never waits costs one `lua_resume`
//! more than a plain call, not a new Lua thread. Only of the same tenant:
//! Lua code can keep its coroutine (`coroutine.running()`), and with it
//! resume or close whatever request runs on that coroutine later. A request's
//! coroutine is recorded as the running Lua thread while it is polled
//! (`alarm::on_coroutine`), so a stop arms the hook on it, as on any
//! coroutine switch Lua code makes.
//!
//! A suspended request that must stop is *terminated*: its coroutine is
//! resumed with mlua's own "drop the future" signal, which mlua's wrapper
//! passes to its poll function, which drops the future right there (as
//! mlua does when a future from `Function::call_async` is dropped); then
//! the coroutine is closed, running its pending `__close` handlers under
//! the stop machinery. mlua keeps that signal private: we learn its value
//! once per process ([`terminate_signal`]) by watching what mlua resumes a
//! dropped `call_async` future with, in a scratch Lua state.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use mlua::thread::AsyncThread;
use mlua::{FromLuaMulti, Function, IntoLuaMulti, LightUserData, Lua, Thread, Value};

use crate::interrupt::alarm;
#[cfg(not(feature = "lua51"))]
use crate::vm::precompiled::Precompiled;

/// What runs each request as a coroutine (`request.lua`; not on 5.1,
/// whose `xpcall` takes no arguments).
#[cfg(not(feature = "lua51"))]
static REQUEST: Precompiled = Precompiled::new("=mlua-isle request", include_str!("request.lua"));

/// Finished coroutines kept for reuse.
const SPARES: usize = 16;
/// Of those, at most this many sessions' (see `Call::poll`).
const SESSION_SPARES: usize = 2;

/// Whose requests a spare coroutine ran: a session's (its tag, held weakly:
/// the allocation, hence the address `ptr_eq` compares, outlives the
/// session while this is kept), or unkeyed work's (`None`).
type Tenant = Option<std::sync::Weak<dyn std::any::Any + Send + Sync>>;

/// The tenant of the running request.
fn tenant() -> Tenant {
    crate::vm::scope::session().map(|tag| std::sync::Arc::downgrade(&tag))
}

fn same_tenant(a: &Tenant, b: &Tenant) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::sync::Weak::ptr_eq(a, b),
        _ => false,
    }
}

/// One VM's request coroutines.
pub(crate) struct Coroutines {
    lua: Lua,
    /// Finished coroutines, with the tenant whose request ran on each.
    spares: RefCell<Vec<(Tenant, Thread)>>,
    /// Every request's function runs under Lua's own `xpcall`, inside its
    /// coroutine (`body(...)`), with a message handler like mlua's, so
    /// that its error is handled inside the coroutine, as a request's on
    /// the main state is, not after the coroutine died: on Lua 5.4 and
    /// 5.5, a coroutine that dies of an error keeps its to-be-closed
    /// variables open, and mlua would close them with `lua_settop` on the
    /// dead coroutine, which Lua does not allow; everywhere, mlua would
    /// turn the error object into a string (`__tostring`) on the main
    /// state, out of reach of a stop armed on the coroutine. Not on Lua
    /// 5.1, whose `xpcall` cannot be yielded across (and whose coroutines
    /// have no such variables).
    ///
    /// `body` finds the function to run in `given[co]`, and leaves an
    /// error in `failed[co]` (boxed in a table) instead of returning it,
    /// so that arguments and results cross as they would for a plain call,
    /// with no list built for them.
    #[cfg(not(feature = "lua51"))]
    body: Function,
    #[cfg(not(feature = "lua51"))]
    given: mlua::Table,
    #[cfg(not(feature = "lua51"))]
    failed: mlua::Table,
}

thread_local! {
    /// The coroutines of the VM living on this thread (one at a time), for
    /// `task.spawn` (`vm/tasks.rs`).
    static CURRENT: RefCell<std::rc::Weak<Coroutines>> = const { RefCell::new(std::rc::Weak::new()) };
    /// Terminated coroutines waiting to be closed by the stop that dropped
    /// their future ([`close_terminated`]).
    static CLOSING: RefCell<Vec<Thread>> = const { RefCell::new(Vec::new()) };
}

/// The coroutines current before a VM is built on this thread (a pool
/// worker recycling its VM builds the new one beside the old): put back
/// if the new VM fails to start, and the old one serves on.
pub(crate) struct KeepCurrent(Option<std::rc::Weak<Coroutines>>);

impl KeepCurrent {
    pub(crate) fn new() -> KeepCurrent {
        KeepCurrent(Some(CURRENT.with(|c| c.borrow().clone())))
    }

    /// The new VM started: its coroutines stay current.
    pub(crate) fn started(mut self) {
        self.0 = None;
    }
}

impl Drop for KeepCurrent {
    fn drop(&mut self) {
        if let Some(before) = self.0.take() {
            CURRENT.with(|c| *c.borrow_mut() = before);
        }
    }
}

impl Coroutines {
    /// Before the VM's catchers replace `xpcall` (`interrupt/catchers.rs`):
    /// the request's top-level `xpcall` must catch everything, the
    /// interruption included, which then ends the request.
    pub(crate) fn new(lua: &Lua) -> mlua::Result<Rc<Coroutines>> {
        // Learn the signal now, not in the middle of a stop.
        let _ = terminate_signal();
        #[cfg(not(feature = "lua51"))]
        let (body, given, failed) = {
            let handler = alarm::traceback_handler(lua)?;
            // `coroutine.running`, even where the host left the library
            // out (`std_libs`): opened for this, then taken away again.
            let opened = lua
                .globals()
                .get::<Option<mlua::Table>>("coroutine")?
                .is_none();
            // (LuaJIT opens it with the base library, always.)
            #[cfg(not(feature = "luajit"))]
            if opened {
                lua.load_std_libs(mlua::StdLib::COROUTINE)?;
            }
            let running = lua
                .globals()
                .get::<mlua::Table>("coroutine")?
                .get::<Function>("running")?;
            if opened {
                lua.globals().set("coroutine", Value::Nil)?;
                if let Some(loaded) = lua
                    .globals()
                    .get::<Option<mlua::Table>>("package")?
                    .map(|p| p.get::<Option<mlua::Table>>("loaded"))
                    .transpose()?
                    .flatten()
                {
                    loaded.set("coroutine", Value::Nil)?;
                }
            }
            REQUEST
                .load(lua)?
                .call::<(Function, mlua::Table, mlua::Table)>((
                    running,
                    lua.globals().get::<Function>("xpcall")?,
                    handler,
                ))?
        };
        let this = Rc::new(Coroutines {
            lua: lua.clone(),
            spares: RefCell::new(Vec::new()),
            #[cfg(not(feature = "lua51"))]
            body,
            #[cfg(not(feature = "lua51"))]
            given,
            #[cfg(not(feature = "lua51"))]
            failed,
        });
        CURRENT.with(|c| *c.borrow_mut() = Rc::downgrade(&this));
        Ok(this)
    }

    /// The coroutines of the VM on this thread.
    pub(crate) fn current() -> Option<Rc<Coroutines>> {
        CURRENT.with(|c| c.borrow().upgrade())
    }

    /// Starts `f(args)` as a coroutine, as a future for the request.
    pub(crate) fn call<R: FromLuaMulti>(
        self: &Rc<Self>,
        function: &Function,
        args: impl IntoLuaMulti,
    ) -> mlua::Result<Call<R>> {
        #[cfg(feature = "lua51")]
        let f = function;
        #[cfg(not(feature = "lua51"))]
        let f = &self.body;
        let tenant = tenant();
        let spare = {
            let mut spares = self.spares.borrow_mut();
            // A closed session's are of no more use: their memory goes back.
            spares.retain(|(t, _)| t.as_ref().is_none_or(|t| t.strong_count() > 0));
            let mine = spares.iter().rposition(|(t, _)| same_tenant(t, &tenant));
            mine.map(|i| spares.swap_remove(i).1)
        };
        let thread = match spare {
            Some(thread) => {
                thread.reset(f.clone())?;
                thread
            }
            None => self.lua.create_thread(f.clone())?,
        };
        #[cfg(not(feature = "lua51"))]
        self.given.raw_set(&thread, function)?;
        let future = thread.clone().into_async::<R>(args)?;
        Ok(Call {
            thread,
            future: Some(future),
            home: self.clone(),
            tenant,
        })
    }
}

/// Closes the coroutines of the futures just dropped on this thread: runs
/// their pending `__close` handlers (Lua 5.4 and 5.5; Luau resets them).
/// The caller has armed the stop machinery, so the handlers can be stopped.
/// Their request is ending: what the handlers spawn (`task.spawn`) has
/// no request to belong to, and is discarded, never left for the next
/// request on this thread to adopt (it would run in another tenant's).
///
/// Until nothing is left: dropping a discarded child closes its coroutine
/// in turn. (Each round runs Lua code only in handlers, which a stop
/// reaches; a child dropped before it ran has none.)
pub(crate) fn close_terminated() {
    loop {
        let closing = CLOSING.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let any = !closing.is_empty();
        for thread in closing {
            close(&thread);
        }
        if !crate::vm::tasks::discard_spawned() && !any {
            return;
        }
    }
}

impl Coroutines {
    /// The error the request's function raised, if it did (`body` left it
    /// in `failed`), rather than what its coroutine returned.
    fn outcome<R>(&self, thread: &Thread, returned: mlua::Result<R>) -> mlua::Result<R> {
        #[cfg(not(feature = "lua51"))]
        if let Ok(Some(boxed)) = self.failed.raw_get::<Option<mlua::Table>>(thread) {
            let _ = self.failed.raw_set(thread, Value::Nil);
            return Err(error_of(boxed.raw_get(1).unwrap_or(Value::Nil)));
        }
        let _ = thread;
        returned
    }
}

/// The error a request's function raised, as mlua gives it for a call on
/// the main state: the Rust error it carries, or a runtime error with its
/// message.
#[cfg(not(feature = "lua51"))]
fn error_of(value: Value) -> mlua::Error {
    match value {
        Value::Error(e) => *e,
        Value::String(s) => mlua::Error::RuntimeError(s.to_string_lossy()),
        other => mlua::Error::RuntimeError(
            other
                .to_string()
                .unwrap_or_else(|_| format!("(error object is a {} value)", other.type_name())),
        ),
    }
}

/// Closes a coroutine that will not be resumed again.
fn close(thread: &Thread) {
    #[cfg(any(feature = "lua54", feature = "lua55", feature = "luau"))]
    alarm::on_coroutine(thread, || {
        // An error here is a handler's, or the one the coroutine died
        // of: the request has its result already.
        if let Ok(noop) = thread_noop(thread) {
            let _ = thread.reset(noop);
        }
    });
    #[cfg(not(any(feature = "lua54", feature = "lua55", feature = "luau")))]
    let _ = thread;
}

#[cfg(any(feature = "lua54", feature = "lua55", feature = "luau"))]
fn thread_noop(thread: &Thread) -> mlua::Result<Function> {
    let lua = thread
        .weak_lua()
        .try_upgrade()
        .ok_or_else(|| mlua::Error::runtime("the VM is gone"))?;
    lua.create_function(|_, ()| Ok(()))
}

/// A request's Lua function running as a coroutine: a future, polled by
/// the request's job on its VM thread.
pub(crate) struct Call<R> {
    thread: Thread,
    /// `None` once finished.
    future: Option<AsyncThread<R>>,
    home: Rc<Coroutines>,
    /// Whose request runs on it (see [`Tenant`]).
    tenant: Tenant,
}

impl<R: FromLuaMulti> Future for Call<R> {
    type Output = mlua::Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(future) = this.future.as_mut() else {
            panic!("a request's coroutine polled after it finished")
        };
        let polled = alarm::on_coroutine(&this.thread, || Pin::new(future).poll(cx));
        let Poll::Ready(result) = polled else {
            return Poll::Pending;
        };
        this.future = None;
        let result = this.home.outcome(&this.thread, result);
        if result.is_ok() && this.thread.status() == mlua::thread::ThreadStatus::Finished {
            let mut spares = this.home.spares.borrow_mut();
            let tenant = this.tenant.take();
            // A session's spare serves only its next requests: few are kept
            // (a VM may serve thousands of sessions, each leaving one).
            let full = match tenant {
                None => spares.len() >= SPARES,
                Some(_) => spares.iter().filter(|(t, _)| t.is_some()).count() >= SESSION_SPARES,
            };
            if full {
                // The oldest of its kind goes.
                if let Some(i) = spares
                    .iter()
                    .position(|(t, _)| t.is_some() == tenant.is_some())
                {
                    spares.remove(i);
                }
            }
            if spares.len() < SPARES {
                spares.push((tenant, this.thread.clone()));
            }
        } else {
            // Died of an error: Lua 5.4 and 5.5 leave its to-be-closed
            // variables open until it is closed (the request is still
            // running: its handlers run under its own stop machinery).
            close(&this.thread);
        }
        Poll::Ready(result)
    }
}

impl<R> Drop for Call<R> {
    fn drop(&mut self) {
        if self.future.take().is_none() {
            return; // finished
        }
        // Suspended (or never polled): drop the future now, by mlua's
        // signal, then leave the coroutine to be closed by the stop.
        if let Some(signal) = terminate_signal() {
            if alarm::yielded_in_async_wrapper(&self.thread) {
                let signal = LightUserData(signal as *mut std::ffi::c_void);
                let _ = alarm::on_coroutine(&self.thread, || {
                    self.thread.resume::<mlua::MultiValue>(signal)
                });
            }
        }
        CLOSING.with(|c| c.borrow_mut().push(self.thread.clone()));
    }
}

/// mlua's private "drop the future" signal (a light userdata), learnt once
/// per process; `None` if this mlua does not show it as expected (then a
/// stopped request's future is dropped when Lua collects its coroutine).
fn terminate_signal() -> Option<usize> {
    static SIGNAL: OnceLock<Option<usize>> = OnceLock::new();
    *SIGNAL.get_or_init(|| learn_terminate_signal().ok().flatten())
}

/// Drops a pending `call_async` future in a scratch VM whose
/// `coroutine.yield` (which mlua's async wrapper captures when the
/// function is created) records what the coroutine is resumed with.
fn learn_terminate_signal() -> mlua::Result<Option<usize>> {
    let lua = Lua::new();
    lua.load(
        r#"
        local yield, unpack = coroutine.yield, table.unpack or unpack
        local function pack(...) return select('#', ...), { ... } end
        coroutine.yield = function(...)
            local n, r = pack(yield(...))
            resumed_with = r[1]
            return unpack(r, 1, n)
        end
        "#,
    )
    // mlua resumes a dropped future's coroutine with the signal only if
    // the function that yielded looks like its wrapper, by chunk name:
    // ours stands in the wrapper's place, so it is named the same.
    .set_name("=__mlua_async_poll")
    .exec()?;
    let forever = lua.create_async_function(|_, ()| std::future::pending::<mlua::Result<()>>())?;
    let mut call = Box::pin(forever.call_async::<()>(()));
    let mut cx = Context::from_waker(Waker::noop());
    if call.as_mut().poll(&mut cx).is_ready() {
        return Ok(None);
    }
    drop(call);
    Ok(match lua.globals().get::<Value>("resumed_with")? {
        Value::LightUserData(signal) if !signal.0.is_null() && signal != Lua::poll_pending() => {
            Some(signal.0 as usize)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn mlua_shows_its_terminate_signal() {
        assert!(super::learn_terminate_signal().unwrap().is_some());
    }
}
