//! Recycling: a VM is replaced (init re-run) after `recycle_after` requests
//! or when a request leaves it above `recycle_when_memory_above`; sessions
//! it held are told with `SessionLost`, never silently reset.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::gate;
use mlua_isle::{IsleError, IslePool};

/// A one-worker pool whose init counts its runs in `runs`.
fn counting_pool(
    runs: &Arc<AtomicUsize>,
    configure: impl FnOnce(mlua_isle::IslePoolBuilder) -> mlua_isle::IslePoolBuilder,
) -> IslePool {
    let runs = runs.clone();
    configure(IslePool::builder().workers(1))
        .init(move |lua| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            lua.globals().set("GENERATION", n)
        })
        .build()
        .unwrap()
}

#[test]
fn a_vm_is_replaced_after_recycle_after_requests() {
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = counting_pool(&runs, |b| b.recycle_after(3));
    pool.eval::<()>("leftover = true").unwrap(); // request 1
    assert_eq!(pool.eval::<bool>("leftover"), Ok(true)); // 2
    assert_eq!(pool.eval::<i64>("GENERATION"), Ok(1)); // 3: recycled after this
    assert_eq!(pool.eval::<Option<bool>>("leftover"), Ok(None));
    assert_eq!(pool.eval::<i64>("GENERATION"), Ok(2));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let m = pool.metrics();
    assert_eq!(m.workers[0].recycled, 1);
    assert_eq!(m.workers[0].recycle_failures, 0);
    pool.shutdown().unwrap();
}

#[test]
fn a_session_on_a_recycled_vm_is_told_once_then_starts_fresh() {
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = counting_pool(&runs, |b| b.recycle_after(4));
    let s = pool.session("tenant");
    s.eval::<()>("cart = 3").unwrap(); // 1
    assert_eq!(s.eval::<i64>("cart"), Ok(3)); // 2
    pool.eval::<()>("").unwrap(); // 3
    pool.eval::<()>("").unwrap(); // 4: recycled after this
    assert_eq!(s.eval::<i64>("cart"), Err(IsleError::SessionLost));
    // Told once; the next request starts a fresh session.
    assert_eq!(s.eval::<Option<i64>>("cart"), Ok(None));
    s.eval::<()>("cart = 1").unwrap();
    assert_eq!(s.eval::<i64>("cart"), Ok(1));
    // A session that was not on the VM is not affected.
    assert_eq!(pool.session("new").eval::<Option<i64>>("cart"), Ok(None));
}

#[test]
fn queued_requests_of_a_lost_session_all_fail() {
    let (gate, block) = gate();
    let pool = IslePool::builder()
        .workers(1)
        .recycle_after(3)
        .init(move |lua| block.clone().register(lua, "block"))
        .build()
        .unwrap();
    let s = pool.session(7u8);
    s.eval::<()>("n = 1").unwrap(); // request 1
                                    // Request 2 holds the only VM while four session requests queue up.
    let holder = pool.spawn_eval::<()>("block()");
    gate.wait_started();
    let tasks: Vec<_> = (0..4).map(|_| s.spawn_eval::<Option<i64>>("n")).collect();
    gate.release();
    assert_eq!(holder.wait(), Ok(()));
    // Request 3 sees the state; the VM is recycled after it, and the three
    // queued behind it were meant for the old state.
    let results: Vec<_> = tasks.into_iter().map(|t| t.wait()).collect();
    assert_eq!(results[0], Ok(Some(1)));
    for r in &results[1..] {
        assert_eq!(*r, Err(IsleError::SessionLost));
    }
    assert_eq!(s.eval::<Option<i64>>("n"), Ok(None));
}

#[test]
fn a_vm_left_above_the_memory_threshold_is_replaced() {
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = counting_pool(&runs, |b| b.recycle_when_memory_above(4 << 20));
    pool.eval::<()>("small = {}").unwrap();
    assert_eq!(pool.eval::<bool>("small ~= nil"), Ok(true));
    pool.eval::<()>("big = {} for i = 1, 1e6 do big[i] = i end")
        .unwrap();
    // The worker recycles before it takes the next request.
    assert_eq!(pool.eval::<bool>("big == nil and small == nil"), Ok(true));
    assert_eq!(pool.eval::<i64>("GENERATION"), Ok(2));
    assert_eq!(pool.metrics().workers[0].recycled, 1);
}

#[test]
fn a_failed_recycle_keeps_the_old_vm_and_is_counted() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let pool = IslePool::builder()
        .workers(1)
        .recycle_after(2)
        .init(move |_| {
            if r2.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(())
            } else {
                Err(mlua_isle::mlua::Error::runtime("init fails from now on"))
            }
        })
        .build()
        .unwrap();
    pool.eval::<()>("kept = 1").unwrap();
    pool.eval::<()>("").unwrap(); // recycling fails after this
    assert_eq!(pool.eval::<i64>("kept"), Ok(1));
    let m = pool.metrics();
    assert_eq!(
        (m.workers[0].recycled, m.workers[0].recycle_failures),
        (0, 1)
    );
}

#[test]
fn the_ledger_counts_session_lost_as_failed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let pool = counting_pool(&runs, |b| b.recycle_after(1));
    let s = pool.session("a");
    s.eval::<()>("x = 1").unwrap(); // recycled after this
    assert_eq!(s.eval::<()>("x = 2"), Err(IsleError::SessionLost));
    pool.shutdown().unwrap();
    let m = pool.metrics();
    let w = &m.workers[0];
    assert_eq!((w.completed, w.failed, w.cancelled), (1, 1, 0));
    assert_eq!(m.submitted, 2);
}
