//! `error` and `assert`, as Lua's own, but telling `interrupt/raised.rs`
//! of a raised value that is not a message (a table, `nil`, a boolean ...)
//! before it is raised, so the request's error can keep it: mlua turns
//! such a value into its `tostring` text on the way out.
//!
//! C functions, like the catchers (`mod protected`), so that nothing a
//! script sees changes: same positions for string messages (`luaL_where`
//! at the level asked, counted from our frame as from Lua's), same
//! traceback line (`[C]: in function 'error'`), same argument errors. Only
//! the raising of a non-message pays for a call (the `record` upvalue, a
//! Rust function); a string raised costs what it cost.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

/// Upvalue 1 of both functions: the Rust function that records a raised
/// value for the running request.
const RECORD: c_int = 1;

/// Whether the value at `idx` is a message, to which `error` adds a
/// position: a string (Lua 5.1, 5.2, LuaJIT and Luau: or a number, which
/// becomes one; Lua 5.3 on take strings only).
///
/// # Safety
/// `idx` is a valid index of `state`.
unsafe fn is_message(state: *mut lua_State, idx: c_int) -> bool {
    // SAFETY: as the caller guarantees; both only read the value.
    unsafe {
        if cfg!(any(
            feature = "lua51",
            feature = "lua52",
            feature = "luajit",
            feature = "luau"
        )) {
            ffi::lua_isstring(state, idx) != 0
        } else {
            ffi::lua_type(state, idx) == ffi::LUA_TSTRING
        }
    }
}

/// The `level` argument of `error`, read as the backend's own `error`
/// reads it: on Luau with Luau's own `luaL_optinteger`, which truncates
/// (`error(m, 1e300)` raises `m`), where mlua's compatible one refuses a
/// number that is not an exact integer with an argument error.
///
/// # Safety
/// As for [`error`], which calls it.
unsafe fn level(state: *mut lua_State) -> i64 {
    // SAFETY: reads argument 2 of a C function's frame, or raises Lua's
    // argument error through it, as `luaB_error` does.
    unsafe {
        #[cfg(feature = "luau")]
        return i64::from(ffi::luaL_optinteger_(state, 2, 1));
        #[cfg(not(feature = "luau"))]
        #[allow(clippy::unnecessary_cast)] // `isize` on Lua 5.1 and LuaJIT
        return ffi::luaL_optinteger(state, 2, 1) as i64;
    }
}

/// Whether a finalizer (`__gc`) runs: it runs in whatever request the
/// collector interrupts, and what it raises is not that request's (Lua
/// only warns of it). Known on Lua 5.4 and 5.5 only (elsewhere none is
/// found, and none is looked for): from 5.4.4 on, the collector answers
/// -1 inside a finalizer; 1, a running collector, means none runs (before
/// 5.4.4, a finalizer stopped it). A stopped collector (0) leaves it
/// unclear: then the stack says, this function's frame included (`__gc =
/// error`), as Lua names a finalizer's frame.
///
/// # Safety
/// `state` is the running Lua thread, in one of our C functions.
unsafe fn in_finalizer(state: *mut lua_State) -> bool {
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    // SAFETY: `lua_gc` with `LUA_GCISRUNNING` only reads the collector's
    // state. `lua_getstack` and `lua_getinfo` only read the call infos of
    // the running thread into `ar`, a zeroed plain C struct; `name` and
    // `namewhat` point to static or interned strings, alive while read.
    unsafe {
        match ffi::lua_gc(state, ffi::LUA_GCISRUNNING) {
            running if running < 0 => return true,
            0 => {}
            _ => return false,
        }
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        let mut level = 0;
        while ffi::lua_getstack(state, level, &mut ar) != 0 {
            if ffi::lua_getinfo(state, c"n".as_ptr(), &mut ar) != 0
                && !ar.name.is_null()
                && !ar.namewhat.is_null()
                && std::ffi::CStr::from_ptr(ar.namewhat) == c"metamethod"
                && std::ffi::CStr::from_ptr(ar.name) == c"__gc"
            {
                return true;
            }
            level += 1;
        }
        false
    }
    #[cfg(not(any(feature = "lua54", feature = "lua55")))]
    {
        let _ = state;
        false
    }
}

