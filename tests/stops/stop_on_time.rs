//! A stop reaches the caller on time, whatever the VM is doing: inside a Rust
//! callback, a long C function or the compiler. A VM that does not let go
//! within its grace period is wedged, and replaced; shutdown and drop do not
//! wait for it.
//!
//! No timing is asserted: a blocked callback is held by a gate that is
//! released only after the caller got its answer, so a late answer hangs,
//! and every wait runs under a watchdog (`within`), so a hang fails the
//! test. Tests whose VM spins in C code forever run in a child process.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::front::{each_kind, fronts, Fronts, Kind};
use common::{gate, within, Gate, GateFn, PATIENCE};
use mlua_isle::{Isle, IsleError, IslePool, Task};

/// A grace period short enough for tests to see a VM replaced.
pub(crate) const GRACE: Duration = Duration::from_millis(100);
/// A grace period no test run reaches: the VM must never be replaced.
const NO_REPLACEMENT: Duration = Duration::from_secs(3600);

/// Fronts whose init registers `block()` (held by the gate). The gate
/// releases whichever callback takes its token first: a test that leaves a
/// VM blocked behind (detached) needs a gate per front.
fn blocking_fronts(grace: Duration) -> (Fronts, Gate) {
    let (gate, block) = gate();
    let fronts = fronts()
        .stop_grace(grace)
        .init(move |lua| block.clone().register(lua, "block"));
    (fronts, gate)
}

fn blocking_pool(workers: usize, grace: Duration) -> (IslePool, Gate) {
    let (gate, block) = gate();
    let pool = IslePool::builder()
        .workers(workers)
        .stop_grace(grace)
        .init(move |lua| block.clone().register(lua, "block"))
        .build()
        .unwrap();
    (pool, gate)
}

pub(crate) fn wait_within<T: Send + 'static>(what: &str, task: Task<T>) -> Result<T, IsleError> {
    within(what, move || task.wait())
}

#[test]
fn cancel_answers_the_caller_while_a_rust_callback_blocks() {
    let (fronts, gate) = blocking_fronts(NO_REPLACEMENT);
    fronts.each(|front| {
        front.eval::<()>("kept = 'yes'").unwrap();
        let task = front.spawn_call::<()>("block", ());
        gate.wait_started();
        task.cancel();
        // Without the fix this waits for the release, which comes only after.
        assert_eq!(
            wait_within("a cancelled callback's caller", task),
            Err(IsleError::Cancelled),
            "{front}"
        );
        gate.release();
        // The VM got back, dropped the late result, and serves on.
        assert_eq!(
            front.eval::<String>("kept"),
            Ok("yes".to_string()),
            "{front}"
        );
        assert_eq!(front.wedged(), 0);
        front.shutdown().unwrap();
    });
}

#[test]
fn a_time_limit_answers_the_caller_while_a_rust_callback_blocks() {
    let (fronts, gate) = blocking_fronts(NO_REPLACEMENT);
    fronts.each(|front| {
        let task = front
            .spawn_call::<()>("block", ())
            .timeout(Duration::from_millis(20));
        gate.wait_started();
        assert_eq!(
            wait_within("a timed-out callback's caller", task),
            Err(IsleError::Timeout),
            "{front}"
        );
        gate.release();
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
        front.shutdown().unwrap();
    });
}

#[test]
fn a_default_timeout_answers_while_an_exec_closure_blocks() {
    let fronts = fronts()
        .default_timeout(Duration::from_millis(20))
        .stop_grace(NO_REPLACEMENT);
    fronts.each(|front| {
        let (gate, block) = gate();
        let task = front.spawn_exec(move |_| {
            block.block();
            Ok(())
        });
        gate.wait_started();
        assert_eq!(
            wait_within("a blocked closure's caller", task),
            Err(IsleError::Timeout),
            "{front}"
        );
        gate.release();
        assert_eq!(front.eval::<i64>("2 + 2"), Ok(4));
        front.shutdown().unwrap();
    });
}

