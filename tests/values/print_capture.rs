//! `capture_print()`: the lines a request printed, returned with its
//! result, on every front (an isle, a pool's unkeyed work, a session), in
//! the sandbox and out of it; and only that request's lines, however Lua
//! code calls `print`.

use crate::common;

use std::time::Duration;

use crossbeam_channel::Receiver;
use mlua_isle::mlua::{self, FromLuaMulti, Lua};
use mlua_isle::{Isle, IsleError, IslePool, Printed, Session, Task};

use common::front::{each_kind, Kind};

/// Where uncaptured prints go.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `print_to` a channel.
    Sink,
    /// `print_to` a channel, in the sandbox.
    Sandbox,
    /// Lua's own `print` (stdout): nothing reaches the channel.
    Stdout,
}

const MODES: [Mode; 3] = [Mode::Sink, Mode::Sandbox, Mode::Stdout];

/// One front, its uncaptured prints going where `Mode` says.
enum Front {
    Isle(Isle),
    Pool(IslePool),
    Session(#[allow(dead_code)] IslePool, Session),
}

type Init = fn(&Lua) -> mlua::Result<()>;

impl Front {
    fn new(kind: Kind, mode: Mode, init: Init) -> (Front, Receiver<String>) {
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        let sink = move |line: &str| {
            let _ = tx.send(line.to_string());
        };
        let sandbox = mode == Mode::Sandbox;
        let front = match kind {
            Kind::Isle => {
                let builder = Isle::builder().sandbox(sandbox);
                let builder = match mode {
                    Mode::Stdout => builder,
                    _ => builder.print_to(sink),
                };
                Front::Isle(builder.spawn(init).unwrap())
            }
            Kind::Pool | Kind::Session => {
                let builder = IslePool::builder().workers(1).sandbox(sandbox).init(init);
                let builder = match mode {
                    Mode::Stdout => builder,
                    _ => builder.print_to(sink),
                };
                let pool = builder.build().unwrap();
                match kind {
                    Kind::Pool => Front::Pool(pool),
                    _ => {
                        let session = pool.session("tenant");
                        Front::Session(pool, session)
                    }
                }
            }
        };
        (front, rx)
    }

    /// `eval`, captured.
    fn eval<T>(&self, code: &str) -> Result<Printed<T>, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        self.eval_limited(code, 64 << 10)
    }

    fn eval_limited<T>(&self, code: &str, limit: usize) -> Result<Printed<T>, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match self {
            Front::Isle(i) => i.capture_print().limit(limit).eval(code),
            Front::Pool(p) => p.capture_print().limit(limit).eval(code),
            Front::Session(_, s) => s.capture_print().limit(limit).eval(code),
        }
    }

    fn spawn_eval<T>(&self, code: &str) -> Task<Printed<T>>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match self {
            Front::Isle(i) => i.capture_print().spawn_eval(code),
            Front::Pool(p) => p.capture_print().spawn_eval(code),
            Front::Session(_, s) => s.capture_print().spawn_eval(code),
        }
    }

    fn call<T>(&self, name: &str, args: (i64, i64)) -> Result<Printed<T>, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match self {
            Front::Isle(i) => i.capture_print().call(name, args),
            Front::Pool(p) => p.capture_print().call(name, args),
            Front::Session(_, s) => s.capture_print().spawn_call(name, args).wait(),
        }
    }

    /// `eval`, not captured.
    fn plain<T>(&self, code: &str) -> Result<T, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match self {
            Front::Isle(i) => i.eval(code),
            Front::Pool(p) => p.eval(code),
            Front::Session(_, s) => s.eval(code),
        }
    }
}

/// Runs `body` on every front, in every mode.
fn each_front(what: &'static str, init: Init, body: fn(&Front, &Receiver<String>, Mode)) {
    common::within(what, move || {
        each_kind(|kind| {
            for mode in MODES {
                eprintln!("    mode: {mode:?}");
                let (front, sink) = Front::new(kind, mode, init);
                body(&front, &sink, mode);
            }
        })
    });
}

