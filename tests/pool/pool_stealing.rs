//! Unkeyed work runs on whichever VM is free: a long request on one VM never
//! holds back work another VM could do, whether that work was queued before
//! or after the long request, and session work is never stolen.

use crate::common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{expect_msg, gate, register_signal, threads_asleep, worker_index, Flag, PATIENCE};
use crossbeam_channel::Receiver;
use mlua_isle::{IsleError, IslePool, Task};

/// A pool whose VMs know their index (`VM_ID`), report `started()` on the
/// returned channel, and can wait in a pure-Lua loop for `released()`.
fn pool_with_long_requests(workers: usize, name: &str) -> (IslePool, Receiver<()>, Flag) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let flag = Flag::default();
    let pool = {
        let flag = flag.clone();
        IslePool::builder()
            .workers(workers)
            .name(name)
            .init(move |lua| {
                lua.globals().set("VM_ID", worker_index())?;
                register_signal(lua, "started", tx.clone())?;
                flag.register(lua, "released")
            })
            .build()
            .unwrap()
    };
    (pool, rx, flag)
}

/// A request that reports `started()`, then runs Lua until the flag is
/// raised, and returns its VM's index.
const LONG: &str = "started(); while not released() do end; return VM_ID";

/// Waits for every small task (each returning `i` and its VM) with a bound.
fn wait_smalls(tasks: Vec<Task<(i64, usize)>>) -> BTreeSet<usize> {
    let mut vms = BTreeSet::new();
    for (i, mut t) in tasks.into_iter().enumerate() {
        let (n, vm) = t
            .wait_timeout(PATIENCE)
            .unwrap_or_else(|| panic!("small request {i} is held back"))
            .unwrap();
        assert_eq!(n, i as i64);
        vms.insert(vm);
    }
    vms
}

fn smalls(pool: &IslePool, range: std::ops::Range<usize>) -> Vec<Task<(i64, usize)>> {
    range
        .map(|i| pool.spawn_eval::<(i64, usize)>(format!("return {i}, VM_ID")))
        .collect()
}

#[test]
fn a_long_request_does_not_hold_back_unkeyed_work() {
    let (pool, started, flag) = pool_with_long_requests(2, "psLong");
    let long = pool.spawn_eval::<usize>(LONG);
    expect_msg(&started, "the long request started");
    let vms = wait_smalls(smalls(&pool, 0..100));
    assert!(!long.is_finished(), "the long request ended early");
    flag.raise();
    let long_vm = long.wait().unwrap();
    assert!(!vms.contains(&long_vm), "small work ran on the busy VM");
    pool.shutdown().unwrap();
}

#[test]
fn work_queued_behind_a_long_request_is_stolen() {
    // The long request and the small ones arrive together: the worker that
    // takes the long one may take a batch of the rest into its own deque, and
    // the other worker must steal them from there.
    let (pool, started, flag) = pool_with_long_requests(2, "psBatch");
    let long = pool.spawn_eval::<usize>(LONG);
    let tasks = smalls(&pool, 0..100);
    expect_msg(&started, "the long request started");
    wait_smalls(tasks);
    assert!(!long.is_finished());
    flag.raise();
    long.wait().unwrap();
    pool.shutdown().unwrap();
}

#[test]
fn work_queued_on_both_sides_of_a_long_request_is_stolen() {
    let (pool, started, flag) = pool_with_long_requests(2, "psMid");
    let mut tasks = smalls(&pool, 0..50);
    let long = pool.spawn_eval::<usize>(LONG);
    tasks.extend(smalls(&pool, 50..100));
    expect_msg(&started, "the long request started");
    wait_smalls(tasks);
    assert!(!long.is_finished());
    flag.raise();
    long.wait().unwrap();
    pool.shutdown().unwrap();
}

#[test]
fn one_idle_vm_serves_while_the_others_are_stuck() {
    let (pool, started, flag) = pool_with_long_requests(3, "psThree");
    let longs = [
        pool.spawn_eval::<usize>(LONG),
        pool.spawn_eval::<usize>(LONG),
    ];
    expect_msg(&started, "first long request started");
    expect_msg(&started, "second long request started");
    let vms = wait_smalls(smalls(&pool, 0..100));
    assert!(longs.iter().all(|t| !t.is_finished()));
    flag.raise();
    let busy: BTreeSet<usize> = longs.into_iter().map(|t| t.wait().unwrap()).collect();
    assert_eq!(busy.len(), 2, "both long requests ran on one VM?");
    assert!(vms.is_disjoint(&busy), "small work ran on a busy VM");
    pool.shutdown().unwrap();
}

