-- A request's coroutine body (`vm/coroutine.rs`): runs the function left in
-- `given[co]` with the request's arguments, under Lua's own `xpcall` and a
-- message handler like mlua's; returns its results, or leaves its error in
-- `failed[co]` (boxed: it may be nil) and returns nothing. Both tables are
-- keyed weakly by coroutine: what a dropped request left goes with it.
local running, xpcall, handler = ...
local given = setmetatable({}, { __mode = "k" })
local failed = setmetatable({}, { __mode = "k" })

local function finish(co, ok, ...)
    if ok then
        return ...
    end
    failed[co] = { (...) }
end

local function body(...)
    local co = running()
    local f = given[co]
    given[co] = nil
    return finish(co, xpcall(f, handler, ...))
end

return body, given, failed
