//! Attacks on the tenant controls (fair service, per-session limits and
//! metrics, waiting submits, hot reload, latency histograms), written as a
//! hostile tenant or a careless server author who has read `src/`.
//!
//! Each test guards one claim. Those that found a bug are `#[ignore]`d
//! with the reason, so the branch stays green until it is fixed.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, gate, hold_pool, within, Flag, GateFn};
use mlua_isle::{mlua, IsleError, IslePool, Permit, PoolMetrics, Session, Task};
use parking_lot::Mutex;

type Log = Arc<Mutex<Vec<(&'static str, usize)>>>;

/// One VM, so every session shares it.
fn one_vm() -> IslePool {
    IslePool::builder().workers(1).build().unwrap()
}

/// A session request that records `(key, n)` in `log` when it runs.
fn logged(s: &Session, log: &Log, key: &'static str, n: usize) -> Task<()> {
    let log = log.clone();
    s.spawn_exec(move |_, _| {
        log.lock().push((key, n));
        Ok(())
    })
}

/// How many requests of `key` ran before the first of `first`.
#[cfg_attr(not(feature = "async"), allow(dead_code))]
fn ran_before(log: &[(&str, usize)], key: &str, first: &str) -> usize {
    let at = log.iter().position(|(k, _)| *k == first).unwrap();
    log[..at].iter().filter(|(k, _)| *k == key).count()
}

/// Each key's entries in `log` are in increasing order.
fn in_order_per_key(log: &[(&'static str, usize)]) {
    let mut keys: Vec<&str> = log.iter().map(|e| e.0).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let mine: Vec<usize> = log.iter().filter(|e| e.0 == key).map(|e| e.1).collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {mine:?}"
        );
    }
}

/// Whether every request the pool took is accounted for.
fn identity_holds(m: &PoolMetrics) -> bool {
    let resolved: u64 = m
        .workers
        .iter()
        .map(|w| w.completed + w.failed + w.cancelled)
        .sum();
    m.submitted == m.rejected + m.discarded + resolved
}

/// Every request the pool took is accounted for once it is quiet.
fn assert_identity(m: &PoolMetrics) {
    let resolved: u64 = m
        .workers
        .iter()
        .map(|w| w.completed + w.failed + w.cancelled)
        .sum();
    assert_eq!(
        m.submitted,
        m.rejected + m.discarded + resolved,
        "submitted {} != rejected {} + discarded {} + resolved {resolved}",
        m.submitted,
        m.rejected,
        m.discarded
    );
}

// ---------------------------------------------------------------------
// Fair service
// ---------------------------------------------------------------------

/// Keys with one request each that one VM can hold open at once: mlua keeps
/// a stack slot per live reference (a session's environment is one), and
/// the stack of Lua 5.1 and LuaJIT stops at 8,000 slots (README, "Lua
/// backends"). Luau held 20,000 in a test; more is not known.
const ONE_SHOT_KEYS: u32 = if cfg!(any(feature = "lua51", feature = "luajit")) {
    5_000
} else if cfg!(feature = "luau") {
    15_000
} else {
    100_000
};

/// 100,000 keys with one request each (fewer where the backend's stack
/// cannot hold that many sessions), and 1,000 keys with 20 each, all
/// queued on one VM at once: everything runs, each key in order, and the
/// fair queue is empty afterwards (the watchdog catches a quadratic queue).
#[test]
fn a_hundred_thousand_keys_flooding_one_vm_are_all_served_in_order() {
    within("100k keys", || {
        let pool = one_vm();
        let log = Log::default();
        let (g, held) = hold_pool(&pool);
        let count = Arc::new(AtomicUsize::new(0));
        let total = ONE_SHOT_KEYS as usize + 20_000;
        let mut tasks = Vec::with_capacity(total);
        for k in 0..ONE_SHOT_KEYS {
            let count = count.clone();
            tasks.push(pool.session(format!("k{k}")).spawn_exec(move |_, _| {
                count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }));
        }
        let keys: Vec<&'static str> = (0..1000)
            .map(|k| &*Box::leak(format!("m{k}").into_boxed_str()))
            .collect();
        for i in 0..20 {
            for key in &keys {
                tasks.push(logged(&pool.session(*key), &log, key, i));
            }
        }
        assert_eq!(pool.metrics().workers[0].queued, total);
        g.release();
        held.wait().unwrap();
        for t in tasks {
            t.wait().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), ONE_SHOT_KEYS as usize);
        let log = log.lock();
        assert_eq!(log.len(), 20_000);
        in_order_per_key(&log);
        pool.shutdown().unwrap();
        let m = pool.metrics();
        assert_eq!(m.workers[0].queued, 0);
        assert_eq!(m.workers[0].completed, total as u64 + 1);
    });
}

/// A key alternating very long and very short requests beside a key of
/// short ones: both keep their order, and a quiet key arriving during a
/// long request runs right after it.
#[test]
fn a_key_alternating_long_and_short_requests_does_not_hold_a_quiet_key() {
    within("long and short", || {
        let pool = IslePool::builder()
            .workers(1)
            .init(|lua| {
                lua.load("function spin(n) local x = 0 for i = 1, n do x = x + i end return x end")
                    .exec()
            })
            .build()
            .unwrap();
        let log = Log::default();
        let (g, held) = hold_pool(&pool);
        let (a, b) = (pool.session("alt"), pool.session("short"));
        let mut tasks = Vec::new();
        for i in 0..40 {
            let alog = log.clone();
            let n = if i % 2 == 0 { 200_000 } else { 1 };
            tasks.push(a.spawn_exec(move |lua, _| {
                lua.globals()
                    .get::<mlua::Function>("spin")?
                    .call::<i64>(n)?;
                alog.lock().push(("alt", i));
                Ok(())
            }));
            tasks.push(logged(&b, &log, "short", i));
        }
        g.release();
        held.wait().unwrap();
        // While the backlog is served: a quiet key waits for at most the
        // running request and one of each busy key.
        let (qg, qblock) = gate();
        let probe = pool.session("probe-hold").spawn_exec(move |_, _| {
            qblock.block();
            Ok(())
        });
        qg.wait_started();
        let q = logged(&pool.session("quiet"), &log, "quiet", 0);
        let at = log.lock().len();
        qg.release();
        probe.wait().unwrap();
        q.wait().unwrap();
        for t in tasks {
            t.wait().unwrap();
        }
        let log = log.lock();
        in_order_per_key(&log);
        let quiet = log.iter().position(|e| e.0 == "quiet").unwrap();
        assert!(
            quiet - at <= 2,
            "quiet waited for {} requests: {:?}",
            quiet - at,
            &log[at..quiet]
        );
        pool.shutdown().unwrap();
    });
}