/// The sink got `expected` (uncaptured lines), or nothing in `Stdout`
/// mode.
fn assert_sink(sink: &Receiver<String>, mode: Mode, expected: &[&str]) {
    match mode {
        Mode::Stdout => assert_eq!(drained(sink), Vec::<String>::new()),
        _ => assert_eq!(drained(sink), lines(expected)),
    }
}

fn no_init(_: &Lua) -> mlua::Result<()> {
    Ok(())
}

/// What the sink got so far (every earlier request has resolved).
fn drained(sink: &Receiver<String>) -> Vec<String> {
    sink.try_iter().collect()
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn lines_come_back_with_the_result_formatted_as_print_writes_them() {
    each_front("formatting", no_init, |front, sink, _| {
        let out = front
            .eval::<i64>(
                "print(1, nil, 'x', true, 2.5, setmetatable({}, { __tostring = function() return 'T' end }))
                 print()
                 print('a\\tb', 'second')
                 return 42",
            )
            .unwrap();
        assert_eq!(out.result, Ok(42));
        assert_eq!(
            out.lines,
            lines(&["1\tnil\tx\ttrue\t2.5\tT", "", "a\tb\tsecond"])
        );
        assert!(!out.truncated);
        #[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
        {
            let out = front
                .eval::<()>("print(setmetatable({}, { __name = 'Point' }))")
                .unwrap();
            assert!(out.lines[0].starts_with("Point: "), "{:?}", out.lines);
        }
        // Bytes that are not UTF-8, as `print_to` gets them.
        let out = front.eval::<()>("print('a\\255b')").unwrap();
        assert_eq!(out.lines, lines(&["a\u{FFFD}b"]));
        assert_eq!(
            drained(sink),
            Vec::<String>::new(),
            "captured lines reached the sink"
        );
    });
}

#[test]
fn uncaptured_requests_and_init_print_where_they_did() {
    fn init(lua: &Lua) -> mlua::Result<()> {
        lua.load("print('from init') function add(a, b) print('adding', a, b) return a + b end")
            .exec()
    }
    each_front("uncaptured", init, |front, sink, mode| {
        assert_sink(sink, mode, &["from init"]);
        front.plain::<()>("print('plain 1')").unwrap();
        let out = front.call::<i64>("add", (40, 2)).unwrap();
        assert_eq!((out.result, out.lines), (Ok(42), lines(&["adding\t40\t2"])));
        front.plain::<()>("print('plain 2')").unwrap();
        assert_sink(sink, mode, &["plain 1", "plain 2"]);
    });
}

#[test]
fn uncaptured_default_print_is_lua_own_outside_the_sandbox() {
    // Without `print_to`, outside the sandbox, `print` calls Lua's C
    // `print` when nothing captures (stdout, interleaved with `io.write`
    // as before); captured, the same `print` function is captured.
    common::within("default print", || {
        let isle = Isle::spawn(|lua| {
            lua.load("saved = print").exec()?;
            Ok(())
        })
        .unwrap();
        isle.eval::<()>("print('to stdout (expected in the test output)')")
            .unwrap();
        // Lua 5.2-5.5: it is a C function, as Lua's is (5.1, LuaJIT and
        // Luau get one written in Lua).
        #[cfg(any(
            feature = "lua52",
            feature = "lua53",
            feature = "lua54",
            feature = "lua55"
        ))]
        assert_eq!(
            isle.eval::<bool>("return (pcall(string.dump, print))"),
            Ok(false)
        );
        let out = isle.capture_print().eval::<()>("saved('caught')").unwrap();
        assert_eq!(out.lines, lines(&["caught"]));
        // A `__tostring` error is raised as Lua raises it, captured or not.
        let code = "print(setmetatable({}, { __tostring = function() error('boom') end }))";
        let plain = isle.eval::<()>(code);
        assert!(matches!(&plain, Err(IsleError::Lua(e)) if e.message().contains("boom")));
        let out = isle.capture_print().eval::<()>(code).unwrap();
        assert!(matches!(&out.result, Err(IsleError::Lua(e)) if e.message().contains("boom")));
    });
}

