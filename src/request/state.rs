//! One request: its state machine and its completion slot.
//!
//! A request is one `Arc<Request<T>>` shared by three parties: the caller's
//! [`Task`](crate::Task), any [`CancelToken`] clones, and the job in a
//! queue (`vm/job.rs`). Exactly one party resolves it, decided by the `phase` CAS:
//!
//! ```text
//!   QUEUED ──(VM: start)──► RUNNING ──(VM: finish)──► DONE
//!      │                       └──(stop)──► DONE   (the VM discards its late result)
//!      └──(cancel / timeout / shutdown / job dropped unrun)──► DONE
//! ```
//!
//! Whoever moves `phase` to `DONE` writes the result, so a request resolves
//! exactly once. A stop `reason` (cancel, timeout, shutdown) is recorded
//! separately: the VM's hook polls it while the request runs.
//!
//! A stop answers the caller on time, whatever the VM is doing: the stopper
//! interrupts the VM, gives it `LET_GO` (20 µs) to finish on its own, and
//! otherwise resolves the request itself, rather than waiting for the VM to
//! get back from a Rust callback, a long C function or the collector. The
//! VM throws its late result away when it returns; if it does not return
//! within the owner's grace period, the owner treats it as wedged
//! (`timer.rs`, `Watch`). A stop made by the request's own work (on its VM
//! thread) leaves the resolving to the VM, which is right there.
//!
//! `state/loom_tests.rs` checks all this under loom (`src/sync/mod.rs`).

use std::mem::MaybeUninit;
use std::task::Waker;
use std::time::Instant;

use super::room::Admission;
use super::spin::{spin_hot, spin_until};
use super::Reason;
use crate::sync::{fence, AtomicBool, AtomicU32, AtomicU8, Condvar, Mutex, Ordering};
use crate::IsleError;

