local ERR, GO, CALL, INDEX, find_rs, match_rs, gmatch_rs, gsub_rs, error = ...
-- Always tail-called, so that level 2 is the caller of the string
-- function, whose position a C library error also carries.
-- A level comes with the message only for the memory error (0: raised
-- as is, which Lua turns into a memory error).
local function check(...)
    if ... == ERR then
        local _, msg, level = ...
        error(msg, level or 2)
    end
    return ...
end
local function find(...) return check(find_rs(...)) end
local function match(...) return check(match_rs(...)) end
local function gmatch(...)
    local it, msg, level = gmatch_rs(...)
    if it == ERR then error(msg, level or 2) end
    return function() return check(it()) end
end
-- gsub with a function or a table: step returns CALL or INDEX and what to
-- call or index with, takes the result, and returns the final result at
-- the end. Tail calls throughout: the stack stays flat, and check's
-- level 2 is still gsub's caller.
local function go(step, repl, tag, ...)
    if tag == CALL then return go(step, repl, step((repl(...)))) end
    if tag == INDEX then return go(step, repl, step((repl[(...)]))) end
    return check(tag, ...)
end
local function gsub(...)
    local a, b, c = gsub_rs(...)
    if a == GO then return go(b, c, b()) end
    if a == ERR then error(b, c or 2) end
    return a, b
end
return find, match, gmatch, gsub
-- (The Lua side of the budgeted string functions, see mod.rs; this note
-- is last so that line numbers match the chunk's.)
