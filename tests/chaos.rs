//! Chaos: several threads throw a random mix of requests at one pool (with
//! a queue capacity, a default time limit, a memory limit and an instruction
//! budget): fast requests, Lua errors, panics, memory blow-ups, endless
//! loops stopped by cancels, time limits and the budget, session work and
//! session closes, broadcasts, requests dropped at once or detached. Cancels
//! land at random moments, from the submitting thread and from another one.
//! Near the end, the pool shuts down while the threads go on submitting:
//! gracefully in one round, with `shutdown_timeout` (an abort after a short
//! grace) in the other.
//!
//! Checked: every task kept resolves exactly once with a result its request
//! allows (see `Kept::allows`); every session counter moves as its
//! requests allow; after `shutdown` returns nothing is left unresolved, the
//! metrics ledger adds up and agrees with what the threads counted; and the
//! process has no more threads than before the pool.
//!
//! The default test (two rounds of 20,000 requests) is sized for seconds in
//! a debug build. The long variant (two rounds of 1,000,000 requests, or of
//! `CHAOS_REQUESTS`) is ignored by default; run it alone, in release:
//!
//! ```sh
//! cargo test --release --test chaos -- --ignored
//! CHAOS_REQUESTS=5000000 cargo test --release --test chaos -- --ignored
//! ```
//!
//! Both tests count the process's threads, so they must not run at the same
//! time: do not use `--include-ignored` here.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use common::{Rng, PATIENCE};
use crossbeam_channel::{Receiver, Sender};
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{current_token, CancelToken, IsleError, IslePool, LuaErrorKind, Task};

const THREADS: usize = 4;
const WORKERS: usize = 3;
const CAPACITY: usize = 48;
const MEMORY_LIMIT: usize = 8 << 20;
const BUDGET: u64 = 100_000;
/// Luau counts no instructions (`max_instructions` is refused there): no
/// budget, so every loop gets a time limit (see `Chaos::track`).
const BUDGETED: bool = cfg!(not(feature = "luau"));
/// Only a hang comes near it: every request here ends far sooner.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Session keys each thread owns (their counters are checked exactly) and
/// keys every thread uses and closes.
const OWN_KEYS: usize = 3;
const SHARED_KEYS: u64 = 3;
/// A thread collects its tasks once it holds this many.
const MAX_PENDING: usize = 64;
/// The pool starts shutting down once every thread has this many requests
/// left to submit (or a fifth of its share, if less).
const LEFT_AT_SHUTDOWN: u64 = 2_000;
/// How long `shutdown_timeout` lets work finish before aborting it.
const ABORT_GRACE: Duration = Duration::from_millis(2);

#[test]
fn chaos_every_request_resolves_once_and_the_ledger_adds_up() {
    run(20_000, Ending::Graceful);
    run(20_000, Ending::Abort);
}

#[test]
#[ignore = "long: run with cargo test --release --test chaos -- --ignored"]
fn chaos_long() {
    let requests = std::env::var("CHAOS_REQUESTS")
        .ok()
        .map(|v| v.parse().expect("CHAOS_REQUESTS: a number of requests"))
        .unwrap_or(1_000_000);
    run(requests, Ending::Graceful);
    run(requests, Ending::Abort);
}

// ===== the run =====

/// How the pool is stopped part-way through.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// `shutdown()`: everything queued before it runs.
    Graceful,
    /// `shutdown_timeout(ABORT_GRACE)`: what is still queued or running
    /// then resolves `Shutdown` (or, if it finishes first, as usual).
    Abort,
}

