//! LuaJIT: nested C calls are bounded by the stack that is left.
//!
//! PUC-Rio Lua and Luau count C calls that call back into Lua and stop at
//! 200 with "C stack overflow". LuaJIT counts none: `string.gsub` calling a
//! function that calls `string.gsub` again, thousands deep, overflows the
//! VM thread's stack and kills the process (a coroutine nesting another,
//! `coroutine.wrap(f)()` inside `f`, is bounded by nothing else at all).
//!
//! So the library functions of LuaJIT that call back into Lua from C are
//! replaced, before `init`, by Lua functions that first call
//! `native.rs`'s guard (it raises "C stack overflow" once less than an
//! eighth of the VM thread's stack is left), then tail-call the original,
//! which keeps its error messages and positions: `string.gsub`,
//! `string.format` (`__tostring`), `table.sort` and `print` (`tostring`).
//! Coroutines and `load` (a reader function) are counted as well, and at
//! most 1000 may be nested: their C frames are small, so the stack alone
//! would let tens of thousands nest, each holding a Lua stack of its own,
//! and an error climbing out through as many `coroutine.wrap` levels gets
//! a position prefixed at each: seconds of string copying. (`dofile` runs
//! its chunk from Lua, see `hook.rs`.) Not covered: `string.buffer`
//! methods (a module `init` would have to load) and Rust callbacks that
//! call Lua; those must bound their own recursion.
//!
//! The price: a Lua call and a C call more per call of these functions,
//! and two C calls per coroutine switch.

use mlua::{Lua, Table};

/// Guards the functions listed in the module docs. `stack_size` is the VM
/// thread's; this must run on that thread, before `hook.rs` wraps
/// `coroutine.resume` and `load` (so that it wraps these).
pub(crate) fn install(lua: &Lua, stack_size: usize) -> mlua::Result<()> {
    crate::native::set_stack(stack_size);
    let (guard, enter, leave) = crate::native::stack_guards(lua)?;
    lua.load(GUARDED).set_name("=mlua-isle").call::<()>((
        guard,
        enter,
        leave,
        lua.globals().get::<Option<Table>>("coroutine")?,
    ))
}

const GUARDED: &str = r#"
local guard, enter, leave, coroutine = ...
local type, error, pcall = type, error, pcall
local function guarded(t, name)
    local f = t and t[name]
    if type(f) == "function" then
        t[name] = function(...)
            guard()
            return f(...)
        end
    end
end
guarded(string, "gsub")
guarded(string, "format")
guarded(table, "sort")
guarded(_G, "print")
-- `load` with a reader function is counted too (the reader runs from C);
-- `leave` runs however it ends. Source strings run nothing.
local load = load
local function rethrow(ok, ...)
    if not ok then error((...), 0) end
    return ...
end
if load then
    _G.load = function(chunk, ...)
        if type(chunk) ~= "function" then
            return load(chunk, ...)
        end
        enter()
        return rethrow(leave(pcall(load, chunk, ...)))
    end
end
if not coroutine then return end
-- Given a coroutine, `resume` returns its errors: `leave` always runs (but
-- for a memory error, which ends the request anyway).
local resume, create, wrap = coroutine.resume, coroutine.create, coroutine.wrap
coroutine.resume = function(co, ...)
    if type(co) ~= "thread" then
        return resume(co, ...) -- Lua's own argument error
    end
    enter()
    return leave(resume(co, ...))
end
-- LuaJIT's `wrap` over the counted resume: a string error gets the
-- position of the wrapped function's caller (level 2: this function was
-- tail-called in the wrapped function's place), as LuaJIT's does.
local function wrapped(ok, ...)
    if ok then return ... end
    local e = ...
    if type(e) == "string" then error(e, 2) end
    error(e, 0)
end
coroutine.wrap = function(f)
    if type(f) ~= "function" then
        return wrap(f) -- Lua's own argument error
    end
    local co = create(f)
    return function(...)
        enter()
        return wrapped(leave(resume(co, ...)))
    end
end
"#;