#[test]
fn errors_of_the_request_are_its_result_with_the_lines_before_them() {
    each_front("errors", no_init, |front, _, _| {
        let out = front
            .eval::<()>("print('one') print('two') error('three')")
            .unwrap();
        assert_eq!(out.lines, lines(&["one", "two"]));
        assert!(
            matches!(&out.result, Err(IsleError::Lua(e)) if e.message().contains("three")),
            "{:?}",
            out.result
        );
        // A conversion error is the request's too.
        let out = front
            .eval::<i64>("print('returning a table') return {}")
            .unwrap();
        assert_eq!(out.lines, lines(&["returning a table"]));
        assert!(
            matches!(&out.result, Err(IsleError::Lua(_))),
            "{:?}",
            out.result
        );
        assert!(out.into_result().is_err());
        // As is a syntax error (nothing printed).
        let out = front.eval::<()>("print(").unwrap();
        assert!(out.lines.is_empty());
        assert!(out.result.is_err());
    });
}

#[test]
fn a_failed_result_counts_as_failed_in_the_metrics() {
    common::within("metrics", || {
        let pool = IslePool::builder()
            .workers(1)
            .discard_print()
            .build()
            .unwrap();
        let before = pool.metrics().workers[0].clone();
        let out = pool
            .capture_print()
            .eval::<()>("print('x') error('no')")
            .unwrap();
        assert!(out.result.is_err());
        pool.capture_print().eval::<()>("print('y')").unwrap();
        let s = pool.session("s");
        s.capture_print().eval::<()>("error('no')").unwrap();
        common::eventually("the counters", || {
            let after = &pool.metrics().workers[0];
            after.failed == before.failed + 2 && after.completed == before.completed + 1
        });
    });
}

#[test]
fn a_panic_in_exec_is_the_result_with_the_lines_before_it() {
    common::within("panic", || {
        let isle = Isle::builder().discard_print().spawn(|_| Ok(())).unwrap();
        let out = isle
            .capture_print()
            .exec(|lua| -> mlua::Result<()> {
                lua.load("print('before the panic')").exec()?;
                panic!("the closure panics")
            })
            .unwrap();
        assert_eq!(out.lines, lines(&["before the panic"]));
        assert!(
            matches!(&out.result, Err(IsleError::Panic(m)) if m.contains("the closure panics")),
            "{:?}",
            out.result
        );
        // A panic of a Rust function Lua called, likewise.
        isle.exec(|lua| {
            let f =
                lua.create_function(|_, ()| -> mlua::Result<()> { panic!("callback panics") })?;
            lua.globals().set("boom", f)
        })
        .unwrap();
        let out = isle
            .capture_print()
            .eval::<()>("print('calling') boom()")
            .unwrap();
        assert_eq!(out.lines, lines(&["calling"]));
        assert!(
            matches!(&out.result, Err(IsleError::Panic(_))),
            "{:?}",
            out.result
        );
        // The session's exec, with its environment.
        let pool = IslePool::builder()
            .workers(1)
            .discard_print()
            .build()
            .unwrap();
        let out = pool
            .session("s")
            .capture_print()
            .exec(|lua, env| {
                lua.load("x = 5 print('in the session', x)")
                    .set_environment(env.clone())
                    .exec()?;
                env.get::<i64>("x")
            })
            .unwrap();
        assert_eq!(
            (out.result, out.lines),
            (Ok(5), lines(&["in the session\t5"]))
        );
        assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    });
}

