//! Arming the interrupt hook on demand, so that Lua code runs at full speed
//! until a request must stop.
//!
//! With a count hook installed, Lua 5.x checks for it on every instruction,
//! which makes pure-Lua code 2–3x slower whatever the interval. So on Unix,
//! and unless the VM counts instructions (`max_instructions`), no hook is
//! installed while a request runs. To stop one, the stopping thread raises
//! the VM thread's [`Alarm`]: it sets the `armed` flag, then sends the VM
//! thread a signal (`SIGURG`), whose handler installs the hook, with a count
//! of 1, on the Lua thread (main state or coroutine) running at that moment.
//! This is how Lua's own `lua.c` stops a script on Ctrl-C, and what
//! `lua_sethook` is written for (its comment in `ldebug.c`: "This function can
//! be called during a signal, under reasonable assumptions").
//!
//! The hook then ticks on the next instruction; `interrupt/hook.rs` checks the
//! request's stop reason and raises the interruption, or removes itself if
//! there is nothing to stop (a late signal for a request that has finished).
//!
//! # Knowing which Lua thread runs
//!
//! A hook set on one `lua_State` does not reach another, and a coroutine
//! already running has its own. So every switch between Lua threads goes
//! through this module: `coroutine.resume`, `coroutine.wrap` and (Lua 5.4
//! on) `coroutine.close` are replaced by C functions of ours
//! (`tracked_resume`, `tracked_wrap`, `tracked_close`), which record the
//! state about to run in the thread-local `SignalSlot` before calling Lua's own
//! resume or close, and the caller's state after it returns. After recording a
//! switch, they check `armed` themselves and arm the new state if it is set:
//! a signal that landed just before the switch armed the state being left.
//!
//! Lua threads resumed by Rust code through mlua's `Thread` API
//! (`Thread::resume`, `Thread::into_async`, and `Function::call_async`,
//! which runs the function on a thread of its own) pass through none of
//! those functions. mlua's thread event callback (set by
//! `interrupt/hook.rs`) tells of each such resume before it happens
//! ([`resumed_from_rust`]): the thread is recorded as running, and listed
//! in the `SignalSlot` with the state it was resumed from, so it runs
//! hook-free like any tracked coroutine. mlua tells of no return from such
//! a resume (only of a yield), so listed threads are forgotten lazily, at
//! the next switch we see, once they are no longer running or resuming
//! another (`prune`); until then the signal arms every listed thread and
//! every state one was resumed from, one of which is the one running.
//! A listed thread let go while suspended (it yielded back to Rust:
//! [`yielded_to_rust`]) or dead of an error gets the VM's ticking hook, for
//! the Lua code mlua may run on it with no event (dropping a pending
//! `call_async` future resumes its thread, then closes it, running its
//! `__close` handlers); resumed with an event, it is hook-free again.
//! Dropping a stopped suspended request's futures runs under the stop
//! machinery on Lua 5.4 and 5.5, where the interruption never raises in
//! mlua's wrapper of an async function (`mod raise`), which must get to
//! drop the future it holds.
//!
//! `Lua::current_thread()` is not the running thread either: for a thread
//! `call_async` made, mlua answers the thread that called `call_async`.
//! [`running_state`] asks Lua itself, so the hook is set (or taken away) on
//! the thread that runs.
//!
//! # The handshake with a stopping thread
//!
//! The VM thread, before it marks a request `RUNNING`, clears `armed` and
//! stores its alarm id in the request header; the `RUNNING` CAS publishes
//! both. A stopping thread records the stop reason, fails to resolve the
//! request as queued (seeing `RUNNING`, hence the id), and calls [`raise`].
//! So either the request never runs, or the stopper signals the VM thread,
//! which by then runs it (or has finished it: a late signal only costs one
//! hook tick).
//!
//! # Why this is sound
//!
//! - **The handler touches only its own thread's Lua.** It runs on the VM
//!   thread it interrupted and reads that thread's `SignalSlot`; the only Lua call
//!   it makes is `lua_sethook` on the state recorded as running, which Lua
//!   documents as safe to call from a signal handler (it stores the hook,
//!   its count and mask, and sets the `trap` flag of the frames on the call
//!   chain, all of which the interrupted code tolerates changing under it).
//!   It allocates nothing, takes no lock, and calls no Rust code that could
//!   panic.
//! - **Every state it may arm is alive.** The main state is recorded by
//!   `begin` and forgotten by `unbind` before its VM is dropped (the VM is
//!   dropped on its own thread, so no signal handler can run in between).
//!   A coroutine is recorded only while Lua's resume (or close) runs it,
//!   and it is the resumer's argument 1, so it cannot be collected; the
//!   resumer's state is recorded again as soon as that call returns, which
//!   it always does: given a coroutine, Lua's resume and close (5.2–5.5)
//!   return their errors instead of raising them (Lua 5.1's resume raises
//!   some, which is why 5.1 is not supported here). A thread resumed from
//!   Rust is held (a `Thread` handle) while it is listed, and while it is
//!   the one recorded as running: it stops being recorded before it is
//!   let go. The state each was resumed from is the main state, a
//!   request's coroutine (during its poll, which forgets what it listed
//!   when it ends), a coroutine of a tracked switch (which forgets what
//!   was listed while it ran when it returns: those threads have all
//!   stopped running) or a listed thread below (let go after the entries
//!   above it). `unbind`, `begin` and the end of a request forget them
//!   all.
//! - **The signal reaches a live thread.** `raise` sends it while holding
//!   the alarm's thread lock; a VM thread clears its id under that lock
//!   before it exits, so the `pthread_t` is valid whenever it is used.
//! - **The tracked functions are well-formed Lua C functions.** They use
//!   only the stack slots Lua guarantees (`LUA_MINSTACK`), and their frames
//!   own nothing: when Lua's error handling `longjmp`s over them (an
//!   argument error, the interruption raised by the check), nothing is
//!   left undone but the switch record, which is only ever skipped on the
//!   paths argued above not to raise.
//! - **Luau's interrupt is written from other threads** (`mod luau`), as
//!   Luau's `lua.h` allows for that one field, and always atomically on
//!   our side. A stopper writes it only under the alarm's `vm_lock`, while
//!   the address it writes to is set; the VM thread clears that address
//!   under the same lock before the VM is dropped.
//!
//! Everything `unsafe` in the crate is in this module, but for the Lua C
//! functions of `interrupt/alarm/native.rs` (Lua 5.1 and LuaJIT only), which argue their own
//! soundness. What lives here:
//!
//! - the alarm, its signal handler and the tracked coroutine switches
//!   (`mod unix`), described above;
//! - Luau's interrupt, armed on demand (`mod luau`);
//! - Lua 5.4/5.5's C hooks: the tick, and raising the interruption from
//!   the next instruction (`mod raise`);
//! - Lua 5.2–5.5's catchers as C functions, invisible to Lua code:
//!   `pcall`, `xpcall`, `load`, `loadfile`, `dofile` and the untracked
//!   `coroutine.resume` (`mod protected`, which argues its own soundness),
//!   and there too `print` where it stays Lua's own (`sandbox/print.rs`);
//! - Lua 5.1–5.5's `coroutine.create` and `wrap` where the hook ticks on
//!   a count, charging a new thread's first countdown (`mod threads`);
//! - Lua 5.2–5.5's allocator, wrapped where a VM has an instruction budget
//!   to count the allocations its memory limit refuses (`mod refusals`);
//! - `new_lua_with_unsafe_libs`, for the host's `unsafe_std_libs`.

