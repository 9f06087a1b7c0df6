//! Errors particular to a pool: blocking calls from a pool's VM threads are
//! `Reentrant` through any handle of the pool (unkeyed or another session),
//! while non-blocking ones work; a result that panics when dropped strands
//! nothing. (What isles, pools and sessions share is tested on every front
//! in `requests.rs`, `panics.rs` and `reentrant.rs`.)

use crate::common;

use common::within;
use mlua_isle::{IsleError, IslePool, Task};

fn pool() -> IslePool {
    IslePool::new(1, |_| Ok(())).unwrap()
}

#[test]
fn blocking_calls_from_a_pool_thread_are_reentrant() {
    let pool = pool();
    let p = pool.clone();
    let results = within("reentrant calls return at once", move || {
        let inner = p.clone();
        p.exec(move |_| {
            Ok(vec![
                inner.eval::<i64>("1").map(|_| ()),
                inner.call::<()>("print", ()),
                inner.exec(|_| Ok(())),
                inner.session("s").eval::<()>(""),
                inner.session("s").exec(|_, _| Ok(())),
                inner.shutdown(),
                inner.shutdown_timeout(std::time::Duration::from_secs(1)),
            ])
        })
    })
    .unwrap();
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r, Err(IsleError::Reentrant), "call {i}");
    }
    assert_eq!(pool.eval::<i64>("1"), Ok(1), "the pool still serves");
    pool.shutdown().unwrap();
}

#[test]
fn blocking_calls_from_a_session_thread_are_reentrant() {
    let pool = pool();
    let inner = pool.clone();
    let r = within("reentrant call returns", move || {
        pool.session("outer")
            .exec(move |_, _| Ok(inner.session("other").eval::<i64>("1")))
    });
    assert_eq!(r, Ok(Err(IsleError::Reentrant)));
}

#[test]
fn spawning_from_a_pool_thread_is_fine() {
    let pool = pool();
    let inner = pool.clone();
    let task: Task<i64> = pool
        .exec(move |_| Ok(inner.session("later").spawn_eval("return 41 + 1")))
        .unwrap();
    assert_eq!(task.wait(), Ok(42));
    pool.shutdown().unwrap();
}

#[test]
fn non_blocking_calls_from_a_pool_thread_work() {
    let pool = IslePool::new(2, |_| Ok(())).unwrap();
    let s = pool.session("self");
    s.eval::<()>("x = 1").unwrap();
    pool.session("other").eval::<()>("y = 1").unwrap();
    let inner = pool.clone();
    let (workers, open, closed_other, closed_self) = within("non-blocking calls return", {
        let s = s.clone();
        move || {
            s.exec(move |_, env| {
                let m = inner.metrics();
                // Closing its own session takes effect after this request.
                let closed_self = inner.session("self").close();
                env.set("x", 2)?;
                Ok((
                    inner.workers(),
                    m.sessions_open,
                    inner.close_session("other"),
                    closed_self,
                ))
            })
        }
    })
    .unwrap();
    assert_eq!(
        (workers, open, closed_other, closed_self),
        (2, 2, true, true)
    );
    assert_eq!(
        s.eval::<Option<i64>>("x"),
        Ok(None),
        "the session was not closed"
    );
    pool.shutdown().unwrap();
}

struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("dropped a value that panics on drop");
    }
}

#[test]
fn a_result_that_panics_when_dropped_does_not_strand_later_requests() {
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    pool.spawn_exec(|_| Ok(PanicsOnDrop)).detach();
    let mut next = pool.session("after").spawn_eval::<i64>("return 1");
    let r = next
        .wait_timeout(common::PATIENCE)
        .expect("a request after the panicking drop never resolved");
    assert!(matches!(r, Ok(1) | Err(IsleError::Panic(_))), "{r:?}");
}
