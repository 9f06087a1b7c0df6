//! `sandbox(true)`: what Lua code may not do.
//!
//! Applied once per VM, right after `init` (which is trusted: it may use any
//! library to set things up, and may extend the library tables before they
//! are frozen). From then on:
//! - `io`, `debug`, `package`, `loadfile`, `dofile`, and `os.exit`,
//!   `os.execute`, `os.remove`, `os.rename`, `os.getenv`, `os.tmpname`,
//!   `os.setlocale` (and LuaJIT's `jit.on`, `jit.opt`, `jit.attach`: the
//!   JIT must stay off for cancellation) raise "... is not available in the
//!   sandbox";
//! - `require` returns only modules already loaded (by `init`), never loads
//!   one, so no C module and no file can be loaded;
//! - `collectgarbage` accepts only `collect`, `count`, `step` and
//!   `isrunning`: the collector cannot be stopped or retuned;
//! - `string.find`, `match`, `gmatch` and `gsub` are `pattern.rs`'s
//!   matcher, which a cancel, a time limit or the instruction budget can
//!   stop (Lua's C matcher backtracks for minutes out of any hook's reach);
//! - `setmetatable` refuses metatables with `__gc`: finalizers run with hooks
//!   disabled, so one that loops could never be interrupted; for the same
//!   reason `newproxy` (Lua 5.1, LuaJIT, Luau) is unavailable, whose
//!   userdata have a metatable Lua code can write;
//! - the library tables (`string`, `table`, `math`, `utf8`, `coroutine`,
//!   `os`, `bit32`, `bit`, `jit` where they exist, and every table module `init` loaded) are replaced by read-only
//!   views; the string metatable and the views' metatables are hidden, and
//!   `rawset` refuses the views (`pairs` and `ipairs` iterate them; `#`
//!   gives 0 on Lua 5.1 and LuaJIT, which ignore `__len` on tables).
//!
//! Functions defined by `init` that look up a removed library by its global
//! name at call time will fail under the sandbox; capture what they need in
//! locals instead. SECURITY.md says what this does not protect.

use mlua::Lua;

/// Applies the sandbox to `lua` (see the module docs).
pub(crate) fn apply(lua: &Lua) -> mlua::Result<()> {
    lua.load(SANDBOX).set_name("=mlua-isle sandbox").exec()
}

const SANDBOX: &str = r#"
local G = _G
local error, type, tostring, ipairs, pairs, next = error, type, tostring, ipairs, pairs, next
local rawget, rawset, setmetatable, getmetatable = rawget, rawset, setmetatable, getmetatable

local function unavailable(name)
    return function()
        error(name .. " is not available in the sandbox", 2)
    end
end

-- A table every field of which is a function saying `prefix.field` is
-- unavailable.
local function unavailable_table(prefix)
    return setmetatable({}, {
        __index = function(_, k) return unavailable(prefix .. "." .. tostring(k)) end,
        __newindex = function() error(prefix .. " is not available in the sandbox", 2) end,
        __metatable = false,
    })
end

-- View -> table it shows.
local frozen = setmetatable({}, { __mode = "k" })

-- A read-only view of `t`.
local function freeze(name, t)
    local view = setmetatable({}, {
        __index = t,
        __newindex = function(_, k)
            error("cannot set " .. name .. "." .. tostring(k)
                .. ": library tables are read-only in the sandbox", 2)
        end,
        __pairs = function() return next, t, nil end,
        __iter = function() return next, t, nil end, -- Luau's `for k, v in view`
        __len = function() return #t end,
        __metatable = false,
    })
    frozen[view] = t
    return view
end

-- 1. Dangerous functions.
local os = rawget(G, "os")
if type(os) == "table" then
    for _, k in ipairs({ "exit", "execute", "remove", "rename", "getenv", "tmpname", "setlocale" }) do
        if os[k] ~= nil then os[k] = unavailable("os." .. k) end
    end
end
G.io = unavailable_table("io")
G.debug = unavailable_table("debug")
G.loadfile = unavailable("loadfile")
G.dofile = unavailable("dofile")
-- Lua 5.1, LuaJIT: `newproxy(true)` makes a userdata whose metatable Lua
-- code may give a `__gc` (see 4.). (Luau's goes too: one rule.)
if rawget(G, "newproxy") ~= nil then G.newproxy = unavailable("newproxy") end

-- 2. `require`: only what is already loaded, as read-only views.
local loaded = {}
local package = rawget(G, "package")
if type(package) == "table" and type(package.loaded) == "table" then
    for name, m in pairs(package.loaded) do
        if name ~= "_G" then
            loaded[name] = (type(m) == "table") and freeze(name, m) or m
        end
    end
end
G.package = unavailable_table("package")
loaded.io, loaded.debug, loaded.package = G.io, G.debug, G.package
G.require = function(name)
    local m = loaded[name]
    if m == nil then
        error("require('" .. tostring(name) .. "') is not available in the sandbox: "
            .. "only modules loaded by init can be required", 2)
    end
    return m
end

-- 3. The collector stays on and tuned as the host set it.
local collectgarbage = collectgarbage
local allowed = { collect = true, count = true, step = true, isrunning = true }
G.collectgarbage = function(opt, ...)
    if opt == nil or allowed[opt] then return collectgarbage(opt, ...) end
    error("collectgarbage('" .. tostring(opt) .. "') is not available in the sandbox", 2)
end

-- 4. No finalizers.
G.setmetatable = function(t, mt)
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
        error("__gc metamethods are not available in the sandbox", 2)
    end
    return setmetatable(t, mt)
end

-- LuaJIT: the JIT stays off (compiled traces never reach the hook).
local jit = rawget(G, "jit")
if type(jit) == "table" then
    for _, k in ipairs({ "on", "opt", "attach" }) do
        if jit[k] ~= nil then jit[k] = unavailable("jit." .. k) end
    end
end

-- 5. Read-only library tables.
for _, name in ipairs({ "string", "table", "math", "utf8", "coroutine", "os", "bit32", "bit", "jit" }) do
    local t = rawget(G, name)
    if type(t) == "table" then
        local view = loaded[name] or freeze(name, t)
        loaded[name] = view
        rawset(G, name, view)
    end
end
-- Lua 5.1, LuaJIT and Luau ignore `__pairs`, and their `ipairs` reads raw:
-- iterating a view iterates its table. Asked of the VM, not of `_VERSION`
-- (Luau's is "Luau 0.740", LuaJIT's "Lua 5.1" whatever its compat options).
local function iterates_views()
    local through_pairs, through_ipairs = false, false
    for _ in pairs(setmetatable({}, { __pairs = function() return next, { true }, nil end })) do
        through_pairs = true
    end
    for _ in ipairs(setmetatable({}, { __index = { true } })) do
        through_ipairs = true
    end
    return through_pairs and through_ipairs
end
if not iterates_views() then
    local pairs, ipairs = pairs, ipairs
    G.pairs = function(t)
        local shown = frozen[t]
        if shown then return next, shown, nil end
        return pairs(t)
    end
    G.ipairs = function(t)
        return ipairs(frozen[t] or t)
    end
end
getmetatable("").__metatable = false
G.rawset = function(t, k, v)
    if frozen[t] then
        error("cannot rawset a library table: read-only in the sandbox", 2)
    end
    return rawset(t, k, v)
end
"#;
