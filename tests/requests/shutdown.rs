//! Shutdown, on every front end (an isle, a pool, a session's pool):
//! `shutdown()` drains the queue and joins; `shutdown_timeout` stops what
//! still runs after its limit; dropping the last handle stops the work and
//! joins; nothing hangs, every task resolves, and no thread is left.
//! (Pools with several workers: `pool_shutdown.rs`.)

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::front::{fronts, Front, Fronts, Kind};
use common::{
    eventually, expect_msg, gate, register_signal, register_wait_for_cancel, thread_appears,
    thread_gone, within, PATIENCE,
};
use crossbeam_channel::Receiver;
use mlua_isle::{IsleError, Task};

/// Fronts named `name` with `started()` (reports on the returned channel)
/// and `wait_for_cancel()`, a Rust callback that reports "started", then
/// returns once its request's token says stop.
fn named_fronts(name: &str) -> (Fronts, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let fronts = fronts().name(name).init(move |lua| {
        register_signal(lua, "started", tx.clone())?;
        register_wait_for_cancel(lua, tx.clone())
    });
    (fronts, rx)
}

fn assert_threads_gone(front: &Front) {
    assert!(
        thread_gone(&front.vm_thread()),
        "the VM thread outlived its owner {front}"
    );
    assert!(
        thread_gone(&front.deadline_thread()),
        "the deadline thread outlived its owner {front}"
    );
}

/// The result of a request a shutdown stopped while it ran: an isle says
/// `Shutdown`; a pool `Shutdown` or `Cancelled`.
fn assert_stopped(front: &Front, r: Result<(), IsleError>) {
    match front.kind() {
        Kind::Isle => assert_eq!(r, Err(IsleError::Shutdown), "{front}"),
        Kind::Pool | Kind::Session => assert!(
            matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
            "{r:?} {front}"
        ),
    }
}

fn resolve<T: Send + 'static>(mut task: Task<T>, what: &str) -> Result<T, IsleError> {
    task.wait_timeout(PATIENCE)
        .unwrap_or_else(|| panic!("never resolved: {what}"))
}

#[test]
fn shutdown_finishes_queued_work() {
    const N: usize = 100;
    fronts().each(|front| {
        let (gate, block) = gate();
        let counter = Arc::new(AtomicUsize::new(0));
        let blocker = front.spawn_exec(move |_| {
            block.block();
            Ok(())
        });
        gate.wait_started();
        let tasks: Vec<Task<usize>> = (0..N)
            .map(|_| {
                let counter = counter.clone();
                front.spawn_exec(move |_| Ok(counter.fetch_add(1, Ordering::SeqCst) + 1))
            })
            .collect();

        // All N are queued behind the blocker when shutdown begins.
        let shutting = {
            let front = front.clone();
            std::thread::spawn(move || front.shutdown())
        };
        // Nothing reports "shutdown has begun" but a request refused.
        eventually("shutdown begins", || front.is_closed());
        let late = front.spawn_eval::<i64>("1");
        assert!(
            late.is_finished(),
            "a request after shutdown began resolves at once {front}"
        );
        assert_eq!(late.wait(), Err(IsleError::Shutdown));
        assert_eq!(counter.load(Ordering::SeqCst), 0);
        assert!(
            !shutting.is_finished(),
            "shutdown returned with work queued"
        );

        gate.release();
        assert_eq!(
            within("shutdown returns", move || shutting.join().unwrap()),
            Ok(()),
            "{front}"
        );
        assert_eq!(blocker.wait(), Ok(()));
        let mut results: Vec<usize> = tasks.into_iter().map(|t| t.wait().unwrap()).collect();
        assert_eq!(counter.load(Ordering::SeqCst), N);
        results.sort_unstable();
        assert_eq!(
            results,
            (1..=N).collect::<Vec<_>>(),
            "each ran exactly once {front}"
        );
    });
}

#[test]
fn shutdown_finishes_queued_lua_work_in_order() {
    fronts().each(|front| {
        front.eval::<()>("log = ''").unwrap();
        let tasks: Vec<Task<()>> = (0..50)
            .map(|i| front.spawn_eval(format!("log = log .. '{i},'")))
            .collect();
        let last = front.spawn_eval::<String>("log");
        front.shutdown().unwrap();
        for t in tasks {
            assert_eq!(t.wait(), Ok(()), "{front}");
        }
        let expected: String = (0..50).map(|i| format!("{i},")).collect();
        assert_eq!(last.wait(), Ok(expected), "{front}");
    });
}

