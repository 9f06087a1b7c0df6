//! How `load`, `getfenv` and `setfenv` find who calls them in a session's
//! request (the nearest Lua caller), attacked: chunks named like the
//! crate's, metamethods and functions of the shared globals run inside a
//! victim's request, `getfenv` by level or called by a C function, a table
//! as `load`'s environment on Lua 5.1, and (`async`) a cancelled child's
//! `__close` handler. Each runs under `common::within`: a hang fails.

use crate::common;
use crate::tenants::{sandboxed_pool as pool_with, shown as s};

use std::time::Duration;

use mlua_isle::IslePool;

const INIT: &str = r#"
    config = { greeting = 'hello' }
    api = { compile = load or loadstring, compile_s = loadstring or load,
            greet = function(name) return helper(name) end,
            greet2 = function(name) local s = helper(name) return s end }
    function helper(name) return 'hi ' .. name end
"#;

fn pool() -> IslePool {
    pool_with(INIT)
}

/// Unkeyed work rebinds `helper` (which init's `api.greet` tail-calls) with
/// a chunk it names like the crate's own ("=mlua-isle ..."): `caller_env`
/// passes over that frame, and over init's (gone: a tail call), and finds
/// the victim session's chunk.
#[test]
fn unkeyed_helper_named_like_the_crate_gets_a_sessions_environment() {
    let r = common::within("named helper", || {
        let pool = pool();
        let plant = pool.eval::<()>(
            r#"
            local compile = api.compile_s
            helper = (loadstring or load)([[
                local compile = ...
                return function(n)
                    local f = compile('return _G')
                    VICTIM_ENV = f()
                    return 'hi ' .. n
                end
            ]], '=mlua-isle planted')(compile)
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet('bob') return s");
        let stolen = pool.eval::<String>(
            "return tostring(VICTIM_ENV and rawget(VICTIM_ENV, 'password')) .. ' / ' .. tostring(VICTIM_ERR)",
        );
        (s(plant), s(v), s(stolen))
    });
    eprintln!("named helper: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

/// Lua 5.1, LuaJIT, Luau: `getfenv(level)` from a function unkeyed work
/// planted (`helper`, called by init's `api.greet` in a victim session's
/// request) hands out the environment of a frame further down: the
/// victim's chunk's.
#[test]
fn unkeyed_helper_reads_a_sessions_environment_with_getfenv_levels() {
    let r = common::within("getfenv level", || {
        let pool = pool();
        let plant = pool.eval::<()>(
            r#"
            if not getfenv then return end
            helper = function(n)
                local got = {}
                for level = 1, 6 do
                    local ok, e = pcall(getfenv, level)
                    got[#got + 1] = tostring(ok) .. ':' .. tostring(e) .. ':' .. tostring(ok and type(e) == 'table' and rawget(e, 'password'))
                    if ok and type(e) == 'table' and rawget(e, 'password') then
                        VICTIM_ENV = e
                    end
                end
                GOT = table.concat(got, ' ')
                return 'hi ' .. n
            end
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet2('bob') return s");
        let stolen =
            pool.eval::<String>("return tostring(VICTIM_ENV and rawget(VICTIM_ENV, 'password'))");
        (s(plant), s(v), s(stolen))
    });
    eprintln!("getfenv level: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
}

/// Lua 5.1, LuaJIT, Luau: the sandbox's `getfenv` replaces the shared
/// globals by `getfenv(2)`, "the caller's", but when a C function (`pcall`,
/// `string.gsub`, `table.sort`'s C comparator loop) calls it directly,
/// level 2 is that C function, whose environment is the shared globals.
#[test]
fn a_session_gets_the_shared_globals_from_getfenv_called_by_a_c_function() {
    let r = common::within("getfenv via C", || {
        let pool = pool();
        let a = pool.session("a");
        let got = a.eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local out = {}
            local function try(name, f)
                local ok, g = pcall(f)
                local shared = ok and type(g) == 'table' and g ~= _G and rawget(g, 'helper') ~= nil
                out[#out + 1] = name .. '=' .. tostring(shared)
                if shared and not WROTE then
                    local w = pcall(function() rawset(g, 'SHARED_WRITE', 'from session a') end)
                    g.helper = function(n) return 'hijacked ' .. n end
                    WROTE = name
                end
            end
            try('pcall', function() local ok, g = pcall(getfenv) return g end)
            try('pcall1', function() local ok, g = pcall(getfenv, 1) return g end)
            try('pcall2', function() local ok, g = pcall(getfenv, 2) return g end)
            try('xpcall', function() local ok, g = xpcall(getfenv, function(e) return e end) return g end)
            try('gsub', function()
                local g
                string.gsub('1', '%d', function(x) end)
                local t = {}
                string.gsub('1', '%d', function(x) g = getfenv(2) end)
                return g
            end)
            try('sort', function()
                local g
                table.sort({ 1, 2, 3 }, function(x, y) g = g or getfenv(2) return x < y end)
                return g
            end)
            return table.concat(out, ' ') .. ' wrote=' .. tostring(WROTE)
            "#,
        );
        let unkeyed = pool.eval::<Option<String>>("return SHARED_WRITE");
        let victim = pool
            .session("victim")
            .eval::<String>("local s = api.greet('bob') return s");
        (s(got), s(unkeyed), s(victim))
    });
    eprintln!("getfenv via C: {r:?}");
    assert_eq!(r.1, "None", "a session wrote the shared globals: {r:?}");
    assert_eq!(
        r.2, "\"hi bob\"",
        "a session changed what init's function calls for every tenant: {r:?}"
    );
}

/// Lua 5.1: `load` takes a reader and no environment, but the sandbox's
/// `load` treats a table fourth argument as "the caller gave one" (LuaJIT's
/// rule) and loads with the default: the thread's globals, the shared ones.
#[test]
fn a_session_loads_into_the_shared_globals_with_a_table_fourth_argument() {
    let r = common::within("load 4th table", || {
        let pool = pool();
        let a = pool.session("a");
        let got = a.eval::<String>(
            r#"
            local function reader_of(src)
                local done = false
                return function() if done then return nil end done = true return src end
            end
            local env = {}
            local f, e = api.compile(reader_of("SHARED_WRITE = 'from a' helper = function(n) return 'hijacked ' .. n end"), '=x', 't', env)
            if not f then return 'refused: ' .. tostring(e) end
            local ok, e2 = pcall(f)
            return tostring(ok) .. ' ' .. tostring(e2) .. ' env=' .. tostring(rawget(env, 'SHARED_WRITE'))
            "#,
        );
        let unkeyed = pool.eval::<Option<String>>("return SHARED_WRITE");
        let victim = pool
            .session("victim")
            .eval::<String>("local s = api.greet('bob') return s");
        (s(got), s(unkeyed), s(victim))
    });
    eprintln!("load 4th: {r:?}");
    assert_eq!(r.1, "None", "a session wrote the shared globals: {r:?}");
    assert_eq!(r.2, "\"hi bob\"", "{r:?}");
}

/// No tail call needed: unkeyed work rebinds `helper`, whose result init's
/// `api.greet2` returns to the victim; the result is a table whose
/// `__tostring` / `__concat` / `__index` is a function unkeyed work named
/// like the crate's chunks. The victim touches it (`tostring(s)`, `'x' ..
/// s`, `s.name`): the metamethod's nearest non-crate Lua caller is the
/// victim's own frame, so the VM's `load` hands it the victim's
/// environment.
#[test]
fn a_returned_object_with_a_crate_named_metamethod_gets_a_sessions_environment() {
    let r = common::within("metamethod named", || {
        let pool = pool();
        let plant = pool.eval::<()>(
            r#"
            local compile = api.compile_s
            local steal = (loadstring or load)([[
                local compile = ...
                return function(self, other)
                    local f = compile('return _G')
                    VICTIM_ENV = f()
                    return 'bob'
                end
            ]], '=mlua-isle planted')(compile)
            helper = function(n)
                return setmetatable({}, { __tostring = steal, __concat = steal, __index = steal })
            end
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet2('bob') return 'hi ' .. tostring(s)");
        let stolen =
            pool.eval::<String>("return tostring(VICTIM_ENV and rawget(VICTIM_ENV, 'password'))");
        // Write through it: the victim's globals, and its next request.
        let wrote =
            pool.eval::<()>("if VICTIM_ENV then rawset(VICTIM_ENV, 'password', 'owned') end");
        let after = victim.eval::<Option<String>>("return password");
        (s(plant), s(v), s(stolen), s(wrote), s(after))
    });
    eprintln!("metamethod named: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "unkeyed work read a session's global: {r:?}"
    );
    assert!(
        !r.4.contains("owned"),
        "unkeyed work wrote a session's global: {r:?}"
    );
}

/// A session's values touched by the crate or the host after its code
/// ran: its error object (`__tostring`, `__name`, `__index`), its result
/// table converted to a `Vec`, a `HashMap` (`__index`, `__len`, `__pairs`).
/// If any such metamethod runs outside the session's scope, the VM's
/// `load` (shared by init) is unkeyed work's there, and loads into the
/// shared globals.
#[test]
fn a_sessions_metamethods_run_by_the_crate_do_not_reach_the_shared_globals() {
    let r = common::within("metamethods by the crate", || {
        let pool = pool();
        let a = pool.session("a");
        let prelude = r#"
            local compile = api.compile_s
            local function w(tag)
                return function(...)
                    local ok, f = pcall(compile, "SHARED_WRITE = (SHARED_WRITE or '') .. '" .. tag .. " '")
                    if ok and f then pcall(f) end
                    return 'x'
                end
            end
            local function evil()
                return setmetatable({}, {
                    __tostring = w('tostring'), __index = w('index'), __len = function() w('len')() return 2 end,
                    __pairs = function(t) w('pairs')() return next, {}, nil end,
                    __eq = w('eq'), __lt = w('lt'), __concat = w('concat'), __call = w('call'),
                    __name = 'evil', __close = w('close'),
                })
            end
        "#;
        let mut out = vec![];
        out.push(s(a.eval::<()>(&format!("{prelude} error(evil())"))));
        out.push(s(a.eval::<Vec<String>>(&format!("{prelude} return evil()"))));
        out.push(s(a.eval::<std::collections::HashMap<String, String>>(
            &format!("{prelude} return evil()"),
        )));
        out.push(s(a.eval::<String>(&format!("{prelude} return evil()"))));
        out.push(s(a.eval::<()>(&format!(
            "{prelude} local t = setmetatable({{}}, {{ __index = evil() }}) error(t)"
        ))));
        out.push(s(a.eval::<()>(&format!(
            "{prelude} local ok, e = pcall(error, evil()) error(evil(), 2)"
        ))));
        let unkeyed = pool.eval::<Option<String>>("return SHARED_WRITE");
        let own = a.eval::<Option<String>>("return SHARED_WRITE");
        (out, s(unkeyed), s(own))
    });
    eprintln!("metamethods by the crate: {r:?}");
    assert_eq!(
        r.1, "None",
        "a session's code wrote the shared globals: {r:?}"
    );
}

/// (`async`) A child task resumes, closes, or wraps its parent request's
/// coroutine while the parent is suspended in an async function (mlua's
/// wrapper yielded there): the VM must survive and keep serving others.
#[cfg(feature = "async")]
#[test]
fn a_child_resumes_or_closes_its_suspended_parent_request() {
    common::in_child(
        "a_child_resumes_or_closes_its_suspended_parent_request",
        || {
            let r = common::within("child vs parent", || {
                let pool = IslePool::builder()
                    .workers(1)
                    .sandbox(true)
                    .task_library(true)
                    .default_timeout(Duration::from_secs(3))
                    .init(|lua| lua.load(INIT).exec())
                    .build()
                    .unwrap();
                let a = pool.session("a");
                let mut out = vec![];
                for op in [
                    "coroutine.resume(parent, 'junk')",
                    "coroutine.resume(parent)",
                    "coroutine.close and coroutine.close(parent)",
                    "coroutine.wrap(function() coroutine.resume(parent, 1, 2, 3) end)()",
                ] {
                    let src = format!(
                        r#"
                    local parent = coroutine.running()
                    local h = task.spawn(function()
                        local r = {{ pcall(function() return {op} end) }}
                        for i = 1, #r do r[i] = tostring(r[i]) end
                        NOTE = table.concat(r, ' ')
                    end)
                    task.sleep(0.02)
                    return 'parent done ' .. tostring(NOTE)
                    "#
                    );
                    out.push(s(a.eval::<String>(&src)));
                }
                let b = s(pool
                    .session("b")
                    .eval::<String>("task.sleep(0.01) return 'b ok'"));
                let u = s(pool.eval::<String>("return 'u ok'"));
                (out, b, u)
            });
            eprintln!("child vs parent: {r:?}");
            assert_eq!(r.1, "\"b ok\"", "{r:?}");
            assert_eq!(r.2, "\"u ok\"", "{r:?}");
        },
    );
}

/// Lua 5.1, LuaJIT, Luau, taken to its end: session `a` gets the shared
/// globals (`pcall(getfenv)`), rebinds `helper` (which init's `api.greet2`
/// calls for every tenant), and its function, running in session `b`'s
/// request, takes `b`'s environment with `getfenv(level)`.
#[test]
fn a_session_reads_another_sessions_globals_through_getfenv() {
    let r = common::within("a reads b", || {
        let pool = pool();
        let a = pool.session("a");
        let b = pool.session("b");
        b.eval::<()>("password = 'hunter2'").unwrap();
        let plant = a.eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local _, g = pcall(getfenv)
            if type(g) ~= 'table' or rawget(g, 'helper') == nil then return 'no shared globals' end
            local mine = _G
            g.helper = function(n)
                for level = 2, 8 do
                    local ok, e = pcall(getfenv, level)
                    if ok and type(e) == 'table' and rawget(e, 'password') and e ~= mine then
                        rawset(mine, 'STOLEN', rawget(e, 'password'))
                        rawset(e, 'password', 'changed by a')
                    end
                end
                return 'hi ' .. n
            end
            return 'planted'
            "#,
        );
        let v = b.eval::<String>("local s = api.greet2('bob') return s");
        let stolen = a.eval::<Option<String>>("return rawget(_G, 'STOLEN')");
        let after = b.eval::<Option<String>>("return password");
        (s(plant), s(v), s(stolen), s(after))
    });
    eprintln!("a reads b: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "session a read session b's global: {r:?}"
    );
    assert!(
        !r.3.contains("changed by a"),
        "session a wrote session b's global: {r:?}"
    );
}

/// Lua 5.1, LuaJIT, Luau: a function `init` defined in an environment of
/// its own (a plugin loaded with `setfenv(chunk, env)`, a common 5.1
/// pattern). Its environment is neither the globals nor a view: the
/// sandbox's `getfenv` hands out the real, writable table, and `setfenv`
/// replaces it, for every tenant.
#[test]
fn getfenv_and_setfenv_on_a_function_init_gave_its_own_environment() {
    let r = common::within("plugin env", || {
        let pool = pool_with(
            r#"
            api = {}
            if setfenv then
                local penv = setmetatable({ prefix = 'hi ' }, { __index = _G })
                local chunk = loadstring("function greet3(n) return prefix .. n end")
                setfenv(chunk, penv)
                chunk()
                api.greet3 = penv.greet3
            end
            "#,
        );
        let a = pool.session("a");
        let w = a.eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local out = {}
            local e = getfenv(api.greet3)
            out[#out + 1] = tostring(pcall(function() e.prefix = 'written by a: ' end))
            return table.concat(out, ' ')
            "#,
        );
        let b1 = pool
            .session("b")
            .eval::<Option<String>>("return api.greet3 and api.greet3('bob')");
        let sw = a.eval::<String>(
            r#"
            if not setfenv then return 'no setfenv' end
            return tostring(pcall(setfenv, api.greet3, { prefix = 'env of a: ' }))
            "#,
        );
        let b2 = pool
            .session("b")
            .eval::<Option<String>>("return api.greet3 and api.greet3('bob')");
        (s(w), s(b1), s(sw), s(b2))
    });
    eprintln!("plugin env: {r:?}");
    assert!(
        !r.1.contains("written by a"),
        "a wrote a table init shared: {r:?}"
    );
    assert!(
        !r.3.contains("env of a"),
        "a replaced the environment of init's function: {r:?}"
    );
}

/// (`async`, Lua 5.4/5.5) `handle:cancel()` on a suspended child: the
/// child's future is dropped inside `Children::poll` while its request is
/// still pending, so its coroutine waits in `CLOSING`, and its `__close`
/// handler runs at the next `close_terminated`: outside the request's
/// scope (no session: the VM's `load` loads into the shared globals), or
/// in another tenant's request.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_cancelled_childs_close_handler_runs_outside_its_request() {
    let r = common::within("cancel child close", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .task_library(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| lua.load(INIT).exec())
            .build()
            .unwrap();
        let a = pool.session("a");
        let ra = a
            .capture_print()
            .eval::<String>(
                r#"
            local compile = api.compile_s
            local h = task.spawn(function()
                local x <close> = setmetatable({}, { __close = function()
                    print('handler of a')
                    local f = compile("SHARED_WRITE = 'from a close handler'")
                    f()
                    NOTE = 'handler ran'
                end })
                task.sleep(10)
            end)
            task.sleep(0.005)
            h:cancel()
            task.sleep(0.005)
            task.sleep(0.005)
            return 'a done ' .. tostring(rawget(_G, 'NOTE'))
            "#,
            )
            .map(|p| (p.result.map_err(|e| e.to_string()), p.lines));
        let b = pool.session("b");
        let rb = b
            .capture_print()
            .eval::<String>("task.sleep(0.02) return 'b done'")
            .map(|p| (p.result.map_err(|e| e.to_string()), p.lines));
        let unkeyed = pool.eval::<Option<String>>("return SHARED_WRITE");
        let note = a.eval::<Option<String>>("return NOTE");
        (format!("{ra:?}"), format!("{rb:?}"), s(unkeyed), s(note))
    });
    eprintln!("cancel child close: {r:?}");
    assert_eq!(
        r.2, "None",
        "a session's handler wrote the shared globals: {r:?}"
    );
    assert!(
        !r.1.contains("handler of a"),
        "a's handler printed into b's capture: {r:?}"
    );
}

/// (`async`, Lua 5.4/5.5) The handler above taken to its end: session `a`
/// rebinds `helper` in the shared globals; init's `api.greet2` hands its
/// result to session `b`, whose `tostring` runs a's `__tostring` (named
/// like the crate's chunks) with b's frame its nearest caller: the VM's
/// `load` gives it b's environment.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_session_takes_another_sessions_environment_through_a_cancelled_child() {
    let r = common::within("a takes b", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .task_library(true)
            .default_timeout(Duration::from_secs(5))
            .init(|lua| lua.load(INIT).exec())
            .build()
            .unwrap();
        let a = pool.session("a");
        let b = pool.session("b");
        b.eval::<()>("password = 'hunter2'").unwrap();
        let ra = a.eval::<String>(
            r#"
            local compile = api.compile_s
            local mine = _G
            local steal = load([[
                local compile, mine = ...
                return function()
                    local env = compile('return _G')()
                    rawset(mine, 'STOLEN', rawget(env, 'password'))
                    rawset(env, 'password', 'changed by a')
                    return 'bob'
                end
            ]], '=mlua-isle a')(compile, mine)
            local h = task.spawn(function()
                local x <close> = setmetatable({}, { __close = function()
                    local plant = compile("local steal = ... helper = function(n) return setmetatable({}, { __tostring = steal }) end")
                    plant(steal)
                end })
                task.sleep(10)
            end)
            task.sleep(0.005)
            h:cancel()
            task.sleep(0.005)
            task.sleep(0.005)
            return 'a done'
            "#,
        );
        let v = b.eval::<String>("local s = api.greet2('bob') return 'hi ' .. tostring(s)");
        let stolen = a.eval::<Option<String>>("return rawget(_G, 'STOLEN')");
        let after = b.eval::<Option<String>>("return password");
        (s(ra), s(v), s(stolen), s(after))
    });
    eprintln!("a takes b: {r:?}");
    assert!(
        !r.2.contains("hunter2"),
        "session a read session b's global: {r:?}"
    );
    assert!(
        !r.3.contains("changed by a"),
        "session a wrote session b's global: {r:?}"
    );
}

/// (`async`, Lua 5.4/5.5) The same handler, looping: it runs outside any
/// request, so no time limit is its. Other tenants must still be served
/// (the VM replaced) within their time limits.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_cancelled_childs_looping_close_handler_does_not_wedge_the_vm_for_good() {
    common::in_child(
        "a_cancelled_childs_looping_close_handler_does_not_wedge_the_vm_for_good",
        || {
            let r = common::within("looping close", || {
                let pool = IslePool::builder()
                    .workers(1)
                    .sandbox(true)
                    .task_library(true)
                    .default_timeout(Duration::from_millis(500))
                    .stop_grace(Duration::from_millis(200))
                    .build()
                    .unwrap();
                let a = pool.session("a");
                let t0 = std::time::Instant::now();
                let ra = a.eval::<String>(
                r#"
                local h = task.spawn(function()
                    local x <close> = setmetatable({}, { __close = function() while true do end end })
                    task.sleep(10)
                end)
                task.sleep(0.005)
                h:cancel()
                task.sleep(0.005)
                return 'a done'
                "#,
            );
                let ta = t0.elapsed();
                let b = pool.session("b");
                // Served again (each try waits at most its 500 ms limit).
                let mut rb = vec![];
                common::eventually("session b is served", || {
                    rb.push(s(b.eval::<String>("return 'b ok'")));
                    rb.last().is_some_and(|x| x.contains("b ok"))
                });
                let u = s(pool.eval::<String>("return 'u ok'"));
                (s(ra), ta, rb, u)
            });
            eprintln!("looping close: {r:?}");
            assert!(r.2.last().is_some_and(|x| x.contains("b ok")), "{r:?}");
            assert!(r.3.contains("u ok"), "{r:?}");
        },
    );
}

/// LuaJIT: what `require` hands out of LuaJIT's own modules (`jit.util`
/// reads functions' constants and upvalue names; `jit.profile` installs a
/// callback run at sample ticks, outside any hook).
#[test]
fn luajit_modules_reachable_by_require() {
    let r = common::within("jit modules", || {
        let pool = pool();
        pool.session("a").eval::<String>(
            r#"
            local out = {}
            for _, m in ipairs({ 'jit.util', 'jit.profile', 'jit.opt', 'jit.vmdef', 'string.buffer', 'table.new', 'table.clear', 'ffi', 'bit' }) do
                local ok, v = pcall(require, m)
                out[#out + 1] = m .. '=' .. (ok and type(v) or 'refused')
            end
            return table.concat(out, ' ')
            "#,
        )
    });
    eprintln!("jit modules: {r:?}");
    let s = format!("{r:?}");
    assert!(
        !s.contains("jit.util=table") && !s.contains("jit.profile=table"),
        "{s}"
    );
}

/// Userdata every tenant shares a metatable with: mlua's error values
/// (a Rust function's error, caught by `pcall`) and (`async`) `task.spawn`
/// handles. A metatable Lua code can read and write is one every tenant's
/// values of that type use.
#[test]
fn shared_userdata_metatables_are_not_writable() {
    let r = common::within("userdata mt", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .task_library(cfg!(feature = "async"))
            .default_timeout(Duration::from_secs(5))
            .init(|lua| lua.load(INIT).exec())
            .build()
            .unwrap();
        let a = pool.session("a");
        let got = a.eval::<String>(
            r#"
            local out = {}
            local function probe(name, v)
                local mt = getmetatable(v)
                out[#out + 1] = name .. ':' .. type(v) .. ':' .. tostring(type(mt))
                if type(mt) == 'table' then
                    out[#out + 1] = 'write=' .. tostring(pcall(function()
                        mt.__tostring = function() return 'planted by a' end
                        mt.__index = function() return function() return 'planted by a' end end
                    end))
                end
            end
            for _, f in ipairs({
                function() return string.find('x', '[') end,
                function() return string.rep('x', -1, {}) end,
                function() return print(setmetatable({}, { __tostring = function() error({}) end })) end,
                function() return task and task.sleep(-1) end,
                function() return task and task.spawn(42) end,
                function() return collectgarbage('bogus') end,
            }) do
                local ok, e = pcall(f)
                if not ok then probe('err', e) end
            end
            if task then probe('handle', task.spawn(function() end)) end
            return table.concat(out, ' ')
            "#,
        );
        let b = pool.session("b").eval::<String>(
            r#"
            local out = {}
            local ok, e = pcall(function() return task and task.sleep(-1) end)
            out[#out + 1] = tostring(e)
            if task then
                local h = task.spawn(function() return 1 end)
                out[#out + 1] = tostring(h)
                out[#out + 1] = tostring((h:join()))
            end
            return table.concat(out, ' ')
            "#,
        );
        (s(got), s(b))
    });
    eprintln!("userdata mt: {r:?}");
    assert!(!r.1.contains("planted by a"), "{r:?}");
}
