//! Nothing leaks: every value a request holds (captured by its `exec`
//! closure) or returns is dropped, however the request ends: completed,
//! cancelled while queued or while running, timed out, panicking, its
//! `Task` dropped or detached, shut down with work queued, refused, or stuck
//! on a wedged VM that is replaced. Each test runs on every front end (an
//! isle, a pool, a session) and, once every handle is shut down, checks that
//! as many values were dropped as were created.
//!
//! Values are counted by a [`Ledger`]; Rust drops each value at most once,
//! so "created == dropped" means "each dropped exactly once".

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::front::{each_kind, fronts, Front, Kind};
use common::{eventually, expect_msg, gate, register_signal, within, Gate, GateFn};
use crossbeam_channel::Receiver;
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{IsleError, IslePool, Task};

/// A stop grace no test reaches: a VM held in a closure past its stop is
/// never replaced (the wedged case has a test of its own).
const NO_REPLACEMENT: Duration = Duration::from_secs(3600);

/// Counts the [`Counted`] values it made and the ones dropped.
#[derive(Default)]
struct Ledger {
    created: AtomicUsize,
    dropped: AtomicUsize,
}

/// A value that tells its ledger when it is dropped.
#[derive(Debug)]
struct Counted(Arc<Ledger>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} created, {} dropped",
            self.created.load(Ordering::SeqCst),
            self.dropped.load(Ordering::SeqCst)
        )
    }
}

impl Ledger {
    fn new() -> Arc<Ledger> {
        Arc::default()
    }

    fn value(self: &Arc<Self>) -> Counted {
        self.created.fetch_add(1, Ordering::SeqCst);
        Counted(self.clone())
    }

    fn balanced(&self) -> bool {
        self.created.load(Ordering::SeqCst) == self.dropped.load(Ordering::SeqCst)
    }

    /// Every value made was dropped, and there were `at_least` of them.
    fn assert_balanced(&self, at_least: usize, what: &str) {
        assert!(
            self.created.load(Ordering::SeqCst) >= at_least,
            "{what}: {self:?}, expected {at_least} or more"
        );
        assert!(self.balanced(), "{what} leaked: {self:?}");
    }
}

/// An `exec` closure that holds one value and returns another.
fn carrier(ledger: &Arc<Ledger>) -> impl FnOnce(&Lua) -> mlua::Result<Counted> + Send + 'static {
    let held = ledger.value();
    let ledger = ledger.clone();
    move |_| {
        let _held = held;
        Ok(ledger.value())
    }
}

/// An `exec` closure that holds one value, blocks on the gate, then returns
/// another.
fn blocked_carrier(
    ledger: &Arc<Ledger>,
    block: GateFn,
) -> impl FnOnce(&Lua) -> mlua::Result<Counted> + Send + 'static {
    let held = ledger.value();
    let ledger = ledger.clone();
    move |_| {
        let _held = held;
        block.block();
        Ok(ledger.value())
    }
}

/// An `exec` closure that holds one value, runs Lua that reports
/// `started()` and loops until stopped, swallows the stop, and returns
/// another value (which the VM must then drop).
fn looping_carrier(
    ledger: &Arc<Ledger>,
) -> impl FnOnce(&Lua) -> mlua::Result<Counted> + Send + 'static {
    let held = ledger.value();
    let ledger = ledger.clone();
    move |lua| {
        let _held = held;
        let _ = lua.load("started() while true do end").exec();
        Ok(ledger.value())
    }
}

/// Blocks `front`'s VM in a closure that holds a value; returns the gate and
/// the blocker's task.
fn block(front: &Front, ledger: &Arc<Ledger>) -> (Gate, Task<Counted>) {
    let (gate, block) = gate();
    let blocker = front.spawn_exec(blocked_carrier(ledger, block));
    gate.wait_started();
    (gate, blocker)
}

