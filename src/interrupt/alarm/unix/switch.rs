//! Tracking which Lua thread runs: the coroutine switches of ours, and
//! binding a VM to its thread.

use std::ffi::c_int;
use std::sync::atomic::{compiler_fence, Ordering};

use mlua::ffi::{self, lua_State};

use super::*;

/// Before a request of `vm` runs: records its main state as running
/// (and it as the VM of this thread: a pool may have replaced it).
pub(crate) fn begin(vm: &VmAddrs) {
    forget_resumed();
    // ORDERING: Relaxed: only this thread (and its signal handler, which
    // runs on it) reads these; `switch_to`'s compiler fence orders them
    // before the state is recorded as running.
    SLOT.with(|s| {
        s.hook.store(vm.hook, Ordering::Relaxed);
        s.main.store(vm.main as *mut lua_State, Ordering::Relaxed);
    });
    // SAFETY: the main state is alive as long as its VM, which outlives
    // its requests; `unbind` forgets it before the VM is dropped.
    unsafe { switch_to(vm.main as *mut lua_State) };
}

/// Lua's `coroutine.resume` at its address.
fn original_resume() -> ffi::lua_CFunction {
    // SAFETY: set by `bind` (to a `lua_CFunction`) before any tracked
    // function is reachable from Lua.
    unsafe { std::mem::transmute(ORIGINAL_RESUME.load(Ordering::SeqCst)) }
}

/// Calls Lua's `coroutine.resume` on the frame Lua gave us (argument 1
/// is `co`, a coroutine other than `state`), recording the switch to
/// `co` and back. Returns the number of results on top of the stack:
/// `true, values...` or `false, error`.
///
/// # Safety
/// `state` is the running Lua thread and `co` its argument 1.
unsafe fn resume_on(state: *mut lua_State, co: *mut lua_State) -> c_int {
    // SAFETY: `co` is referenced from our stack (argument 1), so it is
    // alive until we return. With a coroutine argument, Lua's resume
    // does not raise (it returns its errors), so the second switch
    // always runs.
    unsafe {
        switch_to(co);
        let results = original_resume()(state);
        switch_back(state);
        results
    }
}

/// Records that `state` runs again, after a coroutine it resumed (or
/// closed) returned: first forgets the threads resumed from Rust while
/// that coroutine ran, which have all stopped running (see [`prune`]).
///
/// # Safety
/// As for [`switch_to`].
unsafe fn switch_back(state: *mut lua_State) {
    prune();
    // SAFETY: the caller guarantees `state`.
    unsafe { switch_to(state) };
}

/// When the `n` results on top start with `false`, hands the error
/// (on top) to the interruption check, upvalue `check` (it raises a
/// pending interruption, or a Rust panic, again).
///
/// # Safety
/// Called from a C function of ours whose upvalue `check` is the check.
unsafe fn check_failure(state: *mut lua_State, n: c_int, check: c_int) {
    // SAFETY: the `n` results are on the stack; `check` is a function;
    // Lua's API keeps LUA_MINSTACK free slots for the two pushes.
    unsafe {
        if ffi::lua_toboolean(state, -n) == 0 {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(check));
            ffi::lua_pushvalue(state, -2);
            ffi::lua_call(state, 1, 0);
        }
    }
}

/// `coroutine.resume`, recording the switch to the coroutine and back;
/// upvalue 1: the interruption check.
unsafe extern "C-unwind" fn tracked_resume(state: *mut lua_State) -> c_int {
    // SAFETY: `state` is the calling Lua thread, alive during this call.
    let co = unsafe { ffi::lua_tothread(state, 1) };
    if co.is_null() || co == state {
        // Not a coroutine (Lua's function raises the usual argument
        // error), or resuming itself (it returns an error): nothing
        // switches.
        // SAFETY: calling a C function on the frame Lua gave us.
        return unsafe { original_resume()(state) };
    }
    // SAFETY: `co` is argument 1; upvalue 1 is the check.
    unsafe {
        let n = resume_on(state, co);
        check_failure(state, n, 1);
        n
    }
}

