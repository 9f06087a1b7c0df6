-- The sandbox (see mod.rs). Runs once per VM, after `init`.
-- `earlier`: functions the crate replaced before (Lua's pattern functions,
-- on 5.4 and 5.5), each with its replacement.
local max_source, earlier, hidden_tail_calls, luau = ...
local G = _G
local tonumber = tonumber
local error, type, tostring, ipairs, pairs, next, select = error, type, tostring, ipairs, pairs, next, select
local rawget, rawset, rawequal, setmetatable, getmetatable = rawget, rawset, rawequal, setmetatable, getmetatable
local rawlen = rawget(G, "rawlen")
local math = rawget(G, "math") or {} -- the host may not open it (`std_libs`)
local maxinteger = math.maxinteger or 2 ^ 53
local tointeger = math.tointeger or function(x)
    if type(x) == "number" and x == x - x % 1 then return x end
end

local pcall = pcall
-- Compiles our own source text: `loadstring` where there is one (5.1's
-- `load` takes a reader only; Luau has no `load`), else `load`.
local load, loadstring = rawget(G, "load"), rawget(G, "loadstring")
local function load_text(source, name)
    return (loadstring or load)(source, name)
end
local string_lib = rawget(G, "string")
local sub, byte = string_lib and string_lib.sub, string_lib and string_lib.byte

-- Every function the sandbox replaces, with its replacement (filled at the
-- end, from `seen`). `init` may have shared Lua's own under other names
-- (`api = { compile = load }`): a view hands out the replacement instead,
-- as the globals do, so no shared table leads past the sandbox's rules.
local replaced = {}
if type(earlier) == "table" then
    for f, ours in next, earlier do replaced[f] = ours end