#[test]
fn every_way_of_calling_print_is_captured() {
    each_front("hostile calls", no_init, |front, sink, _| {
        let out = front
            .eval::<()>(
                "pcall(print, 'pcall')
                 coroutine.wrap(print)('wrap')
                 coroutine.wrap(function() print('in a coroutine') end)()
                 string.gsub('ab', '%w', print)
                 local p = print p('local')
                 print(setmetatable({}, { __tostring = function() print('inner') return 'outer' end }))",
            )
            .unwrap();
        out.result.unwrap();
        assert_eq!(
            out.lines,
            lines(&[
                "pcall",
                "wrap",
                "in a coroutine",
                "a",
                "b",
                "local",
                "inner",
                "outer"
            ])
        );
        assert_eq!(drained(sink), Vec::<String>::new());
    });
}

#[test]
fn tostring_that_errors_or_loops() {
    each_front("__tostring", no_init, |front, _, _| {
        let out = front
            .eval::<()>(
                "print('first')
                 print('x', setmetatable({}, { __tostring = function() error('bad tostring') end }))",
            )
            .unwrap();
        assert_eq!(out.lines, lines(&["first"]));
        assert!(
            matches!(&out.result, Err(IsleError::Lua(e)) if e.message().contains("bad tostring"))
        );
        let task = front
            .spawn_eval::<()>(
                "print('before')
                 print(setmetatable({}, { __tostring = function() while true do end end }))",
            )
            .timeout(Duration::from_millis(50));
        assert_eq!(task.wait(), Err(IsleError::Timeout));
        let out = front.eval::<i64>("print('after') return 1").unwrap();
        assert_eq!((out.result, out.lines), (Ok(1), lines(&["after"])));
    });
}

#[test]
fn lines_are_kept_up_to_the_limit_then_truncated() {
    each_front("limit", no_init, |front, sink, _| {
        // 1001 bytes a line: 9 fit in 10 000; the 10th, and the short ones
        // after it, do not.
        let out = front
            .eval_limited::<()>(
                "for i = 1, 20 do print(string.rep('x', 1000)) end print('short')",
                10_000,
            )
            .unwrap();
        assert_eq!(out.lines.len(), 9);
        assert!(out.lines.iter().all(|l| l.len() == 1000));
        assert!(out.truncated);
        let out = front.eval_limited::<()>("print('a') print()", 0).unwrap();
        assert!(out.lines.is_empty() && out.truncated);
        let out = front.eval_limited::<()>("print('ab')", 3).unwrap();
        assert_eq!((out.lines, out.truncated), (lines(&["ab"]), false));
        // A line larger than the limit is never copied: a megabyte, two
        // thousand times over, costs nothing.
        let out = front
            .eval::<i64>("local s = string.rep('x', 1e6) for i = 1, 2000 do print(s) end return 1")
            .unwrap();
        assert_eq!(
            (out.result, out.lines.len(), out.truncated),
            (Ok(1), 0, true)
        );
        assert_eq!(drained(sink), Vec::<String>::new());
    });
}

#[test]
fn a_runaway_printer_is_stopped_by_its_time_limit() {
    each_front("runaway printer", no_init, |front, sink, mode| {
        let task = front
            .spawn_eval::<()>("while true do print(string.rep('x', 1e6)) end")
            .timeout(Duration::from_millis(50));
        assert_eq!(task.wait(), Err(IsleError::Timeout));
        let task = front
            .spawn_eval::<()>("while true do print('small') end")
            .timeout(Duration::from_millis(50));
        assert_eq!(task.wait(), Err(IsleError::Timeout));
        assert_eq!(drained(sink), Vec::<String>::new());
        front.plain::<()>("print('plain')").unwrap();
        assert_sink(sink, mode, &["plain"]);
    });
}

