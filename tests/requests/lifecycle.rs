//! The VM thread's lifecycle shared by `Isle` and the pool: a last handle
//! dropped on a VM thread, and a wedged VM whose replacement cannot start.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::front::{each_kind, fronts, Front, Kind};
use common::{eventually, gate, thread_gone, within, Gate};
use mlua_isle::mlua;
use mlua_isle::{Isle, IsleError, IslePool};

/// Short enough for a test to see the wedge check run.
const GRACE: Duration = Duration::from_millis(50);

#[test]
fn the_last_isle_handle_dropped_on_its_vm_thread_waits_for_nothing() {
    // With no grace limit, waiting for its own thread would never end.
    const NAME: &str = "lc-isleself";
    let isle = Isle::builder()
        .name(NAME)
        .stop_grace(Duration::MAX)
        .build()
        .unwrap();
    let own = isle.clone();
    let task = isle.spawn_exec(move |_| {
        drop(own);
        Ok(1)
    });
    drop(isle);
    let r = within("the exec that dropped the last handle", move || task.wait());
    assert!(matches!(r, Ok(1) | Err(IsleError::Shutdown)), "{r:?}");
    assert!(thread_gone(NAME), "the VM thread is still there");
}

#[test]
fn the_last_pool_handle_dropped_on_a_worker_waits_only_for_the_others() {
    const NAME: &str = "lc-poolself";
    let pool = IslePool::builder()
        .name(NAME)
        .workers(2)
        .stop_grace(Duration::MAX)
        .build()
        .unwrap();
    let own = pool.clone();
    // The worker drops the last handle: the caller's goes first.
    let (dropped, caller_dropped) = crossbeam_channel::bounded::<()>(1);
    let task = pool.spawn_exec(move |_| {
        let _ = caller_dropped.recv();
        drop(own);
        Ok(7)
    });
    drop(pool);
    dropped.send(()).unwrap();
    assert_eq!(
        within("the exec that dropped the last handle", move || task.wait()),
        Ok(7)
    );
    for w in 0..2 {
        assert!(
            thread_gone(&format!("{NAME}-{w}")),
            "worker {w} is still there"
        );
    }
}

/// An init that registers `block()` the first time and fails after: a VM
/// replacing a wedged one cannot start.
fn first_init_only(
    block: common::GateFn,
    starts: &Arc<AtomicUsize>,
) -> impl Fn(&mlua::Lua) -> mlua::Result<()> + Send + Sync + 'static {
    let starts = starts.clone();
    move |lua| {
        if starts.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(mlua::Error::runtime("no second VM"));
        }
        block.clone().register(lua, "block")?;
        lua.globals().set("first_vm", true)
    }
}

#[test]
fn a_wedged_vm_whose_replacement_cannot_start_keeps_serving() {
    each_kind(|kind| {
        let (gate, block) = gate();
        let starts = Arc::new(AtomicUsize::new(0));
        let front = fronts()
            .stop_grace(GRACE)
            .init(first_init_only(block, &starts))
            .build(kind);
        let task = front.spawn_call::<()>("block", ());
        gate.wait_started();
        task.cancel();
        assert_eq!(
            within("the stopped request", move || task.wait()),
            Err(IsleError::Cancelled)
        );
        // One grace period later the timer tries a replacement; its init
        // fails (a pool counts that), and it is tried again every grace
        // period while the VM stays stuck.
        eventually("a replacement is tried again", || {
            starts.load(Ordering::SeqCst) >= 3
        });
        if let Some(pool) = front.pool() {
            eventually("the failures are counted", || {
                pool.metrics().workers[0].recycle_failures >= 2
            });
        }
        // The stuck VM keeps its queue: once it gets back, it serves it.
        let next = front.spawn_eval::<bool>("first_vm");
        gate.release();
        assert_eq!(within("the next request", move || next.wait()), Ok(true));
        assert_eq!(front.wedged(), 0);
        within("shutdown", move || front.shutdown()).unwrap();
    });
}