fn run(requests: u64, ending: Ending) {
    quiet_planned_panics();
    let threads_before = thread_count();
    let started = Instant::now();

    let builder = IslePool::builder()
        .name("chaos")
        .workers(WORKERS)
        .queue_capacity(CAPACITY)
        .default_timeout(DEFAULT_TIMEOUT)
        .memory_limit(MEMORY_LIMIT);
    let builder = if BUDGETED {
        builder.max_instructions(BUDGET)
    } else {
        builder
    };
    let pool = builder.init(init).build().unwrap();

    let shutting_down = Arc::new(AtomicBool::new(false));
    let detached_runs = Arc::new(AtomicU64::new(0));
    let dropped_runs = Arc::new(AtomicU64::new(0));
    let (cancel_tx, cancel_rx) = crossbeam_channel::unbounded();
    let canceller = std::thread::spawn(move || canceller(cancel_rx));
    let (progress_tx, progress_rx) = crossbeam_channel::unbounded::<()>();
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);

    let share = requests.div_ceil(THREADS as u64);
    let submitters: Vec<_> = (0..THREADS)
        .map(|t| {
            let chaos = Chaos {
                t,
                rng: Rng::new(t as u64 + 1),
                pool: pool.clone(),
                shutting_down: shutting_down.clone(),
                abortive: ending == Ending::Abort,
                detached_runs: detached_runs.clone(),
                dropped_runs: dropped_runs.clone(),
                cancels: cancel_tx.clone(),
                pending: Vec::new(),
                to_cancel: Vec::new(),
                own: vec![Vec::new(); OWN_KEYS],
                tally: Tally::default(),
            };
            let (progress, done) = (progress_tx.clone(), done_rx.clone());
            std::thread::spawn(move || chaos.run(share, progress, done))
        })
        .collect();
    drop((cancel_tx, progress_tx, done_rx));

    // Every thread reports once it is near the end of its share; a thread
    // that dies drops its sender, so this cannot wait forever.
    for _ in 0..THREADS {
        if progress_rx.recv().is_err() {
            break;
        }
    }
    // Give an abort something it must stop: one request per VM that only a
    // stop from outside ends (a graceful shutdown would wait for them).
    let mut tally = Tally::default();
    let spins: Vec<Task<i64>> = match ending {
        Ending::Graceful => Vec::new(),
        Ending::Abort => (0..WORKERS).map(|_| pool.spawn_call("spin", ())).collect(),
    };
    tally.submitted += spins.len() as u64;
    // The flag goes up on the thread that shuts down, just before: work
    // submitted after it may see the shutdown, work before it only an abort.
    let (p, flag) = (pool.clone(), shutting_down.clone());
    let stopped = common::within("shutdown returns", move || {
        flag.store(true, Ordering::SeqCst);
        match ending {
            Ending::Graceful => p.shutdown(),
            Ending::Abort => p.shutdown_timeout(ABORT_GRACE),
        }
    });
    assert_eq!(stopped, Ok(()));
    for mut spin in spins {
        let r = spin
            .try_result()
            .expect("unresolved after shutdown returned");
        assert!(
            matches!(r, Err(IsleError::Shutdown | IsleError::QueueFull)),
            "{r:?}"
        );
        tally.count(&r);
        tally.aborted += u64::from(r == Err(IsleError::Shutdown));
    }
    drop(done_tx);

    for s in submitters {
        tally.add(&s.join().unwrap());
    }
    canceller.join().unwrap();
    let detached_runs = detached_runs.load(Ordering::SeqCst);
    let dropped_runs = dropped_runs.load(Ordering::SeqCst);

    // The ledger.
    let m = pool.metrics();
    let sum = |f: fn(&mlua_isle::WorkerMetrics) -> u64| m.workers.iter().map(f).sum::<u64>();
    let (completed, failed, cancelled) = (
        sum(|w| w.completed),
        sum(|w| w.failed),
        sum(|w| w.cancelled),
    );
    assert!(
        m.workers.iter().all(|w| w.queued == 0 && w.running == 0) && m.unkeyed_queued == 0,
        "work left after shutdown: {m:#?}"
    );
    assert_eq!(m.submitted, tally.submitted, "{m:#?}");
    assert_eq!(m.rejected, tally.queue_full, "{m:#?}");
    assert_eq!(
        m.submitted,
        m.rejected + m.discarded + completed + failed + cancelled,
        "{m:#?}"
    );
    // Every value is a completed request, and every completed request
    // delivered a value: to a kept task, or to a detached or dropped closure
    // that counted its run. (A dropped task's closure can also run late: its
    // drop cancelled it while it ran, the caller-side answer was
    // `Cancelled`, and the VM dropped the value.)
    assert!(
        (tally.ok + detached_runs..=tally.ok + detached_runs + dropped_runs).contains(&completed),
        "{m:#?}\n{tally:#?}"
    );
    // A loop dropped unresolved is cancelled by the drop, unless it used up
    // its budget first.
    assert!(
        (tally.failed..=tally.failed + tally.dropped_loops).contains(&failed),
        "{m:#?}\n{tally:#?}"
    );
    if ending == Ending::Graceful {
        // Only admission and the final drain resolve `Shutdown` then.
        assert!(m.discarded >= tally.shutdown, "{m:#?}\n{tally:#?}");
    }

    // After shutdown, requests resolve `Shutdown` at once and are counted.
    let probes: Vec<Task<i64>> = vec![
        pool.spawn_eval("1"),
        pool.spawn_call("echo", 1),
        pool.spawn_exec(|_| Ok(1)),
        pool.session("t0-k0").spawn_eval("1"),
        pool.session(0u64).spawn_exec(|_, _| Ok(1)),
    ];
    for mut p in probes {
        assert_eq!(p.try_result(), Some(Err(IsleError::Shutdown)));
    }
    assert_eq!(
        pool.broadcast(|_| Ok(())),
        vec![Err(IsleError::Shutdown); WORKERS]
    );
    let after = pool.metrics();
    assert_eq!(after.submitted, m.submitted + 5);
    assert_eq!(after.discarded, m.discarded + 5);

    // Enough chaos happened to mean something (these do not depend on
    // timing, unlike queue-full and late results, which are only printed).
    for (what, n) in [
        ("values", tally.ok),
        ("Lua errors", tally.lua_errors),
        ("panics", tally.panics),
        ("memory errors", tally.memory),
        ("budget errors", tally.budget),
        ("cancels", tally.cancelled),
        ("timeouts", tally.timeouts),
    ] {
        if what == "budget errors" && !BUDGETED {
            assert_eq!(n, 0, "{tally:#?}");
            continue;
        }
        assert!(n > 0, "no {what}: {tally:#?}");
    }
    println!(
        "{ending:?}: {} requests in {:?}: {tally:#?}\n{m:#?}",
        m.submitted,
        started.elapsed()
    );

    drop(pool);
    assert!(
        threads_settle_to(threads_before),
        "{} threads before the pool, {} after it is gone: {:?}",
        threads_before,
        thread_count(),
        common::thread_names()
    );
}

