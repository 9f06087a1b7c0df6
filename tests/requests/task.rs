//! `Task<T>`: waiting, polling, detaching, dropping, and awaiting.

use crate::common;

use std::time::{Duration, Instant};

use common::front::{each_kind, fronts, Fronts};
use common::{
    expect_msg, gate, register_signal, releasable_front, within, Gate, PATIENCE, UNTIL_RELEASED,
};
use mlua_isle::{CancelToken, Isle, IsleError, Task};

/// An isle with `block()` (a Rust callback held by the returned gate).
fn gated_isle() -> (Isle, Gate) {
    let (gate, block) = gate();
    let isle = Isle::spawn(move |lua| block.register(lua, "block")).unwrap();
    (isle, gate)
}

/// Fronts with `block()` (a Rust callback held by the returned gate).
fn gated_fronts() -> (Fronts, Gate) {
    let (gate, block) = gate();
    let fronts = fronts().init(move |lua| block.clone().register(lua, "block"));
    (fronts, gate)
}

#[test]
fn wait_returns_the_result() {
    fronts().each(|front| {
        assert_eq!(front.spawn_eval::<i64>("6 * 7").wait(), Ok(42), "{front}");
        assert_eq!(
            front.spawn_call::<i64>("select", (2, 1, 9)).wait(),
            Ok(9),
            "{front}"
        );
        assert_eq!(
            front.spawn_exec(|_| Ok("from exec".to_string())).wait(),
            Ok("from exec".to_string()),
            "{front}"
        );
    });
}

#[test]
fn wait_timeout_is_none_while_blocked_then_some() {
    let (fronts, gate) = gated_fronts();
    fronts.each(|front| {
        let mut task = front.spawn_eval::<i64>("block(); return 7");
        gate.wait_started();
        assert!(task.wait_timeout(Duration::from_millis(20)).is_none());
        assert!(task
            .wait_deadline(Instant::now() + Duration::from_millis(20))
            .is_none());
        assert!(!task.is_finished(), "a None wait must leave it running");
        gate.release();
        assert_eq!(task.wait_timeout(PATIENCE), Some(Ok(7)), "{front}");
    });
}

#[test]
fn try_result_is_none_until_resolved_then_some() {
    let (fronts, gate) = gated_fronts();
    fronts.each(|front| {
        let mut task = front.spawn_eval::<i64>("block(); return 8");
        gate.wait_started();
        assert_eq!(task.try_result(), None);
        assert!(!task.is_finished());
        gate.release();
        // Requests run in order: once this returns, `task` has resolved.
        assert_eq!(front.eval::<i64>("0"), Ok(0));
        assert!(task.is_finished());
        assert_eq!(task.try_result(), Some(Ok(8)), "{front}");
    });
}

#[test]
fn is_finished_tracks_resolution() {
    let (fronts, gate) = gated_fronts();
    fronts.each(|front| {
        let blocker = front.spawn_eval::<()>("block()");
        let queued = front.spawn_eval::<i64>("1");
        gate.wait_started();
        assert!(!blocker.is_finished());
        assert!(!queued.is_finished());
        gate.release();
        assert_eq!(front.eval::<i64>("0"), Ok(0));
        assert!(blocker.is_finished(), "{front}");
        assert!(queued.is_finished(), "{front}");
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(queued.wait(), Ok(1));
    });
}

#[test]
fn is_finished_stays_true_after_the_result_is_taken() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let mut task = isle.spawn_eval::<i64>("5");
    assert_eq!(task.wait_timeout(PATIENCE), Some(Ok(5)));
    assert!(task.is_finished());
}

#[test]
fn the_result_is_handed_out_once_and_asking_again_gives_none() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let mut task = isle.spawn_eval::<i64>("5");
    assert_eq!(task.wait_timeout(PATIENCE), Some(Ok(5)));
    assert_eq!(task.try_result(), None);
    assert_eq!(task.wait_timeout(PATIENCE), None);
    assert!(task.is_finished());
    let mut task = isle.spawn_eval::<i64>("6");
    assert_eq!(isle.eval::<i64>("0"), Ok(0)); // in order: `task` has resolved
    assert_eq!(task.try_result(), Some(Ok(6)));
    assert_eq!(task.try_result(), None);
}

