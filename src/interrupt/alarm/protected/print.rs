//! `print` where it stays Lua's own (`Default` outside the sandbox,
//! `sandbox/print.rs`): Lua's C `print`, run on our frame as the other
//! functions here run theirs, unless a request's print capture is
//! current: then the crate's `print`, written in Lua. To Lua code it is
//! Lua's: a C function without upvalues (`db.lua` asks), whose errors and
//! traceback lines are Lua's own.

use std::ffi::{c_int, CStr};
use std::sync::OnceLock;

use mlua::ffi::{self, lua_State};

use super::*;

/// Lua's `print`: the same C function in every VM of the process (the
/// base library's).
static ORIGINAL: OnceLock<ffi::lua_CFunction> = OnceLock::new();

/// Where each VM keeps the crate's `print`, for captured requests (put
/// there by `sandbox::print::prepare` before the first one runs).
const CAPTURED: &CStr = crate::sandbox::print::CAPTURED_PRINT;

/// Our C `print` over Lua's `original`, calling the crate's instead
/// while a capture is current. `None` if `original` is not Lua's own C
/// function (the caller then keeps a `print` written in Lua).
pub(crate) fn print_over(
    lua: &mlua::Lua,
    original: &mlua::Function,
) -> mlua::Result<Option<mlua::Function>> {
    if plain_c_function(lua, original).is_err() {
        return Ok(None);
    }
    let mut f = None;
    // SAFETY: reads the pushed function only.
    unsafe {
        lua.exec_raw::<()>(original, |state| {
            f = ffi::lua_tocfunction(state, -1);
        })?;
    }
    let Some(f) = f else { return Ok(None) };
    // Compared as addresses: both are the base library's `luaB_print`.
    if *ORIGINAL.get_or_init(|| f) as usize != f as usize {
        return Ok(None); // not the one the others have
    }
    closure(lua, print, ()).map(Some)
}

/// `print`, without upvalues: see the module docs.
unsafe extern "C-unwind" fn print(state: *mut lua_State) -> c_int {
    let Some(&f) = ORIGINAL.get() else {
        unreachable!("set before any VM has this print")
    };
    // SAFETY: a C function has `LUA_MINSTACK` free slots above its
    // arguments: one is pushed (the crate's `print`, then moved below
    // them; or popped again if there is none). `lua_call` lets an error
    // raised by the call through our frame, which owns nothing. Lua's
    // own C function runs on our frame with the room Lua gives a C
    // function (`luaL_checkstack` raises "stack overflow" where Lua
    // would refuse a C call).
    unsafe {
        if crate::sandbox::print::capturing() {
            let n = ffi::lua_gettop(state);
            if ffi::lua_getfield(state, ffi::LUA_REGISTRYINDEX, CAPTURED.as_ptr())
                == ffi::LUA_TFUNCTION
            {
                ffi::lua_insert(state, 1);
                ffi::lua_call(state, n, 0);
                return 0;
            }
            ffi::lua_pop(state, 1);
        }
        ffi::luaL_checkstack(state, ffi::LUA_MINSTACK, std::ptr::null());
        f(state)
    }
}
