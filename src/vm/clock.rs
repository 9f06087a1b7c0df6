//! A timer for `task.sleep` that needs no runtime: one process-wide thread
//! (`mlua-isle-clock`, started on the first sleep) wakes sleeping futures
//! when their time comes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

struct Entry {
    at: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Clock {
    due: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
    changed: Condvar,
}

fn clock() -> &'static Clock {
    static CLOCK: OnceLock<&'static Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock: &'static Clock = Box::leak(Box::new(Clock {
            due: Mutex::new((BinaryHeap::new(), 0)),
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
            while due.0.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = due.0.pop() {
                    e.waker.wake();
                }
            }
            match due.0.peek().map(|Reverse(e)| e.at) {
                Some(at) => {
                    self.changed.wait_until(&mut due, at);
                }
                None => self.changed.wait(&mut due),
            }
        }
    }

    fn add(&self, at: Instant, waker: Waker) {
        let mut due = self.due.lock();
        due.1 += 1;
        let seq = due.1;
        let first = due.0.peek().is_none_or(|Reverse(e)| at < e.at);
        due.0.push(Reverse(Entry { at, seq, waker }));
        if first {
            self.changed.notify_one();
        }
    }
}

/// A future that is ready `duration` after it was made (a duration too
/// large to represent never ends).
pub(crate) fn sleep(duration: Duration) -> Sleep {
    Sleep {
        at: Instant::now().checked_add(duration),
        waiting: false,
    }
}

pub(crate) struct Sleep {
    at: Option<Instant>,
    waiting: bool,
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
        // Once is enough: the waker a request polls with stays the same.
        if !self.waiting {
            self.waiting = true;
            clock().add(at, cx.waker().clone());
        }
        Poll::Pending
    }
}
