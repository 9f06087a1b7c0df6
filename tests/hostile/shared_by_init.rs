//! Paths between tenants through what `init` shares (the VM's `load`, a
//! function of the shared globals a session calls, `package.loaded`), the
//! functions the session machinery shares between sessions (the session
//! `load` on Lua 5.1, LuaJIT and Luau), the VM's random generator, and
//! (`async`) `task.spawn` children made as a request ends. Each runs under
//! `common::within`: a hang fails.

use crate::common;
use crate::tenants::sandboxed_pool as pool_with;

use mlua_isle::IslePool;

const INIT: &str = r#"
    config = { greeting = 'hello' }
    api = { compile = load or loadstring, compile_s = loadstring or load,
            greet = function(name) return helper(name) end }
    function helper(name) return 'hi ' .. name end
"#;

fn pool() -> IslePool {
    pool_with(INIT)
}

/// The VM's own `load`, shared by init (`api.compile`), called as the body
/// of a coroutine: the coroutine's stack holds no session frame, so the
/// "caller's session" lookup finds none and the chunk gets the shared
/// globals. From there, rebind `helper`, which `api.greet` (init's) calls
/// for every tenant.
#[test]
fn vm_load_in_a_fresh_coroutine_loads_into_the_shared_globals() {
    let r = common::within("coroutine load", || {
        let pool = pool();
        let attacker = pool.session("attacker");
        let got = attacker.eval::<String>(
            r#"
            local f = coroutine.wrap(api.compile_s)(
                "helper = function(n) STOLEN = n return 'pwned' end return tostring(_G == nil) .. ':' .. type(rawget(_G, 'helper'))")
            if not f then return 'no chunk' end
            return f()
            "#,
        );
        let victim = pool.session("victim");
        let v = victim.eval::<String>("return api.greet('victim-secret')");
        let unkeyed = pool.eval::<Option<String>>("return STOLEN");
        (got, v, unkeyed)
    });
    assert_eq!(
        r.1,
        Ok("hi victim-secret".to_string()),
        "a session rebound what init's function calls for everyone: {r:?}"
    );
    assert_eq!(r.2, Ok(None), "a session wrote the shared globals: {r:?}");
}

/// Lua 5.1, LuaJIT, Luau: the session `load` (one function for every
/// session of the VM) runs in an environment that is neither the globals
/// nor locked, so `setfenv(load, _G)` is allowed; `caller_env` then finds
/// the *attacker's* environment on every other session's `load` call.
#[test]
fn setfenv_on_the_shared_session_load_moves_other_sessions_chunks() {
    let r = common::within("setfenv load", || {
        let pool = pool();
        let attacker = pool.session("attacker");
        let a = attacker.eval::<String>(
            r#"
            if not setfenv then return 'no setfenv' end
            local ok, e = pcall(setfenv, load or loadstring, _G)
            local ok2, e2 = pcall(setfenv, loadstring or load, _G)
            return tostring(ok) .. ' ' .. tostring(e) .. ' / ' .. tostring(ok2) .. ' ' .. tostring(e2)
            "#,
        );
        let victim = pool.session("victim");
        let v = victim.eval::<String>(
            r#"
            local f = (loadstring or load)("secret = 'victim-secret'")
            if not f then return 'nil' end
            f()
            return tostring(rawget(_G, 'secret'))
            "#,
        );
        let seen = attacker.eval::<Option<String>>("return rawget(_G, 'secret')");
        (a, v, seen)
    });
    assert_eq!(r.2, Ok(None), "the attacker read a victim's global: {r:?}");
    assert_eq!(r.1, Ok("victim-secret".to_string()), "{r:?}");
}

/// Lua 5.1, LuaJIT, Luau: `getfenv(load)` hands out the environment the
/// session `load` was made in: one plain table for every session of the
/// VM, writable: a channel between tenants.
#[test]
fn getfenv_of_the_session_load_is_a_writable_shared_table() {
    let r = common::within("getfenv load", || {
        let pool = pool();
        let a = pool.session("a").eval::<String>(
            r#"
            if not getfenv then return 'no getfenv' end
            local env = getfenv(load or loadstring)
            env.note = 'from a'
            return tostring(env == _G)
            "#,
        );
        let b = pool.session("b").eval::<Option<String>>(
            r#"
            if not getfenv then return nil end
            return getfenv(loadstring or load).note
            "#,
        );
        (a, b)
    });
    assert_eq!(
        r.1,
        Ok(None),
        "a message from one session reached another: {r:?}"
    );
}

