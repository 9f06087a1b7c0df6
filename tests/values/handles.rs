//! `LuaHandle`: handles to Lua functions and tables that remember their VM
//! (and session), are called and read through the request path, and are
//! released when dropped.

use crate::common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::{eventually, gate, thread_gone, within};
use mlua_isle::mlua::{self, FromLua, Lua};
use mlua_isle::{Isle, IsleError, IslePool, LuaErrorKind, LuaHandle};

const DOUBLE: &str = "return function(x) return x * 2 end";

fn conversion(e: &IsleError) -> bool {
    e.as_lua()
        .is_some_and(|l| l.kind() == LuaErrorKind::Conversion)
}

fn isle() -> Isle {
    Isle::spawn(|lua| lua.load("function apply(f, x) return f(x) end").exec()).unwrap()
}

/// A pool whose VMs each have a distinct global `vm`.
fn pool(
    workers: usize,
    build: impl FnOnce(mlua_isle::IslePoolBuilder) -> mlua_isle::IslePoolBuilder,
) -> IslePool {
    static NEXT: AtomicI64 = AtomicI64::new(1);
    build(IslePool::builder().workers(workers).init(|lua| {
        lua.globals()
            .set("vm", NEXT.fetch_add(1, Ordering::Relaxed))?;
        lua.load("function apply(f, x) return f(x) end").exec()
    }))
    .build()
    .unwrap()
}

fn used_memory(isle: &Isle) -> usize {
    isle.exec(|lua| {
        lua.gc_collect()?;
        lua.gc_collect()?;
        Ok(lua.used_memory())
    })
    .unwrap()
}

#[test]
fn an_isle_returns_a_handle_that_calls_its_function() {
    let isle = isle();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    assert_eq!(f.type_name(), "function");
    assert_eq!(f.call::<i64>(21), Ok(42));
    assert_eq!(f.spawn_call::<i64>(5).wait(), Ok(10));
    let debug = format!("{f:?}");
    assert!(
        debug.contains("LuaHandle") && debug.contains("function"),
        "{debug}"
    );
    // Counted as the isle's requests.
    let before = isle.metrics().completed;
    f.call::<i64>(1).unwrap();
    eventually("the call is counted", || isle.metrics().completed > before);
}

#[test]
fn clones_share_one_value_and_work_from_any_thread() {
    let isle = isle();
    let counter: LuaHandle = isle
        .eval("local n = 0; return function() n = n + 1; return n end")
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let c = counter.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    c.call::<i64>(()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(counter.call::<i64>(()), Ok(101));
}

#[test]
fn tables_give_fields_methods_and_call_through_metamethods() {
    let isle = isle();
    let obj: LuaHandle = isle
        .eval(
            "local proto = { kind = 'counter' }
             proto.__index = proto
             function proto:add(k) self.n = self.n + k; return self.n end
             proto.__call = function(self, x) return 'called with ' .. x end
             return setmetatable({ n = 1 }, proto)",
        )
        .unwrap();
    assert_eq!(obj.type_name(), "table");
    assert_eq!(obj.get::<i64>("n"), Ok(1));
    assert_eq!(obj.get::<String>("kind"), Ok("counter".into())); // __index
    assert_eq!(obj.call_method::<i64>("add", 4), Ok(5));
    assert_eq!(obj.spawn_call_method::<i64>("add", 1).wait(), Ok(6));
    assert_eq!(obj.spawn_get::<i64>("n").wait(), Ok(6));
    assert_eq!(obj.call::<String>(7), Ok("called with 7".into())); // __call
    let missing = obj.call_method::<()>("nope", ()).unwrap_err();
    assert!(
        missing.to_string().contains("no method `nope`"),
        "{missing}"
    );
    let plain: LuaHandle = isle.eval("return {}").unwrap();
    let e = plain.call::<()>(()).unwrap_err();
    assert!(e.to_string().contains("is not a function"), "{e}");
    let n = obj
        .exec(|_, v| v.as_table().unwrap().raw_get::<i64>("n"))
        .unwrap();
    assert_eq!(n, 6);
}

struct Meter(i64);

impl mlua::UserData for Meter {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("reading", |_, m| Ok(m.0));
    }

    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut("add", |_, m, k: i64| {
            m.0 += k;
            Ok(m.0)
        });
        methods.add_meta_method(mlua::MetaMethod::Call, |_, m, x: i64| Ok(m.0 * x));
    }
}

