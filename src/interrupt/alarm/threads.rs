//! Lua 5.1–5.5, where the hook ticks on a count (an instruction budget,
//! `permanent_hook`, or no alarm): `coroutine.create` and `coroutine.wrap`
//! charge a new Lua thread's first countdown before it exists.
//!
//! Lua keeps the hook's countdown per Lua thread, and a new thread starts
//! a full one. A thread that ends before its first tick (a tree of short
//! coroutines, each running fewer instructions than the interval) ran
//! instructions no tick counted, and saw no stop: such a tree ran past its
//! budget and its time limit without end. So each new thread is charged the
//! interval when it is made (at most what its countdown can hide), and a
//! pending stop is raised there. (LuaJIT keeps one countdown per VM; Luau
//! has no budget, and its interrupt reaches every thread.)
//!
//! # Why this is sound
//!
//! [`new_thread`] is an ordinary Lua C function. It pushes one value (its
//! upvalue 1, the charge, which it calls with no arguments and no
//! results), within the `LUA_MINSTACK` slots Lua's API grants a C
//! function, then grows the stack by `LUA_MINSTACK` (`luaL_checkstack`)
//! before it hands its frame, with the caller's arguments untouched, to
//! Lua's own function (upvalue 2, checked to be a C function without
//! upvalues when installed): so its argument errors name and place
//! themselves as Lua's. Its frame owns nothing: when Lua raises through it
//! (the charge's interruption, an argument error), nothing is skipped.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

/// Upvalue 1: the charge; upvalue 2: Lua's function.
const CHARGE: c_int = 1;
const ORIGINAL: c_int = 2;

/// `coroutine.create` or `coroutine.wrap`: the charge, then Lua's own
/// function on this frame.
unsafe extern "C-unwind" fn new_thread(state: *mut lua_State) -> c_int {
    // SAFETY: as argued in the module docs: one push, popped by the call;
    // the original is a plain C function (checked by `install`).
    unsafe {
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(CHARGE));
        ffi::lua_call(state, 0, 0);
        let f = ffi::lua_tocfunction(state, ffi::lua_upvalueindex(ORIGINAL));
        ffi::luaL_checkstack(state, ffi::LUA_MINSTACK, std::ptr::null());
        match f {
            Some(f) => f(state),
            None => ffi::luaL_error(state, c"mlua-isle: not a C function".as_ptr()),
        }
    }
}

/// Replaces `coroutine.create` and `coroutine.wrap` (those present, and
/// Lua's own) with [`new_thread`] over them, calling `charge` first.
pub(crate) fn charge_new_threads(
    lua: &mlua::Lua,
    coroutine: &mlua::Table,
    charge: &mlua::Function,
) -> mlua::Result<()> {
    for name in ["create", "wrap"] {
        let Some(original) = coroutine.get::<Option<mlua::Function>>(name)? else {
            continue;
        };
        if !is_plain_c_function(lua, &original)? {
            continue;
        }
        // SAFETY: `exec_raw` pushes the two upvalues; the closure replaces
        // them as its one result, the function `new_thread` reads them as.
        let wrapped = unsafe {
            lua.exec_raw::<mlua::Function>((charge.clone(), original), |state| {
                ffi::lua_pushcclosure(state, new_thread, 2);
            })?
        };
        coroutine.set(name, wrapped)?;
    }
    Ok(())
}

/// Whether `f` is a C function without upvalues (which can run on a
/// frame of ours; `mod protected` runs Lua's functions so too).
pub(super) fn is_plain_c_function(lua: &mlua::Lua, f: &mlua::Function) -> mlua::Result<bool> {
    let mut plain = false;
    // SAFETY: reads the pushed function only; `lua_getupvalue` pushes
    // nothing when there is no upvalue 1, else we pop what it pushed.
    unsafe {
        lua.exec_raw::<()>(f, |state| {
            plain = ffi::lua_tocfunction(state, -1).is_some();
            if !ffi::lua_getupvalue(state, -1, 1).is_null() {
                ffi::lua_pop(state, 1);
                plain = false;
            }
        })?;
    }
    Ok(plain)
}
