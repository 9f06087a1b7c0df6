-- Session environments (see envs.rs): returns the function that makes one.
--
-- Per session there is only the environment table: `_G` (itself) and what
-- the session writes. Everything else is the VM's, shared by its sessions:
-- the metatable (hidden: `getmetatable(_G)` is false) and, behind it, what
-- reads fall back to: `own` (the session `load` and `loadstring`) and then
-- the globals. In the sandbox, `own` is the sandbox's copy of the globals
-- itself (sessions alone read it), so a global read takes one step.
--
-- Built on a VM's first session request, when unkeyed work may have
-- rebound any global: this chunk reads none. What it calls was taken when
-- the VM started (`EnvParts`).
local globals, copy, load, loadstring, setfenv, caller_env, select, setmetatable, error, type,
      set_session_finder, in_session, has_metatable = ...
local own = copy and globals or setmetatable({}, { __index = globals })
local meta = { __index = own, __metatable = false }

-- The environment of the session whose code called `load`: that of the
-- nearest Lua function on the call stack (C functions and the crate's
-- are passed over), which must be a session's. Never the shared globals.
local function caller()
    local env, is_session = caller_env(meta)
    if env == nil then
        error("load: no session code on the call stack; give it an environment", 3)
    end
    if not is_session then
        error("load: not called by session code (a function of the shared globals, "
            .. "or none, called it); give it an environment", 3)
    end
    return env
end

-- Where functions carry their environment (`setfenv`: 5.1, LuaJIT, Luau),
-- `load` has no environment argument everywhere (5.1), and `loadstring`
-- none at all: the loaded function gets it set instead.
local function in_env(env, f, ...)
    if f then setfenv(f, env) end
    return f, ...
end
if load then
    own.load = function(chunk, name, mode, ...)
        if setfenv then
            -- `load` takes no environment here (5.1), or only a table
            -- (LuaJIT): what else it is given must not leave the chunk with
            -- the thread's environment, the shared globals.
            local env = ...
            if type(env) ~= "table" then env = caller() end
            return in_env(env, load(chunk, name, mode))
        end
        if select('#', ...) ~= 0 then
            return load(chunk, name, mode, ...)
        end
        return load(chunk, name, mode, caller())
    end
end
if loadstring and setfenv then
    own.loadstring = function(...)
        local env = caller()
        return in_env(env, loadstring(...))
    end
end

-- In the sandbox, the VM's own `load` and `loadstring` (which session code
-- may reach through what `init` shares) also load into the calling
-- session's environment.
-- During a session's request they never load into the shared globals:
-- the finder answers the caller's environment (`false` when there is no
-- Lua caller), and `nil` in unkeyed work.
if set_session_finder then
    set_session_finder(function(named)
        local env, is_session, indirect = caller_env(meta, named)
        -- Called by a metamethod or a `for` iterator (a value the caller
        -- was handed): nobody's, even in unkeyed work.
        if indirect then return false end
        -- A session's function that unkeyed work runs (a hook `init`
        -- keeps) is still that session's: never the shared globals.
        if is_session then return env end
        if not in_session() then return nil end
        -- Any other environment (the shared globals, one init gave its
        -- own functions, a view) is not this request's: refused.
        return false
    end, function(t) return has_metatable(t, meta) end)
end

return function()
    local env = {}
    env._G = env
    return setmetatable(env, meta)
end
