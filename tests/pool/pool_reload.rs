//! `reload`: versioned code on every VM now and every VM started later,
//! run between requests, all or nothing.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, expect_msg, gate, within, worker_index, GateFn};
use mlua_isle::{mlua, IsleError, IslePool, IslePoolBuilder};

/// `VM_ID` (the worker's index) and `which()` (the code's generation) on
/// every VM.
fn builder(workers: usize, sandbox: bool) -> IslePoolBuilder {
    IslePool::builder()
        .workers(workers)
        .sandbox(sandbox)
        .init(|lua| {
            lua.globals().set("VM_ID", worker_index())?;
            lua.load("function which() return 'v0' end").exec()
        })
}

fn pool(workers: usize, sandbox: bool) -> IslePool {
    builder(workers, sandbox).build().unwrap()
}

/// `which()` on each VM, in worker order.
fn which_everywhere(pool: &IslePool) -> Vec<Result<String, IsleError>> {
    pool.broadcast(|lua| lua.load("return which()").eval())
}

fn versions(pool: &IslePool) -> Vec<u64> {
    pool.metrics().workers.iter().map(|w| w.version).collect()
}

/// A reload that defines `which()` as `name`.
fn define(name: &'static str) -> impl Fn(&mlua::Lua) -> mlua::Result<()> + Send + Sync {
    move |lua| {
        lua.load(format!("function which() return '{name}' end"))
            .exec()
    }
}

#[test]
fn reload_runs_on_every_vm_and_returns_the_next_version() {
    within("reload", || {
        let pool = pool(3, false);
        assert_eq!(pool.metrics().version, 0);
        assert_eq!(versions(&pool), vec![0, 0, 0]);
        let calls = Arc::new(AtomicUsize::new(0));
        let v = {
            let calls = calls.clone();
            pool.reload(move |lua| {
                calls.fetch_add(1, Ordering::SeqCst);
                define("v1")(lua)
            })
        };
        assert_eq!(v, Ok(1));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(which_everywhere(&pool), vec![Ok("v1".to_string()); 3]);
        assert_eq!(pool.metrics().version, 1);
        assert_eq!(versions(&pool), vec![1, 1, 1]);
        assert_eq!(pool.reload(define("v2")), Ok(2));
        assert_eq!(pool.call::<String>("which", ()), Ok("v2".into()));
        assert_eq!(versions(&pool), vec![2, 2, 2]);
        // Not requests of the pool's.
        let m = pool.metrics();
        assert_eq!(m.submitted, 1);
        pool.shutdown().unwrap();
    });
}

fn sessions_keep_their_state_and_read_what_reload_defines(sandbox: bool) {
    let pool = pool(2, sandbox);
    let a = pool.session("a");
    let b = pool.session("b");
    a.eval::<()>("count = 5").unwrap();
    b.eval::<()>("count = 7").unwrap();
    let v = pool.reload(|lua| {
        define("v1")(lua)?;
        lua.load("conf = { x = 1 }").exec()
    });
    assert_eq!(v, Ok(1));
    for (s, count) in [(&a, 5), (&b, 7)] {
        assert_eq!(s.eval::<i64>("count"), Ok(count));
        assert_eq!(s.eval::<String>("which()"), Ok("v1".into()));
        assert_eq!(s.eval::<i64>("conf.x"), Ok(1));
    }
    assert_eq!(pool.eval::<String>("which()"), Ok("v1".into()));
    assert_eq!(pool.eval::<i64>("conf.x"), Ok(1));
    // A new session too.
    assert_eq!(pool.session("c").eval::<i64>("conf.x"), Ok(1));
    if sandbox {
        // A table reload put in the globals is shared: read-only, as those
        // of `init` are, for sessions and unkeyed work alike.
        let err = a.eval::<()>("conf.x = 2").unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        let err = pool.eval::<()>("conf.x = 2").unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        assert_eq!(b.eval::<i64>("conf.x"), Ok(1));
    }
    pool.shutdown().unwrap();
}