end
-- Where each function stood before the sandbox ran: {table, key, function}.
local seen = {}
do
    local function note(t)
        for k, f in next, t do
            if type(f) == "function" then seen[#seen + 1] = { t, k, f } end
        end
    end
    note(G)
    for _, name in ipairs({ "string", "table", "math", "utf8", "coroutine", "os", "bit32", "bit", "buffer", "vector", "integer" }) do
        local t = rawget(G, name)
        if type(t) == "table" then note(t) end
    end
end
-- Replacements that only refuse: not handed out for what `init` shared
-- on purpose under another name.
local stubs = setmetatable({}, { __mode = "k" })

-- Real tables the sandbox takes away (`io`, `debug`, `package` and what it
-- holds), each with what request code gets instead (filled where each is
-- replaced): `init` may keep them elsewhere (`app.modules =
-- package.loaded`), and a view hands out the replacement, as for `G`.
local instead = {}
local real_package = rawget(G, "package")
local real_libraries = { io = rawget(G, "io"), debug = rawget(G, "debug") }

-- ===== Errors as Lua's C functions raise them =====
-- A replacement calls Lua's C function through `pcall` and an inner Lua
-- function named as the library names it: an error the C function raises
-- then carries the inner function's position ("mlua-isle sandbox:N: "),
-- which `placed` replaces by our caller's, and names the function as
-- Lua's would. Errors raised further in (a comparator, a metamethod) keep
-- their own position and pass unchanged.
local OURS = "mlua-isle sandbox:"
-- The level of a replacement's caller, seen from a function the
-- replacement tail-calls: 2 where that leaves no frame (5.2 on), 3 where
-- it leaves a frame (Luau makes no tail calls) or a "(tail call)" level
-- (5.1, LuaJIT). Asked of the VM: the level that places the error on
-- line 4, the caller's.
local CALLER = 2
for _, level in ipairs({ 2, 3 }) do
    local _, e = load_text("local level = ...\n"
        .. "local function placed() error('x', level) end\n"
        .. "local function replacement() return placed() end\n"
        .. "local function caller() replacement() end\n"
        .. "return pcall(caller)", "=probe")(level)
    if e == "probe:4: x" then CALLER = level break end
end
local function placed(ok, ...)
    if ok then return ... end
    local e = ...
    if type(e) == "string" and sub and sub(e, 1, #OURS) == OURS then
        local i = #OURS + 1
        while true do
            local b = byte(e, i)
            if b and b >= 48 and b <= 57 then i = i + 1 else break end
        end
        -- Tail-called by the replacement: level 2 is its caller (Luau
        -- makes no tail calls: there the replacement's frame is level 2).
        if sub(e, i, i + 1) == ": " then error(sub(e, i + 2), CALLER) end
    end
    error(e, 0)
end
-- `f` called as Lua code calls the library function `name`.
-- (Not a tail call: a Lua function called so would leave no frame of
-- ours, and the error it places at its caller would lose its position.)
local function pass(...) return ... end
local function named(name, f)
    return load_text("local " .. name .. ", pass = ... return function(...) return pass("
        .. name .. "(...)) end", "=mlua-isle sandbox")(f, pass)
end

local function unavailable(name)
    local stub = function()
        error(name .. " is not available in the sandbox", 2)
    end
    stubs[stub] = true
    return stub
end

-- ===== Read-only views =====
-- Request code never holds a table it may not write: it holds a view, an
-- empty table whose metatable reads through to the table it shows and
-- refuses every write. Whatever a view hands out (fields, keys, iteration)
-- is again a view when it is a table, so no path leads to a real table.

-- Tables request code may not write: views, and the unavailable tables.
local locked = setmetatable({}, { __mode = "k" })
-- View -> the table it shows.
local shown = setmetatable({}, { __mode = "k" })
-- Table -> its view (one per table, so `t.a == t.a`). On Lua 5.1 and
-- LuaJIT, which have no ephemerons, a view lives as long as its table.
local views = setmetatable({}, { __mode = "k" })
-- View -> its iterator; view -> its name and why it is read-only.
local iters = setmetatable({}, { __mode = "k" })
local names = setmetatable({}, { __mode = "k" })
local whys = setmetatable({}, { __mode = "k" })

-- What sessions read through (filled at the end, see there). Every path a
-- view hands out that leads to the globals themselves (a table `init`
-- keeps them in, a module whose metatable reads through to them) leads
-- here instead: to what sessions read, read-only.
local base = {}

local LIBRARY = "library tables are read-only in the sandbox"
local SHARED = "tables shared by init are read-only in the sandbox"

-- Operators a view forwards to its table's metatable (with the view as the
-- operand): the view behaves as its table does, but stays a view.
local FORWARDED = {
    "__call", "__tostring", "__name", "__concat", "__eq", "__lt", "__le", "__unm",
    "__add", "__sub", "__mul", "__div", "__mod", "__pow", "__idiv",
    "__band", "__bor", "__bxor", "__shl", "__shr", "__bnot",
}

local function field(name, k)
    if type(k) == "string" then return name .. "." .. k end
    if type(k) == "number" then return name .. "[" .. tostring(k) .. "]" end
    return name .. "[?]"
end

local view

-- What request code gets for `x`, found at `name`.`k`.
local function out(x, name, k, why)
    if type(x) == "table" and locked[x] == nil then
        return view(x, field(name, k), why)
    end
    if type(x) == "function" then return replaced[x] or x end
    return x
end

-- The key `k` request code gave, as the shown table knows it.
local function key(k)
    local t = shown[k]
    if t ~= nil then return t end
    return k
end

-- The view of `t` (created on first use), named `name` in messages.
-- `fast`: `t` holds no table and has no metatable (a library), so reads go
-- straight to it, at table speed.
view = function(t, name, why, fast)
    if rawequal(t, G) then
        -- The shared globals, kept somewhere by `init`: what unkeyed work
        -- writes there must not reach sessions, nor sessions write it.
        t, name, why, fast = base, "_G", SHARED, nil
    end
    local replacement = instead[t]
    if replacement ~= nil then return replacement end
    local v = views[t]
    if v then return v end
    v = {}
    local function iter(_, k)
        local nk, nx = next(t, key(k))
        return out(nk, name, nil, why), out(nx, name, nk, why)
    end
    -- A table reading through to the globals (Lua 5.1's
    -- `module(name, package.seeall)`) reads through to `base` instead.
    local read = t
    local tmt = getmetatable(t)
    if type(tmt) == "table" and rawequal(rawget(tmt, "__index"), G) then
        read = setmetatable({}, { __index = function(_, k)
            local x = rawget(t, k)
            if x == nil then x = base[k] end
            return x
        end })
    end
    local mt = {
        __index = fast and t or function(_, k)
            local x = read[key(k)]
            if type(x) == "table" and locked[x] == nil then
                return view(x, field(name, k), why)
            end
            if type(x) == "function" then return replaced[x] or x end
            return x
        end,
        __newindex = function(_, k)
            error("cannot set " .. field(name, k) .. ": " .. why, 2)
        end,
        __pairs = function(self) return iter, self, nil end,
        __iter = function(self) return iter, self, nil end, -- Luau's `for k, v in view`
        __len = function() return #t end,
        __metatable = false,
    }
    if type(tmt) == "table" then
        for _, e in ipairs(FORWARDED) do
            local h = rawget(tmt, e)
            if h ~= nil then mt[e] = h end
        end
    end
    setmetatable(v, mt)
    views[t], shown[v], locked[v], iters[v], names[v], whys[v] = v, t, true, iter, name, why
    return v
end

local function holds_tables(t)
    for _, x in next, t do
        if type(x) == "table" then return true end
    end
    return false
end

local function library_view(name, t)
    return view(t, name, LIBRARY, getmetatable(t) == nil and not holds_tables(t))
end

-- The length of `t` as its owner sees it (5.1 and LuaJIT ignore a table's
-- `__len`: `#view` is 0 there, but not for the functions below).
local function len(t)
    local real = shown[t]
    if real ~= nil then return #real end
    return #t
end

-- ===== 1. Dangerous functions =====
local os = rawget(G, "os")
if type(os) == "table" then
    for _, k in ipairs({ "exit", "execute", "remove", "rename", "getenv", "tmpname", "setlocale" }) do
        if os[k] ~= nil then os[k] = unavailable("os." .. k) end
    end
end

-- A table every field of which is a function saying `prefix.field` is
-- unavailable.
local function unavailable_table(prefix)
    local t = setmetatable({}, {
        __index = function(_, k) return unavailable(prefix .. "." .. tostring(k)) end,
        __newindex = function() error(prefix .. " is not available in the sandbox", 2) end,
        __metatable = false,
    })
    locked[t], names[t], whys[t] = true, prefix, "not available in the sandbox"
    return t
end
G.io = unavailable_table("io")
G.debug = unavailable_table("debug")
for name, real in next, real_libraries do
    if type(real) == "table" then instead[real] = G[name] end
end
G.loadfile = unavailable("loadfile")
G.dofile = unavailable("dofile")
-- Lua 5.1, LuaJIT: `newproxy(true)` makes a userdata whose metatable Lua
-- code may give a `__gc` (see 4.). (Luau's goes too: one rule.)
if rawget(G, "newproxy") ~= nil then G.newproxy = unavailable("newproxy") end
-- Lua 5.1, LuaJIT: `module(name, ...)` finds `name` in the registry's
-- `_LOADED` (the real `package.loaded`, holding the real `io`, `debug`,
-- `package` and `_G`), makes it the caller's environment and hands it to
-- each further argument.
if rawget(G, "module") ~= nil then G.module = unavailable("module") end
-- `math.random`'s generator is the VM's (on Lua 5.1-5.3, C's, the
-- process's): one tenant's seed would fix every other's numbers.
do
    local math_t = rawget(G, "math")
    if type(math_t) == "table" and math_t.randomseed ~= nil then
        math_t.randomseed = unavailable("math.randomseed")
    end
end

-- ===== 2. The collector stays on and tuned as the host set it =====
-- Options that stop or retune it (of every backend); any other goes to
-- Lua's, which refuses what it does not know with its own message.
local collectgarbage = named("collectgarbage", collectgarbage)
local refused_gc = { stop = true, restart = true, setpause = true, setstepmul = true,
    incremental = true, generational = true, param = true }
G.collectgarbage = function(...)
    local opt = ...
    if type(opt) == "string" and refused_gc[opt] then
        error("collectgarbage('" .. opt .. "') is not available in the sandbox", 2)
    end
    return placed(pcall(collectgarbage, ...))
end

-- ===== 3. No finalizers, and no metatable on the shared globals =====
-- A metatable unkeyed work put on the globals would run its code inside
-- the host's own writes to them (`pool.reload`'s `f`), and see (and keep)
-- the tables the host puts there, which sessions then read.
local setmetatable_c = named("setmetatable", setmetatable)
G.setmetatable = function(...)
    local t, mt = ...
    if rawequal(t, G) then
        error("setmetatable: the shared globals take no metatable in the sandbox", 2)
    end
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
        error("__gc metamethods are not available in the sandbox", 2)
    end
    return placed(pcall(setmetatable_c, ...))
end
-- One `init` put there is out of reach too (editing it would do the same).
local getmetatable_c = named("getmetatable", getmetatable)
G.getmetatable = function(...)
    if rawequal((...), G) then return nil end
    return placed(pcall(getmetatable_c, ...))
end

-- LuaJIT: the JIT stays off (compiled traces never reach the hook).
local jit = rawget(G, "jit")
if type(jit) == "table" then
    for _, k in ipairs({ "on", "opt", "attach" }) do
        if jit[k] ~= nil then jit[k] = unavailable("jit." .. k) end
    end
end

-- ===== 4. Bounded C functions, and `table.*` on views =====
-- C loops no hook can stop: where a range is large, or a table has a
-- metatable (whose `__len` can say anything), these loop in Lua instead.
local BIG = 65536
local string = rawget(G, "string")
if type(string) == "table" then
    local rep = string.rep
    local rep_c = named("rep", rep)
    -- `string.rep('', 1e15)` copies nothing 1e15 times.
    string.rep = function(...)
        local s, n, sep = ...
        if s == "" and (sep == nil or sep == "") and type(n) == "number" then
            return rep("", 0)
        end
        return placed(pcall(rep_c, ...))
    end

    -- Luau searches a plain needle (`plain`, or no magic characters) in
    -- C, comparing it at every place: a 1 MiB needle in 4 MiB takes
    -- minutes with no interrupt. Its matcher calls the interrupt at every
    -- step: a long needle, escaped and captured, goes there instead (the
    -- same places, found the same way). `split` with a long separator
    -- searches the same way.
    if luau and string.find and string.gsub and string.split then
        local find, gsub, split = string.find, string.gsub, string.split
        local find_c, split_c = named("find", find), named("split", split)
        local LONG = 64
        -- `p` as a pattern matching it literally, captured (so that it has
        -- a special character, and goes to the matcher).
        local function literal(p)
            return "(" .. gsub(p, "[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0") .. ")"
        end
        -- Luau's test for a plain needle (its `SPECIALS`).
        local function magic(p)
            return find(p, "[%^%$%*%+%?%.%(%[%%%-]") ~= nil
        end
        string.find = function(...)
            local s, p, init, plain = ...
            if type(s) == "string" and type(p) == "string" and #p > LONG
                and (plain or not magic(p)) then
                local a, b = find(s, literal(p), init)
                return a, b
            end
            return placed(pcall(find_c, ...))
        end
        string.split = function(...)
            local s, sep = ...
            if type(s) == "string" and type(sep) == "string" and #sep > LONG then
                local out, i, pattern = {}, 1, literal(sep)
                while true do
                    local a, b = find(s, pattern, i)
                    if not a then
                        out[#out + 1] = sub(s, i)
                        return out
                    end
                    out[#out + 1] = sub(s, i, a - 1)
                    i = b + 1
                end
            end
            return placed(pcall(split_c, ...))
        end
    end
end

local tbl = rawget(G, "table")
if type(tbl) == "table" then
    local concat, unpack, sort, move = tbl.concat, tbl.unpack or rawget(G, "unpack"), tbl.sort, tbl.move
    local insert, remove = tbl.insert, tbl.remove
    local concat_c, sort_c = named("concat", concat), named("sort", sort)
    local insert_c, remove_c = named("insert", insert), named("remove", remove)
    local unpack_c = unpack and named("unpack", unpack)
    local move_c = move and named("move", move)

    -- True if `t` must be handled in Lua: a view, or a table whose
    -- metatable may make each step cost anything.
    local function slow(t)
        return type(t) == "table" and (locked[t] ~= nil or getmetatable(t) ~= nil)
    end
    -- True if `insert` or `remove` may shift more than a few thousand
    -- elements, which C does where no hook reaches: a plain table's border
    -- can be anywhere (one with entries at 1, 2, 4, ... 2^62 has it near
    -- 2^62). Those shifts run in Lua, under the request's limits.
    local function long(t)
        return type(t) == "table" and #t > 4096
    end
    local function refuse(fname, t)
        error("table." .. fname .. " cannot change " .. (names[t] or "this table") .. ": "
            .. (whys[t] or SHARED), 3)
    end
    local function int_like(x)
        local n = tonumber(x)
        return n ~= nil and tointeger(n) ~= nil
    end
    local function integer(x, arg, fname, default)
        if x == nil and default ~= nil then return default end
        local i = tointeger(x)
        if i == nil then
            error("bad argument #" .. arg .. " to '" .. fname .. "' (number has no integer representation)", 3)
        end
        return i
    end

    tbl.insert = function(...)
        local t = ...
        if locked[t] then refuse("insert", t) end
        if not slow(t) and not long(t) then return placed(pcall(insert_c, ...)) end
        local nargs = select("#", ...) - 1 -- after `t`
        local e = len(t) + 1
        if nargs == 1 then
            t[e] = (select(2, ...))
            return
        elseif nargs ~= 2 then
            error("wrong number of arguments to 'insert'", 2)
        end
        local _, pos, x = ...
        pos = integer(pos, 2, "insert")
        if pos < 1 or pos > e then
            error("bad argument #2 to 'insert' (position out of bounds)", 2)
        end
        for i = e, pos + 1, -1 do t[i] = t[i - 1] end
        t[pos] = x
    end

    tbl.remove = function(...)
        local t = ...
        if locked[t] then refuse("remove", t) end
        if not slow(t) and not long(t) then return placed(pcall(remove_c, ...)) end
        local size = len(t)
        local pos = integer((select(2, ...)), 2, "remove", size)
        if pos ~= size and (pos < 1 or pos > size + 1) then
            error("bad argument #2 to 'remove' (position out of bounds)", 2)
        end
        local x = t[pos]
        while pos < size do
            t[pos] = t[pos + 1]
            pos = pos + 1
        end
        t[pos] = nil
        return x
    end

    tbl.sort = function(...)
        local t, cmp = ...
        if locked[t] then refuse("sort", t) end
        if not slow(t) then return placed(pcall(sort_c, ...)) end
        local n = len(t)
        if n >= 0x7fffffff then error("bad argument #1 to 'sort' (array too big)", 2) end
        local a = {}
        for i = 1, n do a[i] = t[i] end
        sort(a, cmp)
        for i = 1, n do t[i] = a[i] end
    end

    tbl.concat = function(...)
        local t, sep, i, j = ...
        if not slow(t) then return placed(pcall(concat_c, ...)) end
        sep = sep or ""
        i = integer(i, 3, "concat", 1)
        j = integer(j, 4, "concat", len(t))
        local parts, n = {}, 0
        for k = i, j do
            local x = t[k]
            local tx = type(x)
            if tx ~= "string" and tx ~= "number" then
                error("invalid value (" .. tx .. ") at index " .. tostring(k)
                    .. " in table for 'concat'", 2)
            end
            n = n + 1
            parts[n] = x
        end
        return concat(parts, sep)
    end

    local function unpack_lua(...)
        local t, i, j = ...
        if not slow(t) then return placed(pcall(unpack_c, ...)) end
        i = integer(i, 2, "unpack", 1)
        j = integer(j, 3, "unpack", len(t))
        if i > j then return end
        if j - i >= 1000000 or j - i < 0 then error("too many results to unpack", 2) end
        local a, n = {}, 0
        for k = i, j do
            n = n + 1
            a[n] = t[k]
        end
        return unpack(a, 1, n)
    end
    if tbl.unpack then tbl.unpack = unpack_lua end
    if rawget(G, "unpack") then G.unpack = unpack_lua end

    if move then
        tbl.move = function(...)
            local a1, f, e, t, a2 = ...
            local dest = a2 == nil and a1 or a2
            if locked[dest] then refuse("move", dest) end
            -- Lua checks the three integers before it moves anything: one
            -- it refuses gets its own message.
            if not (int_like(f) and int_like(e) and int_like(t)) then
                return placed(pcall(move_c, ...))
            end
            f, e, t = integer(f, 2, "move"), integer(e, 3, "move"), integer(t, 4, "move")
            if not (slow(a1) or slow(dest) or e - f > BIG) then return placed(pcall(move_c, ...)) end
            if e >= f then
                if not (f > 0 or e < maxinteger + f) then
                    error("bad argument #3 to 'move' (too many elements to move)", 2)
                end
                local n = e - f
                if t > maxinteger - n then
                    error("bad argument #4 to 'move' (destination wrap around)", 2)
                end
                if t > e or t <= f or not rawequal(a1, dest) then
                    for k = 0, n do dest[t + k] = a1[f + k] end
                else
                    for k = n, 0, -1 do dest[t + k] = a1[f + k] end
                end
            end
            return dest
        end
    end

    -- Luau's
    if tbl.find then
        local find = tbl.find
        tbl.find = function(t, x, init)
            if not slow(t) then return find(t, x, init) end
            for k = integer(init, 3, "find", 1), len(t) do
                if t[k] == x then return k end
            end
            return nil
        end
    end
    if tbl.getn then
        local getn = tbl.getn
        tbl.getn = function(t)
            if locked[t] then return len(t) end
            return getn(t)
        end
    end

    -- Every other function of the library refuses the locked tables (they
    -- write raw, or read raw and would see an empty view).
    local done = { insert = true, remove = true, sort = true, concat = true, unpack = true,
        move = true, find = true, getn = true, pack = true, create = true, isfrozen = true }
    for fname, f in pairs(tbl) do
        if not done[fname] and type(f) == "function" then
            local f_c = named(fname, f)
            tbl[fname] = function(...)
                local t = ...
                if locked[t] then refuse(fname, t) end
                -- Luau: frozen globals would refuse the host's own writes
                -- (`pool.reload`).
                if fname == "freeze" and rawequal(t, G) then
                    error("table.freeze cannot freeze the shared globals", 2)
                end
                return placed(pcall(f_c, ...))
            end
        end
    end
end

-- ===== 5. `load`: sources of a bounded size =====
-- Compiling is C work no hook can stop, and its cost grows with the source.
local function too_large(n)
    return "chunk too large for the sandbox (" .. tostring(n) .. " bytes; the limit is "
        .. tostring(max_source) .. ")"
end
local function bounded_reader(read)
    local total = 0
    return function()
        local piece = read()
        -- Lua takes numbers as pieces too (as their text).
        if type(piece) == "number" then piece = tostring(piece) end
        if type(piece) == "string" then
            total = total + #piece
            if total > max_source then error(too_large(total), 0) end
        end
        return piece
    end
end
-- The VM's `load` and `loadstring` default to the shared globals. Session
-- code reaches them through what `init` shares (a table holding `load`),
-- and during a session's request they must never load into the shared
-- globals: by default a chunk gets the environment of the code that called
-- (its nearest Lua caller, found as the session's own `load` finds it);
-- when that is the shared globals, a view, or nothing (`load` as a
-- coroutine's body), they refuse. `set_session_finder` (from
-- `pool/session_env.lua`, once the VM has sessions) gives the finder: the
-- caller's environment in a session's request (`false`: no Lua caller),
-- `nil` in unkeyed work.
local session_of_caller = function() return nil end
-- Whether a table is a session's environment (none before the first).
local is_session_env = function() return false end
local function set_session_finder(f, is_session)
    session_of_caller, is_session_env = f, is_session
end
local setfenv_c = rawget(G, "setfenv")
-- The environment a chunk loaded now without one gets: `nil` for the
-- default (the shared globals: unkeyed work).
local function caller_session(with_env, env)
    if setfenv_c then
        -- `load` takes no environment (5.1), or a table only (LuaJIT):
        -- a table given is set on the chunk (`into`), as 5.2's `load` would.
        if type(env) == "table" then return env end
    elseif with_env then
        return nil
    end
    local own = session_of_caller()
    if own == nil then return nil end
    if own == false or rawequal(own, G) or rawequal(own, base) or locked[own] then
        error("load: called in a session's request by a function of the shared globals, "
            .. "through a tail call, or as a coroutine's body; give it an environment "
            .. "(or call it as `local f = load(...)`, not `return load(...)`)", 3)
    end
    return own
end
-- Chunk names of the crate's own Lua ("=mlua-isle ..."), which `load`
-- (finding its caller) passes over on the call stack: not for tenants.
-- Exactly the prefix `pool/envs.rs` (`caller_env`) passes over.
local function crate_named(name)
    if type(name) ~= "string" then return false end
    -- Without the string library, no name can be checked: none is taken.
    if not sub then return true end
    return sub(name, 1, 10) == "=mlua-isle"
end
local function crate_name(name)
    return "chunk name " .. name .. " is the crate's own (names starting with "
        .. "'mlua-isle' are not available in the sandbox)"
end
-- A chunk loaded for session code into its environment `env`. (Rare, so
-- an argument error here is placed at this frame, not the caller's.)
local function into(env, f, e)
    if f and setfenv_c then setfenv_c(f, env) end
    return f, e
end
if load then
    local load_c = named("load", load)
    G.load = function(...)
        local chunk, name, mode, env = ...
        if crate_named(name) then return nil, crate_name(name) end
        local session = caller_session(select("#", ...) >= 4, env)
        if type(chunk) == "string" then
            if #chunk > max_source then return nil, too_large(#chunk) end
        elseif type(chunk) == "function" then
            if session then
                return into(session, placed(pcall(load_c, bounded_reader(chunk), name, mode, session)))
            end
            return placed(pcall(load_c, bounded_reader(chunk), select(2, ...)))
        end
        if session then
            return into(session, placed(pcall(load_c, chunk, name, mode, session)))
        end
        return placed(pcall(load_c, ...))
    end
end
if loadstring then
    local loadstring_c = named("loadstring", loadstring)
    G.loadstring = function(...)
        local s, name = ...
        if type(s) == "string" and #s > max_source then return nil, too_large(#s) end
        if crate_named(name) then return nil, crate_name(name) end
        local session = caller_session(false)
        if session then
            -- 5.2's compat `loadstring` is `load`: it takes the environment.
            return into(session, placed(pcall(loadstring_c, s, name, nil, session)))
        end
        return placed(pcall(loadstring_c, ...))
    end
end

-- ===== 6. `require`: only what is already loaded, as views =====
local LIBRARIES = { "string", "table", "math", "utf8", "coroutine", "os", "bit32", "bit", "jit", "buffer", "vector", "integer" }
local is_library = {}
for _, name in ipairs(LIBRARIES) do is_library[name] = true end
local loaded = {}
local package = rawget(G, "package")
if type(package) == "table" and type(package.loaded) == "table" then
    for name, m in pairs(package.loaded) do
        if type(name) == "string" and name ~= "_G" then
            if type(m) ~= "table" then
                loaded[name] = m
            elseif is_library[name] then
                loaded[name] = library_view(name, m)
            else
                loaded[name] = view(m, name, SHARED)
            end
        end
    end
end
G.package = unavailable_table("package")
loaded.io, loaded.debug, loaded.package = G.io, G.debug, G.package
if type(real_package) == "table" then
    instead[real_package] = G.package
    for _, k in ipairs({ "loaded", "preload", "loaders", "searchers" }) do
        local t = rawget(real_package, k)
        if type(t) == "table" and instead[t] == nil then
            instead[t] = k == "loaded" and view(loaded, "package.loaded", SHARED)
                or unavailable_table("package." .. k)
        end
    end
end
G.require = function(...)
    local name = ...
    if type(name) ~= "string" and type(name) ~= "number" then
        local got = select("#", ...) == 0 and "no value" or type(name)
        error("bad argument #1 to 'require' (string expected, got " .. got .. ")", 2)
    end
    local m = loaded[name]
    if m == nil then
        error("require('" .. tostring(name) .. "') is not available in the sandbox: "
            .. "only modules loaded by init can be required", 2)
    end
    return m
end

-- ===== 7. Read-only library tables and shared tables =====
for _, name in ipairs(LIBRARIES) do
    local t = rawget(G, name)
    if type(t) == "table" and locked[t] == nil then
        local v = library_view(name, t)
        rawset(G, name, v)
        if loaded[name] == nil then loaded[name] = v end -- Luau has no `package`
    end
end
-- Every other table `init` put in the globals: a view, for unkeyed work
-- and (reading through the globals) every session.
do
    local shared = {}
    for name, x in next, G do
        if type(x) == "table" and locked[x] == nil and not rawequal(x, G) then
            shared[name] = x
        end
    end
    for name, x in next, shared do
        rawset(G, name, view(x, type(name) == "string" and name or "(global)", SHARED))
    end
end

-- Lua 5.1, LuaJIT and Luau ignore `__pairs`, and their `ipairs` reads raw.
-- Asked of the VM, not of `_VERSION` (Luau's is "Luau 0.740", LuaJIT's
-- "Lua 5.1" whatever its compat options).
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
    local pairs_c, ipairs_c = named("pairs", pairs), named("ipairs", ipairs)
    G.pairs = function(...)
        local t = ...
        local iter = iters[t]
        if iter then return iter, t, nil end
        return placed(pcall(pairs_c, ...))
    end
    local function ipairs_view(v, i)
        i = i + 1
        local x = v[i]
        if x ~= nil then return i, x end
    end
    G.ipairs = function(...)
        if iters[(...)] then return ipairs_view, (...), 0 end
        return placed(pcall(ipairs_c, ...))
    end
end
-- `next(view)` iterates what the view shows.
local next_c = named("next", next)
G.next = function(...)
    local t, k = ...
    local iter = iters[t]
    if iter then return iter(t, k) end
    return placed(pcall(next_c, ...))
end
local rawget_c = named("rawget", rawget)
G.rawget = function(...)
    local t, k = ...
    local real = shown[t]
    if real ~= nil and select("#", ...) >= 2 then
        return out(rawget(real, key(k)), names[t], k, whys[t])
    end
    return placed(pcall(rawget_c, ...))
end
if rawlen then
    local rawlen_c = named("rawlen", rawlen)
    G.rawlen = function(...)
        local real = shown[(...)]
        if real ~= nil then return rawlen(real) end
        return placed(pcall(rawlen_c, ...))
    end
end
local rawset_c = named("rawset", rawset)
G.rawset = function(...)
    local t, k = ...
    if locked[t] then
        error("cannot set " .. field(names[t] or "?", k) .. ": " .. (whys[t] or SHARED), 2)
    end
    return placed(pcall(rawset_c, ...))
end

-- Lua 5.1, LuaJIT, Luau: functions carry their environment. The shared
-- globals are not handed to session code (`getfenv(0)`, or the environment
-- of a function `init` defined), and no environment but a request's own
-- functions' can be replaced (`setfenv(0, t)` would change what every later
-- chunk of the VM sees; `setfenv(api.f, t)` what every tenant's `api.f` does).
local getfenv, setfenv = rawget(G, "getfenv"), rawget(G, "setfenv")
if getfenv and setfenv then
    local function level(f)
        if f == nil then return 2 end
        if type(f) == "number" and f > 0 then return f + 1 end
        return f
    end
    -- In a session's request, the only environment handed out is the
    -- caller's own (that of its nearest Lua caller, as `load` finds it),
    -- and only a function running in it may be given another: never the
    -- shared globals, one `init` made, or another tenant's (a function of
    -- the shared globals run by a session's request reaches that session's
    -- frames by level). Unkeyed work never gets a session's.
    G.getfenv = function(...)
        local f = ...
        local env = getfenv(level(f))
        local own = session_of_caller(true)
        -- Two arguments: an arithmetic metamethod or an iterator (Luau
        -- names neither, so the caller search cannot tell).
        if select("#", ...) > 1 and own ~= nil then own = false end
        if own == nil then
            if rawequal(env, G) or is_session_env(env) then
                env = getfenv(2) -- the caller's (not a tail call: level 2 must be it)
            end
            if is_session_env(env) then env = G end
            return env
        end
        if own == false or rawequal(own, G) or rawequal(own, base) or locked[own] then
            error("getfenv: not called by session code (a function of the shared globals, "
                .. "a tail call, or none, called it)", 2)
        end
        return own
    end
    G.setfenv = function(f, env)
        local target = level(f)
        local own = session_of_caller(true)
        local current = target ~= 0 and getfenv(target)
        if target == 0 or rawequal(current, G) or locked[current]
            or (own == nil and is_session_env(current))
            or (own ~= nil and not rawequal(current, own)) then
            error("setfenv: cannot change a shared environment in the sandbox", 2)
        end
        -- On LuaJIT a function of the shared globals that tail-calls
        -- `setfenv(1, t)` reaches its caller's frame unseen, and on Luau a
        -- metamethod's call looks like any: in a session's request, only
        -- functions are given environments there.
        if hidden_tail_calls and own ~= nil and type(f) ~= "function" then
            error("setfenv: only a function, not a level, in a session's request "
                .. "on LuaJIT and Luau", 2)
        end
        if type(f) == "function" then return setfenv(f, env) end
        setfenv(target, env)
        return getfenv(target)
    end
end

local string_mt = getmetatable("") -- none without the string library
if type(string_mt) == "table" then string_mt.__metatable = false end

-- What sessions read through: the globals as `init` and the sandbox left
-- them. Unkeyed work shares the VM's globals, and may rebind them; sessions
-- must not see that (nor anything unkeyed work adds).
for _, at in ipairs(seen) do
    local t, k, f = at[1], at[2], at[3]
    local now = rawget(t, k)
    if type(now) == "function" and now ~= f and not stubs[now] then replaced[f] = now end
end
-- Globals `init` set to Lua's own functions under other names.
for k, x in next, G do
    if type(x) == "function" and replaced[x] then rawset(G, k, replaced[x]) end
end
for k, x in next, G do base[k] = x end
base._G = nil
for k, x in next, base do
    if rawequal(x, G) then base[k] = view(G) end
end

-- A global the host set after the sandbox (a pool's reload): a table
-- becomes a view, as those `init` left do, and sessions read it.
local function adopt(k)
    local x = rawget(G, k)
    if type(x) == "table" and locked[x] == nil and not rawequal(x, G) then
        x = view(x, type(k) == "string" and k or "(global)", SHARED)
        rawset(G, k, x)
    end
    if rawequal(x, G) then x = view(G) end
    if type(x) == "function" and replaced[x] then
        x = replaced[x]
        rawset(G, k, x)
    end
    if k ~= "_G" then base[k] = x end
end
-- Lua's own `setfenv` for the session environments' `load` (theirs).
return base, setfenv, adopt, set_session_finder
