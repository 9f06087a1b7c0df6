//! Lua 5.2–5.5: the catchers `interrupt/catchers.rs` installs, as C functions, so that
//! they stay invisible to Lua code: a C function reports no line events to
//! a debug hook, and in `debug.traceback()` or `debug.getinfo(level)` it
//! stands where Lua's own function would, under the same name (found in
//! the globals, where it is installed).
//!
//! - `pcall` and `xpcall` are Lua's own (`luaB_pcall`, `luaB_xpcall`,
//!   `finishpcall` of `lbaselib.c`), built on `lua_pcallk` with a
//!   continuation, so they stay yieldable and return what Lua's return. On
//!   an error, the error value goes to the interruption check (upvalue
//!   [`CHECK`]: it raises a pending interruption, resumes a wrapped Rust
//!   panic, flags a memory error) before `false, error` is returned.
//! - `xpcall` runs the user's message handler through [`handler`], a C
//!   closure made per call, which records the error value it saw (the
//!   check gets it too: a handler may turn a Rust panic into a string) and
//!   skips the user's handler while the request is stopping (an error
//!   raised inside a hook runs the handler with hooks off, where a handler
//!   that loops could never be stopped).
//! - `load` (and 5.2's `loadstring`), `loadfile`: Lua's own C function is
//!   called on our own frame (so its argument errors name and place
//!   themselves as Lua's), after the caller's mode is narrowed to text
//!   (unless binary chunks are allowed); a mode refusing text keeps
//!   refusing it, and then a binary string or a reader's binary first piece
//!   is refused by us. A failed load's message goes to the check.
//! - `dofile`: Lua's, loading text only, yieldable (`lua_callk`).
//! - `coroutine.resume` where switches are not tracked: Lua's, called on
//!   our frame, with a failed resume's error value given to the check.
//! - `print`, where Lua's own stays (`sandbox/print.rs`): Lua's, called on
//!   our frame, or, while a request's prints are captured, the crate's.
//!
//! # Why this is sound
//!
//! - **Stack slots.** A C function gets `LUA_MINSTACK` (20) free slots
//!   above its arguments, in a call and in a continuation. These functions
//!   push at most four values above what they found (or, after a failed
//!   protected call, above the error value, which sits below where the
//!   arguments ended), and before handing their frame to one of Lua's own
//!   functions they grow the stack again by `LUA_MINSTACK`
//!   (`luaL_checkstack`, which raises Lua's "stack overflow" if it cannot).
//! - **Upvalues.** Every closure is made here ([`closure`],
//!   `lua_pushcclosure` in [`xpcall`]) with the upvalues the function
//!   reads, at the indices named by the constants below; the originals are
//!   checked to be C functions without upvalues (Lua's base library
//!   registers them so) before they are ever called on our frames.
//! - **Errors.** Lua raises errors through these frames with `longjmp`
//!   (an argument error, the check's interruption, the callee's error
//!   rethrown by `lua_error`). Their Rust frames own nothing with a
//!   destructor, only integers, pointers and borrowed C strings, so
//!   nothing is skipped. They are `extern "C-unwind"` as Lua C functions
//!   are declared by mlua: should a Rust panic ever unwind through (mlua
//!   catches them in its callbacks, so none does), it would unwind rather
//!   than abort.

mod load;
mod pcall;
mod print;

use load::*;
use pcall::*;
pub(crate) use print::print_over;

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

/// Upvalue 1 of every function here: the interruption check, a
/// function taking the error values a catcher saw.
const CHECK: c_int = 1;
/// Upvalue 2: `xpcall`'s `stopping` (a function returning whether the
/// request stops); for the others, Lua's own function.
const STOPPING: c_int = 2;
const ORIGINAL: c_int = 2;
/// Upvalue 3 of `load`, `loadfile`, `dofile`: whether binary chunks
/// are allowed.
const BINARY_OK: c_int = 3;

/// Upvalues of [`handler`]: the user's handler, `stopping`, and the
/// last error value the handler saw.
const USER_HANDLER: c_int = 1;
const HANDLER_STOPPING: c_int = 2;
const SEEN: c_int = 3;

/// `xpcall`'s continuation context (`pcall`'s is 0): where the
/// results start, as in Lua's `luaB_xpcall`.
const XPCALL: c_int = 2;

/// The message of a binary chunk refused (Lua's own, for mode `'t'`).
const REFUSED: &std::ffi::CStr = c"attempt to load a binary chunk (mode is 't')";

/// Calls the check with `n` values from the top of the stack (left
/// there).
///
/// # Safety
/// Called from one of this module's closures, whose upvalue [`CHECK`]
/// is the check, with at least `n` values on the stack and `n + 1`
/// slots free.
unsafe fn check(state: *mut lua_State, n: c_int) {
    // SAFETY: as the caller guarantees; the check returns nothing or
    // raises (through our frame, which owns nothing).
    unsafe {
        if !needs_check(state, n) {
            return;
        }
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(CHECK));
        for _ in 0..n {
            ffi::lua_pushvalue(state, -(n + 1));
        }
        ffi::lua_call(state, n, 0);
    }
}