#[test]
fn userdata_give_fields_methods_and_call_through_metamethods() {
    let isle = Isle::spawn(|lua| lua.globals().set("meter", Meter(2))).unwrap();
    let meter: LuaHandle = isle.eval("meter").unwrap();
    assert_eq!(meter.type_name(), "userdata");
    assert_eq!(meter.get::<i64>("reading"), Ok(2));
    assert_eq!(meter.call_method::<i64>("add", 3), Ok(5));
    assert_eq!(meter.call::<i64>(10), Ok(50)); // __call
}

#[test]
fn handles_come_in_tuples_vecs_and_from_exec() {
    let isle = isle();
    let (a, b): (LuaHandle, LuaHandle) = isle
        .eval("return function() return 1 end, {x = 2}")
        .unwrap();
    assert_eq!(a.call::<i64>(()), Ok(1));
    assert_eq!(b.get::<i64>("x"), Ok(2));
    let all: Vec<LuaHandle> = isle
        .eval("return { function() return 'a' end, function() return 'b' end }")
        .unwrap();
    let got: Vec<String> = all.iter().map(|h| h.call::<String>(()).unwrap()).collect();
    assert_eq!(got, ["a", "b"]);
    let made = isle
        .exec(|lua| {
            let v = lua.load(DOUBLE).eval::<mlua::Value>()?;
            LuaHandle::from_lua(v, lua)
        })
        .unwrap();
    assert_eq!(made.call::<i64>(8), Ok(16));
    let none: Option<LuaHandle> = isle.eval("return nil").unwrap();
    assert!(none.is_none());
}

