//! `Task<T>`: waiting, polling, detaching, dropping, and awaiting.

mod common;

use std::time::{Duration, Instant};

use common::{expect_msg, gate, register_signal, releasable_isle, within, Gate, UNTIL_RELEASED};
use mlua_isle::{CancelToken, Isle, IsleError, Task};

/// An isle with `block()` (a Rust callback held by the returned gate).
fn gated_isle() -> (Isle, Gate) {
    let (gate, block) = gate();
    let isle = Isle::spawn(move |lua| block.register(lua, "block")).unwrap();
    (isle, gate)
}

#[test]
fn wait_returns_the_result() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    assert_eq!(isle.spawn_eval::<i64>("6 * 7").wait(), Ok(42));
    assert_eq!(
        isle.spawn_exec(|_| Ok("from exec".to_string())).wait(),
        Ok("from exec".to_string())
    );
}

#[test]
fn wait_timeout_is_none_while_blocked_then_some() {
    let (isle, gate) = gated_isle();
    let mut task = isle.spawn_eval::<i64>("block(); return 7");
    gate.wait_started();
    assert!(task.wait_timeout(Duration::from_millis(20)).is_none());
    assert!(task
        .wait_deadline(Instant::now() + Duration::from_millis(20))
        .is_none());
    assert!(!task.is_finished(), "a None wait must leave it running");
    gate.release();
    assert_eq!(task.wait_timeout(common::PATIENCE), Some(Ok(7)));
}

#[test]
fn try_result_is_none_until_resolved_then_some() {
    let (isle, gate) = gated_isle();
    let mut task = isle.spawn_eval::<i64>("block(); return 8");
    gate.wait_started();
    assert_eq!(task.try_result(), None);
    assert!(!task.is_finished());
    gate.release();
    // Requests run in order: once this returns, `task` has resolved.
    assert_eq!(isle.eval::<i64>("0"), Ok(0));
    assert!(task.is_finished());
    assert_eq!(task.try_result(), Some(Ok(8)));
}

#[test]
fn is_finished_tracks_resolution() {
    let (isle, gate) = gated_isle();
    let blocker = isle.spawn_eval::<()>("block()");
    let queued = isle.spawn_eval::<i64>("1");
    gate.wait_started();
    assert!(!blocker.is_finished());
    assert!(!queued.is_finished());
    gate.release();
    assert_eq!(isle.eval::<i64>("0"), Ok(0));
    assert!(blocker.is_finished());
    assert!(queued.is_finished());
    assert_eq!(blocker.wait(), Ok(()));
    assert_eq!(queued.wait(), Ok(1));
}

#[test]
fn is_finished_stays_true_after_the_result_is_taken() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let mut task = isle.spawn_eval::<i64>("5");
    assert_eq!(task.wait_timeout(common::PATIENCE), Some(Ok(5)));
    assert!(task.is_finished());
}

#[test]
fn the_result_is_handed_out_once_and_asking_again_gives_none() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let mut task = isle.spawn_eval::<i64>("5");
    assert_eq!(task.wait_timeout(common::PATIENCE), Some(Ok(5)));
    assert_eq!(task.try_result(), None);
    assert_eq!(task.wait_timeout(common::PATIENCE), None);
    assert!(task.is_finished());
    let mut task = isle.spawn_eval::<i64>("6");
    assert_eq!(isle.eval::<i64>("0"), Ok(0)); // in order: `task` has resolved
    assert_eq!(task.try_result(), Some(Ok(6)));
    assert_eq!(task.try_result(), None);
}

#[test]
fn detached_task_runs_to_the_end() {
    let (isle, gate) = gated_isle();
    let blocker = isle.spawn_eval::<()>("block()");
    gate.wait_started();
    // Still queued (the blocker holds the VM) when it is detached.
    let task = isle.spawn_eval::<()>("detached_ran = true");
    assert!(!task.is_finished());
    task.detach();
    gate.release();
    assert_eq!(blocker.wait(), Ok(()));
    assert_eq!(isle.eval::<bool>("detached_ran == true"), Ok(true));
}

#[test]
fn detached_running_task_is_not_cancelled() {
    // A cancel (which detach must not send) would stop it before
    // `finished = true` (see `UNTIL_RELEASED`).
    let (isle, flag, started) = releasable_isle();
    isle.spawn_eval::<()>(UNTIL_RELEASED).detach();
    expect_msg(&started, "the detached request started");
    flag.raise();
    assert_eq!(isle.eval::<bool>("finished == true"), Ok(true));
}

#[test]
fn dropping_a_queued_task_cancels_it() {
    let (isle, gate) = gated_isle();
    let blocker = isle.spawn_eval::<()>("block()");
    gate.wait_started();
    drop(isle.spawn_eval::<()>("dropped_ran = true"));
    gate.release();
    assert_eq!(blocker.wait(), Ok(()));
    assert_eq!(isle.eval::<bool>("dropped_ran == nil"), Ok(true));
}

#[test]
fn dropping_a_running_task_cancels_it() {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| register_signal(lua, "started", started_tx)).unwrap();
    let task = isle.spawn_eval::<()>("started(); while true do end");
    expect_msg(&started, "the request started");
    drop(task);
    // Queued behind an endless loop: it runs only if the drop stopped it.
    let next = isle.spawn_eval::<i64>("1 + 1");
    assert_eq!(
        within("the request after a dropped loop", move || next.wait()),
        Ok(2)
    );
}

#[test]
fn dropping_a_running_task_prevents_its_side_effects() {
    // The drop's cancel stops it before `finished = true` (see
    // `UNTIL_RELEASED`).
    let (isle, flag, started) = releasable_isle();
    let task = isle.spawn_eval::<()>(UNTIL_RELEASED);
    expect_msg(&started, "the request started");
    drop(task);
    flag.raise();
    assert_eq!(isle.eval::<bool>("finished == nil"), Ok(true));
}

#[test]
fn dropping_a_finished_task_changes_nothing() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<()>("done = 1");
    assert_eq!(isle.eval::<i64>("done"), Ok(1));
    drop(task);
    assert_eq!(isle.eval::<i64>("done"), Ok(1));
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
    let r = tokio::time::timeout(common::PATIENCE, task)
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
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<i64>("2 + 3");
    assert_eq!(futures::executor::block_on(task), Ok(5));
    let task = isle.spawn_call::<()>("no_such_function", ());
    assert_eq!(
        futures::executor::block_on(task),
        Err(IsleError::NotFound("no_such_function".to_string()))
    );
    let r = futures::executor::block_on(async { isle.spawn_eval::<i64>("40 + 2").await });
    assert_eq!(r, Ok(42));
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
