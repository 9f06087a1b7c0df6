//! Time limits, on every front end (an isle, a pool, a session): a cancel
//! triggered by a clock, resolving `Timeout`, counted from submission.
//!
//! No timing is asserted: a limit that fires late makes a test slow, never
//! wrong, and every wait that could hang runs under a watchdog.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::front::{fronts, Front};
use common::{expect_msg, gate, register_signal, within, Gate};
use mlua_isle::{IsleError, Task};

/// A stop grace no test reaches: a VM held in a Rust closure after its
/// request timed out is never replaced (which would lose a session's state).
const NO_REPLACEMENT: Duration = Duration::from_secs(3600);

/// Holds `front`'s VM in a Rust closure until the gate is released.
fn block(front: &Front) -> (Gate, Task<()>) {
    let (gate, block) = gate();
    let blocker = front.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    gate.wait_started();
    (gate, blocker)
}

fn wait_within<T: Send + 'static>(what: &str, task: Task<T>) -> Result<T, IsleError> {
    within(what, move || task.wait())
}

#[test]
fn timeout_stops_an_infinite_loop_with_timeout_not_cancelled() {
    fronts().each(|front| {
        let task = front
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::from_millis(30));
        assert_eq!(
            wait_within("a timed-out loop resolves", task),
            Err(IsleError::Timeout),
            "{front}"
        );
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
    });
}

#[test]
fn timeout_stops_a_running_loop_inside_pcall() {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let fronts = fronts().init(move |lua| register_signal(lua, "started", started_tx.clone()));
    fronts.each(|front| {
        front.eval::<()>("kept = 'yes'").unwrap();
        let task = front
            .spawn_eval::<()>("started(); pcall(function() while true do end end); escaped = true");
        expect_msg(&started, "the request started");
        // A limit counted from submission, set while the loop inside `pcall`
        // runs: it fires while it still does.
        let task = task.timeout(Duration::from_millis(30));
        assert_eq!(
            wait_within("a timed-out pcall loop resolves", task),
            Err(IsleError::Timeout),
            "{front}"
        );
        assert_eq!(
            front.eval::<(bool, String)>("escaped == nil, kept"),
            Ok((true, "yes".to_string())),
            "{front}"
        );
    });
}

#[test]
fn timeout_leaves_a_fast_request_alone() {
    fronts().each(|front| {
        let task = front
            .spawn_eval::<i64>("return 6 * 7")
            .timeout(Duration::from_secs(60));
        assert_eq!(task.wait(), Ok(42), "{front}");
    });
}

#[test]
fn timed_out_token_reports_cancelled() {
    fronts().each(|front| {
        let task = front
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::from_millis(20));
        let token = task.cancel_token().clone();
        assert_eq!(
            wait_within("a timed-out loop", task),
            Err(IsleError::Timeout)
        );
        assert!(
            token.is_cancelled(),
            "a timed-out request was asked to stop {front}"
        );
    });
}

#[test]
fn default_timeout_applies_to_every_request() {
    let fronts = fronts()
        .default_timeout(Duration::from_millis(500))
        .init(|lua| lua.load("function spin() while true do end end").exec());
    fronts.each(|front| {
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
        let f = front.clone();
        let (eval, call, exec) = within("the default limits fire", move || {
            (
                f.eval::<()>("while true do end"),
                f.call::<()>("spin", ()),
                f.spawn_exec(|lua| lua.load("while true do end").exec())
                    .wait(),
            )
        });
        assert_eq!(eval, Err(IsleError::Timeout), "eval {front}");
        assert_eq!(call, Err(IsleError::Timeout), "call {front}");
        assert_eq!(exec, Err(IsleError::Timeout), "exec {front}");
        // A fast request still succeeds under it, after all those timeouts.
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
        assert_eq!(front.call::<i64>("select", (1, 5)), Ok(5));
    });
}

#[test]
fn a_task_timeout_cannot_extend_the_default_timeout() {
    let fronts = fronts().default_timeout(Duration::from_millis(50));
    fronts.each(|front| {
        let task = front
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::from_secs(3600));
        assert_eq!(
            wait_within("the default limit still applies", task),
            Err(IsleError::Timeout),
            "{front}"
        );
    });
}

#[test]
fn a_task_timeout_can_shorten_the_default_timeout() {
    let fronts = fronts().default_timeout(Duration::from_secs(3600));
    fronts.each(|front| {
        let task = front
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::from_millis(20));
        assert_eq!(
            wait_within("the shorter limit applies", task),
            Err(IsleError::Timeout),
            "{front}"
        );
    });
}