#[test]
fn a_cancelled_capture_resolves_cancelled_once_and_the_vm_prints_as_before() {
    each_front("cancel", no_init, |front, sink, mode| {
        let task = front.spawn_eval::<()>("print('spinning') while true do print('more') end");
        // Running: cancel it (a cancel while queued never runs it; either
        // way it resolves Cancelled, once).
        task.cancel();
        assert_eq!(task.wait(), Err(IsleError::Cancelled));
        front.plain::<()>("print('next')").unwrap();
        assert_sink(sink, mode, &["next"]);
        let out = front.eval::<i64>("print('captured') return 2").unwrap();
        assert_eq!((out.result, out.lines), (Ok(2), lines(&["captured"])));
    });
}

#[test]
fn a_running_capture_cancelled_mid_run() {
    common::within("cancel mid-run", || {
        let (started_tx, started) = crossbeam_channel::unbounded::<()>();
        let (tx, sink) = crossbeam_channel::unbounded::<String>();
        let isle = Isle::builder()
            .print_to(move |l| {
                let _ = tx.send(l.to_string());
            })
            .spawn(move |lua| common::register_signal(lua, "started", started_tx))
            .unwrap();
        let task = isle
            .capture_print()
            .spawn_eval::<()>("print('begun') started() while true do print('more') end");
        common::expect_msg(&started, "the request to run");
        task.cancel();
        assert_eq!(task.wait(), Err(IsleError::Cancelled));
        isle.eval::<()>("print('next')").unwrap();
        assert_eq!(common::expect_msg(&sink, "the next line"), "next");
        assert!(
            sink.try_recv().is_err(),
            "a cancelled capture's lines leaked"
        );
    });
}

#[test]
fn print_kept_by_one_request_prints_for_the_request_that_calls_it() {
    common::within("saved print", || {
        let (tx, sink) = crossbeam_channel::unbounded::<String>();
        let pool = IslePool::builder()
            .workers(1)
            .print_to(move |l| {
                let _ = tx.send(l.to_string());
            })
            .build()
            .unwrap();
        let a = pool.session("a");
        let b = pool.session("b");
        // Tenant a keeps `print` in a function of its own, which the host
        // then shares (outside the sandbox, a host may).
        a.capture_print()
            .eval::<()>("local p = print function later() p('from a') end")
            .unwrap();
        a.exec(|lua, env| {
            lua.globals()
                .set("shared_later", env.get::<mlua::Function>("later")?)
        })
        .unwrap();
        let out = b.capture_print().eval::<()>("shared_later()").unwrap();
        assert_eq!(out.lines, lines(&["from a"]), "the caller's lines");
        b.eval::<()>("shared_later()").unwrap();
        assert_eq!(
            common::expect_msg(&sink, "the uncaptured call's line"),
            "from a"
        );
    });
}

#[test]
fn tenants_cannot_redirect_each_others_prints_in_the_sandbox() {
    common::within("redirect", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .discard_print()
            .build()
            .unwrap();
        let a = pool.session("a");
        let b = pool.session("b");
        a.eval::<()>(
            "seen = {}
             print = function(...) seen[#seen + 1] = select('#', ...) end
             _G.print = print",
        )
        .unwrap();
        // Unkeyed work may rebind the VM's globals; sessions never see it.
        pool.eval::<()>("print = function() error('stolen') end")
            .unwrap();
        let out = b.capture_print().eval::<()>("print('mine')").unwrap();
        assert_eq!((out.result, out.lines), (Ok(()), lines(&["mine"])));
        assert_eq!(a.eval::<i64>("#seen"), Ok(0));
        // Its own prints are its business: they went to its function.
        let out = a.capture_print().eval::<()>("print('to seen')").unwrap();
        assert!(out.lines.is_empty());
        assert_eq!(a.eval::<i64>("#seen"), Ok(1));
        // `print = nil` in a session reads `print` as `init` left it again.
        a.eval::<()>("print = nil").unwrap();
        let out = a.capture_print().eval::<()>("print('back')").unwrap();
        assert_eq!(out.lines, lines(&["back"]));
    });
}