/// A key whose requests panic, time out and are cancelled mid-run: the
/// other keys on the VM go on, each outcome is counted once, and the key
/// serves its next request.
#[test]
fn a_key_that_panics_times_out_and_is_cancelled_mid_turn_does_not_stall_the_vm() {
    within("bad key", || {
        let (started_tx, started_rx) = crossbeam_channel::unbounded();
        let (spin_tx, spin_rx) = crossbeam_channel::unbounded();
        let pool = IslePool::builder()
            .workers(1)
            .init(move |lua| {
                common::register_wait_for_cancel(lua, started_tx.clone())?;
                common::register_signal(lua, "spinning", spin_tx.clone())
            })
            .build()
            .unwrap();
        let log = Log::default();
        let (g, held) = hold_pool(&pool);
        let bad = pool.session("bad");
        let good = pool.session("good");
        let mut goods = Vec::new();
        let panicked = bad.spawn_exec(|_, _| -> mlua::Result<()> { panic!("tenant panic") });
        goods.push(logged(&good, &log, "good", 0));
        let timed_out = bad
            .spawn_eval::<()>("spinning() while true do end")
            .timeout(Duration::from_millis(100));
        goods.push(logged(&good, &log, "good", 1));
        let cancelled = bad.spawn_eval::<()>("wait_for_cancel()");
        goods.push(logged(&good, &log, "good", 2));
        let after = logged(&bad, &log, "bad", 3);
        goods.push(logged(&good, &log, "good", 3));
        g.release();
        held.wait().unwrap();
        started_rx.recv_timeout(common::PATIENCE).unwrap();
        cancelled.cancel();
        assert!(matches!(panicked.wait(), Err(IsleError::Panic(_))));
        assert_eq!(timed_out.wait(), Err(IsleError::Timeout));
        assert_eq!(cancelled.wait(), Err(IsleError::Cancelled));
        after.wait().unwrap();
        for t in goods {
            t.wait().unwrap();
        }
        in_order_per_key(&log.lock());
        // Counted just after each answer is sent: settled soon after.
        eventually("bad's counters settle", || {
            bad.metrics().is_some_and(|m| m.requests == 4)
        });
        let m = bad.metrics().unwrap();
        assert_eq!(m.completed, 1, "{m:?}");
        assert_eq!(m.failed + m.cancelled, 3, "{m:?}");
        eventually("good's counters settle", || {
            good.metrics().is_some_and(|m| m.requests == 4)
        });
        assert_eq!(good.metrics().unwrap().completed, 4);
        assert_eq!(bad.eval::<i64>("return 7"), Ok(7));
        pool.shutdown().unwrap();
        let m = pool.metrics();
        assert_identity(&m);
        // Every request that started is in the histograms. The one with a
        // time limit may have timed out while queued (behind the panic,
        // whose report can be slow to print): then it is not.
        let w = &m.workers[0];
        let unstarted = u64::from(spin_rx.try_recv().is_err());
        assert_eq!(
            m.run_time.count(),
            w.completed + w.failed + w.cancelled - unstarted,
            "{w:?}"
        );
    });
}

/// Closes racing a flood of the same key from several threads: every
/// request resolves once, each binding's requests run in order (a close
/// comes after what its session queued before it, and a request made after
/// it runs in a fresh session), and nothing hangs.
#[test]
fn close_racing_a_flood_of_the_same_key_resolves_everything_in_order() {
    within("close vs flood", || {
        let ids = Arc::new(AtomicUsize::new(1));
        let pool = IslePool::builder()
            .workers(2)
            .init(move |lua| {
                let ids = ids.clone();
                let f =
                    lua.create_function(move |_, ()| Ok(ids.fetch_add(1, Ordering::Relaxed)))?;
                lua.globals().set("fresh_id", f)
            })
            .build()
            .unwrap();
        let submitters: Vec<_> = (0..3)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let s = pool.session("contested");
                    (0..2000)
                        .map(|_| {
                            s.spawn_eval::<(usize, i64)>(
                                "id = id or fresh_id() n = (n or 0) + 1 return id, n",
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let closer = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    pool.close_session("contested");
                    std::thread::yield_now();
                }
            })
        };
        let mut ok = 0;
        for h in submitters {
            // One thread's requests: within a session (an id), the count
            // rises; once they moved on to a later session, they never
            // land in an earlier one.
            let mut past = std::collections::HashSet::new();
            let (mut id, mut last) = (0, 0);
            for t in h.join().unwrap() {
                let (i, n) = t.wait().unwrap();
                if i == id {
                    assert!(n > last, "session {i}: {n} after {last}");
                } else {
                    assert!(past.insert(i), "back in session {i} after {id}");
                    past.insert(id);
                    id = i;
                }
                last = n;
                ok += 1;
            }
        }
        closer.join().unwrap();
        assert_eq!(ok, 6000);
        pool.shutdown().unwrap();
        let m = pool.metrics();
        assert_identity(&m);
        assert!(m.workers.iter().all(|w| w.queued == 0));
    });
}

/// `recycle_after(1)` with several keys' work queued under fair service:
/// each request resolves exactly once, with its value or `SessionLost`, and
/// a request made after a `SessionLost` starts fresh.
#[test]
fn recycling_after_every_request_under_fair_service_resolves_each_request_once() {
    within("recycle under fairness", || {
        let pool = IslePool::builder()
            .workers(1)
            .recycle_after(1)
            .build()
            .unwrap();
        let (g, held) = hold_pool(&pool);
        let keys = ["a", "b", "c", "d"];
        let tasks: Vec<(usize, Task<i64>)> = (0..6)
            .flat_map(|_| keys.iter().enumerate())
            .map(|(k, key)| {
                (
                    k,
                    pool.session(*key).spawn_eval("n = (n or 0) + 1; return n"),
                )
            })
            .collect();
        g.release();
        held.wait().unwrap();
        let mut lost = [0; 4];
        for (k, t) in tasks {
            match t.wait() {
                Ok(n) => assert_eq!(n, 1, "a recycled VM starts each session afresh"),
                Err(IsleError::SessionLost) => lost[k] += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        // Each key's first request ran; the rest were bound to a lost VM.
        assert_eq!(lost, [5; 4]);
        for key in keys {
            assert_eq!(pool.session(key).eval::<i64>("return (n or 0) + 1"), Ok(1));
        }
        pool.shutdown().unwrap();
        let m = pool.metrics();
        assert_identity(&m);
        assert!(m.workers[0].recycled >= 4);
        // Requests answered `SessionLost` never started: not in the
        // histograms.
        let resolved = m.workers[0].completed + m.workers[0].failed + m.workers[0].cancelled;
        assert_eq!(m.run_time.count(), resolved - 20, "{resolved}");
        assert_eq!(m.queue_wait.count(), m.run_time.count());
    });
}

/// A worker wedged in a session's request (a Rust callback that ignores
/// stops) while several keys have work queued behind it: its replacement
/// takes the fair queue over and every request resolves.
#[test]
fn a_wedged_workers_replacement_serves_the_keys_queued_behind_it() {
    within("wedged with keys queued", || {
        let (g, gf) = gate();
        let pool = IslePool::builder()
            .workers(1)
            .stop_grace(Duration::from_millis(20))
            .init(move |lua| GateFn::register(gf.clone(), lua, "block"))
            .build()
            .unwrap();
        let stuck = pool
            .session("stuck")
            .spawn_eval::<()>("block()")
            .timeout(Duration::from_millis(50));
        g.wait_started();
        let mut tasks = Vec::new();
        for i in 0..20 {
            for key in ["stuck", "x", "y", "z"] {
                tasks.push((key, i, pool.session(key).spawn_eval::<i64>("return 1")));
            }
        }
        assert_eq!(stuck.wait(), Err(IsleError::Timeout));
        eventually("the stuck VM is replaced", || {
            pool.metrics().workers[0].wedged == 1
        });
        for (key, i, t) in tasks {
            match t.wait() {
                Ok(1) => {}
                Err(IsleError::SessionLost) => {}
                other => panic!("{key} {i}: {other:?}"),
            }
        }
        for key in ["stuck", "x", "y", "z"] {
            assert_eq!(pool.session(key).eval::<i64>("return 2"), Ok(2));
        }
        g.release();
        pool.shutdown().unwrap();
        // The stuck request is counted by its own thread when it gets back
        // (not when it is replaced): only then do the counts add up.
        eventually("the stuck thread counts its request", || {
            identity_holds(&pool.metrics())
        });
    });
}

/// A broadcast submitted behind deep queues of many keys runs after all
/// of them, and work queued after it runs after it.
#[test]
fn a_broadcast_behind_many_keys_runs_after_their_queued_work() {
    within("broadcast barrier", || {
        let pool = one_vm();
        let log = Log::default();
        let (g, held) = hold_pool(&pool);
        let mut before = Vec::new();
        for i in 0..30 {
            for key in ["a", "b", "c"] {
                before.push(logged(&pool.session(key), &log, key, i));
            }
        }
        let (btx, brx) = crossbeam_channel::bounded(1);
        let bc = {
            let pool = pool.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                let r = pool.broadcast(move |_| {
                    log.lock().push(("broadcast", 0));
                    Ok(())
                });
                let _ = btx.send(());
                r
            })
        };
        // The broadcast is queued once the VM's queue grows by one.
        eventually("broadcast queued", || {
            pool.metrics().workers[0].queued == 91
        });
        let after = logged(&pool.session("d"), &log, "late", 0);
        let after_a = logged(&pool.session("a"), &log, "late-a", 0);
        g.release();
        held.wait().unwrap();
        brx.recv_timeout(common::PATIENCE).unwrap();
        assert!(bc.join().unwrap().into_iter().all(|r| r.is_ok()));
        after.wait().unwrap();
        after_a.wait().unwrap();
        for t in before {
            t.wait().unwrap();
        }
        let log = log.lock();
        let at = log.iter().position(|e| e.0 == "broadcast").unwrap();
        assert_eq!(at, 90, "{:?}", &log[..]);
        assert!(log[at + 1..].iter().all(|e| e.0.starts_with("late")));
        pool.shutdown().unwrap();
    });
}

