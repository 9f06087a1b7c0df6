//! Loom's primitives behind the API the protocols use (`parking_lot`'s lock
//! and condition variable, crossbeam's `Parker`).

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use loom::sync::Arc;

/// A lock whose `lock` cannot fail, as `parking_lot::Mutex`.
#[derive(Debug)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

/// Holds the lock. The `Option` is empty only inside `Condvar::wait`, which
/// hands loom's guard over and back.
pub(crate) struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Mutex<T> {
        Mutex(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard(Some(self.0.lock().expect("loom mutex poisoned")))
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("guard held")
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("guard held")
    }
}

/// A condition variable waiting on `&mut MutexGuard`, as `parking_lot::Condvar`.
#[derive(Debug)]
pub(crate) struct Condvar(loom::sync::Condvar);

/// Whether a timed wait timed out: under loom it always has.
#[derive(Debug)]
pub(crate) struct WaitTimeoutResult;

impl WaitTimeoutResult {
    pub(crate) fn timed_out(&self) -> bool {
        true
    }
}

impl Condvar {
    pub(crate) fn new() -> Condvar {
        Condvar(loom::sync::Condvar::new())
    }

    pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
        let held = guard.0.take().expect("guard held");
        guard.0 = Some(self.0.wait(held).expect("loom mutex poisoned"));
    }

    /// Loom models no time: the deadline has passed, so this returns at once.
    pub(crate) fn wait_until<T>(
        &self,
        _guard: &mut MutexGuard<'_, T>,
        _deadline: Instant,
    ) -> WaitTimeoutResult {
        WaitTimeoutResult
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// A thread's parking spot with one pending wake-up, as crossbeam's `Parker`.
#[derive(Debug)]
pub(crate) struct Parker {
    unparker: Unparker,
}

/// Wakes a `Parker`, as crossbeam's `Unparker`.
#[derive(Debug, Clone)]
pub(crate) struct Unparker(Arc<Token>);

#[derive(Debug)]
struct Token {
    /// An unpark not yet consumed by a park.
    pending: loom::sync::Mutex<bool>,
    cond: loom::sync::Condvar,
}

impl Parker {
    pub(crate) fn new() -> Parker {
        Parker {
            unparker: Unparker(Arc::new(Token {
                pending: loom::sync::Mutex::new(false),
                cond: loom::sync::Condvar::new(),
            })),
        }
    }

    pub(crate) fn unparker(&self) -> &Unparker {
        &self.unparker
    }

    /// Blocks until unparked, or returns at once if an unpark is pending.
    pub(crate) fn park(&self) {
        let token = &self.unparker.0;
        let mut pending = token.pending.lock().expect("loom mutex poisoned");
        while !*pending {
            pending = token.cond.wait(pending).expect("loom mutex poisoned");
        }
        *pending = false;
    }

    /// Loom models no time: the timeout expires at once, consuming a
    /// pending unpark if there is one.
    pub(crate) fn park_timeout(&self, _timeout: Duration) {
        *self.unparker.0.pending.lock().expect("loom mutex poisoned") = false;
    }
}

impl Unparker {
    pub(crate) fn unpark(&self) {
        *self.0.pending.lock().expect("loom mutex poisoned") = true;
        self.0.cond.notify_one();
    }
}

/// Checks the model `f` with at most `preemptions` preemptions per run,
/// unless `LOOM_MAX_PREEMPTIONS` says otherwise. Unbounded, a model with
/// three or four threads runs for minutes to hours; most bugs need few
/// preemptions.
#[cfg(test)]
pub(crate) fn check(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(preemptions);
    builder.check(f);
}