// Tables get finalizers from Lua 5.2 on (Luau has none).
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
#[test]
fn finalizers_print_into_the_request_that_is_running() {
    common::within("__gc", || {
        let (tx, sink) = crossbeam_channel::unbounded::<String>();
        let isle = Isle::builder()
            .print_to(move |l| {
                let _ = tx.send(l.to_string());
            })
            .spawn(|_| Ok(()))
            .unwrap();
        isle.eval::<()>(
            "collectgarbage('stop')
             setmetatable({}, { __gc = function() print('finalized') end })",
        )
        .unwrap();
        let out = isle
            .capture_print()
            .eval::<()>("collectgarbage('restart') collectgarbage() print('collected')")
            .unwrap();
        assert_eq!(out.lines, lines(&["finalized", "collected"]));
        assert!(sink.try_recv().is_err());
    });
}

#[test]
fn a_capture_from_the_vms_own_thread_is_reentrant() {
    common::within("reentrant", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let inner = isle.clone();
        let r = isle.exec(move |_| Ok(inner.capture_print().eval::<()>("print('x')")));
        assert_eq!(r, Ok(Err(IsleError::Reentrant)));
    });
}

#[test]
fn queue_full_is_the_error_not_a_result() {
    common::within("queue full", || {
        let pool = IslePool::builder()
            .workers(1)
            .queue_capacity(1)
            .build()
            .unwrap();
        let (gate, held) = common::hold_pool(&pool);
        let queued = pool.spawn_eval::<()>("return");
        let refused = pool.capture_print().eval::<()>("print('x')");
        assert_eq!(refused, Err(IsleError::QueueFull));
        gate.release();
        held.wait().unwrap();
        queued.wait().unwrap();
    });
}

#[cfg(feature = "async")]
mod suspended {
    use super::*;

    fn init(lua: &Lua) -> mlua::Result<()> {
        common::set_yield_once(lua, "yield")?;
        lua.globals().set("turn", "a")
    }

    /// Three requests take turns on one VM (a, b, c, a, b, c, ...), each
    /// suspending while it waits for its turn; a and b are captured, c
    /// is not.
    #[test]
    fn interleaved_suspended_requests_each_get_their_own_lines() {
        common::within("interleaving", || {
            let (tx, sink) = crossbeam_channel::unbounded::<String>();
            let isle = Isle::builder()
                .print_to(move |l| {
                    let _ = tx.send(l.to_string());
                })
                .spawn(init)
                .unwrap();
            let script = |me: &str, next: &str| {
                format!(
                    "for i = 1, 3 do
                         while turn ~= '{me}' do yield() end
                         print('{me}' .. i)
                         turn = '{next}'
                         yield()
                     end"
                )
            };
            let a = isle.capture_print().spawn_eval::<()>(script("a", "b"));
            let b = isle.capture_print().spawn_eval::<()>(script("b", "c"));
            let c = isle.spawn_eval::<()>(script("c", "a"));
            let a = a.wait().unwrap();
            let b = b.wait().unwrap();
            c.wait().unwrap();
            assert_eq!((a.result, a.lines), (Ok(()), lines(&["a1", "a2", "a3"])));
            assert_eq!((b.result, b.lines), (Ok(()), lines(&["b1", "b2", "b3"])));
            assert_eq!(drained(&sink), lines(&["c1", "c2", "c3"]));
        });
    }

