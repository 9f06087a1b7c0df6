//! Lua 5.4 and 5.5: raising the interruption from a C hook of ours.
//!
//! mlua's hook trampoline (no longer used here: see [`tick_hook`]) raises a
//! hook's error after `lua_settop(L, 0)` (or 1) on the hook's
//! frame, which in a count hook is the running Lua function's frame: Lua
//! closes that function's to-be-closed variables right there, inside the
//! hook, where hooks are disabled (`allowhook` is 0). A `__close` handler
//! that loops would then never be stopped: cancel, time limits, budgets and
//! shutdown all hang. So the hook never raises through mlua: it installs
//! [`raise_hook`] on the running Lua thread instead, and returns. On the next
//! instruction `raise_hook` raises with `lua_error` straight away, as
//! `lua.c` stops a script; Lua's protected call that catches it restores
//! `allowhook` before it closes the variables, so their handlers run with
//! `raise_hook` still set, and are interrupted in turn.
//!
//! `raise_hook` raises while the VM thread is stopping a request
//! ([`raise_from_next_instruction`] until [`end_raising`]); a thread that
//! still has it afterwards (a coroutine that survived the stop, resumed
//! later) gets the VM's hook ([`tick_hook`]) back, ticking at the count it had.

use std::cell::Cell;
use std::ffi::c_int;

use mlua::ffi::{self, lua_Debug, lua_State};

use super::WRAPPER_BUDGET;

thread_local! {
    /// True while this VM thread's request must stop.
    static STOPPING: Cell<bool> = const { Cell::new(false) };
    /// How many more instructions of mlua's async wrapper may run while
    /// stopping (see [`WRAPPER_BUDGET`]).
    static WRAPPER_LEFT: Cell<u32> = const { Cell::new(0) };
    /// The VM's hook function (as an address) and the count to give a
    /// thread whose `raise_hook` finds nothing to stop.
    static RESTORE: Cell<(usize, c_int)> = const { Cell::new((0, 0)) };
}

/// The message of the error `raise_hook` raises (the request resolves
/// with its stop reason, whatever the error says).
const MESSAGE: &std::ffi::CStr = c"mlua-isle: the request must stop";

/// From the VM's tick (or a Rust function called from Lua), on the VM
/// thread: the Lua thread running now raises on its next instruction,
/// and on every one after, until [`end_raising`]. `count` is the count
/// the hook ticks at on this VM.
pub(crate) fn raise_from_next_instruction(lua: &mlua::Lua, count: u32) {
    let state = super::running_state(lua);
    // Once per stop: a call while stopping (from a Rust function the
    // stopped code called) must not renew the wrapper's budget.
    if !STOPPING.replace(true) {
        WRAPPER_LEFT.set(WRAPPER_BUDGET);
    }
    // SAFETY: `state` is the Lua thread running on this OS thread (we
    // are called from its hook or from a function it called), alive
    // while it runs; `lua_gethook` and `lua_sethook` only read and
    // store its hook fields.
    unsafe {
        if let Some(hook) = ffi::lua_gethook(state) {
            if hook as usize != raise_hook as *const () as usize {
                let count = c_int::try_from(count).unwrap_or(c_int::MAX);
                RESTORE.set((hook as usize, count));
            }
        }
        ffi::lua_sethook(state, Some(raise_hook), ffi::LUA_MASKCOUNT, 1);
    }
}

/// Whether this VM thread is stopping a request: every interruption this
/// module raises is raised while it is (from [`raise_from_next_instruction`]
/// to [`end_raising`]).
pub(super) fn stopping() -> bool {
    STOPPING.get()
}

/// After a request: `raise_hook` raises no more on this thread.
pub(crate) fn end_raising() {
    STOPPING.set(false);
}

/// The registry key (its address) of the VM's tick function.
static TICK_KEY: u8 = 0;

fn tick_key() -> *const std::ffi::c_void {
    std::ptr::addr_of!(TICK_KEY).cast()
}

/// Makes `tick` the function [`tick_hook`] calls on `lua`'s VM.
pub(crate) fn set_tick(lua: &mlua::Lua, tick: &mlua::Function) -> mlua::Result<()> {
    // SAFETY: `exec_raw` pushes `tick` and runs the closure protected;
    // `lua_rawsetp` pops it into the registry, leaving the stack as it
    // was.
    unsafe {
        lua.exec_raw::<()>(tick, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, tick_key());
        })
    }
}