// Luau has no hooks to arm: only the alarm, its interrupt (`mod luau`),
// the stubs below and `SUPPORTED` are used.
#![cfg_attr(feature = "luau", allow(dead_code))]

#[cfg(any(feature = "lua51", feature = "luajit"))]
pub(crate) mod native;

#[cfg(any(
    feature = "lua51",
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
mod threads;
#[cfg(any(
    feature = "lua51",
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) use threads::charge_new_threads;

/// LuaJIT keeps one hook countdown per VM, and Luau has no count: new
/// threads hide nothing from them (`mod threads`).
#[cfg(any(feature = "luajit", feature = "luau"))]
pub(crate) fn charge_new_threads(
    _lua: &mlua::Lua,
    _coroutine: &mlua::Table,
    _charge: &mlua::Function,
) -> mlua::Result<()> {
    Ok(())
}

mod registry;
pub(crate) use registry::*;

mod raising;
pub(crate) use raising::install as install_raising;

#[cfg(any(feature = "lua54", feature = "lua55"))]
mod raise;
#[cfg(any(feature = "lua54", feature = "lua55"))]
pub(crate) use raise::{end_raising, raise_from_next_instruction, set_tick, tick_every};

#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
mod protected;

#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) mod refusals;
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) use refusals::take_refused;

/// Lua 5.1, LuaJIT and Luau collect nothing before they refuse an
/// allocation: no refusal is counted (see `mod refusals`).
#[cfg(not(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
)))]
pub(crate) fn take_refused() -> u64 {
    0
}

#[cfg(feature = "luau")]
mod luau;

#[cfg(all(unix, not(feature = "luau")))]
mod unix;