#[test]
fn sessions_keep_their_state_and_read_what_reload_defines_without_sandbox() {
    within("sessions", || {
        sessions_keep_their_state_and_read_what_reload_defines(false)
    });
}

#[test]
fn sessions_keep_their_state_and_read_what_reload_defines_in_the_sandbox() {
    within("sessions", || {
        sessions_keep_their_state_and_read_what_reload_defines(true)
    });
}

#[test]
fn reloaded_code_survives_recycling() {
    within("recycling", || {
        let pool = builder(1, false).recycle_after(2).build().unwrap();
        assert_eq!(pool.reload(define("v1")), Ok(1));
        assert_eq!(pool.reload(define("v2")), Ok(2));
        for _ in 0..7 {
            assert_eq!(pool.call::<String>("which", ()), Ok("v2".into()));
        }
        let m = pool.metrics();
        assert!(m.workers[0].recycled >= 3, "{m:?}");
        assert_eq!(m.workers[0].version, 2);
        pool.shutdown().unwrap();
    });
}

#[test]
fn what_broadcast_loaded_is_gone_after_recycling() {
    within("recycling", || {
        let pool = builder(1, false).recycle_after(2).build().unwrap();
        let loaded = pool.broadcast(|lua| lua.load("function extra() return 1 end").exec());
        assert_eq!(loaded, vec![Ok(())]);
        assert_eq!(pool.call::<i64>("extra", ()), Ok(1));
        assert_eq!(pool.call::<i64>("extra", ()), Ok(1));
        // Recycled after those two: `init` only.
        assert_eq!(
            pool.call::<i64>("extra", ()),
            Err(IsleError::NotFound("extra".into()))
        );
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_reload_waits_for_the_running_request_only_not_for_the_queue() {
    within("busy VM", || {
        let (g, gf) = gate();
        let (ran_tx, ran) = crossbeam_channel::unbounded::<usize>();
        let pool = IslePool::builder()
            .workers(2)
            .init(move |lua| {
                lua.globals().set("VM_ID", worker_index())?;
                GateFn::register(gf.clone(), lua, "block")
            })
            .build()
            .unwrap();
        // A session on VM 0: the reload's jobs go out in worker order, so
        // once VM 1 has run its job, VM 0's is queued.
        let s = (0..)
            .map(|i| pool.session(i))
            .find(|s| s.eval::<usize>("VM_ID") == Ok(0))
            .unwrap();
        let home = 0;
        let blocker = s.spawn_eval::<()>("block()");
        g.wait_started();
        // Queued behind the running request on the same VM.
        let queued: Vec<_> = (0..3)
            .map(|_| s.spawn_eval::<bool>("reloaded == true"))
            .collect();
        let reload = pool.spawn_reload(move |lua| {
            let _ = ran_tx.send(lua.globals().get::<usize>("VM_ID")?);
            lua.globals().set("reloaded", true)
        });
        assert_eq!(expect_msg(&ran, "the reload on the idle VM"), 1);
        // Blocked by the running request alone.
        assert!(!reload.is_finished());
        assert!(queued.iter().all(|t| !t.is_finished()));
        g.release();
        assert_eq!(expect_msg(&ran, "the reload on the busy VM"), home);
        assert_eq!(reload.wait(), Ok(1));
        assert_eq!(blocker.wait(), Ok(()));
        // It ran before the queued work.
        for t in queued {
            assert_eq!(t.wait(), Ok(true));
        }
        pool.shutdown().unwrap();
    });
}

/// VM 1 is busy with a request after which it recycles, its reload job
/// queued; VM 0 runs its job, then recycles while the reload waits for VM
/// 1. With `fail`, the reload fails on VM 1 (a fresh VM 1 too).
fn recycled_during_a_reload(fail: bool) {
    let (g, gf) = gate();
    let (ran_tx, ran) = crossbeam_channel::unbounded::<usize>();
    let pool = builder(2, false)
        .recycle_after(2)
        .init(move |lua| {
            lua.globals().set("VM_ID", worker_index())?;
            lua.load("function which() return 'v0' end").exec()?;
            GateFn::register(gf.clone(), lua, "block")
        })
        .build()
        .unwrap();
    let s = (0..)
        .map(|i| pool.session(i))
        .find(|s| s.eval::<usize>("VM_ID") == Ok(1))
        .unwrap();
    // VM 1's second request: it recycles when the request ends, with the
    // reload's job still queued.
    let blocker = s.spawn_eval::<()>("block()");
    g.wait_started();
    let reload = pool.spawn_reload(move |lua| {
        let id = lua.globals().get::<usize>("VM_ID")?;
        let _ = ran_tx.send(id);
        define("v1")(lua)?;
        if fail && id == 1 {
            refuses()?;
        }
        Ok(())
    });
    assert_eq!(expect_msg(&ran, "the reload on VM 0"), 0);
    // VM 0 ran it, and now recycles (VM 1 is busy: unkeyed work goes to
    // VM 0) while the reload waits for VM 1.
    let before = pool.metrics().workers[0].recycled;
    for _ in 0..2 {
        assert_eq!(pool.eval::<i64>("1"), Ok(1));
    }
    eventually("VM 0 recycles", || {
        pool.metrics().workers[0].recycled > before
    });
    assert!(!reload.is_finished());
    g.release();
    assert_eq!(blocker.wait(), Ok(()));
    let reloaded = reload.wait();
    // VM 1 tried to recycle before it took its reload job.
    let m = pool.metrics();
    if fail {
        let err = reloaded.unwrap_err();
        assert!(is_refusal(&err), "{err:?}");
        assert_eq!(which_everywhere(&pool), vec![Ok("v0".to_string()); 2]);
        assert_eq!(versions(&pool), vec![0, 0]);
        // A fresh VM 1 failed it too: the old one kept serving.
        assert!(m.workers[1].recycle_failures >= 1, "{m:?}");
    } else {
        assert_eq!(reloaded, Ok(1));
        assert_eq!(which_everywhere(&pool), vec![Ok("v1".to_string()); 2]);
        assert_eq!(versions(&pool), vec![1, 1]);
        assert!(m.workers[1].recycled >= 1, "{m:?}");
    }
    pool.shutdown().unwrap();
}

#[test]
fn vms_recycled_while_a_reload_is_in_flight_end_on_its_version() {
    within("recycling during a reload", || {
        recycled_during_a_reload(false)
    });
}

#[test]
fn vms_recycled_while_a_reload_is_in_flight_roll_back_with_it() {
    within("recycling during a reload", || {
        recycled_during_a_reload(true)
    });
}

#[test]
fn a_vm_replacing_a_wedged_one_runs_the_committed_reloads() {
    within("wedged", || {
        let (g, gf) = gate();
        let pool = builder(2, false)
            .stop_grace(Duration::from_millis(20))
            .init(move |lua| {
                lua.globals().set("VM_ID", worker_index())?;
                lua.load("function which() return 'v0' end").exec()?;
                GateFn::register(gf.clone(), lua, "block")
            })
            .build()
            .unwrap();
        assert_eq!(pool.reload(define("v1")), Ok(1));
        // Stuck in a Rust callback past its time limit and the grace.
        let stuck = pool
            .session("stuck")
            .spawn_eval::<()>("block()")
            .timeout(Duration::from_millis(50));
        g.wait_started();
        assert_eq!(stuck.wait(), Err(IsleError::Timeout));
        eventually("the stuck VM is replaced", || {
            pool.metrics().workers.iter().any(|w| w.wedged == 1)
        });
        assert_eq!(which_everywhere(&pool), vec![Ok("v1".to_string()); 2]);
        assert_eq!(versions(&pool), vec![1, 1]);
        g.release();
        pool.shutdown().unwrap();
    });
}

/// A reload that sets `which` and `extra`, then fails on VM 1 with `fail`.
fn fails_on_vm_1(
    fail: fn() -> mlua::Result<()>,
) -> impl Fn(&mlua::Lua) -> mlua::Result<()> + Send + Sync {
    move |lua| {
        define("v2")(lua)?;
        lua.load("extra = {}").exec()?;
        if lua.globals().get::<usize>("VM_ID")? == 1 {
            fail()?;
        }
        Ok(())
    }
}

fn rolls_back(sandbox: bool, fail: fn() -> mlua::Result<()>, check: fn(&IsleError) -> bool) {
    let pool = pool(3, sandbox);
    assert_eq!(pool.reload(define("v1")), Ok(1));
    let sessions: Vec<_> = (0..3).map(|i| pool.session(i)).collect();
    for s in &sessions {
        s.eval::<()>("mine = true").unwrap();
    }
    let err = pool.reload(fails_on_vm_1(fail)).unwrap_err();
    assert!(check(&err), "{err:?}");
    // Back on version 1 everywhere: the VMs where it ran too.
    assert_eq!(pool.metrics().version, 1);
    assert_eq!(versions(&pool), vec![1, 1, 1]);
    assert_eq!(which_everywhere(&pool), vec![Ok("v1".to_string()); 3]);
    let extra = pool.broadcast(|lua| lua.load("return extra == nil").eval::<bool>());
    assert_eq!(extra, vec![Ok(true); 3]);
    for s in &sessions {
        assert_eq!(s.eval::<String>("which()"), Ok("v1".into()));
        assert_eq!(s.eval::<bool>("extra == nil and mine"), Ok(true));
    }
    // The next reload takes the version the failed one did not.
    assert_eq!(pool.reload(define("v3")), Ok(2));
    assert_eq!(which_everywhere(&pool), vec![Ok("v3".to_string()); 3]);
    pool.shutdown().unwrap();
}

fn refuses() -> mlua::Result<()> {
    Err(mlua::Error::runtime("VM 1 refuses"))
}

fn is_refusal(e: &IsleError) -> bool {
    e.as_lua()
        .is_some_and(|l| l.message().contains("VM 1 refuses"))
}

fn panics() -> mlua::Result<()> {
    panic!("VM 1 panics")
}

fn is_panic(e: &IsleError) -> bool {
    matches!(e, IsleError::Panic(m) if m.contains("VM 1 panics"))
}

#[test]
fn a_lua_error_on_one_vm_rolls_the_reload_back_everywhere() {
    within("roll back", || rolls_back(false, refuses, is_refusal));
}

#[test]
fn a_lua_error_on_one_vm_rolls_the_reload_back_everywhere_in_the_sandbox() {
    within("roll back", || rolls_back(true, refuses, is_refusal));
}

#[test]
fn a_panic_on_one_vm_rolls_the_reload_back_everywhere() {
    within("roll back", || rolls_back(false, panics, is_panic));
}

#[test]
fn a_reload_past_the_default_timeout_on_one_vm_rolls_back() {
    within("roll back", || {
        let pool = builder(2, false)
            .default_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let err = pool
            .reload(|lua| {
                define("v1")(lua)?;
                if lua.globals().get::<usize>("VM_ID")? == 1 {
                    lua.load("while true do end").exec()?;
                }
                Ok(())
            })
            .unwrap_err();
        assert_eq!(err, IsleError::Timeout);
        assert_eq!(pool.metrics().version, 0);
        assert_eq!(which_everywhere(&pool), vec![Ok("v0".to_string()); 2]);
        pool.shutdown().unwrap();
    });
}

#[test]
fn vms_started_after_a_failed_reload_run_the_committed_ones_only() {
    within("recycling after a roll back", || {
        let pool = builder(2, false).recycle_after(1).build().unwrap();
        assert_eq!(pool.reload(define("v1")), Ok(1));
        assert!(pool.reload(fails_on_vm_1(refuses)).is_err());
        for _ in 0..10 {
            assert_eq!(pool.call::<String>("which", ()), Ok("v1".into()));
            assert_eq!(pool.eval::<bool>("extra == nil"), Ok(true));
        }
        let m = pool.metrics();
        assert!(m.workers.iter().map(|w| w.recycled).sum::<u64>() >= 10);
        assert_eq!(versions(&pool), vec![1, 1]);
        pool.shutdown().unwrap();
    });
}

#[test]
fn concurrent_reloads_get_consecutive_versions() {
    within("concurrent reloads", || {
        let pool = pool(2, false);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || pool.reload(|_| Ok(())).unwrap())
            })
            .collect();
        let mut got: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 3, 4]);
        assert_eq!(pool.metrics().version, 4);
        assert_eq!(versions(&pool), vec![4, 4]);
        pool.shutdown().unwrap();
    });
}