/// The coroutine path taken to its end: a session writes the shared
/// globals, plants `helper` (which init's `api.greet` calls), and the
/// planted function, running inside the victim's request, loads a chunk
/// with the VM's `load`: `session_of_caller` finds the *victim's* frame,
/// so the chunk runs in the victim's environment and hands it over.
#[test]
fn a_session_takes_over_another_sessions_environment() {
    let r = common::within("takeover", || {
        let pool = pool();
        let attacker = pool.session("attacker");
        let planted = attacker.eval::<String>(
            r#"
            local f = coroutine.wrap(api.compile_s)([[
                local compile = api.compile_s
                helper = function(n)
                    VICTIM_ENV = compile('return _G')()
                    return 'hi ' .. n
                end
                return 'planted'
            ]])
            return f()
            "#,
        );
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet('bob') return s");
        let stolen = attacker.eval::<String>(
            r#"
            return coroutine.wrap(api.compile_s)([[
                local e = VICTIM_ENV
                if not e then return 'nothing' end
                e.password_seen = true
                e.api = { greet = function() return 'hijacked' end }
                return tostring(e.password)
            ]])()
            "#,
        );
        let after = victim.eval::<String>("return api.greet('bob')");
        (planted, v, stolen, after)
    });
    eprintln!("takeover: {r:?}");
    assert_ne!(
        r.2,
        Ok("hunter2".to_string()),
        "a session read another session's global: {r:?}"
    );
    assert_eq!(r.3, Ok("hi bob".to_string()), "{r:?}");
}

/// A handle to a session's value, inside a table argument of another
/// session's request.
#[test]
fn a_sessions_handle_nested_in_another_sessions_arguments() {
    let r = common::within("handle nested", || {
        let pool = pool();
        let a = pool.session("a");
        let b = pool.session("b");
        a.eval::<()>("secret = 'a-secret'").unwrap();
        let h: mlua_isle::LuaHandle = a.eval("return function() return secret end").unwrap();
        let r1 = b.eval_with::<String>("local t = ... return t[1]()", (vec![h.clone()],));
        let r2 = b.eval_with::<String>(
            "local t = ... return t.f()",
            (std::collections::HashMap::from([(
                "f".to_string(),
                h.clone(),
            )]),),
        );
        let r3 = b.eval_with::<String>("local a, b = ... return b()", (1, Some(h.clone())));
        (
            r1.map_err(|e| e.to_string()),
            r2.map_err(|e| e.to_string()),
            r3.map_err(|e| e.to_string()),
        )
    });
    assert!(r.0.is_err() && r.1.is_err() && r.2.is_err(), "{r:?}");
}

/// The VM's random generator is one state for every tenant (on Lua 5.1 to
/// 5.3, C's, the process's): a seed from one tenant would fix every
/// other's numbers. The sandbox refuses `math.randomseed`.
#[test]
fn no_session_seeds_the_random_generator_every_tenant_shares() {
    let r = common::within("randomseed", || {
        let pool = pool();
        let a = pool.session("a").eval::<()>("math.randomseed(1234)");
        let unkeyed = pool.eval::<()>("math.randomseed(1234)");
        let drawn = pool.session("b").eval::<i64>("return math.random(1, 10)");
        (a, unkeyed, drawn)
    });
    for refused in [&r.0, &r.1] {
        assert!(
            matches!(refused, Err(mlua_isle::IsleError::Lua(e))
                if e.message().contains("math.randomseed is not available in the sandbox")),
            "{r:?}"
        );
    }
    assert!(matches!(r.2, Ok(1..=10)), "{r:?}");
}

/// (`async`, Lua 5.4/5.5) A `task.spawn` child's `__close` handler runs
/// when its request ends (the child's coroutine is closed after the
/// request's job adopted its children): a `task.spawn` made there is left
/// in the VM thread's `SPAWNED` list, and the next request polled on that
/// VM (another session's) adopts it: the planted child runs in the
/// victim's request, prints into the victim's capture, and its error
/// fails the victim's request.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_child_spawned_by_a_close_handler_runs_in_the_next_tenants_request() {
    let r = common::within("spawn from __close", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .task_library(true)
            .default_timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let a = pool.session("a");
        let ra = a.eval::<String>(
            r#"
            task.spawn(function()
                local x <close> = setmetatable({}, { __close = function()
                    task.spawn(function()
                        print('printed by a')
                        task.sleep(0)
                        error('planted by a', 0)
                    end)
                end })
                task.sleep(10)
            end)
            task.sleep(0.01)
            return 'a done'
            "#,
        );
        let b = pool.session("b");
        let rb = b
            .capture_print()
            .eval::<String>("task.sleep(0.05) return 'b done'")
            .map(|p| (p.result.map_err(|e| e.to_string()), p.lines));
        (ra.map_err(|e| e.to_string()), rb.map_err(|e| e.to_string()))
    });
    assert_eq!(
        r.1,
        Ok((Ok("b done".to_string()), vec![])),
        "another tenant's child ran in b's request: {r:?}"
    );
}