/// An init whose first run sets `first_vm` and whose second run, a
/// replacement's, reports on `replacing` and then waits for its release:
/// the test lets the stuck VM get back while its replacement is starting.
fn slow_second_init(
    stuck: common::GateFn,
    replacing: common::GateFn,
    starts: &Arc<AtomicUsize>,
) -> impl Fn(&mlua::Lua) -> mlua::Result<()> + Send + Sync + 'static {
    let starts = starts.clone();
    move |lua| {
        match starts.fetch_add(1, Ordering::SeqCst) {
            0 => lua.globals().set("first_vm", true)?,
            _ => replacing.block(),
        }
        stuck.clone().register(lua, "block")
    }
}

/// A front of `kind` (threads named after `name`) whose VM is stuck in a
/// stopped request and whose replacement is running its `init`, blocked:
/// `stuck` holds the old VM, `replacing` the replacement's `init`.
fn replacement_starting(kind: Kind, name: &str) -> (Front, Gate, Gate) {
    let (stuck, stuck_fn) = gate();
    let (replacing, replacing_fn) = gate();
    let starts = Arc::new(AtomicUsize::new(0));
    let front = fronts()
        .name(name)
        .stop_grace(GRACE)
        .init(slow_second_init(stuck_fn, replacing_fn, &starts))
        .build(kind);
    let task = front.spawn_call::<()>("block", ());
    stuck.wait_started();
    task.cancel();
    assert_eq!(
        within("the stopped request", move || task.wait()),
        Err(IsleError::Cancelled)
    );
    replacing.wait_started(); // the replacement's init runs, and blocks
    (front, stuck, replacing)
}

#[test]
fn a_vm_back_before_its_replacement_started_keeps_serving_alone() {
    each_kind(|kind| {
        let (front, stuck, replacing) = replacement_starting(kind, "lcbak");
        stuck.release(); // and the stuck VM gets back meanwhile
        assert_eq!(front.eval::<bool>("first_vm"), Ok(true));
        replacing.release();
        // The replacement exits unserved: one VM serves, in order, and a
        // graceful shutdown (one stop message, for an isle) ends every
        // thread.
        for i in 0..20 {
            assert_eq!(
                front.eval::<bool>("first_vm == true"),
                Ok(true),
                "request {i}"
            );
        }
        let thread = front.vm_thread();
        assert_eq!(front.wedged(), 0);
        within("shutdown", move || front.shutdown()).unwrap();
        assert!(thread_gone(&thread), "a VM thread is left");
    });
}

#[test]
fn a_bounded_shutdown_does_not_wait_for_a_replacement_that_is_starting() {
    each_kind(|kind| {
        let (front, stuck, replacing) = replacement_starting(kind, "lcrep");
        // The stuck VM is detached after the limit and one grace period;
        // the starting replacement is not waited for.
        let r = within("a bounded shutdown", {
            let front = front.clone();
            move || front.shutdown_timeout(Duration::from_millis(10))
        });
        assert!(matches!(r, Err(IsleError::Wedged(_))), "{r:?}");
        assert_eq!(front.wedged(), 0);
        // Both threads may go now: the replacement exits unserved.
        replacing.release();
        stuck.release();
        assert_eq!(front.eval::<i64>("1"), Err(IsleError::Shutdown));
    });
}

#[test]
fn time_limits_fire_while_a_replacement_is_starting() {
    each_kind(|kind| {
        let (front, stuck, replacing) = replacement_starting(kind, "lctl");
        // Queued behind the stuck VM: only its time limit can answer it,
        // and the timer is not busy with the replacement.
        let limited = front
            .spawn_eval::<i64>("1")
            .timeout(Duration::from_millis(20));
        assert_eq!(
            within("a time limit during a replacement", move || limited.wait()),
            Err(IsleError::Timeout)
        );
        replacing.release();
        stuck.release();
        // The replacement settles (handed the slot, or dropped) before the
        // shutdown, which then finds no VM stuck.
        let wedge_thread = front.deadline_thread().replace("-deadline", "-wedge");
        assert!(thread_gone(&wedge_thread), "the replacement never settled");
        within("shutdown", move || front.shutdown()).unwrap();
    });
}