/// `coroutine.close` (Lua 5.4 on): runs pending `__close` handlers on
/// the coroutine, so the switch is recorded when there can be some;
/// upvalue 1: the interruption check.
#[cfg(any(feature = "lua54", feature = "lua55"))]
unsafe extern "C-unwind" fn tracked_close(state: *mut lua_State) -> c_int {
    // SAFETY: set by `bind` before this function is reachable from Lua.
    let original: ffi::lua_CFunction =
        unsafe { std::mem::transmute(ORIGINAL_CLOSE.load(Ordering::SeqCst)) };
    // SAFETY: as in `tracked_resume`.
    let co = unsafe { ffi::lua_tothread(state, 1) };
    // Only a suspended coroutine, or one that died by an error, has
    // handlers to run; Lua's function raises for the others (running,
    // normal), which must not be recorded as switched to.
    // SAFETY: `co` is live (argument 1).
    if co.is_null() || co == state || unsafe { ffi::lua_status(co) } == ffi::LUA_OK {
        // SAFETY: calling a C function on the frame Lua gave us.
        return unsafe { original(state) };
    }
    // A coroutine killed by the interruption keeps hooks disabled:
    // while the request stops, its handlers must not run (see
    // `hook::guard_close`). The check raises the interruption.
    let stopping = SLOT.with(|s| {
        let alarm = s.armed.load(Ordering::SeqCst);
        // SAFETY: as in `on_signal`.
        !alarm.is_null() && unsafe { &*alarm }.armed.load(Ordering::SeqCst)
    });
    if stopping {
        // SAFETY: upvalue 1 is the check, a function taking the error
        // value (none here); Lua keeps LUA_MINSTACK slots for the push.
        unsafe {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
            ffi::lua_call(state, 0, 0);
        }
    }
    // SAFETY: as in `resume_on`: closing a suspended or dead coroutine
    // returns its errors; upvalue 1 is the check.
    unsafe {
        switch_to(co);
        let n = original(state);
        switch_back(state);
        check_failure(state, n, 1);
        n
    }
}

/// `coroutine.wrap`: creates the coroutine (as `coroutine.create` does)
/// and returns [`wrapped`] over it; upvalue 1: [`raise_wrap_error`].
unsafe extern "C-unwind" fn tracked_wrap(state: *mut lua_State) -> c_int {
    // SAFETY: `state` is the calling Lua thread. The argument check
    // raises Lua's usual error; `lua_newthread` raises only on memory
    // errors; nothing of ours needs unwinding.
    unsafe {
        ffi::luaL_checktype(state, 1, ffi::LUA_TFUNCTION);
        let co = ffi::lua_newthread(state);
        ffi::lua_pushvalue(state, 1);
        ffi::lua_xmove(state, co, 1);
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_pushcclosure(state, wrapped, 2);
    }
    1
}

/// The function `coroutine.wrap` returns; upvalues: the coroutine, and
/// [`raise_wrap_error`].
unsafe extern "C-unwind" fn wrapped(state: *mut lua_State) -> c_int {
    // SAFETY: upvalue 1 is the coroutine, which the closure keeps alive;
    // inserting it as argument 1 makes the frame a `resume` call.
    unsafe {
        let co = ffi::lua_tothread(state, ffi::lua_upvalueindex(1));
        // Lua 5.2/5.3's wrap calls a coroutine with an empty stack dead
        // before resuming it: answered here, as the inserted argument
        // would hide the empty stack (a coroutine calling itself).
        #[cfg(any(feature = "lua52", feature = "lua53"))]
        if co == state && ffi::lua_gettop(state) == 0 {
            ffi::lua_pushboolean(state, 0);
            ffi::lua_pushstring(state, c"cannot resume dead coroutine".as_ptr());
            return raise_wrapped(state, 2);
        }
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_insert(state, 1);
        if co == state {
            // Lua's resume answers "cannot resume non-suspended
            // coroutine" without switching.
            let n = original_resume()(state);
            return raise_wrapped(state, n);
        }
        let n = resume_on(state, co);
        if ffi::lua_toboolean(state, -n) != 0 {
            return n - 1; // the values after `true`
        }
        raise_wrapped(state, n)
    }
}

/// Raises a wrapped coroutine's error (on top) through upvalue 2.
///
/// # Safety
/// Called from [`wrapped`] with `n` results of a failed resume on top.
unsafe fn raise_wrapped(state: *mut lua_State, n: c_int) -> c_int {
    // SAFETY: upvalue 2 is `raise_wrap_error`, which takes (coroutine,
    // error) and raises; `lua_error` after it only in case it returned.
    unsafe {
        if ffi::lua_toboolean(state, -n) != 0 {
            return n - 1;
        }
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(2));
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_pushvalue(state, -3);
        ffi::lua_call(state, 2, 0);
        ffi::lua_error(state)
    }
}

