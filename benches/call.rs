//! Request round trip and cancel latency of one `Isle`, beside the floors.
//!
//! - `direct_mlua`: a same-thread call of the tiny function (no hop at all);
//! - `crossbeam_ping_pong`: the physical floor of a hop, a request and a
//!   reply between two threads over crossbeam channels;
//! - `mpsc_actor`: the naive design, a `Lua` owned by a thread behind
//!   `std::sync::mpsc`;
//! - `isle_call`: `Isle::call` of the same function.
//!
//! Target: `isle_call` ≤ 2x `crossbeam_ping_pong`; cancel → `wait` p99 ≤ 50 µs.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use mlua::{Function, Lua};
use mlua_isle::{Isle, IsleError};

const ADD: &str = "function add(a, b) return a + b end";

fn direct() -> (Lua, Function) {
    let lua = Lua::new();
    lua.load(ADD).exec().unwrap();
    let f: Function = lua.globals().get("add").unwrap();
    (lua, f)
}

/// A thread answering each `u64` with `u64 + 1` (the hop floor).
struct PingPong {
    tx: crossbeam_channel::Sender<u64>,
    rx: crossbeam_channel::Receiver<u64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PingPong {
    fn new() -> Self {
        let (tx, req) = crossbeam_channel::bounded::<u64>(1);
        let (resp, rx) = crossbeam_channel::bounded::<u64>(1);
        let thread = thread::spawn(move || {
            while let Ok(v) = req.recv() {
                let _ = resp.send(v + 1);
            }
        });
        PingPong {
            tx,
            rx,
            thread: Some(thread),
        }
    }
    fn hop(&self, v: u64) -> u64 {
        self.tx.send(v).unwrap();
        self.rx.recv().unwrap()
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        let (tx, _) = crossbeam_channel::bounded(1);
        drop(std::mem::replace(&mut self.tx, tx));
        self.thread.take().unwrap().join().unwrap();
    }
}

/// The naive actor: a thread owning a `Lua`, requests over std mpsc, each
/// with its own reply channel.
struct MpscActor {
    tx: Option<mpsc::Sender<(i64, mpsc::Sender<i64>)>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MpscActor {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<(i64, mpsc::Sender<i64>)>();
        let thread = thread::spawn(move || {
            let (_lua, add) = direct();
            while let Ok((v, reply)) = rx.recv() {
                let _ = reply.send(add.call::<i64>((v, 1)).unwrap());
            }
        });
        MpscActor {
            tx: Some(tx),
            thread: Some(thread),
        }
    }
    fn call(&self, v: i64) -> i64 {
        let (reply, rx) = mpsc::channel();
        self.tx.as_ref().unwrap().send((v, reply)).unwrap();
        rx.recv().unwrap()
    }
}

impl Drop for MpscActor {
    fn drop(&mut self) {
        self.tx.take();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn isle() -> Isle {
    Isle::spawn(|lua| lua.load(ADD).exec()).unwrap()
}

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_round_trip");
    let (_lua, add) = direct();
    g.bench_function("direct_mlua", |b| {
        b.iter(|| add.call::<i64>((1, 2)).unwrap())
    });
    let pp = PingPong::new();
    g.bench_function("crossbeam_ping_pong", |b| b.iter(|| pp.hop(1)));
    let actor = MpscActor::new();
    g.bench_function("mpsc_actor", |b| b.iter(|| actor.call(1)));
    let isle = isle();
    g.bench_function("isle_call", |b| {
        b.iter(|| isle.call::<i64>("add", (1, 2)).unwrap())
    });
    g.finish();
    if !common::benching() {
        return;
    }

    // One summary; each pair measured in alternating rounds, so the ratio
    // is taken under the same machine load.
    let hop = || {
        pp.hop(1);
    };
    let isle_vs_hop = common::interleaved(
        15,
        20_000,
        || {
            isle.call::<i64>("add", (1, 2)).unwrap();
        },
        hop,
    );
    common::report(
        "isle_call (target <= 2x)",
        &isle_vs_hop,
        "crossbeam_ping_pong",
    );
    let naive = common::interleaved(
        5,
        1_000,
        || {
            actor.call(1);
        },
        hop,
    );
    common::report("mpsc_actor", &naive, "crossbeam_ping_pong");
    let same_thread = common::interleaved(
        5,
        20_000,
        || {
            add.call::<i64>((1, 2)).unwrap();
        },
        hop,
    );
    common::report("direct_mlua", &same_thread, "crossbeam_ping_pong");
    isle.shutdown().unwrap();
}

/// Starts an infinite loop on `isle`, waits until it runs, then measures
/// from `cancel` until `wait` has returned.
fn cancel_once(isle: &Isle, started: &crossbeam_channel::Receiver<()>) -> Duration {
    let task = isle.spawn_eval::<()>("started() while true do end");
    started.recv().unwrap();
    let t0 = Instant::now();
    task.cancel();
    let r = task.wait();
    let dt = t0.elapsed();
    assert_eq!(r, Err(IsleError::Cancelled));
    dt
}

fn cancel_latency(c: &mut Criterion) {
    let spawn = |permanent_hook: bool| {
        let (tx, started) = crossbeam_channel::unbounded::<()>();
        let isle = Isle::builder()
            .permanent_hook(permanent_hook)
            .spawn(move |lua| {
                let f = lua.create_function(move |_, ()| {
                    let _ = tx.send(());
                    Ok(())
                })?;
                lua.globals().set("started", f)
            })
            .unwrap();
        (isle, started)
    };
    let (isle, started) = spawn(false);
    let (hooked, hooked_started) = spawn(true);
    let mut g = c.benchmark_group("cancel_latency");
    g.bench_function("cancel_to_wait_return", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| cancel_once(&isle, &started)).sum())
    });
    g.bench_function("cancel_to_wait_return_permanent_hook", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| cancel_once(&hooked, &hooked_started))
                .sum()
        })
    });
    g.finish();
    if !common::benching() {
        return;
    }

    let quantiles = |mut samples: Vec<Duration>| {
        (
            common::quantile(&mut samples, 0.50),
            common::quantile(&mut samples, 0.99),
            common::quantile(&mut samples, 1.0),
        )
    };
    let (p50, p99, max) = quantiles((0..2_000).map(|_| cancel_once(&isle, &started)).collect());
    println!("summary: cancel -> wait returns, hook armed on demand (target p99 <= 50us)   p50 {p50:.2?}   p99 {p99:.2?}   max {max:.2?}");
    let (p50, p99, max) = quantiles(
        (0..2_000)
            .map(|_| cancel_once(&hooked, &hooked_started))
            .collect(),
    );
    println!("summary: cancel -> wait returns, permanent_hook(true)                        p50 {p50:.2?}   p99 {p99:.2?}   max {max:.2?}");
    // The VM in code no hook reaches: the caller is answered by the stopper
    // (after `LET_GO`), the VM discards its late result.
    let stuck = stuck_isle();
    let (p50, p99, max) = quantiles(
        (0..2_000)
            .map(|_| cancel_stuck(&stuck, Stuck::RustCallback))
            .collect(),
    );
    println!("summary: cancel -> wait returns, VM inside a Rust callback (target p99 <= 50us) p50 {p50:.2?}   p99 {p99:.2?}   max {max:.2?}");
    let (p50, p99, max) = quantiles(
        (0..200)
            .map(|_| cancel_stuck(&stuck, Stuck::CCall))
            .collect(),
    );
    println!("summary: cancel -> wait returns, VM inside a long C call (gsub)  (target p99 <= 50us) p50 {p50:.2?}   p99 {p99:.2?}   max {max:.2?}");
    stuck.isle.shutdown().unwrap();
    #[cfg(unix)]
    {
        let (p50, p99, max) = quantiles(signal_floor(2_000));
        println!("summary: baseline: a signal reaching a spinning thread (the floor of arming) p50 {p50:.2?}   p99 {p99:.2?}   max {max:.2?}");
    }
    isle.shutdown().unwrap();
    hooked.shutdown().unwrap();
}

