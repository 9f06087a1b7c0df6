//! A tenant's heap built to be slow to collect: a long, shuffled chain of
//! weak-keyed entries (ephemerons), whose convergence in the collector's
//! atomic step is quadratic (seconds for 40,000 entries, with no Lua
//! instruction a hook could stop). A stop reaches every collection that
//! runs for a request, and the VM's own work outside requests (closing a
//! VM, recycling it) does not collect the tenant's heap.
//!
//! Lua 5.2 to 5.5 (5.1 and LuaJIT have no ephemerons; Luau's collector is
//! its own). Each test runs in a child process: a collection left running
//! on a detached thread keeps a core busy until the process exits.

use crate::common;
use crate::stop_on_time::{wait_within, GRACE};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, within};
use mlua_isle::mlua::{Function, Lua, Table};
use mlua_isle::{Isle, IsleError, IslePool, IslePoolBuilder, LuaHandle};

/// `slow_chain()`, for tenants: a weak-keyed table holding a shuffled
/// chain of `n` ephemerons, which every full collection that reaches it
/// takes seconds to converge (built with the collector stopped, so that
/// building it is quick; a tenant can build it with the collector running,
/// in more time).
fn register_slow_chain(lua: &Lua) -> mlua_isle::mlua::Result<()> {
    let build = lua
        .load(
            "local n = ...
            local keys, order = {}, {}
            for i = 1, n do keys[i] = {} order[i] = i end
            -- A fixed shuffle (the sandbox takes `math.randomseed`).
            local seed = 1
            for i = n, 2, -1 do
                seed = (seed * 1103515245 + 12345) % 2147483648
                local j = seed % i + 1
                order[i], order[j] = order[j], order[i]
            end
            local weak = setmetatable({}, { __mode = 'k' })
            for i = 1, n - 1 do weak[keys[order[i]]] = keys[order[i + 1]] end
            return { root = keys[order[1]], chain = weak }",
        )
        .into_function()?;
    let f = lua.create_function(move |lua, n: i64| {
        lua.gc_stop();
        let built = build.call::<Table>(n);
        lua.gc_restart();
        built
    })?;
    lua.globals().set("slow_chain", f)
}

/// Large enough that one full collection of the chain takes well over the
/// watchdog's patience (`common::PATIENCE`) unoptimised (about 14 s for
/// 40,000 entries).
const SLOW_CHAIN: i64 = 60_000;

/// The collector's atomic phase on a long, shuffled chain of weak-keyed
/// entries (ephemerons) takes seconds, with no Lua instruction a hook could
/// stop: the caller is answered at once, and the VM replaced.
///
/// The cancel is sent when `started()` says the collection is about to
/// begin; it may still reach the VM first, while a Lua instruction remains
/// before the collector runs, and stop the request there. That try stops
/// nothing in the collector (the VM is not replaced), so its isle is
/// dropped and the test tries again.
#[test]
fn a_long_collection_answers_on_time() {
    common::in_child("a_long_collection_answers_on_time", || {
        for _ in 0..5 {
            let isle = Isle::builder()
                .stop_grace(GRACE)
                .sandbox(true)
                .spawn(|_| Ok(()))
                .unwrap();
            let script = "started(); collectgarbage()";
            let (tx, started) = crossbeam_channel::unbounded();
            isle.exec(move |lua| {
                register_slow_chain(lua)?;
                let f = lua.create_function(move |_, ()| {
                    let _ = tx.send(());
                    Ok(())
                })?;
                lua.globals().set("started", f)
            })
            .unwrap();
            isle.eval::<()>(&format!("kept = slow_chain({SLOW_CHAIN})"))
                .unwrap();
            let task = isle.spawn_eval::<()>(script);
            common::expect_msg(&started, "the chain is built");
            task.cancel();
            assert_eq!(
                wait_within("the collection", task),
                Err(IsleError::Cancelled)
            );
            let next = isle.spawn_eval::<i64>("1 + 1");
            assert_eq!(wait_within("the next request", next), Ok(2));
            if isle.wedged() == 0 {
                // Stopped before the collector ran: try again.
                within("dropping an isle", move || drop(isle));
                continue;
            }
            assert_eq!(isle.wedged(), 1);
            within("shutdown", move || isle.shutdown()).unwrap();
            return;
        }
        panic!("in five tries, the cancel never reached the VM inside the collection");
    });
}

