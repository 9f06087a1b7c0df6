//! Room in a bounded queue (`queue_capacity`): how many live requests may
//! wait in it, and the callers waiting for room (`reserve`).
//!
//! A [`Room`] counts the room taken: by queued requests (until they start
//! or resolve: see `Header::admit`), by unused permits, and by waiters it
//! has handed room to. [`Admission`] is the room one request holds, in up
//! to two rooms; dropping it gives the room back.
//!
//! # Waiting
//!
//! Waiters queue in FIFO order. Room given back goes to the first waiter
//! directly (`hand_over`): the releaser takes it on the waiter's behalf,
//! marks the waiter granted and wakes it. A waiter dropped after it was
//! granted room gives it back, which hands it to the next one.
//!
//! One word, `state`, holds the count and the `WAITERS` bit (set while the
//! queue holds anyone). Because both live in one atomic, a releaser and a
//! registering waiter cannot miss each other: the waiter sets the bit with
//! a CAS that fails if the count changed, and the releaser's `fetch_sub`
//! returns the bit if it was set first. So the release without waiters is
//! one `fetch_sub`, as before waiting existed; and while anyone waits,
//! `try_acquire` refuses, so a plain submit cannot take room a waiter is
//! owed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, Mutex, Ordering, Parker, Unparker};

/// The bit of `Room::state` set while anyone waits.
const WAITERS: usize = 1 << (usize::BITS - 1);

/// A bounded count of queued requests, with callers waiting for room.
pub(crate) struct Room {
    capacity: usize,
    /// Room taken, plus `WAITERS` while `queue.waiters` is not empty.
    state: CachePadded<AtomicUsize>,
    queue: Mutex<Queue>,
}

struct Queue {
    /// In arrival order; each is `Waiting`.
    waiters: VecDeque<Arc<Waiter>>,
    /// The owner shut down: waiters are refused.
    closed: bool,
}

/// One waiting caller. Its status changes under the room's queue lock
/// (taken first) and its own.
struct Waiter(Mutex<WaiterState>);

struct WaiterState {
    status: Status,
    waker: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Waiting,
    /// Handed room (counted in `state` already).
    Granted,
    /// Refused: the room was closed.
    Closed,
}

/// Why no room was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Still full at the deadline.
    Full,
    /// The room was closed (its owner shut down).
    Closed,
}

impl Room {
    /// A room for `capacity` requests (at least 1; more than half the
    /// address space counts as unbounded in practice, and is clamped).
    pub(crate) fn new(capacity: usize) -> Arc<Room> {
        debug_assert!(capacity > 0, "checked by the builders");
        Arc::new(Room {
            capacity: capacity.min(WAITERS - 1),
            state: CachePadded::new(AtomicUsize::new(0)),
            queue: Mutex::new(Queue {
                waiters: VecDeque::new(),
                closed: false,
            }),
        })
    }

