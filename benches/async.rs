//! Requests that await async Rust functions (the `async` feature), each
//! number beside a baseline measured in the same run:
//!
//! - a burst of 10,000 requests, each awaiting a 10 ms timer, on a 2-VM
//!   pool, until all have resolved (target ≤ 100 ms); baseline: the same
//!   work on the blocking path (a Rust callback sleeping 10 ms), fewer
//!   requests, with its rate. (No comparison with the published
//!   `mlua-isle` crate: we do not depend on it.)
//! - memory per suspended request: RSS delta over 10,000 suspended
//!   requests (target ≤ 4 KiB each); baseline: 10,000 pending
//!   `call_async` futures of the same async function in plain mlua;
//! - cancel of a suspended request → `wait` returns (target p99 ≤ 50 µs);
//!   baseline: cancel of a request running `while true do end`.
//!
//! The timer is a plain thread (no runtime): `sleep(d)` is a
//! `futures::channel::oneshot` it completes at the deadline. With the
//! `tokio` feature, the burst is also run with `tokio::time::sleep`.
//!
//! Run: `cargo bench --features async --bench async`

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Condvar, Mutex, OnceLock};
use std::task::{Context, Waker};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use futures::channel::oneshot;
use mlua::Lua;
use mlua_isle::{Isle, IsleError, IslePool, Task};

/// Requests in a burst, and suspended at once for the memory figure.
const BURST: usize = 10_000;
/// Requests of the blocking baseline (each holds its VM for 10 ms).
const BLOCKING: usize = 200;
/// Cancel samples of each kind.
const CANCELS: usize = 3_000;

// ---------------------------------------------------------------------
// A runtime-agnostic timer: one thread completing oneshots at deadlines.

struct Timer {
    due: Mutex<BTreeMap<(Instant, u64), oneshot::Sender<()>>>,
    changed: Condvar,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            due: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
        }));
        thread::Builder::new()
            .name("bench-timer".into())
            .spawn(move || t.run())
            .unwrap();
        t
    })
}

impl Timer {
    fn run(&self) {
        let mut due = self.due.lock().unwrap();
        loop {
            let now = Instant::now();
            let next = due.first_key_value().map(|(k, _)| k.0);
            match next {
                None => due = self.changed.wait(due).unwrap(),
                Some(at) if at > now => due = self.changed.wait_timeout(due, at - now).unwrap().0,
                Some(_) => {
                    let mut fire = Vec::new();
                    while let Some(e) = due.first_entry() {
                        if e.key().0 > now {
                            break;
                        }
                        fire.push(e.remove());
                    }
                    drop(due);
                    for tx in fire {
                        let _ = tx.send(());
                    }
                    due = self.due.lock().unwrap();
                }
            }
        }
    }
}

/// Completes after `d` (woken by the timer thread).
fn sleep(d: Duration) -> impl Future<Output = ()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (tx, rx) = oneshot::channel();
    let t = timer();
    let key = (
        Instant::now() + d,
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    );
    let mut due = t.due.lock().unwrap();
    let earliest = due.first_key_value().is_none_or(|(k, _)| key < *k);
    due.insert(key, tx);
    drop(due);
    if earliest {
        t.changed.notify_one();
    }
    async move {
        let _ = rx.await;
    }
}

// ---------------------------------------------------------------------
// A gate: `hold()` waits until `open_gate()`.

static GATE: Mutex<Vec<oneshot::Sender<()>>> = Mutex::new(Vec::new());

fn held() -> usize {
    GATE.lock().unwrap().len()
}

fn open_gate() {
    for tx in std::mem::take(&mut *GATE.lock().unwrap()) {
        let _ = tx.send(());
    }
}

fn hold_fn(lua: &Lua) -> mlua::Result<mlua::Function> {
    lua.create_async_function(|_, ()| {
        let (tx, rx) = oneshot::channel::<()>();
        GATE.lock().unwrap().push(tx);
        async move {
            let _ = rx.await;
            Ok(1)
        }
    })
}

