-- Session environments (see envs.rs): returns the function that makes one.
local globals, load, loadstring, setfenv = ...
local shared = { __index = globals }
local function in_env(env, f, ...)
    if f then setfenv(f, env) end
    return f, ...
end
return function()
    local env = {}
    local own = setmetatable({ _G = env }, shared)
    if load then
        own.load = function(chunk, name, mode, ...)
            if select('#', ...) ~= 0 then
                return load(chunk, name, mode, ...)
            elseif setfenv then
                return in_env(env, load(chunk, name, mode))
            end
            return load(chunk, name, mode, env)
        end
    end
    if loadstring and setfenv then
        own.loadstring = function(...)
            return in_env(env, loadstring(...))
        end
    end
    return setmetatable(env, { __index = own, __metatable = false })
end