/// Shared globals: `echo(x)`; `spin()`, a Rust callback that runs until its
/// request is stopped (the budget does not count Rust code, so only a cancel
/// or time limit ends it); `boom(id)`, a Rust callback that panics.
fn init(lua: &Lua) -> mlua::Result<()> {
    lua.load("function echo(x) return x end").exec()?;
    let spin = lua.create_function(|lua, ()| -> mlua::Result<i64> {
        let token = current_token(lua).expect("called from a request");
        while !token.is_cancelled() {
            std::thread::yield_now();
        }
        Err(mlua::Error::runtime("spin: stopped"))
    })?;
    let boom = lua.create_function(|_, id: i64| -> mlua::Result<i64> {
        panic!("planned panic {id}");
    })?;
    lua.globals().set("spin", spin)?;
    lua.globals().set("boom", boom)
}

/// Cancels each token it is sent after a random short spin, so cancels land
/// before, during and after the run, from a thread that did not submit.
fn canceller(rx: Receiver<(CancelToken, u32)>) {
    for (token, spins) in rx {
        for _ in 0..spins {
            std::hint::spin_loop();
        }
        token.cancel();
    }
}

// ===== one submitting thread =====

/// What a request does, and so what it may resolve to on its own (stops
/// from outside are allowed by `Kept`'s flags).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Returns `id`.
    Value(i64),
    /// An exec closure returning `id` that counts its runs in `Kept::runs`.
    Counted(i64),
    /// `error('planned failure <id>')`.
    LuaError(i64),
    /// Panics with `planned panic <id>` (in an exec closure, or in a Rust
    /// callback, even through `pcall`).
    Panic(i64),
    /// `while true do end`: only the budget ends it on its own (without
    /// one, it is always given a time limit).
    Loop,
    /// `spin()`: nothing ends it on its own; always given a time limit.
    Spin,
    /// Grows until the memory limit (or, if `budget_too`, the budget).
    OutOfMemory { budget_too: bool },
    /// `n = (n or 0) + 1` in an own session; checked by `check_counters`.
    Increment,
}

