//! Fair service across the sessions bound to one VM, and per-session
//! counters: a tenant that floods its VM does not make the others on it
//! wait behind its backlog.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{gate, hold_pool, hold_session, within};
use mlua_isle::{IsleError, IslePool, Task};
use parking_lot::Mutex;

type Log = Arc<Mutex<Vec<(&'static str, usize)>>>;

/// One VM, so every session shares it.
fn one_vm() -> IslePool {
    IslePool::builder().workers(1).build().unwrap()
}

/// A session request that records `(key, n)` in `log` when it runs.
fn logged(pool: &IslePool, log: &Log, key: &'static str, n: usize) -> Task<()> {
    let log = log.clone();
    pool.session(key).spawn_exec(move |_, _| {
        log.lock().push((key, n));
        Ok(())
    })
}

/// How many requests of `key` ran before the first of `first`.
fn ran_before(log: &[(&str, usize)], key: &str, first: &str) -> usize {
    let at = log.iter().position(|(k, _)| *k == first).unwrap();
    log[..at].iter().filter(|(k, _)| *k == key).count()
}

#[test]
fn a_quiet_key_waits_for_at_most_one_request_of_each_busy_key() {
    within("fair order across keys", || {
        let pool = one_vm();
        let log = Log::default();
        // Hold the VM while the backlog builds up.
        let (g, held) = hold_pool(&pool);
        let mut tasks = Vec::new();
        for (key, n) in [("a", 500), ("b", 20), ("c", 1), ("d", 1)] {
            for i in 0..n {
                tasks.push(logged(&pool, &log, key, i));
            }
        }
        g.release();
        held.wait().unwrap();
        for t in tasks {
            t.wait().unwrap();
        }
        let log = log.lock();
        assert_eq!(log.len(), 522);
        // Each key in its own order.
        for key in ["a", "b", "c", "d"] {
            let mine: Vec<usize> = log.iter().filter(|(k, _)| *k == key).map(|e| e.1).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{key} out of order");
        }
        // First come first served would run all 500 of a's first.
        assert!(ran_before(&log, "a", "b") <= 1, "{:?}", &log[..10]);
        for quiet in ["c", "d"] {
            assert!(ran_before(&log, "a", quiet) <= 1, "{:?}", &log[..10]);
            assert!(ran_before(&log, "b", quiet) <= 1, "{:?}", &log[..10]);
        }
        pool.shutdown().unwrap();
    });
}

#[test]
fn fifo_sessions_serves_a_vms_session_work_in_arrival_order() {
    within("first come, first served", || {
        let pool = IslePool::builder()
            .workers(1)
            .fifo_sessions(true)
            .build()
            .unwrap();
        let log = Log::default();
        let (g, held) = hold_pool(&pool);
        let tasks: Vec<_> = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("a", 3), ("c", 0)]
            .into_iter()
            .map(|(k, n)| logged(&pool, &log, k, n))
            .collect();
        g.release();
        held.wait().unwrap();
        for t in tasks {
            t.wait().unwrap();
        }
        assert_eq!(
            *log.lock(),
            [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("a", 3), ("c", 0)]
        );
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_key_arriving_behind_a_flood_runs_after_the_request_that_is_running() {
    within("a late key overtakes a backlog", || {
        let pool = one_vm();
        let log = Log::default();
        // The flooding tenant's own first request holds the VM.
        let (g, held) = hold_session(&pool.session("flood"));
        let flood: Vec<_> = (0..2_000)
            .map(|i| logged(&pool, &log, "flood", i))
            .collect();
        let quiet = logged(&pool, &log, "quiet", 0);
        g.release();
        held.wait().unwrap();
        quiet.wait().unwrap();
        // At most one of the flood's queued requests ran before it.
        assert!(
            ran_before(&log.lock(), "flood", "quiet") <= 1,
            "{:?}",
            &log.lock()[..5]
        );
        for t in flood {
            t.wait().unwrap();
        }
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_key_arriving_while_a_flood_is_served_runs_next() {
    within("a late key during a flood", || {
        let pool = one_vm();
        let log = Log::default();
        let (g, block) = gate();
        let flood: Vec<_> = (0..2_000)
            .map(|i| logged(&pool, &log, "flood", i))
            .collect();
        // Submitted while the flood is being served: the request of the
        // flood running then holds the VM until `quiet` is queued.
        let gated = pool.session("flood").spawn_exec(move |_, _| {
            block.block();
            Ok(())
        });
        let more: Vec<_> = (2_000..2_100)
            .map(|i| logged(&pool, &log, "flood", i))
            .collect();
        g.wait_started();
        let before = log.lock().len();
        let quiet = logged(&pool, &log, "quiet", 0);
        g.release();
        quiet.wait().unwrap();
        let log_now = log.lock().clone();
        let at = log_now.iter().position(|(k, _)| *k == "quiet").unwrap();
        // Only what ran before the gate (all 2,000: they were queued ahead
        // of it) and nothing of the 100 queued behind it.
        assert_eq!(at, before, "{:?}", &log_now[before.saturating_sub(2)..]);
        for t in flood.into_iter().chain([gated]).chain(more) {
            t.wait().unwrap();
        }
        pool.shutdown().unwrap();
    });
}

#[test]
fn unkeyed_work_is_not_held_back_by_a_session_flood() {
    within("unkeyed work beside a flood", || {
        let pool = IslePool::builder().workers(2).build().unwrap();
        let (g, block) = gate();
        let s = pool.session("flood");
        let held = s.spawn_exec(move |_, _| {
            block.block();
            Ok(())
        });
        g.wait_started();
        let flood: Vec<_> = (0..1_000).map(|_| s.spawn_eval::<()>("")).collect();
        // The other VM serves unkeyed work while the flood's VM is held.
        for i in 0..50 {
            assert_eq!(pool.eval::<i64>(format!("return {i}")), Ok(i));
        }
        g.release();
        held.wait().unwrap();
        for t in flood {
            t.wait().unwrap();
        }
        pool.shutdown().unwrap();
    });
}

#[test]
fn session_metrics_count_one_keys_requests_failures_and_run_time() {
    within("per-key counters", || {
        let pool = one_vm();
        let s = pool.session("tenant");
        assert_eq!(pool.session_metrics("tenant"), None, "not open yet");
        for _ in 0..3 {
            s.eval::<()>("x = 1").unwrap();
        }
        for _ in 0..2 {
            assert!(matches!(
                s.eval::<()>("error('no')"),
                Err(IsleError::Lua(_))
            ));
        }
        // One cancelled while queued behind a held request.
        let (g, held) = hold_session(&s);
        let held_since = Instant::now();
        let cancelled = s.spawn_eval::<()>("x = 2");
        cancelled.cancel();
        assert_eq!(cancelled.wait(), Err(IsleError::Cancelled));
        // The held request's run time is at least this long.
        std::thread::sleep(Duration::from_millis(30));
        let held_for = held_since.elapsed();
        g.release();
        held.wait().unwrap();
        // Another key's work is not counted here.
        pool.session("other").eval::<()>("y = 1").unwrap();
        common::eventually("the cancelled request is discarded", || {
            s.metrics().is_some_and(|m| m.requests == 7)
        });
        let m = s.metrics().unwrap();
        assert_eq!((m.completed, m.failed, m.cancelled), (4, 2, 1), "{m:?}");
        assert_eq!(m.worker, 0);
        assert!(m.run_time >= held_for, "{m:?} < {held_for:?}");
        // Counted just after its caller is answered: wait for it.
        common::eventually("the other key's request is counted", || {
            pool.session_metrics("other")
                .is_some_and(|m| m.requests == 1)
        });
        // Closed: gone; reopened: counted afresh.
        assert!(s.close());
        assert_eq!(s.metrics(), None);
        s.eval::<()>("").unwrap();
        common::eventually("the reopened session counts afresh", || {
            s.metrics()
                .is_some_and(|m| (m.requests, m.completed) == (1, 1))
        });
        pool.shutdown().unwrap();
    });
}

#[test]
fn the_vms_queue_counts_session_work_held_for_fair_service() {
    within("queued includes the fair queue", || {
        let pool = one_vm();
        let (g, held) = hold_pool(&pool);
        let tasks: Vec<_> = (0..6)
            .map(|i| pool.session(i % 3).spawn_eval::<()>(""))
            .collect();
        assert_eq!(pool.metrics().workers[0].queued, 6);
        g.release();
        held.wait().unwrap();
        for t in tasks {
            t.wait().unwrap();
        }
        let m = pool.metrics();
        assert_eq!(m.workers[0].queued, 0, "{m:?}");
        pool.shutdown().unwrap();
    });
}
