//! `pcall` and `xpcall` (and the message handler `xpcall` runs).

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

use super::*;

/// After a protected call: on an error (on top), hands it to the check
/// (`xpcall`: with the one its handler saw, first) and returns `false,
/// error`; otherwise returns the results above `extra` values. Lua's
/// `finishpcall` (5.3–5.5), checked.
///
/// # Safety
/// A continuation of [`pcall`] or [`xpcall`] (their frame).
#[cfg(not(feature = "lua52"))]
unsafe extern "C-unwind" fn finish(
    state: *mut lua_State,
    status: c_int,
    extra: ffi::lua_KContext,
) -> c_int {
    // SAFETY: the frame is `pcall`'s or `xpcall`'s: after an error, the
    // stack holds `true` (xpcall: `f`, the handler, `true`) and the
    // error value, far below LUA_MINSTACK; at index 2 of `xpcall`'s is
    // our `handler` closure, whose upvalue SEEN exists.
    unsafe {
        if status != ffi::LUA_OK && status != ffi::LUA_YIELD {
            if extra == XPCALL as ffi::lua_KContext {
                ffi::lua_getupvalue(state, 2, SEEN);
                ffi::lua_pushvalue(state, -2);
                check(state, 2);
                ffi::lua_pop(state, 2);
            } else {
                check(state, 1);
            }
            ffi::lua_pushboolean(state, 0);
            ffi::lua_pushvalue(state, -2);
            return 2;
        }
        ffi::lua_gettop(state) - extra as c_int
    }
}

/// `pcall(f, ...)`; upvalue 1: the check. Lua's `luaB_pcall` (5.3–5.5).
#[cfg(not(feature = "lua52"))]
pub(super) unsafe extern "C-unwind" fn pcall(state: *mut lua_State) -> c_int {
    // SAFETY: `luaL_checkany` raises Lua's argument error; one push
    // (`true`), within LUA_MINSTACK; the protected call replaces `f`
    // and its arguments by the results or the error value.
    unsafe {
        ffi::luaL_checkany(state, 1);
        ffi::lua_pushboolean(state, 1);
        ffi::lua_insert(state, 1);
        let n = ffi::lua_gettop(state) - 2;
        let status = ffi::lua_pcallk(state, n, ffi::LUA_MULTRET, 0, 0, Some(finish));
        finish(state, status, 0)
    }
}

/// `xpcall(f, handler, ...)`; upvalues: the check, `stopping`. Lua's
/// `luaB_xpcall` (5.3–5.5), with the user's handler behind ours.
#[cfg(not(feature = "lua52"))]
pub(super) unsafe extern "C-unwind" fn xpcall(state: *mut lua_State) -> c_int {
    // SAFETY: `luaL_checktype` raises Lua's argument error. Three
    // pushes make our handler (replacing the user's at index 2), two
    // more `true` and `f`: within LUA_MINSTACK. After the rotation the
    // stack is `f, handler, true, f, args...`, as in Lua's.
    unsafe {
        let n = ffi::lua_gettop(state);
        ffi::luaL_checktype(state, 2, ffi::LUA_TFUNCTION);
        push_handler(state);
        ffi::lua_pushboolean(state, 1);
        ffi::lua_pushvalue(state, 1);
        ffi::lua_rotate(state, 3, 2);
        let status = ffi::lua_pcallk(
            state,
            n - 2,
            ffi::LUA_MULTRET,
            2,
            XPCALL as ffi::lua_KContext,
            Some(finish),
        );
        finish(state, status, XPCALL as ffi::lua_KContext)
    }
}

/// Lua 5.2's `finishpcall`, checked: the status replaces slot 1 (`nil`
/// for `pcall`, the handler for `xpcall`).
///
/// # Safety
/// On the frame of [`pcall`] or [`xpcall`], after their protected call.
#[cfg(feature = "lua52")]
unsafe fn finish(state: *mut lua_State, ok: bool, ctx: c_int) -> c_int {
    // SAFETY: as in 5.3's `finish`; 5.2's `xpcall` has our handler at
    // index 1. `lua_checkstack` grants the status's slot or says there
    // is none, as in Lua's own.
    unsafe {
        if !ok {
            if ctx == XPCALL {
                ffi::lua_getupvalue(state, 1, SEEN);
                ffi::lua_pushvalue(state, -2);
                check(state, 2);
                ffi::lua_pop(state, 2);
            } else {
                check(state, 1);
            }
        }
        if ffi::lua_checkstack(state, 1) == 0 {
            ffi::lua_settop(state, 0);
            ffi::lua_pushboolean(state, 0);
            ffi::lua_pushstring(state, c"stack overflow".as_ptr());
            return 2;
        }
        ffi::lua_pushboolean(state, c_int::from(ok));
        ffi::lua_replace(state, 1);
        ffi::lua_gettop(state)
    }
}