#[test]
fn spawn_reload_is_a_task_to_await() {
    within("spawn_reload", || {
        let pool = pool(2, false);
        let v = futures::executor::block_on(pool.spawn_reload(define("v1")));
        assert_eq!(v, Ok(1));
        assert_eq!(which_everywhere(&pool), vec![Ok("v1".to_string()); 2]);
        pool.shutdown().unwrap();
    });
}

/// How a `spawn_reload` task is given up before the reload can commit.
enum GiveUp {
    Cancel,
    Timeout,
}

fn given_up_before_commit(how: GiveUp) {
    let (g, gf) = gate();
    let (ran_tx, ran) = crossbeam_channel::unbounded::<()>();
    let pool = IslePool::builder()
        .workers(2)
        .init(move |lua| {
            lua.load("function which() return 'v0' end").exec()?;
            GateFn::register(gf.clone(), lua, "block")
        })
        .build()
        .unwrap();
    let blocker = pool.session("busy").spawn_eval::<()>("block()");
    g.wait_started();
    let reload = pool.spawn_reload(move |lua| {
        let _ = ran_tx.send(());
        define("v1")(lua)
    });
    expect_msg(&ran, "the reload on the idle VM");
    match how {
        GiveUp::Cancel => {
            reload.cancel();
            assert_eq!(reload.wait(), Err(IsleError::Cancelled));
        }
        GiveUp::Timeout => {
            let reload = reload.timeout(Duration::from_millis(20));
            assert_eq!(reload.wait(), Err(IsleError::Timeout));
        }
    }
    g.release();
    assert_eq!(blocker.wait(), Ok(()));
    // Waits for the given-up one to end: it did not take version 1.
    assert_eq!(pool.reload(|_| Ok(())), Ok(1));
    assert_eq!(which_everywhere(&pool), vec![Ok("v0".to_string()); 2]);
    pool.shutdown().unwrap();
}