    #[test]
    fn interleaved_session_requests_each_get_their_own_lines() {
        common::within("interleaving sessions", || {
            let pool = IslePool::builder()
                .workers(1)
                .sandbox(true)
                .init(|lua| {
                    init(lua)?;
                    let turn = std::sync::Arc::new(turn::Turn::default());
                    let (get, set) = (turn.clone(), turn);
                    lua.globals()
                        .set("get_turn", lua.create_function(move |_, ()| Ok(get.get()))?)?;
                    lua.globals().set(
                        "set_turn",
                        lua.create_function(move |_, t: String| {
                            set.set(t);
                            Ok(())
                        })?,
                    )
                })
                .build()
                .unwrap();
            let script = |me: &str, next: &str| {
                format!(
                    "for i = 1, 3 do
                         while get_turn() ~= '{me}' do yield() end
                         print('{me}' .. i)
                         set_turn('{next}')
                         yield()
                     end
                     return '{me}'"
                )
            };
            let a = pool
                .session("a")
                .capture_print()
                .spawn_eval::<String>(script("a", "b"));
            let b = pool
                .session("b")
                .capture_print()
                .spawn_eval::<String>(script("b", "a"));
            let a = a.wait().unwrap();
            let b = b.wait().unwrap();
            assert_eq!(
                (a.result, a.lines),
                (Ok("a".into()), lines(&["a1", "a2", "a3"]))
            );
            assert_eq!(
                (b.result, b.lines),
                (Ok("b".into()), lines(&["b1", "b2", "b3"]))
            );
        });
    }

    mod turn {
        use std::sync::Mutex;

        /// Whose turn it is, shared by sessions through Rust.
        pub struct Turn(Mutex<String>);

        impl Default for Turn {
            fn default() -> Self {
                Turn(Mutex::new("a".into()))
            }
        }

        impl Turn {
            pub fn get(&self) -> String {
                self.0.lock().unwrap().clone()
            }
            pub fn set(&self, t: String) {
                *self.0.lock().unwrap() = t;
            }
        }
    }

    #[test]
    fn children_print_for_their_request() {
        common::within("children", || {
            let (tx, sink) = crossbeam_channel::unbounded::<String>();
            let isle = Isle::builder()
                .task_library(true)
                .print_to(move |l| {
                    let _ = tx.send(l.to_string());
                })
                .spawn(init)
                .unwrap();
            let out = isle
                .capture_print()
                .eval::<()>(
                    "local t = task.spawn(function() yield() print('child') end)
                     print('parent')
                     t:join()
                     print('joined')",
                )
                .unwrap();
            out.result.unwrap();
            assert_eq!(out.lines, lines(&["parent", "child", "joined"]));
            assert!(sink.try_recv().is_err());
        });
    }

    #[test]
    fn a_suspended_capture_cancelled_resolves_cancelled_and_prints_go_on_as_before() {
        common::within("cancel suspended", || {
            let (tx, sink) = crossbeam_channel::unbounded::<String>();
            let (started_tx, started) = crossbeam_channel::unbounded::<()>();
            let isle = Isle::builder()
                .print_to(move |l| {
                    let _ = tx.send(l.to_string());
                })
                .spawn(move |lua| {
                    init(lua)?;
                    common::register_signal(lua, "started", started_tx)
                })
                .unwrap();
            let task = isle.capture_print().spawn_eval::<()>(
                "print('begun') started()
                 local ok = pcall(function() while true do yield() print('tick') end end)
                 print('after')",
            );
            common::expect_msg(&started, "the request to run");
            task.cancel();
            assert_eq!(task.wait(), Err(IsleError::Cancelled));
            isle.eval::<()>("print('next')").unwrap();
            assert_eq!(common::expect_msg(&sink, "the next line"), "next");
            assert!(
                sink.try_recv().is_err(),
                "a cancelled capture's lines leaked"
            );
            let out = isle
                .capture_print()
                .eval::<i64>("yield() print('ok') return 3")
                .unwrap();
            assert_eq!((out.result, out.lines), (Ok(3), lines(&["ok"])));
        });
    }

    #[test]
    fn spawn_exec_async_is_captured_while_suspended() {
        common::within("exec async", || {
            let isle = Isle::builder().discard_print().spawn(init).unwrap();
            let out = isle
                .capture_print()
                .spawn_exec_async(|lua: Lua| async move {
                    lua.load("print('one')").exec()?;
                    common::yield_once().await;
                    lua.load("print('two')").exec()?;
                    Ok(2)
                })
                .wait()
                .unwrap();
            assert_eq!((out.result, out.lines), (Ok(2), lines(&["one", "two"])));
        });
    }
}