/// The pool's and isles' init: `sleep_ms(ms)` (async), `block_ms(ms)`
/// (blocking), `hold()` (async, until the gate opens), and the request
/// functions built on them.
fn install(lua: &Lua) -> mlua::Result<()> {
    let g = lua.globals();
    g.set(
        "sleep_ms",
        lua.create_async_function(|_, ms: u64| async move {
            sleep(Duration::from_millis(ms)).await;
            Ok(())
        })?,
    )?;
    g.set(
        "block_ms",
        lua.create_function(|_, ms: u64| {
            thread::sleep(Duration::from_millis(ms));
            Ok(())
        })?,
    )?;
    g.set("hold", hold_fn(lua)?)?;
    lua.load(
        "function fetch() sleep_ms(10) return 1 end
         function fetch_blocking() block_ms(10) return 1 end
         function held() return hold() end",
    )
    .exec()
}

fn pool() -> IslePool {
    IslePool::builder()
        .workers(2)
        .init(install)
        .build()
        .unwrap()
}

/// Submits `n` calls of `f` at once; the time until all have resolved,
/// and how long the submitting took.
fn burst(pool: &IslePool, n: usize, f: &str) -> (Duration, Duration) {
    let t0 = Instant::now();
    let tasks: Vec<Task<i64>> = (0..n).map(|_| pool.spawn_call(f, ())).collect();
    let submitted = t0.elapsed();
    for t in tasks {
        assert_eq!(t.wait(), Ok(1));
    }
    (t0.elapsed(), submitted)
}

// ---------------------------------------------------------------------
// Cancel latency.

/// An isle whose `forever()` (async) says "started" on its first poll and
/// never completes, and whose `started()` (Lua loop baseline) says it too.
struct CancelIsle {
    isle: Isle,
    started: crossbeam_channel::Receiver<()>,
}

fn cancel_isle() -> CancelIsle {
    let (tx, started) = crossbeam_channel::unbounded::<()>();
    let isle = Isle::spawn(move |lua| {
        let g = lua.globals();
        let tx2 = tx.clone();
        g.set(
            "forever",
            lua.create_async_function(move |_, ()| {
                let tx = tx2.clone();
                async move {
                    let _ = tx.send(());
                    std::future::pending::<mlua::Result<()>>().await
                }
            })?,
        )?;
        g.set(
            "started",
            lua.create_function(move |_, ()| {
                let _ = tx.send(());
                Ok(())
            })?,
        )
    })
    .unwrap();
    CancelIsle { isle, started }
}

#[derive(Clone, Copy)]
enum Victim {
    /// Suspended in `forever()`.
    Suspended,
    /// Running `while true do end`.
    LuaLoop,
}

/// Starts a request, lets it settle (suspended, or spinning), then
/// measures from `cancel` until `wait` has returned.
fn cancel_once(c: &CancelIsle, victim: Victim) -> Duration {
    let task = match victim {
        Victim::Suspended => c.isle.spawn_eval::<()>("forever()"),
        Victim::LuaLoop => c.isle.spawn_eval::<()>("started() while true do end"),
    };
    c.started.recv().unwrap();
    // The future said "started" from its first poll: give the VM the few
    // microseconds it takes to park the request.
    thread::sleep(Duration::from_micros(200));
    let t0 = Instant::now();
    task.cancel();
    let r = task.wait();
    let dt = t0.elapsed();
    assert_eq!(r, Err(IsleError::Cancelled));
    dt
}

// ---------------------------------------------------------------------
// Memory.

/// Resident set size of this process, in bytes.
#[cfg(target_os = "linux")]
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// Gives freed heap back to the OS (glibc keeps it otherwise), so that
/// rounds after the first measure growth, not reuse.
#[cfg(target_os = "linux")]
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lua heap of each VM of `pool`.
fn lua_heap(pool: &IslePool) -> usize {
    pool.broadcast(|lua| Ok(lua.used_memory()))
        .into_iter()
        .map(Result::unwrap)
        .sum()
}

