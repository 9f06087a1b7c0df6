//! `queue_capacity` on an `Isle`: a request past it resolves `QueueFull` at
//! once; `try_reserve`, `reserve_timeout` and `reserve` take room ahead of
//! a request, waiting for it, as on a pool.

use crate::common;

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{eventually, gate, within, Gate, PATIENCE};
use mlua_isle::{Isle, IsleError, Task};

/// An isle with room for `capacity` queued requests, its VM blocked in a
/// callback until the gate is released, and `capacity` requests (each
/// `return i`) filling its queue.
fn full_isle(capacity: usize) -> (Isle, Gate, Task<()>, Vec<Task<i64>>) {
    let isle = Isle::builder().queue_capacity(capacity).build().unwrap();
    let (g, gf) = gate();
    let blocker = isle.spawn_exec(move |_| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let queued: Vec<Task<i64>> = (0..capacity)
        .map(|i| isle.spawn_eval(format!("return {i}")))
        .collect();
    assert!(queued.iter().all(|t| !t.is_finished()), "all admitted");
    (isle, g, blocker, queued)
}

fn waiting(isle: &Isle, n: usize) {
    eventually(&format!("{n} callers wait for room"), || {
        isle.waiting_for_room() == n
    });
}

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

fn finish(isle: Isle, g: Gate, blocker: Task<()>, queued: Vec<Task<i64>>) {
    g.release();
    blocker.wait().unwrap();
    for (i, t) in queued.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64));
    }
    isle.shutdown().unwrap();
}

#[test]
fn a_request_past_the_capacity_resolves_queue_full_at_once() {
    let (isle, g, blocker, queued) = full_isle(3);
    let mut refused = isle.spawn_eval::<i64>("return 99");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    let i = isle.clone();
    let got = within("a blocking call on a full isle returns", move || {
        i.eval::<i64>("return 99")
    });
    assert_eq!(got, Err(IsleError::QueueFull));
    finish(isle, g, blocker, queued);
}

#[test]
fn requests_resolved_while_queued_give_their_room_back() {
    let (isle, g, blocker, mut queued) = full_isle(2);
    let t = queued.pop().unwrap();
    t.cancel();
    assert_eq!(t.wait(), Err(IsleError::Cancelled));
    let again = isle.spawn_eval::<i64>("return 1");
    assert!(!again.is_finished(), "the cancelled one's room is free");
    let mut refused = isle.spawn_eval::<i64>("return 99");
    assert_eq!(refused.try_result(), Some(Err(IsleError::QueueFull)));
    finish(isle, g, blocker, queued);
    assert_eq!(again.wait(), Ok(1));
}

#[test]
fn reserve_timeout_gives_queue_full_at_its_deadline_and_room_once_it_frees() {
    let (isle, g, blocker, queued) = full_isle(1);
    let i = isle.clone();
    let got = within("reserve_timeout returns at its deadline", move || {
        i.reserve_timeout(Duration::from_millis(20))
            .map(|p| p.spawn_eval::<()>("ran = true").detach())
    });
    assert_eq!(got, Err(IsleError::QueueFull));
    let i = isle.clone();
    let waiter = std::thread::spawn(move || i.reserve_timeout(PATIENCE)?.eval::<i64>("return 7"));
    waiting(&isle, 1);
    g.release();
    assert_eq!(
        within("the waiter gets room", move || waiter.join().unwrap()),
        Ok(7)
    );
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    assert_eq!(
        isle.eval::<Option<bool>>("ran"),
        Ok(None),
        "the timed-out one never ran"
    );
    isle.shutdown().unwrap();
}