/// A front of `kind` with `started()`, which reports on the returned
/// channel, and a stop grace no test reaches.
fn front(kind: Kind) -> (Front, Receiver<()>) {
    let (tx, started) = crossbeam_channel::unbounded();
    let front = fronts()
        .stop_grace(NO_REPLACEMENT)
        .init(move |lua| register_signal(lua, "started", tx.clone()))
        .build(kind);
    (front, started)
}

/// Runs `scenario` on a fresh front of each kind under a watchdog, and
/// checks the ledger once the front is shut down and every handle is gone.
fn on_every_front(at_least: usize, scenario: fn(&Front, &Receiver<()>, &Arc<Ledger>)) {
    each_kind(|kind| {
        let ledger = Ledger::new();
        let l = ledger.clone();
        within("the scenario", move || {
            let (front, started) = front(kind);
            scenario(&front, &started, &l);
            front.shutdown().unwrap();
        });
        // Shut down and joined: the VM has dropped all it held.
        ledger.assert_balanced(at_least, &format!("on the {kind:?} front"));
    });
}

#[test]
fn completed_requests_drop_what_they_held_and_returned() {
    on_every_front(40, |front, _, ledger| {
        for _ in 0..10 {
            let v = front.exec(carrier(ledger)).unwrap();
            drop(v);
        }
        let tasks: Vec<Task<Counted>> =
            (0..10).map(|_| front.spawn_exec(carrier(ledger))).collect();
        for t in tasks {
            t.wait().unwrap();
        }
    });
}

#[test]
fn a_request_cancelled_while_queued_drops_its_closure() {
    on_every_front(3, |front, _, ledger| {
        let (gate, blocker) = block(front, ledger);
        let queued = front.spawn_exec(carrier(ledger));
        queued.cancel();
        assert!(matches!(queued.wait(), Err(IsleError::Cancelled)));
        gate.release();
        blocker.wait().unwrap();
    });
}

#[test]
fn a_request_cancelled_while_running_drops_its_closure_and_late_result() {
    on_every_front(4, |front, started, ledger| {
        // Lua code interrupted; the closure swallows the stop and returns.
        let task = front.spawn_exec(looping_carrier(ledger));
        expect_msg(started, "the loop started");
        task.cancel();
        assert!(matches!(task.wait(), Err(IsleError::Cancelled)));
        // A Rust closure answered for while it still runs.
        let (gate, blocker) = block(front, ledger);
        blocker.cancel();
        assert!(matches!(blocker.wait(), Err(IsleError::Cancelled)));
        gate.release();
        // Requests run in order: once this answers, both have finished.
        assert_eq!(front.eval::<i64>("1"), Ok(1));
        assert!(ledger.balanced(), "{ledger:?}");
    });
}

#[test]
fn a_timed_out_request_drops_its_closure_and_late_result() {
    on_every_front(5, |front, started, ledger| {
        let task = front
            .spawn_exec(looping_carrier(ledger))
            .timeout(Duration::from_millis(20));
        expect_msg(started, "the loop started");
        assert!(matches!(task.wait(), Err(IsleError::Timeout)));
        let (gate, blocker) = block(front, ledger);
        // Queued behind the blocker: times out in the queue.
        let queued = front
            .spawn_exec(carrier(ledger))
            .timeout(Duration::from_millis(20));
        assert!(matches!(queued.wait(), Err(IsleError::Timeout)));
        let blocker = blocker.timeout(Duration::ZERO);
        assert!(matches!(blocker.wait(), Err(IsleError::Timeout)));
        gate.release();
        assert_eq!(front.eval::<i64>("1"), Ok(1));
        assert!(ledger.balanced(), "{ledger:?}");
    });
}

#[test]
fn a_panicking_closure_drops_what_it_held() {
    on_every_front(5, |front, _, ledger| {
        for _ in 0..2 {
            let held = ledger.value();
            let l = ledger.clone();
            let r = front.exec(move |_| -> mlua::Result<()> {
                let _held = held;
                let _made = l.value();
                panic!("planned panic, holding two values");
            });
            assert!(matches!(r, Err(IsleError::Panic(_))), "{r:?}");
        }
        // And a closure that fails with a Lua error.
        let held = ledger.value();
        let r = front.exec(move |_| -> mlua::Result<()> {
            let _held = held;
            Err(mlua::Error::runtime("refused"))
        });
        assert!(matches!(r, Err(IsleError::Lua(_))), "{r:?}");
        assert!(ledger.balanced(), "{ledger:?}");
    });
}