thread_local! {
    /// The header of the request whose work runs on this thread (0: none).
    static RUNNING_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks `header`'s work as running on this thread until dropped.
struct RunningHere(usize);

impl RunningHere {
    fn enter(header: &Header) -> RunningHere {
        RunningHere(RUNNING_HERE.replace(header as *const Header as usize))
    }
}

impl Drop for RunningHere {
    fn drop(&mut self) {
        RUNNING_HERE.set(self.0);
    }
}

/// How long a stopper lets a running request's VM finish on its own before
/// answering the caller itself. Lua code stops within microseconds of the
/// interrupt (and a request about to finish, finishes): its own result, the
/// stop reason or its value, then stands. Past this, the VM is in Rust or C
/// code the interrupt cannot reach, and the caller is answered without it.
const LET_GO: std::time::Duration = std::time::Duration::from_micros(20);

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// The type-independent part of a request.
pub(crate) struct Header {
    /// `QUEUED`, `RUNNING` or `DONE`; see the module docs.
    phase: AtomicU8,
    /// 0, or the first `Reason` the request was stopped for.
    reason: AtomicU8,
    /// The isle or pool the request belongs to (blocking waits from its VM
    /// threads would deadlock).
    pub(crate) owner: u64,
    /// When it was submitted: time limits count from here.
    pub(crate) submitted: Instant,
    /// The alarm of the VM thread running it, 0 until it runs (or when its
    /// VM's hook ticks on its own), and how to raise it (see
    /// `interrupt/alarm`): a stop interrupts the VM through these.
    alarm: AtomicU32,
    raise: Raise,
    /// Set when the request counts against a `queue_capacity`: the room it
    /// holds (in up to two rooms: see `room.rs`), given back once, by
    /// whoever takes the request out of `QUEUED` (its VM starting it, or a
    /// stop resolving it), so a request that resolved while queued holds
    /// no room.
    admission: Mutex<Option<Admission>>,
    admitted: AtomicBool,
    /// Set while the request's work waits for a future (the `async`
    /// feature): its VM is serving other requests, so a stop resolves it at
    /// once and wakes `resume`, the VM's waker for it, to drop the work.
    #[cfg(feature = "async")]
    suspended: AtomicBool,
    #[cfg(feature = "async")]
    resume: Mutex<Option<Waker>>,
}

impl Header {
    pub(crate) fn reason(&self) -> Option<Reason> {
        // ORDERING: Acquire pairs with the Release CAS in `stop`; the value is
        // only a flag, but readers act on it right away.
        Reason::from_u8(self.reason.load(Ordering::Acquire))
    }

    pub(crate) fn is_done(&self) -> bool {
        self.phase.load(Ordering::Acquire) == DONE
    }

    /// Lets this request hold `admission` (room taken for it) until it
    /// leaves `QUEUED`. Called before the job is queued, so the VM that
    /// starts it sees the flag (the queue publishes it); a stop may race
    /// with this call (a time limit that had passed, say).
    pub(crate) fn admit(&self, admission: Admission) {
        *self.admission.lock() = Some(admission);
        // ORDERING: Release for the VM (see above); the fence below orders
        // it against a racing stop.
        self.admitted.store(true, Ordering::Release);
        // ORDERING: SeqCst fence between raising `admitted` and reading
        // `phase`, paired with the one in `release_admission_after_stop`
        // (the store-buffer pattern): either we see the stop's claim here,
        // or the stopper sees `admitted`. Without it both could miss, and
        // the room would never be given back.
        fence(Ordering::SeqCst);
        // Resolved by a stop that did not see the flag: nobody else will
        // give the room back.
        // ORDERING: Acquire pairs with the claim's AcqRel.
        if self.phase.load(Ordering::Acquire) != QUEUED {
            self.release_admission();
        }
    }

    /// `release_admission` for a stop that resolved the request while
    /// queued: it may race with `admit`.
    fn release_admission_after_stop(&self) {
        // ORDERING: SeqCst fence between the claim of `phase` and the read
        // of `admitted`; see `admit`.
        fence(Ordering::SeqCst);
        self.release_admission();
    }

    /// Gives back the room this request held in its queue, once.
    fn release_admission(&self) {
        // ORDERING: Acquire pairs with the Release in `admit`.
        if self.admitted.load(Ordering::Acquire) {
            // Dropped outside the lock: the room may wake a waiter.
            let admission = self.admission.lock().take();
            drop(admission);
        }
    }
}

/// Raises the alarm with the given id (0: none), interrupting the VM thread
/// that runs the request. Given to [`Request::new`] by the layer that knows
/// VMs, so that this one knows none.
pub(crate) type Raise = fn(u32);

/// The operations a `CancelToken` needs, without knowing `T`.
pub(crate) trait Cancel: Send + Sync {
    fn header(&self) -> &Header;
    /// Records `reason` and resolves the request with it now, unless it has
    /// finished. Returns true if it was running: its VM is being
    /// interrupted and must let go of it within the owner's grace period.
    fn stop(&self, reason: Reason) -> bool;
}

/// A request producing `T`.
///
/// `repr(C)`: the fields stay in this order, so the gaps keep `ready` apart.
#[repr(C)]
pub(crate) struct Request<T> {
    header: Header,
    _gap_before: Gap,
    /// Set (Release) once `slot.result` holds the result; lets waiters spin
    /// without the lock. Alone between two gaps: the VM writes the rest of
    /// the request while the caller spins on this.
    ready: AtomicBool,
    _gap_after: Gap,
    slot: Mutex<Completion<T>>,
    cond: Condvar,
}

/// 128 unused bytes: a cache line and the neighbour x86-64 prefetches with
/// it. A field with a gap on each side shares neither with another field.
///
/// Not `CachePadded`, which would do the same by aligning the request to
/// 128 bytes: an allocation aligned past 16 bytes goes through
/// `posix_memalign`, which in glibc costs several hundred instructions more
/// than `malloc`, on every request (measured with callgrind: about a sixth
/// of a tiny pool request's own instructions).
#[derive(Clone, Copy)]
struct Gap {
    _bytes: [MaybeUninit<u8>; 128],
}

impl Gap {
    const NEW: Gap = Gap {
        _bytes: [MaybeUninit::uninit(); 128],
    };
}

struct Completion<T> {
    result: Option<Result<T, IsleError>>,
    waker: Option<Waker>,
    taken: bool,
}

impl<T> Request<T> {
    pub(crate) fn new(owner: u64, raise: Raise) -> Self {
        Request {
            header: Header {
                phase: AtomicU8::new(QUEUED),
                reason: AtomicU8::new(0),
                owner,
                submitted: Instant::now(),
                alarm: AtomicU32::new(0),
                raise,
                admission: Mutex::new(None),
                admitted: AtomicBool::new(false),
                #[cfg(feature = "async")]
                suspended: AtomicBool::new(false),
                #[cfg(feature = "async")]
                resume: Mutex::new(None),
            },
            _gap_before: Gap::NEW,
            ready: AtomicBool::new(false),
            _gap_after: Gap::NEW,
            slot: Mutex::new(Completion {
                result: None,
                waker: None,
                taken: false,
            }),
            cond: Condvar::new(),
        }
    }

    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    /// Writes the result and wakes whoever waits. Only the party that moved
    /// `phase` to `DONE` calls this.
    fn resolve(&self, result: Result<T, IsleError>) {
        let waker = {
            let mut slot = self.slot.lock();
            debug_assert!(slot.result.is_none() && !slot.taken);
            slot.result = Some(result);
            // ORDERING: Release publishes the write above to `is_ready`
            // spinners, who then take the lock anyway.
            self.ready.store(true, Ordering::Release);
            slot.waker.take()
        };
        self.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Moves `from` → `DONE`; true if this call won the right to resolve.
    fn claim(&self, from: u8) -> bool {
        // ORDERING: AcqRel so the winner sees everything the request's
        // creator wrote, and the loser's later reads see the winner's.
        self.header
            .phase
            .compare_exchange(from, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Resolves a request that never started. No-op if it already did.
    pub(crate) fn abandon(&self, err: IsleError) {
        if self.claim(QUEUED) {
            self.header.release_admission();
            self.resolve(Err(err));
        }
    }

    /// Resolves a request that never started with what `work` gives, run
    /// after the request is claimed (so no stop can resolve it meanwhile)
    /// and before its waiters wake. False, and `work` is not run, if it
    /// was resolved already (stopped).
    pub(crate) fn resolve_unstarted(&self, work: impl FnOnce() -> Result<T, IsleError>) -> bool {
        if !self.claim(QUEUED) {
            return false;
        }
        self.header.release_admission();
        self.resolve(work());
        true
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Blocks until the result is in or `deadline` passes; true if it is in.
    /// Spins briefly first, whatever the request's state: a parked thread
    /// wakes slowly, most requests finish within microseconds, and a
    /// waiter that parks costs the VM thread a wake-up when it resolves
    /// the request (see `spin.rs`).
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> bool {
        if spin_until(|| self.is_ready()) {
            return true;
        }
        let mut slot = self.slot.lock();
        while slot.result.is_none() && !slot.taken {
            match deadline {
                None => self.cond.wait(&mut slot),
                Some(d) => {
                    if self.cond.wait_until(&mut slot, d).timed_out() {
                        return slot.result.is_some();
                    }
                }
            }
        }
        true
    }

    /// Takes the result if it is in; `None` before, and once it was taken
    /// (a `Task` hands out its result once).
    pub(crate) fn try_take(&self) -> Option<Result<T, IsleError>> {
        let mut slot = self.slot.lock();
        let r = slot.result.take();
        slot.taken |= r.is_some();
        r
    }

    /// Like `try_take`, but registers `waker` when the result is not in yet.
    ///
    /// # Panics
    /// If the result was taken already: a future polled after it returned
    /// `Ready`.
    pub(crate) fn poll_take(&self, waker: &Waker) -> Option<Result<T, IsleError>> {
        let mut slot = self.slot.lock();
        assert!(
            !slot.taken,
            "mlua_isle::Task polled after it returned its result"
        );
        if slot.result.is_none() {
            match &mut slot.waker {
                Some(w) if w.will_wake(waker) => {}
                w => *w = Some(waker.clone()),
            }
            return None;
        }
        drop(slot);
        self.try_take()
    }
}

impl<T: Send> Cancel for Request<T> {
    fn header(&self) -> &Header {
        &self.header
    }

    fn stop(&self, reason: Reason) -> bool {
        if self.header.is_done() {
            return false; // finished first: nothing to change
        }
        // ORDERING: AcqRel/Release pairs with `Header::reason`'s Acquire load
        // in the VM's hook.
        let _ = self.header.reason.compare_exchange(
            0,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let reason = self.header.reason().unwrap_or(reason);
        if self.claim(QUEUED) {
            self.header.release_admission_after_stop();
            self.resolve(Err(reason.error()));
            return false;
        }
        // Suspended (waiting for a future): its VM is not in it, so nothing
        // needs interrupting. Resolve it now and wake the VM to drop its work.
        #[cfg(feature = "async")]
        if self.stop_suspended(reason) {
            return false;
        }
        // Not queued: it runs (or has just finished). Interrupt it first, so
        // the VM starts unwinding while we answer the caller; the CAS that
        // marked it running published the alarm id.
        (self.header.raise)(self.header.alarm.load(Ordering::Relaxed));
        // Stopped by its own work (a callback cancelling its request, the
        // budget running out): the VM is not stuck, it is right here, and
        // resolves the request itself when the work returns.
        let here = RUNNING_HERE.get() == &self.header as *const Header as usize;
        if here || spin_hot(LET_GO, || self.header.is_done()) {
            return false;
        }
        if self.claim(RUNNING) {
            self.resolve(Err(reason.error()));
            return true;
        }
        false
    }
}

/// The VM side of a request: starting it and handing in its result.
impl<T> Request<T> {
    /// Marks a queued request running on a VM thread whose alarm is `alarm`
    /// (see `Header::alarm`). False if it was resolved while queued: then
    /// it must not run.
    pub(crate) fn start(&self, alarm: u32) -> bool {
        // Published by the CAS below (see `Cancel::stop`).
        self.header.alarm.store(alarm, Ordering::Relaxed);
        // ORDERING: see `claim`.
        if self
            .header
            .phase
            .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.header.release_admission();
        true
    }

    /// Marks the request's work as running on this thread until the guard
    /// is dropped: a stop made from here leaves the resolving to the VM.
    pub(crate) fn running_here(&self) -> impl Drop + '_ {
        RunningHere::enter(&self.header)
    }

    /// Resolves a running request with the VM's `result`. Gives the result
    /// back if a stopper resolved the request first (the caller was told
    /// the stop reason; the late result is the VM's to drop).
    pub(crate) fn finish(&self, result: Result<T, IsleError>) -> Result<(), Result<T, IsleError>> {
        if self.claim(RUNNING) {
            self.resolve(result);
            Ok(())
        } else {
            Err(result)
        }
    }
}

/// Suspended requests (the `async` feature): the VM parks a request whose
/// work waits for a future, and takes it up again when the future wakes.
///
/// The handshake with a stopper is the store-buffer pattern: the VM writes
/// `suspended`, fences, reads `reason`; the stopper writes `reason`, fences,
/// reads `suspended`. Either the stopper sees the request suspended (and
/// resolves it, the VM not being in it), or the VM sees the reason (and
/// stops the work itself, as for a running request).
#[cfg(feature = "async")]
impl<T> Request<T> {
    /// The VM parks the request; `waker` takes it up again. False if it was
    /// stopped meanwhile: the VM must stop its work now instead.
    pub(crate) fn suspend(&self, waker: &Waker) -> bool {
        *self.header.resume.lock() = Some(waker.clone());
        // ORDERING: SeqCst store and fence, then the reason: see above.
        self.header.suspended.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.header.reason().is_none()
    }

    /// The VM takes the request up again (its future woke). False if it
    /// was stopped: the VM must drop its work, not poll it.
    pub(crate) fn unsuspend(&self) -> bool {
        // ORDERING: as in `suspend`.
        self.header.suspended.store(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.header.reason().is_none()
    }

    /// A stopper's side of the handshake, after recording `reason`: true
    /// if the request was suspended, and is now resolved (unless it had
    /// finished) and its VM woken to drop the work.
    fn stop_suspended(&self, reason: Reason) -> bool {
        // ORDERING: fence between the reason (written above, in `stop`)
        // and reading `suspended`: see above.
        fence(Ordering::SeqCst);
        if !self.header.suspended.load(Ordering::SeqCst) {
            return false;
        }
        if self.claim(RUNNING) {
            self.resolve(Err(reason.error()));
        }
        let waker = self.header.resume.lock().take();
        if let Some(w) = waker {
            w.wake();
        }
        true
    }
}

#[cfg(all(test, mlua_isle_loom))]
mod loom_tests;
