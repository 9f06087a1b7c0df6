//! Lua C functions of ours, for two backends whose own functions can take
//! the process down:
//!
//! - **Lua 5.1's `pcall` and `xpcall`** push their status after results that
//!   may fill the frame's stack (`pcall(unpack, t)`): past the room Lua's API
//!   promises, which a build with API checks (the vendored debug build)
//!   aborts on. Ours are the same functions with the stack check that Lua
//!   5.2 added.
//! - **LuaJIT counts no nested C calls.** A C function that calls back into
//!   Lua (`string.gsub` with a function, `table.sort` with a comparator,
//!   `coroutine.resume`, ...) can be nested until the thread's real stack
//!   overflows, which kills the process. `guard` raises "C stack overflow"
//!   instead once little stack is left; `vm/cstack.rs` calls it before every
//!   such function.
//!
//! # Why this is sound
//!
//! These are ordinary Lua C functions. They use only the stack slots Lua's
//! API guarantees a C function (`LUA_MINSTACK`), or that `lua_checkstack`
//! granted, and their frames own nothing that needs dropping: when Lua
//! raises an error through them (an argument error, "C stack overflow"),
//! nothing is skipped, whether Lua `longjmp`s over them (PUC Lua) or
//! unwinds through them (LuaJIT, hence `C-unwind`). The stack pointer is
//! read as the address of a local, in safe code; the guard only compares
//! it.

#[cfg(feature = "lua51")]
pub(crate) use lua51::protected_calls;
#[cfg(feature = "luajit")]
pub(crate) use luajit::{set_stack, stack_guard};

#[cfg(feature = "lua51")]
mod lua51 {
    use std::ffi::c_int;

    use mlua::ffi::{self, lua_State};

    /// Makes room for the status of a protected call whose results are on
    /// top. If there is none, leaves Lua 5.2's answer instead, `false,
    /// "stack overflow"`, as the only values, and returns false.
    ///
    /// # Safety
    /// Called from a C function of ours.
    unsafe fn room_for_status(state: *mut lua_State) -> bool {
        // SAFETY: `lua_checkstack` grants the slot or says there is none
        // (or raises a memory error, which skips nothing of ours); the
        // answer's two values are within LUA_MINSTACK.
        unsafe {
            if ffi::lua_checkstack(state, 1) != 0 {
                return true;
            }
            ffi::lua_settop(state, 0);
            ffi::lua_pushboolean(state, 0);
            ffi::lua_pushstring(state, c"stack overflow".as_ptr());
            false
        }
    }

    /// `pcall(f, ...)`.
    unsafe extern "C-unwind" fn pcall(state: *mut lua_State) -> c_int {
        // SAFETY: `state` is the calling thread; `luaL_checkany` raises
        // Lua's usual argument error; the call replaces `f` and its
        // arguments by the results, and the status goes below them.
        unsafe {
            ffi::luaL_checkany(state, 1);
            let status = ffi::lua_pcall(state, ffi::lua_gettop(state) - 1, ffi::LUA_MULTRET, 0);
            if room_for_status(state) {
                ffi::lua_pushboolean(state, c_int::from(status == 0));
                ffi::lua_insert(state, 1);
            }
            ffi::lua_gettop(state)
        }
    }

    /// `xpcall(f, handler)` (5.1's: no arguments for `f`).
    unsafe extern "C-unwind" fn xpcall(state: *mut lua_State) -> c_int {
        // SAFETY: as in `pcall`; the handler, at index 1 below `f`, stays
        // below the results and is replaced by the status.
        unsafe {
            ffi::luaL_checkany(state, 2);
            ffi::lua_settop(state, 2);
            ffi::lua_insert(state, 1);
            let status = ffi::lua_pcall(state, 0, ffi::LUA_MULTRET, 1);
            if room_for_status(state) {
                ffi::lua_pushboolean(state, c_int::from(status == 0));
                ffi::lua_replace(state, 1);
            }
            ffi::lua_gettop(state)
        }
    }

    /// Lua 5.1's `pcall` and `xpcall`, with the stack check they lack.
    pub(crate) fn protected_calls(
        lua: &mlua::Lua,
    ) -> mlua::Result<(mlua::Function, mlua::Function)> {
        // SAFETY: both uphold Lua's C function contract (module docs).
        unsafe {
            Ok((
                lua.create_c_function(pcall)?,
                lua.create_c_function(xpcall)?,
            ))
        }
    }
}

#[cfg(feature = "luajit")]
mod luajit {
    use std::cell::Cell;
    use std::ffi::c_int;

    use mlua::ffi::{self, lua_State};

    thread_local! {
        /// Below this stack address, nested C calls are refused (0: no
        /// limit, not a VM thread).
        static FLOOR: Cell<usize> = const { Cell::new(0) };
    }

    /// An address in the caller's stack frame. Stacks grow down on every
    /// platform LuaJIT supports.
    #[inline(always)]
    fn stack_pointer() -> usize {
        let probe = 0u8;
        std::ptr::addr_of!(probe) as usize
    }

    /// Called near the top of a VM thread whose stack is `size` bytes:
    /// nested C calls stop an eighth of it (128 KiB at least, half at most)
    /// before its end, which leaves room for raising the error (LuaJIT's
    /// unwinder, mlua's traceback) and for the Rust callbacks, library
    /// functions and nested coroutines the last level runs.
    pub(crate) fn set_stack(size: usize) {
        let margin = (size / 8).max(128 << 10).min(size / 2);
        let floor = stack_pointer().saturating_sub(size - margin);
        FLOOR.with(|f| f.set(floor));
    }

    /// `guard()`: raises "C stack overflow" (with no position, as Lua's
    /// own) when the stack left is below the floor.
    unsafe extern "C-unwind" fn guard(state: *mut lua_State) -> c_int {
        if stack_pointer() < FLOOR.with(Cell::get) {
            // SAFETY: `state` is the calling thread; one push, within
            // LUA_MINSTACK; raising is what Lua C functions do (module
            // docs).
            unsafe {
                ffi::lua_pushstring(state, c"C stack overflow".as_ptr());
                ffi::lua_error(state);
            }
        }
        0
    }

    /// The guard, as a Lua function taking and returning nothing.
    pub(crate) fn stack_guard(lua: &mlua::Lua) -> mlua::Result<mlua::Function> {
        // SAFETY: `guard` upholds Lua's C function contract (module docs).
        unsafe { lua.create_c_function(guard) }
    }
}