/// A sandboxed VM is closed without first collecting what its tenants left:
/// mlua's `Lua` runs a full collection when dropped, which a heap built to
/// be slow to collect turns into minutes, outside any request, so no stop
/// reaches it. A graceful shutdown joins the VM thread after that.
#[test]
fn shutdown_does_not_collect_a_sandboxed_tenants_slow_heap() {
    common::in_child(
        "shutdown_does_not_collect_a_sandboxed_tenants_slow_heap",
        || {
            let isle = Isle::builder()
                .sandbox(true)
                .spawn(register_slow_chain)
                .unwrap();
            isle.eval::<()>(&format!("kept = slow_chain({SLOW_CHAIN})"))
                .unwrap();
            within("shutdown", move || isle.shutdown()).unwrap();
        },
    );
}

/// The same for a pool: a session's environment holding the heap, and the
/// shared globals holding another, at shutdown.
#[test]
fn pool_shutdown_does_not_collect_a_sandboxed_tenants_slow_heap() {
    common::in_child(
        "pool_shutdown_does_not_collect_a_sandboxed_tenants_slow_heap",
        || {
            let pool = IslePool::builder()
                .workers(1)
                .sandbox(true)
                .init(register_slow_chain)
                .build()
                .unwrap();
            let session = pool.session("tenant");
            session
                .eval::<()>(&format!("kept = slow_chain({SLOW_CHAIN})"))
                .unwrap();
            pool.eval::<()>(&format!("shared_kept = slow_chain({SLOW_CHAIN})"))
                .unwrap();
            within("shutdown", move || pool.shutdown()).unwrap();
        },
    );
}

/// Recycling replaces the VM on its worker's thread: a tenant whose heap
/// is slow to collect must not stall the worker there (the next request,
/// another session's, is served).
#[test]
fn recycling_a_sandboxed_vm_does_not_collect_its_tenants_slow_heap() {
    common::in_child(
        "recycling_a_sandboxed_vm_does_not_collect_its_tenants_slow_heap",
        || {
            let pool = IslePool::builder()
                .workers(1)
                .sandbox(true)
                .recycle_after(1)
                .init(register_slow_chain)
                .build()
                .unwrap();
            // One in a session's environment, one in the shared globals.
            pool.session("tenant")
                .eval::<()>(&format!("kept = slow_chain({SLOW_CHAIN})"))
                .unwrap();
            pool.eval::<()>(&format!("kept = slow_chain({SLOW_CHAIN})"))
                .unwrap();
            let next = pool.session("other").spawn_eval::<i64>("1 + 1");
            assert_eq!(wait_within("the next request", next), Ok(2));
            assert!(pool.metrics().workers[0].recycled >= 1);
            within("shutdown", move || pool.shutdown()).unwrap();
        },
    );
}

/// Under a memory limit, a VM collects after a request that ate more than a
/// quarter of its room. That collection belongs to the request: a stop
/// reaches its caller, and a VM still collecting a grace period later is
/// replaced, as inside any C function. (It used to run after the request
/// had resolved, where no stop reached it: the VM served nothing while a
/// tenant's heap was collected, minutes for a chain like this one.)
#[test]
fn the_collection_after_a_request_is_stopped_with_it() {
    collection_after_a_request("the_collection_after_a_request_is_stopped_with_it", "");
}

/// The same for a request that suspended first (the `async` feature): it
/// ends in a later poll, which runs the collection as the first run does.
#[cfg(feature = "async")]
#[test]
fn the_collection_after_a_resumed_request_is_stopped_with_it() {
    collection_after_a_request(
        "the_collection_after_a_resumed_request_is_stopped_with_it",
        "pause(); ",
    );
}

