//! Loom models of a request's phases, its completion slot and its queue
//! admission (see `src/sync/mod.rs`). Run with:
//!
//! ```sh
//! RUSTFLAGS="--cfg mlua_isle_loom -C debug-assertions" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --lib loom
//! ```
//!
//! (`LOOM_MAX_PREEMPTIONS=4` before it searches deeper, for minutes more.)
//!
//! The VM side is modelled as `start`, a look at the stop reason (what the
//! hook does), then `finish`. `resolve`'s `debug_assert!` catches a request
//! resolved twice. Not modelled: a stop made by the request's own work
//! (`running_here`), which involves one thread only, and deadlines (loom
//! has no clock; see `src/sync/mod.rs`).

use std::task::{Wake, Waker};

use loom::sync::Arc;
use loom::thread;

use super::*;
use crate::request::Room;
use crate::sync::check;

/// The preemption bound of these models (see `check`).
const PREEMPTIONS: usize = 3;

/// The alarm of the modelled VM thread.
const ALARM: u32 = 7;
const VALUE: i32 = 42;

/// A `Raise` for models with several stoppers: one may find the request
/// resolved by another while still queued, and raise "no alarm".
fn raise_any(alarm: u32) {
    assert!(alarm == 0 || alarm == ALARM);
}

/// A `Raise` for models with one stopper: it raises only when the VM took
/// the request, so it must see the VM's alarm.
fn raise_vm(alarm: u32) {
    assert_eq!(alarm, ALARM, "the stopper missed the VM's alarm");
}

/// What the modelled VM did: `None` if `start` refused the request, else
/// the result it produced and whether its `finish` won.
type VmRun = Option<(Result<i32, IsleError>, bool)>;

/// Runs the VM's side of `req`.
fn run_vm(req: &Request<i32>) -> VmRun {
    if !req.start(ALARM) {
        return None;
    }
    let result = match req.header().reason() {
        Some(reason) => Err(reason.error()),
        None => Ok(VALUE),
    };
    let won = req.finish(result.clone()).is_ok();
    Some((result, won))
}

fn spawn_vm(req: &Arc<Request<i32>>) -> thread::JoinHandle<VmRun> {
    let req = req.clone();
    thread::spawn(move || run_vm(&req))
}

fn spawn_stop(req: &Arc<Request<i32>>, reason: Reason) -> thread::JoinHandle<bool> {
    let req = req.clone();
    thread::spawn(move || req.stop(reason))
}

/// The caller's result: `wait` must see it, and it is there once.
fn caller_result(req: &Request<i32>) -> Result<i32, IsleError> {
    assert!(req.wait(None), "wait(None) returned without the result");
    req.try_take().expect("wait saw a result try_take did not")
}

/// Checks who resolved `req` against what its caller got.
fn check_outcome(req: &Request<i32>, vm: VmRun, took_over: usize, got: Result<i32, IsleError>) {
    assert!(took_over <= 1, "two stoppers resolved a running request");
    let stopped = req.header().reason().map(|r| Err(r.error()));
    match vm {
        // Stopped while queued: the stop's reason, from no running party.
        None => {
            assert_eq!(took_over, 0);
            assert_eq!(Some(got), stopped);
        }
        // The VM's claim won: its value (or the reason its hook saw).
        Some((produced, true)) => {
            assert_eq!(took_over, 0);
            assert_eq!(got, produced);
        }
        // A stopper took over the running request: its reason.
        Some((_, false)) => {
            assert_eq!(took_over, 1);
            assert_eq!(Some(got), stopped);
        }
    }
}

/// Two stops (a cancel and a time limit) race the VM's start and finish,
/// while the caller waits: exactly one party resolves, the caller gets one
/// result, and it is the VM's iff the VM's claim won.
#[test]
fn loom_two_stops_racing_the_vm_resolve_once() {
    check(PREEMPTIONS, || {
        let req = Arc::new(Request::<i32>::new(0, raise_any));
        let vm = spawn_vm(&req);
        let cancel = spawn_stop(&req, Reason::Cancelled);
        let timeout = spawn_stop(&req, Reason::Timeout);
        let got = caller_result(&req);
        let vm = vm.join().unwrap();
        let took_over = [cancel, timeout]
            .into_iter()
            .map(|h| h.join().unwrap() as usize)
            .sum();
        check_outcome(&req, vm, took_over, got);
    });
}

/// One stop races the VM: a request the stop resolved while queued never
/// runs, and a stop that finds it running raises the VM's alarm.
#[test]
fn loom_a_stop_racing_start_never_lets_a_resolved_request_run() {
    check(PREEMPTIONS, || {
        let req = Arc::new(Request::<i32>::new(0, raise_vm));
        let vm = spawn_vm(&req);
        let took_over = req.stop(Reason::Cancelled);
        let vm = vm.join().unwrap();
        let got = req.try_take().expect("resolved once every party is done");
        check_outcome(&req, vm, took_over as usize, got);
    });
}