#[test]
fn a_reload_cancelled_before_it_commits_rolls_back() {
    within("cancel", || given_up_before_commit(GiveUp::Cancel));
}

#[test]
fn a_reload_timed_out_before_it_commits_rolls_back() {
    within("timeout", || given_up_before_commit(GiveUp::Timeout));
}

#[test]
fn reload_from_a_pool_thread_is_reentrant() {
    within("reentrant", || {
        let pool = pool(2, false);
        let inner = pool.clone();
        let r = pool.exec(move |_| Ok(inner.reload(|_| Ok(())))).unwrap();
        assert_eq!(r, Err(IsleError::Reentrant));
        assert_eq!(pool.metrics().version, 0);
        pool.shutdown().unwrap();
    });
}

#[test]
fn reload_after_shutdown_is_refused() {
    within("shutdown", || {
        let pool = pool(2, false);
        pool.shutdown().unwrap();
        assert_eq!(pool.reload(|_| Ok(())), Err(IsleError::Shutdown));
        assert_eq!(
            pool.spawn_reload(|_| Ok(())).wait(),
            Err(IsleError::Shutdown)
        );
    });
}

#[test]
fn a_shutdown_during_a_reload_resolves_it() {
    within("shutdown during a reload", || {
        let (g, gf) = gate();
        let pool = IslePool::builder()
            .workers(2)
            .init(move |lua| GateFn::register(gf.clone(), lua, "block"))
            .build()
            .unwrap();
        let blocker = pool.session("busy").spawn_eval::<()>("block()");
        g.wait_started();
        let reload = pool.spawn_reload(|_| Ok(()));
        let stopper = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.shutdown())
        };
        g.release();
        let r = reload.wait();
        assert!(matches!(r, Ok(1) | Err(IsleError::Shutdown)), "{r:?}");
        assert_eq!(blocker.wait(), Ok(()));
        stopper.join().unwrap().unwrap();
    });
}

