//! Loom models of waiting for room (see `src/sync/mod.rs`; run as the
//! request models are, `state/loom_tests.rs`): a release never misses a
//! waiter, a waiter dropped as it is granted room gives it back, and
//! closing refuses the waiters.

use std::sync::atomic::AtomicBool as StdAtomicBool;
use std::task::{Poll, Wake, Waker};

use loom::thread;

use super::*;
use crate::sync::check;

/// The preemption bound of these models (see `check`).
const PREEMPTIONS: usize = 3;

/// Records that it was woken. Its flag is std's: read only after a join.
#[derive(Default)]
struct Woken(StdAtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        // ORDERING: Relaxed: read after the join, which orders it.
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A room of `capacity`, full.
fn full(capacity: usize) -> (Arc<Room>, Vec<Admission>) {
    let room = Room::new(capacity);
    let held = (0..capacity)
        .map(|_| room.try_acquire().expect("room"))
        .collect();
    (room, held)
}

/// A waiter that registers while the one holder gives its room back: the
/// waiter gets it now, or is woken and gets it on the next poll.
#[test]
fn loom_a_release_never_misses_a_waiter() {
    check(PREEMPTIONS, || {
        let (room, held) = full(1);
        let releaser = thread::spawn(move || drop(held));
        let woken = Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut wait = Acquire::new(room.clone());
        let got = match wait.poll_acquire(&waker) {
            Poll::Ready(got) => got,
            Poll::Pending => {
                releaser.join().unwrap();
                assert!(
                    woken.0.load(std::sync::atomic::Ordering::Relaxed),
                    "the waiter was never woken"
                );
                match wait.poll_acquire(&waker) {
                    Poll::Ready(got) => got,
                    Poll::Pending => panic!("woken without room"),
                }
            }
        };
        let got = got.expect("room, not refused");
        assert_eq!(room.taken(), 1);
        drop(got);
        assert_eq!(room.taken(), 0);
    });
}

/// A waiter dropped while the holder's release hands it the room: the room
/// ends up free, whichever came first, and nobody is left waiting.
#[test]
fn loom_a_waiter_dropped_as_it_is_granted_gives_the_room_back() {
    check(PREEMPTIONS, || {
        let (room, held) = full(1);
        let mut wait = Acquire::new(room.clone());
        assert!(wait.poll_acquire(Waker::noop()).is_pending());
        let releaser = thread::spawn(move || drop(held));
        drop(wait);
        releaser.join().unwrap();
        assert_eq!(room.taken(), 0, "room lost");
        assert_eq!(room.waiting(), 0);
        assert!(room.try_acquire().is_some(), "a later caller gets the room");
    });
}

/// Two blocked threads wait on a full room of two; both rooms are given
/// back: each waiter gets room exactly once.
#[test]
fn loom_blocked_waiters_each_get_room_once() {
    check(2, || {
        let (room, mut held) = full(2);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let room = room.clone();
                thread::spawn(move || room.acquire_until(None).expect("room"))
            })
            .collect();
        held.pop();
        held.pop();
        let got: Vec<Admission> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(room.taken(), 2);
        drop(got);
        assert_eq!(room.taken(), 0);
    });
}

/// Closing the room refuses a waiter blocked on it, and every later one.
#[test]
fn loom_close_refuses_waiters() {
    check(PREEMPTIONS, || {
        let (room, _held) = full(1);
        let closer = {
            let room = room.clone();
            thread::spawn(move || room.close())
        };
        assert_eq!(room.acquire_until(None).err(), Some(Refused::Closed));
        closer.join().unwrap();
        let mut wait = Acquire::new(room.clone());
        assert_eq!(
            wait.poll_acquire(Waker::noop()).map(|r| r.err()),
            Poll::Ready(Some(Refused::Closed))
        );
    });
}
