//! The nearest-caller rules of `load`, `getfenv` and `setfenv` attacked
//! again: chunk names that differ only in their first characters, tail
//! calls that hide the real caller, `getfenv` run by a function of the
//! shared globals or as a metamethod, and a session's function that unkeyed
//! work runs. Each runs under `common::within`: a hang fails.

use crate::common;
use crate::tenants::{sandboxed_pool, shown as s};

use std::time::Duration;

use mlua_isle::IslePool;

const INIT: &str = r#"
    config = { greeting = 'hello' }
    api = { compile = load or loadstring, compile_s = loadstring or load,
            greet = function(name) return helper(name) end,
            greet2 = function(name) local s = helper(name) return s end,
            map = function(t, f) local out = {} for i, v in ipairs(t) do out[i] = f(v) end return out end }
    function helper(name) return 'hi ' .. name end
"#;

fn pool() -> IslePool {
    sandboxed_pool(INIT)
}

/// `crate_named` strips ONE leading '=' or '@'; `caller_env` strips ALL
/// of them (`trim_start_matches`). "==mlua-isle" passes the sandbox's check
/// and is still passed over as the crate's own frame.
fn name_bypass(name: &'static str) -> (String, String, String) {
    common::within("name bypass", move || {
        let pool = pool();
        let plant = pool.eval::<()>(&format!(
            r#"
            local compile = api.compile_s
            local f, e = (loadstring or load)([[
                local compile = ...
                return function(n)
                    local f = compile('return _G')
                    VICTIM_ENV = f()
                    return 'hi ' .. n
                end
            ]], '{name}')
            if not f then error(e) end
            helper = f(compile)
            "#
        ));
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet('bob') return s");
        let stolen =
            pool.eval::<String>("return tostring(VICTIM_ENV and rawget(VICTIM_ENV, 'password'))");
        (s(plant), s(v), s(stolen))
    })
}