/// The same, printing only: its line is in the victim's capture.
/// (`async`, Lua 5.4/5.5) A `task.spawn` child's `__close` handler runs
/// when its request ends (the child's coroutine is closed after the
/// request's job adopted its children): a `task.spawn` made there is left
/// in the VM thread's `SPAWNED` list, and the next request polled on that
/// VM (another session's) adopts it: the planted child runs in the
/// victim's request, prints into the victim's capture, and its error
/// fails the victim's request.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_child_spawned_by_a_close_handler_prints_into_the_next_tenants_capture() {
    let r = common::within("spawn from __close", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .task_library(true)
            .default_timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let a = pool.session("a");
        let ra = a.eval::<String>(
            r#"
            task.spawn(function()
                local x <close> = setmetatable({}, { __close = function()
                    task.spawn(function()
                        print('printed by a')
                        task.sleep(0)
                    end)
                end })
                task.sleep(10)
            end)
            task.sleep(0.01)
            return 'a done'
            "#,
        );
        let b = pool.session("b");
        let rb = b
            .capture_print()
            .eval::<String>("task.sleep(0.05) return 'b done'")
            .map(|p| (p.result.map_err(|e| e.to_string()), p.lines));
        (ra.map_err(|e| e.to_string()), rb.map_err(|e| e.to_string()))
    });
    assert_eq!(
        r.1,
        Ok((Ok("b done".to_string()), vec![])),
        "another tenant's child ran in b's request: {r:?}"
    );
}

/// (`async`, Lua 5.4/5.5) The leak above, taken further: the planted
/// child runs in an unkeyed request and spawns a child of its own, whose
/// coroutine is made for (tagged as) unkeyed work; it keeps that coroutine
/// (`coroutine.running()`) in the attacker's environment. Once finished it
/// is a spare for unkeyed work, and a later unkeyed request suspends on it:
/// the attacking session resumes it and takes that request's result.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_session_takes_an_unkeyed_requests_result_through_a_planted_child() {
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Poll, Waker};
    let ready = Arc::new(AtomicBool::new(false));
    let waker: Arc<Mutex<Option<Waker>>> = Arc::default();
    let r = common::within("planted child coroutine", {
        let (ready, waker) = (ready.clone(), waker.clone());
        move || {
            let (ready_i, waker_i) = (ready.clone(), waker.clone());
            let pool = IslePool::builder()
                .workers(1)
                .sandbox(true)
                .task_library(true)
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
            a.eval::<String>(
                r#"
                task.spawn(function()
                    local x <close> = setmetatable({}, { __close = function()
                        task.spawn(function()
                            task.spawn(function() HELD = coroutine.running() end)
                        end)
                    end })
                    task.sleep(10)
                end)
                task.sleep(0.01)
                return 'a done'
                "#,
            )
            .unwrap();
            let u0 = pool.eval::<i64>("task.sleep(0.02) return 1");
            let u1 = pool.spawn_eval::<String>("local v = wait_flag() return 'U1: ' .. v");
            let u2 = pool.spawn_eval::<String>("local v = wait_flag() return 'U2 secret: ' .. v");
            common::eventually("both suspended", || {
                pool.metrics().workers[0].suspended == 2
            });
            ready.store(true, Ordering::SeqCst);
            let stolen = a.eval::<String>(
                "if not HELD then return 'no HELD' end \
                 local r = { pcall(coroutine.resume, HELD, 'x') } \
                 for i = 1, #r do r[i] = tostring(r[i]) end return table.concat(r, ' | ')",
            );
            if let Some(w) = waker.lock().take() {
                w.wake();
            }
            (u0, stolen, u1.wait(), u2.wait())
        }
    });
    assert!(
        !matches!(&r.1, Ok(s) if s.contains("U1") || s.contains("U2")),
        "a session took an unkeyed request's result: {r:?}"
    );
}

