//! `xpcall`'s message handler runs at the error's level, on top of the
//! frame that raised it: `load` as the handler (or called by one) must not
//! take that frame (another tenant's hook) as its caller. And a function
//! `init` gave its own environment is not a session's caller either. Each
//! runs under `common::within`: a hang fails.

use crate::common;
use crate::tenants::{sandboxed_pool, shown as s};

use std::time::Duration;

use mlua_isle::IslePool;

const INIT_HOOKS: &str = r#"
    api = { compile = load or loadstring }
    function helper(name) return 'hi ' .. name end
    local hooks = {}
    events = {
        on = function(f) hooks[#hooks + 1] = f end,
        fire = function(x) local h = hooks[#hooks] return h(x) end,
        fire_all = function(x) for _, h in ipairs(hooks) do h(x) end end,
    }
"#;

fn hooks_pool() -> IslePool {
    sandboxed_pool(INIT_HOOKS)
}

/// The attacker's code: a table whose `__index` is a wrapped coroutine that
/// raises a function (a reader); `xpcall`'s handler is `load` itself, run
/// at the error's level, where the nearest Lua frame is the victim's hook
/// (which only read `ev.name`).
const STEAL: &str = r#"
    local handler = HANDLER
    local done = false
    local function reader()
        if done then return nil end
        done = true
        return "return _G"
    end
    local evil = setmetatable({}, { __index = coroutine.wrap(function() error(reader) end) })
    local ok, f = xpcall(function() events.fire_all(evil) end, handler)
    if type(f) ~= 'function' then return 'no function: ' .. tostring(f) end
    local env = f()
    if type(env) ~= 'table' then return 'not a table: ' .. tostring(env) end
    local pw = rawget(env, 'password')
    rawset(env, 'password', 'owned')
    return 'stolen=' .. tostring(pw)
"#;

fn steal(handler: &'static str, unkeyed: bool) -> (String, String, String) {
    common::within("xpcall steal", move || {
        let pool = hooks_pool();
        let victim = pool.session("victim");
        let reg =
            victim.eval::<()>("password = 'hunter2' events.on(function(ev) last = ev.name end)");
        let code = STEAL.replace("HANDLER", handler);
        let got = if unkeyed {
            pool.eval::<String>(&code)
        } else {
            pool.session("attacker").eval::<String>(&code)
        };
        let after = victim.eval::<String>("return tostring(password)");
        (s(reg), s(got), s(after))
    })
}

#[test]
fn xpcall_load_at_victims_level_session() {
    let r = steal("load", false);
    eprintln!("xpcall load session: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

#[test]
fn xpcall_load_at_victims_level_unkeyed() {
    let r = steal("load", true);
    eprintln!("xpcall load unkeyed: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

#[test]
fn xpcall_api_compile_at_victims_level_session() {
    let r = steal("api.compile", false);
    eprintln!("xpcall api.compile session: {r:?}");
    assert!(!r.1.contains("hunter2") && !r.2.contains("owned"), "{r:?}");
}

/// Same trick with no coroutine: the victim's hook raises a value of its
/// argument itself (`assert(ev.ok, ev.why)`), so `error`'s C frame sits on
/// the victim's frame when the handler (`load`) runs.
#[test]
fn xpcall_load_via_victims_assert() {
    let r = common::within("assert", || {
        let pool = hooks_pool();
        let victim = pool.session("victim");
        let reg = victim
            .eval::<()>("password = 'hunter2' events.on(function(ev) assert(ev.ok, ev.why) end)");
        let got = pool.session("attacker").eval::<String>(
            r#"
            local done = false
            local function reader()
                if done then return nil end
                done = true
                return "return _G"
            end
            local ok, f = xpcall(events.fire_all, load, { ok = false, why = reader })
            if type(f) ~= 'function' then return 'no function: ' .. tostring(f) end
            local env = f()
            return 'stolen=' .. tostring(rawget(env, 'password'))
            "#,
        );
        (s(reg), s(got))
    });
    eprintln!("assert: {r:?}");
    assert!(!r.1.contains("hunter2"), "{r:?}");
}

/// The victim's hook only prints its argument (`__tostring` runs as a
/// wrapped coroutine raising the reader).
#[test]
fn xpcall_load_via_victims_print() {
    let r = common::within("print", || {
        let pool = hooks_pool();
        let victim = pool.session("victim");
        let reg = victim
            .eval::<()>("password = 'hunter2' events.on(function(ev) local s = tostring(ev) end)");
        let got = pool.session("attacker").eval::<String>(
            r#"
            local done = false
            local function reader()
                if done then return nil end
                done = true
                return "return _G"
            end
            local evil = setmetatable({}, { __tostring = coroutine.wrap(function() error(reader) end) })
            local ok, f = xpcall(events.fire_all, load, evil)
            if type(f) ~= 'function' then return 'no function: ' .. tostring(f) end
            return 'stolen=' .. tostring(rawget(f(), 'password'))
            "#,
        );
        (s(reg), s(got))
    });
    eprintln!("print: {r:?}");
    assert!(!r.1.contains("hunter2"), "{r:?}");
}

/// Session to shared globals: the attacker's hook is a callable table whose
/// `__call` raises the reader from init's `fire_all` frame.
#[test]
fn xpcall_load_at_shared_level() {
    let r = common::within("shared level", || {
        let pool = hooks_pool();
        let a = pool.session("attacker");
        let got = a.eval::<String>(
            r#"
            local done = false
            local function reader()
                if done then return nil end
                done = true
                return "helper = function(n) return 'hijacked ' .. n end return _G"
            end
            events.on(setmetatable({}, { __call = coroutine.wrap(function() error(reader) end) }))
            local ok, f = xpcall(events.fire_all, load, 1)
            if type(f) ~= 'function' then return 'no function: ' .. tostring(f) end
            f()
            return 'loaded'
            "#,
        );
        let unkeyed = pool.eval::<String>("return helper('x')");
        let other = pool.session("b").eval::<String>("return helper('x')");
        (s(got), s(unkeyed), s(other))
    });
    eprintln!("shared level: {r:?}");
    assert!(
        !r.1.contains("hijacked") && !r.2.contains("hijacked"),
        "{r:?}"
    );
}

/// A shared function's `__close` (5.4): init's `with` closes the
/// attacker's resource in its own frame; `__close` is `load` (the resource
/// comes first: refused by `load` itself) or raises the reader under xpcall.
#[test]
fn close_handler_in_shared_frame() {
    let r = common::within("close", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| {
                lua.load(
                    r#"
                    function helper(n) return 'hi ' .. n end
                    if _VERSION == 'Lua 5.4' then
                        api = (load or loadstring)([[return { with = function(r, f) local x <close> = r return f(x) end }]])()
                    else
                        api = { with = function(r, f) return f(r) end }
                    end
                    "#,
                )
                .exec()
            })
            .build()
            .unwrap();
        let got = pool.session("attacker").eval::<String>(
            r#"
            local done = false
            local function reader()
                if done then return nil end
                done = true
                return "helper = function(n) return 'hijacked ' .. n end"
            end
            local res = setmetatable({}, { __close = coroutine.wrap(function() error(reader) end) })
            local ok, f = xpcall(api.with, load, res, function() end)
            if type(f) ~= 'function' then return 'no function: ' .. tostring(f) end
            f()
            return 'loaded'
            "#,
        );
        let unkeyed = pool.eval::<String>("return helper('x')");
        (s(got), s(unkeyed))
    });
    eprintln!("close: {r:?}");
    assert!(!r.1.contains("hijacked"), "{r:?}");
}

/// init gives one of its functions an environment of its own (reading
/// through to the globals, as plugin/template code does) and that function
/// loads text a tenant gives it. In a session's request `load` takes the
/// nearest caller's environment when it is not the shared globals, a view or
/// a session's: here init's table, which leads to the real globals.
const INIT_OWN_ENV: &str = r#"
    function helper(n) return 'hi ' .. n end
    api = { greet = function(n) return helper(n) end }
    local env = setmetatable({}, { __index = _G })
    local src = "return function(s) local f = assert((loadstring or load)(s)) return f() end"
    if setfenv then
        local mk = assert(loadstring(src))
        setfenv(mk, env)
        api.run = mk()
    else
        api.run = load(src, "=tpl", "t", env)()
    end
"#;

#[test]
fn init_function_with_own_env_loads_tenant_text() {
    let r = common::within("own env", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| lua.load(INIT_OWN_ENV).exec())
            .build()
            .unwrap();
        let a = pool.session("attacker");
        let got = a.eval::<String>(
            r#"
            return api.run("_G.helper = function(n) return 'hijacked ' .. n end "
                .. "channel = 'from attacker' return tostring(_G)")
            "#,
        );
        let victim = pool.session("victim");
        let v = victim.eval::<String>("return api.greet('bob')");
        let chan = victim.eval::<String>("return api.run('return tostring(channel)')");
        let unkeyed = pool.eval::<String>("return helper('x')");
        (s(got), s(v), s(chan), s(unkeyed))
    });
    eprintln!("own env: {r:?}");
    assert!(
        !r.1.contains("hijacked") && !r.2.contains("from attacker") && !r.3.contains("hijacked"),
        "{r:?}"
    );
}