/// Where `stuck_isle`'s VM sits when a cancel comes.
#[derive(Clone, Copy)]
enum Stuck {
    /// `spin_in_rust()`: a Rust callback spinning until released.
    RustCallback,
    /// `string.gsub` over 2,000,000 characters, calling the Rust function
    /// `hit` for each: C and Rust code only, for tens of milliseconds.
    CCall,
}

struct StuckIsle {
    isle: Isle,
    started: crossbeam_channel::Receiver<()>,
    /// Lets `spin_in_rust` return.
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Makes the next `hit` say "started".
    announce: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn stuck_isle() -> StuckIsle {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (tx, started) = crossbeam_channel::unbounded::<()>();
    let release = Arc::new(AtomicBool::new(false));
    let announce = Arc::new(AtomicBool::new(false));
    let (flag, first) = (release.clone(), announce.clone());
    let isle = Isle::spawn(move |lua| {
        let g = lua.globals();
        let tx2 = tx.clone();
        g.set(
            "started",
            lua.create_function(move |_, ()| {
                let _ = tx.send(());
                Ok(())
            })?,
        )?;
        g.set(
            "spin_in_rust",
            lua.create_function(move |_, ()| {
                while !flag.swap(false, Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                Ok(())
            })?,
        )?;
        g.set(
            "hit",
            lua.create_function(move |_, ()| {
                if first.swap(false, Ordering::SeqCst) {
                    let _ = tx2.send(());
                }
                Ok(())
            })?,
        )?;
        g.set("long", "x".repeat(2_000_000))
    })
    .unwrap();
    StuckIsle {
        isle,
        started,
        release,
        announce,
    }
}

/// Measures cancel → `wait` while the VM is `where`, then lets the VM get
/// back (releases the callback; the C call ends) before the next one.
fn cancel_stuck(s: &StuckIsle, where_: Stuck) -> Duration {
    use std::sync::atomic::Ordering;
    // A release left over from a request stopped before it reached
    // `spin_in_rust` (the stop landed right after `started()`) would let
    // this one return at once.
    s.release.store(false, Ordering::SeqCst);
    let task = match where_ {
        Stuck::RustCallback => s.isle.spawn_eval::<()>("started() spin_in_rust()"),
        Stuck::CCall => {
            s.announce.store(true, Ordering::SeqCst);
            s.isle.spawn_eval::<()>("string.gsub(long, '.', hit)")
        }
    };
    s.started.recv().unwrap();
    let t0 = Instant::now();
    task.cancel();
    let r = task.wait();
    let dt = t0.elapsed();
    assert_eq!(r, Err(IsleError::Cancelled));
    if let Stuck::RustCallback = where_ {
        s.release.store(true, Ordering::SeqCst);
    }
    // Runs once the VM has got back and dropped the late result.
    assert_eq!(s.isle.eval::<i64>("1"), Ok(1));
    dt
}

/// How long a signal takes to reach a thread spinning on another CPU, from
/// `pthread_kill` until the thread has seen it: what arming on demand
/// waits for before the hook can fire.
#[cfg(unix)]
fn signal_floor(n: usize) -> Vec<Duration> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    static SEEN: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        SEEN.store(true, Ordering::SeqCst);
    }
    // SAFETY: installs a handler that only stores to an atomic, for a
    // real-time signal nothing else in this process uses.
    let signal = libc::SIGRTMIN() + 3;
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
    let acks = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spinner = {
        let (acks, stop) = (acks.clone(), stop.clone());
        thread::spawn(move || {
            // SAFETY: no preconditions.
            tx.send(unsafe { libc::pthread_self() } as usize).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if SEEN.swap(false, Ordering::SeqCst) {
                    acks.fetch_add(1, Ordering::SeqCst);
                }
                std::hint::spin_loop();
            }
        })
    };
    let target = rx.recv().unwrap() as libc::pthread_t;
    let samples = (0..n)
        .map(|i| {
            let t0 = Instant::now();
            // SAFETY: `target` is the spinner, alive until `stop`.
            unsafe { libc::pthread_kill(target, signal) };
            while acks.load(Ordering::SeqCst) <= i {
                std::hint::spin_loop();
            }
            t0.elapsed()
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    samples
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = round_trip, cancel_latency
}
criterion_main!(benches);