/// Sets [`tick_hook`] on the Lua thread running now (the main state,
/// outside requests), ticking every `every` instructions.
pub(crate) fn tick_every(lua: &mlua::Lua, every: u32) {
    let state = super::running_state(lua);
    let every = c_int::try_from(every).unwrap_or(c_int::MAX).max(1);
    // SAFETY: `state` is a live thread of `lua`, used on its own OS
    // thread; `lua_sethook` only stores its hook fields.
    unsafe { ffi::lua_sethook(state, Some(tick_hook), ffi::LUA_MASKCOUNT, every) };
}

/// The VM's count hook on Lua 5.4 and 5.5: calls the VM's tick function
/// (a Rust function, through mlua), if one is set yet.
///
/// Not mlua's hook trampoline: it runs the callback on the hook's frame,
/// which in a count hook is the running Lua function's, and when mlua's
/// pool of preallocated error values is empty (after a Rust callback
/// raised an error) it makes one and moves it to the bottom of that
/// frame with `lua_insert(L, 1)`. That moves the function's
/// to-be-closed variables: Lua 5.5 checks and aborts ("moving a
/// to-be-closed slot"), 5.4 does not check and closes the wrong value
/// later. Called through `lua_call`, the tick gets a C frame of its own,
/// whose bottom holds nothing but what mlua put there.
unsafe extern "C-unwind" fn tick_hook(state: *mut lua_State, _ar: *mut lua_Debug) {
    // SAFETY: a hook may push values (Lua keeps LUA_MINSTACK free slots
    // for it) and call functions; the registry lookup by a light
    // userdata key allocates nothing. The tick raises only Lua errors
    // (mlua catches Rust panics in its callback), which unwind Lua's C
    // frames to the nearest protected call, as an error of mlua's hook
    // would.
    unsafe {
        if ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, tick_key()) == ffi::LUA_TFUNCTION {
            ffi::lua_call(state, 0, 0);
        } else {
            ffi::lua_pop(state, 1);
        }
    }
}

/// Raises the interruption, or gives the thread the VM's hook back when
/// nothing is stopping (see the module docs).
unsafe extern "C-unwind" fn raise_hook(state: *mut lua_State, _ar: *mut lua_Debug) {
    if STOPPING.get() {
        // SAFETY: `state` is the running thread, in its hook.
        if WRAPPER_LEFT.get() > 0 && unsafe { in_async_wrapper(state) } {
            // mlua's wrapper of an async Rust function runs: resumed
            // to drop its future, it must get to do so. It runs a few
            // instructions, then a Rust call (the drop) or a yield; the
            // hook stays, and raises in the first other function, or
            // here once the budget is spent (a chunk that took its name).
            WRAPPER_LEFT.set(WRAPPER_LEFT.get() - 1);
            return;
        }
        // SAFETY: a hook may push a value (Lua keeps LUA_MINSTACK free
        // slots for it) and raise an error, which unwinds only Lua's
        // own C frames (`luaD_hook`, the interpreter) to the nearest
        // protected call: no Rust frame is skipped.
        unsafe {
            ffi::lua_pushstring(state, MESSAGE.as_ptr());
            ffi::lua_error(state);
        }
    }
    let (hook, count) = RESTORE.get();
    // SAFETY: `hook` is 0 or the address of the VM's `lua_Hook` (stored
    // above from `lua_gethook`; function pointers and `usize` have the
    // same size); `state` is the running thread.
    unsafe {
        if hook == 0 {
            ffi::lua_sethook(state, None, 0, 0);
        } else {
            let hook: ffi::lua_Hook = std::mem::transmute(hook);
            ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, count.max(1));
        }
    }
}

/// True if the Lua function running on `state` is mlua's wrapper of an
/// async Rust function (the `async` feature), by its chunk name, as mlua
/// itself recognises it.
///
/// # Safety
/// `state` is the running Lua thread, called from its hook.
unsafe fn in_async_wrapper(state: *mut lua_State) -> bool {
    #[cfg(feature = "async")]
    // SAFETY: in a hook, level 0 is the running function; `lua_getstack`
    // and `lua_getinfo` only read its call info into `ar`, a zeroed plain
    // C struct, and `ar.source` points into its prototype, alive while it
    // runs.
    unsafe {
        let mut ar: lua_Debug = std::mem::zeroed();
        ffi::lua_getstack(state, 0, &mut ar) != 0
            && ffi::lua_getinfo(state, c"S".as_ptr(), &mut ar) != 0
            && !ar.source.is_null()
            && std::ffi::CStr::from_ptr(ar.source) == c"=__mlua_async_poll"
    }
    #[cfg(not(feature = "async"))]
    {
        let _ = state;
        false
    }
}