/// Raises a wrapped coroutine's error as Lua's `coroutine.wrap` does
/// (from 5.4 on, a coroutine that died by it is closed first, and its
/// `__close` handlers may replace the error; a string gets the position of
/// the wrapped function's caller; Lua's memory error is raised as is,
/// which keeps it a memory error), after handing it to the interruption
/// check. Called by [`raise_wrapped`] with (coroutine, error). Upvalues:
/// the check, the tracked `coroutine.close` (nil before 5.4), the function
/// telling whether the request is stopping, and Lua's memory error
/// message.
///
/// A C function rather than Lua code, so that a VM's start has no chunk to
/// load for it (a closure, six upvalues and a prototype with its debug
/// information: ~0.9 KiB of every VM's heap).
unsafe extern "C-unwind" fn raise_wrap_error(state: *mut lua_State) -> c_int {
    // SAFETY: called by `raise_wrapped` with the coroutine (argument 1,
    // kept alive by the calling closure) and the error; the upvalues are
    // as set by `tracked_wrap_with`. The calls may raise (the check raises
    // the interruption): this frame owns nothing. Six stack slots at most,
    // of the `LUA_MINSTACK` a C function gets.
    unsafe {
        let co = ffi::lua_tothread(state, 1);
        // A coroutine killed by the interruption is not closed (see
        // `guard_close` in `interrupt/catchers.rs`).
        if ffi::lua_isnil(state, ffi::lua_upvalueindex(2)) == 0 && is_dead(state, co) {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(3));
            ffi::lua_call(state, 0, 1);
            let stopping = ffi::lua_toboolean(state, -1) != 0;
            ffi::lua_settop(state, 2);
            if !stopping {
                ffi::lua_pushvalue(state, ffi::lua_upvalueindex(2));
                ffi::lua_pushvalue(state, 1);
                ffi::lua_call(state, 1, 2);
                if ffi::lua_toboolean(state, -2) == 0 {
                    ffi::lua_copy(state, -1, 2); // the error `__close` left
                }
                ffi::lua_settop(state, 2);
            }
        }
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_pushvalue(state, 2);
        ffi::lua_call(state, 1, 0);
        ffi::lua_settop(state, 2);
        // A string gets the position of the wrapped function's caller:
        // level 0 is this function, 1 the function `coroutine.wrap`
        // returned (a C function: no position), 2 its caller.
        if ffi::lua_rawequal(state, 2, ffi::lua_upvalueindex(4)) == 0
            && ffi::lua_type(state, 2) == ffi::LUA_TSTRING
        {
            ffi::luaL_where(state, 2);
            ffi::lua_pushvalue(state, 2);
            ffi::lua_concat(state, 2);
        }
        ffi::lua_error(state)
    }
}

/// `coroutine.status(co) == "dead"`, seen from `state` (Lua's `auxstatus`).
///
/// # Safety
/// `co` is null or a live Lua thread of `state`'s VM.
unsafe fn is_dead(state: *mut lua_State, co: *mut lua_State) -> bool {
    if co.is_null() || co == state {
        return false; // running
    }
    // SAFETY: `co` is live (above); `lua_getstack` only reads its call
    // info into `ar`, a zeroed plain C struct.
    unsafe {
        match ffi::lua_status(co) {
            ffi::LUA_YIELD => false,
            ffi::LUA_OK => {
                let mut ar: ffi::lua_Debug = std::mem::zeroed();
                ffi::lua_getstack(co, 0, &mut ar) == 0 && ffi::lua_gettop(co) == 0
            }
            _ => true,
        }
    }
}

