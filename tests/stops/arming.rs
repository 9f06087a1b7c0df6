//! The interrupt hook armed on demand (src/interrupt/alarm/): no hook runs until a
//! request must stop; then a signal arms the Lua thread running at that
//! moment, and every switch between Lua threads is tracked so the hook
//! follows.
//!
//! Checked here: the tracked `coroutine.resume`, `close` and `wrap` behave
//! like Lua's own; a cancel or a time limit stops Lua code on every kind of
//! Lua thread (the main one, coroutines several deep, a coroutine created
//! before the stop and resumed while unwinding, a thread resumed from
//! Rust); late cancels leave the next request alone; and a stress run of
//! cancels at random instants, where every request resolves as allowed and
//! the VMs keep serving.

use crate::common;

use std::time::{Duration, Instant};

use common::{register_signal, within, Rng, PATIENCE};
use crossbeam_channel::Receiver;
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{Isle, IsleError, IslePool, Task};

/// Snippets run by plain mlua and by an isle; each returns a string (an
/// error it catches is part of it), and both must agree.
const SAME_AS_LUA: &[&str] = &[
    // wrap: values in and out, through yields
    "local g = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2, 'end' end)
     local x = g(1) local y, z = g(5) return x .. ',' .. y .. ',' .. z",
    // wrap: a string error gets the caller's position
    "local g = coroutine.wrap(function() error('boom') end)
     local ok, e = pcall(g) return tostring(ok) .. ' ' .. e",
    "local g = coroutine.wrap(function() error('boom', 0) end)
     local ok, e = pcall(g) return e",
    // wrap: a table error is passed as it is
    "local g = coroutine.wrap(function() error({ code = 7 }) end)
     local ok, e = pcall(g) return type(e) .. e.code",
    // wrap: resuming a dead coroutine
    "local g = coroutine.wrap(function() end) g()
     local ok, e = pcall(g) return e",
    // wrap: a coroutine resuming itself
    "local g g = coroutine.wrap(function() return g() end)
     local ok, e = pcall(g) return e",
    // wrap: not a function
    "local ok, e = pcall(coroutine.wrap, 42) return e",
    // wrap: a generator of generators
    "local function gen(n) return coroutine.wrap(function() for i = 1, n do coroutine.yield(i) end end) end
     local outer = coroutine.wrap(function()
         for n = 1, 3 do local s = 0 for v in gen(n) do s = s + v end coroutine.yield(s) end
     end)
     return outer() .. outer() .. outer()",
    // resume: results and errors
    "return select('#', coroutine.resume(coroutine.create(function() return 1, 2, 3 end)))",
    "local ok, e = coroutine.resume(coroutine.create(function() error('x') end)) return tostring(ok) .. e",
    "local ok, e = coroutine.resume(coroutine.create(function() error({}) end)) return type(e)",
    "local ok, e = pcall(coroutine.resume, 42) return e",
    "local ok, e = pcall(coroutine.resume) return e",
    "local co = coroutine.create(function() end) coroutine.resume(co)
     local ok, e = coroutine.resume(co) return tostring(ok) .. ' ' .. e",
    "local co = coroutine.create(function(...) return select('#', ...) end)
     return tostring(select(2, coroutine.resume(co, nil, nil, nil)))",
    // status, running, isyieldable through the tracked functions
    "local log = {}
     local co co = coroutine.create(function()
         log[#log + 1] = coroutine.status(co)
         log[#log + 1] = tostring(coroutine.isyieldable())
         coroutine.yield()
     end)
     log[#log + 1] = coroutine.status(co)
     coroutine.resume(co)
     log[#log + 1] = coroutine.status(co)
     coroutine.resume(co)
     log[#log + 1] = coroutine.status(co)
     return table.concat(log, ' ')",
];

/// More of them, using Lua 5.4's `<close>` and `coroutine.close`.
#[cfg(any(feature = "lua54", feature = "lua55"))]
const SAME_AS_LUA_54: &[&str] = &[
    // wrap: __close handlers run when the coroutine dies by an error, and may
    // replace it
    "local g = coroutine.wrap(function()
         local x <close> = setmetatable({}, { __close = function(_, e) error('closing after ' .. tostring(e), 0) end })
         error('first', 0)
     end)
     local ok, e = pcall(g) return e",
    // close: a suspended coroutine's __close handlers run; errors returned
    "local co = coroutine.create(function()
         local x <close> = setmetatable({}, { __close = function() error('in close', 0) end })
         coroutine.yield()
     end)
     coroutine.resume(co)
     local ok, e = coroutine.close(co) return tostring(ok) .. ' ' .. e .. ' ' .. coroutine.status(co)",
    "local co = coroutine.create(function() coroutine.yield() end) coroutine.resume(co)
     return tostring(coroutine.close(co)) .. coroutine.status(co)",
    "local co = coroutine.create(function() error('died', 0) end) coroutine.resume(co)
     local ok, e = coroutine.close(co) return tostring(ok) .. ' ' .. tostring(e)",
    "return tostring(coroutine.close(coroutine.create(print)))",
    #[cfg(not(feature = "async"))]
    "local ok, e = pcall(coroutine.close, coroutine.running()) return e",
    "local ok, e = pcall(coroutine.close, 42) return e",
];

/// With `async`, a request runs in a coroutine of its own, so
/// `coroutine.running()` is not the main thread: closing it is an error on
/// 5.4 ("running coroutine") and, on 5.5, ends the request, which fails.
/// Either way the VM serves on.
#[cfg(all(feature = "async", any(feature = "lua54", feature = "lua55")))]
#[test]
fn a_request_closing_its_own_coroutine_fails_and_the_vm_serves_on() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    let session = pool.session("s");
    let code = "local ok, e = pcall(coroutine.close, coroutine.running()) return tostring(e)";
    let results = [
        isle.eval::<String>(code),
        pool.eval::<String>(code),
        session.eval::<String>(code),
    ];
    for r in results {
        match r {
            Ok(e) => assert!(e.contains("running coroutine"), "{e}"),
            #[cfg(feature = "lua55")]
            Err(IsleError::Lua(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    assert_eq!(session.eval::<i64>("1 + 1"), Ok(2));
}

/// A coroutine closing itself: an error on 5.4; on 5.5 it ends the
/// coroutine (its `__close` handlers run, errors returned by `resume`).
#[cfg(feature = "lua54")]
const SAME_AS_LUA_SELF_CLOSE: &[&str] = &[
    "local co co = coroutine.create(function() return pcall(coroutine.close, co) end)
     local _, ok, e = coroutine.resume(co) return tostring(ok) .. ' ' .. e",
];
#[cfg(feature = "lua55")]
const SAME_AS_LUA_SELF_CLOSE: &[&str] = &[
    "local co co = coroutine.create(function()
         local x <close> = setmetatable({}, { __close = function() _G.closed = true end })
         coroutine.close() error('not reached')
     end)
     local r = table.pack(coroutine.resume(co))
     return r.n .. ' ' .. tostring(r[1]) .. ' ' .. coroutine.status(co) .. ' ' .. tostring(closed)",
    "local co co = coroutine.create(function()
         local x <close> = setmetatable({}, { __close = function() error('in close', 0) end })
         coroutine.close(co)
     end)
     local ok, e = coroutine.resume(co) return tostring(ok) .. ' ' .. tostring(e)",
    "local g = coroutine.wrap(function() coroutine.close(coroutine.running()) end)
     return select('#', g()) .. tostring(pcall(g))",
];
#[cfg(not(any(feature = "lua54", feature = "lua55")))]
const SAME_AS_LUA_SELF_CLOSE: &[&str] = &[];
#[cfg(not(any(feature = "lua54", feature = "lua55")))]
const SAME_AS_LUA_54: &[&str] = &[];

/// From Lua 5.2 on, `coroutine.running()` is the main thread, never `nil`.
#[cfg(not(any(feature = "lua51", feature = "luajit", feature = "luau")))]
const SAME_AS_LUA_52: &[&str] =
    &["local ok, e = coroutine.resume(coroutine.running()) return tostring(ok) .. ' ' .. e"];
#[cfg(any(feature = "lua51", feature = "luajit", feature = "luau"))]
const SAME_AS_LUA_52: &[&str] = &[];

/// A yield across `pcall` (Lua 5.2 on, and LuaJIT, Luau).
#[cfg(not(feature = "lua51"))]
const SAME_AS_LUA_YIELD_PCALL: &[&str] = &["local g = coroutine.wrap(function()
         local ok, v = pcall(function() return coroutine.yield(1) + 1 end) return v
     end)
     g() return tostring(g(41))"];
#[cfg(feature = "lua51")]
const SAME_AS_LUA_YIELD_PCALL: &[&str] = &[];

#[test]
fn tracked_coroutine_functions_behave_like_luas() {
    let plain = Lua::new();
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    for code in SAME_AS_LUA
        .iter()
        .chain(SAME_AS_LUA_52)
        .chain(SAME_AS_LUA_54)
        .chain(SAME_AS_LUA_YIELD_PCALL)
        .chain(SAME_AS_LUA_SELF_CLOSE)
    {
        let want: Result<String, String> = plain
            .load(*code)
            .set_name("=eval")
            .call::<String>(())
            .map_err(|e| e.to_string());
        let want = want.unwrap_or_else(|e| panic!("plain Lua failed on {code}: {e}"));
        assert_eq!(isle.eval::<String>(*code), Ok(want.clone()), "isle: {code}");
        assert_eq!(pool.eval::<String>(*code), Ok(want.clone()), "pool: {code}");
        let session = pool.session("s");
        assert_eq!(session.eval::<String>(*code), Ok(want), "session: {code}");
    }
}

/// Lua code that reports `started()` and then never ends by itself, each
/// on a different kind of Lua thread.
const ENDLESS: &[(&str, &str)] = &[
    ("main thread", "started() while true do end"),
    (
        "coroutine.wrap",
        "coroutine.wrap(function() started() while true do end end)()",
    ),
    (
        "coroutine.resume",
        "coroutine.resume(coroutine.create(function() started() while true do end end))",
    ),
    (
        "three coroutines deep",
        "local function nest(n, f)
             if n == 0 then return f() end
             return coroutine.wrap(function() return nest(n - 1, f) end)()
         end
         nest(3, function() started() while true do end end)",
    ),
    (
        "pcall loop in a coroutine",
        "coroutine.wrap(function()
             started()
             while true do pcall(function() while true do end end) end
         end)()",
    ),
    (
        "wrap resumed from a pcall loop while stopping",
        "local spin = coroutine.wrap(function() coroutine.yield() while true do end end)
         spin()
         started()
         while true do pcall(spin) end",
    ),
    (
        "table.sort comparator in a coroutine",
        "coroutine.wrap(function()
             started()
             table.sort({ 3, 2, 1, 5, 4 }, function(a, b) while true do end end)
         end)()",
    ),
    (
        "thread resumed from Rust",
        "rust_resume(function() started() while true do end end)",
    ),
    (
        "coroutine created in Lua, resumed from Rust",
        "rust_resume_co(coroutine.create(function() started() while true do end end))",
    ),
    (
        "coroutine created in Lua before the stop, resumed from Rust after a yield",
        "local co = coroutine.create(function() coroutine.yield() started() while true do end end)
         rust_resume_co(co) rust_resume_co(co)",
    ),
];

/// More of them, using Lua 5.4's `<close>` and `coroutine.close`.
#[cfg(any(feature = "lua54", feature = "lua55"))]
const ENDLESS_54: &[(&str, &str)] = &[
    (
        // Created (and suspended) before the stop, resumed by a __close
        // handler while the interruption unwinds: it was never armed.
        "coroutine resumed while unwinding",
        "local spin = coroutine.create(function() coroutine.yield() while true do end end)
         coroutine.resume(spin)
         local guard <close> = setmetatable({}, { __close = function() coroutine.resume(spin) end })
         started() while true do end",
    ),
    (
        "coroutine closed while unwinding",
        "local co = coroutine.create(function()
             local x <close> = setmetatable({}, { __close = function() while true do end end })
             coroutine.yield()
         end)
         coroutine.resume(co)
         local guard <close> = setmetatable({}, { __close = function() coroutine.close(co) end })
         started() while true do end",
    ),
];
#[cfg(not(any(feature = "lua54", feature = "lua55")))]
const ENDLESS_54: &[(&str, &str)] = &[];

/// `started()` signals the test; `rust_resume(f)` runs `f` on a thread
/// created and resumed by Rust through mlua.
fn init(started: crossbeam_channel::Sender<()>) -> impl Fn(&Lua) -> mlua::Result<()> {
    move |lua| {
        register_signal(lua, "started", started.clone())?;
        let resume =
            lua.create_function(|lua, f: mlua::Function| lua.create_thread(f)?.resume::<()>(()))?;
        lua.globals().set("rust_resume", resume)?;
        let resume_co = lua.create_function(|_, co: mlua::Thread| co.resume::<()>(()))?;
        lua.globals().set("rust_resume_co", resume_co)
    }
}

fn expect_started(started: &Receiver<()>, what: &str) {
    started
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{what}: never started"));
}

#[test]
fn a_cancel_stops_lua_code_on_every_kind_of_lua_thread() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(init(tx.clone())).unwrap();
    let pool = IslePool::builder()
        .workers(2)
        .init(init(tx))
        .build()
        .unwrap();
    for &(what, code) in ENDLESS.iter().chain(ENDLESS_54) {
        let session = pool.session(what);
        // One at a time, so each `started()` is the task's own.
        let spawns: [(&str, &dyn Fn() -> Task<()>); 3] = [
            ("isle", &|| isle.spawn_eval::<()>(code)),
            ("pool", &|| pool.spawn_eval::<()>(code)),
            ("session", &|| session.spawn_eval::<()>(code)),
        ];
        for (on, spawn) in spawns {
            let task = spawn();
            expect_started(&started, what);
            task.cancel();
            let r = within(&format!("{what} ({on})"), move || task.wait());
            assert_eq!(r, Err(IsleError::Cancelled), "{what} ({on})");
        }
        assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2), "{what}");
        assert_eq!(session.eval::<i64>("1 + 1"), Ok(2), "{what}");
    }
}

