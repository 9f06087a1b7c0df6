//! Cancellation and time limits behave on a pool, and on a session, as they
//! do on an `Isle`: a queued request cancelled never runs, running Lua code
//! is interrupted wherever it loops, and the VM (and the session's state)
//! stays usable.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    eventually, expect_msg, gate, register_signal, register_wait_for_cancel, within, Gate,
};
use crossbeam_channel::Receiver;
use mlua_isle::{current_token, IsleError, IslePool, Session, Task};

/// A one-worker pool (so "the VM serves the next request" means the same
/// VM) with `started()` and `wait_for_cancel()`, a Rust callback that polls
/// its request's token.
fn pool() -> (IslePool, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let pool = IslePool::new(1, move |lua| {
        assert!(current_token(lua).is_none(), "init is not a request");
        register_signal(lua, "started", tx.clone())?;
        register_wait_for_cancel(lua, tx.clone())
    })
    .unwrap();
    (pool, rx)
}

/// Blocks the pool's only worker in a session-less callback.
fn block(pool: &IslePool) -> (Gate, Task<()>) {
    let (g, gf) = gate();
    let blocker = pool.spawn_exec(move |_| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    (g, blocker)
}

/// A session on `pool` holding `state = 'kept'`.
fn session(pool: &IslePool) -> Session {
    let s = pool.session("tenant");
    s.eval::<()>("state = 'kept'").unwrap();
    s
}

fn assert_session_intact(s: &Session) {
    assert_eq!(s.eval::<String>("state"), Ok("kept".into()));
}

/// Cancels `task` once `started` reports it running; it must resolve
/// `Cancelled`.
fn cancel_running<T: Send + std::fmt::Debug + 'static>(task: Task<T>, started: &Receiver<()>) {
    expect_msg(started, "the request started");
    task.cancel();
    let r = within("a cancelled request resolves", move || task.wait());
    assert!(matches!(r, Err(IsleError::Cancelled)), "{r:?}");
}

const LOOPS: [&str; 4] = [
    "started(); while true do end",
    "started(); while true do pcall(function() while true do end end) end",
    "started(); while true do xpcall(function() while true do end end, function(e) return e end) end",
    "started(); coroutine.wrap(function() while true do end end)()",
];

#[test]
fn a_queued_request_cancelled_never_runs() {
    let (pool, _) = pool();
    let (g, blocker) = block(&pool);
    let ran = Arc::new(AtomicBool::new(false));
    let task = {
        let ran = ran.clone();
        pool.spawn_exec(move |_| {
            ran.store(true, Ordering::SeqCst);
            Ok(())
        })
    };
    task.cancel();
    // Resolved at once, while the worker is still blocked.
    assert_eq!(
        within("a queued cancel resolves", move || task.wait()),
        Err(IsleError::Cancelled)
    );
    g.release();
    blocker.wait().unwrap();
    assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2));
    assert!(!ran.load(Ordering::SeqCst), "the cancelled request ran");
    pool.shutdown().unwrap();
}

#[test]
fn a_queued_session_request_cancelled_never_runs() {
    let (pool, _) = pool();
    let s = session(&pool);
    let (g, blocker) = block(&pool);
    let cancelled = s.spawn_eval::<()>("state = 'clobbered'");
    let after = s.spawn_eval::<String>("state");
    cancelled.cancel();
    assert_eq!(
        within("a queued cancel resolves", move || cancelled.wait()),
        Err(IsleError::Cancelled)
    );
    g.release();
    blocker.wait().unwrap();
    assert_eq!(after.wait(), Ok("kept".into()));
    assert_session_intact(&s);
    pool.shutdown().unwrap();
}

#[test]
fn running_lua_loops_are_interrupted_on_the_pool() {
    let (pool, started) = pool();
    for code in LOOPS {
        cancel_running(pool.spawn_eval::<()>(code), &started);
        assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2), "after {code}");
    }
    pool.shutdown().unwrap();
}

#[test]
fn running_lua_loops_are_interrupted_in_a_session() {
    let (pool, started) = pool();
    let s = session(&pool);
    for code in LOOPS {
        cancel_running(s.spawn_eval::<()>(code), &started);
        assert_session_intact(&s);
    }
    pool.shutdown().unwrap();
}

#[test]
fn a_cancel_token_works_from_another_thread() {
    let (pool, started) = pool();
    let task = pool.spawn_eval::<()>(LOOPS[0]);
    expect_msg(&started, "the loop started");
    let token = task.cancel_token().clone();
    std::thread::spawn(move || token.cancel()).join().unwrap();
    assert_eq!(
        within("cancelled from another thread", move || task.wait()),
        Err(IsleError::Cancelled)
    );
    pool.shutdown().unwrap();
}

