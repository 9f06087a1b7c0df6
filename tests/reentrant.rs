//! Blocking on an isle from its own VM thread would deadlock: such calls
//! return `Reentrant` at once. Spawning from there is allowed.

mod common;

use std::time::Duration;

use common::within;
use mlua_isle::{Isle, IsleError, Task};

/// Runs `f` inside an `exec` closure that owns a clone of the isle, with a
/// watchdog: a deadlock fails the test instead of hanging it.
fn from_vm_thread<T: Send + 'static>(
    isle: &Isle,
    f: impl FnOnce(&Isle) -> T + Send + 'static,
) -> T {
    let inner = isle.clone();
    let task = isle.spawn_exec(move |_| Ok(f(&inner)));
    within("a call made on the VM thread", move || task.wait()).expect("the exec itself runs")
}

#[test]
fn eval_from_the_vm_thread_is_reentrant() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let r = from_vm_thread(&isle, |isle| isle.eval::<i64>("1"));
    assert_eq!(r, Err(IsleError::Reentrant));
    assert_eq!(isle.eval::<i64>("1"), Ok(1));
}

#[test]
fn call_from_the_vm_thread_is_reentrant() {
    let isle = Isle::spawn(|lua| lua.load("function f() return 1 end").exec()).unwrap();
    let r = from_vm_thread(&isle, |isle| isle.call::<i64>("f", ()));
    assert_eq!(r, Err(IsleError::Reentrant));
    assert_eq!(isle.call::<i64>("f", ()), Ok(1));
}

#[test]
fn exec_from_the_vm_thread_is_reentrant() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let r = from_vm_thread(&isle, |isle| isle.exec(|_| Ok(1)));
    assert_eq!(r, Err(IsleError::Reentrant));
}

#[test]
fn shutdown_from_the_vm_thread_is_reentrant() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let r = from_vm_thread(&isle, |isle| isle.shutdown());
    assert_eq!(r, Err(IsleError::Reentrant));
    assert!(!isle.is_shutdown(), "a refused shutdown must not begin one");
    assert_eq!(isle.eval::<i64>("1"), Ok(1));
    isle.shutdown().unwrap();
}

#[test]
fn blocking_calls_from_a_lua_callback_are_reentrant() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let handle = isle.clone();
    isle.exec(move |lua| {
        let f = lua.create_function(move |_, ()| {
            Ok(handle.eval::<i64>("1") == Err(IsleError::Reentrant))
        })?;
        lua.globals().set("try_reenter", f)
    })
    .unwrap();
    assert_eq!(
        within("a callback re-entering", {
            let isle = isle.clone();
            move || isle.eval::<bool>("try_reenter()")
        }),
        Ok(true)
    );
    // The VM holds a handle to itself: only an explicit shutdown ends it.
    isle.shutdown().unwrap();
}

#[test]
fn waiting_on_a_task_from_the_vm_thread_is_reentrant() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let (wait, wait_timeout) = from_vm_thread(&isle, |isle| {
        let mut task = isle.spawn_eval::<i64>("1");
        let wait_timeout = task.wait_timeout(Duration::from_secs(60));
        let wait = isle.spawn_eval::<i64>("2").wait();
        (wait, wait_timeout)
    });
    assert_eq!(wait, Err(IsleError::Reentrant));
    assert_eq!(wait_timeout, Some(Err(IsleError::Reentrant)));
    assert_eq!(isle.eval::<i64>("3"), Ok(3));
}

#[test]
fn other_isles_can_be_used_from_a_vm_thread() {
    let a = Isle::spawn(|_| Ok(())).unwrap();
    let b = Isle::spawn(|_| Ok(())).unwrap();
    let r = from_vm_thread(&a, move |_| b.eval::<i64>("40 + 2"));
    assert_eq!(r, Ok(42));
}

#[test]
fn spawn_from_the_vm_thread_is_allowed_and_runs_later() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    from_vm_thread(&isle, |isle| {
        isle.spawn_eval::<()>("later = 42").detach();
    });
    assert_eq!(isle.eval::<i64>("later"), Ok(42));
}

