//! Shutdown: `shutdown()` drains the queue and joins; dropping the last
//! handle stops the work and joins; nothing hangs and no thread is left.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{
    eventually, expect_msg, gate, register_signal, thread_alive, thread_appears, thread_gone,
    within, PATIENCE,
};
use mlua_isle::{Isle, IsleError, Task};

#[test]
fn shutdown_finishes_queued_work() {
    const N: usize = 100;
    let (gate, block) = gate();
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let counter = Arc::new(AtomicUsize::new(0));
    let blocker = isle.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    gate.wait_started();
    let tasks: Vec<Task<usize>> = (0..N)
        .map(|_| {
            let counter = counter.clone();
            isle.spawn_exec(move |_| Ok(counter.fetch_add(1, Ordering::SeqCst) + 1))
        })
        .collect();

    // All N are queued behind the blocker when shutdown begins.
    let shutting = {
        let isle = isle.clone();
        std::thread::spawn(move || isle.shutdown())
    };
    // Nothing can report "shutdown has begun" except the flag itself.
    eventually("shutdown begins", || isle.is_shutdown());
    let late = isle.spawn_eval::<i64>("1");
    assert!(
        late.is_finished(),
        "a request after shutdown began resolves at once"
    );
    assert_eq!(late.wait(), Err(IsleError::Shutdown));
    assert_eq!(counter.load(Ordering::SeqCst), 0);

    gate.release();
    assert_eq!(
        within("shutdown returns", move || shutting.join().unwrap()),
        Ok(())
    );
    assert_eq!(blocker.wait(), Ok(()));
    let mut results: Vec<usize> = tasks.into_iter().map(|t| t.wait().unwrap()).collect();
    assert_eq!(counter.load(Ordering::SeqCst), N);
    results.sort_unstable();
    assert_eq!(
        results,
        (1..=N).collect::<Vec<_>>(),
        "each ran exactly once"
    );
}

#[test]
fn shutdown_finishes_queued_lua_work_in_order() {
    let isle = Isle::spawn(|lua| lua.globals().set("log", "")).unwrap();
    let tasks: Vec<Task<()>> = (0..50)
        .map(|i| isle.spawn_eval(format!("log = log .. '{i},'")))
        .collect();
    let last = isle.spawn_eval::<String>("log");
    isle.shutdown().unwrap();
    for t in tasks {
        assert_eq!(t.wait(), Ok(()));
    }
    let expected: String = (0..50).map(|i| format!("{i},")).collect();
    assert_eq!(last.wait(), Ok(expected));
}

#[test]
fn requests_after_shutdown_resolve_shutdown() {
    let isle = Isle::spawn(|lua| lua.load("function f() return 1 end").exec()).unwrap();
    isle.shutdown().unwrap();
    assert!(isle.is_shutdown());
    assert_eq!(isle.eval::<i64>("1"), Err(IsleError::Shutdown));
    assert_eq!(isle.call::<i64>("f", ()), Err(IsleError::Shutdown));
    assert_eq!(isle.exec(|_| Ok(1)), Err(IsleError::Shutdown));
    assert_eq!(isle.spawn_eval::<i64>("1").wait(), Err(IsleError::Shutdown));
    assert_eq!(
        isle.spawn_call::<i64>("f", ()).wait(),
        Err(IsleError::Shutdown)
    );
    assert_eq!(isle.spawn_exec(|_| Ok(1)).wait(), Err(IsleError::Shutdown));
    let awaited = futures::executor::block_on(isle.spawn_eval::<i64>("1"));
    assert_eq!(awaited, Err(IsleError::Shutdown));
}

#[test]
fn shutdown_is_idempotent_across_handles_and_threads() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (isle, barrier) = (isle.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                isle.shutdown()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Ok(()));
    }
    assert_eq!(isle.shutdown(), Ok(()));
    assert_eq!(isle.clone().shutdown(), Ok(()));
    assert!(isle.is_shutdown());
}