#[test]
fn requests_after_shutdown_resolve_shutdown() {
    let fronts = fronts().init(|lua| lua.load("function f() return 1 end").exec());
    fronts.each(|front| {
        front.shutdown().unwrap();
        let f = front.clone();
        within("requests after shutdown return", move || {
            assert!(f.is_closed());
            assert_eq!(f.eval::<i64>("1"), Err(IsleError::Shutdown));
            assert_eq!(f.call::<i64>("f", ()), Err(IsleError::Shutdown));
            assert_eq!(f.exec(|_| Ok(1)), Err(IsleError::Shutdown));
            assert_eq!(f.spawn_eval::<i64>("1").wait(), Err(IsleError::Shutdown));
            assert_eq!(
                f.spawn_call::<i64>("f", ()).wait(),
                Err(IsleError::Shutdown)
            );
            assert_eq!(f.spawn_exec(|_| Ok(1)).wait(), Err(IsleError::Shutdown));
            let awaited = futures::executor::block_on(f.spawn_eval::<i64>("1"));
            assert_eq!(awaited, Err(IsleError::Shutdown));
        });
    });
}

#[test]
fn shutdown_is_idempotent_across_handles_and_threads() {
    let (fronts, _) = named_fronts("shIdm");
    fronts.each(|front| {
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (front, barrier) = (front.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    front.shutdown()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Ok(()), "{front}");
        }
        assert_eq!(front.shutdown(), Ok(()));
        assert_eq!(front.clone().shutdown(), Ok(()));
        assert_eq!(front.shutdown_timeout(Duration::from_millis(1)), Ok(()));
        assert!(front.is_closed());
        assert_threads_gone(&front);
    });
}

#[test]
fn shutdown_joins_the_vm_and_deadline_threads() {
    let (fronts, _) = named_fronts("shJn");
    let fronts = fronts.default_timeout(Duration::from_secs(3600));
    fronts.each(|front| {
        assert_eq!(front.eval::<i64>("1"), Ok(1)); // starts the deadline thread
        assert!(thread_appears(&front.vm_thread()), "no VM thread {front}");
        assert!(
            thread_appears(&front.deadline_thread()),
            "no deadline thread {front}"
        );
        front.shutdown().unwrap();
        assert_threads_gone(&front);
    });
}

#[test]
fn dropping_the_last_handle_stops_an_infinite_loop_and_joins() {
    let (fronts, started) = named_fronts("shDrp");
    fronts.each(|front| {
        let running = front.spawn_eval::<()>("started(); while true do end");
        // A time limit starts the deadline thread, which must go too.
        let mut queued: Vec<Task<()>> = (0..3).map(|_| front.spawn_eval("")).collect();
        queued.push(front.spawn_eval("").timeout(Duration::from_secs(3600)));
        expect_msg(&started, "the loop started");
        assert!(thread_appears(&front.deadline_thread()), "{front}");

        let (vm, deadline) = (front.vm_thread(), front.deadline_thread());
        within("dropping the last handle", move || drop(front));

        let r = resolve(running, "the running loop");
        assert!(
            matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
            "{r:?}"
        );
        for t in queued {
            assert_eq!(resolve(t, "a queued request"), Err(IsleError::Shutdown));
        }
        assert!(thread_gone(&vm), "the VM thread left after the last drop");
        assert!(
            thread_gone(&deadline),
            "the deadline thread left after the last drop"
        );
    });
}

#[test]
fn dropping_the_last_handle_inside_exec_does_not_deadlock() {
    let (fronts, _) = named_fronts("shSlf");
    fronts.each(|front| {
        let (gate, block) = gate();
        let (kind, vm) = (front.kind(), front.vm_thread());
        let own = front.clone();
        let task = front.spawn_exec(move |_| {
            block.block();
            drop(own); // by now, the last handle: dropped on the VM thread
            Ok(1)
        });
        let queued = front.spawn_eval::<i64>("2");
        gate.wait_started();
        drop(front); // not the last: the closure still owns one
        gate.release();

        let r = within("the exec that dropped the last handle", move || task.wait());
        match kind {
            // The isle stops the running request as it drops (Shutdown), or
            // finds it done.
            Kind::Isle => assert!(matches!(r, Ok(1) | Err(IsleError::Shutdown)), "{r:?}"),
            Kind::Pool | Kind::Session => assert_eq!(r, Ok(1)),
        }
        assert_eq!(
            within("a request queued behind it", move || queued.wait()),
            Err(IsleError::Shutdown)
        );
        assert!(thread_gone(&vm), "VM thread left after dropping itself");
    });
}

#[test]
fn tasks_outlive_their_owner_and_still_resolve() {
    let (fronts, started) = named_fronts("shOut");
    fronts.each(|front| {
        let done = front.spawn_eval::<i64>("7");
        let running = front.spawn_eval::<()>("started(); while true do end");
        let queued = front.spawn_eval::<i64>("8");
        let awaited = front.spawn_eval::<i64>("9");
        expect_msg(&started, "the loop started");
        within("dropping the last handle", move || drop(front));

        // The isle or pool is gone; its tasks are still answerable.
        assert_eq!(done.wait(), Ok(7));
        let r = resolve(running, "the running loop");
        assert!(
            matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
            "{r:?}"
        );
        assert_eq!(queued.wait(), Err(IsleError::Shutdown));
        assert_eq!(
            futures::executor::block_on(awaited),
            Err(IsleError::Shutdown)
        );
    });
}