    /// Takes room for one request if there is any and nobody waits for it.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Admission> {
        // ORDERING: Relaxed throughout: `state` is one location, and the
        // CAS fails on any change to it (count or `WAITERS`), so no release
        // or waiter is missed; whatever a waiter is handed travels under
        // the queue lock.
        let mut s = self.state.load(Ordering::Relaxed);
        while s & WAITERS == 0 && s < self.capacity {
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(Admission::of(self.clone())),
                Err(now) => s = now,
            }
        }
        None
    }

    /// Gives back the room of one request, handing it to the first waiter
    /// if anyone waits.
    fn release(&self) {
        // ORDERING: Relaxed: see `try_acquire`.
        let before = self.state.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before & !WAITERS > 0, "room released more often than taken");
        if before & WAITERS != 0 {
            self.hand_over();
        }
    }

    /// While room is free and anyone waits: takes room for the first
    /// waiter, marks it granted and wakes it (outside the lock).
    fn hand_over(&self) {
        loop {
            let waker = {
                let mut queue = self.queue.lock();
                let Some(first) = queue.waiters.front() else {
                    return;
                };
                // The last waiter leaving clears `WAITERS` in the same CAS.
                let clear = if queue.waiters.len() == 1 { WAITERS } else { 0 };
                // ORDERING: Relaxed: see `try_acquire`.
                let mut s = self.state.load(Ordering::Relaxed);
                loop {
                    if s & !WAITERS >= self.capacity {
                        return; // taken meanwhile: its release hands over
                    }
                    match self.state.compare_exchange_weak(
                        s,
                        (s + 1) & !clear,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break,
                        Err(now) => s = now,
                    }
                }
                let waker = first.settle(Status::Granted);
                queue.waiters.pop_front();
                waker
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Refuses every waiter, now and later (the owner shuts down).
    /// Room already taken is given back as usual.
    pub(crate) fn close(&self) {
        let wakers: Vec<Waker> = {
            let mut queue = self.queue.lock();
            queue.closed = true;
            if !queue.waiters.is_empty() {
                // ORDERING: Relaxed: see `try_acquire`.
                self.state.fetch_and(!WAITERS, Ordering::Relaxed);
            }
            queue
                .waiters
                .drain(..)
                .filter_map(|w| w.settle(Status::Closed))
                .collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// True if any room is taken or anyone waits: callers may wait here
    /// now or later.
    pub(crate) fn in_use(&self) -> bool {
        // ORDERING: Relaxed: a snapshot for bookkeeping (`pool/session.rs`
        // keeps a room in use for shutdown to close).
        self.state.load(Ordering::Relaxed) != 0
    }

    /// Callers waiting for room now.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.lock().waiters.len()
    }

    /// Room taken now (requests queued, permits unused, room handed to
    /// waiters not yet woken).
    #[cfg(all(test, mlua_isle_loom))]
    pub(crate) fn taken(&self) -> usize {
        // ORDERING: Relaxed: read by tests after joins, which order it.
        self.state.load(Ordering::Relaxed) & !WAITERS
    }

    /// Takes room for one request, waiting for it until `deadline` (`None`:
    /// as long as it takes). Blocks the calling thread.
    pub(crate) fn acquire_until(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> Result<Admission, Refused> {
        if let Some(a) = self.try_acquire() {
            return Ok(a);
        }
        let parker = Parker::new();
        let waker = Waker::from(Arc::new(Unpark(parker.unparker().clone())));
        let mut wait = Acquire::new(self.clone());
        loop {
            if let Poll::Ready(r) = wait.poll_acquire(&waker) {
                return r;
            }
            match deadline {
                None => parker.park(),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => parker.park_timeout(left),
                    // Past it: one last look, so room granted just now
                    // is taken rather than handed on.
                    _ => {
                        return match wait.poll_acquire(&waker) {
                            Poll::Ready(r) => r,
                            Poll::Pending => Err(Refused::Full),
                        }
                    }
                },
            }
        }
    }
}

/// Wakes a thread blocked in `acquire_until`.
struct Unpark(Unparker);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Waiter {
    /// Moves a waiting waiter to `status` and takes its waker. Called with
    /// the room's queue lock held.
    fn settle(&self, status: Status) -> Option<Waker> {
        let mut state = self.0.lock();
        debug_assert_eq!(state.status, Status::Waiting);
        state.status = status;
        state.waker.take()
    }
}

/// Waiting for room in a [`Room`], as a future: cancelled by dropping it,
/// which gives back room handed to it meanwhile.
pub(crate) struct Acquire {
    room: Arc<Room>,
    /// Set once queued, until it has its answer.
    waiter: Option<Arc<Waiter>>,
}

impl Acquire {
    pub(crate) fn new(room: Arc<Room>) -> Acquire {
        Acquire { room, waiter: None }
    }

    /// Room, or `Pending` with `waker` registered to learn when there is.
    pub(crate) fn poll_acquire(&mut self, waker: &Waker) -> Poll<Result<Admission, Refused>> {
        if let Some(waiter) = &self.waiter {
            let mut state = waiter.0.lock();
            let status = state.status;
            if status == Status::Waiting {
                match &mut state.waker {
                    Some(w) if w.will_wake(waker) => {}
                    w => *w = Some(waker.clone()),
                }
                return Poll::Pending;
            }
            drop(state);
            self.waiter = None;
            return Poll::Ready(match status {
                // Counted for us by `hand_over`.
                Status::Granted => Ok(Admission::of(self.room.clone())),
                _ => Err(Refused::Closed),
            });
        }
        if let Some(a) = self.room.try_acquire() {
            return Poll::Ready(Ok(a));
        }
        let room = &self.room;
        let mut queue = room.queue.lock();
        if queue.closed {
            return Poll::Ready(Err(Refused::Closed));
        }
        // Room freed since `try_acquire`, with nobody ahead: take it.
        // Else queue up, raising `WAITERS` in the same CAS, so a release
        // after it sees the bit and one before it shows in the count.
        // ORDERING: Relaxed: see `try_acquire`.
        let mut s = room.state.load(Ordering::Relaxed);
        loop {
            let free = s & WAITERS == 0 && s < room.capacity;
            let next = if free { s + 1 } else { s | WAITERS };
            match room
                .state
                .compare_exchange_weak(s, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) if free => return Poll::Ready(Ok(Admission::of(room.clone()))),
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        let waiter = Arc::new(Waiter(Mutex::new(WaiterState {
            status: Status::Waiting,
            waker: Some(waker.clone()),
        })));
        queue.waiters.push_back(waiter.clone());
        self.waiter = Some(waiter);
        Poll::Pending
    }
}

impl Future for Acquire {
    type Output = Result<Admission, Refused>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_acquire(cx.waker())
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        let mut queue = self.room.queue.lock();
        let status = waiter.0.lock().status;
        match status {
            Status::Waiting => {
                if let Some(i) = queue.waiters.iter().position(|w| Arc::ptr_eq(w, &waiter)) {
                    queue.waiters.remove(i);
                }
                if queue.waiters.is_empty() {
                    // ORDERING: Relaxed: see `try_acquire`. A release that
                    // saw the bit finds the queue empty, and has nothing
                    // to hand over.
                    self.room.state.fetch_and(!WAITERS, Ordering::Relaxed);
                }
            }
            // Room handed to us that we will not use: give it back (to
            // the next waiter, if any).
            Status::Granted => {
                drop(queue);
                self.room.release();
            }
            Status::Closed => {}
        }
    }
}

/// The room one request holds: in its queue's [`Room`] and, at most, one
/// more (a per-key room, say). Dropping it gives the room back, once.
#[derive(Default)]
pub(crate) struct Admission {
    rooms: [Option<Arc<Room>>; 2],
}

impl Admission {
    /// Room already counted in `room`.
    fn of(room: Arc<Room>) -> Admission {
        Admission {
            rooms: [Some(room), None],
        }
    }

    /// Holds no room (an unbounded queue).
    pub(crate) fn none() -> Admission {
        Admission::default()
    }

    /// True if it holds no room.
    pub(crate) fn is_empty(&self) -> bool {
        self.rooms.iter().all(Option::is_none)
    }

    /// True if it holds room in `room`.
    pub(crate) fn holds(&self, room: &Arc<Room>) -> bool {
        self.rooms.iter().flatten().any(|r| Arc::ptr_eq(r, room))
    }

    /// Gives back every room it holds but `keep`'s.
    pub(crate) fn keep_only(mut self, keep: Option<&Arc<Room>>) -> Admission {
        for slot in &mut self.rooms {
            if slot
                .as_ref()
                .is_some_and(|r| keep.is_none_or(|k| !Arc::ptr_eq(r, k)))
            {
                if let Some(room) = slot.take() {
                    room.release();
                }
            }
        }
        self
    }

    /// This room and `other`'s, held together (released together).
    ///
    /// # Panics
    /// If that is more than two rooms.
    pub(crate) fn and(mut self, mut other: Admission) -> Admission {
        for room in other.rooms.iter_mut().filter_map(Option::take) {
            let free = self.rooms.iter_mut().find(|r| r.is_none());
            *free.expect("an admission holds at most two rooms") = Some(room);
        }
        self
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        for room in self.rooms.iter_mut().filter_map(Option::take) {
            room.release();
        }
    }
}

#[cfg(all(test, mlua_isle_loom))]
mod loom_tests;

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.rooms.iter().filter(|r| r.is_some()).count();
        f.debug_struct("Admission").field("rooms", &held).finish()
    }
}