#[test]
fn double_equals_name() {
    let r = name_bypass("==mlua-isle planted");
    eprintln!("==: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

#[test]
fn at_equals_name() {
    let r = name_bypass("@=mlua-isle planted");
    eprintln!("@=: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

#[test]
fn equals_at_name() {
    let r = name_bypass("=@mlua-isle planted");
    eprintln!("=@: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

/// Lua 5.1 / LuaJIT / Luau: the same name trick with getfenv.
#[test]
fn name_bypass_getfenv() {
    let r = common::within("name getfenv", || {
        let pool = pool();
        let plant = pool.eval::<()>(
            r#"
            if not getfenv then return end
            local f, e = loadstring([[
                return function(n)
                    VICTIM_ENV = getfenv()
                    return 'hi ' .. n
                end
            ]], '==mlua-isle planted')
            if not f then error(e) end
            helper = f()
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet('bob') return s");
        let stolen =
            pool.eval::<String>("return tostring(VICTIM_ENV and rawget(VICTIM_ENV, 'password'))");
        (s(plant), s(v), s(stolen))
    });
    eprintln!("name getfenv: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

/// Lua 5.1 / LuaJIT / Luau: getfenv called (as a callback) by a function
/// init defined: the finder's "own" environment is the shared globals, and
/// getfenv hands it out (only `false` is refused).
#[test]
fn getfenv_via_init_callback_hands_out_shared_globals() {
    let r = common::within("getfenv via init", || {
        let pool = pool();
        let a = pool.session("attacker");
        let got = a.eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local g = api.map({1}, getfenv)[1]
            if g == _G then return 'own env' end
            local is_shared = rawget(g, 'helper') ~= nil
            if is_shared then
                rawset(g, 'SHARED_WRITE', 'from attacker')
                g.helper = function(n) return 'hijacked ' .. n end
            end
            return 'shared=' .. tostring(is_shared)
            "#,
        );
        let victim = pool.session("victim");
        let v = victim.eval::<String>("return api.greet('bob')");
        let unkeyed = pool.eval::<String>("return tostring(SHARED_WRITE)");
        (s(got), s(v), s(unkeyed))
    });
    eprintln!("getfenv via init: {r:?}");
    assert!(
        !r.0.contains("shared=true") && !r.1.contains("hijacked"),
        "a session got the shared globals: {r:?}"
    );
}

const INIT_HOOKS: &str = r#"
    api = { compile = load or loadstring }
    function helper(name) return 'hi ' .. name end
    local hooks = {}
    events = {
        on = function(f) hooks[#hooks + 1] = f end,
        -- tail call to the last hook
        fire = function(x) local h = hooks[#hooks] return h(x) end,
        fire_all = function(x) for _, h in ipairs(hooks) do h(x) end end,
    }
"#;

fn hooks_pool() -> IslePool {
    IslePool::builder()
        .workers(1)
        .sandbox(true)
        .default_timeout(Duration::from_secs(5))
        .init(move |lua| lua.load(INIT_HOOKS).exec())
        .build()
        .unwrap()
}

/// Session to session: the attacker registers a hook it loaded itself under
/// a name that passes the sandbox's check but that `caller_env` takes for
/// the crate's; init's `events.fire` tail-calls it in the victim's request,
/// so the nearest caller `load` finds is the victim's chunk.
#[test]
fn session_hook_named_like_crate_steals_other_session_env() {
    let r = common::within("hook name", || {
        let pool = hooks_pool();
        let a = pool.session("attacker");
        let reg = a.eval::<()>(
            r#"
            local f, e = (loadstring or load)([[
                return function(x)
                    local ok, g = pcall(function() return (loadstring or load)('return _G')() end)
                    STOLEN = g
                    STOLEN_ERR = not ok and g or nil
                    return x
                end
            ]], '==mlua-isle hook')
            if not f then error(e) end
            events.on(f())
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<i64>("local r = events.fire(1) return r");
        let stolen = a.eval::<String>(
            "return type(STOLEN) == 'table' and tostring(rawget(STOLEN, 'password')) or tostring(STOLEN)",
        );
        (s(reg), s(v), s(stolen))
    });
    eprintln!("hook name: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "a session read another session's global: {r:?}"
    );
}

/// A session's function (a hook init keeps) run by unkeyed work: the VM's
/// `load` (through `api.compile`) loads into the shared globals there, and
/// the session keeps what that returns; (5.1) `getfenv` hands out the
/// shared globals for a session function's environment.
#[test]
fn session_hook_run_by_unkeyed_work_gets_shared_globals() {
    let r = common::within("hook unkeyed", || {
        let pool = hooks_pool();
        let a = pool.session("attacker");
        let reg = a.eval::<()>(
            r#"
            events.on(function()
                local ok, g = pcall(function() return api.compile('return _G')() end)
                if ok and type(g) == 'table' then HOOK_G = g end
                if getfenv then
                    local ok2, g2 = pcall(getfenv)
                    if ok2 and g2 ~= _G then HOOK_G2 = g2 end
                end
            end)
            "#,
        );
        let fired = pool.eval::<()>("events.fire_all(1)");
        let got = a.eval::<String>(
            r#"
            local out = {}
            for _, g in ipairs({ HOOK_G or false, HOOK_G2 or false }) do
                if g and rawget(g, 'helper') ~= nil then
                    rawset(g, 'helper', function(n) return 'hijacked ' .. n end)
                    out[#out + 1] = 'shared'
                else
                    out[#out + 1] = tostring(g)
                end
            end
            return table.concat(out, ',')
            "#,
        );
        let unkeyed = pool.eval::<String>("return helper('x')");
        (s(reg), s(fired), s(got), s(unkeyed))
    });
    eprintln!("hook unkeyed: {r:?}");
    assert!(
        !r.2.contains("shared") && !r.3.contains("hijacked"),
        "a session got the shared globals: {r:?}"
    );
}

/// Lua 5.1 / LuaJIT / Luau: no callback needed. An init function that only
/// does arithmetic on what the session passes (`t = t + it.price`) runs
/// the session's `__add` metamethod, `getfenv` itself: its nearest Lua
/// caller is init's function, so it hands out the shared globals.
#[test]
fn getfenv_as_add_metamethod_in_init_arithmetic() {
    let r = common::within("getfenv __add", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| {
                lua.load(
                    r#"
                    function helper(name) return 'hi ' .. name end
                    shop = {
                        total = function(items)
                            local t = 0
                            for _, it in ipairs(items) do t = t + it.price end
                            return t
                        end,
                        greet = function(name) return helper(name) end,
                    }
                    "#,
                )
                .exec()
            })
            .build()
            .unwrap();
        let a = pool.session("attacker");
        let got = a.eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local g = shop.total({ { price = setmetatable({}, { __add = getfenv }) } })
            if type(g) ~= 'table' or g == _G then return 'blocked: ' .. tostring(g) end
            local shared = rawget(g, 'helper') ~= nil
            if shared then g.helper = function(n) return 'hijacked ' .. n end end
            return 'shared=' .. tostring(shared)
            "#,
        );
        let victim = pool.session("victim");
        let v = victim.eval::<String>("return shop.greet('bob')");
        (s(got), s(v))
    });
    eprintln!("getfenv __add: {r:?}");
    assert!(
        !r.0.contains("shared=true") && !r.1.contains("hijacked"),
        "a session got the shared globals: {r:?}"
    );
}

/// Hardening: the host's own `Chunk::name` does not refuse names starting
/// with "mlua-isle" (a host naming a tenant's script after the file the
/// tenant uploaded, "mlua-isle-plugin.lua"): every function of that chunk
/// is passed over as the crate's, and a hook it registers, run by a tail
/// call in a victim's request, loads into the victim's environment.
#[test]
fn host_chunk_name_like_crate() {
    let r = common::within("host chunk name", || {
        let pool = hooks_pool();
        let a = pool.session("attacker");
        let reg = a.eval::<()>(
            mlua_isle::Chunk::new(
                r#"
                events.on(function(x)
                    local ok, g = pcall(function() return (loadstring or load)('return _G')() end)
                    STOLEN = g
                    return x
                end)
                "#,
            )
            .name("@mlua-isle-plugin.lua"),
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<i64>("local r = events.fire(1) return r");
        let stolen = a.eval::<String>(
            "return type(STOLEN) == 'table' and tostring(rawget(STOLEN, 'password')) or tostring(STOLEN)",
        );
        (s(reg), s(v), s(stolen))
    });
    eprintln!("host chunk name: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "a session read another session's global: {r:?}"
    );
}

/// Luau: builtins compiled as FASTCALL (rawset, table.insert) bypass the
/// sandbox's replacements if the environment is "safeenv".
#[test]
fn luau_fastcall_rawset_on_view() {
    let r = common::within("fastcall", || {
        let pool = pool();
        let a = pool.session("a");
        let w = a.eval::<String>(
            r#"
            local out = {}
            out[#out + 1] = tostring(pcall(function() rawset(config, 'greeting', 'pwned') end))
            out[#out + 1] = tostring(pcall(function() table.insert(config, 'pwned') end))
            return table.concat(out, ',')
            "#,
        );
        let b = pool.session("b");
        let v = b.eval::<String>("return tostring(config.greeting) .. '/' .. tostring(config[1])");
        (s(w), s(v))
    });
    eprintln!("fastcall: {r:?}");
    assert!(
        !r.1.contains("pwned"),
        "a session wrote a shared table: {r:?}"
    );
}

/// No crate-like name: a function of the shared globals that TAIL-calls
/// `load` leaves no frame, so the nearest Lua caller `load` finds is the
/// victim's chunk, and the chunk (unkeyed work's text) gets the victim's
/// environment. Here init's factory `api.handler` tail-calls the global
/// `make_handler`, which unkeyed work rebinds; the victim calls the
/// handler it is given, which hands its environment to unkeyed work.
// LuaJIT shows no trace of a tail call on its stack: this one is not
// closed there (SECURITY.md says so).
#[cfg(not(feature = "luajit"))]
#[test]
fn tail_called_load_from_shared_code_gets_victim_env() {
    let r = common::within("tail load", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| {
                lua.load(
                    r#"
                    api = { compile = loadstring or load,
                            handler = function(kind) return make_handler(kind) end,
                            report = function(x) return sink(x) end }
                    function make_handler(kind) return function() return 'handled ' .. kind end end
                    function sink(x) return x end
                    "#,
                )
                .exec()
            })
            .build()
            .unwrap();
        let plant = pool.eval::<()>(
            r#"
            local compile = api.compile
            sink = function(x) if type(x) == 'table' then STOLEN = x end return 'ok' end
            make_handler = function(kind)
                return compile("api.report(_G) return 'handled'")
            end
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local h = api.handler('x') return h()");
        let stolen = pool.eval::<String>("return tostring(STOLEN and rawget(STOLEN, 'password'))");
        (s(plant), s(v), s(stolen))
    });
    eprintln!("tail load: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

/// Lua 5.1 / LuaJIT: the same tail call into `setfenv`: its nearest Lua
/// caller is the victim's chunk (the shared frames are gone), so the
/// victim's chunk counts as "running in the caller's own environment" and
/// gets unkeyed work's table as its environment: every global the victim
/// writes afterwards lands there.
#[test]
fn tail_called_setfenv_from_shared_code_swaps_victim_env() {
    let r = common::within("tail setfenv", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| {
                lua.load(
                    r#"
                    api = { handler = function(kind) return make_handler(kind) end }
                    function make_handler(kind) return function() return 'handled ' .. kind end end
                    "#,
                )
                .exec()
            })
            .build()
            .unwrap();
        let mut out = vec![];
        for level in 1..=4 {
            let plant = pool.eval::<()>(&format!(
                r#"
                if not setfenv then return end
                local base = {{ tostring = tostring, api = api }}
                TRAP = setmetatable({{}}, {{ __index = base }})
                make_handler = function(kind) return setfenv({level}, TRAP) end
                "#
            ));
            let victim = pool.session(format!("victim{level}"));
            let v = victim.eval::<String>(
                "local h = api.handler('x') password = 'hunter2' return tostring(h)",
            );
            let stolen = pool.eval::<String>("return tostring(TRAP and rawget(TRAP, 'password'))");
            out.push((level, s(plant), s(v), s(stolen)));
        }
        out
    });
    eprintln!("tail setfenv: {r:?}");
    assert!(
        !r.iter().any(|x| x.3.contains("hunter2")),
        "unkeyed work read a session's global: {r:?}"
    );
}

/// Session to session, no crate-like name: the attacker's hook TAIL-calls
/// its own `load` (5.2+) or `setfenv` (5.1); init's `events.fire` tail-calls
/// the hook in the victim's request, so the nearest Lua caller is the
/// victim's chunk. (load) the payload runs in the victim's environment
/// once the victim calls what `fire` returned; (setfenv, 5.1) the victim's
/// chunk gets the attacker's table as its environment.
#[test]
fn session_hook_tail_call_reaches_other_session() {
    let r = common::within("hook tail", || {
        let pool = hooks_pool();
        let a = pool.session("attacker");
        let reg = a.eval::<()>(
            r#"
            TRAP = setmetatable({}, { __index = _G })
            if setfenv then
                local trap = TRAP
                events.on(function(x) return setfenv(3, trap) end)
            else
                events.on(function(x)
                    return load("local e = _G events.on(function() return e end) return 'handled'")
                end)
            end
            "#,
        );
        let victim = pool.session("victim");
        let v = victim.eval::<String>(
            r#"
            local h = events.fire(1)
            password = 'hunter2'
            if type(h) == 'function' then return h() end
            return tostring(h)
            "#,
        );
        let stolen = a.eval::<String>(
            r#"
            if rawget(TRAP, 'password') then return 'trap:' .. rawget(TRAP, 'password') end
            local ok, e = pcall(events.fire, 1)
            return tostring(ok and type(e) == 'table' and rawget(e, 'password'))
            "#,
        );
        (s(reg), s(v), s(stolen))
    });
    eprintln!("hook tail: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "a session read another session's global: {r:?}"
    );
}
