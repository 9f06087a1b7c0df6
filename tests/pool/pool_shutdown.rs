//! Stopping a pool of several workers: `shutdown` drains every queue and
//! joins, `shutdown_timeout` stops what still runs on each VM after the
//! grace period, dropping the last handle stops everything at once, and
//! requests racing a shutdown all resolve and add up in the metrics. Every
//! task resolves, and no thread outlives the pool. (What an isle, a pool and
//! a session share is tested on every front in `shutdown.rs`.)

use crate::common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{
    eventually, expect_msg, gate, register_signal, register_wait_for_cancel, thread_appears,
    thread_gone, within, PATIENCE,
};
use crossbeam_channel::Receiver;
use mlua_isle::{IsleError, IslePool, Task};

/// A pool named `name` with `started()` (reports on the returned channel)
/// and `wait_for_cancel()`, a Rust callback that returns once its request's
/// token says stop.
fn pool(workers: usize, name: &str) -> (IslePool, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let pool = IslePool::builder()
        .workers(workers)
        .name(name)
        .init(move |lua| {
            register_signal(lua, "started", tx.clone())?;
            register_wait_for_cancel(lua, tx.clone())
        })
        .build()
        .unwrap();
    (pool, rx)
}

fn assert_threads_gone(name: &str, workers: usize) {
    for w in 0..workers {
        assert!(
            thread_gone(&format!("{name}-{w}")),
            "{name}-{w} outlived the pool"
        );
    }
    assert!(
        thread_gone(&format!("{name}-deadline")),
        "{name}-deadline outlived the pool"
    );
}

/// Waits (polling: nothing reports it) until the pool refuses new work,
/// i.e. a shutdown has begun.
fn wait_until_closed(pool: &IslePool) {
    // A request made after it began resolves `Shutdown` at once; before, it
    // queues, and is cancelled when dropped.
    eventually("the pool closes", || {
        pool.spawn_exec(|_| Ok(())).try_result() == Some(Err(IsleError::Shutdown))
    });
}

/// Waits for `task` with a bound; it must resolve.
fn resolve<T: Send + 'static>(mut task: Task<T>, what: &str) -> Result<T, IsleError> {
    task.wait_timeout(PATIENCE)
        .unwrap_or_else(|| panic!("never resolved: {what}"))
}

/// The result of a task that must already have resolved (because
/// `shutdown` has returned).
fn resolved<T: Send + 'static>(mut task: Task<T>) -> Result<T, IsleError> {
    task.try_result()
        .expect("unresolved after shutdown returned")
}

fn is_stop(r: &Result<(), IsleError>) -> bool {
    matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled))
}

#[test]
fn shutdown_drains_queued_work_then_joins() {
    let (pool, _) = pool(2, "pdDrn");
    let (g, gf) = gate();
    let blockers: Vec<Task<()>> = (0..2)
        .map(|_| {
            let gf = gf.clone();
            pool.spawn_exec(move |_| {
                gf.block();
                Ok(())
            })
        })
        .collect();
    g.wait_started();
    g.wait_started();
    let unkeyed: Vec<Task<i64>> = (0..50).map(|i| pool.spawn_eval(format!("{i}"))).collect();
    let keyed: Vec<Task<i64>> = (0..20)
        .map(|i| pool.session(i % 2).spawn_eval("n = (n or 0) + 1; return n"))
        .collect();
    let stopper = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.shutdown())
    };
    wait_until_closed(&pool);
    assert!(!stopper.is_finished(), "shutdown returned with work queued");
    g.release();
    g.release();
    assert_eq!(
        within("shutdown returns", move || stopper.join().unwrap()),
        Ok(())
    );
    for t in blockers {
        assert_eq!(resolved(t), Ok(()));
    }
    for (i, t) in unkeyed.into_iter().enumerate() {
        assert_eq!(resolved(t), Ok(i as i64));
    }
    for (i, t) in keyed.into_iter().enumerate() {
        assert_eq!(resolved(t), Ok(i as i64 / 2 + 1));
    }
    assert_threads_gone("pdDrn", 2);
}

#[test]
fn requests_after_shutdown_resolve_shutdown_on_every_handle_and_count_as_discarded() {
    let (pool, _) = pool(2, "pdAft");
    let s = pool.session("tenant");
    s.eval::<()>("x = 1").unwrap();
    pool.shutdown().unwrap();
    let p = pool.clone();
    within("requests after shutdown return", move || {
        assert_eq!(p.eval::<i64>("1"), Err(IsleError::Shutdown));
        assert_eq!(p.call::<()>("print", ()), Err(IsleError::Shutdown));
        assert_eq!(p.exec(|_| Ok(())), Err(IsleError::Shutdown));
        assert_eq!(p.spawn_eval::<i64>("1").wait(), Err(IsleError::Shutdown));
        assert_eq!(
            p.spawn_call::<()>("print", ()).wait(),
            Err(IsleError::Shutdown)
        );
        assert_eq!(p.spawn_exec(|_| Ok(())).wait(), Err(IsleError::Shutdown));
        assert_eq!(s.eval::<i64>("x"), Err(IsleError::Shutdown));
        assert_eq!(s.call::<()>("print", ()), Err(IsleError::Shutdown));
        assert_eq!(s.exec(|_, _| Ok(())), Err(IsleError::Shutdown));
        assert_eq!(s.spawn_exec(|_, _| Ok(())).wait(), Err(IsleError::Shutdown));
        assert_eq!(p.session("new").eval::<i64>("1"), Err(IsleError::Shutdown));
        assert_eq!(p.broadcast(|_| Ok(())), vec![Err(IsleError::Shutdown); 2]);
        let _ = p.close_session("tenant");
    });
    assert_eq!(pool.metrics().discarded, 11);
    assert_threads_gone("pdAft", 2);
}