/// A task the thread keeps, with everything that decides what it may
/// resolve to.
struct Kept {
    task: Task<i64>,
    kind: Kind,
    /// For `Counted`: how often the closure ran.
    runs: Option<Arc<AtomicUsize>>,
    /// Cancelled (by us or the canceller thread) at some point.
    cancelled: bool,
    /// Given a short time limit.
    timed: bool,
    /// Submitted after the shutdown began (read after the submit returned).
    late: bool,
    /// For `Increment`: own key and position in its event list.
    counter: Option<(usize, usize)>,
}

impl Kept {
    /// Whether `r` is a result this request may resolve to, in a round
    /// whose shutdown is `abortive` or not.
    fn allows(&self, r: &Result<i64, IsleError>, abortive: bool) -> bool {
        let runs = self.runs.as_ref().map(|r| r.load(Ordering::SeqCst));
        let never_ran = runs.is_none_or(|n| n == 0);
        // A stop answers the caller on time even while a closure runs (its
        // late result is dropped): a stopped counted closure ran at most
        // once.
        let at_most_once = runs.is_none_or(|n| n <= 1);
        match r {
            // Refused before running: a counted closure did not run.
            Err(IsleError::QueueFull) => never_ran,
            Err(IsleError::Cancelled) => self.cancelled && at_most_once,
            Err(IsleError::Timeout) => self.timed && at_most_once,
            // Graceful shutdown runs everything queued before it began; an
            // abort stops what is queued or running.
            Err(IsleError::Shutdown) => (self.late || abortive) && at_most_once,
            _ => match (self.kind, r) {
                (Kind::Value(v), Ok(x)) => v == *x,
                (Kind::Counted(v), Ok(x)) => v == *x && runs == Some(1),
                (Kind::LuaError(id), Err(IsleError::Lua(e))) => {
                    e.kind() == LuaErrorKind::Runtime
                        && e.message().contains(&format!("planned failure {id}"))
                }
                (Kind::Panic(id), Err(IsleError::Panic(m))) => *m == format!("planned panic {id}"),
                (Kind::Loop, Err(IsleError::InstructionLimit)) => true,
                (Kind::OutOfMemory { .. }, Err(IsleError::MemoryLimit(_))) => true,
                (Kind::OutOfMemory { budget_too }, Err(IsleError::InstructionLimit)) => budget_too,
                (Kind::Increment, Ok(n)) => *n >= 1,
                _ => false,
            },
        }
    }
}

/// One own session's history, in submission order.
#[derive(Debug, Clone)]
enum Event {
    Close,
    /// An increment and, once collected, what it tells about its run.
    Increment(Option<Ran>),
}

#[derive(Debug, Clone, Copy)]
enum Ran {
    /// Ran and returned the counter's new value.
    Yes(i64),
    /// Stopped from outside: may have run, may not.
    Maybe,
    /// Refused before it could run.
    No,
}

/// What a thread saw, for the ledger check.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Requests submitted to the pool or a session (not broadcasts).
    submitted: u64,
    queue_full: u64,
    /// Requests seen resolving with a value / failing on their own.
    ok: u64,
    failed: u64,
    lua_errors: u64,
    panics: u64,
    memory: u64,
    budget: u64,
    cancelled: u64,
    timeouts: u64,
    /// `Shutdown` results seen (kept and dropped/detached ones).
    shutdown: u64,
    /// Kept requests stopped by an abortive shutdown (submitted before it).
    aborted: u64,
    /// Loops dropped while unresolved (they may fail or be cancelled).
    dropped_loops: u64,
    broadcasts: u64,
    closes: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.submitted += o.submitted;
        self.queue_full += o.queue_full;
        self.ok += o.ok;
        self.failed += o.failed;
        self.lua_errors += o.lua_errors;
        self.panics += o.panics;
        self.memory += o.memory;
        self.budget += o.budget;
        self.cancelled += o.cancelled;
        self.timeouts += o.timeouts;
        self.shutdown += o.shutdown;
        self.aborted += o.aborted;
        self.dropped_loops += o.dropped_loops;
        self.broadcasts += o.broadcasts;
        self.closes += o.closes;
    }

    /// Counts the result of a request (kept, blocking, or seen at once).
    fn count(&mut self, r: &Result<i64, IsleError>) {
        match r {
            Ok(_) => self.ok += 1,
            Err(IsleError::QueueFull) => self.queue_full += 1,
            Err(IsleError::Cancelled) => self.cancelled += 1,
            Err(IsleError::Timeout) => self.timeouts += 1,
            Err(IsleError::Shutdown) => self.shutdown += 1,
            Err(e) => {
                self.failed += 1;
                match e {
                    IsleError::Lua(_) => self.lua_errors += 1,
                    IsleError::Panic(_) => self.panics += 1,
                    IsleError::MemoryLimit(_) => self.memory += 1,
                    IsleError::InstructionLimit => self.budget += 1,
                    _ => {}
                }
            }
        }
    }
}

