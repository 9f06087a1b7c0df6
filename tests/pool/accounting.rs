//! The pool's session machinery attacked through the host-facing API:
//! every request resolves exactly once, nothing hangs, and the counts
//! (`sessions`, the ledger) stay true through closes, reservations, idle
//! expiry, recycling, wedged VMs and replacements that fail to start.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{gate, hold_pool, within};
use mlua_isle::{IsleError, IslePool, PoolMetrics};
use parking_lot::Mutex;

fn ledger_balanced(m: &PoolMetrics) -> bool {
    let resolved: u64 = m
        .workers
        .iter()
        .map(|w| w.completed + w.failed + w.cancelled)
        .sum();
    m.submitted == m.rejected + m.discarded + resolved
}

// ---------------------------------------------------------------------
// Session counters (`WorkerMetrics::sessions`, `least_loaded`)
// ---------------------------------------------------------------------

/// A session whose VM was recycled is marked lost and uncounted from its
/// worker's `sessions`. If the worker is then replaced as wedged before
/// that session's next request, `mark_lost` finds it again (it is still in
/// the session table) and uncounts it a second time: the counter wraps.
#[test]
fn a_lost_session_is_not_uncounted_twice_when_its_vm_wedges() {
    let (g, block) = gate();
    let m = within("recycle, then wedge", move || {
        let pool = IslePool::builder()
            .workers(1)
            .recycle_after(2)
            .stop_grace(Duration::from_millis(50))
            .build()
            .unwrap();
        pool.session("a").eval::<()>("x = 1").unwrap(); // served 1: env made
        pool.eval::<()>("return").unwrap(); // served 2: recycled, "a" lost
        assert!(common::poll_until(
            || pool.metrics().workers[0].recycled == 1
        ));
        assert_eq!(pool.metrics().workers[0].sessions, 0);
        let stuck = pool
            .spawn_exec(move |_| {
                block.block();
                Ok(())
            })
            .timeout(Duration::from_millis(20));
        assert!(matches!(stuck.wait(), Err(IsleError::Timeout)));
        assert!(common::poll_until(|| pool.metrics().workers[0].wedged == 1));
        let m = pool.metrics();
        // The session's next request: told once.
        assert!(matches!(
            pool.session("a").eval::<()>("return"),
            Err(IsleError::SessionLost)
        ));
        m
    });
    g.release();
    let _ = g; // the stuck thread exits
    assert_eq!(
        m.workers[0].sessions, 0,
        "per-worker session count after recycle + wedge: {}",
        m.workers[0].sessions
    );
}

/// `session_queue_capacity` makes a reservation bind the key
/// (`key_room`). A session closed before any request ran has no
/// environment on its VM, so the VM's close does not uncount it: the
/// worker's `sessions` stays up for good (and `least_loaded` avoids it).
#[test]
fn closing_a_session_opened_by_a_reservation_uncounts_it() {
    let sessions = within("reserve, drop, close", || {
        let pool = IslePool::builder()
            .workers(1)
            .session_queue_capacity(4)
            .build()
            .unwrap();
        for i in 0..10 {
            let s = pool.session(format!("r{i}"));
            drop(s.try_reserve().unwrap());
            assert!(s.close());
        }
        // Runs after the closes queued on the VM (broadcast's contract).
        assert!(pool.broadcast(|_| Ok(())).into_iter().all(|r| r.is_ok()));
        let m = pool.metrics();
        assert_eq!(m.sessions_open, 0);
        m.workers[0].sessions
    });
    assert_eq!(
        sessions, 0,
        "worker 0 still counts {sessions} closed sessions"
    );
}

/// The same reservation-opened session never expires with
/// `session_idle_timeout`: the worker sweeps only sessions with an
/// environment on it (or lost ones), so the binding stays in the table.
#[test]
fn a_session_opened_only_by_a_reservation_expires_when_idle() {
    let (open, expired) = within("reserve, then idle", || {
        let pool = IslePool::builder()
            .workers(1)
            .session_queue_capacity(4)
            .session_idle_timeout(Duration::from_millis(20))
            .build()
            .unwrap();
        drop(pool.session("reserved").try_reserve().unwrap());
        // A control session, opened by a request: it expires.
        pool.session("used").eval::<()>("return").unwrap();
        let control = common::poll_until(|| pool.metrics().sessions_expired >= 1);
        assert!(control, "the control session never expired");
        common::poll_until(|| pool.metrics().sessions_open == 0);
        let m = pool.metrics();
        (m.sessions_open, m.sessions_expired)
    });
    assert_eq!(
        open, 0,
        "a reserved-then-dropped session stays open forever (expired: {expired})"
    );
}