#[test]
fn values_a_handle_cannot_hold_are_conversion_errors_naming_it() {
    let isle = isle();
    for (code, what) in [
        ("return nil", "nil"),
        ("return 5", "integer"),
        ("return 'x'", "string"),
        ("return coroutine.create(function() end)", "coroutine"),
    ] {
        let e = isle.eval::<LuaHandle>(code).unwrap_err();
        assert!(conversion(&e), "{code}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("LuaHandle") && msg.contains(what),
            "{code}: {msg}"
        );
    }
    // Outside a request's VM (a plain Lua).
    let lua = Lua::new();
    let v = lua.load(DOUBLE).eval::<mlua::Value>().unwrap();
    let e = LuaHandle::from_lua(v, &lua).unwrap_err();
    assert!(e.to_string().contains("not an isle's or pool's VM"), "{e}");
    // The isle is still fine.
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn a_handle_goes_back_into_lua_as_an_argument_on_its_own_vm_only() {
    let isle = isle();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    assert_eq!(isle.call::<i64>("apply", (f.clone(), 3)), Ok(6));
    let other = self::isle();
    let e = other.call::<i64>("apply", (f.clone(), 3)).unwrap_err();
    assert!(conversion(&e), "{e:?}");
    assert!(e.to_string().contains("another Lua VM"), "{e}");
    assert_eq!(other.eval::<i64>("2"), Ok(2));
}

#[test]
fn a_blocking_call_on_its_own_vm_thread_is_reentrant() {
    let isle = isle();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    let g = f.clone();
    let r = isle.exec(move |_| Ok(g.call::<i64>(1))).unwrap();
    assert_eq!(r, Err(IsleError::Reentrant));
    // A spawned call from there runs later.
    let g = f.clone();
    let t = isle.exec(move |_| Ok(g.spawn_call::<i64>(2))).unwrap();
    assert_eq!(within("the spawned call", move || t.wait()), Ok(4));
}

#[test]
fn a_looping_call_is_stopped_by_cancel_and_time_limits() {
    let isle = isle();
    let spin: LuaHandle = isle
        .eval("return function() while true do end end")
        .unwrap();
    let t = spin.spawn_call::<()>(());
    t.cancel();
    assert_eq!(
        within("cancel", move || t.wait()),
        Err(IsleError::Cancelled)
    );
    let t = spin.spawn_call::<()>(()).timeout(Duration::from_millis(20));
    assert_eq!(
        within("time limit", move || t.wait()),
        Err(IsleError::Timeout)
    );
    assert_eq!(isle.eval::<i64>("3"), Ok(3));
}

#[test]
fn a_full_queue_refuses_a_handles_request() {
    let isle = Isle::builder().queue_capacity(1).spawn(|_| Ok(())).unwrap();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    let (g, block) = gate();
    let held = isle.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    g.wait_started();
    let queued = f.spawn_call::<i64>(1);
    assert_eq!(f.spawn_call::<i64>(2).wait(), Err(IsleError::QueueFull));
    g.release();
    within("the held request", move || held.wait()).unwrap();
    assert_eq!(queued.wait(), Ok(2));

    // A pool worker's handle: the pool's queue capacity.
    let pool = pool(1, |b| b.queue_capacity(1));
    let f: LuaHandle = pool.eval(DOUBLE).unwrap();
    let (g, block) = gate();
    let held = pool.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    g.wait_started();
    let queued = f.spawn_call::<i64>(1);
    assert_eq!(f.spawn_call::<i64>(2).wait(), Err(IsleError::QueueFull));
    g.release();
    within("the held request", move || held.wait()).unwrap();
    assert_eq!(queued.wait(), Ok(2));
}

#[test]
fn a_handle_does_not_keep_its_isle_alive() {
    let isle = Isle::builder().name("hnd-drop").spawn(|_| Ok(())).unwrap();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    drop(isle);
    assert!(thread_gone("hnd-drop"), "the VM thread still runs");
    assert_eq!(f.call::<i64>(1), Err(IsleError::Shutdown));
    assert_eq!(f.spawn_call::<i64>(1).wait(), Err(IsleError::Shutdown));
    let limited = f.spawn_call::<i64>(1).timeout(Duration::from_secs(60));
    assert_eq!(limited.wait(), Err(IsleError::Shutdown));

    let isle = self::isle();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    isle.shutdown().unwrap();
    assert_eq!(f.call::<i64>(1), Err(IsleError::Shutdown));
    drop(f); // after its VM: nothing to free, nothing breaks
}

#[test]
fn dropping_a_handle_gives_its_memory_back() {
    let isle = isle();
    let base = used_memory(&isle);
    let big: LuaHandle = isle
        .eval("local t = {} for i = 1, 100000 do t[i] = { i } end return t")
        .unwrap();
    let held = used_memory(&isle);
    assert!(held > base + 1_000_000, "base {base}, held {held}");
    let copy = big.clone();
    drop(big);
    assert!(
        used_memory(&isle) > base + 1_000_000,
        "freed with a clone alive"
    );
    drop(copy);
    let after = used_memory(&isle);
    assert!(
        after < base + 200_000,
        "base {base}, held {held}, after {after}"
    );
}

#[test]
fn many_handles_made_and_dropped_leave_nothing_behind() {
    let isle = isle();
    // Warm up (the chunk cache, the registry's first slots).
    drop(isle.eval::<Vec<LuaHandle>>("local t = {} for i = 1, 10 do t[i] = {} end return t"));
    let base = used_memory(&isle);
    for _ in 0..10 {
        let many: Vec<LuaHandle> = isle
            .eval("local t = {} for i = 1, 1000 do t[i] = { i } end return t")
            .unwrap();
        assert_eq!(many.len(), 1000);
        drop(many);
    }
    let after = used_memory(&isle);
    assert!(after < base + 100_000, "base {base}, after {after}");
    // 10,000 alive at once (registry references, not mlua's ref stack,
    // which holds ~8,000 on Lua 5.1 and LuaJIT).
    let live: Vec<LuaHandle> = isle
        .eval("local t = {} for i = 1, 10000 do local k = i; t[i] = function() return k end end return t")
        .unwrap();
    assert_eq!(live[9999].call::<i64>(()), Ok(10000));
    assert_eq!(live[0].call::<i64>(()), Ok(1));
}

#[test]
fn handles_dropped_from_many_threads_while_the_vm_is_busy_are_freed() {
    let isle = isle();
    let base = used_memory(&isle);
    let handles: Vec<LuaHandle> = isle
        .eval("local t = {} for i = 1, 800 do t[i] = { string.rep('x', 1000 + i) } end return t")
        .unwrap();
    let (g, block) = gate();
    let held = isle.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    g.wait_started();
    let mut chunks: Vec<Vec<LuaHandle>> = (0..8).map(|_| Vec::new()).collect();
    for (i, h) in handles.into_iter().enumerate() {
        chunks[i % 8].push(h.clone());
        chunks[(i + 1) % 8].push(h);
    }
    let threads: Vec<_> = chunks
        .into_iter()
        .map(|c| std::thread::spawn(move || drop(c)))
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    g.release();
    within("the held request", move || held.wait()).unwrap();
    let after = used_memory(&isle);
    assert!(after < base + 100_000, "base {base}, after {after}");
}

#[test]
fn a_handle_dropped_on_its_vm_thread_is_freed_too() {
    let isle = isle();
    let base = used_memory(&isle);
    let big: LuaHandle = isle
        .eval("local t = {} for i = 1, 50000 do t[i] = i end return t")
        .unwrap();
    isle.exec(move |_| {
        drop(big);
        Ok(())
    })
    .unwrap();
    let after = used_memory(&isle);
    assert!(after < base + 100_000, "base {base}, after {after}");
}

#[test]
fn a_pool_handle_runs_on_the_worker_that_made_it() {
    let pool = pool(2, |b| b);
    // A handle on one worker; then, holding that worker with one of the
    // handle's own requests, another handle on the other worker.
    let (vm_a, a): (i64, LuaHandle) = pool.eval("return vm, function() return vm end").unwrap();
    let (g, block) = gate();
    let held = a.spawn_exec(move |_, _| {
        block.block();
        Ok(())
    });
    g.wait_started();
    let (vm_b, b): (i64, LuaHandle) = pool.eval("return vm, function() return vm end").unwrap();
    assert_ne!(vm_a, vm_b);
    g.release();
    within("the held request", move || held.wait()).unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let h = if i % 2 == 0 { &a } else { &b };
            h.spawn_call::<i64>(())
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let want = if i % 2 == 0 { vm_a } else { vm_b };
        assert_eq!(t.wait(), Ok(want));
    }
    // Counted in the pool's metrics, on the worker that ran them.
    // (A worker counts a request just after answering it.)
    eventually("both workers count their calls", || {
        pool.metrics().workers.iter().all(|w| w.completed >= 20)
    });
}