/// Prepares `lua` (on its own thread) for arming on demand: records its
/// main state and hook function (mlua's global hook must be set
/// already) and removes the hook from the main state.
pub(crate) fn bind(lua: &mlua::Lua) -> mlua::Result<VmAddrs> {
    let main = lua.current_thread().to_pointer() as *mut lua_State;
    // Without the coroutine library (`std_libs`) Lua code switches no
    // threads: nothing to track, no originals to record.
    let coroutine: Option<mlua::Table> = lua.globals().get("coroutine")?;
    let original = |f: &mlua::Function| -> Option<ffi::lua_CFunction> {
        let mut c = None;
        // SAFETY: reads the pushed function only; `exec_raw` leaves the
        // stack as it found it.
        let _ = unsafe {
            lua.exec_raw::<()>(f, |state| {
                c = ffi::lua_tocfunction(state, -1);
            })
        };
        c
    };
    // SAFETY: `main` is the live main state of `lua`, used on its own
    // thread.
    let hook = unsafe { ffi::lua_gethook(main) };
    let unsupported = || {
        mlua::Error::runtime(
            "mlua-isle: cannot arm hooks on demand (no hook, or coroutine functions are not Lua's)",
        )
    };
    let hook = hook.ok_or_else(unsupported)?;
    if let Some(coroutine) = coroutine {
        let resume: mlua::Function = coroutine.get("resume")?;
        let original_resume = original(&resume).ok_or_else(unsupported)?;
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            let close: mlua::Function = coroutine.get("close")?;
            let original_close = original(&close).ok_or_else(unsupported)?;
            // ORDERING: SeqCst, as before: written once with the same value
            // by every VM, read by the tracked functions of this VM.
            ORIGINAL_CLOSE.store(original_close as usize, Ordering::SeqCst);
        }
        // ORDERING: as for ORIGINAL_CLOSE.
        ORIGINAL_RESUME.store(original_resume as usize, Ordering::SeqCst);
    }
    lua.remove_hook();
    Ok(VmAddrs {
        main: main as usize,
        hook: hook as usize,
    })
}

/// Our C function `f` closed over one upvalue.
fn closure(
    lua: &mlua::Lua,
    f: ffi::lua_CFunction,
    upvalue: &mlua::Function,
) -> mlua::Result<mlua::Function> {
    // SAFETY: `f` is one of this module's functions, which uphold Lua's
    // C function contract with one upvalue, a function; `exec_raw`
    // pushes it, and the closure replaces it as the one result.
    unsafe {
        lua.exec_raw::<mlua::Function>(upvalue, |state| {
            ffi::lua_pushcclosure(state, f, 1);
        })
    }
}

/// The tracked `coroutine.resume` and `coroutine.close` (see the module
/// docs; `close` only where Lua has it, 5.4 on), given the interruption
/// check, called with the error value of a failed resume or close.
pub(crate) fn tracked_resume_close(
    lua: &mlua::Lua,
    check: &mlua::Function,
) -> mlua::Result<(mlua::Function, Option<mlua::Function>)> {
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    let close = Some(closure(lua, tracked_close, check)?);
    #[cfg(not(any(feature = "lua54", feature = "lua55")))]
    let close = None;
    Ok((closure(lua, tracked_resume, check)?, close))
}

/// The tracked `coroutine.wrap`, given the interruption check, the
/// tracked `coroutine.close` (5.4 on) and the function telling whether the
/// request is stopping, for [`raise_wrap_error`].
pub(crate) fn tracked_wrap_with(
    lua: &mlua::Lua,
    check: &mlua::Function,
    close: Option<&mlua::Function>,
    stopping: &mlua::Function,
) -> mlua::Result<mlua::Function> {
    let upvalues = (check, close, stopping, crate::sandbox::room::MEMORY_ERROR);
    // SAFETY: `raise_wrap_error` and `tracked_wrap` uphold Lua's C
    // function contract with these upvalues (four, then the first closure);
    // `exec_raw` pushes the four, and the outer closure replaces them as
    // the one result.
    unsafe {
        lua.exec_raw::<mlua::Function>(upvalues, |state| {
            ffi::lua_pushcclosure(state, raise_wrap_error, 4);
            ffi::lua_pushcclosure(state, tracked_wrap, 1);
        })
    }
}

