//! Latency histograms (`queue_wait`, `run_time`) of the pool, its workers
//! and an isle: they count exactly the requests that started, and their
//! values are at least the time a request was seen to wait or run.

use crate::common;

use std::time::{Duration, Instant};

use common::{expect_msg, gate, poll_until, register_signal, within};
use mlua_isle::{
    Isle, IsleError, IsleMetrics, IslePool, LatencyHistogram, PoolMetrics, Task, WorkerMetrics,
};

/// Requests a worker counted as ended (whether they ran or not).
fn ended(w: &WorkerMetrics) -> u64 {
    w.completed + w.failed + w.cancelled
}

/// The metrics once the workers have counted `n` ended requests, are idle,
/// and their histograms hold `started` requests (a task resolves just
/// before its worker counts it; a worker hands its histograms a batch of
/// requests at a time, or all it holds before it sleeps).
fn settled(pool: &IslePool, n: u64, started: u64) -> PoolMetrics {
    let mut m = pool.metrics();
    let ok = poll_until(|| {
        m = pool.metrics();
        let idle = m.workers.iter().all(|w| w.queued == 0 && w.running == 0);
        idle && m.unkeyed_queued == 0
            && m.workers.iter().map(ended).sum::<u64>() == n
            && m.run_time.count() == started
    });
    assert!(
        ok,
        "metrics never settled at {n} ended requests, {started} started: {m:#?}"
    );
    m
}

fn isle_settled(isle: &Isle, n: u64) -> IsleMetrics {
    let mut m = isle.metrics();
    let ok = poll_until(|| {
        m = isle.metrics();
        m.completed + m.failed + m.cancelled == n
    });
    assert!(ok, "metrics never settled at {n} ended requests: {m:#?}");
    m
}

fn assert_ordered(h: &LatencyHistogram) {
    let q = [h.p50(), h.p90(), h.p99(), h.p999(), h.max()];
    assert!(
        q.windows(2).all(|w| w[0] <= w[1]),
        "quantiles out of order: {h:?}"
    );
    assert!(h.mean() <= h.max(), "{h:?}");
    assert_eq!(h.quantile(1.0), h.max());
    if h.count() > 0 {
        assert!(h.max() > Duration::ZERO, "{h:?}");
    }
}

fn merged<'a>(hs: impl Iterator<Item = &'a LatencyHistogram>) -> LatencyHistogram {
    let mut all = LatencyHistogram::default();
    for h in hs {
        all.merge(h);
    }
    all
}

#[test]
fn fresh_histograms_are_empty() {
    within("fresh histograms", || {
        let pool = IslePool::new(2, |_| Ok(())).unwrap();
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (m, i) = (pool.metrics(), isle.metrics());
        for h in [&m.queue_wait, &m.run_time, &i.queue_wait, &i.run_time]
            .into_iter()
            .chain(m.workers.iter().flat_map(|w| [&w.queue_wait, &w.run_time]))
        {
            assert!(h.is_empty());
            assert_eq!(
                (h.count(), h.p50(), h.max()),
                (0, Duration::ZERO, Duration::ZERO)
            );
        }
        assert_eq!((i.completed, i.failed, i.cancelled), (0, 0, 0));
        pool.shutdown().unwrap();
        isle.shutdown().unwrap();
    });
}

