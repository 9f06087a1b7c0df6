//! A timer for `task.sleep` that needs no runtime: one process-wide thread
//! (`mlua-isle-clock`, started on the first sleep) wakes sleeping futures
//! when their time comes.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// An entry's place: when it is due, then the order it came in.
type Key = (Instant, u64);

/// The wakers of the sleeps pending, by when they are due.
#[derive(Default)]
struct Due {
    wakers: BTreeMap<Key, Waker>,
    next: u64,
}

struct Clock {
    due: Mutex<Due>,
    changed: Condvar,
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<&'static Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock: &'static Clock = Box::leak(Box::new(Clock {
            due: Mutex::new(Due::default()),
            changed: Condvar::new(),
        }));
        // If the thread cannot start, sleeps never end: their requests
        // still stop on cancel and time limits.
        let _ = std::thread::Builder::new()
            .name("mlua-isle-clock".into())
            .spawn(move || clock.run());
        clock
    })
}

impl Clock {
    fn run(&self) {
        let mut due = self.due.lock();
        loop {
            let now = Instant::now();
            while let Some(first) = due.wakers.first_entry() {
                if first.key().0 > now {
                    break;
                }
                first.remove().wake();
            }
            match due.wakers.first_key_value().map(|((at, _), _)| *at) {
                Some(at) => {
                    self.changed.wait_until(&mut due, at);
                }
                None => self.changed.wait(&mut due),
            }
        }
    }

    /// Wakes `waker` at `at`; returns the entry's key.
    fn add(&self, at: Instant, waker: Waker) -> Key {
        let mut due = self.due.lock();
        due.next += 1;
        let key = (at, due.next);
        let first = due.wakers.first_key_value().is_none_or(|(k, _)| key < *k);
        due.wakers.insert(key, waker);
        if first {
            self.changed.notify_one();
        }
        key
    }

    /// The entry of `key`, if it is still pending, wakes `waker` instead.
    fn replace(&self, key: Key, waker: Waker) {
        if let Some(w) = self.due.lock().wakers.get_mut(&key) {
            *w = waker;
        }
    }

    /// Forgets the entry of `key` (its sleep was dropped), if it is still
    /// pending.
    fn remove(&self, key: Key) {
        self.due.lock().wakers.remove(&key);
    }
}

/// A future that is ready `duration` after it was made (a duration too
/// large to represent never ends).
pub(crate) fn sleep(duration: Duration) -> Sleep {
    Sleep {
        at: Instant::now().checked_add(duration),
        entry: None,
    }
}

/// A pending sleep keeps an entry in the clock, with the waker it was last
/// polled with; dropped (its request stopped, or its coroutine collected)
/// it takes the entry out, so sleeps that never end cost nothing once gone.
pub(crate) struct Sleep {
    at: Option<Instant>,
    entry: Option<(Key, Waker)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(at) = self.at else {
            return Poll::Pending;
        };
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        match &mut self.entry {
            None => {
                let key = clock().add(at, cx.waker().clone());
                self.entry = Some((key, cx.waker().clone()));
            }
            // Polled by another task since: that one is woken.
            Some((key, waker)) if !waker.will_wake(cx.waker()) => {
                *waker = cx.waker().clone();
                clock().replace(*key, cx.waker().clone());
            }
            Some(_) => {}
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((key, _)) = self.entry.take() {
            clock().remove(key);
        }
    }
}