#[test]
fn with_a_permanent_hook_a_cancel_stops_the_same_code() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::builder()
        .permanent_hook(true)
        .spawn(init(tx.clone()))
        .unwrap();
    let pool = IslePool::builder()
        .workers(1)
        .permanent_hook(true)
        .init(init(tx))
        .build()
        .unwrap();
    for &(what, code) in ENDLESS {
        for (on, task) in [("isle", 0), ("pool", 1)] {
            let task: Task<()> = if task == 0 {
                isle.spawn_eval(code)
            } else {
                pool.spawn_eval(code)
            };
            expect_started(&started, what);
            task.cancel();
            let r = within(&format!("{what} ({on})"), move || task.wait());
            assert_eq!(r, Err(IsleError::Cancelled), "{what} ({on})");
        }
    }
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn a_time_limit_stops_lua_code_on_every_kind_of_lua_thread() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(init(tx)).unwrap();
    for &(what, code) in ENDLESS.iter().chain(ENDLESS_54) {
        let submitted = Instant::now();
        let task = isle.spawn_eval::<()>(code);
        expect_started(&started, what);
        // Set once it runs, 30 ms ahead (a limit counts from submission): a
        // limit set at submission could expire before a slow-waking VM
        // thread reaches `started()`, or before the code after it.
        let task = task.timeout(submitted.elapsed() + Duration::from_millis(30));
        let r = within(what, move || task.wait());
        assert_eq!(r, Err(IsleError::Timeout), "{what}");
        assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2), "{what}");
    }
}