#[test]
fn two_blocking_requests_run_in_parallel_on_two_vms() {
    let pool = IslePool::builder()
        .workers(2)
        .name("psPar")
        .build()
        .unwrap();
    // Both workers asleep (parked: nothing else puts an idle worker to sleep
    // in the kernel), so new work must wake them. The property holds either
    // way; this makes the test cover the wake-up path.
    assert!(
        threads_asleep(&["psPar-0".into(), "psPar-1".into()]),
        "the idle workers never parked"
    );
    let (g, gf) = gate();
    let tasks: Vec<Task<usize>> = (0..2)
        .map(|_| {
            let gf = gf.clone();
            pool.spawn_exec(move |_| {
                gf.block();
                Ok(worker_index())
            })
        })
        .collect();
    // Both are running before either is released.
    g.wait_started();
    g.wait_started();
    g.release();
    g.release();
    let vms: BTreeSet<usize> = tasks.into_iter().map(|t| t.wait().unwrap()).collect();
    assert_eq!(vms, BTreeSet::from([0, 1]));
    pool.shutdown().unwrap();
}

#[test]
fn unkeyed_work_spreads_over_every_vm() {
    // With every VM blocked in turn, each must have taken one request.
    let pool = IslePool::new(3, |_| Ok(())).unwrap();
    let (g, gf) = gate();
    let tasks: Vec<Task<usize>> = (0..3)
        .map(|_| {
            let gf = gf.clone();
            pool.spawn_exec(move |_| {
                gf.block();
                Ok(worker_index())
            })
        })
        .collect();
    for _ in 0..3 {
        g.wait_started();
    }
    for _ in 0..3 {
        g.release();
    }
    let vms: BTreeSet<usize> = tasks.into_iter().map(|t| t.wait().unwrap()).collect();
    assert_eq!(vms, BTreeSet::from([0, 1, 2]));
    pool.shutdown().unwrap();
}

#[test]
fn session_work_is_never_stolen_by_an_idle_vm() {
    let pool = IslePool::new(2, |lua| lua.globals().set("VM_ID", worker_index())).unwrap();
    let s = pool.session("pinned");
    let home: usize = s.eval("return VM_ID").unwrap();
    let (g, gf) = gate();
    let blocker = s.spawn_exec(move |_, _| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let ran = Arc::new(AtomicUsize::new(0));
    let queued: Vec<Task<(usize, usize)>> = (0..10)
        .map(|i| {
            let ran = ran.clone();
            s.spawn_exec(move |lua, _| {
                let order = ran.fetch_add(1, Ordering::SeqCst);
                assert_eq!(order, i, "session requests ran out of order");
                Ok((order, lua.globals().get::<usize>("VM_ID")?))
            })
        })
        .collect();
    // The other VM is idle and answers unkeyed work, yet leaves the
    // session's queue alone.
    for _ in 0..20 {
        assert_eq!(pool.eval::<usize>("return VM_ID"), Ok(1 - home));
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "session work was stolen");
    assert!(queued.iter().all(|t| !t.is_finished()));
    g.release();
    blocker.wait().unwrap();
    for (i, t) in queued.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok((i, home)));
    }
    pool.shutdown().unwrap();
}

#[test]
fn a_cancelled_long_request_frees_its_vm_for_stolen_work() {
    let (pool, started, _flag) = pool_with_long_requests(2, "psCan");
    let a = pool.spawn_eval::<usize>(LONG);
    let b = pool.spawn_eval::<usize>(LONG);
    expect_msg(&started, "first long request started");
    expect_msg(&started, "second long request started");
    let tasks = smalls(&pool, 0..20);
    a.cancel();
    assert_eq!(a.wait(), Err(IsleError::Cancelled));
    wait_smalls(tasks);
    assert!(!b.is_finished());
    b.cancel();
    assert_eq!(b.wait(), Err(IsleError::Cancelled));
    pool.shutdown().unwrap();
}

#[test]
fn a_wake_up_taken_by_session_work_is_passed_on_to_an_idle_worker() {
    // Both workers asleep; the unkeyed request's wake-up lands on a worker
    // that then picks the session's long request. The unkeyed one must not
    // wait behind it while the other worker sleeps.
    for round in 0..10 {
        let (gate, block) = gate();
        let pool = IslePool::builder()
            .workers(2)
            .name("psWake")
            .init(move |lua| block.clone().register(lua, "block"))
            .build()
            .unwrap();
        // Both workers have started up, and are parked.
        assert_eq!(pool.broadcast(|_| Ok(())).len(), 2);
        assert!(
            threads_asleep(&["psWake-0".into(), "psWake-1".into()]),
            "round {round}: the idle workers never parked"
        );
        let quick = pool.spawn_eval::<i64>("return 1");
        let long = pool
            .session(format!("k{round}"))
            .spawn_eval::<()>("block()");
        let mut quick = quick;
        let r = quick.wait_timeout(PATIENCE);
        assert_eq!(r, Some(Ok(1)), "round {round}");
        gate.wait_started();
        gate.release();
        assert_eq!(long.wait(), Ok(()));
    }
}
