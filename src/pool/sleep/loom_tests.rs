//! Loom models of the sleep/wake protocol (see the module docs and
//! `src/sync/mod.rs`). Run with:
//!
//! ```sh
//! RUSTFLAGS="--cfg mlua_isle_loom -C debug-assertions" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --lib loom
//! ```
//!
//! (`LOOM_MAX_PREEMPTIONS=4` before it searches deeper, for minutes more.)
//!
//! A queue is modelled as a count of jobs, and a worker as the pool's idle
//! loop: take a job, else sleep. A lost wake-up leaves a worker parked for
//! good, which loom reports as a deadlock.
//!
//! The queue's accesses are `Relaxed`, weaker than crossbeam's: the
//! protocol must rest on its own fences, not on the queue's orderings.

use loom::sync::Arc;
use loom::thread;

use super::*;
use crate::sync::check;

/// The preemption bound of these models (see `check`).
const PREEMPTIONS: usize = 3;

/// The modelled pool: its sleep slots, its queue, and how many jobs it
/// runs before it closes.
struct Pool {
    sleep: Sleep,
    jobs: AtomicUsize,
    /// Jobs taken so far, out of `total`; the worker taking the last one
    /// closes the pool.
    taken: AtomicUsize,
    total: usize,
    closed: AtomicBool,
}

impl Pool {
    fn new(workers: usize, total: usize) -> (Arc<Pool>, Vec<Parker>) {
        let (sleep, parkers) = Sleep::new(workers);
        let pool = Pool {
            sleep,
            jobs: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            total,
            closed: AtomicBool::new(false),
        };
        (Arc::new(pool), parkers)
    }

    /// Pushes a job and wakes a sleeper: any (`wake_any`), or worker `w`
    /// (`wake`, for pinned work).
    fn submit(&self, pinned: Option<usize>) {
        // ORDERING: Relaxed; see the module docs.
        self.jobs.fetch_add(1, Ordering::Relaxed);
        match pinned {
            Some(w) => self.sleep.wake(w),
            None => self.sleep.wake_any(),
        }
    }

    fn take(&self) -> bool {
        // ORDERING: Relaxed; see the module docs.
        self.jobs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn has_work(&self) -> bool {
        // ORDERING: Relaxed; see the module docs.
        self.jobs.load(Ordering::Relaxed) > 0 || self.closed.load(Ordering::Relaxed)
    }

    fn close(&self) {
        // ORDERING: Relaxed: `wake_all` unparks every worker after this.
        self.closed.store(true, Ordering::Relaxed);
        self.sleep.wake_all();
    }

    /// Worker `w`'s idle loop: take a job, else sleep, until the pool
    /// closes. Returns how many jobs it took.
    fn work(&self, w: usize, parker: &Parker) -> usize {
        let mut mine = 0;
        loop {
            if self.take() {
                mine += 1;
                // ORDERING: Relaxed: a count; the last job closes the pool.
                if self.taken.fetch_add(1, Ordering::Relaxed) + 1 == self.total {
                    self.close();
                }
                continue;
            }
            // ORDERING: Relaxed; see `close`.
            if self.closed.load(Ordering::Relaxed) {
                return mine;
            }
            self.sleep.sleep(w, parker, None, || self.has_work());
        }
    }
}

/// Starts a worker thread per parker.
fn start(pool: &Arc<Pool>, parkers: Vec<Parker>) -> Vec<thread::JoinHandle<usize>> {
    parkers
        .into_iter()
        .enumerate()
        .map(|(w, parker)| {
            let pool = pool.clone();
            thread::spawn(move || pool.work(w, &parker))
        })
        .collect()
}

/// Joins the workers: every job was taken and no flag is left raised.
fn join(pool: &Pool, workers: Vec<thread::JoinHandle<usize>>) {
    let taken: usize = workers.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(taken, pool.total);
    assert!(!pool.sleep.anyone_asleep());
}

/// A worker going to sleep while a job is pushed is never left parked:
/// either it sees the job, or the submitter sees its flag and wakes it.
/// Both for unkeyed work (`wake_any`) and work pinned to it (`wake`).
#[test]
fn loom_a_worker_falling_asleep_never_misses_a_push() {
    for pinned in [None, Some(0)] {
        check(PREEMPTIONS, move || {
            let (pool, parkers) = Pool::new(1, 1);
            let workers = start(&pool, parkers);
            pool.submit(pinned);
            join(&pool, workers);
        });
    }
}

/// Two submitters and two workers: each wake-up claims a sleeper of its
/// own, and every job is taken.
#[test]
fn loom_two_pushes_two_sleepers_every_job_runs() {
    // Four threads: 2 preemptions take seconds, 3 take minutes.
    check(2, || {
        let (pool, parkers) = Pool::new(2, 2);
        let workers = start(&pool, parkers);
        let submitter = {
            let pool = pool.clone();
            thread::spawn(move || pool.submit(None))
        };
        pool.submit(None);
        submitter.join().unwrap();
        join(&pool, workers);
    });
}

/// `wake_all` wakes every worker, asleep or falling asleep.
#[test]
fn loom_wake_all_wakes_every_sleeper() {
    check(PREEMPTIONS, || {
        let (pool, parkers) = Pool::new(2, 0);
        let workers = start(&pool, parkers);
        pool.close();
        join(&pool, workers);
    });
}