/// Whether the check has anything to do with the `n` values on top: a
/// call into Rust costs more than the rest of a failed `pcall`. It has
/// nothing to do unless
/// - an interruption of ours may be on its way ([`may_be_stopping`]),
/// - a value is a full userdata (mlua's error objects: a Rust error, maybe
///   a memory error; a Rust panic to resume),
/// - or a value is Lua's memory error message.
///
/// A stop asked for but not raised yet is not raised here then: the hook,
/// armed by the stop's signal, raises it on its own.
///
/// # Safety
/// At least `n` values on the stack.
unsafe fn needs_check(state: *mut lua_State, n: c_int) -> bool {
    if may_be_stopping() {
        return true;
    }
    // SAFETY: as the caller guarantees; `lua_type` and `lua_tolstring`
    // of a string only read the value (no conversion), and the bytes
    // live while it is on the stack.
    (1..=n).any(|i| unsafe {
        match ffi::lua_type(state, -i) {
            ffi::LUA_TUSERDATA => true,
            ffi::LUA_TSTRING => {
                let mut len = 0;
                let p = ffi::lua_tolstring(state, -i, &mut len);
                crate::interrupt::errors::is_memory_message(std::slice::from_raw_parts(
                    p.cast(),
                    len,
                ))
            }
            _ => false,
        }
    })
}

/// Whether an interruption of ours may be raised through a catcher now.
/// Lua 5.4 and 5.5 raise one only while the VM thread is stopping
/// (`raise::stopping`); on 5.2 and 5.3 it comes through mlua's hook,
/// unseen from here: always.
fn may_be_stopping() -> bool {
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    return super::raise::stopping();
    #[cfg(not(any(feature = "lua54", feature = "lua55")))]
    true
}

/// Our C function `f` closed over `upvalues`.
fn closure(
    lua: &mlua::Lua,
    f: ffi::lua_CFunction,
    upvalues: impl mlua::IntoLuaMulti,
) -> mlua::Result<mlua::Function> {
    // SAFETY: `f` is one of this module's functions, reading the
    // upvalues its callers give here; `exec_raw` pushes them, and the
    // closure replaces them as the one result.
    unsafe {
        lua.exec_raw::<mlua::Function>(upvalues, |state| {
            let n = ffi::lua_gettop(state);
            ffi::lua_pushcclosure(state, f, n);
        })
    }
}

/// `f`, if it is a C function without upvalues (which can run on a
/// frame of ours).
fn plain_c_function(lua: &mlua::Lua, f: &mlua::Function) -> mlua::Result<()> {
    if super::threads::is_plain_c_function(lua, f)? {
        Ok(())
    } else {
        Err(mlua::Error::runtime(
            "mlua-isle: the standard library's functions are not Lua's own",
        ))
    }
}

/// Installs this module's `pcall`, `xpcall`, `load`, `loadstring`,
/// `loadfile`, `dofile` over Lua's (those present), and our
/// `coroutine.resume` when `resume` is true (switches not tracked).
pub(crate) fn install_catchers(
    lua: &mlua::Lua,
    check: &mlua::Function,
    stopping: &mlua::Function,
    binary_ok: bool,
    resume: bool,
) -> mlua::Result<()> {
    let globals = lua.globals();
    globals.set("pcall", closure(lua, pcall, check.clone())?)?;
    globals.set(
        "xpcall",
        closure(lua, xpcall, (check.clone(), stopping.clone()))?,
    )?;
    let loaders: [(&str, ffi::lua_CFunction); 4] = [
        ("load", load),
        ("loadstring", load),
        ("loadfile", loadfile),
        ("dofile", dofile),
    ];
    for (name, f) in loaders {
        if let Some(original) = globals.get::<Option<mlua::Function>>(name)? {
            plain_c_function(lua, &original)?;
            let wrapped = closure(lua, f, (check.clone(), original, binary_ok))?;
            globals.set(name, wrapped)?;
        }
    }
    if resume {
        if let Some(coroutine) = globals.get::<Option<mlua::Table>>("coroutine")? {
            let original: mlua::Function = coroutine.get("resume")?;
            plain_c_function(lua, &original)?;
            coroutine.set(
                "resume",
                closure(lua, self::resume, (check.clone(), original))?,
            )?;
        }
    }
    Ok(())
}

/// Replaces Lua 5.5's `string.rep` with [`capped_rep`].
#[cfg(feature = "lua55")]
pub(crate) fn cap_string_rep(lua: &mlua::Lua) -> mlua::Result<()> {
    let Some(string) = lua.globals().get::<Option<mlua::Table>>("string")? else {
        return Ok(());
    };
    let original: mlua::Function = string.get("rep")?;
    plain_c_function(lua, &original)?;
    // Upvalue 1 (`CHECK`) is unused here.
    string.set("rep", closure(lua, capped_rep, (false, original))?)
}

/// Whether `f` is our `xpcall`'s message handler: a C frame `load`'s
/// search for its caller must not pass (`pool/envs.rs`), since what the
/// user's handler calls runs at the error's level, above whoever raised it.
pub(crate) fn is_message_handler(lua: &mlua::Lua, f: &mlua::Function) -> bool {
    // SAFETY: `exec_raw` runs the closure as a C function with `f` pushed
    // as its one argument; the closure reads it, clears the frame and
    // leaves one boolean, its result.
    unsafe {
        lua.exec_raw::<bool>(f, |state| {
            let ours = ffi::lua_tocfunction(state, -1)
                .is_some_and(|c| std::ptr::fn_addr_eq(c, handler as ffi::lua_CFunction));
            ffi::lua_settop(state, 0);
            ffi::lua_pushboolean(state, c_int::from(ours));
        })
        .unwrap_or(false)
    }
}
