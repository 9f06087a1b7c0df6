//! `load`, `loadfile`, `dofile`, the untracked `coroutine.resume`, and Lua
//! 5.5's capped `string.rep`.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

use super::*;

/// Calls Lua's own function (upvalue [`ORIGINAL`]) on our frame, with
/// the room Lua gives a C function; returns its result count.
///
/// # Safety
/// From one of this module's closures made by [`closure`], whose
/// original was checked to be a C function without upvalues.
pub(super) unsafe fn original(state: *mut lua_State) -> c_int {
    // SAFETY: the caller guarantees the upvalue; `luaL_checkstack`
    // raises "stack overflow" where Lua would refuse a C call.
    unsafe {
        let f = ffi::lua_tocfunction(state, ffi::lua_upvalueindex(ORIGINAL));
        ffi::luaL_checkstack(state, ffi::LUA_MINSTACK, std::ptr::null());
        match f {
            Some(f) => f(state),
            None => ffi::luaL_error(state, c"mlua-isle: not a C function".as_ptr()),
        }
    }
}

/// After Lua's `load` or `loadfile` returned `n` results: a failure
/// (`nil` or `fail`, then the message) is handed to the check.
///
/// # Safety
/// As [`check`], with the `n` results on top.
unsafe fn check_load(state: *mut lua_State, n: c_int) -> c_int {
    // SAFETY: as the caller guarantees; two pushes are free (a C
    // function's results are within its room).
    unsafe {
        if n >= 2 && ffi::lua_isnil(state, -n) != 0 {
            check(state, 1);
        }
    }
    n
}

/// True if the value at `idx` is a mode string (or number) containing
/// `c`.
///
/// # Safety
/// `idx` is a valid index of `state`'s running frame.
unsafe fn mode_has(state: *mut lua_State, idx: c_int, c: u8) -> bool {
    let mut len = 0;
    // SAFETY: for a string or number, `lua_tolstring` returns a pointer
    // to `len` bytes owned by the stack slot (a number is converted in
    // place, as Lua's `luaL_optstring` would), read before anything is
    // popped.
    unsafe {
        let p = ffi::lua_tolstring(state, idx, &mut len);
        !p.is_null() && std::slice::from_raw_parts(p.cast::<u8>(), len).contains(&c)
    }
}

/// True for an absent or `nil` value, or a string or number: what
/// Lua's `luaL_optstring` accepts.
///
/// # Safety
/// `idx` is an index of the running frame.
unsafe fn optional_string(state: *mut lua_State, idx: c_int) -> bool {
    // SAFETY: `lua_type` accepts any acceptable index.
    let t = unsafe { ffi::lua_type(state, idx) };
    matches!(
        t,
        ffi::LUA_TNONE | ffi::LUA_TNIL | ffi::LUA_TSTRING | ffi::LUA_TNUMBER
    )
}

/// Sets argument `idx` to the mode `"t"`, filling absent arguments
/// below it with `nil` (which Lua's functions take as absent).
///
/// # Safety
/// On our frame; `idx` ≤ 3.
unsafe fn text_mode(state: *mut lua_State, idx: c_int) {
    // SAFETY: at most three slots above the arguments, plus one push.
    unsafe {
        if ffi::lua_gettop(state) < idx {
            ffi::lua_settop(state, idx);
        }
        ffi::lua_pushstring(state, c"t".as_ptr());
        ffi::lua_replace(state, idx);
    }
}

/// `load(chunk, name, mode, env)` (and 5.2's `loadstring`); upvalues:
/// the check, Lua's function, whether binary chunks are allowed.
pub(super) unsafe extern "C-unwind" fn load(state: *mut lua_State) -> c_int {
    // SAFETY: upvalues as made by `closure`; every index read is an
    // argument slot (absent ones read as none). What is pushed or
    // replaced stays within the first three argument slots plus one.
    unsafe {
        if ffi::lua_toboolean(state, ffi::lua_upvalueindex(BINARY_OK)) == 0 {
            let chunk = ffi::lua_type(state, 1);
            // Anything else: Lua's function raises its argument error.
            let chunk_ok = matches!(
                chunk,
                ffi::LUA_TSTRING | ffi::LUA_TNUMBER | ffi::LUA_TFUNCTION
            );
            let mode = ffi::lua_type(state, 3);
            if chunk_ok && optional_string(state, 3) && !mode_has(state, 3, b'B') {
                if mode == ffi::LUA_TNONE || mode == ffi::LUA_TNIL || mode_has(state, 3, b't') {
                    // The caller's mode, narrowed to text.
                    text_mode(state, 3);
                } else if chunk == ffi::LUA_TSTRING {
                    // The caller's mode refuses text (Lua says so); binary
                    // is refused here.
                    let mut len = 0;
                    let s = ffi::lua_tolstring(state, 1, &mut len);
                    if len > 0 && *s.cast::<u8>() == 27 {
                        ffi::lua_pushnil(state);
                        ffi::lua_pushstring(state, REFUSED.as_ptr());
                        return 2;
                    }
                } else if chunk == ffi::LUA_TFUNCTION {
                    // So is a reader's binary first piece.
                    ffi::lua_pushvalue(state, 1);
                    ffi::lua_pushboolean(state, 1);
                    ffi::lua_pushcclosure(state, text_reader, 2);
                    ffi::lua_replace(state, 1);
                }
            }
        }
        let n = original(state);
        check_load(state, n)
    }
}