#[test]
fn shutdown_joins_the_vm_and_deadline_threads() {
    const NAME: &str = "isl-shutjoin";
    // Linux keeps 15 bytes of "isl-shutjoin-deadline".
    const DEADLINE: &str = "isl-shutjoin-de";
    let isle = Isle::builder()
        .name(NAME)
        .default_timeout(Duration::from_secs(3600))
        .spawn(|_| Ok(()))
        .unwrap();
    assert_eq!(isle.eval::<i64>("1"), Ok(1)); // starts the deadline thread
    assert!(thread_alive(NAME));
    assert!(thread_appears(DEADLINE), "no deadline thread");
    isle.shutdown().unwrap();
    assert!(thread_gone(NAME), "VM thread left after shutdown");
    assert!(thread_gone(DEADLINE), "deadline thread left after shutdown");
}

#[test]
fn dropping_the_last_handle_stops_an_infinite_loop_and_joins() {
    const NAME: &str = "isl-droploop";
    const DEADLINE: &str = "isl-droploop-de";
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::builder()
        .name(NAME)
        .default_timeout(Duration::from_secs(3600))
        .spawn(move |lua| register_signal(lua, "started", started_tx))
        .unwrap();
    let running = isle.spawn_eval::<()>("started(); while true do end");
    let queued: Vec<Task<i64>> = (0..3).map(|i| isle.spawn_eval(format!("{i}"))).collect();
    expect_msg(&started, "the loop started");
    assert!(thread_alive(NAME));
    assert!(thread_appears(DEADLINE), "no deadline thread");

    within("dropping the last handle", move || drop(isle));

    let r = running.wait();
    assert!(
        matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
        "{r:?}"
    );
    for t in queued {
        assert_eq!(t.wait(), Err(IsleError::Shutdown));
    }
    assert!(thread_gone(NAME), "VM thread left after the last drop");
    assert!(
        thread_gone(DEADLINE),
        "deadline thread left after the last drop"
    );
}

#[test]
fn dropping_the_last_handle_inside_exec_does_not_deadlock() {
    const NAME: &str = "isl-dropinexec";
    let (gate, block) = gate();
    let isle = Isle::builder().name(NAME).spawn(|_| Ok(())).unwrap();
    let own = isle.clone();
    let task = isle.spawn_exec(move |_| {
        block.block();
        drop(own); // by now, the last handle: dropped on the VM thread
        Ok(1)
    });
    let queued = isle.spawn_eval::<i64>("2");
    gate.wait_started();
    drop(isle); // not the last: the closure still owns one
    gate.release();

    let r = within("the exec that dropped the last handle", move || task.wait());
    assert!(matches!(r, Ok(1) | Err(IsleError::Shutdown)), "{r:?}");
    assert_eq!(
        within("a request queued behind it", move || queued.wait()),
        Err(IsleError::Shutdown)
    );
    assert!(thread_gone(NAME), "VM thread left after dropping itself");
}

#[test]
fn tasks_outlive_the_isle_and_still_resolve() {
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| register_signal(lua, "started", started_tx)).unwrap();
    let done = isle.spawn_eval::<i64>("7");
    let running = isle.spawn_eval::<()>("started(); while true do end");
    let queued = isle.spawn_eval::<i64>("8");
    let awaited = isle.spawn_eval::<i64>("9");
    expect_msg(&started, "the loop started");
    within("dropping the last handle", move || drop(isle));

    // The isle is gone; its tasks are still answerable.
    assert_eq!(done.wait(), Ok(7));
    let r = running.wait();
    assert!(
        matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
        "{r:?}"
    );
    assert_eq!(queued.wait(), Err(IsleError::Shutdown));
    assert_eq!(
        futures::executor::block_on(awaited),
        Err(IsleError::Shutdown)
    );
}

#[test]
fn tasks_outlive_a_shut_down_isle() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let tasks: Vec<Task<i64>> = (0..10).map(|i| isle.spawn_eval(format!("{i}"))).collect();
    isle.shutdown().unwrap();
    drop(isle);
    let results = futures::executor::block_on(futures::future::join_all(tasks));
    assert_eq!(results, (0..10).map(Ok).collect::<Vec<_>>());
}

