//! Stress: many threads submit a random mix of requests that succeed, fail,
//! are cancelled at random points, time out, are dropped or detached. Every
//! observed task must resolve exactly once with a result its fate allows,
//! and the isle must still answer afterwards.

use crate::common;

use common::{eventually, within, Rng};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use mlua_isle::{Isle, IsleError, Task};

const THREADS: usize = 4;
const OPS_PER_THREAD: usize = 2000;

/// What a task may resolve to, given what was done to it.
enum Fate {
    /// Nothing stopped it: exactly this value.
    Value(i64),
    /// A runtime error raised by the Lua code.
    LuaError,
    /// It was cancelled at some point: the value if it finished first.
    ValueOrCancelled(i64),
    /// It had a time limit: the value if it finished first.
    ValueOrTimeout(i64),
    /// An endless loop that was cancelled.
    Cancelled,
    /// An endless loop with a time limit.
    Timeout,
    /// An exec closure cancelled at some point; `runs` counts its runs.
    Exec {
        value: i64,
        runs: Arc<AtomicUsize>,
        cancelled: bool,
    },
}

fn check(fate: &Fate, result: &Result<i64, IsleError>) -> bool {
    match (fate, result) {
        (Fate::Value(v), Ok(r)) => v == r,
        (Fate::LuaError, Err(IsleError::Lua(e))) => e.message().contains("planned failure"),
        (Fate::ValueOrCancelled(v), Ok(r)) | (Fate::ValueOrTimeout(v), Ok(r)) => v == r,
        (Fate::ValueOrCancelled(_), Err(IsleError::Cancelled)) => true,
        (Fate::ValueOrTimeout(_), Err(IsleError::Timeout)) => true,
        (Fate::Cancelled, Err(IsleError::Cancelled)) => true,
        (Fate::Timeout, Err(IsleError::Timeout)) => true,
        (
            Fate::Exec {
                value,
                runs,
                cancelled,
            },
            r,
        ) => {
            let runs = runs.load(Ordering::SeqCst);
            match r {
                // It ran, once; cancelled or not, a finished closure's Ok is
                // kept.
                Ok(v) => v == value && runs == 1,
                // Cancelled before it started (it never ran), or while it
                // ran: the caller is answered on time and the VM drops the
                // late result; it ran at most once.
                Err(IsleError::Cancelled) => *cancelled && runs <= 1,
                Err(_) => false,
            }
        }
        _ => false,
    }
}

/// How a task's result is collected: every path must deliver it once,
/// within `PATIENCE`.
fn collect(task: Task<i64>, how: u64) -> Result<i64, IsleError> {
    match how {
        0 => within("wait", move || task.wait()),
        1 => within("await", move || futures::executor::block_on(task)),
        _ => {
            let mut task = task;
            let mut r = None;
            eventually("wait_timeout delivers the result", || {
                r = task.wait_timeout(Duration::from_millis(1));
                r.is_some()
            });
            assert!(task.is_finished());
            r.unwrap()
        }
    }
}

struct Pending {
    task: Task<i64>,
    fate: Fate,
}