#[test]
fn detached_task_runs_to_the_end() {
    let (fronts, gate) = gated_fronts();
    fronts.each(|front| {
        let blocker = front.spawn_eval::<()>("block()");
        gate.wait_started();
        // Still queued (the blocker holds the VM) when it is detached.
        let task = front.spawn_eval::<()>("detached_ran = true");
        assert!(!task.is_finished());
        task.detach();
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(
            front.eval::<bool>("detached_ran == true"),
            Ok(true),
            "{front}"
        );
    });
}

#[test]
fn detached_running_task_is_not_cancelled() {
    // A cancel (which detach must not send) would stop it before
    // `finished = true` (see `UNTIL_RELEASED`).
    each_kind(|kind| {
        let (front, flag, started) = releasable_front(kind);
        front.spawn_eval::<()>(UNTIL_RELEASED).detach();
        expect_msg(&started, "the detached request started");
        flag.raise();
        assert_eq!(front.eval::<bool>("finished == true"), Ok(true), "{front}");
    });
}

#[test]
fn dropping_a_queued_task_cancels_it() {
    let (fronts, gate) = gated_fronts();
    fronts.each(|front| {
        let blocker = front.spawn_eval::<()>("block()");
        gate.wait_started();
        drop(front.spawn_eval::<()>("dropped_ran = true"));
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(
            front.eval::<bool>("dropped_ran == nil"),
            Ok(true),
            "{front}"
        );
    });
}

#[test]
fn dropping_a_running_task_cancels_it() {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let fronts = fronts().init(move |lua| register_signal(lua, "started", started_tx.clone()));
    fronts.each(|front| {
        front.eval::<()>("kept = 'yes'").unwrap();
        let task = front.spawn_eval::<()>("started(); while true do end");
        expect_msg(&started, "the request started");
        drop(task);
        // Queued behind an endless loop on the same VM: it runs only if the
        // drop stopped the loop.
        let next = front.spawn_eval::<String>("kept");
        assert_eq!(
            within("the request after a dropped loop", move || next.wait()),
            Ok("yes".to_string()),
            "{front}"
        );
    });
}

#[test]
fn dropping_a_running_task_prevents_its_side_effects() {
    // The drop's cancel stops it before `finished = true` (see
    // `UNTIL_RELEASED`).
    each_kind(|kind| {
        let (front, flag, started) = releasable_front(kind);
        let task = front.spawn_eval::<()>(UNTIL_RELEASED);
        expect_msg(&started, "the request started");
        drop(task);
        flag.raise();
        assert_eq!(front.eval::<bool>("finished == nil"), Ok(true), "{front}");
    });
}

#[test]
fn dropping_a_finished_task_changes_nothing() {
    fronts().each(|front| {
        let task = front.spawn_eval::<()>("done = 1");
        assert_eq!(front.eval::<i64>("done"), Ok(1));
        drop(task);
        assert_eq!(front.eval::<i64>("done"), Ok(1), "{front}");
    });
}

#[test]
fn task_and_cancel_token_are_send() {
    fn assert_send<T: Send + 'static>() {}
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send::<Task<i64>>();
    assert_send::<Task<String>>();
    assert_send::<Task<()>>();
    assert_send_sync::<CancelToken>();

    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<i64>("9");
    let r = std::thread::spawn(move || task.wait()).join().unwrap();
    assert_eq!(r, Ok(9));
}

// ===== Future =====

#[tokio::test]
async fn await_under_tokio_current_thread() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    assert_eq!(isle.spawn_eval::<i64>("1 + 1").await, Ok(2));
    assert_eq!(isle.spawn_exec(|_| Ok(3u8)).await, Ok(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_under_tokio_multi_thread_while_blocked() {
    let (isle, gate) = gated_isle();
    let task = isle.spawn_eval::<i64>("block(); return 11");
    // The task is pending until the gate opens on another thread: the waker
    // must be called for this to finish.
    let opener = std::thread::spawn(move || {
        gate.wait_started();
        gate.release();
    });
    let r = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the task's waker was never called");
    assert_eq!(r, Ok(11));
    opener.join().unwrap();
}

#[test]
fn await_under_a_built_tokio_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<String>("'async ' .. 'ok'");
    assert_eq!(rt.block_on(task), Ok("async ok".to_string()));
}

#[test]
fn await_under_futures_block_on() {
    fronts().each(|front| {
        let task = front.spawn_eval::<i64>("2 + 3");
        assert_eq!(futures::executor::block_on(task), Ok(5), "{front}");
        let task = front.spawn_call::<()>("no_such_function", ());
        assert_eq!(
            futures::executor::block_on(task),
            Err(IsleError::NotFound("no_such_function".to_string())),
            "{front}"
        );
        let r = futures::executor::block_on(async { front.spawn_eval::<i64>("40 + 2").await });
        assert_eq!(r, Ok(42), "{front}");
    });
}

#[test]
fn await_a_task_cancelled_before_the_await() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<()>("while true do end");
    task.cancel();
    assert_eq!(futures::executor::block_on(task), Err(IsleError::Cancelled));
    assert_eq!(isle.eval::<i64>("1"), Ok(1));
}