#[test]
fn a_bounded_shutdown_during_a_reload_resolves_it() {
    within("bounded shutdown during a reload", || {
        let (g, gf) = gate();
        let pool = IslePool::builder()
            .workers(2)
            .init(move |lua| GateFn::register(gf.clone(), lua, "block"))
            .build()
            .unwrap();
        let blocker = pool.session("busy").spawn_eval::<()>("block()");
        g.wait_started();
        let reloader = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.reload(|_| Ok(())))
        };
        blocker.detach();
        let stopper = std::thread::spawn(move || pool.shutdown_timeout(Duration::ZERO));
        g.release();
        let r = reloader.join().unwrap();
        assert!(matches!(r, Ok(1) | Err(IsleError::Shutdown)), "{r:?}");
        let _ = stopper.join().unwrap();
    });
}

/// Cancelling a `spawn_reload` whose `f` loops on a VM (no time limit)
/// stops `f` there: the VM serves again, and the next reload runs.
#[test]
fn cancelling_a_spawned_reload_stops_its_function_on_the_vms() {
    within("cancelled looping reload", || {
        let pool = IslePool::builder().workers(1).build().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let t = pool.spawn_reload(move |lua| {
            let _ = tx.send(());
            lua.load("while true do end").exec()
        });
        rx.recv().unwrap();
        t.cancel();
        assert_eq!(t.wait(), Err(IsleError::Cancelled));
        assert_eq!(pool.eval::<i64>("return 1"), Ok(1));
        assert_eq!(pool.reload(|lua| lua.globals().set("v", 2)), Ok(1));
        assert_eq!(pool.eval::<i64>("return v"), Ok(2));
        pool.shutdown().unwrap();
    });
}

