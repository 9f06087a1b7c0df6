//! `queue_capacity`: a request past the capacity resolves `QueueFull` at
//! once, without blocking the caller; accepted requests still run; the space
//! comes back as the queue drains.

mod common;

use common::{gate, within, Gate};
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