/// Lua 5.2's continuation of both: the status says yielded (fine) or
/// an error recovered from.
#[cfg(feature = "lua52")]
unsafe extern "C-unwind" fn resumed(state: *mut lua_State) -> c_int {
    let mut ctx = 0;
    // SAFETY: our continuation's frame.
    unsafe {
        let status = ffi::lua_getctx(state, &mut ctx);
        finish(state, status == ffi::LUA_YIELD, ctx)
    }
}

/// Lua 5.2's `pcall`.
#[cfg(feature = "lua52")]
pub(super) unsafe extern "C-unwind" fn pcall(state: *mut lua_State) -> c_int {
    // SAFETY: as in 5.3's; Lua 5.2's layout: a slot for the status,
    // then `f` and its arguments.
    unsafe {
        ffi::luaL_checkany(state, 1);
        ffi::lua_pushnil(state);
        ffi::lua_insert(state, 1);
        let n = ffi::lua_gettop(state) - 2;
        let status = ffi::lua_pcallk(state, n, ffi::LUA_MULTRET, 0, 0, Some(resumed));
        finish(state, status == ffi::LUA_OK, 0)
    }
}

/// Lua 5.2's `xpcall`: any handler value (5.2 checks only that there
/// is one).
#[cfg(feature = "lua52")]
pub(super) unsafe extern "C-unwind" fn xpcall(state: *mut lua_State) -> c_int {
    // SAFETY: as in 5.3's; Lua 5.2's layout: the handler (ours) at 1,
    // `f` at 2, its arguments.
    unsafe {
        let n = ffi::lua_gettop(state);
        if n < 2 {
            ffi::luaL_argerror(state, 2, c"value expected".as_ptr());
        }
        push_handler(state);
        ffi::lua_pushvalue(state, 1); // exchange `f`...
        ffi::lua_copy(state, 2, 1); // ...and the handler
        ffi::lua_replace(state, 2);
        let status = ffi::lua_pcallk(state, n - 2, ffi::LUA_MULTRET, 1, XPCALL, Some(resumed));
        finish(state, status == ffi::LUA_OK, XPCALL)
    }
}

/// Replaces the user's handler (index 2) with our [`handler`] over it.
///
/// # Safety
/// On [`xpcall`]'s frame, with at least two arguments.
unsafe fn push_handler(state: *mut lua_State) {
    // SAFETY: three pushes, within LUA_MINSTACK; upvalue STOPPING of
    // `xpcall` is `stopping`; the closure pops the three.
    unsafe {
        ffi::lua_pushvalue(state, 2);
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(STOPPING));
        ffi::lua_pushnil(state);
        ffi::lua_pushcclosure(state, handler, 3);
        ffi::lua_replace(state, 2);
    }
}

/// `xpcall`'s message handler: records the error value, and hands it to
/// the user's handler unless the request is stopping.
pub(super) unsafe extern "C-unwind" fn handler(state: *mut lua_State) -> c_int {
    // SAFETY: Lua calls a message handler with the error value and
    // takes one result. Upvalues: as made in `push_handler`. At most
    // two pushes, within LUA_MINSTACK.
    unsafe {
        ffi::lua_settop(state, 1);
        ffi::lua_pushvalue(state, 1);
        ffi::lua_replace(state, ffi::lua_upvalueindex(SEEN));
        // Asked only while a stop may be raised (a stop asked for but not
        // raised yet lets the handler run, with hooks on: the stop's
        // signal arms them).
        if may_be_stopping() {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(HANDLER_STOPPING));
            ffi::lua_call(state, 0, 1);
            let stopping = ffi::lua_toboolean(state, -1) != 0;
            ffi::lua_pop(state, 1);
            if stopping {
                return 1;
            }
        }
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(USER_HANDLER));
        ffi::lua_insert(state, 1);
        ffi::lua_call(state, 1, 1);
        1
    }
}