struct Chaos {
    t: usize,
    rng: Rng,
    pool: IslePool,
    shutting_down: Arc<AtomicBool>,
    /// The round ends with an abortive shutdown.
    abortive: bool,
    detached_runs: Arc<AtomicU64>,
    dropped_runs: Arc<AtomicU64>,
    cancels: Sender<(CancelToken, u32)>,
    pending: Vec<Kept>,
    /// Planned cancels: (index in `pending`, operations left before it).
    to_cancel: Vec<(usize, u32)>,
    /// Per own key, its events.
    own: Vec<Vec<Event>>,
    tally: Tally,
}

impl Chaos {
    fn run(mut self, share: u64, progress: Sender<()>, done: Receiver<()>) -> Tally {
        let mut n = 0u64;
        let mut progress = Some(progress);
        let shutdown_at = share - LEFT_AT_SHUTDOWN.min(share / 5);
        while self.tally.submitted < share {
            if self.tally.submitted >= shutdown_at {
                if let Some(p) = progress.take() {
                    let _ = p.send(());
                }
            }
            self.tick_cancels();
            let id = ((self.t as i64) << 40) + n as i64;
            self.operation(id);
            if self.pending.len() >= MAX_PENDING {
                self.collect();
            }
            n += 1;
        }
        drop(progress);
        self.fire_cancels();
        // Wait for `shutdown` to return: then every task must have resolved.
        let _ = done.recv();
        for mut kept in std::mem::take(&mut self.pending) {
            let r = kept
                .task
                .try_result()
                .expect("a task was unresolved after shutdown returned");
            self.check(kept, r);
        }
        self.check_counters();
        self.tally
    }