/// Borderline (SECURITY.md: init's functions read the shared globals at
/// call time; unkeyed work may rebind them). Unkeyed work rebinds `helper`
/// (read by init's `api.greet`); run inside a session's request, it asks
/// the VM's `load` for a chunk, which `session_of_caller` places in that
/// session's environment: unkeyed work gets the session's globals.
#[test]
fn unkeyed_work_gets_a_sessions_environment_through_inits_function() {
    let r = common::within("unkeyed takeover", || {
        let pool = pool();
        pool.eval::<()>(
            r#"
            local compile = api.compile_s
            helper = function(n) VICTIM_ENV = compile('return _G')() return 'hi ' .. n end
            "#,
        )
        .unwrap();
        let victim = pool.session("victim");
        victim.eval::<()>("password = 'hunter2'").unwrap();
        let v = victim.eval::<String>("local s = api.greet('bob') return s");
        let stolen = pool.eval::<Option<String>>("return VICTIM_ENV and VICTIM_ENV.password");
        (v, stolen)
    });
    assert_eq!(r.1, Ok(None), "unkeyed work read a session's global: {r:?}");
}

/// The chunk cache keeps sessions apart, and what `init` keeps the globals
/// and `package.loaded` under is read-only.
#[test]
fn the_chunk_cache_and_inits_aliases_keep_sessions_apart() {
    let r = common::within("blocked", || {
        let pool = pool_with(
            r#"
            config = { greeting = 'hello' }
            app = { globals = _G, loaded = package and package.loaded }
            api = { greet = function(n) return 'hi ' .. n end }
            "#,
        );
        let a = pool.session("a");
        let b = pool.session("b");
        let src = "local n = rawget(_G, 'n') or 0 n = n + 1 rawset(_G, 'n', n) return n";
        let mut out = vec![];
        out.push(a.eval::<i64>(src).map(|x| x.to_string()));
        out.push(a.eval::<i64>(src).map(|x| x.to_string()));
        out.push(b.eval::<i64>(src).map(|x| x.to_string()));
        // fenv on 5.1-family: setfenv of this chunk, getfenv(0) in a coroutine.
        out.push(a.eval::<String>(
            r#"
            local o = {}
            if setfenv then
                o[#o+1] = tostring(pcall(setfenv, 0, {}))
                o[#o+1] = tostring(getfenv(0) == _G)
                o[#o+1] = tostring(coroutine.wrap(function() return getfenv(0) == _G end)())
                o[#o+1] = tostring(pcall(setfenv, api.greet, {}))
                o[#o+1] = tostring(getfenv(api.greet) == _G)
                o[#o+1] = tostring(pcall(setfenv, print, {}))
                o[#o+1] = tostring(pcall(setfenv, string.format, {}))
            end
            o[#o+1] = tostring(pcall(function() app.globals.x = 1 end))
            o[#o+1] = tostring(app.globals.config == config)
            o[#o+1] = tostring(pcall(rawset, app.globals, 'x', 1))
            o[#o+1] = tostring(getmetatable('') )
            o[#o+1] = tostring(pcall(function() ('').x = 1 end))
            o[#o+1] = tostring(app.loaded and app.loaded._G == nil)
            return table.concat(o, ' ')
            "#,
        ));
        out.push(
            pool.eval::<Option<i64>>("return x")
                .map(|x| format!("{x:?}")),
        );
        out
    });
    assert_eq!(r[0], Ok("1".into()));
    assert_eq!(r[1], Ok("2".into()));
    assert_eq!(r[2], Ok("1".into()));
    assert_eq!(r[4], Ok("None".into()));
}

/// `init` keeps `package.loaded` (or `package`) in a shared table, as it
/// may keep `_G`: the real `io`, `debug` and `package` that the sandbox
/// took from the globals are what the sandbox gives instead, there too.
#[test]
fn package_loaded_kept_by_init_hands_out_what_the_sandbox_gives() {
    let r = common::within("package.loaded alias", || {
        let pool = pool_with(
            r#"
            app = { modules = package and package.loaded, pkg = package }
            "#,
        );
        pool.session("a").eval::<String>(
            r#"
            local m, p = app.modules, app.pkg
            if not m then return 'no package' end -- Luau
            local function refused(f, ...)
                local ok, e = pcall(f, ...)
                return not ok and tostring(e):find('not available in the sandbox') ~= nil
            end
            return table.concat({
                tostring(refused(function() return m.io.open('/etc/hostname') end)),
                tostring(refused(function() return m.io.popen('true') end)),
                tostring(refused(function() return m.debug.getregistry() end)),
                tostring(refused(function() return p.loadlib('x', 'y') end)),
                tostring(not pcall(function() return p.loaded.io.open('/etc/hostname') end)),
                tostring(m.string.upper('x')),
            }, ' ')
            "#,
        )
    });
    assert!(
        matches!(
            r.as_deref(),
            Ok("true true true true true X") | Ok("no package")
        ),
        "{r:?}"
    );
}

/// Unkeyed sandboxed code puts a metatable on the shared globals: its
/// `__newindex` would run inside the host's own writes to them
/// (`pool.reload`'s `f`), keep the real table the host puts there, and
/// change what every session reads (or make every reload fail). The
/// sandbox refuses a metatable on the shared globals; on Luau, freezing
/// them too.
#[test]
fn unkeyed_work_cannot_hook_the_hosts_writes_to_the_globals() {
    common::within("globals' metatable", || {
        let p = pool();
        let r = p.eval::<()>(
            "local box = {} function getbox() return box end \
             setmetatable(_G, { __newindex = function(t, k, v) box[k] = v rawset(t, k, v) end })",
        );
        let Err(mlua_isle::IsleError::Lua(e)) = r else {
            panic!("{r:?}")
        };
        assert!(e.message().contains("no metatable"), "{}", e.message());
        assert_eq!(p.eval::<bool>("return getmetatable(_G) == nil"), Ok(true));
        let v = p
            .reload(|lua| {
                let news = lua.create_table()?;
                news.set("motd", "hello")?;
                lua.globals().set("news", news)
            })
            .unwrap();
        assert_eq!(v, 1);
        let s = p.session("victim");
        assert_eq!(
            s.eval::<String>("return news.motd"),
            Ok("hello".to_string())
        );
        #[cfg(feature = "luau")]
        {
            let r = p.eval::<()>("table.freeze(_G)");
            assert!(r.is_err(), "{r:?}");
            assert_eq!(p.reload(|lua| lua.globals().set("version", 2)), Ok(2));
        }
    });
}

/// `load` with a reader that returns numbers (Lua takes them as their
/// text): they count against `max_load_size` as strings do.
#[test]
#[cfg(not(feature = "luau"))] // Luau has no `load` of Lua source
fn a_load_reader_returning_numbers_counts_against_the_size_limit() {
    common::within("reader of numbers", || {
        let p = pool();
        let r: (bool, String) = p
            .eval(
                "local n = 0 \
                 local f, e = load(function() \
                     n = n + 1 \
                     if n == 1 then return 'return 0' end \
                     if n <= 100000 then return -1/0 end \
                 end) \
                 return f ~= nil, tostring(e)",
            )
            .unwrap();
        assert!(!r.0 && r.1.contains("too large"), "{r:?}");
    });
}

/// A metatable `init` put on the shared globals (a strict mode, say) is
/// out of reach of sandboxed code: `getmetatable(_G)` shows none, so no
/// tenant edits its `__newindex` to hook the host's later writes.
#[test]
fn a_metatable_init_put_on_the_globals_is_out_of_reach() {
    common::within("init's metatable on the globals", || {
        let p = pool_with("setmetatable(_G, { __index = function() end })");
        assert_eq!(p.eval::<bool>("return getmetatable(_G) == nil"), Ok(true));
        let r = p.eval::<()>(
            "local box = {} function getbox() return box end \
             local mt = getmetatable(_G) \
             mt.__newindex = function(t, k, v) box[k] = v rawset(t, k, v) end",
        );
        assert!(r.is_err(), "{r:?}");
        p.reload(|lua| {
            let news = lua.create_table()?;
            news.set("motd", "hello")?;
            lua.globals().set("news", news)
        })
        .unwrap();
        let _ = p.eval::<()>("getbox().news.motd = 'pwned'");
        assert_eq!(
            p.session("victim").eval::<String>("return news.motd"),
            Ok("hello".to_string())
        );
        // Other values' metatables read as before.
        assert_eq!(p.eval::<bool>("return getmetatable('') ~= nil"), Ok(true));
        assert_eq!(
            p.eval::<bool>("local mt = {} return getmetatable(setmetatable({}, mt)) == mt"),
            Ok(true)
        );
    });
}