#[test]
fn dropping_an_unfinished_task_cancels_it() {
    let (pool, started) = pool();
    let s = session(&pool);
    let task = s.spawn_eval::<()>(LOOPS[0]);
    expect_msg(&started, "the loop started");
    drop(task);
    // Only one VM: it answers again only if the loop was stopped.
    let s2 = s.clone();
    assert_eq!(
        within("the VM is freed", move || s2.eval::<String>("state")),
        Ok("kept".into())
    );
    pool.shutdown().unwrap();
}

#[test]
fn a_cancel_after_completion_changes_nothing() {
    let (pool, _) = pool();
    let mut task = pool.session(1).spawn_eval::<i64>("return 7");
    eventually("the request finishes", || task.is_finished());
    task.cancel();
    assert_eq!(task.try_result(), Some(Ok(7)));
    pool.shutdown().unwrap();
}

#[test]
fn a_rust_callback_sees_its_requests_token() {
    let (pool, started) = pool();
    cancel_running(pool.spawn_call::<()>("wait_for_cancel", ()), &started);
    let s = session(&pool);
    cancel_running(s.spawn_call::<()>("wait_for_cancel", ()), &started);
    cancel_running(s.spawn_eval::<()>("wait_for_cancel()"), &started);
    assert_session_intact(&s);
    pool.shutdown().unwrap();
}

#[test]
fn current_token_in_exec_is_the_running_requests() {
    let pool = IslePool::new(2, |_| Ok(())).unwrap();
    let task = pool.spawn_exec(|lua| {
        let token = current_token(lua).expect("inside a request");
        Ok(token.is_cancelled())
    });
    assert_eq!(task.wait(), Ok(false));
    let task = pool
        .session("s")
        .spawn_exec(|lua, _| Ok(current_token(lua).is_some()));
    assert_eq!(task.wait(), Ok(true));
    pool.shutdown().unwrap();
}

#[test]
fn a_time_limit_stops_a_running_request_with_timeout() {
    let (pool, _) = pool();
    let s = session(&pool);
    let t = pool
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(30));
    assert_eq!(
        within("pool timeout", move || t.wait()),
        Err(IsleError::Timeout)
    );
    let t = s
        .spawn_eval::<()>("while true do pcall(function() while true do end end) end")
        .timeout(Duration::from_millis(30));
    assert_eq!(
        within("session timeout", move || t.wait()),
        Err(IsleError::Timeout)
    );
    assert_session_intact(&s);
    pool.shutdown().unwrap();
}

#[test]
fn time_spent_queued_counts_against_the_limit() {
    let (pool, _) = pool();
    let (g, blocker) = block(&pool);
    let ran = Arc::new(AtomicBool::new(false));
    let t = {
        let ran = ran.clone();
        pool.session("q")
            .spawn_exec(move |_, _| {
                ran.store(true, Ordering::SeqCst);
                Ok(())
            })
            .timeout(Duration::from_millis(30))
    };
    // Resolves while the worker is still blocked.
    assert_eq!(
        within("queued timeout", move || t.wait()),
        Err(IsleError::Timeout)
    );
    g.release();
    blocker.wait().unwrap();
    assert_eq!(pool.session("q").eval::<i64>("1"), Ok(1));
    assert!(
        !ran.load(Ordering::SeqCst),
        "a timed-out queued request ran"
    );
    pool.shutdown().unwrap();
}

#[test]
fn the_default_timeout_applies_to_pool_and_session_requests() {
    let pool = IslePool::builder()
        .workers(2)
        .default_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let p = pool.clone();
    let (a, b, c) = within("default timeouts fire", move || {
        (
            p.eval::<()>("while true do end"),
            p.session("s").eval::<()>("while true do end"),
            p.spawn_exec(|lua| lua.load("while true do end").exec())
                .wait(),
        )
    });
    assert_eq!(a, Err(IsleError::Timeout));
    assert_eq!(b, Err(IsleError::Timeout));
    assert_eq!(c, Err(IsleError::Timeout));
    assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2));
    // A task's own limit can shorten the default.
    let t = pool
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(1));
    assert_eq!(t.wait(), Err(IsleError::Timeout));
    pool.shutdown().unwrap();
}

#[test]
fn cancelling_on_a_busy_pool_leaves_other_requests_alone() {
    let (tx, started) = crossbeam_channel::unbounded();
    let pool = IslePool::new(2, move |lua| register_signal(lua, "started", tx.clone())).unwrap();
    let a = pool.spawn_eval::<()>(LOOPS[0]);
    let b =
        pool.spawn_eval::<()>("started(); local n = 0 for i = 1, 2e5 do n = n + i end return n");
    expect_msg(&started, "one started");
    expect_msg(&started, "the other started");
    a.cancel();
    assert_eq!(a.wait(), Err(IsleError::Cancelled));
    assert_eq!(b.wait(), Ok(()));
    pool.shutdown().unwrap();
}