/// A reservation refused because the *pool's* queue is full still opens
/// (binds) the session: `first_room` binds the key before the pool's room
/// is tried. (`Session::enqueue` takes care to do it the other way round:
/// "so that a request refused by a full pool ... does not open its
/// session".)
#[test]
fn a_reservation_refused_by_a_full_pool_opens_no_session() {
    let (open, counted) = within("refused reservation", || {
        let pool = IslePool::builder()
            .workers(1)
            .queue_capacity(1)
            .session_queue_capacity(4)
            .build()
            .unwrap();
        let (g, held) = hold_pool(&pool);
        let queued = pool.spawn_eval::<()>("return");
        let mut refused = 0;
        for i in 0..50 {
            match pool.session(format!("k{i}")).try_reserve() {
                Err(IsleError::QueueFull) => refused += 1,
                other => panic!("expected QueueFull, got {other:?}"),
            }
        }
        assert_eq!(refused, 50);
        let m = pool.metrics();
        g.release();
        held.wait().unwrap();
        queued.wait().unwrap();
        (m.sessions_open, m.workers[0].sessions)
    });
    assert_eq!(
        (open, counted),
        (0, 0),
        "50 refused reservations left {open} sessions open"
    );
}

// ---------------------------------------------------------------------
// Dropping the pool from inside its own VMs
// ---------------------------------------------------------------------

/// The last handle is dropped inside an `exec` closure running on one of
/// the pool's VMs, with work queued: every task resolves, nothing hangs.
#[test]
fn dropping_the_last_handle_inside_its_own_exec_resolves_everything() {
    within("drop the pool on its own VM", || {
        let pool = IslePool::builder()
            .workers(2)
            .name("rt4drop")
            .build()
            .unwrap();
        let slot = Arc::new(Mutex::new(Some(pool.clone())));
        let inner = slot.clone();
        let (g, block) = gate();
        let t = pool.spawn_exec(move |_| {
            block.block();
            drop(inner.lock().take());
            Ok(7)
        });
        g.wait_started();
        let queued: Vec<_> = (0..20)
            .map(|i| pool.spawn_eval::<i64>(format!("return {i}")))
            .collect();
        let s = pool.session("k");
        let sq: Vec<_> = (0..5).map(|_| s.spawn_eval::<()>("x = 1")).collect();
        drop(s);
        drop(pool);
        g.release();
        let _ = t.wait();
        for q in queued {
            let _ = q.wait();
        }
        for q in sq {
            let _ = q.wait();
        }
    });
    assert!(common::thread_gone("rt4drop-0") && common::thread_gone("rt4drop-1"));
}

/// The same from a Rust callback that Lua code calls.
#[test]
fn dropping_the_last_handle_inside_a_lua_callback_resolves_everything() {
    within("drop the pool from a callback", || {
        let slot: Arc<Mutex<Option<IslePool>>> = Arc::default();
        let inner = slot.clone();
        let pool = IslePool::builder()
            .workers(1)
            .name("rt4cb")
            .init(move |lua| {
                let inner = inner.clone();
                let f = lua.create_function(move |_, ()| {
                    drop(inner.lock().take());
                    Ok(())
                })?;
                lua.globals().set("drop_pool", f)
            })
            .build()
            .unwrap();
        *slot.lock() = Some(pool.clone());
        let t = pool.spawn_eval::<i64>("drop_pool(); for _ = 1, 1e5 do end; return 1");
        let queued: Vec<_> = (0..10)
            .map(|_| pool.spawn_eval::<i64>("return 2"))
            .collect();
        drop(pool);
        let _ = t.wait();
        for q in queued {
            let _ = q.wait();
        }
    });
    assert!(common::thread_gone("rt4cb-0"));
}

// ---------------------------------------------------------------------
// Sessions: close / expiry racing work; cancellation racing completion
// ---------------------------------------------------------------------

