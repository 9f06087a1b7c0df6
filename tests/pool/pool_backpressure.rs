//! `queue_capacity`: a request past the capacity resolves `QueueFull` at
//! once, without blocking the caller; accepted requests still run; the space
//! comes back as the queue drains.

use crate::common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{eventually, gate, within, Gate, PATIENCE};
use mlua_isle::{IsleError, IslePool, Task};

/// A one-worker pool with room for `capacity` queued requests, its worker
/// blocked in a callback until the returned gate is released.
fn blocked_pool(capacity: usize) -> (IslePool, Gate, Task<()>) {
    let pool = IslePool::builder()
        .workers(1)
        .queue_capacity(capacity)
        .build()
        .unwrap();
    let (g, gf) = gate();
    let blocker = pool.spawn_exec(move |_| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    (pool, g, blocker)
}

#[test]
fn a_request_past_the_capacity_resolves_queue_full_at_once() {
    let (pool, g, blocker) = blocked_pool(4);
    let mut accepted: Vec<Task<i64>> = (0..3)
        .map(|i| pool.spawn_eval(format!("return {i}")))
        .collect();
    accepted.push(pool.session("s").spawn_eval("return 3"));
    assert!(accepted.iter().all(|t| !t.is_finished()));

    let mut refused = pool.spawn_eval::<i64>("return 99");
    assert!(refused.is_finished(), "a refused request must not wait");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    let mut refused = pool.session("s").spawn_eval::<i64>("return 99");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    let mut refused = pool.spawn_exec(|_| Ok(()));
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    assert_eq!(pool.metrics().rejected, 3);

    g.release();
    blocker.wait().unwrap();
    for (i, t) in accepted.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64));
    }
    let m = pool.metrics();
    assert_eq!(m.rejected, 3);
    assert_eq!(m.submitted, 1 + 4 + 3);
    pool.shutdown().unwrap();
}

#[test]
fn blocking_calls_on_a_full_pool_return_queue_full_without_blocking() {
    let (pool, g, blocker) = blocked_pool(1);
    let queued = pool.spawn_eval::<i64>("return 1");
    let p = pool.clone();
    let (a, b, c) = within("calls on a full pool return", move || {
        (
            p.eval::<i64>("return 2"),
            p.call::<()>("print", ()),
            p.session(1).exec(|_, _| Ok(())),
        )
    });
    assert_eq!(a, Err(IsleError::QueueFull));
    assert_eq!(b, Err(IsleError::QueueFull));
    assert_eq!(c, Err(IsleError::QueueFull));
    g.release();
    blocker.wait().unwrap();
    assert_eq!(queued.wait(), Ok(1));
    pool.shutdown().unwrap();
}

#[test]
fn capacity_comes_back_as_the_queue_drains() {
    let (pool, g, blocker) = blocked_pool(2);
    let first: Vec<Task<i64>> = (0..2).map(|i| pool.spawn_eval(format!("{i}"))).collect();
    let mut refused = pool.spawn_eval::<i64>("0");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    g.release();
    blocker.wait().unwrap();
    for t in first {
        t.wait().unwrap();
    }
    // Block again: the same capacity is available once more.
    let (g, gf) = gate();
    let blocker = pool.spawn_exec(move |_| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let second: Vec<Task<i64>> = (0..2).map(|i| pool.spawn_eval(format!("{i}"))).collect();
    assert!(second.iter().all(|t| !t.is_finished()));
    let mut refused = pool.spawn_eval::<i64>("0");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    g.release();
    blocker.wait().unwrap();
    for (i, t) in second.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64));
    }
    assert_eq!(pool.metrics().rejected, 2);
    pool.shutdown().unwrap();
}