// ---------------------------------------------------------------------
// Shutdown with deep fair queues
// ---------------------------------------------------------------------

/// Deep queues of many keys, then `shutdown_timeout` while the VM is busy
/// in an interruptible request: every task resolves, and the counters add
/// up.
#[test]
fn shutdown_timeout_with_deep_fair_queues_resolves_every_task() {
    within("shutdown_timeout", || {
        let flag = Flag::default();
        let f2 = flag.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        let pool = IslePool::builder()
            .workers(1)
            .init(move |lua| {
                f2.register(lua, "released")?;
                common::register_signal(lua, "started", tx.clone())
            })
            .build()
            .unwrap();
        let spinner = pool
            .session("spinner")
            .spawn_eval::<()>("started() while not released() do end");
        rx.recv_timeout(common::PATIENCE).unwrap();
        let mut tasks = Vec::new();
        for i in 0..100 {
            for k in 0..50 {
                let _ = i;
                tasks.push(pool.session(format!("k{k}")).spawn_eval::<i64>("return 1"));
            }
        }
        let _ = pool.shutdown_timeout(Duration::from_millis(20));
        assert!(spinner.wait().is_err());
        let mut shut = 0;
        for t in tasks {
            match t.wait() {
                Ok(1) => {}
                Err(IsleError::Shutdown) | Err(IsleError::Cancelled) => shut += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(shut > 0);
        let m = pool.metrics();
        assert_identity(&m);
        assert_eq!(m.workers[0].queued, 0);
    });
}

/// Dropping the last handle with deep fair queues, while the VM runs an
/// interruptible request that never ends on its own: every task resolves.
#[test]
fn dropping_the_pool_with_deep_fair_queues_resolves_every_task() {
    within("drop", || {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pool = IslePool::builder()
            .workers(1)
            .init(move |lua| common::register_signal(lua, "started", tx.clone()))
            .build()
            .unwrap();
        let spinner = pool
            .session("spinner")
            .spawn_eval::<()>("started() while true do end");
        rx.recv_timeout(common::PATIENCE).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            for k in 0..50 {
                tasks.push(pool.session(format!("k{k}")).spawn_eval::<i64>("return 1"));
            }
        }
        drop(pool);
        assert!(spinner.wait().is_err());
        for t in tasks {
            match t.wait() {
                Err(IsleError::Shutdown) | Err(IsleError::Cancelled) => {}
                other => panic!("{other:?}"),
            }
        }
    });
}

// ---------------------------------------------------------------------
// Per-session rooms and permits
// ---------------------------------------------------------------------

fn capped(cap: usize) -> IslePool {
    IslePool::builder()
        .workers(1)
        .session_queue_capacity(cap)
        .queue_capacity(100)
        .build()
        .unwrap()
}

/// Callers waiting for a session's room (blocking and async) and for the
/// pool's room are all woken by a shutdown, which then drains and ends.
#[test]
fn shutdown_wakes_every_waiter_for_a_sessions_room_and_the_pools() {
    within("waiters and shutdown", || {
        let pool = IslePool::builder()
            .workers(1)
            .session_queue_capacity(1)
            .queue_capacity(2)
            .build()
            .unwrap();
        let (g, held) = hold_pool(&pool);
        let s = pool.session("s");
        let queued = s.spawn_eval::<i64>("return 1");
        let other = pool.session("o").spawn_eval::<i64>("return 2");
        // s's room is full, and so is the pool's.
        let blocking = {
            let s = s.clone();
            std::thread::spawn(move || s.reserve_timeout(common::PATIENCE * 2).map(drop))
        };
        let asynchronous = {
            let s = s.clone();
            std::thread::spawn(move || futures::executor::block_on(s.reserve()).map(drop))
        };
        let pools = {
            let p = pool.session("p");
            std::thread::spawn(move || p.reserve_timeout(common::PATIENCE * 2).map(drop))
        };
        eventually("three waiters", || {
            s.metrics().is_some_and(|m| m.waiting_for_room == 2)
                && pool.metrics().waiting_for_room == 1
        });
        let stopper = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.shutdown())
        };
        assert_eq!(blocking.join().unwrap(), Err(IsleError::Shutdown));
        assert_eq!(asynchronous.join().unwrap(), Err(IsleError::Shutdown));
        assert_eq!(pools.join().unwrap(), Err(IsleError::Shutdown));
        g.release();
        stopper.join().unwrap().unwrap();
        held.wait().unwrap();
        assert_eq!(queued.wait(), Ok(1));
        assert_eq!(other.wait(), Ok(2));
        assert_identity(&pool.metrics());
    });
}