/// Bytes per request (RSS, Lua heap) with `BURST` requests suspended on
/// `pool`.
#[cfg(target_os = "linux")]
fn memory_pool(pool: &IslePool) -> (f64, f64) {
    for r in pool.broadcast(|lua| lua.gc_collect()) {
        r.unwrap();
    }
    trim();
    let (rss0, lua0) = (rss(), lua_heap(pool));
    let tasks: Vec<Task<i64>> = (0..BURST).map(|_| pool.spawn_call("held", ())).collect();
    let suspended = || -> usize { pool.metrics().workers.iter().map(|w| w.suspended).sum() };
    let t0 = Instant::now();
    while held() < BURST || suspended() < BURST {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never all suspended"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let (rss1, lua1) = (rss(), lua_heap(pool));
    open_gate();
    for t in tasks {
        assert_eq!(t.wait(), Ok(1));
    }
    let per = |a: usize, b: usize| (b as f64 - a as f64) / BURST as f64;
    (per(rss0, rss1), per(lua0, lua1))
}

/// The floor: `BURST` pending `call_async` futures of the same async
/// function in plain mlua, on this thread.
#[cfg(target_os = "linux")]
fn memory_plain() -> (f64, f64) {
    let lua = Lua::new();
    let hold = hold_fn(&lua).unwrap();
    let _ = lua.gc_collect();
    trim();
    let (rss0, lua0) = (rss(), lua.used_memory());
    let mut cx = Context::from_waker(Waker::noop());
    let futures: Vec<_> = (0..BURST)
        .map(|_| {
            let mut f = Box::pin(hold.call_async::<i64>(()));
            assert!(f.as_mut().poll(&mut cx).is_pending());
            f
        })
        .collect();
    let (rss1, lua1) = (rss(), lua.used_memory());
    open_gate();
    for mut f in futures {
        assert!(matches!(
            f.as_mut().poll(&mut cx),
            std::task::Poll::Ready(Ok(1))
        ));
    }
    let per = |a: usize, b: usize| (b as f64 - a as f64) / BURST as f64;
    (per(rss0, rss1), per(lua0, lua1))
}

// ---------------------------------------------------------------------

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summaries() {
    // Memory first: the process is as fresh as it gets.
    #[cfg(target_os = "linux")]
    {
        let (mut ours, mut ours_lua, mut base, mut base_lua) = (vec![], vec![], vec![], vec![]);
        for round in 0..3 {
            // A fresh pool each round: its first 10,000 suspensions.
            let pool = pool();
            let (r, l) = memory_pool(&pool);
            pool.shutdown().unwrap();
            let (br, bl) = memory_plain();
            println!(
                "memory round {round}: {BURST} suspended requests {:>6.0} B each (Lua heap {:>5.0} B)   baseline plain mlua pending call_async: {:>6.0} B each (Lua heap {:>5.0} B)",
                r, l, br, bl
            );
            ours.push(r);
            ours_lua.push(l);
            base.push(br);
            base_lua.push(bl);
        }
        let ((lo, hi), (llo, lhi)) = (range(&ours), range(&ours_lua));
        let ((blo, bhi), (bllo, blhi)) = (range(&base), range(&base_lua));
        println!(
            "summary: memory per suspended request (RSS delta, target <= 4096 B)   {lo:.0}-{hi:.0} B (Lua heap {llo:.0}-{lhi:.0} B)   baseline plain mlua pending call_async: {blo:.0}-{bhi:.0} B (Lua heap {bllo:.0}-{blhi:.0} B)"
        );
    }
    #[cfg(not(target_os = "linux"))]
    println!("summary: memory per suspended request: skipped (reads /proc/self/statm)");

    // The burst, beside the blocking path, alternating.
    let pool = pool();
    let _ = burst(&pool, 1_000, "fetch"); // warm: slots, coroutines, timer
    let (mut times, mut blocking_rates) = (vec![], vec![]);
    for round in 0..5 {
        let (total, submit) = burst(&pool, BURST, "fetch");
        let (btotal, _) = burst(&pool, BLOCKING, "fetch_blocking");
        let rate = BURST as f64 / total.as_secs_f64();
        let brate = BLOCKING as f64 / btotal.as_secs_f64();
        println!(
            "burst round {round}: {BURST} x await 10 ms timer: all resolved in {:>6.1} ms (submitting {:>5.1} ms), {:>7.0} req/s   baseline blocking {BLOCKING} x 10 ms sleep: {:>7.1} ms, {:>5.0} req/s",
            ms(total),
            ms(submit),
            rate,
            ms(btotal),
            brate
        );
        times.push(ms(total));
        blocking_rates.push(brate);
    }
    let ((lo, hi), (blo, bhi)) = (range(&times), range(&blocking_rates));
    println!(
        "summary: {BURST} requests awaiting a 10 ms timer, 2-VM pool (target <= 100 ms)   {lo:.1}-{hi:.1} ms ({:.0}-{:.0} req/s)   baseline blocking path: {blo:.0}-{bhi:.0} req/s, i.e. {:.1}-{:.1} s for {BURST}",
        BURST as f64 / hi * 1e3,
        BURST as f64 / lo * 1e3,
        BURST as f64 / bhi,
        BURST as f64 / blo,
    );
    println!(
        "summary: (no comparison with the published mlua-isle crate: not a dependency, by choice)"
    );
    pool.shutdown().unwrap();

    #[cfg(feature = "tokio")]
    tokio_burst();

    // Cancel latency, the two kinds interleaved.
    let (suspended, looping) = (cancel_isle(), cancel_isle());
    let (mut s, mut l) = (Vec::new(), Vec::new());
    for _ in 0..CANCELS {
        s.push(cancel_once(&suspended, Victim::Suspended));
        l.push(cancel_once(&looping, Victim::LuaLoop));
    }
    let q = |v: &mut Vec<Duration>| {
        (
            common::quantile(v, 0.5),
            common::quantile(v, 0.99),
            common::quantile(v, 0.999),
            common::quantile(v, 1.0),
        )
    };
    let (p50, p99, p999, max) = q(&mut s);
    let (b50, b99, b999, bmax) = q(&mut l);
    println!(
        "summary: cancel -> wait returns, suspended request (target p99 <= 50us)   p50 {p50:.2?}   p99 {p99:.2?}   p99.9 {p999:.2?}   max {max:.2?}   ({CANCELS} samples)"
    );
    println!(
        "summary:   baseline: cancel of a running `while true do end`            p50 {b50:.2?}   p99 {b99:.2?}   p99.9 {b999:.2?}   max {bmax:.2?}"
    );
    // The VMs dropped the cancelled work: they still answer.
    assert_eq!(suspended.isle.eval::<i64>("1"), Ok(1));
    suspended.isle.shutdown().unwrap();
    looping.isle.shutdown().unwrap();
}

/// The burst with `tokio::time::sleep` (the pool's VMs run in the
/// runtime's context: the builder is called inside it).
#[cfg(feature = "tokio")]
fn tokio_burst() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let pool = {
        let _in_rt = rt.enter();
        IslePool::builder()
            .workers(2)
            .init(|lua| {
                lua.globals().set(
                    "tokio_sleep_ms",
                    lua.create_async_function(|_, ms: u64| async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(())
                    })?,
                )?;
                lua.load("function fetch() tokio_sleep_ms(10) return 1 end")
                    .exec()
            })
            .build()
            .unwrap()
    };
    let _ = burst(&pool, 1_000, "fetch");
    let times: Vec<f64> = (0..5).map(|_| ms(burst(&pool, BURST, "fetch").0)).collect();
    let (lo, hi) = range(&times);
    println!(
        "summary: {BURST} requests awaiting tokio::time::sleep(10 ms), 2-VM pool          {lo:.1}-{hi:.1} ms over 5 rounds"
    );
    pool.shutdown().unwrap();
}

fn async_requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("async");
    g.sample_size(10);
    let p = pool();
    g.bench_function("burst_10k_await_10ms_timer", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| burst(&p, BURST, "fetch").0).sum())
    });
    p.shutdown().unwrap();
    let ci = cancel_isle();
    g.bench_function("cancel_suspended_to_wait_return", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| cancel_once(&ci, Victim::Suspended))
                .sum()
        })
    });
    ci.isle.shutdown().unwrap();
    g.finish();
    if common::benching() {
        summaries();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = async_requests
}
criterion_main!(benches);