#[test]
fn a_task_spawned_on_the_vm_thread_can_be_waited_on_elsewhere() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let (e, c, x): (Task<i64>, Task<i64>, Task<i64>) = from_vm_thread(&isle, |isle| {
        (
            isle.spawn_eval("40 + 2"),
            isle.spawn_call("select", (2, 0, 7)),
            isle.spawn_exec(|_| Ok(9)),
        )
    });
    assert_eq!(e.wait(), Ok(42));
    assert_eq!(c.wait(), Ok(7));
    assert_eq!(x.wait(), Ok(9));
}

#[test]
fn isles_blocking_on_each_other_get_reentrant_instead_of_a_deadlock() {
    // A's closure waits on B, whose closure waits on A: neither VM could
    // ever go on. The second wait is refused.
    let a = Isle::spawn(|_| Ok(())).unwrap();
    let b = Isle::spawn(|_| Ok(())).unwrap();
    let (a2, b2) = (a.clone(), b.clone());
    let task = a.spawn_exec(move |_| {
        let inner = b2.exec(move |_| Ok(a2.eval::<i64>("1")));
        Ok(inner)
    });
    let r = within("two isles waiting on each other", move || task.wait());
    // Whichever wait closes the ring is refused: B's on A, or (if B's
    // closure got there first) A's on B.
    assert!(
        matches!(
            r,
            Ok(Ok(Err(IsleError::Reentrant))) | Ok(Err(IsleError::Reentrant))
        ),
        "{r:?}"
    );
    // Both serve on.
    assert_eq!(a.eval::<i64>("2"), Ok(2));
    assert_eq!(b.eval::<i64>("3"), Ok(3));
}

#[test]
fn a_cycle_through_three_isles_is_refused_too() {
    let isles: Vec<Isle> = (0..3).map(|_| Isle::spawn(|_| Ok(())).unwrap()).collect();
    let (x, y, z) = (isles[0].clone(), isles[1].clone(), isles[2].clone());
    let task = isles[0].spawn_exec(move |_| {
        // x waits on y, y on z, z on x.
        Ok(y.exec(move |_| Ok(z.exec(move |_| Ok(x.eval::<i64>("1"))))))
    });
    let r = within("three isles waiting in a ring", move || task.wait());
    // Whichever of the three waits closes the ring is refused.
    assert!(
        matches!(
            r,
            Ok(Ok(Ok(Err(IsleError::Reentrant))))
                | Ok(Ok(Err(IsleError::Reentrant)))
                | Ok(Err(IsleError::Reentrant))
        ),
        "{r:?}"
    );
    for isle in &isles {
        assert_eq!(isle.eval::<i64>("4"), Ok(4));
    }
}

#[test]
fn an_isle_waiting_on_another_that_is_free_is_not_refused() {
    // Not a cycle: B waits on C, which waits on nobody.
    let (a, b, c) = (
        Isle::spawn(|_| Ok(())).unwrap(),
        Isle::spawn(|_| Ok(())).unwrap(),
        Isle::spawn(|_| Ok(())).unwrap(),
    );
    let (b2, c2) = (b.clone(), c.clone());
    let task = a.spawn_exec(move |_| Ok(b2.exec(move |_| Ok(c2.eval::<i64>("5")))));
    let r = within("a chain of waits", move || task.wait());
    assert_eq!(r, Ok(Ok(Ok(5))));
}

#[test]
fn a_pool_vm_waiting_on_an_isle_that_waits_on_the_pool_is_not_refused() {
    // The pool has another VM free to serve the isle's request: no
    // deadlock, so no refusal.
    let pool = mlua_isle::IslePool::new(2, |_| Ok(())).unwrap();
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let (p2, i2) = (pool.clone(), isle.clone());
    let task = pool.spawn_exec(move |_| Ok(i2.exec(move |_| Ok(p2.eval::<i64>("6")))));
    let r = within("pool -> isle -> pool", move || task.wait());
    assert_eq!(r, Ok(Ok(Ok(6))));
}