#[test]
fn shutdown_timeout_stops_running_loops_and_resolves_queued_work() {
    let (pool, started) = pool(2, "pdGrc");
    let loops: Vec<Task<()>> = [
        "started(); while true do end",
        "started(); while true do pcall(function() while true do end end) end",
    ]
    .iter()
    .map(|code| pool.spawn_eval(*code))
    .collect();
    expect_msg(&started, "first loop started");
    expect_msg(&started, "second loop started");
    let queued: Vec<Task<()>> = (0..10)
        .map(|i| match i % 2 {
            0 => pool.spawn_eval(""),
            _ => pool.session(i).spawn_eval(""),
        })
        .collect();
    let begun = Instant::now();
    let p = pool.clone();
    let r = within("shutdown_timeout returns", move || {
        p.shutdown_timeout(Duration::from_millis(50))
    });
    assert_eq!(r, Ok(()));
    assert!(
        begun.elapsed() >= Duration::from_millis(50),
        "stopped before the grace period"
    );
    for t in loops {
        let r = resolve(t, "a running loop");
        assert!(is_stop(&r), "{r:?}");
    }
    for t in queued {
        assert_eq!(resolve(t, "a queued request"), Err(IsleError::Shutdown));
    }
    assert_threads_gone("pdGrc", 2);
}

#[test]
fn dropping_the_last_handle_stops_running_and_queued_work_and_joins() {
    let (pool, started) = pool(2, "pdDrp");
    let loops: Vec<Task<()>> = (0..2)
        .map(|_| pool.spawn_eval("started(); while true do end"))
        .collect();
    expect_msg(&started, "first loop started");
    expect_msg(&started, "second loop started");
    let session = pool.session("tenant");
    let mut queued: Vec<Task<()>> = (0..10).map(|_| pool.spawn_eval("")).collect();
    queued.extend((0..5).map(|_| session.spawn_eval("")));
    // A time limit starts the deadline thread, which must go too.
    queued.push(pool.spawn_eval("").timeout(Duration::from_secs(60)));
    assert!(thread_appears("pdDrp-deadline"));
    within("dropping the last handle returns", move || {
        drop(session);
        drop(pool);
    });
    for t in loops.into_iter().chain(queued) {
        let r = resolve(t, "a request of a dropped pool");
        assert!(is_stop(&r), "{r:?}");
    }
    assert_threads_gone("pdDrp", 2);
}

#[test]
fn every_request_submitted_during_shutdown_resolves() {
    for round in 0..5 {
        let (pool, _) = pool(2, "pdRce");
        let barrier = Arc::new(Barrier::new(5));
        let submitters: Vec<_> = (0..4)
            .map(|t| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut tasks: Vec<Task<()>> = Vec::new();
                    let mut broadcasts = Vec::new();
                    for i in 0..300 {
                        tasks.push(match i % 3 {
                            0 => pool.spawn_eval("local x = 0 for i = 1, 100 do x = x + i end"),
                            1 => pool.session(t * 10 + i % 10).spawn_eval("n = (n or 0) + 1"),
                            _ => pool.spawn_exec(|_| Ok(())),
                        });
                        if i % 100 == 0 {
                            broadcasts.extend(pool.broadcast(|_| Ok(())));
                        }
                    }
                    (tasks, broadcasts)
                })
            })
            .collect();
        barrier.wait();
        let p = pool.clone();
        assert_eq!(within("shutdown returns", move || p.shutdown()), Ok(()));
        let mut ok = 0;
        for s in submitters {
            let (tasks, broadcasts) = s.join().unwrap();
            for t in tasks {
                match resolve(t, "a request racing shutdown") {
                    Ok(()) => ok += 1,
                    Err(IsleError::Shutdown) => {}
                    Err(e) => panic!("round {round}: unexpected {e:?}"),
                }
            }
            for r in broadcasts {
                assert!(matches!(r, Ok(()) | Err(IsleError::Shutdown)), "{r:?}");
            }
        }
        let m = pool.metrics();
        assert_eq!(m.submitted, 1200, "round {round}");
        let ended: u64 = m
            .workers
            .iter()
            .map(|w| w.completed + w.failed + w.cancelled)
            .sum();
        assert_eq!(
            m.submitted,
            m.rejected + m.discarded + ended,
            "round {round}: {m:#?}"
        );
        assert_eq!(ended, ok, "round {round}: {m:#?}");
        drop(pool);
        assert_threads_gone("pdRce", 2);
    }
}
