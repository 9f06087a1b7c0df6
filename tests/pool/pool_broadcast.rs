//! `broadcast`: runs once on every VM, after the work already queued there,
//! and returns one result per VM in worker order.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, gate, within, worker_index};
use mlua_isle::{mlua, IsleError, IslePool};

fn pool(workers: usize) -> IslePool {
    IslePool::new(workers, |lua| lua.globals().set("VM_ID", worker_index())).unwrap()
}

#[test]
fn broadcast_runs_exactly_once_on_every_vm() {
    let pool = pool(3);
    let calls = Arc::new(AtomicUsize::new(0));
    let results = {
        let calls = calls.clone();
        pool.broadcast(move |lua| {
            calls.fetch_add(1, Ordering::SeqCst);
            lua.load("hits = (hits or 0) + 1").exec()
        })
    };
    assert_eq!(results, vec![Ok(()), Ok(()), Ok(())]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let hits = pool.broadcast(|lua| lua.globals().get::<i64>("hits"));
    assert_eq!(hits, vec![Ok(1), Ok(1), Ok(1)]);
    pool.shutdown().unwrap();
}

#[test]
fn broadcast_returns_one_result_per_worker_in_worker_order() {
    let pool = pool(4);
    let ids = pool.broadcast(|lua| lua.globals().get::<usize>("VM_ID"));
    assert_eq!(ids, vec![Ok(0), Ok(1), Ok(2), Ok(3)]);
    pool.shutdown().unwrap();
}

#[test]
fn an_error_on_one_vm_shows_in_that_slot_only() {
    let pool = pool(3);
    let results = pool.broadcast(|lua| {
        let id: usize = lua.globals().get("VM_ID")?;
        if id == 1 {
            Err(mlua::Error::runtime("VM 1 refuses"))
        } else {
            Ok(id)
        }
    });
    assert_eq!(results.len(), 3);
    assert_eq!(results[0], Ok(0));
    assert_eq!(results[2], Ok(2));
    let err = results[1].clone().unwrap_err();
    assert!(
        err.as_lua().unwrap().message().contains("VM 1 refuses"),
        "{err}"
    );
    pool.shutdown().unwrap();
}

#[test]
fn a_panic_on_one_vm_shows_in_that_slot_and_the_vm_keeps_serving() {
    let pool = pool(2);
    let results = pool.broadcast(|lua| {
        if lua.globals().get::<usize>("VM_ID")? == 0 {
            panic!("broadcast panicked on VM 0");
        }
        Ok(())
    });
    assert!(
        matches!(&results[0], Err(IsleError::Panic(m)) if m.contains("broadcast panicked")),
        "{results:?}"
    );
    assert_eq!(results[1], Ok(()));
    let ids = pool.broadcast(|lua| lua.globals().get::<usize>("VM_ID"));
    assert_eq!(ids, vec![Ok(0), Ok(1)]);
    pool.shutdown().unwrap();
}

#[test]
fn broadcast_from_a_pool_thread_is_reentrant_everywhere() {
    let pool = pool(3);
    let inner = pool.clone();
    let results = pool.exec(move |_| Ok(inner.broadcast(|_| Ok(())))).unwrap();
    assert_eq!(results, vec![Err(IsleError::Reentrant); 3]);
    // Also from a session's VM.
    let inner = pool.clone();
    let results = pool
        .session("s")
        .exec(move |_, _| Ok(inner.broadcast(|_| Ok(()))))
        .unwrap();
    assert_eq!(results, vec![Err(IsleError::Reentrant); 3]);
    pool.shutdown().unwrap();
}

#[test]
fn broadcast_reloads_code_for_unkeyed_work_and_sessions() {
    let pool = IslePool::new(2, |lua| lua.load("function version() return 1 end").exec()).unwrap();
    let s = pool.session("tenant");
    assert_eq!(s.call::<i64>("version", ()), Ok(1));
    let results = pool.broadcast(|lua| lua.load("function version() return 2 end").exec());
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for _ in 0..20 {
        assert_eq!(pool.call::<i64>("version", ()), Ok(2));
    }
    assert_eq!(s.call::<i64>("version", ()), Ok(2));
    pool.shutdown().unwrap();
}

#[test]
fn broadcast_runs_after_the_session_work_already_queued_on_a_vm() {
    let pool = pool(2);
    let s = pool.session("first");
    let home: usize = s.eval("VM_ID").unwrap();
    let (g, gf) = gate();
    let blocker = s.spawn_exec(move |_, _| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let step = Arc::new(AtomicUsize::new(0));
    let setter = {
        let step = step.clone();
        s.spawn_exec(move |_, _| {
            step.store(1, Ordering::SeqCst);
            Ok(())
        })
    };
    let broadcaster = {
        let (pool, step) = (pool.clone(), step.clone());
        std::thread::spawn(move || pool.broadcast(move |_| Ok(step.load(Ordering::SeqCst))))
    };
    // Wait until the broadcast's share sits behind the setter on `home`
    // (queues say so only through the metrics).
    eventually("the broadcast queues behind the setter", || {
        pool.metrics().workers[home].queued >= 2
    });
    assert!(!broadcaster.is_finished(), "broadcast skipped a busy VM");
    g.release();
    blocker.wait().unwrap();
    setter.wait().unwrap();
    let seen = within("broadcast returns", move || broadcaster.join().unwrap());
    assert_eq!(seen[home], Ok(1), "broadcast overtook queued session work");
    pool.shutdown().unwrap();
}

#[test]
fn broadcast_honours_the_default_timeout() {
    let pool = IslePool::builder()
        .workers(2)
        .default_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let results = within("a looping broadcast times out", move || {
        pool.broadcast(|lua| lua.load("while true do end").exec())
    });
    assert_eq!(results, vec![Err(IsleError::Timeout); 2]);
}