/// A reader refusing a binary first piece; upvalues: the user's reader,
/// and whether the first piece is still to come.
unsafe extern "C-unwind" fn text_reader(state: *mut lua_State) -> c_int {
    // SAFETY: upvalues as made in `load`; Lua's `load` calls a reader
    // with no arguments and takes one result; one push, then the
    // message, within LUA_MINSTACK. The piece is read while on the
    // stack.
    unsafe {
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_call(state, 0, 1);
        if ffi::lua_toboolean(state, ffi::lua_upvalueindex(2)) != 0
            && ffi::lua_type(state, -1) == ffi::LUA_TSTRING
        {
            let mut len = 0;
            let s = ffi::lua_tolstring(state, -1, &mut len);
            if len > 0 {
                ffi::lua_pushboolean(state, 0);
                ffi::lua_replace(state, ffi::lua_upvalueindex(2));
                if *s.cast::<u8>() == 27 {
                    ffi::lua_pushstring(state, REFUSED.as_ptr());
                    ffi::lua_error(state);
                }
            }
        }
        1
    }
}

/// `loadfile(name, mode, env)`; upvalues as `load`'s. The mode becomes
/// text unless binary chunks are allowed.
pub(super) unsafe extern "C-unwind" fn loadfile(state: *mut lua_State) -> c_int {
    // SAFETY: as in `load`.
    unsafe {
        if ffi::lua_toboolean(state, ffi::lua_upvalueindex(BINARY_OK)) == 0
            && optional_string(state, 1)
            && optional_string(state, 2)
            && !mode_has(state, 2, b'B')
        {
            text_mode(state, 2);
        }
        let n = original(state);
        check_load(state, n)
    }
}

/// `dofile(name)`: Lua's `luaB_dofile`, loading text only unless binary
/// chunks are allowed, with a failed load's message checked.
pub(super) unsafe extern "C-unwind" fn dofile(state: *mut lua_State) -> c_int {
    // SAFETY: as Lua's own: `luaL_optstring` raises Lua's argument
    // error; the name stays on the stack (slot 1) while it is used;
    // `luaL_loadfilex` pushes the chunk or the message; the call
    // replaces the chunk by its results.
    unsafe {
        let name = ffi::luaL_optstring(state, 1, std::ptr::null());
        ffi::lua_settop(state, 1);
        let binary_ok = ffi::lua_toboolean(state, ffi::lua_upvalueindex(BINARY_OK)) != 0;
        let mode = if binary_ok {
            std::ptr::null()
        } else {
            c"t".as_ptr()
        };
        if ffi::luaL_loadfilex(state, name, mode) != ffi::LUA_OK {
            check(state, 1);
            ffi::lua_error(state);
        }
        ffi::lua_callk(state, 0, ffi::LUA_MULTRET, 0, Some(dofile_done));
        ffi::lua_gettop(state) - 1
    }
}

/// `dofile`'s continuation: the chunk's results (above the name).
#[cfg(not(feature = "lua52"))]
unsafe extern "C-unwind" fn dofile_done(
    state: *mut lua_State,
    _status: c_int,
    _ctx: ffi::lua_KContext,
) -> c_int {
    // SAFETY: `dofile`'s frame.
    unsafe { ffi::lua_gettop(state) - 1 }
}

#[cfg(feature = "lua52")]
unsafe extern "C-unwind" fn dofile_done(state: *mut lua_State) -> c_int {
    // SAFETY: `dofile`'s frame.
    unsafe { ffi::lua_gettop(state) - 1 }
}

/// `coroutine.resume`, where switches are not tracked; upvalues: the
/// check, Lua's function. A failed resume's error goes to the check.
pub(super) unsafe extern "C-unwind" fn resume(state: *mut lua_State) -> c_int {
    // SAFETY: as in `original`; Lua's resume returns `true, values...`
    // or `false, error` (or raises its argument error).
    unsafe {
        let n = original(state);
        if ffi::lua_toboolean(state, -n) == 0 {
            check(state, 1);
        }
        n
    }
}

/// Lua 5.5's `string.rep`, refusing results longer than Lua 5.4 allows
/// (`INT_MAX` bytes) as 5.4 refuses them: 5.5 accepts any length a
/// `size_t` holds, and a failed allocation makes mlua abort the
/// process, so one `string.rep('x', 1e12)` would kill it. Everything
/// else (argument errors, names, positions) is Lua's own function's,
/// run on our frame.
#[cfg(feature = "lua55")]
pub(super) unsafe extern "C-unwind" fn capped_rep(state: *mut lua_State) -> c_int {
    /// The length `rep` will see for argument `i`, if it is one it
    /// takes (a string, or a number it converts as it would).
    ///
    /// # Safety
    /// `state` is running this C function, with `i` a valid index.
    unsafe fn len(state: *mut lua_State, i: c_int) -> Option<u64> {
        // SAFETY: the caller guarantees `i`; converting a number in
        // place is what `luaL_checklstring` in `rep` does anyway.
        unsafe {
            match ffi::lua_type(state, i) {
                ffi::LUA_TSTRING | ffi::LUA_TNUMBER => {
                    let mut l = 0usize;
                    ffi::lua_tolstring(state, i, &mut l);
                    Some(l as u64)
                }
                ffi::LUA_TNONE | ffi::LUA_TNIL => Some(0),
                _ => None,
            }
        }
    }
    // SAFETY: indices 1–3 are valid (absent ones read as none); the
    // error raised is Lua's `luaL_error`, over no Rust value with a
    // destructor; `original` is called as its docs require.
    unsafe {
        let mut is_int = 0;
        let n = ffi::lua_tointegerx(state, 2, &mut is_int);
        if is_int != 0 && n > 0 {
            if let (Some(l), Some(lsep)) = (len(state, 1), len(state, 3)) {
                let total = (n as u64)
                    .saturating_mul(l.saturating_add(lsep))
                    .saturating_sub(lsep);
                if l + lsep > 0 && total > i32::MAX as u64 {
                    return ffi::luaL_error(state, c"resulting string too large".as_ptr());
                }
            }
        }
        original(state)
    }
}