/// One submitting thread. Returns how many detached requests it sent.
fn submitter(isle: Isle, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let mut pending: Vec<Pending> = Vec::new();
    // Tasks this thread will cancel later: (index in `pending`, ops left
    // before the cancel). Every endless loop is in here.
    let mut to_cancel: Vec<(usize, u64)> = Vec::new();
    let mut detached = 0;

    for i in 0..OPS_PER_THREAD {
        let id = (seed * 1_000_000 + i as u64) as i64;
        // Cancel the tasks whose random moment has come.
        to_cancel.retain_mut(|(at, left)| {
            if *left == 0 {
                pending[*at].task.cancel();
                false
            } else {
                *left -= 1;
                true
            }
        });

        let pick = rng.below(100);
        match pick {
            0..=29 => {
                let task = isle.spawn_eval(format!("return {id}"));
                pending.push(Pending {
                    task,
                    fate: Fate::Value(id),
                });
            }
            30..=34 => {
                let task = isle.spawn_call("echo", id);
                pending.push(Pending {
                    task,
                    fate: Fate::Value(id),
                });
            }
            35..=37 => {
                let task = isle.spawn_eval("error('planned failure')");
                pending.push(Pending {
                    task,
                    fate: Fate::LuaError,
                });
            }
            38..=47 => {
                let task = isle.spawn_eval("while true do end");
                to_cancel.push((pending.len(), rng.below(8)));
                pending.push(Pending {
                    task,
                    fate: Fate::Cancelled,
                });
            }
            48..=50 => {
                let limit = Duration::from_micros(rng.below(1000));
                let task = isle.spawn_eval("while true do end").timeout(limit);
                pending.push(Pending {
                    task,
                    fate: Fate::Timeout,
                });
            }
            51..=58 => {
                let limit = Duration::from_micros(rng.below(300));
                let task = isle.spawn_eval(format!("return {id}")).timeout(limit);
                pending.push(Pending {
                    task,
                    fate: Fate::ValueOrTimeout(id),
                });
            }
            59..=64 => {
                let task = isle.spawn_eval(format!("return {id}"));
                match rng.below(3) {
                    0 => task.cancel(),
                    _ => to_cancel.push((pending.len(), rng.below(4))),
                }
                pending.push(Pending {
                    task,
                    fate: Fate::ValueOrCancelled(id),
                });
            }
            65..=74 => {
                let runs = Arc::new(AtomicUsize::new(0));
                let task = {
                    let runs = runs.clone();
                    isle.spawn_exec(move |_| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(id)
                    })
                };
                let cancelled = rng.below(2) == 0;
                if cancelled {
                    match rng.below(2) {
                        0 => task.cancel_token().clone().cancel(),
                        _ => to_cancel.push((pending.len(), rng.below(4))),
                    }
                }
                pending.push(Pending {
                    task,
                    fate: Fate::Exec {
                        value: id,
                        runs,
                        cancelled,
                    },
                });
            }
            75..=81 => {
                // Dropped unobserved: a fast request or an endless loop
                // (which the drop must stop, or everything behind it hangs).
                if rng.below(2) == 0 {
                    drop(isle.spawn_eval::<i64>(format!("return {id}")));
                } else {
                    drop(isle.spawn_eval::<()>("while true do end"));
                }
            }
            82..=91 => {
                isle.spawn_eval::<()>("detached = detached + 1").detach();
                detached += 1;
            }
            _ => {
                // A blocking call: first stop our own loops, which would
                // otherwise hold the VM while we wait.
                for (at, _) in to_cancel.drain(..) {
                    pending[at].task.cancel();
                }
                assert_eq!(isle.eval::<i64>(format!("return {id}")), Ok(id));
            }
        }
    }
    for (at, _) in to_cancel.drain(..) {
        pending[at].task.cancel();
    }

    for (n, p) in pending.into_iter().enumerate() {
        let result = collect(p.task, rng.below(3));
        assert!(
            check(&p.fate, &result),
            "thread {seed}, task #{n}: implausible result {result:?}"
        );
    }
    detached
}

#[test]
fn every_request_resolves_exactly_once_under_a_random_mix() {
    let isle = Isle::spawn(|lua| {
        lua.globals().set("detached", 0)?;
        lua.load("function echo(x) return x end").exec()
    })
    .unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (1..=THREADS as u64)
        .map(|seed| {
            let (isle, barrier) = (isle.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                submitter(isle, seed)
            })
        })
        .collect();
    let detached: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();

    // Requests run in order, so this one sees every detached request done.
    assert_eq!(isle.eval::<usize>("detached"), Ok(detached));
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    assert_eq!(isle.call::<i64>("echo", 5), Ok(5));
    isle.shutdown().unwrap();
}

#[test]
fn cancels_racing_completion_resolve_exactly_once() {
    const N: usize = 4000;
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    // Another thread cancels each request after a random short spin, so
    // cancels land before, during and after the run.
    let (tx, rx) = crossbeam_channel::unbounded::<mlua_isle::CancelToken>();
    let canceller = std::thread::spawn(move || {
        let mut rng = Rng::new(99);
        for token in rx {
            for _ in 0..rng.below(100) {
                std::hint::spin_loop();
            }
            token.cancel();
        }
    });
    let mut rng = Rng::new(7);
    let mut pending = Vec::with_capacity(N);
    for i in 0..N as i64 {
        let (task, fate) = if rng.below(2) == 0 {
            let runs = Arc::new(AtomicUsize::new(0));
            let task = {
                let runs = runs.clone();
                isle.spawn_exec(move |_| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(i)
                })
            };
            let fate = Fate::Exec {
                value: i,
                runs,
                cancelled: true,
            };
            (task, fate)
        } else {
            (
                isle.spawn_eval(format!("return {i}")),
                Fate::ValueOrCancelled(i),
            )
        };
        tx.send(task.cancel_token().clone()).unwrap();
        pending.push(Pending { task, fate });
    }
    drop(tx);
    let (mut ok, mut cancelled) = (0, 0);
    for (n, p) in pending.into_iter().enumerate() {
        let result = collect(p.task, rng.below(3));
        assert!(
            check(&p.fate, &result),
            "task #{n}: implausible result {result:?}"
        );
        match result {
            Ok(_) => ok += 1,
            Err(_) => cancelled += 1,
        }
    }
    canceller.join().unwrap();
    assert_eq!(ok + cancelled, N);
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}