/// Counts its drops: the late value of a stopped request is dropped, once,
/// on the VM thread, and nobody receives it.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn the_late_result_of_a_stopped_request_is_dropped_once() {
    fronts().stop_grace(NO_REPLACEMENT).each(|front| {
        let (gate, block) = gate();
        let drops = Arc::new(AtomicUsize::new(0));
        let task = {
            let drops = drops.clone();
            front.spawn_exec(move |_| {
                block.block();
                Ok(Counted(drops))
            })
        };
        gate.wait_started();
        task.cancel();
        assert!(matches!(
            wait_within("a cancelled closure's caller", task),
            Err(IsleError::Cancelled)
        ));
        gate.release();
        // Requests run in order: once this one ran, the late value is gone.
        assert_eq!(front.eval::<i64>("1"), Ok(1));
        assert_eq!(drops.load(Ordering::SeqCst), 1, "{front}");
        front.shutdown().unwrap();
    });
}

#[test]
fn a_pool_replaces_a_wedged_worker_and_its_sessions_are_lost_once() {
    let (gate, block) = gate();
    let (freed_tx, freed) = crossbeam_channel::unbounded();
    let pool = IslePool::builder()
        .workers(2)
        .stop_grace(GRACE)
        .init(move |lua| {
            lua.globals().set("freed", Freed(freed_tx.clone()))?;
            block.clone().register(lua, "block")
        })
        .build()
        .unwrap();
    let tenant = pool.session("tenant");
    tenant.eval::<()>("x = 1").unwrap();
    let stuck = tenant.spawn_call::<()>("block", ());
    gate.wait_started();
    // Queued behind the stuck request, on the same VM.
    let behind = tenant.spawn_eval::<i64>("x");
    stuck.cancel();
    assert_eq!(
        wait_within("the stuck request's caller", stuck),
        Err(IsleError::Cancelled)
    );
    // One grace period later the worker is replaced; the session's state
    // was in the stuck VM.
    assert_eq!(
        wait_within("a request queued behind the wedged VM", behind),
        Err(IsleError::SessionLost)
    );
    // Once: the next request starts a fresh session.
    assert_eq!(tenant.eval::<Option<i64>>("x"), Ok(None));
    // The fresh VM ran init.
    assert_eq!(tenant.eval::<bool>("block ~= nil"), Ok(true));
    let m = pool.metrics();
    assert_eq!(m.workers.iter().map(|w| w.wedged).sum::<u64>(), 1, "{m:?}");
    // Unkeyed work flows on both VMs.
    let tasks: Vec<_> = (0..20)
        .map(|i| pool.spawn_eval::<i64>(format!("{i} * 2")))
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(wait_within("unkeyed work", t), Ok(i as i64 * 2));
    }
    // Released, the stuck thread gets back, drops its VM and exits.
    assert!(freed.is_empty());
    gate.release();
    common::expect_msg(&freed, "the detached worker frees its VM");
    pool.shutdown().unwrap();
    for _ in 0..2 {
        common::expect_msg(&freed, "the live VMs are freed at shutdown");
    }
}

/// Sends on its channel when dropped: a VM holding one in its globals
/// says when it is freed.
struct Freed(crossbeam_channel::Sender<()>);

