//! Blocking on an isle, a pool or a session from its own VM thread would
//! deadlock: such calls return `Reentrant` at once, on every front end.
//! Spawning from there is allowed. Isles waiting on each other in a ring are
//! refused too.

use crate::common;

use std::time::Duration;

use common::front::{fronts, Front};
use common::within;
use mlua_isle::{Isle, IsleError, Task};

/// Runs `f` inside an `exec` closure that owns a clone of the front, with a
/// watchdog: a deadlock fails the test instead of hanging it.
fn from_vm_thread<T: Send + 'static>(
    front: &Front,
    f: impl FnOnce(&Front) -> T + Send + 'static,
) -> T {
    let inner = front.clone();
    let task = front.spawn_exec(move |_| Ok(f(&inner)));
    within("a call made on the VM thread", move || task.wait()).expect("the exec itself runs")
}

#[test]
fn eval_from_the_vm_thread_is_reentrant() {
    fronts().each(|front| {
        let r = from_vm_thread(&front, |front| front.eval::<i64>("1"));
        assert_eq!(r, Err(IsleError::Reentrant), "{front}");
        assert_eq!(front.eval::<i64>("1"), Ok(1));
    });
}

#[test]
fn call_from_the_vm_thread_is_reentrant() {
    let fronts = fronts().init(|lua| lua.load("function f() return 1 end").exec());
    fronts.each(|front| {
        let r = from_vm_thread(&front, |front| front.call::<i64>("f", ()));
        assert_eq!(r, Err(IsleError::Reentrant), "{front}");
        assert_eq!(front.call::<i64>("f", ()), Ok(1));
    });
}

#[test]
fn exec_from_the_vm_thread_is_reentrant() {
    fronts().each(|front| {
        let r = from_vm_thread(&front, |front| front.exec(|_| Ok(1)));
        assert_eq!(r, Err(IsleError::Reentrant), "{front}");
    });
}

#[test]
fn shutdown_from_the_vm_thread_is_reentrant() {
    fronts().each(|front| {
        let r = from_vm_thread(&front, |front| front.shutdown());
        assert_eq!(r, Err(IsleError::Reentrant), "{front}");
        let r = from_vm_thread(&front, |front| {
            front.shutdown_timeout(Duration::from_secs(1))
        });
        assert_eq!(r, Err(IsleError::Reentrant), "{front}");
        assert!(!front.is_closed(), "a refused shutdown began one {front}");
        assert_eq!(front.eval::<i64>("1"), Ok(1));
        front.shutdown().unwrap();
    });
}

#[test]
fn blocking_calls_from_a_lua_callback_are_reentrant() {
    fronts().each(|front| {
        let handle = front.clone();
        front
            .exec(move |lua| {
                let f = lua.create_function(move |_, ()| {
                    Ok(handle.eval::<i64>("1") == Err(IsleError::Reentrant))
                })?;
                lua.globals().set("try_reenter", f)
            })
            .unwrap();
        assert_eq!(
            within("a callback re-entering", {
                let front = front.clone();
                move || front.eval::<bool>("try_reenter()")
            }),
            Ok(true),
            "{front}"
        );
        // The VM holds a handle to itself: only an explicit shutdown ends it.
        front.shutdown().unwrap();
    });
}

#[test]
fn waiting_on_a_task_from_the_vm_thread_is_reentrant() {
    fronts().each(|front| {
        let (wait, wait_timeout) = from_vm_thread(&front, |front| {
            let mut task = front.spawn_eval::<i64>("1");
            let wait_timeout = task.wait_timeout(Duration::from_secs(60));
            let wait = front.spawn_eval::<i64>("2").wait();
            (wait, wait_timeout)
        });
        assert_eq!(wait, Err(IsleError::Reentrant), "{front}");
        assert_eq!(wait_timeout, Some(Err(IsleError::Reentrant)), "{front}");
        assert_eq!(front.eval::<i64>("3"), Ok(3));
    });
}

#[test]
fn another_isle_or_pool_can_be_used_from_a_vm_thread() {
    let others = fronts();
    fronts().each(|front| {
        let other = others.build(front.kind());
        let r = from_vm_thread(&front, move |_| other.eval::<i64>("40 + 2"));
        assert_eq!(r, Ok(42), "{front}");
    });
}

#[test]
fn spawn_from_the_vm_thread_is_allowed_and_runs_later() {
    fronts().each(|front| {
        from_vm_thread(&front, |front| {
            front.spawn_eval::<()>("later = 42").detach();
        });
        assert_eq!(front.eval::<i64>("later"), Ok(42), "{front}");
    });
}

#[test]
fn a_task_spawned_on_the_vm_thread_can_be_waited_on_elsewhere() {
    fronts().each(|front| {
        let (e, c, x): (Task<i64>, Task<i64>, Task<i64>) = from_vm_thread(&front, |front| {
            (
                front.spawn_eval("40 + 2"),
                front.spawn_call("select", (2, 0, 7)),
                front.spawn_exec(|_| Ok(9)),
            )
        });
        assert_eq!(e.wait(), Ok(42), "{front}");
        assert_eq!(c.wait(), Ok(7), "{front}");
        assert_eq!(x.wait(), Ok(9), "{front}");
    });
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
