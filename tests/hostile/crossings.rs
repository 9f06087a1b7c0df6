//! Paths from one tenant of a sandboxed pool to another's state, or to the
//! shared globals, that go through the crate's own machinery: the Lua
//! chunk that makes session environments (built on a VM's first session
//! request, after unkeyed work could rebind globals), the session `load`,
//! the VM's own `load` handed out through what `init` shares, the
//! globals kept under another name, Lua 5.1's `module`, and (`async`) the
//! coroutines requests run on. Each runs under `common::within`: a hang
//! fails.

use crate::common;
use crate::tenants::sandboxed_pool as pool_with;

use mlua_isle::IslePool;

const INIT: &str = r#"
    config = { greeting = 'hello', nested = { x = 1 } }
    api = { greet = function(name) return 'hi ' .. name end }
"#;

fn pool() -> IslePool {
    pool_with(INIT)
}

/// Unkeyed work rebinds `setmetatable` before the VM's first session: the
/// function that makes session environments must not call it (it would be
/// handed every session's environment, and the metatable whose `__index`
/// is what all sessions read).
#[test]
fn unkeyed_work_rebinding_setmetatable_never_sees_a_session() {
    let r = common::within("setmetatable", || {
        let pool = pool();
        pool.eval::<()>(
            r#"
            local orig = setmetatable
            ENVS = {}
            setmetatable = function(t, mt)
                if type(t) == 'table' and rawget(t, '_G') == t then
                    ENVS[#ENVS + 1] = t
                    META = mt
                end
                return orig(t, mt)
            end
            "#,
        )
        .unwrap();
        let victim = pool.session("victim");
        victim.eval::<()>("secret = 'victim-password'").unwrap();
        let stolen = pool
            .eval::<String>(
                r#"
                local out = { tostring(ENVS[1] and ENVS[1].secret) }
                if META then
                    rawget(META, '__index').config = { greeting = 'pwned' }
                    ENVS[1].planted = 'by attacker'
                end
                return table.concat(out, ',')
                "#,
            )
            .unwrap();
        let other = pool
            .session("other")
            .eval::<String>("return config.greeting")
            .unwrap();
        let victim_sees = victim
            .eval::<String>("return tostring(planted) .. ',' .. config.greeting")
            .unwrap();
        (stolen, other, victim_sees)
    });
    assert_eq!(r.0, "nil", "unkeyed work read a session's global: {r:?}");
    assert_eq!(
        r.1, "hello",
        "unkeyed work changed what sessions read: {r:?}"
    );
    assert_eq!(r.2, "nil,hello", "{r:?}");
}

/// The same class through `select` (which the session `load` used to
/// count its arguments): a session's loaded chunk must still run in the
/// session.
#[test]
fn unkeyed_work_rebinding_select_does_not_move_a_sessions_load() {
    let r = common::within("select", || {
        let pool = pool();
        pool.eval::<()>(
            r#"
            local orig = select
            select = function(n, ...) if n == '#' then return 1 end return orig(n, ...) end
            "#,
        )
        .unwrap();
        let victim = pool.session("victim");
        let v = victim.eval::<String>(
            "local f = (loadstring or load)('token = \"victim-token\" return 1') f() \
             return tostring(rawget(_G, 'token'))",
        );
        let seen = pool.eval::<Option<String>>("return token").unwrap();
        (v, seen)
    });
    assert_eq!(r.0, Ok("victim-token".to_string()), "{r:?}");
    assert_eq!(
        r.1, None,
        "a session's chunk wrote the shared globals: {r:?}"
    );
}

/// A session's `load` given a fourth argument that is not a table: on Lua
/// 5.1 and LuaJIT, `load` ignores it, and the chunk must not get the
/// thread's environment (the shared globals); elsewhere it is the chunk's
/// `_ENV`, as in Lua.
#[test]
fn a_sessions_load_with_an_odd_environment_stays_in_the_session() {
    let r = common::within("load 4th arg", || {
        let pool = pool();
        let what = pool.session("attacker").eval::<String>(
            r#"
            if load == nil then return 'ran' end -- Luau
            local src = "PLANTED = 'from a session'"
            local ok, f = pcall(load, src, 'x', 't', 1)
            if not (ok and f) then -- 5.1: a reader only
                local done = false
                f = load(function() if done then return nil end done = true return src end, 'x', 't', 1)
            end
            pcall(f)
            return 'ran'
            "#,
        );
        let unkeyed = pool.eval::<Option<String>>("return PLANTED").unwrap();
        let other = pool
            .session("other")
            .eval::<Option<String>>("return PLANTED")
            .unwrap();
        (what, unkeyed, other)
    });
    assert_eq!(r.0, Ok("ran".to_string()), "{r:?}");
    assert_eq!(r.1, None, "a session wrote the shared globals: {r:?}");
    assert_eq!(r.2, None, "a session wrote what others read: {r:?}");
}

/// The two above chained, from session code alone (Lua 5.1 and LuaJIT
/// before the fix): escape to the shared globals with `load`, rebind
/// `setmetatable` there, catch later sessions' environments.
#[test]
fn a_session_cannot_reach_a_later_sessions_globals() {
    let r = common::within("chain", || {
        let pool = pool();
        let attacker = pool.session("attacker");
        attacker
            .eval::<()>(
                r#"
                STOLEN = {}
                local src = [[
                    local orig = setmetatable
                    setmetatable = function(t, mt)
                        if type(t) == 'table' and rawget(t, '_G') == t then
                            STOLEN[#STOLEN + 1] = t
                            STOLEN.meta = mt
                        end
                        return orig(t, mt)
                    end
                ]]
                local function loaded(s)
                    if load == nil then return nil end -- Luau
                    local ok, f = pcall(load, s, 'x', 't', 1)
                    if ok and f then return f end
                    -- Not `return load(...)`: a tail-called `load` does not
                    -- know its caller, and refuses.
                    local done = false
                    local g = load(function() if done then return nil end done = true return s end, 'x', 't', 1)
                    return g
                end
                pcall(loaded("STOLEN = ...") or function() end, STOLEN)
                pcall(loaded(src) or function() end)
                "#,
            )
            .unwrap();
        pool.session("victim")
            .eval::<()>("secret = 'victim-password'")
            .unwrap();
        let stolen = attacker.eval::<String>(
            r#"
            local v = STOLEN[1]
            if not v then return 'nothing' end
            pcall(function() rawget(STOLEN.meta, '__index').config = { greeting = 'pwned' } end)
            return tostring(v.secret)
            "#,
        );
        let third = pool
            .session("third")
            .eval::<String>("return config.greeting")
            .unwrap();
        (stolen, third)
    });
    assert_eq!(r.0, Ok("nothing".to_string()), "{r:?}");
    assert_eq!(r.1, "hello", "a session changed what others read: {r:?}");
}

/// `loadstring` and `load` read through a session's globals load into
/// the session.
#[test]
fn a_sessions_loaders_load_into_the_session() {
    let r = common::within("loaders", || {
        let pool = pool();
        let what = pool.session("attacker").eval::<String>(
            r#"
            local out = {}
            for _, name in ipairs({ 'loadstring', 'load' }) do
                local f = _G[name]
                if type(f) == 'function' then
                    -- 5.1's `load` takes a reader only: it refuses a string.
                    local ok, g = pcall(f, "PLANTED = 'x' return 1")
                    out[#out + 1] = name .. ':' .. tostring(ok and g and g())
                end
            end
            return table.concat(out, ' ') .. ' mine=' .. tostring(rawget(_G, 'PLANTED'))
            "#,
        );
        let unkeyed = pool.eval::<Option<String>>("return PLANTED").unwrap();
        (what, unkeyed)
    });
    assert!(matches!(&r.0, Ok(s) if s.ends_with("mine=x")), "{r:?}");
    assert_eq!(r.1, None, "a session wrote the shared globals: {r:?}");
}

/// Lua 5.1 and LuaJIT: `module(name, ...)` finds `name` in the registry's
/// `_LOADED` (the real `io`, `debug`, `package`, `_G`, `string`), makes it
/// the caller's environment and hands it to each further argument. The
/// sandbox takes it away.
#[test]
fn module_is_not_available_in_the_sandbox() {
    let r = common::within("module", || {
        let pool = pool();
        let got = pool.session("attacker").eval::<String>(
            r#"
            if module == nil then return 'no module' end
            local real = {}
            for _, name in ipairs({ 'string', '_G', 'io', 'debug', 'package' }) do
                pcall(function() module(name, function(t) real[name] = t end) end)
            end
            if real.string then real.string.upper = function() return 'pwned' end end
            if real._G then real._G.PLANTED = 'from a session' end
            local n = 0
            for _ in pairs(real) do n = n + 1 end
            return 'reached ' .. n
            "#,
        );
        let victim = pool
            .session("victim")
            .eval::<String>("return ('a'):upper() .. string.upper('b')")
            .unwrap();
        let unkeyed = pool.eval::<Option<String>>("return PLANTED").unwrap();
        (got, victim, unkeyed)
    });
    assert!(
        matches!(&r.0, Ok(s) if s == "reached 0" || s == "no module"),
        "{r:?}"
    );
    assert_eq!(r.1, "AB", "a session rewrote the string library: {r:?}");
    assert_eq!(r.2, None, "{r:?}");
}

/// `init` keeps the globals under other names (`env = _G`, a table field):
/// sessions read them as a read-only view of what sessions read, and the
/// VM's `load` reached through them loads into the calling session.
#[test]
fn the_globals_kept_under_another_name_are_a_view_for_sessions() {
    let r = common::within("alias", || {
        let pool = pool_with("config = { greeting = 'hello' } env = _G app = { globals = _G }");
        pool.eval::<()>("UNKEYED = 'set by unkeyed work'").unwrap();
        let a = pool.session("a").eval::<String>(
            r#"
            local out = {}
            out[#out + 1] = tostring(pcall(function() env.PLANTED = 'x' end))
            out[#out + 1] = tostring(pcall(function() app.globals.PLANTED2 = 'y' end))
            out[#out + 1] = tostring(env.UNKEYED) .. ',' .. tostring(app.globals.UNKEYED)
            out[#out + 1] = env.config.greeting
            local ld = app.globals.loadstring or app.globals.load
            ld("PLANTED3 = 'z'")()
            out[#out + 1] = tostring(rawget(_G, 'PLANTED3'))
            return table.concat(out, ' ')
            "#,
        );
        let unkeyed = pool.eval::<String>(
            "return tostring(PLANTED) .. ',' .. tostring(PLANTED2) .. ',' .. tostring(PLANTED3)",
        );
        let unkeyed_alias = pool.eval::<String>("env.ALIASED = 1 return tostring(ALIASED)");
        (a, unkeyed, unkeyed_alias)
    });
    assert_eq!(r.0, Ok("false false nil,nil hello z".to_string()), "{r:?}");
    assert_eq!(r.1, Ok("nil,nil,nil".to_string()), "{r:?}");
    // Unkeyed work keeps the globals it may write, under any name.
    assert_eq!(r.2, Ok("1".to_string()), "{r:?}");
}

/// The VM's own `load`, in a table `init` shares: session code calling it
/// loads into its own session.
#[test]
fn the_vms_load_shared_by_init_loads_into_the_calling_session() {
    let r = common::within("shared load", || {
        let pool = pool_with("api = { compile = loadstring or load }");
        let a = pool
            .session("a")
            .eval::<String>("api.compile('PLANTED = 1')() return tostring(rawget(_G, 'PLANTED'))");
        let unkeyed = pool.eval::<String>("return tostring(PLANTED)");
        // Unkeyed work's chunks still run in the shared globals.
        let own = pool.eval::<String>("api.compile('MINE = 2')() return tostring(MINE)");
        (a, unkeyed, own)
    });
    assert_eq!(r.0, Ok("1".to_string()), "{r:?}");
    assert_eq!(r.1, Ok("nil".to_string()), "{r:?}");
    assert_eq!(r.2, Ok("2".to_string()), "{r:?}");
}

/// Lua 5.1 and LuaJIT: a module `init` wrote the 5.1 way
/// (`module(name, package.seeall)`) reads missing fields through to the
/// globals: its view reads through to what sessions read instead.
#[test]
#[cfg(any(feature = "lua51", feature = "luajit"))]
fn a_seeall_modules_view_reads_what_sessions_read() {
    let r = common::within("seeall", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .default_timeout(std::time::Duration::from_secs(5))
            .init(|lua| {
                lua.load("module('mymod', package.seeall) function hello() return 'hi' end")
                    .exec()
            })
            .build()
            .unwrap();
        pool.eval::<()>("UNKEYED = 'set by unkeyed work'").unwrap();
        let a = pool.session("a").eval::<String>(
            r#"
            local m = require('mymod')
            m.loadstring("PLANTED = 'from a session'")()
            return m.hello() .. ' ' .. tostring(rawget(_G, 'PLANTED')) .. ' ' .. tostring(m.UNKEYED)
            "#,
        );
        let unkeyed = pool.eval::<Option<String>>("return PLANTED");
        (a, unkeyed)
    });
    assert_eq!(r.0, Ok("hi from a session nil".to_string()), "{r:?}");
    assert_eq!(r.1, Ok(None), "{r:?}");
}

/// (`async`) A session keeps its request's coroutine
/// (`coroutine.running()`). Coroutines are reused for later requests, but
/// never another tenant's: the one it kept is never another session's
/// suspended request, so it cannot resume (or close) that request and take
/// its result.
#[cfg(feature = "async")]
#[test]
fn a_session_cannot_resume_another_sessions_suspended_request() {
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Poll, Waker};
    let ready = Arc::new(AtomicBool::new(false));
    let waker: Arc<Mutex<Option<Waker>>> = Arc::default();
    let r = common::within("another's coroutine", {
        let (ready, waker) = (ready.clone(), waker.clone());
        move || {
            let (ready_i, waker_i) = (ready.clone(), waker.clone());
            let pool = IslePool::builder()
                .workers(1)
                .sandbox(true)
                .default_timeout(std::time::Duration::from_secs(5))
                .init(move |lua| {
                    let (ready, waker) = (ready_i.clone(), waker_i.clone());
                    let f = lua.create_async_function(move |_, ()| {
                        let (ready, waker) = (ready.clone(), waker.clone());
                        async move {
                            std::future::poll_fn(|cx| {
                                if ready.load(Ordering::SeqCst) {
                                    Poll::Ready(())
                                } else {
                                    *waker.lock() = Some(cx.waker().clone());
                                    Poll::Pending
                                }
                            })
                            .await;
                            Ok("fresh")
                        }
                    })?;
                    lua.globals().set("wait_flag", f)
                })
                .build()
                .unwrap();
            let a = pool.session("a");
            a.eval::<()>("HELD = coroutine.running()").unwrap();
            let b = pool.session("b");
            let tb = b.spawn_eval::<String>("local v = wait_flag() return 'B result: ' .. v");
            common::eventually("b suspended", || waker.lock().is_some());
            ready.store(true, Ordering::SeqCst);
            let stolen = a.eval::<String>(
                "local r = { pcall(coroutine.resume, HELD, 'x') } \
                 for i = 1, #r do r[i] = tostring(r[i]) end return table.concat(r, ' | ')",
            );
            if let Some(w) = waker.lock().take() {
                w.wake();
            }
            (stolen, tb.wait())
        }
    });
    assert!(
        !matches!(&r.0, Ok(s) if s.contains("B result")),
        "session a got session b's result: {r:?}"
    );
    assert_eq!(r.1, Ok("B result: fresh".to_string()), "{r:?}");
}

/// Lua's own functions that `init` shared under other names reach request
/// code as the sandbox's replacements: `rawset` that refuses read-only
/// tables, the VM's `load`, and (Lua 5.4, 5.5) the budgeted pattern
/// functions.
#[test]
fn lua_functions_init_shared_are_the_sandboxs() {
    let r = common::within("shared originals", || {
        let pool = pool_with(
            "config = { greeting = 'hello' } api = { set = rawset, find = string.find } set = rawset",
        );
        let session = pool.session("a").eval::<String>(
            r#"
            local out = {}
            out[#out + 1] = tostring(pcall(api.set, config, 'greeting', 'pwned'))
            out[#out + 1] = tostring(pcall(set, config, 'greeting', 'pwned'))
            out[#out + 1] = tostring(api.find == string.find)
            out[#out + 1] = config.greeting
            return table.concat(out, ' ')
            "#,
        );
        let unkeyed = pool.eval::<String>(
            "return tostring(pcall(set, config, 'greeting', 'pwned')) .. ' ' .. config.greeting",
        );
        (session, unkeyed)
    });
    assert_eq!(r.0, Ok("false false true hello".to_string()), "{r:?}");
    assert_eq!(r.1, Ok("false hello".to_string()), "{r:?}");
}
