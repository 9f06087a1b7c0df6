//! The Lua `task` library (`task_library(true)`, the `async` feature):
//! `task.sleep`, `task.spawn` with `:join()` and `:cancel()`, and children
//! that belong to the request that spawned them.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::within;
use mlua_isle::{IsleError, IslePool};

/// A pool with the task library and `wait_for(name)`: an async function
/// that is pending until the test opens that gate (`open(name)` from Lua
/// or [`Gates::open`] from the test); `entered()` counts callers waiting.
struct Gates {
    pool: IslePool,
    open: Arc<parking_lot::Mutex<std::collections::HashMap<String, bool>>>,
    wakers: Arc<parking_lot::Mutex<Vec<std::task::Waker>>>,
    waiting: Arc<AtomicUsize>,
}

impl Gates {
    fn new(workers: usize) -> Gates {
        let open: Arc<parking_lot::Mutex<std::collections::HashMap<String, bool>>> = Arc::default();
        let wakers: Arc<parking_lot::Mutex<Vec<std::task::Waker>>> = Arc::default();
        let waiting = Arc::new(AtomicUsize::new(0));
        let (o, w, n) = (open.clone(), wakers.clone(), waiting.clone());
        let pool = IslePool::builder()
            .workers(workers)
            .task_library(true)
            .init(move |lua| {
                let (o, w, n) = (o.clone(), w.clone(), n.clone());
                let wait_for = lua.create_async_function(move |_, name: String| {
                    let (o, w, n) = (o.clone(), w.clone(), n.clone());
                    n.fetch_add(1, Ordering::SeqCst);
                    // Counts the future out when it ends or is dropped.
                    let guard = Leave(n);
                    async move {
                        let _guard = guard;
                        std::future::poll_fn(|cx| {
                            if o.lock().get(&name).copied().unwrap_or(false) {
                                std::task::Poll::Ready(())
                            } else {
                                w.lock().push(cx.waker().clone());
                                std::task::Poll::Pending
                            }
                        })
                        .await;
                        Ok(name)
                    }
                })?;
                lua.globals().set("wait_for", wait_for)
            })
            .build()
            .unwrap();
        Gates {
            pool,
            open,
            wakers,
            waiting,
        }
    }

    fn open(&self, name: &str) {
        self.open.lock().insert(name.to_string(), true);
        for w in self.wakers.lock().drain(..) {
            w.wake();
        }
    }
}

struct Leave(Arc<AtomicUsize>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn sleep_suspends_and_returns() {
    let g = Gates::new(1);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            g.pool
                .spawn_eval::<i64>(format!("task.sleep(0.01) return {i}"))
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(within("a sleeping request", move || t.wait()), Ok(i as i64));
    }
    let e = g.pool.eval::<()>("task.sleep(-1)").unwrap_err();
    assert!(e.to_string().contains("seconds must be"), "{e}");
}

#[test]
fn spawned_children_run_at_once_and_join_in_order() {
    let g = Gates::new(1);
    let t = g.pool.spawn_eval::<(String, String)>(
        "local a = task.spawn(wait_for, 'a') local b = task.spawn(wait_for, 'b')
         return a:join(), b:join()",
    );
    // Both children wait at the same time, inside one request.
    assert!(common::poll_until(|| g.waiting.load(Ordering::SeqCst) == 2));
    g.open("b");
    g.open("a");
    assert_eq!(
        within("joining two children", move || t.wait()),
        Ok(("a".to_string(), "b".to_string()))
    );
}

#[test]
fn join_raises_the_childs_error_and_an_unjoined_failure_fails_the_request() {
    let g = Gates::new(1);
    let e = g
        .pool
        .eval::<()>("local t = task.spawn(function() error('child broke') end) t:join()")
        .unwrap_err();
    assert!(e.to_string().contains("child broke"), "{e}");
    // Never joined: its error is not lost.
    let e = g
        .pool
        .eval::<()>(
            "task.spawn(function() error('forgotten child broke') end) task.sleep(0.001) return",
        )
        .unwrap_err();
    assert!(e.to_string().contains("forgotten child broke"), "{e}");
    // Joined twice: the second join says so.
    let e = g
        .pool
        .eval::<()>("local t = task.spawn(function() return 1 end) t:join() t:join()")
        .unwrap_err();
    assert!(e.to_string().contains("joined already"), "{e}");
}

