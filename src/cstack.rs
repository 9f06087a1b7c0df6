//! LuaJIT: nested C calls are bounded by the stack that is left.
//!
//! PUC-Rio Lua and Luau count C calls that call back into Lua and stop at
//! 200 with "C stack overflow". LuaJIT counts none: `string.gsub` calling a
//! function that calls `string.gsub` again, thousands deep, overflows the
//! VM thread's stack and kills the process (a coroutine nesting another,
//! `coroutine.wrap(f)()` inside `f`, is bounded by nothing else at all).
//!
//! So every library function of LuaJIT that calls back into Lua from C is
//! replaced, before `init`, by a Lua function that first calls
//! `native::stack_guard` (it raises "C stack overflow" once less than an
//! eighth of the VM thread's stack is left), then tail-calls the original,
//! which keeps its error messages and positions: `string.gsub`,
//! `string.format` (`__tostring`), `table.sort`, `print` (`tostring`),
//! `load` (a reader function), `dofile`, `coroutine.resume`, and the
//! functions `coroutine.wrap` returns. Not covered: `string.buffer` methods
//! (a module `init` would have to load) and Rust callbacks that call Lua;
//! those must bound their own recursion.
//!
//! The price: one Lua call and one C call more per call of these functions.

use mlua::{Lua, Table};

/// Guards the functions listed in the module docs. `stack_size` is the VM
/// thread's; this must run on that thread, after `hook.rs` wrapped
/// `coroutine.resume` and `load`.
pub(crate) fn install(lua: &Lua, stack_size: usize) -> mlua::Result<()> {
    crate::native::set_stack(stack_size);
    let (guard, enter, leave) = crate::native::stack_guards(lua)?;
    let globals = lua.globals();
    lua.load(GUARDED).set_name("=mlua-isle").call::<()>((
        guard,
        enter,
        leave,
        globals.get::<Option<Table>>("coroutine")?,
        globals.get::<mlua::Function>("pcall")?,
    ))
}

const GUARDED: &str = r#"
local guard, enter, leave, coroutine, pcall = ...
local type, error = type, error
local function guarded(t, name)
    local f = t and t[name]
    if type(f) == "function" then
        t[name] = function(...)
            guard()
            return f(...)
        end
    end
end
-- Counted as well: `leave` runs however `f` ends.
local function counted(t, name)
    local f = t and t[name]
    if type(f) == "function" then
        t[name] = function(...)
            enter()
            return leave(pcall(f, ...))
        end
    end
end
guarded(string, "gsub")
guarded(string, "format")
guarded(table, "sort")
guarded(_G, "print")
guarded(_G, "dofile")
counted(_G, "load")
if not coroutine then return end
local resume, create, wrap = coroutine.resume, coroutine.create, coroutine.wrap
counted(coroutine, "resume")
-- LuaJIT's `wrap` over the counted resume: a string error gets the
-- caller's position, as LuaJIT's does (level 2: this function was
-- tail-called by the wrapped function's caller's callee).
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
        return wrapped(leave(pcall(resume, co, ...)))
    end
end
"#;
