//! `metrics()`: after a known workload the counters add up.

use crate::common;

use std::time::Duration;

use common::{expect_msg, gate, poll_until, register_signal};
use mlua_isle::{IsleError, IslePool, PoolMetrics, Task};

fn total(m: &PoolMetrics, f: impl Fn(&mlua_isle::WorkerMetrics) -> u64) -> u64 {
    m.workers.iter().map(f).sum()
}

/// Requests that have ended, as the workers counted them.
fn ended(m: &PoolMetrics) -> u64 {
    total(m, |w| w.completed + w.failed + w.cancelled)
}

/// Waits until the workers have counted `n` ended requests and are idle: a
/// task resolves before its worker updates the counters, and a request
/// cancelled while queued is counted when a worker discards it.
fn settled(pool: &IslePool, n: u64) -> PoolMetrics {
    let mut m = pool.metrics();
    let settled = poll_until(|| {
        m = pool.metrics();
        let idle = m.workers.iter().all(|w| w.queued == 0 && w.running == 0);
        ended(&m) >= n && idle && m.unkeyed_queued == 0
    });
    assert!(settled, "metrics never settled: {m:#?}");
    m
}

#[test]
fn a_fresh_pool_has_zero_counters() {
    let pool = IslePool::new(2, |_| Ok(())).unwrap();
    let m = pool.metrics();
    assert_eq!(m.workers.len(), 2);
    for w in &m.workers {
        assert_eq!((w.queued, w.running, w.sessions), (0, 0, 0));
        assert_eq!((w.completed, w.failed, w.cancelled), (0, 0, 0));
        assert_eq!(w.busy, Duration::ZERO);
    }
    assert_eq!((m.unkeyed_queued, m.sessions_open), (0, 0));
    assert_eq!(
        (m.submitted, m.rejected, m.discarded, m.sessions_expired),
        (0, 0, 0, 0)
    );
    pool.shutdown().unwrap();
}

#[test]
fn counters_add_up_after_a_known_workload() {
    let (tx, started) = crossbeam_channel::unbounded();
    let pool = IslePool::new(2, move |lua| register_signal(lua, "started", tx.clone())).unwrap();

    // 50 that succeed: 40 unkeyed, 10 on two sessions.
    let mut ok: Vec<Task<i64>> = (0..40).map(|i| pool.spawn_eval(format!("{i}"))).collect();
    for i in 0..10 {
        ok.push(pool.session(i % 2).spawn_eval("n = (n or 0) + 1; return 0"));
    }
    // 10 that fail: Lua errors, a missing function, a failing closure.
    let mut failing: Vec<Task<()>> = (0..8).map(|_| pool.spawn_eval("error('x')")).collect();
    failing.push(pool.spawn_call("no_such_function", ()));
    failing.push(pool.spawn_exec(|_| Err(mlua_isle::mlua::Error::runtime("no"))));
    for t in ok {
        t.wait().unwrap();
    }
    for t in failing {
        assert!(t.wait().is_err());
    }

    // 5 cancelled: two running loops, three queued behind them.
    let loops: Vec<Task<()>> = (0..2)
        .map(|_| pool.spawn_eval("started(); while true do end"))
        .collect();
    expect_msg(&started, "first loop started");
    expect_msg(&started, "second loop started");
    let queued: Vec<Task<()>> = (0..3).map(|_| pool.spawn_eval("ran = true")).collect();
    for t in &queued {
        t.cancel();
    }
    for t in loops.into_iter().chain(queued) {
        t.cancel();
        assert_eq!(t.wait(), Err(IsleError::Cancelled));
    }

    let m = settled(&pool, 65);
    assert_eq!(total(&m, |w| w.completed), 50, "{m:#?}");
    assert_eq!(total(&m, |w| w.failed), 10, "{m:#?}");
    assert_eq!(total(&m, |w| w.cancelled), 5, "{m:#?}");
    assert_eq!(m.submitted, 65);
    assert_eq!((m.rejected, m.discarded), (0, 0));
    assert!(m.workers.iter().any(|w| w.busy > Duration::ZERO));
    assert_eq!(m.sessions_open, 2);
    assert_eq!(m.workers.iter().map(|w| w.sessions).sum::<usize>(), 2);
    // The queued ones never ran.
    assert_eq!(
        pool.broadcast(|lua| lua.globals().get::<Option<bool>>("ran")),
        vec![Ok(None), Ok(None)]
    );
    // Broadcasts are not requests: the counts stay.
    let after = pool.metrics();
    assert_eq!(after.submitted, 65);
    assert_eq!(ended(&after), 65);
    pool.shutdown().unwrap();
}