#[test]
fn reserve_awaited_on_tokio_gets_room_once_it_frees() {
    let (isle, g, blocker, queued) = full_isle(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let i = isle.clone();
    let waiter = std::thread::spawn(move || {
        rt.block_on(async move { i.reserve().await?.spawn_eval::<i64>("return 8").await })
    });
    waiting(&isle, 1);
    g.release();
    assert_eq!(
        within("the awaited reserve gets room", move || waiter
            .join()
            .unwrap()),
        Ok(8)
    );
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    isle.shutdown().unwrap();
}

#[test]
fn a_dropped_reserve_gives_up_its_wait_and_any_room_it_was_handed() {
    let (isle, g, blocker, mut queued) = full_isle(3);
    // Dropped while waiting.
    let mut wait = isle.reserve();
    assert!(poll_once(&mut wait).is_pending());
    assert_eq!(isle.waiting_for_room(), 1);
    drop(wait);
    assert_eq!(isle.waiting_for_room(), 0);
    // Dropped after room was handed to it.
    let mut wait = isle.reserve();
    assert!(poll_once(&mut wait).is_pending());
    let t = queued.pop().unwrap();
    t.cancel();
    assert_eq!(t.wait(), Err(IsleError::Cancelled));
    assert_eq!(isle.waiting_for_room(), 0, "handed room");
    assert_eq!(isle.try_reserve().err(), Some(IsleError::QueueFull));
    drop(wait);
    // Exactly the one room is free again.
    let permit = isle.try_reserve().expect("the room came back");
    assert_eq!(isle.try_reserve().err(), Some(IsleError::QueueFull));
    let last = permit.spawn_eval::<i64>("return 2");
    queued.push(last);
    finish(isle, g, blocker, queued);
}

#[test]
fn shutdown_resolves_every_waiter() {
    let (isle, g, blocker, queued) = full_isle(1);
    let i = isle.clone();
    let blocking = std::thread::spawn(move || i.reserve_timeout(PATIENCE).map(drop));
    let i = isle.clone();
    let awaiting = std::thread::spawn(move || futures::executor::block_on(i.reserve()).map(drop));
    waiting(&isle, 2);
    let i = isle.clone();
    let shutdown = std::thread::spawn(move || i.shutdown());
    let got = within("waiters resolve at shutdown", move || {
        (blocking.join().unwrap(), awaiting.join().unwrap())
    });
    assert_eq!(got, (Err(IsleError::Shutdown), Err(IsleError::Shutdown)));
    assert_eq!(isle.try_reserve().err(), Some(IsleError::Shutdown));
    g.release();
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert_eq!(t.wait(), Ok(0)));
    within("shutdown ends", move || shutdown.join().unwrap()).unwrap();
}

#[test]
fn many_waiters_each_get_room_once() {
    let capacity = 2;
    let waiters = 12;
    let (isle, g, blocker, queued) = full_isle(capacity);
    let handles: Vec<_> = (0..waiters)
        .map(|k| {
            let i = isle.clone();
            std::thread::spawn(move || {
                if k % 2 == 0 {
                    i.reserve_timeout(PATIENCE)?
                        .eval::<()>("runs = (runs or 0) + 1")
                } else {
                    futures::executor::block_on(async {
                        i.reserve()
                            .await?
                            .spawn_eval::<()>("runs = (runs or 0) + 1")
                            .await
                    })
                }
            })
        })
        .collect();
    waiting(&isle, waiters);
    g.release();
    let results = within("every waiter gets room", move || {
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    blocker.wait().unwrap();
    queued.into_iter().for_each(|t| assert!(t.wait().is_ok()));
    assert_eq!(isle.eval::<i64>("runs"), Ok(waiters as i64));
    assert_eq!(isle.waiting_for_room(), 0);
    let permits: Vec<_> = (0..capacity).map(|_| isle.try_reserve().unwrap()).collect();
    assert_eq!(
        isle.try_reserve().err(),
        Some(IsleError::QueueFull),
        "all room given back"
    );
    drop(permits);
    isle.shutdown().unwrap();
}

#[test]
fn reserving_with_a_wait_on_the_isles_own_thread_is_reentrant() {
    let isle = Isle::builder().queue_capacity(1).build().unwrap();
    let i = isle.clone();
    let got = isle
        .exec(move |_| Ok(i.reserve_timeout(PATIENCE).err()))
        .unwrap();
    assert_eq!(got, Some(IsleError::Reentrant));
    isle.shutdown().unwrap();
}

#[test]
fn without_a_capacity_reserving_never_waits() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let permits: Vec<_> = (0..100).map(|_| isle.try_reserve().unwrap()).collect();
    assert_eq!(
        isle.reserve_timeout(Duration::ZERO)
            .unwrap()
            .eval::<i64>("1 + 1"),
        Ok(2)
    );
    assert_eq!(isle.waiting_for_room(), 0);
    drop(permits);
    isle.shutdown().unwrap();
}

#[test]
fn a_zero_capacity_is_refused_at_build() {
    let err = Isle::builder().queue_capacity(0).build().unwrap_err();
    assert!(
        matches!(&err, IsleError::Init(m) if m.contains("queue_capacity")),
        "{err}"
    );
}