/// A permit sent to another thread and dropped there gives both rooms
/// back; one used there runs in the session, in order.
#[test]
fn permits_dropped_or_used_on_other_threads_give_their_room_back() {
    within("permits across threads", || {
        let pool = capped(1);
        let (g, held) = hold_pool(&pool);
        let s = pool.session("s");
        let permit = s.try_reserve().unwrap();
        assert_eq!(s.try_reserve().err(), Some(IsleError::QueueFull));
        assert_eq!(
            s.spawn_eval::<i64>("return 1").wait(),
            Err(IsleError::QueueFull)
        );
        std::thread::spawn(move || drop(permit)).join().unwrap();
        let permit = s.try_reserve().unwrap();
        let t = std::thread::spawn(move || permit.spawn_eval::<i64>("x = 5 return x"))
            .join()
            .unwrap();
        assert_eq!(s.try_reserve().err(), Some(IsleError::QueueFull));
        g.release();
        held.wait().unwrap();
        assert_eq!(t.wait(), Ok(5));
        assert_eq!(s.eval::<i64>("return x"), Ok(5));
        let p = s.try_reserve().unwrap();
        drop(p);
        assert_eq!(pool.metrics().waiting_for_room, 0);
        pool.shutdown().unwrap();
        assert_identity(&pool.metrics());
    });
}

/// Session `s` of `pool`, a permit taken on it, and the session then
/// closed: the permit outlives the session it was taken on.
fn stale_permit(pool: &IslePool) -> (Session, Permit<Session>) {
    let s = pool.session("s");
    let permit = s.try_reserve().unwrap();
    assert!(s.close());
    (s, permit)
}

/// A permit taken on a session, then the session closed: the permit's
/// request binds the session afresh, and that fresh session's own bound
/// still holds (the stale permit's room is not the new session's).
#[test]
fn a_permit_outliving_its_session_does_not_overfill_the_next_one() {
    within("stale permit", || {
        let pool = capped(1);
        let (g, held) = hold_pool(&pool);
        let (s, permit) = stale_permit(&pool);
        let by_permit = permit.spawn_eval::<i64>("return 1");
        // The fresh session holds one queued request: its bound is reached.
        let mut plain = s.spawn_eval::<i64>("return 2");
        let plain_refused = plain.wait_timeout(Duration::ZERO);
        g.release();
        held.wait().unwrap();
        assert_eq!(by_permit.wait(), Ok(1));
        assert_eq!(
            plain_refused,
            Some(Err(IsleError::QueueFull)),
            "a second request queued in a session with capacity 1"
        );
        pool.shutdown().unwrap();
    });
}

/// The other way round: the fresh session is full when the stale permit
/// is used. The permit's request is refused `QueueFull` (its room was the
/// closed session's), and the room it held comes back: the pool's queue
/// does not stay one short.
#[test]
fn a_permit_outliving_its_session_is_refused_when_the_next_one_is_full() {
    within("stale permit, full session", || {
        let pool = capped(1);
        let (g, held) = hold_pool(&pool);
        let (s, permit) = stale_permit(&pool);
        let plain = s.spawn_eval::<i64>("return 2");
        let by_permit = permit.spawn_eval::<i64>("return 1");
        assert_eq!(by_permit.wait(), Err(IsleError::QueueFull));
        g.release();
        held.wait().unwrap();
        assert_eq!(plain.wait(), Ok(2));
        // Nothing queued and no permit held: all 100 places are free.
        let permits: Vec<_> = (0..100).map(|_| pool.try_reserve()).collect();
        assert!(permits.iter().all(Result::is_ok), "room leaked");
        drop(permits);
        pool.shutdown().unwrap();
    });
}

/// Cancelled and timed-out queued requests give a session's room back
/// under fair service, with other keys' work interleaved.
#[test]
fn dead_queued_requests_give_a_sessions_room_back_among_many_keys() {
    within("dead requests", || {
        let pool = capped(3);
        let (g, held) = hold_pool(&pool);
        let s = pool.session("s");
        let mut others = Vec::new();
        let a = s.spawn_eval::<i64>("return 1");
        others.push(pool.session("o1").spawn_eval::<i64>("return 1"));
        let b = s
            .spawn_eval::<i64>("return 2")
            .timeout(Duration::from_millis(1));
        others.push(pool.session("o2").spawn_eval::<i64>("return 1"));
        let c = s.spawn_eval::<i64>("return 3");
        assert_eq!(s.try_reserve().err(), Some(IsleError::QueueFull));
        c.cancel();
        let mut b = b;
        assert_eq!(
            b.wait_timeout(common::PATIENCE),
            Some(Err(IsleError::Timeout))
        );
        // Two rooms back.
        let d = s.spawn_eval::<i64>("return 4");
        let e = s.spawn_eval::<i64>("return 5");
        assert_eq!(s.try_reserve().err(), Some(IsleError::QueueFull));
        g.release();
        held.wait().unwrap();
        assert_eq!(a.wait(), Ok(1));
        assert_eq!(c.wait(), Err(IsleError::Cancelled));
        assert_eq!(d.wait(), Ok(4));
        assert_eq!(e.wait(), Ok(5));
        for t in others {
            assert_eq!(t.wait(), Ok(1));
        }
        eventually("s's counters settle", || {
            s.metrics().is_some_and(|m| m.requests == 5)
        });
        let m = s.metrics().unwrap();
        assert_eq!((m.completed, m.cancelled), (3, 2), "{m:?}");
        pool.shutdown().unwrap();
        let m = pool.metrics();
        assert_identity(&m);
        // The timed-out and the cancelled request never started.
        let w = &m.workers[0];
        assert_eq!(m.run_time.count(), w.completed + w.failed + w.cancelled - 2);
    });
}

/// With both bounds on, requests for new keys refused because the pool's
/// queue is full (or because the pool has shut down) must not leave a
/// session behind each: a tenant sending a stream of fresh keys at a busy
/// server would otherwise grow the session table without bound (and skew
/// where new sessions are bound), with nothing queued.
#[test]
fn refused_requests_for_fresh_keys_do_not_open_sessions() {
    within("ghost sessions", || {
        let pool = IslePool::builder()
            .workers(1)
            .session_queue_capacity(4)
            .queue_capacity(1)
            .build()
            .unwrap();
        let (g, held) = hold_pool(&pool);
        let queued = pool.session("real").spawn_eval::<i64>("return 1");
        for k in 0..1000 {
            let r = pool
                .session(format!("ghost{k}"))
                .spawn_eval::<i64>("return 1")
                .wait();
            assert_eq!(r, Err(IsleError::QueueFull));
        }
        let open = pool.metrics().sessions_open;
        g.release();
        held.wait().unwrap();
        assert_eq!(queued.wait(), Ok(1));
        pool.shutdown().unwrap();
        for k in 0..100 {
            let r = pool
                .session(format!("late{k}"))
                .spawn_eval::<i64>("return 1")
                .wait();
            assert_eq!(r, Err(IsleError::Shutdown));
        }
        assert_eq!(open, 1, "sessions opened by refused requests");
        assert!(pool.metrics().sessions_open <= 1);
    });
}

/// A permit used after its pool shut down resolves `Shutdown`, and is
/// counted.
#[test]
fn a_permit_used_after_shutdown_resolves_and_is_counted() {
    within("permit after shutdown", || {
        let pool = capped(2);
        let s = pool.session("s");
        let sp = s.try_reserve().unwrap();
        let pp = pool.try_reserve().unwrap();
        pool.shutdown().unwrap();
        assert_eq!(
            sp.spawn_eval::<i64>("return 1").wait(),
            Err(IsleError::Shutdown)
        );
        assert_eq!(pp.eval::<i64>("return 1"), Err(IsleError::Shutdown));
        assert_eq!(s.try_reserve().err(), Some(IsleError::Shutdown));
        assert_identity(&pool.metrics());
    });
}

