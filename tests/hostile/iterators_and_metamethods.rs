//! A tenant's value that *is* `load`, `getfenv` or `setfenv` (or `pcall`
//! calling one), which a victim's frame calls as a `for` iterator
//! (`__pairs`) or a metamethod (`__add`): the victim's frame did not write
//! that call, so it is no caller of theirs. Each runs under
//! `common::within`: a hang fails.

use crate::common;
use crate::tenants::{sandboxed_pool, shown as s};

const INIT_HOOKS: &str = r#"
    api = { compile = load or loadstring }
    local hooks = {}
    events = {
        on = function(f) hooks[#hooks + 1] = f end,
        fire_all = function(x) for _, h in ipairs(hooks) do h(x) end end,
    }
"#;

/// 5.4: the generic `for` calls the iterator `__pairs` returned directly
/// from the victim's frame: `load` as the iterator, with the attacker's
/// chunk as its state, is called by the victim's chunk (no attacker frame),
/// so it loads into the victim's environment. The loop's key is the loaded
/// function; the victim's body reads `ev[k]`, handing it to the attacker's
/// `__index`.
#[test]
fn pairs_iterator_is_load() {
    let r = common::within("pairs load", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let victim = pool.session("victim");
        let reg = victim.eval::<()>(
            "password = 'hunter2' events.on(function(ev) local n = 0 for k in pairs(ev) do n = n + #tostring(ev[k]) end end)",
        );
        let got = pool.session("attacker").eval::<String>(
            r#"
            local loot = {}
            local evil = setmetatable({}, {
                __pairs = function(t) return ITER, STATE, nil end,
                __index = function(t, k)
                    if type(k) == 'function' and not loot.env then
                        local ok, env = pcall(k)
                        loot.env = env
                        if type(env) == 'table' then
                            loot.pw = rawget(env, 'password')
                            rawset(env, 'password', 'owned')
                        end
                    end
                    return 'x'
                end,
            })
            local ok, e = pcall(events.fire_all, evil)
            return 'stolen=' .. tostring(loot.pw) .. ' env=' .. tostring(loot.env) .. ' err=' .. tostring(e)
            "#
            .replace("ITER", "load")
            .replace("STATE", "'return _ENV or getfenv and getfenv(1)'")
            .as_str(),
        );
        let after = victim.eval::<String>("return tostring(password)");
        (s(reg), s(got), s(after))
    });
    eprintln!("pairs load: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

/// Lua 5.1 / LuaJIT / Luau: the victim's own arithmetic (`1 + ev.count`)
/// calls the attacker's `__add`, which is the sandbox's `setfenv` itself:
/// `setfenv(1, evil)`. Its nearest Lua caller is the victim's hook, whose
/// environment is the caller's own, so the hook is given the attacker's
/// table: the victim's global writes go to the attacker, and its global
/// reads come from the attacker.
#[test]
fn arith_metamethod_is_setfenv() {
    let r = common::within("arith setfenv", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let victim = pool.session("victim");
        let reg = victim.eval::<()>(
            "password = 'hunter2' events.on(function(ev) local n = 1 + ev.count secret_copy = password end)",
        );
        let got = pool.session("attacker").eval::<String>(
            r#"
            if not setfenv then return 'no setfenv' end
            local writes = {}
            local evil
            evil = setmetatable({}, {
                __add = setfenv,
                __newindex = function(t, k, v) writes[#writes + 1] = tostring(k) .. '=' .. tostring(v) end,
                __index = function(t, k) return 'from-attacker' end,
            })
            local ok, e = pcall(events.fire_all, { count = evil })
            local ok2, e2 = pcall(events.fire_all, { count = 1 })
            return 'writes=' .. table.concat(writes, ',') .. ' err=' .. tostring(e) .. ' err2=' .. tostring(e2)
            "#,
        );
        let after = victim.eval::<String>("return tostring(secret_copy)");
        (s(reg), s(got), s(after))
    });
    eprintln!("arith setfenv: {r:?}");
    assert!(!r.1.contains("secret_copy"), "{r:?}");
}

/// Lua 5.1 / LuaJIT / Luau: an accumulator in the victim's hook
/// (`total = (total or 0) + ev.amount`). First event: `__add` is the
/// sandbox's `getfenv`, which answers the environment of its nearest Lua
/// caller (the victim's hook) whatever its argument: the victim stores its
/// own environment in `total`. Second event: `__add` is the attacker's
/// function, handed `total` (the victim's environment) as its left operand.
#[test]
fn arith_metamethod_is_getfenv_then_reads_the_sum() {
    let r = common::within("arith getfenv", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let victim = pool.session("victim");
        let reg = victim.eval::<()>(
            "password = 'hunter2' events.on(function(ev) total = (total or 0) + ev.amount end)",
        );
        let got = pool.session("attacker").eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local loot = {}
            local mt = { __add = getfenv }
            local evil = setmetatable({}, mt)
            local ok, e = pcall(events.fire_all, { amount = evil })
            mt.__add = function(a, b) loot.env = a return 0 end
            local ok2, e2 = pcall(events.fire_all, { amount = evil })
            local env = loot.env
            local pw = type(env) == 'table' and rawget(env, 'password')
            if type(env) == 'table' then rawset(env, 'password', 'owned') end
            return 'stolen=' .. tostring(pw) .. ' err=' .. tostring(e) .. ' err2=' .. tostring(e2)
            "#,
        );
        let after = victim.eval::<String>("return tostring(password)");
        (s(reg), s(got), s(after))
    });
    eprintln!("arith getfenv: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

/// 5.4: the same `__pairs` trick from unkeyed work (no session of its own).
#[test]
fn pairs_iterator_is_load_unkeyed() {
    let r = common::within("pairs load unkeyed", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let victim = pool.session("victim");
        let reg = victim.eval::<()>(
            "password = 'hunter2' events.on(function(ev) local n = 0 for k in pairs(ev) do n = n + #tostring(ev[k]) end end)",
        );
        let got = pool.eval::<String>(
            r#"
            local loot = {}
            local evil = setmetatable({}, {
                __pairs = function(t) return load, 'return _ENV', nil end,
                __index = function(t, k)
                    if type(k) == 'function' and not loot.env then
                        local ok, env = pcall(k)
                        loot.env = env
                        if type(env) == 'table' then
                            loot.pw = rawget(env, 'password')
                            rawset(env, 'password', 'owned')
                        end
                    end
                    return 'x'
                end,
            })
            local ok, e = pcall(events.fire_all, evil)
            return 'stolen=' .. tostring(loot.pw) .. ' err=' .. tostring(e)
            "#,
        );
        let after = victim.eval::<String>("return tostring(password)");
        (s(reg), s(got), s(after))
    });
    eprintln!("pairs load unkeyed: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

/// The brief's list: the attacker's own Lua callbacks, run from the
/// victim's frame (gsub replacement, sort comparator, `__close` during an
/// error, a wrapped coroutine's error, `__tostring` of the error object
/// the crate formats, `__lt` of `table.sort`), each calling `load`.
#[test]
fn attacker_callbacks_in_victim_frame_call_load() {
    let r = common::within("callbacks", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let victim = pool.session("victim");
        let reg = victim.eval::<()>(
            r#"password = 'hunter2'
            events.on(function(ev)
                if ev.kind == 'gsub' then return (ev.s:gsub('.', ev.f)) end
                if ev.kind == 'sort' then table.sort(ev.list, ev.f) return end
                if ev.kind == 'sortlt' then table.sort(ev.list) return end
                if ev.kind == 'close' then
                    pcall(function() local c <close> = ev.c error('boom') end) return
                end
                if ev.kind == 'wrap' then pcall(coroutine.wrap(ev.f)) return end
                if ev.kind == 'raise' then error(ev.err) end
            end)"#,
        );
        let attacker = pool.session("attacker");
        let got = attacker.eval::<String>(
            r#"
            local out = {}
            local function try(tag)
                local ok, f = pcall(load, 'return _ENV')
                local env = ok and type(f) == 'function' and f()
                local pw = type(env) == 'table' and rawget(env, 'password')
                out[#out + 1] = tag .. '=' .. tostring(pw or (ok and 'own' or f))
            end
            local function cb(...) try('cb') return nil end
            pcall(events.fire_all, { kind = 'gsub', s = 'ab', f = function() try('gsub') end })
            pcall(events.fire_all, { kind = 'sort', list = {3, 1, 2}, f = function(a, b) try('sort') return a < b end })
            local lt = { __lt = function(a, b) try('lt') return rawequal(a, b) end }
            pcall(events.fire_all, { kind = 'sortlt', list = { setmetatable({}, lt), setmetatable({}, lt), setmetatable({}, lt) } })
            pcall(events.fire_all, { kind = 'close', c = setmetatable({}, { __close = function() try('close') end }) })
            pcall(events.fire_all, { kind = 'wrap', f = function() try('wrap') error('x') end })
            pcall(events.fire_all, { kind = 'raise', err = setmetatable({}, { __tostring = function() try('tostring') return 'E' end }) })
            return table.concat(out, ' ')
            "#,
        );
        let raised = victim.eval::<()>("events.fire_all({ kind = 'none' })");
        let after = victim.eval::<String>("return tostring(password)");
        (s(reg), s(got), s(raised), s(after))
    });
    eprintln!("callbacks: {r:?}");
    assert!(!r.1.contains("hunter2"), "{r:?}");
}

/// 5.4: a victim that runs the handlers it is given
/// (`for _, h in pairs(ev.handlers) do h(ev) end`) needs no indexing: the
/// attacker's `__pairs` returns `pcall, load, payload`, so the first
/// iteration is `pcall(load, payload)` called by the victim's frame, and
/// the victim calls the loaded function (`v`) itself. The second iteration
/// (`pcall(load, true)`) hands a string to call: the loop ends in an error.
#[test]
fn pairs_iterator_pcall_load_victim_calls_it() {
    let r = common::within("pairs pcall load", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let victim = pool.session("victim");
        let reg = victim.eval::<()>(
            "password = 'hunter2' events.on(function(ev) for _, h in pairs(ev.handlers) do h(ev) end end)",
        );
        let got = pool.session("attacker").eval::<String>(
            r#"
            LOOT = {}
            local loot = LOOT
            local handlers = setmetatable({}, {
                __pairs = function(t)
                    return pcall, load, "local ev = ... ev.loot.pw = password password = 'owned'"
                end,
            })
            local ok, e = pcall(events.fire_all, { handlers = handlers, loot = loot })
            return 'stolen=' .. tostring(loot.pw) .. ' err=' .. tostring(e)
            "#,
        );
        let after = victim.eval::<String>("return tostring(password)");
        (s(reg), s(got), s(after))
    });
    eprintln!("pairs pcall load: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

/// Lua 5.1 / LuaJIT / Luau: a session's hook that unkeyed work runs
/// (`events.fire_all` from an unkeyed request) tail-calls `getfenv(0)`:
/// the caller search stops at the tail call (no session caller), so
/// `getfenv` takes the unkeyed branch, whose `getfenv(0)` is the shared
/// globals, and hands them to the session's code.
#[test]
fn session_hook_in_unkeyed_work_tail_calls_getfenv() {
    let r = common::within("tail getfenv unkeyed", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let attacker = pool.session("attacker");
        let reg = attacker.eval::<()>(
            r#"
            if not getfenv then return end
            local function grab(n) return getfenv(n) end
            events.on(function(ev)
                for _, n in ipairs({0, 1, 2, 3}) do
                    local ok, g = pcall(grab, n)
                    if ok and type(g) == 'table' and rawget(g, 'events') ~= nil and g ~= _G then STOLEN = g end
                end
            end)
            "#,
        );
        let fired = pool.eval::<()>("events.fire_all({})");
        let wrote = attacker.eval::<String>(
            "if not STOLEN then return 'none' end rawset(STOLEN, 'planted', 'by-session') return 'wrote'",
        );
        let seen = pool.eval::<Option<String>>("return planted");
        (s(reg), s(fired), s(wrote), s(seen))
    });
    eprintln!("tail getfenv unkeyed: {r:?}");
    assert!(!r.3.contains("by-session"), "{r:?}");
}

/// Lua 5.1 / LuaJIT / Luau: the accumulator trick in unkeyed work (an
/// unkeyed request fires the events; the attacker session's hook, first in
/// line, puts its object in the event). `getfenv` as `__add` there must
/// hand the victim's hook neither its environment nor the shared globals.
#[test]
fn arith_getfenv_in_unkeyed_work() {
    let r = common::within("arith getfenv unkeyed", || {
        let pool = sandboxed_pool(INIT_HOOKS);
        let attacker = pool.session("attacker");
        let victim = pool.session("victim");
        let reg_a = attacker.eval::<()>(
            r#"
            if not getfenv then return end
            MT = { __add = getfenv }
            local evil = setmetatable({}, MT)
            events.on(function(ev) ev.amount = evil end)
            "#,
        );
        let reg = victim.eval::<()>(
            "password = 'hunter2' events.on(function(ev) total = (total or 0) + ev.amount end)",
        );
        let f1 = pool.eval::<()>("events.fire_all({})");
        let sw =
            attacker.eval::<()>("if MT then MT.__add = function(a, b) LOOT = a return 0 end end");
        let f2 = pool.eval::<()>("events.fire_all({})");
        let got = attacker.eval::<String>(
            r#"
            local g = LOOT
            if type(g) ~= 'table' then return 'none ' .. tostring(g) end
            local pw = rawget(g, 'password')
            local shared = rawget(g, 'events') ~= nil
            if shared then rawset(g, 'planted', 'by-session') end
            return 'pw=' .. tostring(pw) .. ' shared=' .. tostring(shared)
            "#,
        );
        let seen = pool.eval::<Option<String>>("return planted");
        (s(reg_a), s(reg), s(f1), s(sw), s(f2), s(got), s(seen))
    });
    eprintln!("arith getfenv unkeyed: {r:?}");
    assert!(
        !r.5.contains("hunter2") && !r.6.contains("by-session"),
        "{r:?}"
    );
}