/// Lua's `error(value [, level])` (`luaB_error`, the same on every
/// backend but for [`is_message`]), recording a non-message first.
unsafe extern "C-unwind" fn error(state: *mut lua_State) -> c_int {
    // SAFETY: a C function called by Lua with its arguments on the stack
    // and at least `LUA_MINSTACK` (20) free slots; we use 3. `record` is
    // a Rust function (upvalue [`RECORD`], set by `install`) that returns
    // nothing, or raises (a memory error) through this frame, which owns
    // nothing; `lua_error` does not return.
    unsafe {
        let level = level(state);
        ffi::lua_settop(state, 1);
        if is_message(state, 1) {
            if level > 0 {
                ffi::luaL_where(state, level.min(c_int::MAX as _) as c_int);
                ffi::lua_pushvalue(state, 1);
                ffi::lua_concat(state, 2);
            }
        } else if !in_finalizer(state) {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(RECORD));
            ffi::lua_pushvalue(state, 1);
            ffi::lua_call(state, 1, 0);
        }
        ffi::lua_error(state)
    }
}

/// Lua's `assert(v [, message, ...])` on the backends where it raises any
/// message as it is and is a plain C function (5.3 on): what it raises
/// goes through [`error`], as Lua's own calls `luaB_error`. (LuaJIT's
/// raises any message too, but is a fast function of its interpreter,
/// which a C function in its place would slow down in every passing
/// `assert`: it stays, and a value it raises is not kept.)
#[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
unsafe extern "C-unwind" fn assert(state: *mut lua_State) -> c_int {
    // SAFETY: as for `error`; we push one value before calling it as a
    // tail, which leaves it one argument, as `luaB_assert` does.
    unsafe {
        if ffi::lua_toboolean(state, 1) != 0 {
            return ffi::lua_gettop(state);
        }
        ffi::luaL_checkany(state, 1);
        ffi::lua_remove(state, 1);
        ffi::lua_pushstring(state, c"assertion failed!".as_ptr());
        ffi::lua_settop(state, 1);
        error(state)
    }
}

/// Our C function `f` closed over `record`. On Luau it carries `name`,
/// which Luau's argument errors quote (`bad argument #2 to 'error'`), as
/// they do for its own; elsewhere Lua finds the name from the call.
fn closure(
    lua: &mlua::Lua,
    f: ffi::lua_CFunction,
    name: &'static std::ffi::CStr,
    record: &mlua::Function,
) -> mlua::Result<mlua::Function> {
    let _ = name;
    // SAFETY: `exec_raw` pushes `record`; the closure replaces it as the
    // one result; `f` reads it as upvalue [`RECORD`]. `name` is static.
    unsafe {
        lua.exec_raw::<mlua::Function>(record, |state| {
            #[cfg(feature = "luau")]
            ffi::lua_pushcclosured(state, f, name.as_ptr(), 1);
            #[cfg(not(feature = "luau"))]
            ffi::lua_pushcclosure(state, f, 1);
        })
    }
}

/// Replaces the global `error` (and, where it raises any value, `assert`)
/// with ours, which hand a raised non-message to `record` first.
pub(crate) fn install(lua: &mlua::Lua, record: &mlua::Function) -> mlua::Result<()> {
    let globals = lua.globals();
    if globals
        .raw_get::<Option<mlua::Function>>("error")?
        .is_some()
    {
        globals.raw_set("error", closure(lua, error, c"error", record)?)?;
    }
    #[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
    if globals
        .raw_get::<Option<mlua::Function>>("assert")?
        .is_some()
    {
        globals.raw_set("assert", closure(lua, assert, c"assert", record)?)?;
    }
    Ok(())
}