    /// True once the shutdown has begun.
    fn late(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Whether a request just submitted may resolve `Shutdown`.
    fn may_shut(&self) -> bool {
        self.abortive || self.late()
    }

    fn own_key(&self, k: usize) -> String {
        format!("t{}-k{k}", self.t)
    }

    /// One random operation.
    fn operation(&mut self, id: i64) {
        let pool = self.pool.clone();
        let own = self.rng.below(OWN_KEYS as u64) as usize;
        let session = pool.session(self.own_key(own));
        let shared = pool.session(self.rng.below(SHARED_KEYS));
        match self.rng.below(79) {
            // Fast requests, unkeyed and on shared sessions.
            0..=5 => self.spawn(pool.spawn_eval(format!("return {id}")), Kind::Value(id)),
            6..=9 => self.spawn(pool.spawn_call("echo", id), Kind::Value(id)),
            10..=13 => self.spawn(pool.spawn_exec(move |_| Ok(id)), Kind::Value(id)),
            14..=17 => self.spawn(shared.spawn_eval(format!("return {id}")), Kind::Value(id)),
            // Unkeyed work never sees session globals.
            18..=19 => self.spawn(
                pool.spawn_eval("return (n == nil and rawget(_G, 'n') == nil) and 1 or 0"),
                Kind::Value(1),
            ),
            20..=23 => {
                let runs = Arc::new(AtomicUsize::new(0));
                let r = runs.clone();
                let work = move || {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(id)
                };
                let task = if self.rng.below(2) == 0 {
                    pool.spawn_exec(move |_| work())
                } else {
                    session.spawn_exec(move |_, _| work())
                };
                self.keep(task, Kind::Counted(id), Some(runs), None);
            }
            24..=26 => {
                let code = format!("error('planned failure {id}')");
                let task = match self.rng.below(3) {
                    0 => pool.spawn_eval(code),
                    1 => session.spawn_eval(code),
                    _ => shared.spawn_eval(code),
                };
                self.spawn(task, Kind::LuaError(id));
            }
            27..=29 => {
                let task = match self.rng.below(4) {
                    0 => pool
                        .spawn_exec(move |_| -> mlua::Result<i64> { panic!("planned panic {id}") }),
                    1 => session.spawn_exec(move |_, _| -> mlua::Result<i64> {
                        panic!("planned panic {id}")
                    }),
                    2 => pool.spawn_call("boom", id),
                    // Lua cannot swallow it.
                    _ => pool.spawn_eval(format!("return select(2, pcall(boom, {id}))")),
                };
                self.spawn(task, Kind::Panic(id));
            }
            30..=35 => {
                let code = "while true do end";
                let task = match self.rng.below(3) {
                    0 => pool.spawn_eval(code),
                    1 => session.spawn_eval(code),
                    _ => shared.spawn_eval(code),
                };
                self.spawn(task, Kind::Loop);
            }
            36 => {
                let task = match self.rng.below(2) {
                    0 => pool.spawn_call("spin", ()),
                    _ => session.spawn_eval("return spin()"),
                };
                self.spawn(task, Kind::Spin);
            }
            37..=38 => {
                let (code, budget_too) = match self.rng.below(2) {
                    0 => ("local s = 'x' while true do s = s .. s end", false),
                    // Under this budget, a table of numbers runs out of
                    // instructions before memory.
                    _ => ("local t = {} for i = 1, 1e8 do t[i] = i end", true),
                };
                let task = match self.rng.below(2) {
                    0 => pool.spawn_eval(code),
                    _ => session.spawn_eval(code),
                };
                self.spawn(task, Kind::OutOfMemory { budget_too });
            }
            39..=52 => {
                let task = session.spawn_eval("n = (n or 0) + 1 return n");
                let late = self.late();
                self.own[own].push(Event::Increment(None));
                let at = (own, self.own[own].len() - 1);
                self.track(task, Kind::Increment, None, Some(at), late);
            }
            53..=55 => {
                let task = session.spawn_exec(move |_, env| {
                    env.set("last", id)?;
                    env.get::<i64>("last")
                });
                self.spawn(task, Kind::Value(id));
            }
            56..=57 => {
                session.close();
                self.own[own].push(Event::Close);
                self.tally.closes += 1;
            }
            58..=59 => {
                pool.close_session(self.rng.below(SHARED_KEYS));
                self.tally.closes += 1;
            }
            // Dropped at once: a counted closure (completes if it ran) or a
            // loop (the drop must stop it).
            60..=65 => {
                let is_loop = self.rng.below(2) == 0;
                let mut task = match (is_loop, self.rng.below(2)) {
                    (false, 0) => {
                        let runs = self.dropped_runs.clone();
                        pool.spawn_exec(move |_| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok(id)
                        })
                    }
                    (false, _) => {
                        let runs = self.dropped_runs.clone();
                        shared.spawn_exec(move |_, _| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok(id)
                        })
                    }
                    (true, 0) => pool.spawn_eval("while true do end"),
                    (true, _) => session.spawn_eval("while true do end"),
                };
                self.tally.submitted += 1;
                let seen = task.try_result();
                drop(task);
                self.seen_at_once(seen, is_loop);
            }
            66..=71 => {
                let runs = self.detached_runs.clone();
                let work = move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(id)
                };
                let mut task = match self.rng.below(2) {
                    0 => pool.spawn_exec(move |_| work()),
                    _ => shared.spawn_exec(move |_, _| work()),
                };
                self.tally.submitted += 1;
                self.seen_at_once(task.try_result(), false);
                task.detach();
            }
            72 => {
                let results = pool.broadcast(|lua| lua.load("return 7").eval::<i64>());
                let may_shut = self.may_shut();
                assert_eq!(results.len(), WORKERS);
                for r in results {
                    assert!(
                        r == Ok(7) || (may_shut && r == Err(IsleError::Shutdown)),
                        "thread {}: broadcast gave {r:?} (may shut: {may_shut})",
                        self.t
                    );
                }
                self.tally.broadcasts += 1;
            }
            73..=75 => {
                let r = match self.rng.below(2) {
                    0 => pool.eval::<i64>(format!("return {id}")),
                    _ => shared.eval::<i64>(format!("return {id}")),
                };
                let may_shut = self.may_shut();
                self.tally.submitted += 1;
                self.tally.count(&r);
                assert!(
                    r == Ok(id)
                        || r == Err(IsleError::QueueFull)
                        || (may_shut && r == Err(IsleError::Shutdown)),
                    "thread {}: blocking eval gave {r:?} (may shut: {may_shut})",
                    self.t
                );
            }
            // Collect what is pending, each task in a random way.
            _ => self.collect(),
        }
    }

    /// Records a request whose task is dropped or detached, from a look at
    /// its result just before: a refusal shows at once; a closure may have
    /// finished (its run counter counts it) and a loop may have used up its
    /// budget, if this thread was descheduled for that long.
    fn seen_at_once(&mut self, r: Option<Result<i64, IsleError>>, is_loop: bool) {
        match r {
            None if is_loop => self.tally.dropped_loops += 1,
            None => {}
            Some(Err(IsleError::QueueFull)) => self.tally.queue_full += 1,
            Some(Err(IsleError::Shutdown)) => {
                assert!(self.late(), "thread {}: Shutdown before shutdown", self.t);
                self.tally.shutdown += 1;
            }
            Some(Ok(_)) if !is_loop => {}
            Some(r @ Err(IsleError::InstructionLimit)) if is_loop => self.tally.count(&r),
            Some(r) => panic!("thread {}: a dropped request gave {r:?}", self.t),
        }
    }

    fn spawn(&mut self, task: Task<i64>, kind: Kind) {
        self.keep(task, kind, None, None);
    }

    fn keep(
        &mut self,
        task: Task<i64>,
        kind: Kind,
        runs: Option<Arc<AtomicUsize>>,
        counter: Option<(usize, usize)>,
    ) {
        let late = self.late();
        self.track(task, kind, runs, counter, late);
    }

    /// Keeps `task`, after maybe giving it a time limit and a cancel.
    fn track(
        &mut self,
        task: Task<i64>,
        kind: Kind,
        runs: Option<Arc<AtomicUsize>>,
        counter: Option<(usize, usize)>,
        late: bool,
    ) {
        self.tally.submitted += 1;
        let rng = &mut self.rng;
        let timed = kind == Kind::Spin || (kind == Kind::Loop && !BUDGETED) || rng.below(10) == 0;
        let task = if timed {
            task.timeout(Duration::from_micros(rng.below(2_000)))
        } else {
            task
        };
        // Most loops are cancelled; the rest end by time limit or budget.
        let cancel_one_in = if kind == Kind::Loop { 2 } else { 8 };
        let cancelled = rng.below(cancel_one_in) == 0;
        if cancelled {
            match rng.below(3) {
                0 => task.cancel(),
                1 => self
                    .to_cancel
                    .push((self.pending.len(), rng.below(6) as u32)),
                _ => {
                    let token = task.cancel_token().clone();
                    let _ = self.cancels.send((token, rng.below(20_000) as u32));
                }
            }
        }
        self.pending.push(Kept {
            task,
            kind,
            runs,
            cancelled,
            timed,
            late,
            counter,
        });
    }

    /// Fires the planned cancels whose moment has come.
    fn tick_cancels(&mut self) {
        let pending = &self.pending;
        self.to_cancel.retain_mut(|(at, left)| {
            if *left == 0 {
                pending[*at].task.cancel();
                false
            } else {
                *left -= 1;
                true
            }
        });
    }

    fn fire_cancels(&mut self) {
        for (at, _) in self.to_cancel.drain(..) {
            self.pending[at].task.cancel();
        }
    }

    /// Waits for every pending task, each in a random way.
    fn collect(&mut self) {
        self.fire_cancels();
        for kept in std::mem::take(&mut self.pending) {
            let how = self.rng.below(4);
            let (kept, r) = resolve(kept, how);
            self.check(kept, r);
        }
    }

    fn check(&mut self, kept: Kept, r: Result<i64, IsleError>) {
        assert!(
            kept.allows(&r, self.abortive),
            "thread {}: {:?} (cancelled: {}, timed: {}, late: {}) resolved to {r:?}",
            self.t,
            kept.kind,
            kept.cancelled,
            kept.timed,
            kept.late
        );
        self.tally.count(&r);
        if r == Err(IsleError::Shutdown) && !kept.late {
            self.tally.aborted += 1;
        }
        if let Some((key, at)) = kept.counter {
            let ran = match r {
                Ok(n) => Ran::Yes(n),
                Err(IsleError::QueueFull) => Ran::No,
                // An abort interrupts running requests too.
                Err(IsleError::Shutdown) if !self.abortive => Ran::No,
                Err(_) => Ran::Maybe,
            };
            self.own[key][at] = Event::Increment(Some(ran));
        }
    }

    /// A session's requests run in order, in the session's own globals, and
    /// a close starts it afresh: each value an increment returns is above
    /// the last one seen since the last close, by at most one more than the
    /// number of increments in between that may have run unseen.
    fn check_counters(&self) {
        for (k, events) in self.own.iter().enumerate() {
            let (mut last, mut unseen) = (0i64, 0i64);
            for (i, e) in events.iter().enumerate() {
                match e {
                    Event::Close => (last, unseen) = (0, 0),
                    Event::Increment(Some(Ran::Yes(n))) => {
                        assert!(
                            last < *n && *n <= last + 1 + unseen,
                            "thread {}, key {k}, event {i}: counter {n} after {last} \
                             with {unseen} unseen increments: {events:?}",
                            self.t
                        );
                        (last, unseen) = (*n, 0);
                    }
                    Event::Increment(Some(Ran::Maybe)) => unseen += 1,
                    Event::Increment(Some(Ran::No)) => {}
                    Event::Increment(None) => panic!("an increment was never collected"),
                }
            }
        }
    }
}

