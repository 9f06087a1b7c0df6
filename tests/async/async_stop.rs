//! A stop reaches Lua code that runs on a Lua thread mlua made for Rust's
//! async API (the `async` feature): `Function::call_async`,
//! `Thread::into_async`, and Lua code called that way by an async Rust
//! function Lua awaited. A cancel or a time limit interrupts such a loop,
//! including inside a coroutine it started, and the VM is not wedged: it
//! keeps its state and serves the next request (no replacement VM, no
//! `SessionLost`).
//!
//! Every loop first calls `started()`, which reports on a channel; the test
//! then cancels the request, or gives it a time limit that has passed
//! (counted from submission), so the stop always lands while the loop runs.

use crate::common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::front::{each_kind, Kind};
use common::{expect_msg, register_signal, within, Rng};
use crossbeam_channel::Receiver;
use mlua_isle::mlua::{self, Function, Lua};
use mlua_isle::{Isle, IsleError, IslePool, Session, Task};

/// The Lua side every VM gets.
const LUA: &str = r#"
    function spin() started() while true do end end
    function spin_in_coroutine()
        local co = coroutine.create(spin)
        return coroutine.resume(co)
    end
    function spin_in_wrap() coroutine.wrap(spin)() end
    function spin_after_await() yield_now() spin() end
    function awaits_spin() await_lua(spin) end
    function awaits_spin_in_thread() await_thread(spin_in_coroutine) end
    -- `n` Lua threads of `call_async`, each resumed while the one before
    -- runs; returns `n`, or spins in the innermost.
    function nest(n, spin_there)
        if n == 0 then
            if spin_there then spin() end
            return 0
        end
        return nest_async(n - 1, spin_there) + 1
    end
    -- Returns at once, after a coroutine switch of its own.
    function quick()
        local co = coroutine.create(function() coroutine.yield() end)
        coroutine.resume(co)
        return 1
    end
    function quick_then_spin()
        await_lua(quick)
        await_thread(quick)
        pcall(collectgarbage, "collect")
        spin()
    end
    -- Lua threads of every kind, some left suspended, then a loop of
    -- `n` steps that returns `n`.
    function mixed(n)
        await_lua(quick)
        local co = coroutine.wrap(function() await_lua(quick) coroutine.yield() end)
        co()
        yield_now()
        local x = 0
        for i = 1, n do x = x + 1 end
        return x
    end
"#;

/// Lua 5.4 and 5.5: a function that awaits forever (`forever()` reports
/// `started()` once it is awaited) with two `<close>` variables, closed in
/// reverse order: one whose handler loops, then one whose handler is
/// `started` itself, which reports only once the loop was stopped (a stop
/// may reach the looping handler before its first instruction, but a Rust
/// function is always entered).
#[cfg(any(feature = "lua54", feature = "lua55"))]
const CLOSE_LOOPS: &str = r#"
    function close_loops()
        local after <close> = setmetatable({}, { __close = started })
        local x <close> = setmetatable({}, { __close = function() while true do end end })
        forever()
    end
    function awaits_close_loops() await_lua(close_loops) end
    function fails_close_loops()
        local x <close> = setmetatable({}, { __close = function() started() while true do end end })
        error("fails")
    end
"#;

/// How many futures of `forever()` were dropped (in this process).
static FOREVER_DROPPED: AtomicUsize = AtomicUsize::new(0);

/// Counts its drop in [`FOREVER_DROPPED`].
struct CountsDrop;

