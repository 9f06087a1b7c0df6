//! Time limits: a cancel triggered by a clock, resolving `Timeout`, counted
//! from submission.
//!
//! Timing checks are upper bounds only, and generous: a slow machine may
//! take longer than the limit, never much longer than `PATIENCE`.

mod common;

use std::time::{Duration, Instant};

use common::{expect_msg, gate, register_signal, within, PATIENCE};
use mlua_isle::{Isle, IsleError};

#[test]
fn timeout_stops_an_infinite_loop_with_timeout_not_cancelled() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let began = Instant::now();
    let task = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(50));
    assert_eq!(
        within("a timed-out loop resolves", move || task.wait()),
        Err(IsleError::Timeout)
    );
    assert!(began.elapsed() < PATIENCE);
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn timeout_stops_a_running_loop_inside_pcall() {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| register_signal(lua, "started", started_tx)).unwrap();
    let submitted = Instant::now();
    let task =
        isle.spawn_eval::<()>("started(); pcall(function() while true do end end); escaped = true");
    expect_msg(&started, "the request started");
    // 30 ms from now: the loop inside `pcall` is running by then.
    let task = task.timeout(submitted.elapsed() + Duration::from_millis(30));
    assert_eq!(
        within("a timed-out pcall loop resolves", move || task.wait()),
        Err(IsleError::Timeout)
    );
    assert_eq!(isle.eval::<bool>("escaped == nil"), Ok(true));
}

#[test]
fn timeout_leaves_a_fast_request_alone() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle
        .spawn_eval::<i64>("return 6 * 7")
        .timeout(Duration::from_secs(60));
    assert_eq!(task.wait(), Ok(42));
}

#[test]
fn timed_out_token_reports_cancelled() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(20));
    let token = task.cancel_token().clone();
    assert_eq!(task.wait(), Err(IsleError::Timeout));
    assert!(
        token.is_cancelled(),
        "a timed-out request was asked to stop"
    );
}

#[test]
fn default_timeout_applies_to_every_request() {
    let isle = Isle::builder()
        .default_timeout(Duration::from_millis(500))
        .spawn(|lua| lua.load("function spin() while true do end end").exec())
        .unwrap();
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    assert_eq!(
        within("eval past the default limit", {
            let isle = isle.clone();
            move || isle.eval::<()>("while true do end")
        }),
        Err(IsleError::Timeout)
    );
    assert_eq!(isle.call::<()>("spin", ()), Err(IsleError::Timeout));
    assert_eq!(
        isle.exec(|lua| lua.load("while true do end").exec()),
        Err(IsleError::Timeout)
    );
    assert_eq!(
        isle.spawn_eval::<()>("while true do end").wait(),
        Err(IsleError::Timeout)
    );
    // A fast request still succeeds under it, after all those timeouts.
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    assert_eq!(isle.call::<i64>("select", (1, 5)), Ok(5));
}

#[test]
fn a_task_timeout_cannot_extend_the_default_timeout() {
    let isle = Isle::builder()
        .default_timeout(Duration::from_millis(50))
        .spawn(|_| Ok(()))
        .unwrap();
    let task = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_secs(3600));
    assert_eq!(
        within("the default limit still applies", move || task.wait()),
        Err(IsleError::Timeout)
    );
}

#[test]
fn a_task_timeout_can_shorten_the_default_timeout() {
    let isle = Isle::builder()
        .default_timeout(Duration::from_secs(3600))
        .spawn(|_| Ok(()))
        .unwrap();
    let task = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(20));
    assert_eq!(
        within("the shorter limit applies", move || task.wait()),
        Err(IsleError::Timeout)
    );
}

#[test]
fn time_spent_queued_counts() {
    let (gate, block) = gate();
    let isle = Isle::spawn(move |lua| block.register(lua, "block")).unwrap();
    let blocker = isle.spawn_eval::<()>("block()");
    gate.wait_started();
    let queued = isle
        .spawn_eval::<()>("queued_ran = true")
        .timeout(Duration::from_millis(30));
    // Resolves while the blocker still holds the VM: it timed out in the
    // queue.
    assert_eq!(
        within("a queued request times out", move || queued.wait()),
        Err(IsleError::Timeout)
    );
    assert!(!blocker.is_finished());
    gate.release();
    assert_eq!(blocker.wait(), Ok(()));
    assert_eq!(isle.eval::<bool>("queued_ran == nil"), Ok(true));
}