/// Waits for a kept task in one of four ways; each must deliver its result
/// once, within `PATIENCE`.
fn resolve(mut kept: Kept, how: u64) -> (Kept, Result<i64, IsleError>) {
    fn hung(kind: Kind) -> ! {
        panic!("a {kind:?} request never resolved")
    }
    let deadline = Instant::now() + PATIENCE;
    let kind = kept.kind;
    let r = match how {
        0 => kept
            .task
            .wait_timeout(PATIENCE)
            .unwrap_or_else(|| hung(kind)),
        1 => poll_until_ready(&mut kept.task, deadline).unwrap_or_else(|| hung(kind)),
        2 => loop {
            if let Some(r) = kept.task.wait_timeout(Duration::from_micros(200)) {
                break r;
            }
            if Instant::now() > deadline {
                hung(kind);
            }
        },
        _ => loop {
            if let Some(r) = kept.task.try_result() {
                break r;
            }
            if Instant::now() > deadline {
                hung(kind);
            }
            std::thread::yield_now();
        },
    };
    assert!(kept.task.is_finished());
    (kept, r)
}

/// Polls `task` as a future, parking between wake-ups, until `deadline`.
fn poll_until_ready(task: &mut Task<i64>, deadline: Instant) -> Option<Result<i64, IsleError>> {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(r) = Pin::new(&mut *task).poll(&mut cx) {
            return Some(r);
        }
        let now = Instant::now();
        if now > deadline {
            return None;
        }
        std::thread::park_timeout(deadline - now);
    }
}

// ===== helpers =====

/// Keeps the planned panics (thousands of them) out of the test output;
/// any other panic is reported as usual.
fn quiet_planned_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied());
            if !msg.is_some_and(|m| m.starts_with("planned panic")) {
                report(info);
            }
        }));
    });
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task (Linux only)")
        .count()
}

/// True once the process has at most `n` threads. A joined thread can stay
/// listed in `/proc` for a moment after `join` returns, and nothing reports
/// when it goes, so this polls (up to `PATIENCE`).
fn threads_settle_to(n: usize) -> bool {
    common::poll_until(|| thread_count() <= n)
}