#[test]
fn children_end_with_their_request() {
    let g = Gates::new(1);
    // The request returns while its child still waits: the child is
    // cancelled, not left behind.
    g.pool
        .eval::<()>("task.spawn(wait_for, 'never') task.sleep(0.001)")
        .unwrap();
    assert!(common::poll_until(|| g.waiting.load(Ordering::SeqCst) == 0));
    // Cancelling the request cancels its children.
    let t = g
        .pool
        .spawn_eval::<()>("local c = task.spawn(wait_for, 'x') c:join()");
    assert!(common::poll_until(|| g.waiting.load(Ordering::SeqCst) == 1));
    t.cancel();
    assert_eq!(
        within("a cancelled parent", move || t.wait()),
        Err(IsleError::Cancelled)
    );
    // The child's future was dropped with its parent.
    assert!(common::poll_until(|| g.waiting.load(Ordering::SeqCst) == 0));
    assert_eq!(g.pool.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn a_cancelled_child_cannot_be_joined() {
    let g = Gates::new(1);
    let e = g
        .pool
        .eval::<()>("local c = task.spawn(wait_for, 'y') c:cancel() task.sleep(0.001) c:join()")
        .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
}

#[test]
fn the_task_library_works_in_the_sandbox_and_is_read_only() {
    let isle = mlua_isle::Isle::builder()
        .sandbox(true)
        .task_library(true)
        .build()
        .unwrap();
    let r: i64 = isle
        .eval(
            "local t = task.spawn(function(x) task.sleep(0) return x * 2 end, 21) return t:join()",
        )
        .unwrap();
    assert_eq!(r, 42);
    assert!(isle.eval::<()>("task.sleep = nil").is_err());
    assert!(isle.eval::<()>("task.spawn = print").is_err());
}

#[test]
fn there_is_no_task_global_unless_asked_for() {
    let isle = mlua_isle::Isle::builder().build().unwrap();
    assert_eq!(isle.eval::<bool>("task == nil"), Ok(true));
}

/// Children that each end before the hook's first tick on their thread
/// (a new Lua thread starts its countdown afresh): each spawn is charged
/// one interval against the budget, so a loop of short children stops at
/// the budget, not many times past it.
#[test]
#[cfg(not(feature = "luau"))]
fn short_children_are_counted_against_the_budget() {
    common::in_child("short_children_are_counted_against_the_budget", || {
        within("short children", || {
            const BUDGET: u64 = 200_000;
            let isle = mlua_isle::Isle::builder()
                .task_library(true)
                .max_instructions(BUDGET)
                .spawn(|_| Ok(()))
                .unwrap();
            let r = isle.eval::<()>(
                "work = 0
                 local hs = {}
                 while true do
                     for k = 1, 200 do
                         hs[k] = task.spawn(function() for _ = 1, 400 do end end)
                     end
                     for k = 1, 200 do hs[k]:join() end
                     work = work + 80000
                 end",
            );
            assert!(matches!(r, Err(IsleError::InstructionLimit)), "{r:?}");
            // The children's loops alone, which the budget must have covered.
            let work: f64 = isle.eval("return work").unwrap();
            assert!(work <= 2.0 * BUDGET as f64, "{work} ran");
        });
    });
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// A sleep dropped before its time (its coroutine collected, or its
/// request stopped) takes its entry out of the process-wide clock: a
/// tenant making and dropping sleeps of 31 years grew the host's memory
/// (outside `memory_limit`) by about 40 bytes each, for as long as they
/// would have slept.
#[test]
fn dropped_sleeps_leave_nothing_in_the_clock() {
    common::in_child("dropped_sleeps_leave_nothing_in_the_clock", || {
        within("dropped sleeps", || {
            let isle = mlua_isle::Isle::builder()
                .task_library(true)
                .memory_limit(16 << 20)
                .sandbox(true)
                .spawn(|_| Ok(()))
                .unwrap();
            let churn = "for i = 1, 150000 do coroutine.wrap(task.sleep)(1e9) end collectgarbage()";
            // The clock's thread started, the allocator settled.
            isle.eval::<()>(churn).unwrap();
            let before = rss_kib();
            for _ in 0..6 {
                isle.eval::<()>(churn).unwrap();
            }
            let grown = rss_kib().saturating_sub(before);
            assert!(
                grown < 8 << 10,
                "{grown} KiB grown by 900,000 dropped sleeps"
            );
        });
    });
}

/// A child that spawns another as it runs, for ever: each generation is
/// polled on a later pass, so the relay never holds the VM in one poll
/// (piling up finished children in host memory, which no `memory_limit`
/// counts): other requests are served meanwhile, and a cancel ends it.
#[test]
fn a_relay_of_children_does_not_hold_its_vm() {
    common::in_child("a_relay_of_children_does_not_hold_its_vm", || {
        within("relay of children", || {
            let isle = mlua_isle::Isle::builder()
                .task_library(true)
                .sandbox(true)
                .spawn(|_| Ok(()))
                .unwrap();
            let relay = isle.spawn_eval::<()>(
                "local function f() task.spawn(f) end task.spawn(f) task.sleep(1e9)",
            );
            for i in 0..100 {
                assert_eq!(isle.eval_with::<i64>("return ... + 1", i), Ok(i + 1));
            }
            relay.cancel();
            assert_eq!(relay.wait(), Err(IsleError::Cancelled));
            assert_eq!(isle.eval::<i64>("return 42"), Ok(42));
        });
    });
}

/// A failed child's error is a Rust copy of its message, outside the
/// memory limit, kept as long as its handle: it keeps at most 4 KiB of the
/// message, so children failing with a megabyte each cost the host little.
#[test]
fn a_failed_childs_error_keeps_a_few_kilobytes() {
    within("failed children", || {
        let isle = mlua_isle::Isle::builder()
            .task_library(true)
            .memory_limit(16 << 20)
            .spawn(|_| Ok(()))
            .unwrap();
        let joined: i64 = isle
            .eval(
                "local big = string.rep('x', 2^20) \
                 local h = task.spawn(function() error(big, 0) end) \
                 local ok, e = pcall(h.join, h) \
                 assert(not ok) return #tostring(e)",
            )
            .unwrap();
        assert!((1024..16 << 10).contains(&joined), "{joined} bytes");
        let r = isle.eval::<()>(
            "local big = string.rep('y', 2^20) \
             local last \
             for i = 1, 400 do last = task.spawn(function() error(big, 0) end) end \
             pcall(last.join, last)",
        );
        let Err(IsleError::Lua(e)) = r else {
            panic!("{r:?}")
        };
        assert!(e.message().contains("yyyy"), "{}", e.message());
        assert!(e.message().len() < 16 << 10, "{} bytes", e.message().len());
    });
}

/// A recycle whose fresh VM fails to start leaves the old VM serving, and
/// `task.spawn` with it (the failed VM's coroutines had taken the thread's
/// place, and every later spawn failed "not on a VM of mlua-isle").
#[test]
fn task_spawn_works_after_a_recycle_fails_to_start() {
    within("spawn after a failed recycle", || {
        let starts = Arc::new(AtomicUsize::new(0));
        let pool = {
            let starts = starts.clone();
            IslePool::builder()
                .workers(1)
                .task_library(true)
                .recycle_after(2)
                .init(move |_| {
                    if starts.fetch_add(1, Ordering::SeqCst) == 1 {
                        return Err(mlua_isle::mlua::Error::runtime("the second start fails"));
                    }
                    Ok(())
                })
                .build()
                .unwrap()
        };
        for i in 0..6_i64 {
            let r = pool.eval_with::<i64>(
                "local h = task.spawn(function(x) return x * 2 end, ...) return h:join()",
                i,
            );
            assert_eq!(r, Ok(i * 2), "request {i}");
        }
        assert!(pool.metrics().workers[0].recycle_failures >= 1);
        pool.shutdown().unwrap();
    });
}

/// `recycle_after` counts requests that suspended too: a VM whose requests
/// all wait on a future is recycled like any other (the count was looked
/// at only after a request that did not suspend).
#[test]
fn a_vm_whose_requests_all_suspend_is_recycled() {
    within("recycling suspending requests", || {
        let pool = IslePool::builder()
            .workers(1)
            .task_library(true)
            .recycle_after(2)
            .build()
            .unwrap();
        for _ in 0..10 {
            pool.eval::<()>("task.sleep(0.001)").unwrap();
        }
        // The recycle after the last one may come just after it resolved.
        common::eventually("recycled", || pool.metrics().workers[0].recycled >= 4);
        pool.shutdown().unwrap();
    });
}

/// A VM started by a recycle wakes its suspended requests too (its
/// wake-ups reached no one: the first request to suspend on it hung).
#[test]
fn a_recycled_vm_wakes_its_suspended_requests() {
    within("wake after recycle", || {
        let pool = IslePool::builder()
            .workers(1)
            .task_library(true)
            .recycle_after(1)
            .build()
            .unwrap();
        for i in 0..4 {
            assert_eq!(
                pool.eval::<i64>("task.sleep(0.01) return 1"),
                Ok(1),
                "request {i}"
            );
        }
        common::eventually("recycled", || pool.metrics().workers[0].recycled >= 3);
        pool.shutdown().unwrap();
    });
}