#[test]
fn tasks_outlive_a_shut_down_owner() {
    fronts().each(|front| {
        let tasks: Vec<Task<i64>> = (0..10).map(|i| front.spawn_eval(format!("{i}"))).collect();
        front.shutdown().unwrap();
        drop(front);
        let results = futures::executor::block_on(futures::future::join_all(tasks));
        assert_eq!(results, (0..10).map(Ok).collect::<Vec<_>>());
    });
}

#[test]
fn shutdown_timeout_finishes_quick_work_without_aborting() {
    let (fronts, _) = named_fronts("shQck");
    fronts.each(|front| {
        let tasks: Vec<Task<i64>> = (0..50)
            .map(|i| front.spawn_eval(format!("{i} * 2")))
            .collect();
        let f = front.clone();
        assert_eq!(
            within("shutdown_timeout returns", move || f
                .shutdown_timeout(PATIENCE)),
            Ok(()),
            "{front}"
        );
        for (i, mut t) in tasks.into_iter().enumerate() {
            // Resolved already: shutdown_timeout has returned.
            assert_eq!(t.try_result(), Some(Ok(i as i64 * 2)), "{front}");
        }
        assert_threads_gone(&front);
    });
}

#[test]
fn shutdown_timeout_stops_a_running_loop_and_resolves_queued_work() {
    let (fronts, started) = named_fronts("shTo");
    fronts.each(|front| {
        let running = front.spawn_eval::<()>("started() while true do end");
        expect_msg(&started, "the loop started");
        let queued: Vec<Task<()>> = (0..5).map(|_| front.spawn_eval("")).collect();
        let f = front.clone();
        let r = within("shutdown_timeout returns", move || {
            f.shutdown_timeout(Duration::from_millis(50))
        });
        assert_eq!(r, Ok(()), "{front}");
        assert_stopped(&front, resolve(running, "the running loop"));
        for t in queued {
            assert_eq!(resolve(t, "a queued request"), Err(IsleError::Shutdown));
        }
        assert_threads_gone(&front);
    });
}

#[test]
fn shutdown_timeout_stops_a_rust_callback_that_polls_its_token() {
    let (fronts, started) = named_fronts("shTok");
    fronts.each(|front| {
        let task = front.spawn_call::<()>("wait_for_cancel", ());
        expect_msg(&started, "the callback started");
        let f = front.clone();
        let r = within("shutdown_timeout returns", move || {
            f.shutdown_timeout(Duration::from_millis(50))
        });
        assert_eq!(r, Ok(()), "{front}");
        assert_stopped(&front, resolve(task, "the callback's request"));
        assert_threads_gone(&front);
    });
}

#[test]
fn dropping_the_last_handle_stops_a_rust_callback_that_polls_its_token() {
    let (fronts, started) = named_fronts("shTkD");
    fronts.each(|front| {
        let task = front.spawn_call::<()>("wait_for_cancel", ());
        expect_msg(&started, "the callback started");
        let (vm, kind) = (front.vm_thread(), front.kind());
        within("dropping the last handle returns", move || drop(front));
        let r = resolve(task, "the callback's request");
        match kind {
            Kind::Isle => assert_eq!(r, Err(IsleError::Shutdown)),
            Kind::Pool | Kind::Session => assert!(
                matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
                "{r:?}"
            ),
        }
        assert!(thread_gone(&vm), "the VM thread outlived its owner");
    });
}

#[test]
fn shutdown_timeout_ends_a_graceful_shutdown_stuck_on_a_long_request() {
    let (fronts, started) = named_fronts("shStk");
    fronts.each(|front| {
        let running = front.spawn_eval::<()>("started() while true do end");
        expect_msg(&started, "the loop started");
        // A graceful shutdown waits for the loop, forever.
        let graceful = {
            let front = front.clone();
            std::thread::spawn(move || front.shutdown())
        };
        // Wait until it has closed the front, then force it from here.
        eventually("shutdown begins", || front.is_closed());
        let f = front.clone();
        let r = within("shutdown_timeout returns", move || {
            f.shutdown_timeout(Duration::from_millis(20))
        });
        assert_eq!(r, Ok(()), "{front}");
        assert_eq!(
            within("the graceful shutdown returns", move || graceful
                .join()
                .unwrap()),
            Ok(())
        );
        assert_stopped(&front, resolve(running, "the running loop"));
        assert_threads_gone(&front);
    });
}