/// An isle with a queue bound: waiters (blocking and async) are woken by
/// shutdown, and its histograms count exactly the requests that started.
#[test]
fn an_isles_waiters_wake_on_shutdown_and_its_histograms_count_started_requests() {
    within("isle", || {
        let (g, gf) = gate();
        let isle = mlua_isle::Isle::builder()
            .queue_capacity(2)
            .init(move |lua| GateFn::register(gf.clone(), lua, "block"))
            .build()
            .unwrap();
        let held = isle.spawn_eval::<()>("block()");
        g.wait_started();
        let a = isle.spawn_eval::<i64>("return 1");
        let b = isle.spawn_eval::<i64>("return 2");
        b.cancel();
        let c = isle.spawn_eval::<i64>("return 3");
        assert_eq!(isle.try_reserve().err(), Some(IsleError::QueueFull));
        let waiter = {
            let isle = isle.clone();
            std::thread::spawn(move || isle.reserve_timeout(common::PATIENCE * 2).map(drop))
        };
        let async_waiter = {
            let isle = isle.clone();
            std::thread::spawn(move || futures::executor::block_on(isle.reserve()).map(drop))
        };
        eventually("two waiters", || isle.waiting_for_room() == 2);
        let stopper = {
            let isle = isle.clone();
            std::thread::spawn(move || isle.shutdown())
        };
        assert_eq!(waiter.join().unwrap(), Err(IsleError::Shutdown));
        assert_eq!(async_waiter.join().unwrap(), Err(IsleError::Shutdown));
        g.release();
        let _ = stopper.join().unwrap();
        held.wait().unwrap();
        assert_eq!(a.wait(), Ok(1));
        assert_eq!(b.wait(), Err(IsleError::Cancelled));
        assert_eq!(c.wait(), Ok(3));
        let m = isle.metrics();
        let resolved = m.completed + m.failed + m.cancelled;
        // The cancelled request never started.
        assert_eq!(m.run_time.count(), resolved - 1, "{m:?}");
        assert_eq!(m.queue_wait.count(), m.run_time.count());
    });
}

// ---------------------------------------------------------------------
// Metrics and histograms after chaos
// ---------------------------------------------------------------------

/// Refusals, cancels, timeouts, closes and errors from several threads on
/// a capped pool: once quiet, every submission is accounted for, and the
/// histograms count only requests that started.
#[test]
fn counters_and_histograms_add_up_after_tenant_chaos() {
    within("chaos", || {
        let pool = IslePool::builder()
            .workers(2)
            .session_queue_capacity(4)
            .queue_capacity(16)
            .build()
            .unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let mut rng = common::Rng::new(t + 1);
                    let mut tasks = Vec::new();
                    for i in 0..400 {
                        let key = format!("t{}", rng.below(6));
                        let s = pool.session(key.as_str());
                        let task = match rng.below(6) {
                            0 => s.spawn_eval::<i64>("error('tenant')"),
                            1 => {
                                let task = s.spawn_eval::<i64>("return 1");
                                task.cancel();
                                task
                            }
                            2 => s
                                .spawn_eval::<i64>(
                                    "local x = 0 for i = 1, 1000 do x = x + i end return x",
                                )
                                .timeout(Duration::from_micros(rng.below(200))),
                            3 => {
                                if i % 50 == 0 {
                                    s.close();
                                }
                                s.spawn_eval::<i64>("n = (n or 0) + 1 return n")
                            }
                            _ => s.spawn_eval::<i64>("return 2"),
                        };
                        tasks.push(task);
                    }
                    tasks.into_iter().map(|t| t.wait()).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in threads {
            for r in h.join().unwrap() {
                match r {
                    Ok(_)
                    | Err(IsleError::QueueFull)
                    | Err(IsleError::Cancelled)
                    | Err(IsleError::Timeout)
                    | Err(IsleError::Lua(_)) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        pool.shutdown().unwrap();
        let m = pool.metrics();
        assert_identity(&m);
        let resolved: u64 = m
            .workers
            .iter()
            .map(|w| w.completed + w.failed + w.cancelled)
            .sum();
        assert!(
            m.run_time.count() <= resolved,
            "{} > {resolved}",
            m.run_time.count()
        );
        assert_eq!(m.run_time.count(), m.queue_wait.count());
        let per_worker: u64 = m.workers.iter().map(|w| w.run_time.count()).sum();
        assert_eq!(per_worker, m.run_time.count());
        // Each open session's own counts add up.
        for k in 0..6 {
            if let Some(sm) = pool.session_metrics(format!("t{k}")) {
                assert_eq!(sm.requests, sm.completed + sm.failed + sm.cancelled);
            }
        }
    });
}

/// Not a tenant control, found on the way: `wait` on a task whose result
/// `wait_timeout` handed out already panics, as documented, and says why
/// (it used to hit `unreachable!`).
#[test]
fn wait_after_wait_timeout_took_the_result_panics_saying_why() {
    within("wait twice", || {
        let pool = one_vm();
        let mut t = pool.spawn_eval::<i64>("return 1");
        assert_eq!(t.wait_timeout(common::PATIENCE), Some(Ok(1)));
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.wait()));
        let payload = again.expect_err("wait() after the result was taken");
        let msg = payload
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(
            msg.contains("after the task's result was handed out"),
            "the panic says what happened: {msg:?}"
        );
        pool.shutdown().unwrap();
    });
}

// ---------------------------------------------------------------------
// Hot reload
// ---------------------------------------------------------------------

/// Reloads racing recycling, session closes, broadcasts and session
/// traffic: versions are consecutive, every VM ends on the last one, a
/// session never sees its VM's code go back, and everything resolves.
#[test]
fn reloads_racing_recycling_closes_and_broadcasts_end_on_the_last_version() {
    within("reload chaos", || {
        let pool = IslePool::builder()
            .workers(2)
            .recycle_after(7)
            .init(|lua| lua.globals().set("V", 0))
            .build()
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic: Vec<_> = (0..3)
            .map(|t| {
                let pool = pool.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    let mut seen = std::collections::HashMap::<String, i64>::new();
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let key = format!("s{t}-{}", i % 5);
                        match i % 13 {
                            0 => {
                                pool.close_session(key.as_str());
                                seen.remove(&key);
                            }
                            7 => {
                                for r in pool.broadcast(|lua| lua.globals().get::<i64>("V")) {
                                    r.unwrap();
                                }
                            }
                            _ => match pool.session(key.as_str()).eval::<i64>("return V") {
                                Ok(v) => {
                                    let last = seen.insert(key.clone(), v).unwrap_or(0);
                                    assert!(v >= last, "{key}: version {v} after {last}");
                                }
                                Err(IsleError::SessionLost) => {
                                    seen.remove(&key);
                                }
                                Err(e) => panic!("{e:?}"),
                            },
                        }
                    }
                })
            })
            .collect();
        for v in 1..=15i64 {
            let got = pool.reload(move |lua| lua.globals().set("V", v)).unwrap();
            assert_eq!(got, v as u64);
        }
        stop.store(true, Ordering::Relaxed);
        for h in traffic {
            h.join().unwrap();
        }
        let vs: Vec<i64> = pool
            .broadcast(|lua| lua.globals().get::<i64>("V"))
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(vs, vec![15, 15]);
        let m = pool.metrics();
        assert_eq!(m.version, 15);
        assert!(m.workers.iter().all(|w| w.version == 15));
        pool.shutdown().unwrap();
    });
}