#[cfg(all(unix, not(feature = "luau")))]
pub(crate) use unix::{
    begin, bind, disarm_main, disarm_running, rearm_running, resumed_from_rust,
    tracked_resume_close, tracked_wrap_with, unbind, yielded_to_rust,
};

#[cfg(all(unix, not(feature = "luau"), feature = "async"))]
pub(crate) use unix::on_coroutine;

/// Luau's interrupt is per VM, and off Unix nothing is armed on demand:
/// a request's coroutine needs no switch recorded.
#[cfg(all(not(all(unix, not(feature = "luau"))), feature = "async"))]
pub(crate) fn on_coroutine<R>(_thread: &mlua::Thread, resume: impl FnOnce() -> R) -> R {
    resume()
}

#[cfg(feature = "luau")]
pub(crate) use luau::{
    begin, bind, bind_interrupt, disarm_main, disarm_running, rearm_running, unbind,
};

/// Off Unix (and not Luau) hooks are never armed on demand: these are
/// never called.
#[cfg(all(not(unix), not(feature = "luau")))]
pub(super) fn bind(_lua: &mlua::Lua) -> mlua::Result<VmAddrs> {
    unreachable!("alarms are not supported here")
}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(super) fn begin(_vm: &VmAddrs) {}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(super) fn unbind(_vm: &VmAddrs) {}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(super) fn rearm_running() {}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(super) fn disarm_main() {}

/// No coroutine switches to track: Luau's interrupt is per VM, and off Unix
/// nothing is armed on demand.
#[cfg(not(all(unix, not(feature = "luau"))))]
pub(super) fn tracked_resume_close(
    _lua: &mlua::Lua,
    _check: &mlua::Function,
) -> mlua::Result<(mlua::Function, Option<mlua::Function>)> {
    unreachable!("alarms are not supported here")
}

#[cfg(not(all(unix, not(feature = "luau"))))]
pub(super) fn tracked_wrap_with(
    _lua: &mlua::Lua,
    _check: &mlua::Function,
    _close: Option<&mlua::Function>,
    _stopping: &mlua::Function,
) -> mlua::Result<mlua::Function> {
    unreachable!("alarms are not supported here")
}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(super) fn disarm_running(_lua: &mlua::Lua) -> bool {
    false
}

#[cfg(feature = "lua55")]
pub(crate) use protected::cap_string_rep;
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) use protected::install_catchers;
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) use protected::is_message_handler;
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) use protected::print_over;

/// Lua 5.1, LuaJIT, Luau: no C `print` of ours (`sandbox/print.rs`
/// keeps one written in Lua).
#[cfg(not(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
)))]
pub(crate) fn print_over(
    _lua: &mlua::Lua,
    _original: &mlua::Function,
) -> mlua::Result<Option<mlua::Function>> {
    Ok(None)
}

/// The Lua thread running now on this OS thread: the one whose Rust
/// function (or hook) we are in, or the main state outside Lua code.
///
/// Not `Lua::current_thread()`: for a Lua thread mlua made to run
/// `Function::call_async`, that answers the thread `call_async` was called
/// from (mlua's "thread ownership"), so a hook would be set, or taken away,
/// on a thread that is not running while the one running loops on.
pub(crate) fn running_state(lua: &mlua::Lua) -> *mut mlua::ffi::lua_State {
    let mut state = std::ptr::null_mut();
    // SAFETY: `exec_raw` runs the closure as a C function called
    // (protected) on the Lua thread `lua` runs now, passing it that thread;
    // the closure only copies the pointer, and the stack is left as found.
    let found = unsafe { lua.exec_raw::<()>((), |s| state = s) };
    if found.is_ok() && !state.is_null() {
        state
    } else {
        // Only if Lua had no stack slot left for the call: the owner mlua
        // reports is the running thread but for `call_async`'s.
        lua.current_thread().to_pointer() as *mut mlua::ffi::lua_State
    }
}

/// A VM opening `libs` in mlua's unsafe mode (`debug`, `ffi`, C modules),
/// for the host's `unsafe_std_libs`. Here only because this is the crate's
/// one module allowed `unsafe`; it has nothing to do with alarms.
pub(crate) fn new_lua_with_unsafe_libs(libs: mlua::StdLib, options: mlua::LuaOptions) -> mlua::Lua {
    // SAFETY: `Lua::unsafe_new_with` is unsafe because the libraries it may
    // open (`debug`, `ffi`) and the C modules it lets `require` load can
    // break mlua's invariants from Lua code. The host asked for exactly
    // that with `unsafe_std_libs`, whose documentation says so; nothing in
    // this crate relies on those libraries being absent.
    unsafe { mlua::Lua::unsafe_new_with(libs, options) }
}