#[test]
fn timeouts_and_panics_are_counted() {
    let (tx, started) = crossbeam_channel::unbounded();
    let pool = IslePool::new(1, move |lua| register_signal(lua, "started", tx.clone())).unwrap();
    let timed_out = pool.spawn_eval::<()>("started() while true do end");
    expect_msg(&started, "the loop started");
    // Time passing is the point: the worker is busy meanwhile.
    std::thread::sleep(Duration::from_millis(5));
    // A limit that has already passed stops the request at once.
    let timed_out = timed_out.timeout(Duration::ZERO);
    assert_eq!(timed_out.wait(), Err(IsleError::Timeout));
    let panicked = pool.spawn_exec::<(), _>(|_| panic!("counted"));
    assert!(matches!(panicked.wait(), Err(IsleError::Panic(_))));
    let m = settled(&pool, 2);
    assert_eq!(m.workers[0].cancelled, 1, "{m:#?}");
    assert_eq!(m.workers[0].failed, 1, "{m:#?}");
    assert!(m.workers[0].busy >= Duration::from_millis(5), "{m:#?}");
    pool.shutdown().unwrap();
}

#[test]
fn queued_and_running_show_while_work_waits() {
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    let (g, gf) = gate();
    let blocker = pool.spawn_exec(move |_| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let unkeyed: Vec<Task<i64>> = (0..3).map(|_| pool.spawn_eval("1")).collect();
    let keyed: Vec<Task<i64>> = (0..2).map(|_| pool.session("k").spawn_eval("1")).collect();
    let m = pool.metrics();
    assert_eq!(m.workers[0].running, 1);
    // Unkeyed work waits in the global queue or the worker's deque.
    assert_eq!(m.unkeyed_queued + m.workers[0].queued, 5, "{m:#?}");
    assert_eq!(m.workers[0].sessions, 1);
    assert_eq!(m.sessions_open, 1);
    assert_eq!(m.submitted, 6);
    g.release();
    blocker.wait().unwrap();
    for t in unkeyed.into_iter().chain(keyed) {
        assert_eq!(t.wait(), Ok(1));
    }
    let m = settled(&pool, 6);
    assert_eq!(m.workers[0].completed, 6);
    pool.shutdown().unwrap();
}

#[test]
fn the_ledger_balances_after_shutdown() {
    // submitted == rejected + discarded + Σ(completed + failed + cancelled)
    // once the pool is quiet, whatever happened to each request.
    let pool = IslePool::builder()
        .workers(1)
        .queue_capacity(20)
        .build()
        .unwrap();
    let (g, gf) = gate();
    let blocker = pool.spawn_exec(move |_| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let tasks: Vec<Task<()>> = (0..40)
        .map(|i| match i % 4 {
            0 => pool.spawn_eval("error('x')"),
            1 => pool.session(i).spawn_eval(""),
            _ => pool.spawn_eval(""),
        })
        .collect();
    for t in tasks.iter().step_by(7) {
        t.cancel();
    }
    g.release();
    blocker.wait().unwrap();
    pool.shutdown().unwrap();
    let late = pool.spawn_eval::<()>("");
    assert_eq!(late.wait(), Err(IsleError::Shutdown));
    for t in tasks {
        let _ = t.wait();
    }
    let m = pool.metrics();
    assert_eq!(m.submitted, 42);
    assert_eq!(m.rejected, 20, "{m:#?}");
    assert_eq!(m.discarded, 1, "{m:#?}");
    assert_eq!(m.submitted, m.rejected + m.discarded + ended(&m), "{m:#?}");
}
