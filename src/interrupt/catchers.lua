-- Lua 5.1, LuaJIT, Luau: the catchers in Lua (see catchers.rs); one line, so positions stay.
local check, stopping, pcall, xpcall, resume, load, loadfile, binary_ok, tracked,
      loadstring, reader_only, is_binary, allows_text = ...
local type, error, select = type, error, select
-- Lua's own pcall and xpcall (yieldable; 5.1: ours), with the error value
-- checked: a Rust panic or a pending interruption is raised again.
local function after(ok, ...)
    if not ok then check((...)) end
    return ok, ...
end
-- Lua's argument errors are raised here, placed at our caller, as
-- Lua's functions place them.
_G.pcall = function(...)
    local f = ...
    if f == nil and select("#", ...) == 0 then
        error("bad argument #1 to 'pcall' (value expected)", 2)
    end
    return after(pcall(...))
end
local function after_x(seen, ok, ...)
    if not ok then check(seen.e, (...)) end
    return ok, ...
end
-- The message handler's frame is in a chunk named for it: `load`'s search
-- for its caller (`pool/envs.rs`) stops there, since what a handler calls
-- runs at the error's level, above whoever raised it. The user's handler
-- is not tail-called, so the frame stays on the stack.
local handler_for = (loadstring or load)([[
    local stopping = ...
    return function(seen, handler)
        return function(e)
            seen.e = e
            -- Raised by the hook, this runs with hooks disabled: never
            -- hand it to user code that could loop.
            if stopping() then return e end
            return (handler(e))
        end
    end]], "=mlua-isle handler")(stopping)
local function protected(f, handler, ...)
    local seen = {}
    return after_x(seen, xpcall(f, handler_for(seen, handler), ...))
end
-- Lua 5.1's xpcall is ours (`interrupt/alarm/native.rs`); Luau and LuaJIT check
-- and word their arguments themselves.
_G.xpcall = protected
if not tracked and resume then
    coroutine.resume = function(...)
        -- Lua's own argument error, without this wrapper's name
        -- and position (Luau makes no tail calls).
        if type((...)) ~= "thread" then
            local _, e = pcall(resume, ...)
            error(e, 0)
        end
        return after(resume(...)) -- as for pcall
    end
end
local function after_load(f, ...)
    if f == nil then check((...)) end
    return f, ...
end
local function binary(s)
    return not binary_ok and is_binary(s)
end
local refused = "attempt to load a binary chunk (mode is 't')"
-- Lua 5.1's `load` takes a reader function only, and no mode: its
-- first piece is checked instead.
local function text_reader(read)
    local first = true
    return function()
        local piece = read()
        if first and type(piece) == "string" and piece ~= "" then
            first = false
            if binary(piece) then error(refused, 0) end
        end
        return piece
    end
end
if load then
    local function text_load(chunk, name, mode, ...)
        if not binary_ok then
            if reader_only then
                -- 5.1: no mode; the reader's first piece is checked.
                if type(chunk) == "function" then chunk = text_reader(chunk) end
            elseif mode == nil or allows_text(mode) then
                mode = "t" -- the caller's mode, narrowed to text
            elseif binary(chunk) then
                return nil, refused
            elseif type(chunk) == "function" then
                -- The caller's mode refuses text (Lua says so); the
                -- reader's first piece must not be binary either.
                chunk = text_reader(chunk)
            end
        end
        return after_load(load(chunk, name, mode, ...))
    end
    _G.load = function(...)
        local t = type((...))
        if t ~= "function" and (reader_only or (t ~= "string" and t ~= "number")) then
            local got = select("#", ...) == 0 and "no value" or t
            error("bad argument #1 to 'load' (function expected, got " .. got .. ")", 2)
        end
        return text_load(...)
    end
end
-- `loadstring` (5.1, LuaJIT, Luau): no mode argument in 5.1.
if loadstring then
    _G.loadstring = function(s, ...)
        if binary(s) then return nil, refused end
        return after_load(loadstring(s, ...))
    end
end
if loadfile then
    local function text_loadfile(file, mode, ...)
        if not binary_ok then mode = "t" end
        return after_load(loadfile(file, mode, ...))
    end
    _G.loadfile = text_loadfile
    _G.dofile = function(file)
        local f, err = text_loadfile(file)
        if not f then error(err, 2) end
        return f()
    end
end