#[test]
fn a_pool_handle_whose_vm_was_recycled_is_lost() {
    let pool = pool(1, |b| b.recycle_after(3));
    let f: LuaHandle = pool.eval(DOUBLE).unwrap();
    assert_eq!(f.call::<i64>(2), Ok(4));
    // Requests until the VM is recycled.
    eventually("the VM is recycled", || {
        pool.eval::<()>("return").unwrap();
        pool.metrics().workers[0].recycled > 0
    });
    let e = f.call::<i64>(2).unwrap_err();
    assert!(matches!(e, IsleError::HandleLost(_)), "{e:?}");
    assert!(e.to_string().contains("recycled or replaced"), "{e}");
    // As an argument: lost too.
    let e = pool.call::<i64>("apply", (f.clone(), 2)).unwrap_err();
    assert!(matches!(e, IsleError::HandleLost(_)), "{e:?}");
}

#[test]
fn a_pool_handle_does_not_keep_its_pool_alive() {
    let pool = IslePool::builder()
        .name("hnd-pool")
        .workers(2)
        .build()
        .unwrap();
    let f: LuaHandle = pool.eval(DOUBLE).unwrap();
    drop(pool);
    assert!(thread_gone("hnd-pool-0") && thread_gone("hnd-pool-1"));
    assert_eq!(f.call::<i64>(1), Err(IsleError::Shutdown));
}

#[test]
fn a_session_handle_runs_as_a_request_of_its_session_in_order() {
    let pool = pool(2, |b| b);
    let s = pool.session("alice");
    let inc: LuaHandle = s
        .eval("count = 0; return function() count = count + 1; return count end")
        .unwrap();
    assert_eq!(inc.session().map(|k| k.to_string()), Some("alice".into()));
    assert!(format!("{inc:?}").contains("alice"));
    let tasks: Vec<_> = (0..5).map(|_| inc.spawn_call::<i64>(())).collect();
    let seen = s.spawn_eval::<i64>("count");
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64 + 1));
    }
    assert_eq!(seen.wait(), Ok(5));
    // Its own session takes it as an argument.
    let apply: i64 = s.call("apply", (inc.clone(), ())).unwrap();
    assert_eq!(apply, 6);
    // Exec runs in the session too: the handle made there is the session's.
    let nested = inc
        .exec(|lua, _| lua.load("return {}").eval::<LuaHandle>())
        .unwrap();
    assert_eq!(
        nested.session().map(|k| k.to_string()),
        Some("alice".into())
    );
}