/// Runs `prefix .. keep(SLOW_CHAIN)` on a sandboxed isle with a memory
/// limit, cancels it once the chain is built and kept, and checks that the
/// cancel was answered and the VM, stuck collecting, replaced.
fn collection_after_a_request(test: &str, prefix: &str) {
    common::in_child(test, || {
        let (tx, built) = crossbeam_channel::unbounded();
        let isle = Isle::builder()
            .sandbox(true)
            .memory_limit(16 << 20)
            .stop_grace(GRACE)
            .spawn(move |lua| {
                register_slow_chain(lua)?;
                #[cfg(feature = "async")]
                common::set_yield_once(lua, "pause")?;
                // `keep(n)`: the chain, kept in the globals before the
                // caller hears it is built (so a cancel that lands first
                // stops nothing but the collection).
                let f = lua.create_function(move |lua, n: i64| {
                    let chain: Function = lua.globals().get("slow_chain")?;
                    lua.globals().set("kept", chain.call::<Table>(n)?)?;
                    let _ = tx.send(());
                    Ok(())
                })?;
                lua.globals().set("keep", f)
            })
            .unwrap();
        let task = isle.spawn_eval::<()>(&format!("{prefix}keep({SLOW_CHAIN})"));
        common::expect_msg(&built, "the chain is built");
        task.cancel();
        assert_eq!(wait_within("the request", task), Err(IsleError::Cancelled));
        let next = isle.spawn_eval::<i64>("1 + 1");
        assert_eq!(wait_within("the next request", next), Ok(2));
        assert_eq!(isle.wedged(), 1);
        within("shutdown", move || isle.shutdown()).unwrap();
    });
}

/// Counts of the finalizers that ran inside a request and outside one.
#[derive(Clone, Default)]
struct Finalized {
    inside: Arc<AtomicUsize>,
    outside: Arc<AtomicUsize>,
}

impl Finalized {
    /// An `init` that defines `make_garbage(n)`: `n` tables whose
    /// finalizers count whether a request was running (`init` may set
    /// `__gc`; the sandbox keeps tenants from it).
    fn init(&self) -> impl Fn(&Lua) -> mlua_isle::mlua::Result<()> + Send + Sync + 'static {
        let this = self.clone();
        move |lua| {
            let this = this.clone();
            let note = lua.create_function(move |lua, ()| {
                let counter = match mlua_isle::current_token(lua) {
                    Some(_) => &this.inside,
                    None => &this.outside,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })?;
            let make = lua
                .load(
                    "local note, setmetatable = ...
                    local mt = { __gc = function() note() end }
                    return function(n)
                        for _ = 1, n do setmetatable({}, mt) end
                    end",
                )
                .call::<Function>((note, lua.globals().get::<Function>("setmetatable")?))?;
            lua.globals().set("make_garbage", make)
        }
    }

    /// Every finalizer that ran, ran inside a request (and some did).
    fn assert_only_inside(&self, what: &str) {
        let inside = self.inside.load(Ordering::Relaxed);
        let outside = self.outside.load(Ordering::Relaxed);
        assert!(
            inside > 0,
            "{what}: no finalizer ran: the test shows nothing"
        );
        assert_eq!(
            outside, 0,
            "{what}: finalizers ran outside a request ({inside} inside)"
        );
    }
}

/// A sandboxed pool (one worker unless `builder` says) whose tenants can
/// make finalized garbage.
fn pool_with(finalized: &Finalized, builder: IslePoolBuilder) -> IslePool {
    builder
        .sandbox(true)
        .init(finalized.init())
        .build()
        .unwrap()
}

/// The collector runs only inside requests: a pool's own Lua work between
/// them takes no collection step, where a step that reached the atomic
/// phase on a heap like the chain above would hold the worker with no stop
/// to reach it, and a tenant's finalizer would run with no limit on it.
/// Observed through finalizers: each says whether a request was running.
///
/// Here, new sessions (their environments are made by their first
/// requests).
#[test]
fn the_collector_runs_only_inside_requests() {
    let finalized = Finalized::default();
    let pool = pool_with(&finalized, IslePool::builder().workers(1));
    for s in 0..3000 {
        pool.session(format!("tenant {s}"))
            .eval::<()>("make_garbage(20)")
            .unwrap();
    }
    finalized.assert_only_inside("new sessions");
    within("shutdown", move || pool.shutdown()).unwrap();
}

/// ... closing sessions, by the host and by the idle timeout.
#[test]
fn the_collector_runs_only_inside_requests_when_sessions_close() {
    let finalized = Finalized::default();
    let pool = pool_with(
        &finalized,
        IslePool::builder()
            .workers(1)
            .session_idle_timeout(Duration::from_millis(1)),
    );
    for s in 0..3000 {
        let session = pool.session(format!("tenant {s}"));
        session.eval::<()>("kept = {} make_garbage(20)").unwrap();
        if s % 2 == 0 {
            pool.close_session(format!("tenant {s}"));
        }
    }
    eventually("the idle sessions expire", || {
        pool.metrics().sessions_open == 0
    });
    pool.eval::<()>("make_garbage(20)").unwrap();
    finalized.assert_only_inside("closing sessions");
    within("shutdown", move || pool.shutdown()).unwrap();
}