/// Spawned reloads dropped unfinished (rolled back) alternating with
/// awaited ones, under session traffic and recycling: once done, every VM
/// (recycled ones too) runs exactly the committed code, and each VM's
/// version is the pool's.
#[test]
fn dropped_spawned_reloads_under_traffic_leave_every_vm_on_the_committed_code() {
    within("dropped reloads", || {
        let pool = IslePool::builder()
            .workers(2)
            .recycle_after(5)
            .init(|lua| lua.globals().set("V", 0))
            .build()
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = {
            let pool = pool.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match pool.session(format!("s{}", i % 7)).eval::<i64>("return V") {
                        Ok(_) | Err(IsleError::SessionLost) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        };
        let mut last = 0;
        for i in 0..30i64 {
            let t = pool.spawn_reload(move |lua| lua.globals().set("V", 100 + i));
            if i % 2 == 0 {
                drop(t);
            } else {
                let v = t.wait().unwrap();
                assert!(v > last, "version {v} after {last}");
                last = v;
            }
        }
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap();
        // A dropped reload's thread may still run its `f` (and then roll it
        // back) after later reloads committed: see the test below. Once
        // those threads are done, every VM runs the last committed code.
        let vs = || -> Vec<i64> {
            pool.broadcast(|lua| lua.globals().get::<i64>("V"))
                .into_iter()
                .map(Result::unwrap)
                .collect()
        };
        eventually("every VM on the committed code", || {
            let m = pool.metrics();
            m.version == last && m.workers.iter().all(|w| w.version == last) && vs() == [129, 129]
        });
        for k in 0..7 {
            match pool.session(format!("s{k}")).eval::<i64>("return V") {
                Ok(v) => assert_eq!(v, 129),
                Err(IsleError::SessionLost) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        pool.shutdown().unwrap();
    });
}

/// A spawned reload dropped (cancelled) while another reload holds the
/// pool's reloads: its `f` should never run. It does: its thread takes the
/// serial lock whenever it gets it (perhaps after later reloads have
/// committed), runs `f` on every VM, and only then finds it was cancelled
/// and rolls back. Meanwhile the VMs serve the cancelled code, newer than
/// what the caller last committed.
#[test]
fn a_spawned_reload_dropped_before_it_began_never_runs() {
    within("dropped before it began", || {
        let (g0, gf0) = gate();
        let (a_tx, a_rx) = crossbeam_channel::unbounded();
        let pool = IslePool::builder()
            .workers(1)
            .init(|lua| lua.globals().set("V", 0))
            .build()
            .unwrap();
        // The reloads are busy with this one until released.
        let first = pool.spawn_reload(move |lua| {
            gf0.block();
            lua.globals().set("V", 10)
        });
        g0.wait_started();
        let dropped = pool.spawn_reload(move |lua| {
            let _ = a_tx.send(());
            lua.globals().set("V", 666)
        });
        drop(dropped);
        g0.release();
        assert_eq!(first.wait(), Ok(1));
        assert_eq!(pool.reload(|lua| lua.globals().set("V", 20)), Ok(2));
        // It runs, if it does, once the reloads are free: a negative check,
        // so it waits (far longer than it takes to show up).
        assert!(
            a_rx.recv_timeout(Duration::from_secs(2)).is_err(),
            "a reload dropped before it began ran its f"
        );
        assert_eq!(pool.eval::<i64>("return V"), Ok(20));
        pool.shutdown().unwrap();
    });
}

/// Reloads (blocking and spawned) racing a shutdown: each returns its
/// version or `Shutdown`, nothing hangs, and versions stay consecutive.
#[test]
fn reloads_racing_shutdown_resolve_and_stay_consecutive() {
    within("reload vs shutdown", || {
        let pool = IslePool::builder().workers(2).build().unwrap();
        let reloader = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                for i in 0..200 {
                    let r = if i % 2 == 0 {
                        pool.reload(|_| Ok(()))
                    } else {
                        pool.spawn_reload(|_| Ok(())).wait()
                    };
                    match r {
                        Ok(v) => {
                            assert_eq!(v, last + 1);
                            last = v;
                        }
                        Err(IsleError::Shutdown) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                last
            })
        };
        eventually("some reloads ran", || pool.metrics().version >= 3);
        pool.shutdown().unwrap();
        let last = reloader.join().unwrap();
        assert_eq!(pool.metrics().version, last);
    });
}

/// A reload from a thread holding a permit (the pool's room full) goes
/// through (reloads do not take room); from inside a request it is
/// refused with `Reentrant`.
#[test]
fn a_reload_from_a_permit_holder_and_from_inside_a_request() {
    within("reload and permits", || {
        let pool = IslePool::builder()
            .workers(1)
            .queue_capacity(1)
            .build()
            .unwrap();
        let permit = pool.try_reserve().unwrap();
        assert_eq!(pool.try_reserve().err(), Some(IsleError::QueueFull));
        assert_eq!(pool.reload(|lua| lua.globals().set("R", 1)), Ok(1));
        assert_eq!(permit.eval::<i64>("return R"), Ok(1));
        let inner = pool.clone();
        let r = pool.exec(move |_| Ok(inner.reload(|_| Ok(()))));
        assert_eq!(r, Ok(Err(IsleError::Reentrant)));
        pool.shutdown().unwrap();
    });
}

/// Isolation across a reload, as a tenant in the sandbox: another
/// session's globals stay out of reach (through the reloaded code too), a
/// table the reload installs is read-only, and a failed reload leaves no
/// trace a tenant can read.
#[test]
fn a_tenant_cannot_reach_another_sessions_state_through_a_reload() {
    within("isolation across reload", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .init(|lua| lua.load("function peek(name) return _G[name] end").exec())
            .build()
            .unwrap();
        let (a, b) = (pool.session("a"), pool.session("b"));
        a.eval::<()>("secret = 'a-secret'").unwrap();
        pool.reload(|lua| {
            lua.load(
                "config = { limit = 10 }
                 function dump()
                   local out = {}
                   for k, v in pairs(_G) do out[#out + 1] = tostring(k) end
                   return table.concat(out, ',')
                 end
                 function peek2(name) return rawget(_G, name) end",
            )
            .exec()
        })
        .unwrap();
        assert_eq!(b.eval::<Option<String>>("return secret"), Ok(None));
        assert_eq!(b.eval::<Option<String>>("return peek('secret')"), Ok(None));
        assert_eq!(b.eval::<Option<String>>("return peek2('secret')"), Ok(None));
        let dump = b.eval::<String>("return dump()").unwrap();
        assert!(!dump.contains("secret"), "{dump}");
        assert_eq!(a.eval::<String>("return secret"), Ok("a-secret".into()));
        // The reloaded table is read-only to tenants.
        assert!(b.eval::<()>("config.limit = 1e9").is_err());
        assert_eq!(a.eval::<i64>("return config.limit"), Ok(10));
        // A failed reload whose `f` saw a session value leaves nothing.
        let err = pool.reload(|lua| {
            lua.globals().set("leak", "f ran")?;
            Err(mlua::Error::runtime("no"))
        });
        assert!(err.is_err());
        assert_eq!(b.eval::<Option<String>>("return leak"), Ok(None));
        // A tenant shadowing a reloaded name keeps its own value; others
        // see the reload's.
        a.eval::<()>("config = 'mine'").unwrap();
        assert_eq!(a.eval::<String>("return config"), Ok("mine".into()));
        assert_eq!(b.eval::<i64>("return config.limit"), Ok(10));
        // Another tenant's metrics are not reachable from Lua at all; a
        // tenant's own writes to globals named like pool internals do not
        // change what the pool reports.
        b.eval::<()>("requests = 0; version = 99").unwrap();
        assert_eq!(pool.metrics().version, 1);
        pool.shutdown().unwrap();
    });
}

/// A reload whose `f` writes into an existing table, then fails: as
/// documented, only the global table rolls back (the write stays), and the
/// VM and its version are as before.
#[test]
fn a_failed_reload_that_wrote_into_a_table_leaves_that_write_as_documented() {
    within("reload limits", || {
        let pool = IslePool::builder()
            .workers(2)
            .init(|lua| lua.load("shared_t = { x = 1 }; top = 1").exec())
            .build()
            .unwrap();
        let err = pool.reload(|lua| {
            lua.load("shared_t.x = 2; top = 2; added = true").exec()?;
            Err(mlua::Error::runtime("fails after writing"))
        });
        assert!(err.is_err());
        let got: Vec<(i64, i64, bool)> = pool
            .broadcast(|lua| {
                lua.load("return shared_t.x, top, added ~= nil")
                    .eval::<(i64, i64, bool)>()
            })
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![(2, 1, false); 2]);
        assert_eq!(pool.metrics().version, 0);
        pool.shutdown().unwrap();
    });
}

// ---------------------------------------------------------------------
// Async: suspended session requests under fair service
// ---------------------------------------------------------------------

#[cfg(feature = "async")]
mod suspended {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::channel::oneshot;

    use super::*;

    /// Pending once (waking itself), then ready.
    struct YieldNow(bool);

    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// Keys mixing requests that suspend with plain ones: each key's
    /// requests still run in the order submitted.
    #[test]
    fn a_keys_order_holds_with_suspended_requests_under_fair_service() {
        within("order with suspensions", || {
            let pool = one_vm();
            let log = Log::default();
            let (g, held) = hold_pool(&pool);
            let mut tasks = Vec::new();
            for i in 0..60 {
                for key in ["a", "b", "c"] {
                    let s = pool.session(key);
                    if (i + key.len()) % 3 == 0 {
                        let log = log.clone();
                        tasks.push(s.spawn_exec_async(move |_, _| async move {
                            YieldNow(false).await;
                            log.lock().push((key, i));
                            Ok(())
                        }));
                    } else {
                        tasks.push(logged(&s, &log, key, i));
                    }
                }
            }
            g.release();
            held.wait().unwrap();
            for t in tasks {
                t.wait().unwrap();
            }
            let log = log.lock();
            assert_eq!(log.len(), 180);
            in_order_per_key(&log);
            pool.shutdown().unwrap();
            assert_identity(&pool.metrics());
        });
    }

    /// A tenant parks one request on a future, and queues a backlog behind
    /// it (the fair queue hands that backlog to the session's own waiting
    /// line, one per turn). When the future wakes, the VM runs the whole
    /// backlog before a quiet tenant that arrived meanwhile: the quiet one
    /// waits for every queued request of the noisy one, not for one.
    #[test]
    fn a_backlog_behind_a_suspended_request_does_not_run_ahead_of_a_quiet_key() {
        within("backlog behind a suspension", || {
            let pool = one_vm();
            let log = Log::default();
            let noisy = pool.session("noisy");
            let (tx, rx) = oneshot::channel::<()>();
            let parked = noisy.spawn_exec_async(move |_, _| async move {
                let _ = rx.await;
                Ok(())
            });
            eventually("parked", || pool.metrics().workers[0].suspended == 1);
            let (g, block) = gate();
            let first = {
                let log = log.clone();
                noisy.spawn_exec(move |_, _| {
                    block.block();
                    log.lock().push(("noisy", 0));
                    Ok(())
                })
            };
            let backlog: Vec<_> = (1..200).map(|i| logged(&noisy, &log, "noisy", i)).collect();
            // All held in the VM's queue behind the suspended request.
            eventually("held behind it", || pool.metrics().workers[0].queued == 200);
            tx.send(()).unwrap();
            g.wait_started();
            let quiet = logged(&pool.session("quiet"), &log, "quiet", 0);
            g.release();
            parked.wait().unwrap();
            first.wait().unwrap();
            quiet.wait().unwrap();
            for t in backlog {
                t.wait().unwrap();
            }
            let log = log.lock();
            let before = ran_before(&log, "noisy", "quiet");
            assert!(
                before <= 2,
                "the quiet key waited for {before} requests of the noisy one"
            );
            pool.shutdown().unwrap();
        });
    }

    /// `shutdown_timeout` stops a suspended session request with plain
    /// requests of the same session waiting behind it: they resolve
    /// `Shutdown`, and the pool's counters still add up. (They used to be
    /// abandoned uncounted, in `Worker::resolved`.)
    #[test]
    fn requests_waiting_behind_a_stopped_suspension_are_counted() {
        within("counts after abort", || {
            let pool = one_vm();
            let s = pool.session("s");
            let (tx, rx) = oneshot::channel::<()>();
            let parked = s.spawn_exec_async(move |_, _| async move {
                let _ = rx.await;
                Ok(())
            });
            eventually("parked", || pool.metrics().workers[0].suspended == 1);
            let behind: Vec<_> = (0..3).map(|_| s.spawn_eval::<i64>("return 1")).collect();
            eventually("held behind it", || pool.metrics().workers[0].queued == 3);
            let _ = pool.shutdown_timeout(Duration::from_millis(10));
            assert!(parked.wait().is_err());
            for t in behind {
                assert_eq!(t.wait(), Err(IsleError::Shutdown));
            }
            drop(tx);
            let m = pool.metrics();
            assert_identity(&m);
            let sm = s.metrics().unwrap();
            assert_eq!(sm.requests, 4, "{sm:?}");
        });
    }

    /// Run time after a suspension is VM time too: a tenant whose requests
    /// yield once and then compute must be charged for that computing (the
    /// fair queue's cost, and the session's `run_time`), or it can take
    /// the VM for as long as it likes per turn at the cost of one poll.
    #[test]
    fn run_time_after_a_suspension_is_charged_to_the_session() {
        within("charged after resume", || {
            let zero = std::time::Instant::now();
            let pool = IslePool::builder()
                .workers(1)
                .init(move |lua| {
                    let y = lua.create_async_function(|_, ()| async {
                        YieldNow(false).await;
                        Ok(())
                    })?;
                    lua.globals().set("yield_now", y)?;
                    let clock =
                        lua.create_function(move |_, ()| Ok(zero.elapsed().as_nanos() as i64))?;
                    lua.globals().set("clock_ns", clock)
                })
                .build()
                .unwrap();
            let s = pool.session("sneaky");
            let computed = s
                .eval::<i64>(
                    "yield_now()
                     local t0 = clock_ns()
                     local x = 0 for i = 1, 3000000 do x = x + i end
                     return clock_ns() - t0",
                )
                .unwrap();
            let computed = Duration::from_nanos(computed as u64);
            eventually("counted", || s.metrics().is_some_and(|m| m.requests == 1));
            let m = s.metrics().unwrap();
            assert!(
                m.run_time >= computed,
                "the session computed for {computed:?} after resuming, and was charged {:?}",
                m.run_time
            );
            pool.shutdown().unwrap();
        });
    }

    /// A worker wedged (in another session's Rust callback) while a
    /// session's request is suspended on it, with a request of that
    /// session waiting behind: once the replacement has taken over, both
    /// still resolve, without waiting for the stuck thread to come back.
    /// (The suspended one does, `Shutdown`, from `hand_over_if_running`.)
    #[test]
    fn suspended_requests_on_a_wedged_worker_resolve_after_its_replacement() {
        within("suspended on a wedged worker", || {
            let (g, gf) = gate();
            let pool = IslePool::builder()
                .workers(1)
                .stop_grace(Duration::from_millis(20))
                .init(move |lua| GateFn::register(gf.clone(), lua, "block"))
                .build()
                .unwrap();
            let s = pool.session("parked");
            let (tx, rx) = oneshot::channel::<()>();
            let mut parked = s.spawn_exec_async(move |_, _| async move {
                let _ = rx.await;
                Ok(1i64)
            });
            eventually("parked", || pool.metrics().workers[0].suspended == 1);
            let mut behind = s.spawn_eval::<i64>("return 2");
            eventually("held behind it", || pool.metrics().workers[0].queued == 1);
            let stuck = pool
                .session("stuck")
                .spawn_eval::<()>("block()")
                .timeout(Duration::from_millis(50));
            g.wait_started();
            assert_eq!(stuck.wait(), Err(IsleError::Timeout));
            eventually("replaced", || pool.metrics().workers[0].wedged == 1);
            let _ = tx.send(());
            // A hang check, not a timing one: far longer than either needs.
            let p = parked.wait_timeout(Duration::from_secs(3));
            let b = behind.wait_timeout(Duration::from_secs(2));
            g.release();
            if p.is_none() {
                let _ = parked.wait();
            }
            if b.is_none() {
                let _ = behind.wait();
            }
            assert!(p.is_some(), "the suspended request never resolved");
            assert!(b.is_some(), "the request behind it never resolved");
            pool.shutdown().unwrap();
        });
    }

    /// A pool whose VMs number themselves (`VM_SERIAL`: 1 for the first
    /// VM, 2 for the next started...), with `stuck_later()` (an async
    /// function whose second poll blocks in Rust on `late`) and `block2()`
    /// (blocks on `hold2`).
    fn stuck_on_resume(late: GateFn, hold2: GateFn) -> IslePool {
        let serial = Arc::new(AtomicUsize::new(0));
        IslePool::builder()
            .workers(1)
            .stop_grace(Duration::from_millis(20))
            .init(move |lua| {
                let n = serial.fetch_add(1, Ordering::SeqCst) + 1;
                lua.globals().set("VM_SERIAL", n)?;
                lua.globals().set("V", 0)?;
                let late = late.clone();
                let f = lua.create_async_function(move |_, ()| {
                    let late = late.clone();
                    async move {
                        YieldNow(false).await;
                        late.block();
                        Ok(())
                    }
                })?;
                lua.globals().set("stuck_later", f)?;
                GateFn::register(hold2.clone(), lua, "block2")
            })
            .build()
            .unwrap()
    }

    /// Wedges the pool's only VM in a resumed poll of a session request,
    /// waits for its replacement, and holds the replacement in an unkeyed
    /// request (returned, with its gate).
    fn wedge_on_resume(pool: &IslePool, late: &common::Gate, hold2: &common::Gate) -> Task<()> {
        let r = pool
            .session("r")
            .spawn_eval::<()>("stuck_later()")
            .timeout(Duration::from_millis(50));
        late.wait_started();
        assert_eq!(r.wait(), Err(IsleError::Timeout));
        eventually("replaced", || pool.metrics().workers[0].wedged == 1);
        let held = pool.spawn_eval::<()>("block2()");
        hold2.wait_started();
        held
    }

    /// A worker wedged inside a *resumed* poll (not a first run) is
    /// replaced; when the stuck thread gets back, it must leave the slot
    /// to its replacement. (It used to go on to take the slot's session
    /// work, with no `is_current` check after `resume_woken`: the request
    /// ran on the stale VM, and the fair queue stayed marked as serving it
    /// for a generation that never reports, so the key's later requests
    /// hung.)
    #[test]
    fn a_thread_wedged_in_a_resumed_poll_leaves_the_slots_session_work_alone() {
        within("wedged in a resumed poll", || {
            let (late, late_fn) = gate();
            let (hold2, hold2_fn) = gate();
            let pool = stuck_on_resume(late_fn, hold2_fn);
            let held = wedge_on_resume(&pool, &late, &hold2);
            // The replacement (VM 2) is busy; queue a session's work.
            let victim = pool.session("victim");
            let mut v1 = victim.spawn_eval::<i64>("return VM_SERIAL");
            let mut v2 = victim.spawn_eval::<i64>("return VM_SERIAL");
            // The stuck thread gets back.
            late.release();
            // A hang check, not a timing one: far longer than either needs.
            let early = v1.wait_timeout(Duration::from_secs(1));
            hold2.release();
            held.wait().unwrap();
            let first = early.or_else(|| v1.wait_timeout(Duration::from_secs(3)));
            let second = v2.wait_timeout(Duration::from_secs(3));
            assert_eq!(
                first,
                Some(Ok(2)),
                "the first ran on the stale VM (1) or hung"
            );
            assert_eq!(
                second,
                Some(Ok(2)),
                "the second ran on the stale VM or hung"
            );
            pool.shutdown().unwrap();
        });
    }

    /// As above, with a reload queued: the stuck thread, back from the
    /// resumed poll, must not run the slot's reload on its stale VM (it
    /// used to: the reload committed, and the VM serving the slot never
    /// ran it).
    #[test]
    fn a_thread_wedged_in_a_resumed_poll_does_not_take_the_slots_reload() {
        within("reload vs wedged in a resumed poll", || {
            let (late, late_fn) = gate();
            let (hold2, hold2_fn) = gate();
            let pool = stuck_on_resume(late_fn, hold2_fn);
            let held = wedge_on_resume(&pool, &late, &hold2);
            let reload = pool.spawn_reload(|lua| lua.globals().set("V", 1));
            late.release();
            // Let the replacement go, then see where the reload ran.
            hold2.release();
            held.wait().unwrap();
            assert_eq!(reload.wait(), Ok(1));
            let got: Vec<(i64, i64)> = pool
                .broadcast(|lua| lua.load("return VM_SERIAL, V").eval::<(i64, i64)>())
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, vec![(2, 1)], "(serving VM, its V)");
            assert_eq!(pool.metrics().workers[0].version, 1);
            pool.shutdown().unwrap();
        });
    }
}