/// Completed, failed, cancelled and timed-out requests, running or queued:
/// per worker and pool-wide, the histograms hold exactly those that
/// started.
#[test]
fn pool_histograms_add_up_to_the_counters() {
    within("pool histograms add up", || {
        let (tx, started) = crossbeam_channel::unbounded();
        let pool =
            IslePool::new(2, move |lua| register_signal(lua, "started", tx.clone())).unwrap();
        let k = pool.session("k");

        // Ran: 40 that succeed (10 on the session), 7 that fail.
        let mut ok: Vec<Task<i64>> = (0..30).map(|i| pool.spawn_eval(format!("{i}"))).collect();
        ok.extend((0..10).map(|_| k.spawn_eval("n = (n or 0) + 1; return n")));
        let mut failing: Vec<Task<()>> = (0..5).map(|_| pool.spawn_eval("error('x')")).collect();
        failing.push(pool.spawn_call("no_such_function", ()));
        failing.push(pool.spawn_exec(|_| panic!("counted")));
        for t in ok {
            t.wait().unwrap();
        }
        for t in failing {
            assert!(t.wait().is_err());
        }

        // The session's worker runs a loop; three requests queued behind
        // it never start (two cancelled, one timed out).
        let looping = k.spawn_eval::<()>("started(); while true do end");
        expect_msg(&started, "the session's loop started");
        let queued: Vec<Task<()>> = (0..2).map(|_| k.spawn_eval("ran = true")).collect();
        let late = k
            .spawn_eval::<()>("ran = true")
            .timeout(Duration::from_millis(1));
        assert_eq!(late.wait(), Err(IsleError::Timeout));
        for t in queued {
            t.cancel();
            assert_eq!(t.wait(), Err(IsleError::Cancelled));
        }
        // The other worker runs one that times out while running.
        let timed_out = pool.spawn_eval::<()>("started(); while true do end");
        expect_msg(&started, "the unkeyed loop started");
        assert_eq!(
            timed_out.timeout(Duration::ZERO).wait(),
            Err(IsleError::Timeout)
        );
        looping.cancel();
        assert_eq!(looping.wait(), Err(IsleError::Cancelled));

        let m = settled(&pool, 52, 49);
        let session_worker = m.workers.iter().position(|w| w.sessions == 1).unwrap();
        let unstarted = |i: usize| if i == session_worker { 3 } else { 0 };
        for (i, w) in m.workers.iter().enumerate() {
            assert_eq!(
                w.run_time.count(),
                ended(w) - unstarted(i),
                "worker {i}: {m:#?}"
            );
            assert_eq!(
                w.queue_wait.count(),
                w.run_time.count(),
                "worker {i}: {m:#?}"
            );
            assert_ordered(&w.run_time);
            assert_ordered(&w.queue_wait);
        }
        assert_eq!(m.run_time.count(), 49, "{m:#?}");
        assert_eq!(m.queue_wait.count(), 49, "{m:#?}");
        assert_eq!(m.run_time, merged(m.workers.iter().map(|w| &w.run_time)));
        assert_eq!(
            m.queue_wait,
            merged(m.workers.iter().map(|w| &w.queue_wait))
        );
        assert_ordered(&m.run_time);
        assert_ordered(&m.queue_wait);
        let counted: u64 = m.workers.iter().map(|w| w.cancelled).sum();
        assert_eq!(counted, 5, "{m:#?}");
        // Broadcasts are not requests: not in the histograms either.
        pool.broadcast(|_| Ok(()));
        assert_eq!(pool.eval::<i64>("1"), Ok(1));
        settled(&pool, 53, 50);
        pool.shutdown().unwrap();
    });
}

/// The same for an isle.
#[test]
fn isle_histograms_add_up_to_the_counters() {
    within("isle histograms add up", || {
        let (tx, started) = crossbeam_channel::unbounded();
        let isle = Isle::spawn(move |lua| register_signal(lua, "started", tx)).unwrap();

        let ok: Vec<Task<i64>> = (0..20).map(|i| isle.spawn_eval(format!("{i}"))).collect();
        let mut failing: Vec<Task<()>> = (0..3).map(|_| isle.spawn_eval("error('x')")).collect();
        failing.push(isle.spawn_call("no_such_function", ()));
        failing.push(isle.spawn_exec(|_| panic!("counted")));
        for t in ok {
            t.wait().unwrap();
        }
        for t in failing {
            assert!(t.wait().is_err());
        }

        // Times out while running.
        let timed_out = isle.spawn_eval::<()>("started(); while true do end");
        expect_msg(&started, "the first loop started");
        assert_eq!(
            timed_out.timeout(Duration::ZERO).wait(),
            Err(IsleError::Timeout)
        );
        // Cancelled while running, with three behind it that never start.
        let looping = isle.spawn_eval::<()>("started(); while true do end");
        expect_msg(&started, "the second loop started");
        let queued: Vec<Task<()>> = (0..2).map(|_| isle.spawn_eval("ran = true")).collect();
        let late = isle
            .spawn_eval::<()>("ran = true")
            .timeout(Duration::from_millis(1));
        assert_eq!(late.wait(), Err(IsleError::Timeout));
        for t in queued {
            t.cancel();
            assert_eq!(t.wait(), Err(IsleError::Cancelled));
        }
        looping.cancel();
        assert_eq!(looping.wait(), Err(IsleError::Cancelled));

        let m = isle_settled(&isle, 30);
        assert_eq!((m.completed, m.failed, m.cancelled), (20, 5, 5), "{m:#?}");
        assert_eq!(m.run_time.count(), 30 - 3, "{m:#?}");
        assert_eq!(m.queue_wait.count(), 30 - 3, "{m:#?}");
        assert_ordered(&m.run_time);
        assert_ordered(&m.queue_wait);
        assert!(m.busy > Duration::ZERO);
        assert_eq!(isle.eval::<Option<bool>>("ran").unwrap(), None);
        isle.shutdown().unwrap();
    });
}