#[test]
fn a_dropped_or_detached_task_drops_its_result() {
    on_every_front(7, |front, _, ledger| {
        // Finished, never read.
        let unread = front.spawn_exec(carrier(ledger));
        assert_eq!(front.eval::<i64>("0"), Ok(0)); // requests run in order
        assert!(unread.is_finished());
        drop(unread);
        // Detached: nobody will read it.
        front.spawn_exec(carrier(ledger)).detach();
        // Dropped while queued (which cancels it), and while running.
        let (gate, blocker) = block(front, ledger);
        drop(front.spawn_exec(carrier(ledger)));
        drop(blocker);
        gate.release();
        assert_eq!(front.eval::<i64>("1"), Ok(1));
        assert!(ledger.balanced(), "{ledger:?}");
    });
}

/// Work queued behind a blocker when the owner goes, one of three ways.
fn queued_at_shutdown(kind: Kind, how: &str) {
    let ledger = Ledger::new();
    let l = ledger.clone();
    let how_ = how.to_string();
    within("shutdown with work queued", move || {
        let (front, started) = front(kind);
        let running = front.spawn_exec(looping_carrier(&l));
        expect_msg(&started, "the loop started");
        let queued: Vec<Task<Counted>> = (0..20).map(|_| front.spawn_exec(carrier(&l))).collect();
        match how_.as_str() {
            "shutdown_timeout" => {
                assert_eq!(front.shutdown_timeout(Duration::from_millis(20)), Ok(()));
            }
            _ => drop(front), // the last handle
        }
        assert!(running.wait().is_err());
        for t in queued {
            assert_eq!(t.wait().err(), Some(IsleError::Shutdown));
        }
    });
    ledger.assert_balanced(22, &format!("{how} on the {kind:?} front"));
}

#[test]
fn shutdown_drops_the_closures_of_queued_work() {
    each_kind(|kind| {
        // Graceful: the queued work runs, and its results are dropped with
        // the tasks.
        let ledger = Ledger::new();
        let l = ledger.clone();
        within("a graceful shutdown with work queued", move || {
            let (front, _) = front(kind);
            let (gate, blocker) = block(&front, &l);
            let queued: Vec<Task<Counted>> =
                (0..20).map(|_| front.spawn_exec(carrier(&l))).collect();
            let shutting = {
                let front = front.clone();
                std::thread::spawn(move || front.shutdown())
            };
            eventually("shutdown begins", || front.is_closed());
            // Refused at once: its closure is dropped unrun.
            let late = front.spawn_exec(carrier(&l));
            assert_eq!(late.wait().err(), Some(IsleError::Shutdown));
            gate.release();
            assert_eq!(shutting.join().unwrap(), Ok(()));
            blocker.wait().unwrap();
            for t in queued {
                t.wait().unwrap();
            }
        });
        ledger.assert_balanced(43, &format!("shutdown on the {kind:?} front"));
        queued_at_shutdown(kind, "shutdown_timeout");
        queued_at_shutdown(kind, "dropping the last handle");
    });
}