/// A reload under `default_timeout` fails on time when one slot's VM is
/// stuck for good (wedged in a host callback, its replacement unable to
/// start): its roll back waits for that slot at most the time limit plus
/// one grace, and the slot rolls back when it gets back.
#[test]
fn a_reload_fails_on_time_when_a_slot_is_stuck_for_good() {
    let (g, block) = common::gate();
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = {
        let runs = runs.clone();
        IslePool::builder()
            .workers(2)
            .default_timeout(Duration::from_millis(300))
            .stop_grace(Duration::from_millis(100))
            .init(move |lua| {
                if runs.fetch_add(1, Ordering::SeqCst) >= 2 {
                    return Err(mlua_isle::mlua::Error::runtime("init: backend unavailable"));
                }
                block.clone().register(lua, "block")
            })
            .build()
            .unwrap()
    };
    let s = pool.session("tenant");
    s.eval::<()>("return").unwrap();
    let w = s.metrics().unwrap().worker;
    let stuck = s.spawn_eval::<()>("block()");
    g.wait_started();
    assert_eq!(stuck.wait(), Err(IsleError::Timeout));
    common::eventually("a failed replacement", || {
        pool.metrics().workers[w].recycle_failures >= 1
    });
    let r = within("reload past a stuck slot", {
        let pool = pool.clone();
        move || pool.reload(|lua| lua.globals().set("v", 1))
    });
    assert_eq!(r, Err(IsleError::Timeout));
    // The other slot is back on `init`'s version.
    assert!(pool.metrics().workers.iter().all(|m| m.version == 0));
    g.release();
    let _ = pool.shutdown_timeout(Duration::from_millis(50));
}