/// A VM thread inherits its spawner's signal mask; it unblocks the signal
/// that arms the hook for itself.
#[cfg(unix)]
#[test]
fn a_vm_spawned_by_a_thread_that_blocks_sigurg_can_be_cancelled() {
    std::thread::spawn(|| {
        // SAFETY: initialises a signal set and changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGURG);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                0
            );
        }
        let (tx, started) = crossbeam_channel::unbounded();
        let isle = Isle::spawn(init(tx)).unwrap();
        let task = isle.spawn_eval::<()>("started() while true do end");
        expect_started(&started, "the loop");
        task.cancel();
        assert_eq!(
            within("the loop", move || task.wait()),
            Err(IsleError::Cancelled)
        );
    })
    .join()
    .unwrap();
}

#[test]
fn a_cancel_arriving_after_the_request_ended_leaves_the_next_one_alone() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let code = "local s = 0 for i = 1, 2000 do s = s + i end
                local g = coroutine.wrap(function() for i = 1, 10 do coroutine.yield(i) end end)
                for _ = 1, 10 do s = s + g() end return s";
    for _ in 0..2_000 {
        let first = isle.spawn_eval::<i64>(code);
        let token = first.cancel_token().clone();
        let second = isle.spawn_eval::<i64>(code);
        let (first, second) = within("two requests", move || {
            let first = first.wait();
            // Often lands while `second` runs: it must not be touched.
            token.cancel();
            (first, second.wait())
        });
        assert!(matches!(first, Ok(2_001_055) | Err(IsleError::Cancelled)));
        assert_eq!(second, Ok(2_001_055));
    }
}

