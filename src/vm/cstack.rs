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
//! `interrupt/alarm/native.rs`'s guard (it raises "C stack overflow" once the stack left is
//! below a floor: an eighth of the VM thread's stack, 128 KiB at least),
//! then tail-call the original, which keeps its error messages and
//! positions: `string.gsub`, `string.format` (`__tostring`), `table.sort`,
//! `print` (`tostring`), `os.time` (`__index` of its table),
//! `coroutine.resume` and the functions `coroutine.wrap` returns.
//!
//! Coroutines are also counted, at most 1000 nested: their C frames are
//! small, so the stack alone would let tens of thousands nest, each holding
//! a Lua stack of its own, and an error climbing out through as many
//! `coroutine.wrap` levels gets a position prefixed at each: seconds of
//! string copying. `load` calls a reader function from Lua instead of from
//! C. (`dofile` runs its chunk from Lua too, see `interrupt/catchers.lua`.)
//!
//! Not covered: `string.buffer` methods (a module `init` would have to
//! load), `require` and `module` (unavailable in the sandbox), and Rust
//! callbacks that call Lua; those must bound their own recursion.
//!
//! The price: a Lua call and a C call more per call of these functions;
//! per coroutine switch, a Lua call (two through `wrap`), three C calls
//! and a table store.

use mlua::{Lua, Table};

use crate::vm::precompiled::Precompiled;

/// Coroutines that may be nested, one resumed by the other.
const MAX_NESTED: u32 = 1000;

/// Guards the functions listed in the module docs. `stack_size` is the VM
/// thread's; this must run on that thread, before `interrupt/catchers.rs` wraps
/// `coroutine.resume`, `load` and `pcall` (so that it wraps these, and
/// these use Lua's own `pcall`).
pub(super) fn install(lua: &Lua, stack_size: usize) -> mlua::Result<()> {
    crate::interrupt::alarm::native::set_stack(stack_size);
    GUARDED.load(lua)?.call::<()>((
        crate::interrupt::alarm::native::stack_guard(lua)?,
        lua.globals().get::<Option<Table>>("coroutine")?,
        MAX_NESTED,
    ))
}

static GUARDED: Precompiled = Precompiled::new(
    "=mlua-isle",
    r#"
local guard, coroutine, max_nested = ...
local type, error, setmetatable = type, error, setmetatable
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
guarded(os, "time") -- reads its table's fields through `__index`
-- `load` with a reader function: the reader is called from Lua here, and
-- the source it gives loaded as a string, so a reader that loads again
-- nests Lua calls, not C ones (bounded by the Lua stack, and cheap).
local load, tostring, pcall = load, tostring, pcall
-- The host may not open `table` (`std_libs`).
local concat = (rawget(_G, "table") or {}).concat or function(pieces)
    local s = ""
    for i = 1, #pieces do s = s .. pieces[i] end
    return s
end
local function read_all(reader)
    local pieces, n = {}, 0
    while true do
        local ok, piece = pcall(reader)
        if not ok then return nil, piece end
        if piece == nil or piece == "" then return concat(pieces) end
        local t = type(piece)
        if t == "number" then
            piece = tostring(piece)
        elseif t ~= "string" then
            return nil, "reader function must return a string"
        end
        n = n + 1
        pieces[n] = piece
    end
end
if load then
    _G.load = function(...)
        local chunk, name, mode, env = ...
        if type(chunk) ~= "function" then
            return load(...)
        end
        local source, err = read_all(chunk)
        if not source then return nil, err end
        return load(source, name or "=(load)", mode, env)
    end
end
if not coroutine then return end
-- Coroutines are also counted: each one's nesting depth is its resumer's
-- plus one, recorded when it is resumed (only if it can be: resuming a
-- running or normal one fails, and must not change its depth). Nothing to
-- undo when a resume ends, however it ends.
local resume, create, wrap = coroutine.resume, coroutine.create, coroutine.wrap
local status, running = coroutine.status, coroutine.running
local depth = setmetatable({}, { __mode = "k" })
coroutine.resume = function(...)
    local co = ...
    if type(co) == "thread" then
        guard()
        if status(co) == "suspended" then
            local d = (depth[running()] or 0) + 1
            if d > max_nested then error("C stack overflow", 0) end
            depth[co] = d
        end
    end
    return resume(...)
end
local counted_resume = coroutine.resume
-- LuaJIT's `wrap` over the counted resume: a string error gets the
-- position of the wrapped function's caller (level 2: this function was
-- tail-called in the wrapped function's place), as LuaJIT's does.
local function wrapped(ok, ...)
    if ok then return ... end
    local e = ...
    if type(e) == "string" then error(e, 2) end
    error(e, 0)
end
coroutine.wrap = function(...)
    local f = ...
    if type(f) ~= "function" then
        return wrap(...) -- Lua's own argument error
    end
    local co = create(f)
    return function(...)
        return wrapped(counted_resume(co, ...))
    end
end
"#,
);