#[test]
fn await_a_running_task_cancelled_from_another_thread() {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| register_signal(lua, "started", started_tx)).unwrap();
    let task = isle.spawn_eval::<()>("started(); while true do end");
    let token = task.cancel_token().clone();
    let canceller = std::thread::spawn(move || {
        expect_msg(&started, "the request started");
        token.cancel();
    });
    let r = within("awaiting a cancelled running task", move || {
        futures::executor::block_on(task)
    });
    assert_eq!(r, Err(IsleError::Cancelled));
    canceller.join().unwrap();
}

#[test]
fn await_a_queued_task_cancelled_from_another_thread() {
    let (isle, gate) = gated_isle();
    let blocker = isle.spawn_eval::<()>("block()");
    let queued = isle.spawn_eval::<i64>("1");
    let token = queued.cancel_token().clone();
    let canceller = std::thread::spawn(move || {
        gate.wait_started();
        token.cancel();
        gate
    });
    // Resolved by the cancelling thread, while the VM is still blocked.
    let r = within("awaiting a cancelled queued task", move || {
        futures::executor::block_on(queued)
    });
    assert_eq!(r, Err(IsleError::Cancelled));
    let gate = canceller.join().unwrap();
    assert!(!blocker.is_finished());
    gate.release();
    assert_eq!(blocker.wait(), Ok(()));
}

#[test]
fn join_all_of_many_tasks() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let tasks: Vec<Task<i64>> = (0..200)
        .map(|i| isle.spawn_eval::<i64>(format!("{i} * 2")))
        .collect();
    let results = futures::executor::block_on(futures::future::join_all(tasks));
    let expected: Vec<Result<i64, IsleError>> = (0..200).map(|i| Ok(i * 2)).collect();
    assert_eq!(results, expected);
}

#[tokio::test]
async fn join_all_under_tokio_with_some_cancelled() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let tasks: Vec<Task<i64>> = (0..50)
        .map(|i| {
            let task = if i % 5 == 0 {
                isle.spawn_eval::<i64>("while true do end")
            } else {
                isle.spawn_eval::<i64>(format!("return {i}"))
            };
            if i % 5 == 0 {
                task.cancel();
            }
            task
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    for (i, r) in results.into_iter().enumerate() {
        if i % 5 == 0 {
            assert_eq!(r, Err(IsleError::Cancelled), "task {i}");
        } else {
            assert_eq!(r, Ok(i as i64), "task {i}");
        }
    }
}

#[test]
fn a_task_polled_again_after_its_result_panics() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let mut task = isle.spawn_eval::<i64>("1");
    assert_eq!(futures::executor::block_on(&mut task), Ok(1));
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        futures::executor::block_on(&mut task)
    }));
    assert!(again.is_err(), "a second poll returned {again:?}");
    assert_eq!(task.try_result(), None);
}

struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("dropped a value that panics on drop");
    }
}

#[test]
fn a_result_nobody_takes_may_panic_when_dropped_on_the_callers_side() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let dropped = isle.spawn_exec(|_| Ok(PanicsOnDrop));
    let detached = isle.spawn_exec(|_| Ok(PanicsOnDrop));
    // In order: both results are in their tasks before these are let go.
    assert_eq!(isle.eval::<i64>("1"), Ok(1));
    assert!(dropped.is_finished() && detached.is_finished());
    drop(dropped);
    detached.detach();
    assert_eq!(isle.eval::<i64>("2"), Ok(2));
}