#[test]
fn a_wedged_vm_that_is_replaced_drops_everything_once_it_gets_back() {
    each_kind(|kind| {
        let ledger = Ledger::new();
        let l = ledger.clone();
        let (gate, block) = gate();
        let gate = Arc::new(gate);
        let g = gate.clone();
        let front = fronts().stop_grace(Duration::from_millis(100)).build(kind);
        let f = front.clone();
        within("a wedged VM is replaced", move || {
            f.eval::<()>("x = 1").unwrap(); // binds the session
            let stuck = f.spawn_exec(blocked_carrier(&l, block));
            g.wait_started();
            let behind = f.spawn_exec(carrier(&l));
            stuck.cancel();
            assert!(matches!(stuck.wait(), Err(IsleError::Cancelled)));
            // One grace period later a fresh VM serves the queue; a session's
            // state went with the stuck VM.
            let r = behind.wait();
            match kind {
                Kind::Session => assert!(matches!(r, Err(IsleError::SessionLost)), "{r:?}"),
                Kind::Isle | Kind::Pool => assert!(r.is_ok(), "{r:?}"),
            }
            assert_eq!(f.wedged(), 1);
            // The caller is answered before the job is dropped: once the next
            // request has answered, the fresh VM is done with `behind`.
            assert_eq!(f.eval::<i64>("1"), Ok(1));
        });
        // Everything but what the stuck VM holds is gone.
        let created = ledger.created.load(Ordering::SeqCst);
        assert_eq!(created, 3 - kind_lost(kind), "{ledger:?}");
        assert_eq!(ledger.dropped.load(Ordering::SeqCst), created - 1);
        gate.release();
        within("shutdown", move || front.shutdown()).unwrap();
        // The detached thread frees its VM when it gets back; nothing
        // reports that, so wait for the count.
        eventually("the detached VM drops what it held", || ledger.balanced());
        ledger.assert_balanced(1, &format!("on the {kind:?} front"));
    });
}

/// Values a request lost with its session never makes (it does not run).
fn kind_lost(kind: Kind) -> usize {
    match kind {
        Kind::Session => 1,
        Kind::Isle | Kind::Pool => 0,
    }
}

// ===== pool only =====

#[test]
fn sessions_broadcasts_and_refused_requests_leak_nothing() {
    let ledger = Ledger::new();
    let l = ledger.clone();
    within("a pool with sessions", move || {
        let pool = IslePool::builder()
            .workers(2)
            .queue_capacity(8)
            .stop_grace(NO_REPLACEMENT)
            .build()
            .unwrap();
        let sessions: Vec<_> = (0..4).map(|k| pool.session(k)).collect();
        let tasks: Vec<Task<Counted>> = sessions
            .iter()
            .flat_map(|s| {
                (0..2).map(|_| {
                    let c = carrier(&l);
                    s.spawn_exec(move |lua, _| c(lua))
                })
            })
            .collect();
        for t in tasks {
            t.wait().unwrap();
        }
        // A broadcast holds one value, shared by every VM's run.
        let held = l.value();
        let l2 = l.clone();
        let results = pool.broadcast(move |_| {
            let _held = &held;
            Ok(l2.value())
        });
        assert!(results.iter().all(Result::is_ok));
        drop(results);
        // Both VMs blocked: one in a session, which is then closed with work
        // queued (which runs first), the other in unkeyed work.
        let s = &sessions[0];
        let (gate, block) = gate();
        let in_session = {
            let c = blocked_carrier(&l, block.clone());
            s.spawn_exec(move |lua, _| c(lua))
        };
        gate.wait_started();
        let unkeyed = pool.spawn_exec(blocked_carrier(&l, block));
        gate.wait_started();
        let queued: Vec<Task<Counted>> = (0..3)
            .map(|_| {
                let c = carrier(&l);
                s.spawn_exec(move |lua, _| c(lua))
            })
            .collect();
        assert!(s.close());
        // Past the queue capacity: refused at once, closures dropped.
        let more: Vec<Task<Counted>> = (0..10).map(|_| pool.spawn_exec(carrier(&l))).collect();
        assert!(more.iter().any(Task::is_finished), "nothing was refused");
        gate.release();
        gate.release();
        in_session.wait().unwrap();
        unkeyed.wait().unwrap();
        for t in queued {
            t.wait().unwrap();
        }
        for t in more {
            let r = t.wait();
            assert!(matches!(r, Ok(_) | Err(IsleError::QueueFull)), "{r:?}");
        }
        pool.shutdown().unwrap();
    });
    ledger.assert_balanced(40, "a pool with sessions");
}