/// Many keys, requests from several threads, closes and a tiny idle
/// timeout racing them, random cancels: every task resolves once, each
/// key sees its own requests in order, and the ledger balances.
#[test]
fn close_expiry_and_cancel_racing_session_work_resolve_everything_once() {
    within("session churn", || {
        let pool = IslePool::builder()
            .workers(2)
            .session_idle_timeout(Duration::from_millis(1))
            .session_queue_capacity(64)
            .queue_capacity(512)
            .build()
            .unwrap();
        let resolved = Arc::new(AtomicUsize::new(0));
        let submitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let pool = pool.clone();
                let (resolved, submitted) = (resolved.clone(), submitted.clone());
                std::thread::spawn(move || {
                    let mut rng = common::Rng::new(t + 11);
                    for round in 0..150 {
                        let key = rng.below(8);
                        let s = pool.session(key);
                        let tasks: Vec<_> = (0..rng.below(6))
                            .map(|_| s.spawn_eval::<i64>("n = (n or 0) + 1; return n"))
                            .collect();
                        submitted.fetch_add(tasks.len(), Ordering::Relaxed);
                        if rng.below(3) == 0 {
                            pool.close_session(rng.below(8));
                        }
                        for (i, mut task) in tasks.into_iter().enumerate() {
                            if rng.below(4) == 0 {
                                task.cancel();
                            }
                            if i % 2 == 1 && rng.below(2) == 0 {
                                drop(task); // dropped unfinished: cancelled
                                resolved.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let r = task
                                .wait_timeout(Duration::from_secs(5))
                                .unwrap_or_else(|| panic!("round {round}: a task hung"));
                            resolved.fetch_add(1, Ordering::Relaxed);
                            match r {
                                Ok(n) => {
                                    // Any count: other threads close these
                                    // keys and open them afresh between
                                    // this thread's requests. What is
                                    // checked is that each resolves once.
                                    assert!(n >= 1, "n {n}");
                                }
                                Err(IsleError::Cancelled)
                                | Err(IsleError::QueueFull)
                                | Err(IsleError::SessionLost) => {}
                                Err(e) => panic!("unexpected: {e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            resolved.load(Ordering::Relaxed),
            submitted.load(Ordering::Relaxed)
        );
        let mut m = pool.metrics();
        let ok = common::poll_until(|| {
            m = pool.metrics();
            ledger_balanced(&m) && m.workers.iter().all(|w| w.queued == 0 && w.running == 0)
        });
        assert!(ok, "ledger never balanced: {m:#?}");
        // Sessions count never wraps.
        assert!(m.workers.iter().all(|w| w.sessions < 1000), "{m:#?}");
        pool.shutdown().unwrap();
    });
}

/// `recycle_after(1)` on one VM with session requests, unkeyed requests
/// and cancels interleaved: every task resolves, a session whose VM was
/// recycled is told `SessionLost`, and the ledger balances.
#[test]
fn recycling_every_request_under_mixed_session_work_resolves_everything() {
    within("recycle churn", || {
        let pool = IslePool::builder()
            .workers(2)
            .recycle_after(1)
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let s = pool.session(i % 5);
            let t = s.spawn_eval::<i64>("n = (n or 0) + 1; return n");
            if i % 7 == 0 {
                t.cancel();
            }
            tasks.push(t);
            let u = pool.spawn_eval::<i64>("return 1");
            if i % 5 == 0 {
                u.cancel();
            }
            tasks.push(u);
        }
        for t in tasks {
            match t.wait() {
                Ok(n) => assert_eq!(n, 1, "a recycled VM kept session state"),
                Err(IsleError::Cancelled) | Err(IsleError::SessionLost) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        let mut m = pool.metrics();
        let ok = common::poll_until(|| {
            m = pool.metrics();
            ledger_balanced(&m) && m.workers.iter().all(|w| w.queued == 0 && w.running == 0)
        });
        assert!(ok, "{m:#?}");
        assert!(m.workers.iter().all(|w| w.sessions < 1000), "{m:#?}");
    });
}

/// `init` panics on every VM start after the first: recycling fails each
/// time, is counted, and the old VM keeps serving.
#[test]
fn init_panicking_during_recycle_keeps_the_old_vm_serving() {
    within("init panics on recycle", || {
        let starts = Arc::new(AtomicUsize::new(0));
        let s2 = starts.clone();
        let pool = IslePool::builder()
            .workers(1)
            .recycle_after(1)
            .init(move |_| {
                if s2.fetch_add(1, Ordering::SeqCst) >= 1 {
                    panic!("init refuses to start again");
                }
                Ok(())
            })
            .build()
            .unwrap();
        let s = pool.session("a");
        for i in 1..=5i64 {
            assert_eq!(s.eval::<i64>("n = (n or 0) + 1; return n").unwrap(), i);
        }
        assert!(pool.metrics().workers[0].recycle_failures >= 4);
    });
}

// ---------------------------------------------------------------------
// broadcast / map / reload with a wedged worker
// ---------------------------------------------------------------------

/// A broadcast queued while worker 0 is stuck in a stopped request: the
/// replacement runs it; it does not wait for the stuck thread.
#[test]
fn a_broadcast_queued_behind_a_wedged_worker_is_run_by_its_replacement() {
    let (g, block) = gate();
    let r = within("broadcast behind a wedge", move || {
        let pool = IslePool::builder()
            .workers(2)
            .stop_grace(Duration::from_millis(50))
            .build()
            .unwrap();
        let (held_gate, held) = {
            let (hg, hb) = gate();
            let t = pool.spawn_exec(move |_| {
                hb.block();
                Ok(())
            });
            hg.wait_started();
            (hg, t)
        };
        let stuck = pool
            .spawn_exec(move |_| {
                block.block();
                Ok(())
            })
            .timeout(Duration::from_millis(20));
        held_gate.release();
        held.wait().unwrap();
        let b = pool.broadcast(|lua| lua.load("return 1").eval::<i64>());
        let _ = stuck.wait();
        let v = pool.reload(|lua| lua.load("reloaded = true").exec());
        let m = pool.map::<i64, i64>("tostring", 0..10);
        (b, v, m.iter().all(|r| r.is_ok()))
    });
    g.release();
    assert!(r.0.iter().all(|x| matches!(x, Ok(1))), "{:?}", r.0);
    assert_eq!(r.1.unwrap(), 1);
    assert!(r.2);
}

/// A reload that fails on one VM while sessions keep running on both:
/// every session request resolves, sessions keep their state, and the
/// version stays.
#[test]
fn a_failing_reload_racing_session_work_leaves_everything_consistent() {
    within("failing reload under load", || {
        let pool = IslePool::builder().workers(2).build().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..2u64)
            .map(|k| {
                let (pool, stop) = (pool.clone(), stop.clone());
                std::thread::spawn(move || {
                    let s = pool.session(k);
                    let mut last = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let n: i64 = s.eval("n = (n or 0) + 1; return n").unwrap();
                        assert_eq!(n, last + 1);
                        last = n;
                    }
                    last
                })
            })
            .collect();
        let hits = Arc::new(AtomicUsize::new(0));
        for _ in 0..20 {
            let hits = hits.clone();
            let r = pool.reload(move |lua| {
                if hits.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                    return Err(mlua_isle::mlua::Error::runtime("refused"));
                }
                lua.load("reloaded = (reloaded or 0) + 1").exec()
            });
            assert!(r.is_err());
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(pool.metrics().version, 0);
        let seen = pool.broadcast(|lua| lua.globals().get::<Option<i64>>("reloaded"));
        assert!(seen.iter().all(|r| matches!(r, Ok(None))), "{seen:?}");
    });
}

// ---------------------------------------------------------------------
// Handles after their session closed or VM recycled
// ---------------------------------------------------------------------

#[test]
fn a_handle_from_a_closed_and_reopened_session_is_lost_not_wrong() {
    within("handle after close", || {
        let pool = IslePool::builder().workers(2).build().unwrap();
        let s = pool.session("h");
        let f: mlua_isle::LuaHandle = s
            .eval("secret = 41; return function() return secret + 1 end")
            .unwrap();
        assert_eq!(f.call::<i64>(()).unwrap(), 42);
        assert!(s.close());
        s.eval::<()>("secret = 0").unwrap(); // reopened: another binding
        match f.call::<i64>(()) {
            Err(IsleError::HandleLost(_)) => {}
            other => panic!("expected HandleLost, got {other:?}"),
        }
        // Passed as an argument into the reopened session.
        let r = s.exec(move |lua, _| {
            let v: mlua_isle::mlua::Value = lua.pack(f.clone())?;
            Ok(v.type_name())
        });
        assert!(r.is_err(), "{r:?}");
        assert_eq!(s.eval::<i64>("return secret").unwrap(), 0);
    });
}

// ---------------------------------------------------------------------
// async: suspended session requests
// ---------------------------------------------------------------------

#[cfg(feature = "async")]
mod suspended {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    type Latch = Arc<Mutex<(bool, Option<std::task::Waker>)>>;
    fn waiting(latch: Latch) -> impl std::future::Future<Output = ()> {
        poll_fn(move |cx| {
            let mut l = latch.lock();
            if l.0 {
                Poll::Ready(())
            } else {
                l.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
    fn open(latch: &Latch) {
        let mut l = latch.lock();
        l.0 = true;
        if let Some(w) = l.1.take() {
            w.wake();
        }
    }

    /// A session closed while its request is suspended, with more of its
    /// requests queued behind: the key reopens fresh at once (not stuck
    /// behind the suspended one), the queued ones run in order in the old
    /// session, and the close lands after them.
    #[test]
    fn closing_a_session_with_a_suspended_request() {
        within("close while suspended", || {
            let pool = IslePool::builder().workers(1).build().unwrap();
            let s = pool.session("s");
            let latch: Latch = Default::default();
            let l = latch.clone();
            let first = s.spawn_exec_async(move |_, env| async move {
                env.set("x", 1)?;
                waiting(l).await;
                env.get::<i64>("x")
            });
            common::eventually("suspended", || pool.metrics().workers[0].suspended == 1);
            let behind = s.spawn_eval::<i64>("x = x + 1; return x");
            assert!(s.close());
            let fresh = s.eval::<Option<i64>>("return x").unwrap();
            assert_eq!(fresh, None);
            open(&latch);
            assert_eq!(first.wait().unwrap(), 1);
            assert_eq!(behind.wait().unwrap(), 2);
            pool.broadcast(|_| Ok(()));
            let m = pool.metrics();
            assert_eq!(m.sessions_open, 1, "{m:#?}");
            assert_eq!(m.workers[0].sessions, 1, "{m:#?}");
        });
    }

    /// At `max_suspended`, a worker takes no work; a bounded shutdown
    /// still resolves the suspended request and what queued behind it.
    #[test]
    fn shutdown_timeout_at_max_suspended_resolves_everything() {
        within("max_suspended shutdown", || {
            let pool = IslePool::builder()
                .workers(1)
                .max_suspended(1)
                .build()
                .unwrap();
            let latch: Latch = Default::default();
            let l = latch.clone();
            let a = pool.spawn_exec_async(move |_| async move {
                waiting(l).await;
                Ok(1)
            });
            common::eventually("suspended", || pool.metrics().workers[0].suspended == 1);
            let s = pool.session("q");
            let b = s.spawn_eval::<i64>("return 2");
            let c = pool.spawn_eval::<i64>("return 3");
            assert!(pool.close_session("q"));
            // `within` fails it if it hangs.
            let r = pool.shutdown_timeout(Duration::from_millis(30));
            assert!(r.is_ok(), "{r:?}");
            assert!(a.wait().is_err());
            assert!(b.wait().is_err());
            assert!(c.wait().is_err());
        });
    }

    /// `recycle_after(1)` while session requests suspend: the VM is not
    /// recycled under them; after they resolve, the session is told lost
    /// once, then starts fresh.
    #[test]
    fn recycling_waits_for_suspended_session_requests() {
        within("recycle vs suspended", || {
            let pool = IslePool::builder()
                .workers(1)
                .recycle_after(1)
                .build()
                .unwrap();
            let s = pool.session("s");
            let latch: Latch = Default::default();
            let l = latch.clone();
            let a = s.spawn_exec_async(move |_, env| async move {
                env.set("x", 5)?;
                waiting(l).await;
                env.get::<i64>("x")
            });
            common::eventually("suspended", || pool.metrics().workers[0].suspended == 1);
            let u: Vec<_> = (0..5).map(|_| pool.spawn_eval::<i64>("return 1")).collect();
            for t in u {
                assert_eq!(t.wait().unwrap(), 1);
            }
            let b = s.spawn_eval::<i64>("return x");
            open(&latch);
            assert_eq!(a.wait().unwrap(), 5);
            assert_eq!(b.wait().unwrap(), 5);
            match s.eval::<Option<i64>>("return x") {
                Err(IsleError::SessionLost) => {}
                other => panic!("expected SessionLost, got {other:?}"),
            }
            assert_eq!(s.eval::<Option<i64>>("return x").unwrap(), None);
        });
    }

    /// Idle expiry does not take a session whose request is suspended
    /// past the timeout.
    #[test]
    fn a_suspended_session_does_not_expire() {
        within("idle vs suspended", || {
            let pool = IslePool::builder()
                .workers(1)
                .session_idle_timeout(Duration::from_millis(5))
                .build()
                .unwrap();
            let s = pool.session("s");
            s.eval::<()>("x = 9").unwrap();
            let latch: Latch = Default::default();
            let l = latch.clone();
            let a = s.spawn_exec_async(move |_, _| async move {
                waiting(l).await;
                Ok(())
            });
            common::eventually("suspended", || pool.metrics().workers[0].suspended == 1);
            // Many sweeps pass (at least one per idle timeout / 4).
            let swept = pool.metrics().workers[0].completed;
            let deadline = std::time::Instant::now() + Duration::from_millis(100);
            while std::time::Instant::now() < deadline {
                pool.eval::<()>("return").unwrap();
            }
            assert!(pool.metrics().workers[0].completed > swept);
            let behind = s.spawn_eval::<i64>("return x");
            open(&latch);
            a.wait().unwrap();
            assert_eq!(behind.wait().unwrap(), 9);
            assert_eq!(pool.metrics().sessions_expired, 0);
        });
    }

    /// A session request suspended on worker 0 when the worker wedges in
    /// another request: the suspended one and the ones queued behind it
    /// resolve (not with the stuck thread), and the session is lost.
    #[test]
    fn a_wedge_resolves_a_suspended_session_request_and_its_queue() {
        let (g, block) = gate();
        let out = within("wedge vs suspended", move || {
            let pool = IslePool::builder()
                .workers(1)
                .stop_grace(Duration::from_millis(50))
                .build()
                .unwrap();
            let s = pool.session("s");
            let latch: Latch = Default::default();
            let l = latch.clone();
            let a = s.spawn_exec_async(move |_, _| async move {
                waiting(l).await;
                Ok(1)
            });
            common::eventually("suspended", || pool.metrics().workers[0].suspended == 1);
            let behind: Vec<_> = (0..3).map(|_| s.spawn_eval::<i64>("return 2")).collect();
            let stuck = pool
                .spawn_exec(move |_| {
                    block.block();
                    Ok(())
                })
                .timeout(Duration::from_millis(20));
            let _ = stuck.wait();
            let mut a = a;
            let ra = a.wait_timeout(Duration::from_secs(3));
            let rb: Vec<_> = behind
                .into_iter()
                .map(|mut t| t.wait_timeout(Duration::from_secs(3)))
                .collect();
            let after = s.eval::<i64>("return 3");
            let after2 = s.eval::<i64>("return 4");
            open(&latch);
            (
                format!("{ra:?}"),
                format!("{rb:?}"),
                format!("{after:?} {after2:?}"),
            )
        });
        g.release();
        assert!(!out.0.contains("None"), "suspended request hung: {out:?}");
        assert!(
            !out.1.contains("None"),
            "queued session requests hung: {out:?}"
        );
        assert!(out.2.ends_with("Ok(4)"), "{out:?}");
    }
}

/// Consequence of the wrapped count above: binding a new session adds
/// `queued + running + sessions` (`least_loaded`), which overflows. In a
/// debug build that panics on the caller's thread, inside `spawn_eval`
/// (under the session shard lock) instead of resolving a task.
#[test]
fn a_new_session_after_recycle_and_wedge_binds_without_panicking() {
    let (g, block) = gate();
    let r = within("bind after the wrap", move || {
        let pool = IslePool::builder()
            .workers(1)
            .recycle_after(2)
            .stop_grace(Duration::from_millis(50))
            .build()
            .unwrap();
        pool.session("a").eval::<()>("x = 1").unwrap();
        pool.eval::<()>("return").unwrap();
        assert!(common::poll_until(
            || pool.metrics().workers[0].recycled == 1
        ));
        let stuck = pool
            .spawn_exec(move |_| {
                block.block();
                Ok(())
            })
            .timeout(Duration::from_millis(20));
        let _ = stuck.wait();
        assert!(common::poll_until(|| pool.metrics().workers[0].wedged == 1));
        // The replacement is busy: `running` is 1.
        let (hg, held) = hold_pool(&pool);
        let p = pool.clone();
        let bound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            p.session("new").spawn_eval::<i64>("return 1")
        }));
        hg.release();
        held.wait().unwrap();
        bound.map(|t| t.wait()).map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    g.release();
    match r {
        Ok(Ok(1)) => {}
        other => panic!("binding a new session: {other:?}"),
    }
}

/// A worker wedges, and its replacement cannot start (`init` fails from
/// the second start on). The stuck thread keeps the slot, and the pool
/// tries again every grace period; shutdown does not wait for the stuck
/// thread, and what waited for it (a session's request) resolves then.
#[test]
fn a_wedge_whose_replacement_cannot_start_does_not_hang_shutdown() {
    let (g, block) = gate();
    let out = within("failed replacement", move || {
        let starts = Arc::new(AtomicUsize::new(0));
        let s2 = starts.clone();
        let pool = IslePool::builder()
            .workers(1)
            .stop_grace(Duration::from_millis(50))
            .init(move |_| {
                if s2.fetch_add(1, Ordering::SeqCst) >= 1 {
                    return Err(mlua_isle::mlua::Error::runtime("no second start"));
                }
                Ok(())
            })
            .build()
            .unwrap();
        let s = pool.session("a");
        s.eval::<()>("x = 1").unwrap();
        let stuck = pool
            .spawn_exec(move |_| {
                block.block();
                Ok(())
            })
            .timeout(Duration::from_millis(20));
        assert!(matches!(stuck.wait(), Err(IsleError::Timeout)));
        // Tried again while the thread stays stuck.
        assert!(common::poll_until(|| pool.metrics().workers[0]
            .recycle_failures
            >= 2));
        let next = s.spawn_eval::<i64>("return x");
        let shutdown = pool.shutdown();
        (shutdown, next.wait())
    });
    g.release();
    assert!(matches!(out.0, Err(IsleError::Wedged(_))), "{out:?}");
    assert_eq!(out.1, Err(IsleError::Shutdown), "{out:?}");
}

/// The same, with `init` failing once: the next try takes over the slot.
/// The session's state went with the stuck VM (`SessionLost`, once), and
/// the pool serves on.
#[test]
fn a_replacement_that_failed_to_start_is_tried_again() {
    let (g, block) = gate();
    let out = within("replacement tried again", move || {
        let starts = Arc::new(AtomicUsize::new(0));
        let s2 = starts.clone();
        let pool = IslePool::builder()
            .workers(1)
            .stop_grace(Duration::from_millis(50))
            .init(move |_| {
                if s2.fetch_add(1, Ordering::SeqCst) == 1 {
                    return Err(mlua_isle::mlua::Error::runtime("not this time"));
                }
                Ok(())
            })
            .build()
            .unwrap();
        let s = pool.session("a");
        s.eval::<()>("x = 1").unwrap();
        let stuck = pool
            .spawn_exec(move |_| {
                block.block();
                Ok(())
            })
            .timeout(Duration::from_millis(20));
        assert!(matches!(stuck.wait(), Err(IsleError::Timeout)));
        let lost = s.eval::<i64>("return x");
        let again = s.eval::<Option<i64>>("return x");
        let m = pool.metrics();
        (
            lost,
            again,
            pool.eval::<i64>("return 6 * 7"),
            m.workers[0].recycle_failures,
            m.workers[0].wedged,
        )
    });
    g.release();
    assert_eq!(out.0, Err(IsleError::SessionLost), "{out:?}");
    assert_eq!(out.1, Ok(None), "{out:?}");
    assert_eq!(out.2, Ok(42), "{out:?}");
    assert_eq!((out.3, out.4), (1, 1), "{out:?}");
}

/// A session whose VM was recycled, told `SessionLost`, then opened again
/// and closed, with no idle timeout: nothing of it stays in the pool (the
/// worker kept every recycled session's record, its key included, for the
/// life of the pool). The key is an `Arc<str>` the pool shares: its count
/// says who still holds it.
#[test]
fn a_session_lost_to_recycling_leaves_nothing_behind() {
    within("lost sessions forgotten", || {
        let pool = IslePool::builder()
            .workers(1)
            .recycle_after(2)
            .build()
            .unwrap();
        // The VM recycles after every second request.
        pool.eval::<i64>("return 1").unwrap();
        pool.eval::<i64>("return 1").unwrap();
        let keys: Vec<Arc<str>> = (0..8).map(|i| Arc::from(format!("tenant-{i}"))).collect();
        for key in &keys {
            let s = pool.session(key.clone());
            s.eval::<()>("x = 1").unwrap();
            // Recycled after this one: the session is lost.
            pool.eval::<i64>("return 1").unwrap();
            assert_eq!(s.eval::<()>("return"), Err(IsleError::SessionLost));
            s.eval::<()>("x = 2").unwrap();
            assert!(pool.close_session(key.clone()));
            // Another recycle, with nothing open.
            pool.eval::<i64>("return 1").unwrap();
        }
        // The closes are taken before these.
        pool.eval::<i64>("return 1").unwrap();
        pool.eval::<i64>("return 1").unwrap();
        assert_eq!(pool.metrics().sessions_open, 0);
        for key in &keys {
            assert_eq!(Arc::strong_count(key), 1, "{key} is still held");
        }
        pool.shutdown().unwrap();
    });
}

/// A VM wedged (stuck in a host callback) while requests are suspended on
/// it: they are answered when it is replaced, and counted then, as
/// stopped (the stuck VM never counts them: it drops them if it gets
/// back). The fresh VM shows none suspended, and once the stuck request
/// returns the ledger balances.
#[cfg(feature = "async")]
#[test]
fn suspended_requests_of_a_wedged_vm_are_counted() {
    within("wedged with suspended requests", || {
        let (g, block) = gate();
        let pool = IslePool::builder()
            .workers(1)
            .stop_grace(Duration::from_millis(50))
            .init(move |lua| {
                block.clone().register(lua, "block")?;
                let never = lua.create_async_function(|_, ()| {
                    std::future::pending::<mlua_isle::mlua::Result<()>>()
                })?;
                lua.globals().set("never", never)
            })
            .build()
            .unwrap();
        let parked: Vec<_> = (0..3).map(|_| pool.spawn_eval::<()>("never()")).collect();
        common::eventually("three suspended", || {
            pool.metrics().workers[0].suspended == 3
        });
        let stuck = pool
            .spawn_eval::<()>("block()")
            .timeout(Duration::from_millis(10));
        g.wait_started();
        assert_eq!(stuck.wait(), Err(IsleError::Timeout));
        for t in parked {
            assert!(t.wait().is_err());
        }
        common::eventually("replaced", || pool.metrics().workers[0].wedged == 1);
        assert_eq!(pool.metrics().workers[0].suspended, 0);
        g.release();
        common::eventually("the ledger balances", || ledger_balanced(&pool.metrics()));
        pool.shutdown().unwrap();
    });
}

/// The same, with the VM stuck inside a resumed poll (the stuck request is
/// itself suspended, so counted at the hand-over): when its thread gets
/// back, it counts nothing again and leaves the fresh VM's gauge alone.
#[cfg(feature = "async")]
#[test]
fn a_vm_wedged_in_a_resumed_poll_is_counted_once() {
    within("wedged in a resumed poll", || {
        let (g, block) = gate();
        let (dropped_tx, dropped_rx) = crossbeam_channel::unbounded::<usize>();
        let starts = Arc::new(AtomicUsize::new(0));
        struct OnDrop(usize, crossbeam_channel::Sender<usize>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                let _ = self.1.send(self.0);
            }
        }
        let pool = {
            let starts = starts.clone();
            IslePool::builder()
                .workers(1)
                .stop_grace(Duration::from_millis(50))
                .init(move |lua| {
                    let n = starts.fetch_add(1, Ordering::SeqCst);
                    lua.set_app_data(OnDrop(n, dropped_tx.clone()));
                    block.clone().register(lua, "block")?;
                    let never = lua.create_async_function(|_, ()| {
                        std::future::pending::<mlua_isle::mlua::Result<()>>()
                    })?;
                    lua.globals().set("never", never)?;
                    common::set_yield_once(lua, "yield_once")
                })
                .build()
                .unwrap()
        };
        let s = pool.session("s");
        let parked = [
            pool.spawn_eval::<()>("never()"),
            s.spawn_eval::<()>("never()"),
        ];
        let queued = s.spawn_eval::<i64>("return 1");
        common::eventually("two suspended", || pool.metrics().workers[0].suspended == 2);
        let stuck = pool
            .spawn_eval::<()>("yield_once() block()")
            .timeout(Duration::from_millis(100));
        g.wait_started();
        assert_eq!(stuck.wait(), Err(IsleError::Timeout));
        for t in parked {
            assert!(t.wait().is_err());
        }
        assert!(queued.wait().is_err());
        common::eventually("replaced", || pool.metrics().workers[0].wedged == 1);
        g.release();
        // The stuck VM (the first started) is dropped once its thread retires.
        while dropped_rx
            .recv_timeout(common::PATIENCE)
            .expect("the stuck VM is dropped")
            != 0
        {}
        let m = pool.metrics();
        assert!(ledger_balanced(&m), "{m:?}");
        assert_eq!(m.workers[0].suspended, 0);
        pool.shutdown().unwrap();
    });
}