/// True if `thread` is suspended inside mlua's wrapper of an async Rust
/// function (waiting for its future), rather than in a plain
/// `coroutine.yield` of Lua code: only then may it be resumed with mlua's
/// "drop the future" signal (`vm/coroutine.rs`).
#[cfg(feature = "async")]
pub(crate) fn yielded_in_async_wrapper(thread: &mlua::Thread) -> bool {
    if thread.status() != mlua::thread::ThreadStatus::Resumable {
        return false;
    }
    // SAFETY: the suspended coroutine `thread` references, alive while we
    // hold it, used on its VM's thread. Level 1 is the Lua function that
    // called `coroutine.yield` (level 0).
    unsafe { is_async_wrapper(thread.to_pointer() as *mut mlua::ffi::lua_State, 1) }
}

/// True if the Lua function running now (from a hook, or Luau's
/// interrupt) is mlua's wrapper of an async Rust function.
#[cfg(all(feature = "async", not(any(feature = "lua54", feature = "lua55"))))]
pub(crate) fn running_in_async_wrapper(lua: &mlua::Lua) -> bool {
    // SAFETY: the Lua thread running on this OS thread, which is in a hook
    // or interrupt of ours: level 0 is the function running there.
    unsafe { is_async_wrapper(running_state(lua), 0) }
}

/// Instructions (ticks, where a hook ticks on each) of mlua's async wrapper
/// a stop lets run (it needs a few per future it drops). The wrapper is
/// known by its chunk name, which any chunk can take (`load(src,
/// "=__mlua_async_poll")`): without a bound, a loop in such a chunk would
/// never be stopped (cancel, time limits, `max_instructions`).
#[cfg(any(feature = "async", feature = "lua54", feature = "lua55"))]
pub(crate) const WRAPPER_BUDGET: u32 = 100_000;

/// True if the function at `level` of `state`'s stack is mlua's wrapper of
/// an async Rust function, by its chunk name, as mlua itself recognises it.
///
/// # Safety
/// `state` is a live Lua thread of the VM on this OS thread, running (in a
/// hook or callback of ours) or suspended.
#[cfg(feature = "async")]
unsafe fn is_async_wrapper(state: *mut mlua::ffi::lua_State, level: std::ffi::c_int) -> bool {
    // SAFETY: `lua_getstack` and `lua_getinfo` only read the thread's call
    // info into `ar`, a zeroed plain C struct; `ar.source` points into the
    // function's prototype, which the thread's stack keeps alive while we
    // read it.
    unsafe {
        let mut ar: mlua::ffi::lua_Debug = std::mem::zeroed();
        #[cfg(not(feature = "luau"))]
        let found = mlua::ffi::lua_getstack(state, level, &mut ar) != 0
            && mlua::ffi::lua_getinfo(state, c"S".as_ptr(), &mut ar) != 0;
        #[cfg(feature = "luau")]
        let found = mlua::ffi::lua_getinfo(state, level, c"s".as_ptr(), &mut ar) != 0;
        found
            && !ar.source.is_null()
            && std::ffi::CStr::from_ptr(ar.source) == c"=__mlua_async_poll"
    }
}

/// A message handler like mlua's (`error_traceback`) for the `xpcall` a
/// request's coroutine runs under (`vm/coroutine.rs`), so its errors read
/// as they do for a call on the main state: mlua's own (a Rust error, a
/// panic being carried: userdata) stay as they are; anything else becomes
/// its string (`__tostring` honoured) followed by a traceback.
#[cfg(all(feature = "async", not(feature = "lua51")))]
pub(crate) fn traceback_handler(lua: &mlua::Lua) -> mlua::Result<mlua::Function> {
    use mlua::ffi;
    unsafe extern "C-unwind" fn handler(state: *mut ffi::lua_State) -> std::ffi::c_int {
        // SAFETY: a message handler is called with the error object as its
        // one argument, on the thread that raised it. `lua_checkstack`
        // makes room for what we push; `luaL_tolstring` may call
        // `__tostring`, whose error unwinds only Lua's frames and this
        // one, which owns nothing; `luaL_traceback` reads the thread's
        // call info and pushes one string.
        unsafe {
            if ffi::lua_checkstack(state, 2) == 0 || ffi::lua_type(state, -1) == ffi::LUA_TUSERDATA
            {
                return 1;
            }
            let message = ffi::luaL_tolstring(state, -1, std::ptr::null_mut());
            if ffi::lua_checkstack(state, ffi::LUA_TRACEBACK_STACK) != 0 {
                ffi::luaL_traceback(state, state, message, 0);
                ffi::lua_remove(state, -2);
            }
            1
        }
    }
    // SAFETY: `handler` is a well-formed Lua C function (above).
    unsafe { lua.create_c_function(handler) }
}