/// From the hook, with nothing to stop: removes the hook from the Lua
/// thread running now, if this module armed it (it is recorded as running,
/// or listed as resumed from Rust or resumed from). Returns whether it did.
pub(crate) fn disarm_running(lua: &mlua::Lua) -> bool {
    let current = crate::interrupt::alarm::running_state(lua);
    // ORDERING: SeqCst, as every access to the slot (this thread's, and
    // its signal handler's).
    let tracked = SLOT.with(|s| {
        if s.running.load(Ordering::SeqCst) == current {
            return true;
        }
        let Some(r) = s.resumed() else {
            return false;
        };
        let listed = r.len.load(Ordering::SeqCst).min(RESUMED);
        (0..listed).any(|i| {
            r.threads[i].load(Ordering::SeqCst) == current
                || r.backs[i].load(Ordering::SeqCst) == current
        })
    });
    if tracked {
        // SAFETY: `current` is the Lua thread running this hook, alive
        // while it runs; `lua_sethook` only stores its hook fields.
        unsafe { ffi::lua_sethook(current, None, 0, 0) };
    }
    tracked
}

thread_local! {
    /// The Lua threads listed in the slot's `resumed`, in the same order:
    /// holding them keeps their states alive while the signal handler may
    /// arm them.
    static HELD: std::cell::RefCell<Vec<mlua::Thread>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A Lua thread about to be resumed from Rust (mlua's `Thread::resume`,
/// `Thread::into_async`, `Function::call_async`; mlua's resume event): the
/// tracked switches never see it, so it is recorded here as running, and
/// listed, with the state it is resumed from, until it is known to have
/// stopped running. mlua tells nothing when such a resume returns, so a
/// listed thread is forgotten later ([`prune`]); until then a signal arms
/// the states it was resumed from too, one of which runs again if it has
/// returned. Like any tracked coroutine, it runs with no hook until a stop
/// arms it.
///
/// `count` is the VM's `hook_interval`. Errors if `RESUMED` of them would
/// be running nested at once.
pub(crate) fn resumed_from_rust(thread: mlua::Thread, count: u32) -> mlua::Result<()> {
    let state = thread.to_pointer() as *mut lua_State;
    #[cfg(feature = "async")]
    if DRIVEN.get() == state {
        return Ok(()); // a request's own coroutine: its switch is tracked
    }
    if state.is_null() {
        return Ok(());
    }
    set_every(count);
    prune();
    let listed = SLOT.with(|s| {
        // It runs with no hook, like any tracked thread: the VM's hook,
        // which it got when let go ([`tick_if_left_open`]), goes
        // (`switch_to` arms it again if the request must stop). A hook of
        // the host's (`Thread::set_hook`) stays.
        let hook = s.hook.load(Ordering::SeqCst);
        // SAFETY: `state` is alive (`thread` holds it) and about to be
        // resumed, not running; `lua_gethook` and `lua_sethook` read and
        // store its hook fields.
        unsafe {
            if ffi::lua_gethook(state).is_some_and(|h| h as usize == hook) {
                ffi::lua_sethook(state, None, 0, 0);
            }
        }
        // ORDERING: SeqCst, as every field the signal handler reads: it
        // runs on this thread, and must see an entry written before the
        // length that covers it.
        let Some(r) = s.resumed_or_new() else {
            return false;
        };
        let len = r.len.load(Ordering::SeqCst);
        if len >= RESUMED {
            return false;
        }
        HELD.with(|held| held.borrow_mut().push(thread));
        r.threads[len].store(state, Ordering::SeqCst);
        r.backs[len].store(s.running.load(Ordering::SeqCst), Ordering::SeqCst);
        r.len.store(len + 1, Ordering::SeqCst);
        true
    });
    if !listed {
        return Err(mlua::Error::runtime(format!(
            "mlua-isle: more than {RESUMED} Lua threads resumed from Rust \
             (`Thread::resume`, `call_async`) run nested at once; \
             nest fewer of them"
        )));
    }
    // SAFETY: `state` is listed, so held alive until it is forgotten,
    // which first records another state as running (see `prune`).
    unsafe { switch_to(state) };
    Ok(())
}

/// A Lua thread resumed from Rust has yielded back to it (mlua's yield
/// event): it is forgotten now ([`prune`]), and keeps a ticking hook
/// ([`tick_if_left_open`]). `count` is the VM's `hook_interval`.
pub(crate) fn yielded_to_rust(thread: &mlua::Thread, count: u32) {
    let state = thread.to_pointer() as *mut lua_State;
    #[cfg(feature = "async")]
    if DRIVEN.get() == state {
        return; // a request's own coroutine: closed by `vm/coroutine.rs`
    }
    let _ = state;
    set_every(count);
    prune();
}

fn set_every(count: u32) {
    EVERY.set(c_int::try_from(count).unwrap_or(c_int::MAX).max(1));
}

thread_local! {
    /// The count [`tick_if_left_open`] gives: the VM's `hook_interval`.
    static EVERY: std::cell::Cell<c_int> = const { std::cell::Cell::new(1000) };
}

/// A listed thread let go while suspended, or dead of an error: mlua may
/// still run Lua code on it with no resume event (dropping a pending
/// `call_async` future resumes its thread to drop the inner future, then
/// closes it; closing runs the `__close` handlers left open, Lua 5.4 on).
/// It gets the VM's hook, ticking every `hook_interval` instructions, so
/// that a stop reaches that code; resumed with an event, it runs hook-free
/// again ([`resumed_from_rust`]).
///
/// # Safety
/// `state` is a live Lua thread of this thread's VM, not running.
unsafe fn tick_if_left_open(state: *mut lua_State, hook: usize) {
    if hook == 0 {
        return;
    }
    // SAFETY: the caller guarantees `state`; `lua_status` reads it;
    // `hook` is a `lua_Hook` address (see `bind`); `lua_sethook` only
    // stores its hook fields.
    unsafe {
        if ffi::lua_status(state) == ffi::LUA_OK || ffi::lua_gethook(state).is_some() {
            // Finished (nothing left open) or never started; or it has a
            // hook already (ours, or the host's: it stays).
            return;
        }
        let hook: ffi::lua_Hook = std::mem::transmute(hook);
        ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, EVERY.get());
    }
}

/// Whether the Lua thread `state` is running, or is resuming another
/// (Lua's "normal"): it has call frames and is not suspended nor dead.
///
/// # Safety
/// `state` is a live Lua thread of this thread's VM.
unsafe fn is_active(state: *mut lua_State) -> bool {
    // SAFETY: the caller guarantees `state`; `lua_status` reads its
    // status, `lua_getstack` only reads its call info into `ar`, a zeroed
    // plain C struct.
    unsafe {
        if ffi::lua_status(state) != ffi::LUA_OK {
            return false; // suspended, or dead of an error
        }
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        ffi::lua_getstack(state, 0, &mut ar) != 0
    }
}

/// Forgets the listed threads resumed from Rust that have stopped running,
/// innermost first, until one still runs. Threads resumed nest: one
/// resumed while another runs returns first, so those still running are
/// always the outer ones. A forgotten thread recorded as running gives way
/// to the state the outermost forgotten one was resumed from, which runs
/// again (or has stopped running itself, and is forgotten next time).
fn prune() {
    SLOT.with(|s| {
        let Some(r) = s.resumed() else {
            return;
        };
        let len = r.len.load(Ordering::SeqCst).min(RESUMED);
        if len == 0 {
            return;
        }
        let mut keep = len;
        // SAFETY: listed threads are alive (held).
        while keep > 0 && !unsafe { is_active(r.threads[keep - 1].load(Ordering::SeqCst)) } {
            keep -= 1;
        }
        if keep == len {
            return;
        }
        let running = s.running.load(Ordering::SeqCst);
        if (keep..len).any(|i| r.threads[i].load(Ordering::SeqCst) == running) {
            // ORDERING: SeqCst, as the handler's reads: recorded before the
            // entries stop being listed, and those before they are dropped.
            s.running
                .store(r.backs[keep].load(Ordering::SeqCst), Ordering::SeqCst);
        }
        r.len.store(keep, Ordering::SeqCst);
        compiler_fence(Ordering::SeqCst);
        let hook = s.hook.load(Ordering::SeqCst);
        for i in keep..len {
            // SAFETY: still held (dropped below), and not running.
            unsafe { tick_if_left_open(r.threads[i].load(Ordering::SeqCst), hook) };
        }
        HELD.with(|held| held.borrow_mut().truncate(keep));
    });
}

/// Forgets every listed thread resumed from Rust: no Lua code runs on
/// this thread now (between requests, before a request runs, before the
/// VM is dropped).
fn forget_resumed() {
    // ORDERING: as in `prune`. `HELD` holds exactly the listed threads,
    // so with none listed there is nothing to drop (the common case: a
    // request that resumed no Lua thread from Rust).
    let listed = SLOT.with(|s| {
        let Some(r) = s.resumed() else {
            return 0;
        };
        let len = r.len.load(Ordering::SeqCst).min(RESUMED);
        if len == 0 {
            return 0;
        }
        // A listed thread recorded as running gives way to the main
        // state (alive as long as the VM) before it is let go.
        let running = s.running.load(Ordering::SeqCst);
        if (0..len).any(|i| r.threads[i].load(Ordering::SeqCst) == running) {
            s.running
                .store(s.main.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        r.len.store(0, Ordering::SeqCst);
        compiler_fence(Ordering::SeqCst);
        let hook = s.hook.load(Ordering::SeqCst);
        for i in 0..len {
            // SAFETY: still held (dropped below); no Lua code runs now.
            unsafe { tick_if_left_open(r.threads[i].load(Ordering::SeqCst), hook) };
        }
        len
    });
    if listed == 0 {
        return;
    }
    compiler_fence(Ordering::SeqCst);
    // Taken out first: dropping a thread must not find `HELD` borrowed.
    let held = HELD.with(|held| std::mem::take(&mut *held.borrow_mut()));
    drop(held);
}

/// Arms the states that may be running again (from the hook, which has
/// just removed itself and found the alarm raised meanwhile).
pub(crate) fn rearm_running() {
    // SAFETY: as in the signal handler: every state the slot lists is
    // alive while listed.
    SLOT.with(|s| unsafe { arm_recorded(s) });
}

/// Forgets `vm` if it is the VM recorded on this thread; called before
/// it is dropped, so that neither the handler nor a switch can reach its
/// states any more.
pub(crate) fn unbind(vm: &VmAddrs) {
    let ours = SLOT.with(|s| {
        let ours = s.main.load(Ordering::SeqCst) as usize == vm.main;
        if ours {
            s.running.store(std::ptr::null_mut(), Ordering::SeqCst);
            s.main.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
        ours
    });
    if ours {
        forget_resumed();
    }
}

/// Removes the hook from the main state if it is set, between requests,
/// and forgets the threads resumed from Rust during the request.
pub(crate) fn disarm_main() {
    forget_resumed();
    SLOT.with(|s| {
        let main = s.main.load(Ordering::SeqCst);
        if main.is_null() {
            return;
        }
        // SAFETY: `main` is the live main state of this thread's VM
        // (bound, and unbound before the VM is dropped).
        unsafe {
            if ffi::lua_gethookmask(main) != 0 {
                ffi::lua_sethook(main, None, 0, 0);
            }
        }
    });
}

#[cfg(feature = "async")]
thread_local! {
    /// The request coroutine [`on_coroutine`] is resuming, if any.
    static DRIVEN: std::cell::Cell<*mut lua_State> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Runs `resume`, which resumes `thread`, a request's own coroutine (the
/// `async` feature: `vm/coroutine.rs` polls requests as coroutines),
/// recording the switch to it and back as the tracked functions do. mlua's
/// resume event then leaves the thread alone ([`resumed_from_rust`]):
/// a signal arms it like any tracked coroutine, and it runs hook-free.
#[cfg(feature = "async")]
pub(crate) fn on_coroutine<R>(thread: &mlua::Thread, resume: impl FnOnce() -> R) -> R {
    /// Switches back even if `resume` unwinds.
    struct Back {
        before: *mut lua_State,
        driven: *mut lua_State,
    }
    impl Drop for Back {
        fn drop(&mut self) {
            DRIVEN.set(self.driven);
            // The threads resumed from Rust while the coroutine ran have
            // stopped running, and may have been resumed from it.
            prune();
            if self.before.is_null() {
                SLOT.with(|s| s.running.store(std::ptr::null_mut(), Ordering::SeqCst));
            } else {
                // SAFETY: `before` was recorded as running when `resume`
                // started: the state that resumes `thread` (the main
                // state, or a coroutine being resumed itself), alive
                // until that resume returns, which is after this.
                unsafe { switch_to(self.before) };
            }
        }
    }
    let co = thread.to_pointer() as *mut lua_State;
    let _back = Back {
        before: SLOT.with(|s| s.running.load(Ordering::SeqCst)),
        driven: DRIVEN.replace(co),
    };
    // SAFETY: `thread` references `co`, so it is alive for this whole
    // call; it runs only inside `resume`, and `_back` records the switch
    // back when `resume` returns.
    unsafe { switch_to(co) };
    resume()
}