/// Request shapes for the stress run: Lua source, and the value it returns
/// when it finishes (`None`: it never does).
const SHAPES: &[(&str, Option<i64>)] = &[
    ("local s = 0 for i = 1, 3000 do s = s + i end return s", Some(4_501_500)),
    (
        "local g = coroutine.wrap(function() for i = 1, 300 do coroutine.yield(i) end end)
         local s = 0 for _ = 1, 300 do s = s + g() end return s",
        Some(45_150),
    ),
    (
        "local t = {} for i = 1, 500 do t[i] = tostring(i) end return #table.concat(t)",
        Some(1_392),
    ),
    ("while true do end", None),
    (
        "coroutine.wrap(function() while true do pcall(function() while true do end end) end end)()",
        None,
    ),
    (
        "local co = coroutine.create(function() while true do coroutine.yield() end end)
         while true do coroutine.resume(co) end",
        None,
    ),
];

#[test]
fn cancels_at_random_instants_always_resolve_and_leave_the_vms_serving() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let pool = IslePool::new(2, |_| Ok(())).unwrap();
    let mut rng = Rng::new(0x5eed_a1a2);
    for i in 0..3_000u32 {
        let (code, value) = SHAPES[rng.below(SHAPES.len() as u64) as usize];
        let task: Task<i64> = match i % 3 {
            0 => isle.spawn_eval(code),
            1 => pool.spawn_eval(code),
            _ => pool.session(u64::from(i % 7)).spawn_eval(code),
        };
        // Cancel at once, after a random spin (often while it runs), or,
        // for requests that end, never; endless ones may get a time limit.
        let task = match rng.below(4) {
            0 => {
                task.cancel();
                task
            }
            1 | 2 => {
                let until = Instant::now() + Duration::from_micros(rng.below(300));
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                task.cancel();
                task
            }
            _ if value.is_some() => task,
            _ => task.timeout(Duration::from_micros(rng.below(2_000))),
        };
        let r = within(code, move || task.wait());
        match (value, r) {
            (Some(v), Ok(got)) => assert_eq!(got, v, "{code}"),
            (_, Err(IsleError::Cancelled | IsleError::Timeout)) => {}
            (_, r) => panic!("request {i} ({code}): {r:?}"),
        }
    }
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    for _ in 0..4 {
        assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2));
    }
    isle.shutdown().unwrap();
    pool.shutdown().unwrap();
}