/// Holds a request on a gate for a while (the time passing is the point),
/// with another queued behind it; returns how long it was held.
fn hold_one_with_one_behind(
    block: impl FnOnce(common::GateFn) -> Task<()>,
    behind: impl FnOnce() -> Task<i64>,
) -> Duration {
    let (g, gf) = gate();
    let blocker = block(gf);
    g.wait_started();
    let behind = behind();
    let held = Instant::now();
    std::thread::sleep(Duration::from_millis(20));
    let held = held.elapsed();
    g.release();
    blocker.wait().unwrap();
    assert_eq!(behind.wait(), Ok(1));
    held
}

/// Lower bounds only: a request held for `held` ran at least that long,
/// and the one behind it waited at least that long.
#[test]
fn a_held_request_shows_its_run_time_and_the_one_behind_it_its_wait() {
    within("a held request's latency", || {
        let pool = IslePool::new(1, |_| Ok(())).unwrap();
        let held = hold_one_with_one_behind(
            |gf| {
                pool.spawn_exec(move |_| {
                    gf.block();
                    Ok(())
                })
            },
            || pool.spawn_eval("1"),
        );
        let m = settled(&pool, 2, 2);
        for (run, wait) in [
            (&m.run_time, &m.queue_wait),
            (&m.workers[0].run_time, &m.workers[0].queue_wait),
        ] {
            assert_eq!((run.count(), wait.count()), (2, 2), "{m:#?}");
            assert!(run.max() >= held, "held {held:?}: {m:#?}");
            assert!(wait.max() >= held, "held {held:?}: {m:#?}");
            assert!(run.mean() >= held / 2, "held {held:?}: {m:#?}");
        }
        pool.shutdown().unwrap();

        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let held = hold_one_with_one_behind(
            |gf| {
                isle.spawn_exec(move |_| {
                    gf.block();
                    Ok(())
                })
            },
            || isle.spawn_eval("1"),
        );
        let m = isle_settled(&isle, 2);
        assert!(m.run_time.max() >= held, "held {held:?}: {m:#?}");
        assert!(m.queue_wait.max() >= held, "held {held:?}: {m:#?}");
        assert!(m.busy >= held, "held {held:?}: {m:#?}");
        isle.shutdown().unwrap();
    });
}

/// A request that suspends (the `async` feature) is in the histograms
/// once, from its first poll; it is counted when it resolves.
#[cfg(feature = "async")]
#[test]
fn a_suspended_request_is_in_the_histograms_once() {
    use std::future::poll_fn;
    use std::sync::{Arc, Mutex};
    use std::task::Poll;

    /// A future the test completes: (done, its waker).
    type Latch = Arc<Mutex<(bool, Option<std::task::Waker>)>>;
    fn waiting(latch: Latch) -> impl std::future::Future<Output = ()> {
        poll_fn(move |cx| {
            let mut l = latch.lock().unwrap();
            if l.0 {
                Poll::Ready(())
            } else {
                l.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
    fn open(latch: &Latch) {
        let mut l = latch.lock().unwrap();
        l.0 = true;
        if let Some(w) = l.1.take() {
            w.wake();
        }
    }

    within("a suspended request", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let pool = IslePool::new(1, |_| Ok(())).unwrap();
        let latches: [Latch; 2] = Default::default();
        let (l0, l1) = (latches[0].clone(), latches[1].clone());
        let a = isle.spawn_exec_async(move |_| async move {
            waiting(l0).await;
            Ok(1)
        });
        let b = pool.spawn_exec_async(move |_| async move {
            waiting(l1).await;
            Ok(1)
        });
        // Suspended: in the histograms, not yet in the counters.
        common::eventually("both suspended", || {
            isle.metrics().run_time.count() == 1 && pool.metrics().run_time.count() == 1
        });
        assert_eq!(isle.metrics().completed, 0);
        assert_eq!(pool.metrics().workers[0].completed, 0);
        for l in &latches {
            open(l);
        }
        assert_eq!((a.wait(), b.wait()), (Ok(1), Ok(1)));
        let (i, p) = (isle_settled(&isle, 1), settled(&pool, 1, 1));
        assert_eq!(
            (i.completed, i.run_time.count(), i.queue_wait.count()),
            (1, 1, 1)
        );
        assert_eq!((p.workers[0].completed, p.run_time.count()), (1, 1));
        pool.shutdown().unwrap();
        isle.shutdown().unwrap();
    });
}