#[test]
fn default_timeout_counts_time_spent_queued() {
    let (gate, block) = gate();
    let isle = Isle::builder()
        .default_timeout(Duration::from_millis(300))
        .spawn(|_| Ok(()))
        .unwrap();
    // The blocker is Rust code: its own limit passes, but only its caller's
    // callback can notice that. It holds the VM until released.
    let blocker = isle.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    gate.wait_started();
    let queued = isle.spawn_eval::<()>("queued_ran = true");
    assert_eq!(
        within("a queued request times out", move || queued.wait()),
        Err(IsleError::Timeout)
    );
    // The blocker's own limit has passed too: its caller has its answer
    // while the closure still holds the VM (its late result is dropped).
    assert_eq!(
        within("the blocker's caller is answered", move || blocker.wait()),
        Err(IsleError::Timeout)
    );
    gate.release();
    assert_eq!(
        isle.exec(|lua| lua.globals().get::<Option<bool>>("queued_ran")),
        Ok(None)
    );
}

#[test]
fn a_timeout_that_has_already_passed_stops_at_once() {
    let (gate, block) = gate();
    let isle = Isle::spawn(move |lua| block.register(lua, "block")).unwrap();
    let blocker = isle.spawn_eval::<()>("block()");
    gate.wait_started();
    // Queued behind the blocker, so only the limit can have resolved it.
    let task = isle
        .spawn_eval::<()>("queued_ran = true")
        .timeout(Duration::ZERO);
    assert!(
        task.is_finished(),
        "a passed limit resolves a queued task in timeout()"
    );
    assert_eq!(task.wait(), Err(IsleError::Timeout));
    gate.release();
    assert_eq!(blocker.wait(), Ok(()));
    assert_eq!(isle.eval::<bool>("queued_ran == nil"), Ok(true));

    let looping = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::ZERO);
    assert_eq!(
        within("a passed limit stops a loop", move || looping.wait()),
        Err(IsleError::Timeout)
    );
}

#[test]
fn a_timeout_after_completion_keeps_the_result() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<i64>("40 + 2");
    assert_eq!(isle.eval::<i64>("0"), Ok(0)); // requests run in order
    assert!(task.is_finished());
    let task = task.timeout(Duration::ZERO);
    assert_eq!(task.wait(), Ok(42));
}

#[test]
fn many_timeouts_in_a_row_leave_the_vm_usable() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    for i in 0..20 {
        let task = isle
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::from_millis(5));
        assert_eq!(task.wait(), Err(IsleError::Timeout), "loop #{i}");
        assert_eq!(isle.eval::<i64>(format!("{i}")), Ok(i), "after loop #{i}");
    }
}

#[test]
fn a_panicking_waker_does_not_stop_later_time_limits() {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Wake, Waker};

    struct PanickingWaker;
    impl Wake for PanickingWaker {
        fn wake(self: Arc<Self>) {
            panic!("this waker panics");
        }
    }

    let (gate, block) = gate();
    let isle = Isle::spawn(move |lua| block.register(lua, "block")).unwrap();
    let blocker = isle.spawn_eval::<()>("block()");
    gate.wait_started();
    // Queued behind the blocker: the deadline thread resolves it, and wakes
    // a waker that panics.
    let mut queued = isle
        .spawn_eval::<()>("return")
        .timeout(Duration::from_millis(10));
    let waker = Waker::from(Arc::new(PanickingWaker));
    assert!(Pin::new(&mut queued)
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    assert_eq!(
        within("the queued request times out", move || queued.wait()),
        Err(IsleError::Timeout)
    );
    gate.release();
    assert_eq!(blocker.wait(), Ok(()));
    // The deadline thread still works.
    let looping = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(20));
    assert_eq!(
        within("a later time limit fires", move || looping.wait()),
        Err(IsleError::Timeout)
    );
}