/// ... reloads, committed and rolled back (every other reload fails on
/// the second VM to run it, and the first VM undoes it between requests).
#[test]
fn the_collector_runs_only_inside_requests_around_reloads() {
    let finalized = Finalized::default();
    let pool = pool_with(&finalized, IslePool::builder().workers(2));
    for r in 0..1000 {
        for done in pool.broadcast(|lua| lua.load("make_garbage(20)").exec()) {
            done.unwrap();
        }
        let ran = AtomicUsize::new(0);
        let reloaded = pool.reload(move |lua| {
            lua.globals().set(format!("v{r}"), lua.create_table()?)?;
            lua.load("make_garbage(20)").exec()?;
            if r % 2 == 1 && ran.fetch_add(1, Ordering::Relaxed) == 1 {
                return Err(mlua_isle::mlua::Error::runtime("this reload fails"));
            }
            Ok(())
        });
        assert_eq!(reloaded.is_ok(), r % 2 == 0, "{reloaded:?}");
    }
    finalized.assert_only_inside("reloads");
    within("shutdown", move || pool.shutdown()).unwrap();
}

/// ... handles released by the host, on a pool and on an isle.
#[test]
fn the_collector_runs_only_inside_requests_when_handles_are_released() {
    let finalized = Finalized::default();
    let pool = pool_with(&finalized, IslePool::builder().workers(1));
    let session = pool.session("tenant");
    for _ in 0..3000 {
        let h: LuaHandle = session.eval("make_garbage(20) return {}").unwrap();
        drop(h);
    }
    finalized.assert_only_inside("pool handles");
    within("shutdown", move || pool.shutdown()).unwrap();

    let finalized = Finalized::default();
    let isle = Isle::builder()
        .sandbox(true)
        .init(finalized.init())
        .build()
        .unwrap();
    for _ in 0..3000 {
        let h: LuaHandle = isle.eval("make_garbage(20) return {}").unwrap();
        drop(h);
    }
    finalized.assert_only_inside("isle handles");
    within("shutdown", move || isle.shutdown()).unwrap();
}

/// ... requests that suspend (the `async` feature): resumed, and
/// cancelled while suspended. (The finalizers of what is left run when the
/// VM closes, at shutdown: only `init` can make one, and the tenants' heap
/// is unreachable by then, see `Vm`'s `Drop`.)
#[cfg(feature = "async")]
#[test]
fn the_collector_runs_only_inside_requests_that_suspend() {
    let finalized = Finalized::default();
    let init = finalized.init();
    let (parked_tx, parked) = crossbeam_channel::unbounded();
    let pool = IslePool::builder()
        .workers(1)
        .sandbox(true)
        .init(move |lua| {
            init(lua)?;
            // `park(forever)`: suspends the request once (`false`), or
            // until it is stopped.
            let parked_tx = parked_tx.clone();
            let park = lua.create_async_function(move |_, forever: bool| {
                let _ = parked_tx.send(());
                async move {
                    if forever {
                        futures::future::pending::<()>().await;
                    } else {
                        let mut once = false;
                        futures::future::poll_fn(|cx| {
                            once = !once;
                            cx.waker().wake_by_ref();
                            if once {
                                std::task::Poll::Pending
                            } else {
                                std::task::Poll::Ready(())
                            }
                        })
                        .await;
                    }
                    Ok(())
                }
            })?;
            lua.globals().set("park", park)
        })
        .build()
        .unwrap();
    for i in 0..1000 {
        let session = pool.session(i % 10);
        let resumed = session.spawn_eval::<()>("make_garbage(10) park(false) make_garbage(10)");
        let stopped = session.spawn_eval::<()>("make_garbage(10) park(true)");
        within("resumed", move || resumed.wait()).unwrap();
        parked.recv().unwrap();
        parked.recv().unwrap();
        pool.eval::<()>("make_garbage(10)").unwrap();
        stopped.cancel();
        assert_eq!(
            within("cancelled", move || stopped.wait()),
            Err(IsleError::Cancelled)
        );
    }
    finalized.assert_only_inside("suspended requests");
    within("shutdown", move || pool.shutdown()).unwrap();
}