/// Whether Luau's interrupt is set on `lua`'s VM.
#[cfg(feature = "luau")]
fn interrupt_is_set(lua: &Lua) -> bool {
    let mut set = false;
    // SAFETY: reads one field of the VM's callback table, on its own thread.
    unsafe {
        lua.exec_raw::<()>((), |state| {
            set = (*mlua::ffi::lua_callbacks(state)).interrupt.is_some();
        })
    }
    .unwrap();
    set
}

/// Luau has no hook to arm, but its interrupt is armed on demand the same
/// way: set by whoever stops a request, taken away once nothing must stop.
#[cfg(feature = "luau")]
#[test]
fn luau_runs_requests_with_no_interrupt_until_one_must_stop() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(init(tx)).unwrap();
    assert_eq!(isle.exec(|lua| Ok(interrupt_is_set(lua))), Ok(false));
    // Stopping a request sets it at once (the request here is Rust code,
    // so nothing runs the interrupt before the check).
    let (seen_tx, seen) = crossbeam_channel::bounded(1);
    let stopped = isle.exec(move |lua| {
        mlua_isle::current_token(lua).unwrap().cancel();
        seen_tx.send(interrupt_is_set(lua)).unwrap();
        Ok(())
    });
    assert!(matches!(stopped, Ok(()) | Err(IsleError::Cancelled)));
    assert_eq!(seen.recv_timeout(PATIENCE), Ok(true));
    assert_eq!(isle.exec(|lua| Ok(interrupt_is_set(lua))), Ok(false));
    // And after Lua code it stopped.
    let task = isle.spawn_eval::<()>("started() while true do end");
    expect_started(&started, "the loop");
    task.cancel();
    assert_eq!(
        within("the cancelled loop", move || task.wait()),
        Err(IsleError::Cancelled)
    );
    assert_eq!(isle.exec(|lua| Ok(interrupt_is_set(lua))), Ok(false));
    // With a permanent hook, it stays.
    let permanent = Isle::builder()
        .permanent_hook(true)
        .spawn(|_| Ok(()))
        .unwrap();
    assert_eq!(permanent.exec(|lua| Ok(interrupt_is_set(lua))), Ok(true));
}