impl Drop for CountsDrop {
    fn drop(&mut self) {
        FOREVER_DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

/// Installs `started()`, the async Rust functions and [`LUA`].
fn install(lua: &Lua, started: crossbeam_channel::Sender<()>) -> mlua::Result<()> {
    register_signal(lua, "started", started.clone())?;
    // Awaits a Lua function through `call_async`: a Lua thread of mlua's.
    let await_lua =
        lua.create_async_function(|_, f: Function| async move { f.call_async::<()>(()).await })?;
    lua.globals().set("await_lua", await_lua)?;
    // Awaits a Lua function as a coroutine of its own (`into_async`).
    let await_thread = lua.create_async_function(|lua, f: Function| async move {
        lua.create_thread(f)?.into_async::<()>(())?.await
    })?;
    lua.globals().set("await_thread", await_thread)?;
    // Calls `nest(n)` through `call_async`, from Lua: `nest` nests them.
    let nest_async = lua.create_async_function(|lua, (n, spin): (i64, bool)| async move {
        let nest: Function = lua.globals().get("nest")?;
        nest.call_async::<i64>((n, spin)).await
    })?;
    lua.globals().set("nest_async", nest_async)?;
    common::set_yield_once(lua, "yield_now")?;
    // Reports `started()` from its future's first poll: a stop sent then
    // finds the request in `forever()` (suspended, or about to be), never
    // on a Lua instruction before it.
    let forever = lua.create_async_function(move |_, ()| {
        let started = started.clone();
        async move {
            let _guard = CountsDrop;
            let _ = started.send(());
            std::future::pending::<mlua::Result<()>>().await
        }
    })?;
    lua.globals().set("forever", forever)?;
    lua.load(LUA).set_name("=async_stop").exec()?;
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    lua.load(CLOSE_LOOPS).set_name("=async_stop").exec()?;
    Ok(())
}

/// An isle, a one-worker pool (unkeyed work), or a session on one: with one
/// VM, the request after a stop runs on the VM that was stopped, unless
/// it was wedged and replaced.
enum F {
    Isle(Isle),
    Pool(IslePool),
    Session(IslePool, Session),
}

/// How the VM is built: by default (the hook armed on demand), in sandbox
/// mode, with the hook ticking all the time, or with an instruction
/// budget (which needs the hook ticking).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "luau", allow(dead_code))]
enum Mode {
    Plain,
    Sandbox,
    Permanent,
    Budget,
}

/// The modes every stop test runs in.
const MODES: [Mode; 3] = [Mode::Plain, Mode::Sandbox, Mode::Permanent];

/// The budget of [`Mode::Budget`]: ample for everything but a loop that
/// never ends.
#[cfg_attr(feature = "luau", allow(dead_code))]
const BUDGET: u64 = 2_000_000;

macro_rules! configure {
    ($builder:expr, $mode:expr) => {{
        let b = $builder
            .sandbox($mode == Mode::Sandbox)
            .permanent_hook($mode == Mode::Permanent);
        if $mode == Mode::Budget {
            b.max_instructions(BUDGET)
        } else {
            b
        }
    }};
}

fn front(kind: Kind, mode: Mode) -> (F, Receiver<()>) {
    let (tx, started) = crossbeam_channel::unbounded();
    let init = move |lua: &Lua| install(lua, tx.clone());
    let front = match kind {
        Kind::Isle => F::Isle(
            configure!(Isle::builder(), mode)
                .init(init)
                .build()
                .expect("the isle starts"),
        ),
        kind => {
            let pool = configure!(IslePool::builder().workers(1), mode)
                .init(init)
                .build()
                .expect("the pool starts");
            if kind == Kind::Pool {
                F::Pool(pool)
            } else {
                let session = pool.session("tenant");
                F::Session(pool, session)
            }
        }
    };
    (front, started)
}

impl F {
    fn spawn_eval<T: mlua::FromLuaMulti + Send + 'static>(&self, code: &str) -> Task<T> {
        match self {
            F::Isle(i) => i.spawn_eval(code),
            F::Pool(p) => p.spawn_eval(code),
            F::Session(_, s) => s.spawn_eval(code),
        }
    }

    fn eval<T: mlua::FromLuaMulti + Send + 'static>(&self, code: &str) -> Result<T, IsleError> {
        let task = self.spawn_eval(code);
        within("a request resolves", move || task.wait())
    }

    fn spawn_exec_async<T, G, Fut>(&self, f: G) -> Task<T>
    where
        T: Send + 'static,
        G: FnOnce(Lua) -> Fut + Send + 'static,
        Fut: Future<Output = mlua::Result<T>> + 'static,
    {
        match self {
            F::Isle(i) => i.spawn_exec_async(f),
            F::Pool(p) => p.spawn_exec_async(f),
            F::Session(_, s) => s.spawn_exec_async(move |lua, _env| f(lua)),
        }
    }