#[test]
fn time_spent_queued_counts() {
    fronts().each(|front| {
        let (gate, blocker) = block(&front);
        let queued = front
            .spawn_eval::<()>("queued_ran = true")
            .timeout(Duration::from_millis(30));
        let ran = Arc::new(AtomicBool::new(false));
        let queued_exec = {
            let ran = ran.clone();
            front
                .spawn_exec(move |_| {
                    ran.store(true, Ordering::SeqCst);
                    Ok(())
                })
                .timeout(Duration::from_millis(30))
        };
        // Both resolve while the blocker still holds the VM: they timed out
        // in the queue.
        assert_eq!(
            wait_within("a queued request times out", queued),
            Err(IsleError::Timeout),
            "{front}"
        );
        assert_eq!(
            wait_within("a queued closure times out", queued_exec),
            Err(IsleError::Timeout),
            "{front}"
        );
        assert!(!blocker.is_finished());
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(front.eval::<bool>("queued_ran == nil"), Ok(true));
        assert!(
            !ran.load(Ordering::SeqCst),
            "a timed-out queued closure ran"
        );
    });
}

#[test]
fn default_timeout_counts_time_spent_queued() {
    let fronts = fronts()
        .default_timeout(Duration::from_millis(300))
        .stop_grace(NO_REPLACEMENT);
    fronts.each(|front| {
        // The blocker is Rust code: its own limit passes, but only its
        // caller's callback can notice that. It holds the VM until released.
        let (gate, blocker) = block(&front);
        let queued = front.spawn_eval::<()>("queued_ran = true");
        assert_eq!(
            wait_within("a queued request times out", queued),
            Err(IsleError::Timeout),
            "{front}"
        );
        // The blocker's own limit has passed too: its caller has its answer
        // while the closure still holds the VM (its late result is dropped).
        assert_eq!(
            wait_within("the blocker's caller is answered", blocker),
            Err(IsleError::Timeout),
            "{front}"
        );
        gate.release();
        assert_eq!(front.eval::<bool>("queued_ran == nil"), Ok(true));
    });
}

#[test]
fn a_timeout_that_has_already_passed_stops_at_once() {
    fronts().each(|front| {
        let (gate, blocker) = block(&front);
        // Queued behind the blocker, so only the limit can have resolved it.
        let task = front
            .spawn_eval::<()>("queued_ran = true")
            .timeout(Duration::ZERO);
        assert!(
            task.is_finished(),
            "a passed limit resolves a queued task in timeout() {front}"
        );
        assert_eq!(task.wait(), Err(IsleError::Timeout));
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(front.eval::<bool>("queued_ran == nil"), Ok(true));

        let looping = front
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::ZERO);
        assert_eq!(
            wait_within("a passed limit stops a loop", looping),
            Err(IsleError::Timeout),
            "{front}"
        );
    });
}

#[test]
fn a_timeout_after_completion_keeps_the_result() {
    fronts().each(|front| {
        let task = front.spawn_eval::<i64>("40 + 2");
        assert_eq!(front.eval::<i64>("0"), Ok(0)); // requests run in order
        assert!(task.is_finished());
        let task = task.timeout(Duration::ZERO);
        assert_eq!(task.wait(), Ok(42), "{front}");
    });
}

#[test]
fn many_timeouts_in_a_row_leave_the_vm_usable() {
    fronts().each(|front| {
        for i in 0..20 {
            let task = front
                .spawn_eval::<()>("while true do end")
                .timeout(Duration::from_millis(5));
            assert_eq!(
                wait_within("a timed-out loop", task),
                Err(IsleError::Timeout),
                "loop #{i} {front}"
            );
            assert_eq!(front.eval::<i64>(format!("{i}")), Ok(i), "after loop #{i}");
        }
    });
}

#[test]
fn a_panicking_waker_does_not_stop_later_time_limits() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Wake, Waker};

    struct PanickingWaker;
    impl Wake for PanickingWaker {
        fn wake(self: Arc<Self>) {
            panic!("this waker panics");
        }
    }

    fronts().each(|front| {
        let (gate, blocker) = block(&front);
        // Queued behind the blocker: the deadline thread resolves it, and
        // wakes a waker that panics.
        let mut queued = front
            .spawn_eval::<()>("return")
            .timeout(Duration::from_millis(10));
        let waker = Waker::from(Arc::new(PanickingWaker));
        assert!(Pin::new(&mut queued)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert_eq!(
            wait_within("the queued request times out", queued),
            Err(IsleError::Timeout),
            "{front}"
        );
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        // The deadline thread still works.
        let looping = front
            .spawn_eval::<()>("while true do end")
            .timeout(Duration::from_millis(20));
        assert_eq!(
            wait_within("a later time limit fires", looping),
            Err(IsleError::Timeout),
            "{front}"
        );
    });
}