#[test]
fn a_session_handle_is_refused_by_other_sessions_and_unkeyed_work() {
    let pool = pool(1, |b| b.sandbox(true));
    let a = pool.session("a");
    let b = pool.session("b");
    let secret: LuaHandle = a.eval("secret = {}; return secret").unwrap();
    let e = b.call::<()>("apply", (secret.clone(), ())).unwrap_err();
    assert!(conversion(&e), "{e:?}");
    assert!(e.to_string().contains("session `a`"), "{e}");
    let e = pool.call::<()>("apply", (secret.clone(), ())).unwrap_err();
    assert!(conversion(&e), "{e:?}");
    // Session b is fine.
    assert_eq!(b.eval::<i64>("1"), Ok(1));
}

#[test]
fn a_session_handle_is_lost_with_its_session() {
    let pool = pool(1, |b| b);
    let s = pool.session("gone");
    let f: LuaHandle = s.eval(DOUBLE).unwrap();
    assert!(s.close());
    let e = f.call::<i64>(1).unwrap_err();
    assert!(matches!(e, IsleError::HandleLost(_)), "{e:?}");
    assert!(e.to_string().contains("closed"), "{e}");
    // The key opened again is another session: the old handle stays lost,
    // also as an argument there.
    s.eval::<()>("x = 1").unwrap();
    assert!(matches!(f.call::<i64>(1), Err(IsleError::HandleLost(_))));
    let e = s.call::<i64>("apply", (f.clone(), 1)).unwrap_err();
    assert!(matches!(e, IsleError::HandleLost(_)), "{e:?}");

    // Lost with a recycled VM.
    let pool = self::pool(1, |b| b.recycle_after(2));
    let s = pool.session("recycled");
    let f: LuaHandle = s.eval(DOUBLE).unwrap();
    eventually("the VM is recycled", || {
        let _ = pool.eval::<()>("return");
        pool.metrics().workers[0].recycled > 0
    });
    let e = f.call::<i64>(1).unwrap_err();
    assert!(matches!(e, IsleError::HandleLost(_)), "{e:?}");
    assert!(e.to_string().contains("recycled"), "{e}");
}

#[test]
fn a_handle_to_a_sandbox_view_is_no_way_to_write_shared_state() {
    let pool = pool(1, |b| b.sandbox(true));
    let a = pool.session("a");
    let view: LuaHandle = a.eval("return string").unwrap();
    // Reads go through the view.
    let upper: LuaHandle = view.get("upper").unwrap();
    assert_eq!(upper.call::<String>("abc"), Ok("ABC".into()));
    // Writes through the view are refused, as for Lua code.
    let e = view
        .exec(|_, v| v.as_table().unwrap().set("upper", 1))
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    // Other tenants see the library unchanged.
    let b = pool.session("b");
    assert_eq!(b.eval::<String>("string.upper('x')"), Ok("X".into()));
}

#[test]
fn an_isle_handle_whose_vm_was_replaced_is_lost() {
    let (g, block) = gate();
    let isle = Isle::builder()
        .stop_grace(Duration::from_millis(20))
        .init(move |lua| block.clone().register(lua, "block"))
        .build()
        .unwrap();
    let f: LuaHandle = isle.eval(DOUBLE).unwrap();
    let stuck = isle.spawn_call::<()>("block", ());
    g.wait_started();
    stuck.cancel();
    assert_eq!(
        within("the stop", move || stuck.wait()),
        Err(IsleError::Cancelled)
    );
    eventually("the VM is replaced", || isle.wedged() == 1);
    let e = f.call::<i64>(1).unwrap_err();
    assert!(matches!(e, IsleError::HandleLost(_)), "{e:?}");
    g.release();
}

#[cfg(feature = "async")]
mod suspended {
    use super::*;

    #[test]
    fn a_handle_made_after_a_session_request_suspended_is_the_sessions() {
        let pool = IslePool::builder()
            .workers(1)
            .init(|lua| common::set_yield_once(lua, "yield_once"))
            .build()
            .unwrap();
        let s = pool.session("later");
        let f: LuaHandle = s
            .eval("who = 'later'; yield_once(); return function() return who end")
            .unwrap();
        assert_eq!(f.session().map(|k| k.to_string()), Some("later".into()));
        assert_eq!(f.call::<String>(()), Ok("later".into()));
        // Unkeyed: the worker's.
        let g: LuaHandle = pool
            .eval("yield_once(); return function() return 1 end")
            .unwrap();
        assert_eq!(g.session(), None);
        assert_eq!(g.call::<i64>(()), Ok(1));
        // A handle's call that suspends.
        let h: LuaHandle = s
            .eval("return function(x) yield_once(); return x + 1 end")
            .unwrap();
        assert_eq!(h.call::<i64>(1), Ok(2));
    }
}