    /// VMs replaced because they did not let go of a stopped request.
    fn wedged(&self) -> u64 {
        match self {
            F::Isle(i) => i.wedged(),
            F::Pool(p) | F::Session(p, _) => p.metrics().workers.iter().map(|w| w.wedged).sum(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Cancel,
    Timeout,
}

const STOPS: [Stop; 2] = [Stop::Cancel, Stop::Timeout];

/// Runs a request made by `spawn` (whose Lua code calls `started()`, then
/// loops forever), stops it once it loops, and checks it resolves with the
/// stop and the VM lets go of it: the next request runs on the same VM
/// (it sees a global set before) and no VM was wedged.
fn stops(kind: Kind, mode: Mode, what: &str, spawn: impl Fn(&F) -> Task<()>) {
    for stop in STOPS {
        eprintln!("--- {what}: {stop:?} on the {kind:?} front ({mode:?})");
        let (front, started) = front(kind, mode);
        front.eval::<()>("marker = 7").expect("sets the marker");
        let task = spawn(&front);
        expect_msg(&started, "the loop starts");
        let (task, want) = match stop {
            Stop::Cancel => {
                task.cancel();
                (task, IsleError::Cancelled)
            }
            // Counted from submission: it has passed.
            Stop::Timeout => (task.timeout(Duration::ZERO), IsleError::Timeout),
        };
        let got = within("the stopped request resolves", move || task.wait());
        assert_eq!(got, Err(want), "{what}: {stop:?} on {kind:?}");
        assert_eq!(
            front.eval::<Option<i64>>("return marker"),
            Ok(Some(7)),
            "{what}: {stop:?} on {kind:?}: the VM was replaced"
        );
        assert_eq!(front.wedged(), 0, "{what}: {stop:?} on {kind:?}: wedged");
        // The VM is still whole: coroutines, awaits and Lua threads of
        // mlua's work as before.
        let t = front.spawn_exec_async(|lua| async move {
            let f: Function = lua
                .load("return function(x) yield_now() return x + 1 end")
                .eval()?;
            let n = f.call_async::<i64>(41).await?;
            assert_eq!(n, 42);
            Ok(())
        });
        assert_eq!(
            within("an async request after the stop", move || t.wait()),
            Ok(())
        );
    }
}

fn each_front(body: impl Fn(Kind, Mode)) {
    for mode in MODES {
        each_kind(|kind| body(kind, mode));
    }
}

/// `spawn_exec_async` awaiting `call_async` of the global Lua function `name`.
fn call_async_of(name: &'static str) -> impl Fn(&F) -> Task<()> {
    move |front| {
        front.spawn_exec_async(move |lua| async move {
            lua.globals()
                .get::<Function>(name)?
                .call_async::<()>(())
                .await
        })
    }
}

// ---------------------------------------------------------------------------
// Lua run by Rust through `Function::call_async` and `Thread::into_async`.
// ---------------------------------------------------------------------------

#[test]
fn a_loop_run_by_call_async_is_stopped() {
    each_front(|kind, mode| stops(kind, mode, "call_async", call_async_of("spin")));
}

#[test]
fn a_loop_in_a_coroutine_of_a_call_async_function_is_stopped() {
    each_front(|kind, mode| {
        stops(
            kind,
            mode,
            "coroutine.resume",
            call_async_of("spin_in_coroutine"),
        );
        stops(kind, mode, "coroutine.wrap", call_async_of("spin_in_wrap"));
    });
}

#[test]
fn a_loop_after_an_await_in_a_call_async_function_is_stopped() {
    each_front(|kind, mode| {
        stops(
            kind,
            mode,
            "after an await",
            call_async_of("spin_after_await"),
        )
    });
}

#[test]
fn a_loop_run_by_thread_into_async_is_stopped() {
    each_front(|kind, mode| {
        stops(kind, mode, "into_async", |front| {
            front.spawn_exec_async(|lua| async move {
                let spin: Function = lua.globals().get("spin")?;
                lua.create_thread(spin)?.into_async::<()>(())?.await
            })
        });
        stops(kind, mode, "into_async, a coroutine", |front| {
            front.spawn_exec_async(|lua| async move {
                let f: Function = lua.globals().get("spin_in_coroutine")?;
                lua.create_thread(f)?.into_async::<()>(())?.await
            })
        });
    });
}

#[test]
fn a_loop_run_by_call_async_after_a_plain_call_is_stopped() {
    // A synchronous call first (the main state runs Lua), then the loop
    // on a Lua thread of mlua's.
    each_front(|kind, mode| {
        stops(kind, mode, "call, then call_async", |front| {
            front.spawn_exec_async(|lua| async move {
                let spin: Function = lua.globals().get("spin")?;
                lua.load("return 1").eval::<i64>()?;
                spin.call_async::<()>(()).await
            })
        })
    });
}

/// Not on Luau, which has no instruction budget.
#[cfg(not(feature = "luau"))]
#[test]
fn an_instruction_limit_stops_a_loop_run_by_call_async() {
    each_kind(|kind| {
        let (front, started) = front(kind, Mode::Budget);
        front.eval::<()>("marker = 7").expect("sets the marker");
        for (what, task) in [
            ("call_async", call_async_of("spin")(&front)),
            ("await_lua", front.spawn_eval("await_lua(spin)")),
            ("into_async", call_async_of("awaits_spin_in_thread")(&front)),
        ] {
            expect_msg(&started, "the loop starts");
            let got = within("the request resolves", move || task.wait());
            assert_eq!(got, Err(IsleError::InstructionLimit), "{what} on {kind:?}");
            assert_eq!(front.eval::<Option<i64>>("return marker"), Ok(Some(7)));
            assert_eq!(front.wedged(), 0, "{what} on {kind:?}: wedged");
        }
    });
}

// ---------------------------------------------------------------------------
// Lua called by an async Rust function that Lua awaited.
// ---------------------------------------------------------------------------

#[test]
fn a_loop_in_lua_called_by_an_awaited_async_function_is_stopped() {
    each_front(|kind, mode| {
        stops(kind, mode, "eval: await_lua(spin)", |front| {
            front.spawn_eval("await_lua(spin)")
        });
        stops(
            kind,
            mode,
            "eval: await_thread(spin_in_coroutine)",
            |front| front.spawn_eval("await_thread(spin_in_coroutine)"),
        );
        // Rust -> call_async -> Lua -> async Rust -> call_async -> Lua.
        stops(
            kind,
            mode,
            "call_async: await_lua(spin)",
            call_async_of("awaits_spin"),
        );
        stops(
            kind,
            mode,
            "call_async: await_thread(spin_in_coroutine)",
            call_async_of("awaits_spin_in_thread"),
        );
    });
}

// ---------------------------------------------------------------------------
// Lua threads resumed from Rust that have returned: mlua tells nothing
// when they do, and the code that resumed them runs on.
// ---------------------------------------------------------------------------

#[test]
fn a_loop_after_lua_threads_resumed_from_rust_returned_is_stopped() {
    each_front(|kind, mode| {
        stops(kind, mode, "call_async returned, then call", |front| {
            front.spawn_exec_async(|lua| async move {
                let quick: Function = lua.globals().get("quick")?;
                for _ in 0..3 {
                    quick.call_async::<()>(()).await?;
                }
                lua.create_thread(quick)?.into_async::<()>(())?.await?;
                lua.gc_collect()?;
                lua.globals().get::<Function>("spin")?.call::<()>(())
            })
        });
        stops(kind, mode, "eval: awaits returned, then spin", |front| {
            front.spawn_eval("quick_then_spin()")
        });
        stops(
            kind,
            mode,
            "call_async: awaits returned, then spin",
            call_async_of("quick_then_spin"),
        );
    });
}

/// Requests mixing every kind of Lua thread, cancelled at random instants:
/// each resolves with its value or `Cancelled`, and the VM is never wedged.
#[test]
fn cancels_at_random_instants_in_call_async_code_leave_the_vm_serving() {
    for mode in [Mode::Plain, Mode::Permanent] {
        each_kind(|kind| random_cancels(kind, mode));
    }
}

fn random_cancels(kind: Kind, mode: Mode) {
    {
        let (front, _started) = front(kind, mode);
        front.eval::<()>("marker = 7").expect("sets the marker");
        let mut rng = Rng::new(0xca11_a5c0);
        for i in 0..300u64 {
            let n = rng.below(200_000) as i64;
            let task: Task<i64> = if i % 2 == 0 {
                front.spawn_eval(&format!("return mixed({n})"))
            } else {
                front.spawn_exec_async(move |lua| async move {
                    let mixed: Function = lua.globals().get("mixed")?;
                    mixed.call_async::<i64>(n).await
                })
            };
            if rng.below(4) != 0 {
                let until = std::time::Instant::now() + Duration::from_micros(rng.below(500));
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                task.cancel();
            }
            match within("a request resolves", move || task.wait()) {
                Ok(got) => assert_eq!(got, n, "request {i} on {kind:?}"),
                Err(IsleError::Cancelled) => {}
                Err(e) => panic!("request {i} on {kind:?}: {e:?}"),
            }
        }
        assert_eq!(front.eval::<Option<i64>>("return marker"), Ok(Some(7)));
        assert_eq!(front.wedged(), 0, "{kind:?} {mode:?}: wedged");
    }
}

// ---------------------------------------------------------------------------
// `<close>` handlers of a Lua thread whose `call_async` future a stop drops
// (Lua 5.4, 5.5): mlua closes the thread as it drops the future.
// ---------------------------------------------------------------------------

#[cfg(any(feature = "lua54", feature = "lua55"))]
#[test]
fn a_close_handler_that_loops_in_a_dropped_call_async_is_stopped() {
    // A child process: a handler that is not stopped spins a core forever.
    common::in_child(
        "a_close_handler_that_loops_in_a_dropped_call_async_is_stopped",
        || {
            for mode in MODES {
                each_kind(|kind| {
                    for (what, spawn) in [
                        ("call_async", call_async_of("close_loops")),
                        ("nested", call_async_of("awaits_close_loops")),
                    ] {
                        for stop in STOPS {
                            eprintln!("--- {what}: {stop:?} on {kind:?} ({mode:?})");
                            let (front, started) = front(kind, mode);
                            front.eval::<()>("marker = 7").expect("sets the marker");
                            let dropped = FOREVER_DROPPED.load(Ordering::SeqCst);
                            let task = spawn(&front);
                            expect_msg(&started, "the function awaits");
                            let (task, want) = match stop {
                                Stop::Cancel => {
                                    task.cancel();
                                    (task, IsleError::Cancelled)
                                }
                                Stop::Timeout => (task.timeout(Duration::ZERO), IsleError::Timeout),
                            };
                            let got = within("the stopped request resolves", move || task.wait());
                            assert_eq!(got, Err(want), "{what}: {stop:?} on {kind:?}");
                            expect_msg(&started, "the handler after the looping one runs");
                            // The future is dropped by the stop (not left
                            // to Lua's collector): the handlers run while
                            // it is being dropped, so its count may land
                            // just after they reported.
                            common::eventually("the stop drops the future", || {
                                FOREVER_DROPPED.load(Ordering::SeqCst) == dropped + 1
                            });
                            assert_eq!(
                                front.eval::<Option<i64>>("return marker"),
                                Ok(Some(7)),
                                "{what}: {stop:?} on {kind:?} ({mode:?}): the VM was replaced"
                            );
                            assert_eq!(front.wedged(), 0);
                        }
                    }
                });
            }
        },
    );
}

/// A Lua thread of `call_async` that died of an error keeps its `<close>`
/// variables open until mlua closes it, when its future is dropped: a stop
/// reaches a handler that loops then, whether other Lua threads were
/// resumed from Rust in between or not.
#[cfg(any(feature = "lua54", feature = "lua55"))]
#[test]
fn a_close_handler_that_loops_in_a_failed_call_async_thread_is_stopped() {
    common::in_child(
        "a_close_handler_that_loops_in_a_failed_call_async_thread_is_stopped",
        || {
            for mode in MODES {
                each_kind(|kind| {
                    for others in [false, true] {
                        stops(kind, mode, &format!("failed, others: {others}"), |front| {
                            front.spawn_exec_async(move |lua| async move {
                                let fails: Function = lua.globals().get("fails_close_loops")?;
                                let mut failed = Box::pin(fails.call_async::<()>(()));
                                let r = failed.as_mut().await;
                                assert!(r.is_err(), "{r:?}");
                                if others {
                                    let quick: Function = lua.globals().get("quick")?;
                                    quick.call_async::<()>(()).await?;
                                    lua.create_thread(quick)?.into_async::<()>(())?.await?;
                                }
                                drop(failed); // closes the thread: the handler loops
                                Ok(())
                            })
                        });
                    }
                });
            }
        },
    );
}

/// Lua threads of `call_async` nested deep: each is tracked, and a loop in
/// the innermost is stopped.
#[test]
fn a_loop_in_deeply_nested_call_async_threads_is_stopped() {
    each_front(|kind, mode| {
        let (front, _started) = front(kind, mode);
        assert_eq!(front.eval::<i64>("return nest(60)"), Ok(60), "{kind:?}");
        drop(front);
        stops(kind, mode, "60 nested", |front| {
            front.spawn_eval("nest(60, true)")
        });
    });
}
