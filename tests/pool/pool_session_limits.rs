//! `session_queue_capacity`: one session's own bound on its queued
//! requests. Beyond it that session alone gets `QueueFull`.

use crate::common;

use std::future::Future;
use std::time::Duration;

use common::{eventually, gate, hold_pool, within};
use mlua_isle::{IsleError, IslePool, Session, Task};

fn pool(cap: usize) -> IslePool {
    IslePool::builder()
        .workers(1)
        .session_queue_capacity(cap)
        .build()
        .unwrap()
}

fn queue(s: &Session, n: usize) -> Vec<Task<i64>> {
    (0..n)
        .map(|i| s.spawn_eval(format!("return {i}")))
        .collect()
}

#[test]
fn past_its_capacity_a_session_alone_gets_queue_full() {
    within("per-session capacity", || {
        let pool = pool(3);
        let (g, held) = hold_pool(&pool);
        let a = pool.session("a");
        let queued = queue(&a, 3);
        let mut over = a.spawn_eval::<i64>("return 99");
        assert_eq!(over.try_result(), Some(Err(IsleError::QueueFull)));
        // Another session still has its own room.
        let b = pool.session("b");
        let others = queue(&b, 3);
        assert_eq!(pool.metrics().rejected, 1);
        g.release();
        held.wait().unwrap();
        for (i, t) in queued.into_iter().chain(others).enumerate() {
            assert_eq!(t.wait(), Ok(i as i64 % 3));
        }
        // The room came back.
        assert_eq!(a.eval::<i64>("return 7"), Ok(7));
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_running_request_does_not_count_against_its_sessions_queue() {
    within("running is not queued", || {
        let pool = pool(2);
        let (g, block) = gate();
        let a = pool.session("a");
        let running = a.spawn_exec(move |_, _| {
            block.block();
            Ok(())
        });
        g.wait_started();
        let queued = queue(&a, 2);
        assert_eq!(
            a.spawn_eval::<()>("").try_result(),
            Some(Err(IsleError::QueueFull))
        );
        g.release();
        running.wait().unwrap();
        for t in queued {
            t.wait().unwrap();
        }
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_request_cancelled_while_queued_gives_its_sessions_room_back() {
    within("cancel frees room", || {
        let pool = pool(2);
        let (g, held) = hold_pool(&pool);
        let a = pool.session("a");
        let mut queued = queue(&a, 2);
        assert_eq!(
            a.spawn_eval::<()>("").try_result(),
            Some(Err(IsleError::QueueFull))
        );
        let cancelled = queued.pop().unwrap();
        cancelled.cancel();
        assert_eq!(cancelled.wait(), Err(IsleError::Cancelled));
        let again = a.spawn_eval::<i64>("return 5");
        g.release();
        held.wait().unwrap();
        assert_eq!(again.wait(), Ok(5));
        assert_eq!(queued.pop().unwrap().wait(), Ok(0));
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_sessions_reserve_waits_for_room_in_its_own_queue() {
    within("reserve waits for the session's room", || {
        let pool = pool(1);
        let (g, held) = hold_pool(&pool);
        let a = pool.session("a");
        let first = a.spawn_eval::<i64>("return 1");
        // Full for this session (not for the pool): a short wait gives up.
        assert_eq!(
            a.reserve_timeout(Duration::from_millis(20)).err(),
            Some(IsleError::QueueFull)
        );
        assert!(pool.session("b").try_reserve().is_ok());
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || {
                let permit = a.reserve_timeout(Duration::from_secs(60))?;
                permit.eval::<i64>("seen = true; return 2")
            })
        };
        eventually("the waiter waits for the session's room", || {
            a.metrics().is_some_and(|m| m.waiting_for_room == 1)
        });
        g.release();
        held.wait().unwrap();
        assert_eq!(first.wait(), Ok(1));
        assert_eq!(waiter.join().unwrap(), Ok(2));
        // It ran in the session.
        assert_eq!(a.eval::<bool>("seen"), Ok(true));
        pool.shutdown().unwrap();
    });
}

#[test]
fn a_session_permit_holds_room_in_both_queues() {
    within("both rooms", || {
        let pool = IslePool::builder()
            .workers(1)
            .queue_capacity(3)
            .session_queue_capacity(2)
            .build()
            .unwrap();
        let a = pool.session("a");
        let p1 = a.try_reserve().unwrap();
        let p2 = a.try_reserve().unwrap();
        // The session's own queue is full...
        assert_eq!(a.try_reserve().err(), Some(IsleError::QueueFull));
        // ... and the pool has one place left.
        let p3 = pool.try_reserve().unwrap();
        assert_eq!(pool.try_reserve().err(), Some(IsleError::QueueFull));
        assert_eq!(
            pool.session("b").try_reserve().err(),
            Some(IsleError::QueueFull)
        );
        drop(p3);
        drop(p2);
        // Dropped permits gave back both.
        let b = pool.session("b").try_reserve().unwrap();
        assert_eq!(p1.eval::<i64>("return 1"), Ok(1));
        assert_eq!(b.eval::<i64>("return 2"), Ok(2));
        // A plain submit takes both rooms too, and gives both back.
        assert_eq!(a.eval::<i64>("return 3"), Ok(3));
        let all: Vec<_> = (0..3).map(|_| pool.try_reserve().unwrap()).collect();
        drop(all);
        pool.shutdown().unwrap();
    });
}

#[test]
fn async_reserve_on_a_session_waits_for_its_room_and_can_be_dropped() {
    within("async reserve on a full session", || {
        let pool = pool(1);
        let (g, held) = hold_pool(&pool);
        let a = pool.session("a");
        let first = a.spawn_eval::<i64>("return 1");
        let mut waiting = Box::pin(a.reserve());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(a.metrics().unwrap().waiting_for_room, 1);
        // Dropped: the wait is given up.
        drop(waiting);
        assert_eq!(a.metrics().unwrap().waiting_for_room, 0);
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || {
                futures::executor::block_on(async {
                    a.reserve().await?.spawn_eval::<i64>("return 2").await
                })
            })
        };
        eventually("the async waiter waits", || {
            a.metrics().is_some_and(|m| m.waiting_for_room == 1)
        });
        g.release();
        held.wait().unwrap();
        assert_eq!(first.wait(), Ok(1));
        assert_eq!(waiter.join().unwrap(), Ok(2));
        pool.shutdown().unwrap();
    });
}

#[test]
fn shutdown_resolves_callers_waiting_for_a_sessions_room() {
    within("shutdown wakes session waiters", || {
        let pool = pool(1);
        let (g, held) = hold_pool(&pool);
        let a = pool.session("a");
        let first = a.spawn_eval::<i64>("return 1");
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.reserve_timeout(Duration::from_secs(60)).map(drop))
        };
        eventually("the waiter waits", || {
            a.metrics().is_some_and(|m| m.waiting_for_room == 1)
        });
        let stopper = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.shutdown())
        };
        eventually("shutdown has begun", || pool.is_shutdown());
        assert_eq!(waiter.join().unwrap(), Err(IsleError::Shutdown));
        g.release();
        held.wait().unwrap();
        assert_eq!(first.wait(), Ok(1));
        stopper.join().unwrap().unwrap();
    });
}

#[test]
fn a_zero_session_queue_capacity_is_refused_at_build() {
    let err = IslePool::builder()
        .session_queue_capacity(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, IsleError::Init(m) if m.contains("session_queue_capacity")),
        "{err:?}"
    );
}