/// The caller's `wait` and the VM's `resolve` never miss each other.
#[test]
fn loom_wait_never_misses_the_result() {
    check(PREEMPTIONS, || {
        let req = Arc::new(Request::<i32>::new(0, raise_vm));
        let vm = spawn_vm(&req);
        assert_eq!(caller_result(&req), Ok(VALUE));
        assert_eq!(vm.join().unwrap(), Some((Ok(VALUE), true)));
    });
}

/// Records that it was woken.
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: std::sync::Arc<Self>) {
        // ORDERING: Release, read with Acquire after the join; the join
        // orders it anyway.
        self.0.store(true, Ordering::Release);
    }
}

/// A poll that finds no result leaves a waker that `resolve` wakes.
#[test]
fn loom_poll_take_never_misses_the_wake_up() {
    check(PREEMPTIONS, || {
        let req = Arc::new(Request::<i32>::new(0, raise_vm));
        let woken = std::sync::Arc::new(Woken(AtomicBool::new(false)));
        let waker = Waker::from(woken.clone());
        let vm = spawn_vm(&req);
        let polled = req.poll_take(&waker);
        vm.join().unwrap();
        let got = match polled {
            Some(got) => got,
            None => {
                // ORDERING: see `Woken::wake`.
                assert!(woken.0.load(Ordering::Acquire), "the waker was never woken");
                req.poll_take(&waker).expect("woken without a result")
            }
        };
        assert_eq!(got, Ok(VALUE));
    });
}

/// A request holding room in two rooms (a pool's and a key's, say), and
/// the rooms.
fn admitted() -> (Arc<Request<i32>>, [std::sync::Arc<Room>; 2]) {
    let req = Arc::new(Request::<i32>::new(0, raise_any));
    let rooms = [Room::new(1), Room::new(1)];
    let [a, b] = rooms.each_ref().map(|r| r.try_acquire().expect("room"));
    req.header().admit(a.and(b));
    (req, rooms)
}

/// The room a queued request holds, in each of its rooms, is given back
/// exactly once, whoever takes it out of `QUEUED`: the VM starting it or a
/// stop; or, when the job is dropped unrun, `abandon` or a stop.
#[test]
fn loom_queue_room_is_given_back_once() {
    for runs in [true, false] {
        check(PREEMPTIONS, move || {
            let (req, rooms) = admitted();
            let holder = {
                let req = req.clone();
                thread::spawn(move || {
                    if runs {
                        run_vm(&req);
                    } else {
                        req.abandon(IsleError::Shutdown);
                    }
                })
            };
            req.stop(Reason::Cancelled);
            holder.join().unwrap();
            for room in &rooms {
                assert_eq!(room.taken(), 0, "room not given back once");
            }
            assert!(req.try_take().is_some());
        });
    }
}

/// A request stopped while it is being admitted (a time limit that has
/// passed already) gives its room back all the same.
#[test]
fn loom_a_stop_racing_admit_gives_the_room_back() {
    check(PREEMPTIONS, || {
        let req = Arc::new(Request::<i32>::new(0, raise_any));
        let room = Room::new(1);
        let stop = spawn_stop(&req, Reason::Timeout);
        req.header().admit(room.try_acquire().expect("room"));
        stop.join().unwrap();
        assert_eq!(room.taken(), 0, "room not given back");
    });
}

/// A suspended request (the `async` feature) woken while a stopper stops
/// it resolves once (`resolve` asserts it): if the VM takes it up, the
/// stopper may still stop it as a running request; if the VM finds it
/// stopped, the caller gets the stop, from the stopper or from the VM.
#[cfg(feature = "async")]
#[test]
fn loom_a_stop_racing_the_wake_up_of_a_suspended_request_resolves_it_once() {
    check(PREEMPTIONS, || {
        let req = Arc::new(Request::<i32>::new(1, raise_any));
        assert!(req.start(ALARM));
        assert!(req.suspend(Waker::noop()), "suspended before any stop");
        let stopper = spawn_stop(&req, Reason::Cancelled);
        // The VM: its future woke; it takes the request up, or drops it.
        let polled = req.unsuspend();
        let result = if polled {
            Ok(VALUE)
        } else {
            Err(IsleError::Cancelled)
        };
        let won = req.finish(result).is_ok();
        stopper.join().unwrap();
        let got = caller_result(&req);
        if !polled {
            // Stopped: whoever resolved it (the stopper, or the VM when the
            // stopper found it no longer suspended), the caller is told so.
            assert_eq!(got, Err(IsleError::Cancelled));
        }
        assert!(
            got == Ok(VALUE) || got == Err(IsleError::Cancelled),
            "{got:?}"
        );
        assert_eq!(got.is_ok(), won && polled);
    });
}