impl Drop for Freed {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl mlua_isle::mlua::UserData for Freed {}

#[test]
fn an_isle_replaces_a_wedged_vm_and_runs_init_again() {
    let (gate, block) = gate();
    let (freed_tx, freed) = crossbeam_channel::unbounded();
    let isle = Isle::builder()
        .stop_grace(GRACE)
        .init(move |lua| {
            lua.globals().set("freed", Freed(freed_tx.clone()))?;
            block.clone().register(lua, "block")
        })
        .build()
        .unwrap();
    isle.eval::<()>("kept = 1").unwrap();
    let stuck = isle.spawn_call::<()>("block", ());
    gate.wait_started();
    let queued = isle.spawn_eval::<i64>("41 + 1");
    stuck.cancel();
    assert_eq!(
        wait_within("the stuck request's caller", stuck),
        Err(IsleError::Cancelled)
    );
    // A fresh VM takes over the queue after the grace period.
    assert_eq!(wait_within("the request queued behind", queued), Ok(42));
    assert_eq!(isle.wedged(), 1);
    assert_eq!(isle.eval::<bool>("block ~= nil and kept == nil"), Ok(true));
    assert!(freed.is_empty(), "the stuck VM is still in its callback");
    // Released, the stuck thread gets back, drops its late result and its
    // VM (with what init put there), and exits.
    gate.release();
    common::expect_msg(&freed, "the detached thread frees its VM");
    isle.shutdown().unwrap();
    common::expect_msg(&freed, "the fresh VM is freed at shutdown");
}

#[test]
fn shutdown_timeout_detaches_a_vm_stuck_in_rust() {
    // A gate per front: a release meant for a detached VM of one front must
    // not let the next front's callback through.
    each_kind(|kind| {
        let (fronts, gate) = blocking_fronts(GRACE);
        let front = fronts.build(kind);
        let stuck = front.spawn_call::<()>("block", ());
        gate.wait_started();
        let queued = front.spawn_eval::<i64>("1");
        let handle = front.clone();
        let r = within("shutdown_timeout", move || {
            handle.shutdown_timeout(Duration::from_millis(20))
        });
        // The message names the stuck thread.
        match r {
            Err(IsleError::Wedged(m)) => assert!(m.contains("mlua-isle"), "{m} {front}"),
            other => panic!("expected Wedged, got {other:?} {front}"),
        }
        assert_eq!(
            wait_within("the stuck request", stuck),
            Err(IsleError::Shutdown),
            "{front}"
        );
        assert_eq!(
            wait_within("the queued request", queued),
            Err(IsleError::Shutdown),
            "{front}"
        );
        assert_eq!(front.eval::<i64>("1"), Err(IsleError::Shutdown));
        gate.release();
    });
}

#[test]
fn shutdown_timeout_detaches_one_pool_worker_stuck_in_rust() {
    let (pool, gate) = blocking_pool(2, GRACE);
    let stuck = pool.spawn_call::<()>("block", ());
    gate.wait_started();
    let handle = pool.clone();
    let r = within("shutdown_timeout", move || {
        handle.shutdown_timeout(Duration::from_millis(20))
    });
    assert!(matches!(r, Err(IsleError::Wedged(_))), "{r:?}");
    assert_eq!(
        wait_within("the stuck request", stuck),
        Err(IsleError::Shutdown)
    );
    gate.release();
}

#[test]
fn graceful_shutdown_stops_waiting_for_a_wedged_vm() {
    // A gate per front: a release meant for a detached VM of one front must
    // not let the next front's callback through.
    each_kind(|kind| {
        let (fronts, gate) = blocking_fronts(GRACE);
        let front = fronts.build(kind);
        let stuck = front.spawn_call::<()>("block", ());
        gate.wait_started();
        stuck.cancel();
        assert_eq!(
            wait_within("the stuck request", stuck),
            Err(IsleError::Cancelled),
            "{front}"
        );
        let handle = front.clone();
        let r = within("shutdown", move || handle.shutdown());
        // Replaced before the shutdown began (Ok), or found wedged during it.
        assert!(
            matches!(r, Ok(()) | Err(IsleError::Wedged(_))),
            "{r:?} {front}"
        );
        gate.release();
    });
}

#[test]
fn dropping_the_last_handle_does_not_wait_for_a_stuck_vm() {
    // A gate per front: a release meant for a detached VM of one front must
    // not let the next front's callback through.
    each_kind(|kind| {
        let (fronts, gate) = blocking_fronts(GRACE);
        let front = fronts.build(kind);
        let stuck = front.spawn_call::<()>("block", ());
        gate.wait_started();
        within("dropping the last handle", move || drop(front));
        let r = wait_within("the stuck request", stuck);
        assert!(
            matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
            "{r:?}"
        );
        gate.release();
    });
}

#[test]
fn huge_durations_mean_no_limit() {
    let (gate, block): (Gate, GateFn) = gate();
    let fronts = fronts()
        .default_timeout(Duration::MAX)
        .stop_grace(Duration::MAX)
        .init(move |lua| block.clone().register(lua, "block"));
    fronts.each(|front| {
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
        let mut task = front.spawn_eval::<i64>("2").timeout(Duration::MAX);
        assert_eq!(task.wait_timeout(Duration::MAX), Some(Ok(2)), "{front}");
        let stuck = front.spawn_call::<()>("block", ());
        gate.wait_started();
        stuck.cancel();
        assert_eq!(
            wait_within("cancel", stuck),
            Err(IsleError::Cancelled),
            "{front}"
        );
        gate.release();
        assert_eq!(front.shutdown_timeout(Duration::MAX), Ok(()), "{front}");
    });
}

/// A C function that runs for seconds: `table.move` (5.3 on; Lua 5.2 has
/// none), else `table.remove` moving 2^30 elements.
#[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
const LONG_C_FUNCTION: &str = "table.move({}, 1, 1e15, 2)";
#[cfg(feature = "lua52")]
const LONG_C_FUNCTION: &str =
    "table.remove(setmetatable({}, {__len = function() return 2^30 end}), 1)";

/// Long C functions: the caller is answered at once, the VM is replaced
/// after the grace period, and work goes on. (The stuck thread spins until
/// the child process exits.) PUC-Rio Lua 5.2 on (5.2 without
/// `table.move`): Luau's `table.move` refuses such a range, and 5.1 has
/// none.
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
#[test]
fn long_c_functions_answer_on_time_and_their_vm_is_replaced() {
    common::in_child(
        "long_c_functions_answer_on_time_and_their_vm_is_replaced",
        || {
            // `hit`, a Rust function (no Lua instruction a hook could stop
            // at), says "started" from inside the C function, on its
            // first read through `__index`.
            for script in [
                #[cfg(not(feature = "lua52"))]
                "table.move(setmetatable({}, {__index = hit}), 1, 1e15, 2)",
                // Lua 5.3's `table.remove` checks `pos <= size + 1`, which
                // overflows for `math.maxinteger` ("position out of
                // bounds"), and 5.2's takes the length as an `int` (and has
                // no `math.maxinteger`): 2^30 moves still take seconds.
                #[cfg(not(any(feature = "lua52", feature = "lua53")))]
                "table.remove(setmetatable({}, {__index = hit, __len = function() return math.maxinteger end}), 1)",
                #[cfg(not(feature = "lua52"))]
                "table.insert(setmetatable({}, {__index = hit, __len = function() return math.maxinteger - 1 end}), 1, 'x')",
                #[cfg(feature = "lua53")]
                "table.remove(setmetatable({}, {__index = hit, __len = function() return 2^30 end}), 1)",
                #[cfg(feature = "lua53")]
                "table.insert(setmetatable({}, {__index = hit, __len = function() return 2^30 end}), 1, 'x')",
                // Lua 5.2's move elements raw (no `__index`): `hit_len`, a
                // Rust function too, says "started" as the C function asks
                // the length.
                #[cfg(feature = "lua52")]
                "table.remove(setmetatable({}, {__len = hit_len}), 1)",
                #[cfg(feature = "lua52")]
                "table.insert(setmetatable({}, {__len = hit_len}), 1, 'x')",
            ] {
                let (tx, started) = crossbeam_channel::unbounded();
                let isle = Isle::builder()
                    .stop_grace(GRACE)
                    .spawn(move |lua| {
                        let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
                        let say = move || {
                            if first.swap(false, Ordering::SeqCst) {
                                let _ = tx.send(());
                            }
                        };
                        let said = say.clone();
                        let hit = lua.create_function(move |_, ()| {
                            said();
                            Ok(())
                        })?;
                        let hit_len = lua.create_function(move |_, _: mlua_isle::mlua::Value| {
                            say();
                            Ok(1_i64 << 30)
                        })?;
                        lua.globals().set("hit_len", hit_len)?;
                        lua.globals().set("hit", hit)
                    })
                    .unwrap();
                let task = isle.spawn_eval::<()>(script);
                common::expect_msg(&started, "the C function runs");
                // A limit that has passed stops the running request at once.
                let task = task.timeout(Duration::ZERO);
                assert_eq!(wait_within(script, task), Err(IsleError::Timeout));
                let next = isle.spawn_eval::<i64>("1 + 1");
                assert_eq!(wait_within("the next request", next), Ok(2), "{script}");
                assert_eq!(isle.wedged(), 1, "{script}");
                // Shutdown does not wait for the detached thread.
                within("shutdown", move || isle.shutdown()).unwrap();
            }

            let pool = IslePool::builder()
                .workers(2)
                .stop_grace(GRACE)
                .build()
                .unwrap();
            let task = pool.spawn_eval::<()>(LONG_C_FUNCTION);
            let token = task.cancel_token().clone();
            let running = pool.spawn_eval::<i64>("1");
            assert_eq!(wait_within("the other VM", running), Ok(1));
            token.cancel();
            assert!(matches!(
                wait_within(LONG_C_FUNCTION, task),
                Err(IsleError::Cancelled)
            ));
            let tasks: Vec<_> = (0..10)
                .map(|i| pool.spawn_eval::<i64>(format!("{i}")))
                .collect();
            for (i, t) in tasks.into_iter().enumerate() {
                assert_eq!(wait_within("unkeyed work", t), Ok(i as i64));
            }
            // Replaced already, or detached now: either way, on time.
            let _ = within("pool shutdown", move || {
                pool.shutdown_timeout(Duration::from_secs(1))
            });
        },
    );
}

#[cfg(not(feature = "luau"))]
#[test]
fn a_long_compile_answers_on_time() {
    common::in_child("a_long_compile_answers_on_time", || {
        let isle = Isle::builder().stop_grace(GRACE).spawn(|_| Ok(())).unwrap();
        // Chains long enough to keep the compiler busy for a while: given
        // to `eval`, and built by the script and given to `load`.
        let or_chain = format!("return x{}", " or x".repeat(2_000_000));
        let elseif_chain = format!("if x then {} end", "elseif x then ".repeat(200_000));
        let built = "return load('return x' .. string.rep(' or x', 2000000))";
        for source in [or_chain, elseif_chain, built.to_string()] {
            let task = isle
                .spawn_eval::<()>(source)
                .timeout(Duration::from_millis(10));
            assert_eq!(wait_within("compile", task), Err(IsleError::Timeout));
            let next = isle.spawn_eval::<i64>("1 + 1");
            assert_eq!(wait_within("the next request", next), Ok(2));
        }
        within("shutdown", move || isle.shutdown()).unwrap();
    });
}

/// Sends its word when dropped (a VM holding one in its globals says when
/// it is freed).
struct Says(crossbeam_channel::Sender<&'static str>, &'static str);

impl Drop for Says {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

impl mlua_isle::mlua::UserData for Says {}

/// A VM whose stopped request ends just as its replacement starts (while
/// the fresh VM runs `init`) keeps its slot, and the fresh VM exits
/// unserved: one server at a time, which shutdown finds and joins, and
/// both VMs freed. Here the
/// replacement's `init` lets the stuck callback return and waits until the
/// old VM has served the request queued behind it (or has exited), which
/// makes that moment certain.
fn a_vm_back_while_its_replacement_starts(kind: Kind) {
    let (gate, block) = gate();
    let gate = Arc::new(gate);
    let runs = Arc::new(AtomicUsize::new(0));
    let (events_tx, events) = crossbeam_channel::unbounded();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let front = {
        let (gate, runs, seen, events) = (gate.clone(), runs.clone(), seen.clone(), events.clone());
        let events_tx = events_tx.clone();
        fronts()
            .stop_grace(GRACE)
            .init(move |lua| {
                lua.globals()
                    .set("freed", Says(events_tx.clone(), "freed"))?;
                if runs.fetch_add(1, Ordering::SeqCst) == 1 {
                    // The replacement starts: the stuck VM gets back now.
                    gate.release();
                    if let Ok(event) = events.recv_timeout(PATIENCE) {
                        seen.lock().unwrap().push(event);
                    }
                }
                block.clone().register(lua, "block")
            })
            .build(kind)
    };
    let stuck = front.spawn_call::<()>("block", ());
    gate.wait_started();
    let next = front.spawn_exec(move |_| {
        let _ = events_tx.send("served");
        Ok(())
    });
    stuck.cancel();
    assert_eq!(
        wait_within("the stuck request", stuck),
        Err(IsleError::Cancelled)
    );
    assert_eq!(wait_within("the request behind it", next), Ok(()));
    assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
    // Back before the replacement was ready: not replaced after all.
    assert_eq!(front.wedged(), 0);
    within("shutdown", move || front.shutdown()).unwrap();
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    while seen.iter().filter(|e| **e == "freed").count() < 2 {
        seen.push(common::expect_msg(&events, "both VMs are freed"));
    }
    seen.extend(events.try_iter());
    seen.sort_unstable();
    assert_eq!(seen, ["freed", "freed", "served"]);
}

/// Found by `a_long_collection_answers_on_time`, whose collection can end
/// about one grace period after the cancel: its shutdown then hung.
#[test]
fn an_isle_vm_back_while_its_replacement_starts_keeps_the_queue() {
    a_vm_back_while_its_replacement_starts(Kind::Isle);
}

#[test]
fn a_pool_worker_back_while_its_replacement_starts_keeps_the_slot() {
    a_vm_back_while_its_replacement_starts(Kind::Pool);
}