/// mlua keeps its references in the slots of one Lua stack, which stops at
/// 8,000 on Lua 5.1 and LuaJIT: sessions are not bounded by it (there they
/// are kept in the registry). 20,000 sessions on one VM each keep their
/// own state, and closing them gives the VM's memory back.
#[test]
fn one_vm_holds_more_sessions_than_lua_51s_reference_stack() {
    within("20,000 sessions on one VM", || {
        const N: i64 = 20_000;
        let pool = IslePool::builder().workers(1).build().unwrap();
        let in_use = || {
            pool.exec(|lua| {
                lua.gc_collect()?;
                Ok(lua.used_memory())
            })
            .unwrap()
        };
        let before = in_use();
        for k in 0..N {
            pool.session(k).eval::<()>(format!("mine = {k}")).unwrap();
        }
        for k in (0..N).step_by(997) {
            assert_eq!(pool.session(k).eval::<i64>("return mine"), Ok(k));
        }
        assert_eq!(pool.metrics().sessions_open, N as usize);
        let open = in_use();
        for k in 0..N {
            assert!(pool.close_session(k));
        }
        eventually("the sessions close", || pool.metrics().sessions_open == 0);
        // Compiles (a reference each, in the chunk cache) still work.
        assert_eq!(pool.eval::<i64>("return 2"), Ok(2));
        // What stays is the room mlua's references and the registry grew
        // to (about 30 bytes a session), not the environments.
        let after = in_use();
        assert!(
            after < before + (open - before) / 3,
            "{after} bytes in use after closing, {open} open, {before} before"
        );
        pool.shutdown().unwrap();
    });
}