#[test]
fn many_submitters_never_overfill_the_queue() {
    let capacity = 50;
    let (pool, g, blocker) = blocked_pool(capacity);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                (0..40)
                    .map(|_| pool.spawn_eval::<i64>("return 1"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let tasks: Vec<Task<i64>> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    // The worker is blocked: only refused requests can have resolved.
    let (refused, accepted): (Vec<_>, Vec<_>) = tasks.into_iter().partition(Task::is_finished);
    assert_eq!(accepted.len(), capacity, "exactly the overflow is refused");
    for mut t in refused {
        assert_eq!(t.try_result(), Some(Err(IsleError::QueueFull)));
    }
    assert_eq!(pool.metrics().rejected, (160 - capacity) as u64);
    g.release();
    blocker.wait().unwrap();
    for t in accepted {
        assert_eq!(t.wait(), Ok(1));
    }
    pool.shutdown().unwrap();
}

#[test]
fn requests_resolved_while_queued_give_their_room_back() {
    // Two workers; one is stuck in a session's callback. Requests queued
    // behind it time out while still queued: they must not hold capacity,
    // or unkeyed work (which the idle worker could do) gets `QueueFull`.
    let (g, gf) = gate();
    let pool = IslePool::builder()
        .workers(2)
        .queue_capacity(50)
        .build()
        .unwrap();
    let stuck = pool.session("stuck");
    let blocker = stuck.spawn_exec(move |_, _| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let behind: Vec<Task<i64>> = (0..49)
        .map(|_| {
            stuck
                .spawn_eval("return 1")
                .timeout(std::time::Duration::from_millis(5))
        })
        .collect();
    for t in behind {
        assert_eq!(
            within("a queued request times out", move || t.wait()),
            Err(IsleError::Timeout)
        );
    }
    // Cancelled ones too.
    for _ in 0..49 {
        let t = stuck.spawn_eval::<i64>("return 1");
        t.cancel();
        assert_eq!(t.wait(), Err(IsleError::Cancelled));
    }
    // Far more than the capacity, one at a time: each gets room. (New
    // sessions bind to the least loaded VM, the idle one: its load stays
    // below the stuck one's while they are few.)
    for i in 0..200i64 {
        assert_eq!(pool.eval::<i64>(format!("return {i}")), Ok(i));
    }
    for i in 0..20i64 {
        let s = pool.session(i);
        assert_eq!(
            within("a new session", move || s.eval::<i64>("return 2")),
            Ok(2)
        );
    }
    assert_eq!(pool.metrics().rejected, 0);
    g.release();
    blocker.wait().unwrap();
    pool.shutdown().unwrap();
}

#[test]
fn requests_resolved_before_they_are_queued_hold_no_room() {
    // A default limit of zero resolves each request `Timeout` before it
    // reaches a queue: none may keep a place in the queue's count, or the
    // third would be refused `QueueFull`.
    let pool = IslePool::builder()
        .workers(1)
        .queue_capacity(2)
        .default_timeout(std::time::Duration::ZERO)
        .build()
        .unwrap();
    for _ in 0..50 {
        assert_eq!(pool.eval::<i64>("return 1"), Err(IsleError::Timeout));
        assert_eq!(
            pool.session("s").eval::<i64>("return 1"),
            Err(IsleError::Timeout)
        );
    }
    assert_eq!(pool.metrics().rejected, 0);
    pool.shutdown().unwrap();
}

// ===== Waiting for room: `try_reserve`, `reserve_timeout`, `reserve` =====

/// A `blocked_pool` whose queue is full: `capacity` requests wait in it
/// (each `return i`).
fn full_pool(capacity: usize) -> (IslePool, Gate, Task<()>, Vec<Task<i64>>) {
    let (pool, g, blocker) = blocked_pool(capacity);
    let queued: Vec<Task<i64>> = (0..capacity)
        .map(|i| pool.spawn_eval(format!("return {i}")))
        .collect();
    assert!(queued.iter().all(|t| !t.is_finished()), "all admitted");
    (pool, g, blocker, queued)
}

fn waiting(pool: &IslePool, n: usize) {
    eventually(&format!("{n} callers wait for room"), || {
        pool.metrics().waiting_for_room == n
    });
}

/// Polls `f` once with a waker that does nothing.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

/// Submits exactly as many plain requests as there is room for, and
/// returns how many were admitted (the first refusal ends it).
fn fill(pool: &IslePool) -> (usize, Vec<Task<i64>>) {
    let mut admitted = Vec::new();
    loop {
        let mut t = pool.spawn_eval::<i64>("return 0");
        if t.is_finished() {
            assert_eq!(t.try_result(), Some(Err(IsleError::QueueFull)));
            return (admitted.len(), admitted);
        }
        admitted.push(t);
        assert!(admitted.len() <= 1000, "never full");
    }
}

#[test]
fn reserve_timeout_on_a_full_queue_gives_queue_full_and_submits_nothing() {
    let (pool, g, blocker, queued) = full_pool(2);
    let ran = Arc::new(AtomicUsize::new(0));
    let (p, r) = (pool.clone(), ran.clone());
    let got = within("reserve_timeout returns at its deadline", move || {
        p.reserve_timeout(Duration::from_millis(20)).map(|permit| {
            permit.spawn_exec(move |_| {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        })
    });
    assert_eq!(got.err(), Some(IsleError::QueueFull));
    let p = pool.clone();
    let got = within("reserve_deadline returns", move || {
        p.reserve_deadline(std::time::Instant::now()).map(drop)
    });
    assert_eq!(got, Err(IsleError::QueueFull));
    assert_eq!(pool.try_reserve().err(), Some(IsleError::QueueFull));
    assert_eq!(pool.metrics().waiting_for_room, 0, "the waiter left");
    g.release();
    blocker.wait().unwrap();
    for (i, t) in queued.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64));
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "nothing ran for it");
    // Nothing was submitted for the failed reserves.
    let m = pool.metrics();
    assert_eq!((m.submitted, m.rejected), (3, 0));
    pool.shutdown().unwrap();
}

#[test]
fn reserve_timeout_gets_room_once_it_frees() {
    let (pool, g, blocker, queued) = full_pool(1);
    let p = pool.clone();
    let waiter = std::thread::spawn(move || {
        let permit = p.reserve_timeout(PATIENCE)?;
        permit.eval::<i64>("return 7")
    });
    waiting(&pool, 1);
    // The worker takes the queued request: its room goes to the waiter.
    g.release();
    let got = within("the waiter gets room", move || waiter.join().unwrap());
    assert_eq!(got, Ok(7));
    blocker.wait().unwrap();
    assert_eq!(queued.into_iter().next().unwrap().wait(), Ok(0));
    assert_eq!(pool.metrics().rejected, 0);
    pool.shutdown().unwrap();
}

#[test]
fn reserve_awaited_on_tokio_gets_room_once_it_frees() {
    let (pool, g, blocker, queued) = full_pool(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let p = pool.clone();
    let waiter = rt.spawn(async move {
        let permit = p.reserve().await?;
        permit.spawn_eval::<i64>("return 8").await
    });
    waiting(&pool, 1);
    g.release();
    let got = within("the awaited reserve gets room", move || {
        rt.block_on(waiter).unwrap()
    });
    assert_eq!(got, Ok(8));
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    pool.shutdown().unwrap();
}

#[test]
fn reserve_driven_by_block_on_gets_room_once_it_frees() {
    let (pool, g, blocker, queued) = full_pool(1);
    let p = pool.clone();
    let waiter = std::thread::spawn(move || {
        futures::executor::block_on(async {
            let permit = p.reserve().await?;
            permit.spawn_eval::<i64>("return 9").await
        })
    });
    waiting(&pool, 1);
    g.release();
    let got = within("the reserve under block_on gets room", move || {
        waiter.join().unwrap()
    });
    assert_eq!(got, Ok(9));
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    pool.shutdown().unwrap();
}

#[test]
fn dropping_a_waiting_reserve_cancels_the_wait() {
    let capacity = 3;
    let (pool, g, blocker, mut queued) = full_pool(capacity);
    let mut wait = pool.reserve();
    assert!(poll_once(&mut wait).is_pending());
    assert_eq!(pool.metrics().waiting_for_room, 1);
    drop(wait);
    assert_eq!(pool.metrics().waiting_for_room, 0, "the wait is gone");
    // One request resolved while queued frees one room, which nobody is
    // owed: exactly one plain submit gets it.
    let t = queued.pop().unwrap();
    t.cancel();
    assert_eq!(t.wait(), Err(IsleError::Cancelled));
    let (admitted, more) = fill(&pool);
    assert_eq!(admitted, 1);
    g.release();
    blocker.wait().unwrap();
    for t in queued.into_iter().chain(more) {
        t.wait().unwrap();
    }
    pool.shutdown().unwrap();
}

#[test]
fn a_reserve_dropped_after_it_was_handed_room_gives_it_back() {
    let capacity = 3;
    let (pool, g, blocker, mut queued) = full_pool(capacity);
    let mut wait = pool.reserve();
    assert!(poll_once(&mut wait).is_pending());
    // Room freed now goes to the waiter (first in line), not to a plain
    // submit...
    let t = queued.pop().unwrap();
    t.cancel();
    assert_eq!(t.wait(), Err(IsleError::Cancelled));
    assert_eq!(pool.metrics().waiting_for_room, 0, "handed room");
    let mut refused = pool.spawn_eval::<i64>("return 0");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    // ...and comes back when the waiter, never polled again, is dropped.
    drop(wait);
    let (admitted, more) = fill(&pool);
    assert_eq!(admitted, 1);
    g.release();
    blocker.wait().unwrap();
    for t in queued.into_iter().chain(more) {
        t.wait().unwrap();
    }
    pool.shutdown().unwrap();
}

#[test]
fn a_dropped_permit_gives_its_room_back() {
    let (pool, g, blocker) = blocked_pool(2);
    let permits = [pool.try_reserve().unwrap(), pool.try_reserve().unwrap()];
    assert_eq!(fill(&pool).0, 0, "permits hold the room");
    assert_eq!(pool.try_reserve().err(), Some(IsleError::QueueFull));
    drop(permits);
    let (admitted, tasks) = fill(&pool);
    assert_eq!(admitted, 2);
    g.release();
    blocker.wait().unwrap();
    tasks.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    pool.shutdown().unwrap();
}

#[test]
fn shutdown_resolves_every_waiter() {
    let (pool, g, blocker, queued) = full_pool(1);
    let p = pool.clone();
    let blocking = std::thread::spawn(move || p.reserve_timeout(PATIENCE).map(drop));
    let p = pool.clone();
    let awaiting =
        std::thread::spawn(move || futures::executor::block_on(p.session("s").reserve()).map(drop));
    waiting(&pool, 2);
    // Shutdown waits for the blocked worker; the waiters do not.
    let p = pool.clone();
    let shutdown = std::thread::spawn(move || p.shutdown());
    let got = within("waiters resolve at shutdown", move || {
        (blocking.join().unwrap(), awaiting.join().unwrap())
    });
    assert_eq!(got, (Err(IsleError::Shutdown), Err(IsleError::Shutdown)));
    // Later ones are refused at once.
    assert_eq!(
        futures::executor::block_on(pool.reserve()).err(),
        Some(IsleError::Shutdown)
    );
    assert_eq!(
        pool.reserve_timeout(PATIENCE).err(),
        Some(IsleError::Shutdown)
    );
    g.release();
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    within("shutdown ends", move || shutdown.join().unwrap()).unwrap();
}

#[test]
fn many_waiters_each_get_room_once() {
    let capacity = 2;
    let (threads, futures_) = (12, 6);
    let (pool, g, blocker) = blocked_pool(capacity);
    let queued: Vec<Task<()>> = (0..capacity)
        .map(|_| pool.spawn_eval("runs = (runs or 0) + 1"))
        .collect();
    let mut waiters = Vec::new();
    for _ in 0..threads {
        let p = pool.clone();
        waiters.push(std::thread::spawn(move || {
            p.reserve_timeout(PATIENCE)?
                .eval::<()>("runs = (runs or 0) + 1")
        }));
    }
    for _ in 0..futures_ {
        let p = pool.clone();
        waiters.push(std::thread::spawn(move || {
            futures::executor::block_on(async {
                p.reserve()
                    .await?
                    .spawn_eval::<()>("runs = (runs or 0) + 1")
                    .await
            })
        }));
    }
    waiting(&pool, threads + futures_);
    g.release();
    let results = within("every waiter gets room", move || {
        waiters
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| t.wait().unwrap());
    let runs: i64 = pool.eval("return runs").unwrap();
    assert_eq!(runs as usize, capacity + threads + futures_);
    let m = pool.metrics();
    assert_eq!(m.rejected, 0);
    assert_eq!(m.waiting_for_room, 0);
    // All room is free again (permits, unlike requests, do not drain).
    let permits: Vec<_> = std::iter::from_fn(|| pool.try_reserve().ok())
        .take(100)
        .collect();
    assert_eq!(permits.len(), capacity, "all room given back");
    drop(permits);
    pool.shutdown().unwrap();
}

#[test]
fn a_session_permit_runs_in_the_session() {
    let (pool, g, blocker) = blocked_pool(1);
    let s = pool.session("tenant");
    let queued = s.spawn_eval::<()>("x = 1");
    let s2 = s.clone();
    let waiter = std::thread::spawn(move || {
        let permit = s2.reserve_timeout(PATIENCE)?;
        assert_eq!(permit.target().key(), s2.key());
        permit.exec(|_, env| {
            let x: i64 = env.get("x")?;
            env.set("x", x + 1)
        })
    });
    waiting(&pool, 1);
    g.release();
    assert_eq!(
        within("the permit runs", move || waiter.join().unwrap()),
        Ok(())
    );
    blocker.wait().unwrap();
    queued.wait().unwrap();
    assert_eq!(s.eval::<i64>("x"), Ok(2));
    assert_eq!(
        pool.eval::<Option<i64>>("x"),
        Ok(None),
        "not a shared global"
    );
    let permit = s.try_reserve().unwrap();
    assert_eq!(permit.spawn_eval::<i64>("x * 10").wait(), Ok(20));
    pool.shutdown().unwrap();
}

#[test]
fn without_a_capacity_reserving_never_waits() {
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    let permits: Vec<_> = (0..100).map(|_| pool.try_reserve().unwrap()).collect();
    let p = pool.clone();
    let permit = within("no wait", move || p.reserve_timeout(Duration::ZERO)).unwrap();
    assert_eq!(permit.eval::<i64>("1 + 1"), Ok(2));
    let mut wait = pool.session(1).reserve();
    match poll_once(&mut wait) {
        Poll::Ready(Ok(permit)) => assert_eq!(permit.eval::<i64>("3"), Ok(3)),
        other => panic!("{other:?}"),
    }
    drop(permits);
    pool.shutdown().unwrap();
}

#[test]
fn reserving_with_a_wait_on_a_vm_thread_of_the_pool_is_reentrant() {
    let pool = IslePool::builder()
        .workers(1)
        .queue_capacity(1)
        .build()
        .unwrap();
    let p = pool.clone();
    let got = pool
        .exec(move |_| Ok(p.reserve_timeout(PATIENCE).err()))
        .unwrap();
    assert_eq!(got, Some(IsleError::Reentrant));
    // Without a wait it is fine.
    let p = pool.clone();
    let got = pool
        .exec(move |_| Ok(p.try_reserve().map(|p| p.spawn_eval::<i64>("1").detach())))
        .unwrap();
    assert_eq!(got, Ok(()));
    pool.shutdown().unwrap();
}

#[test]
fn a_zero_capacity_is_refused_at_build() {
    let err = IslePool::builder()
        .workers(1)
        .queue_capacity(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, IsleError::Init(m) if m.contains("queue_capacity")),
        "{err}"
    );
}

/// Callers waiting for room in a session's own queue when the session is
/// closed (its room held by a permit of the old session) are refused
/// `Shutdown` when the pool shuts down, blocking and async alike: the
/// session is gone from the table shutdown walks, but its room is kept
/// while anyone waits in it.
#[test]
fn shutdown_refuses_callers_waiting_in_a_closed_sessions_room() {
    let pool = IslePool::builder()
        .workers(1)
        .session_queue_capacity(1)
        .build()
        .unwrap();
    let s = pool.session("tenant");
    let permit = s.try_reserve().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(2);
    {
        let (s, tx) = (s.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(s.reserve_timeout(Duration::MAX).map(drop));
        });
    }
    {
        let s = s.clone();
        std::thread::spawn(move || {
            let _ = tx.send(futures::executor::block_on(s.reserve()).map(drop));
        });
    }
    eventually("two waiters", || {
        s.metrics().is_some_and(|m| m.waiting_for_room == 2)
    });
    assert!(s.close());
    within("shutdown", {
        let pool = pool.clone();
        move || pool.shutdown().unwrap()
    });
    let woken: Vec<_> = (0..2)
        .map_while(|_| rx.recv_timeout(PATIENCE).ok())
        .collect();
    // Let any still waiting go before failing.
    drop(permit);
    assert_eq!(woken, [Err(IsleError::Shutdown), Err(IsleError::Shutdown)]);
}