/// An isle named `name` with `wait_for_cancel()`: a Rust callback that
/// reports "started", then returns once its request's token says stop.
fn isle_with_polling_callback(name: &str) -> (Isle, crossbeam_channel::Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let isle = Isle::builder()
        .name(name)
        .spawn(move |lua| {
            let wait = lua.create_function(move |lua, ()| {
                let token = mlua_isle::current_token(lua).expect("called from a request");
                let _ = tx.send(());
                while !token.is_cancelled() {
                    std::thread::yield_now();
                }
                Err::<(), _>(mlua_isle::mlua::Error::runtime("stopped"))
            })?;
            lua.globals().set("wait_for_cancel", wait)
        })
        .unwrap();
    (isle, rx)
}

#[test]
fn shutdown_timeout_finishes_quick_work_without_aborting() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let tasks: Vec<Task<i64>> = (0..50)
        .map(|i| isle.spawn_eval(format!("{i} * 2")))
        .collect();
    assert_eq!(isle.shutdown_timeout(PATIENCE), Ok(()));
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64 * 2));
    }
}

#[test]
fn shutdown_timeout_stops_a_running_loop_and_resolves_queued_work() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::builder()
        .name("isl-shto")
        .spawn(move |lua| register_signal(lua, "started", tx))
        .unwrap();
    let running = isle.spawn_eval::<()>("started() while true do end");
    expect_msg(&started, "the loop started");
    let queued: Vec<Task<()>> = (0..5).map(|_| isle.spawn_eval("")).collect();
    let i2 = isle.clone();
    let r = within("shutdown_timeout returns", move || {
        i2.shutdown_timeout(Duration::from_millis(50))
    });
    assert_eq!(r, Ok(()));
    assert_eq!(running.wait(), Err(IsleError::Shutdown));
    for t in queued {
        assert_eq!(t.wait(), Err(IsleError::Shutdown));
    }
    assert!(thread_gone("isl-shto"));
}

#[test]
fn shutdown_timeout_stops_a_rust_callback_that_polls_its_token() {
    let (isle, started) = isle_with_polling_callback("isl-shtok");
    let task = isle.spawn_call::<()>("wait_for_cancel", ());
    expect_msg(&started, "the callback started");
    let i2 = isle.clone();
    let r = within("shutdown_timeout returns", move || {
        i2.shutdown_timeout(Duration::from_millis(50))
    });
    assert_eq!(r, Ok(()));
    assert_eq!(task.wait(), Err(IsleError::Shutdown));
    assert!(thread_gone("isl-shtok"));
}

#[test]
fn dropping_the_last_handle_stops_a_rust_callback_that_polls_its_token() {
    let (isle, started) = isle_with_polling_callback("isl-drtok");
    let task = isle.spawn_call::<()>("wait_for_cancel", ());
    expect_msg(&started, "the callback started");
    within("dropping the last handle returns", move || drop(isle));
    assert_eq!(task.wait(), Err(IsleError::Shutdown));
    assert!(thread_gone("isl-drtok"));
}

#[test]
fn shutdown_timeout_ends_a_graceful_shutdown_stuck_on_a_long_request() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::builder()
        .name("isl-stuck")
        .spawn(move |lua| register_signal(lua, "started", tx))
        .unwrap();
    let running = isle.spawn_eval::<()>("started() while true do end");
    expect_msg(&started, "the loop started");
    // A graceful shutdown waits for the loop, forever.
    let graceful = {
        let isle = isle.clone();
        std::thread::spawn(move || isle.shutdown())
    };
    // Wait until it has closed the isle, then force it from here.
    eventually("shutdown begins", || isle.is_shutdown());
    let i2 = isle.clone();
    let r = within("shutdown_timeout returns", move || {
        i2.shutdown_timeout(Duration::from_millis(20))
    });
    assert_eq!(r, Ok(()));
    assert_eq!(graceful.join().unwrap(), Ok(()));
    assert_eq!(running.wait(), Err(IsleError::Shutdown));
    assert!(thread_gone("isl-stuck"));
}
