//! What one VM costs, beside what a plain thread with a `Lua` costs:
//!
//! - `isle_spawn`: `Isle::spawn(|_| Ok(()))` (the default builder) with
//!   200 isles alive: time until it returns (the VM is ready), resident
//!   memory (RSS) and Lua heap per VM;
//! - baseline `thread_lua_new`: `std::thread::spawn` of a thread that
//!   creates `Lua::new()`, reports ready on a channel and waits on another
//!   (the same 200 alive), measured the same way;
//! - `pool_recycle_after_1`: an `IslePool` of one worker that starts a
//!   fresh VM after every request (`recycle_after(1)`), per blocking
//!   request, beside the same requests without recycling and beside a
//!   baseline of `Lua::new()` + the request + drop on one thread.
//!
//! Target: spawn time and RSS at or below the baseline (≤ 140 µs and
//! ≤ 48 KiB on the project's 2-core machines).
//!
//! Rounds run in this process (after a first one, so thread stacks and
//! allocator arenas exist, and with freed heap trimmed), and "cold": each
//! in a fresh process (this binary again), as a program's first VMs are.

mod common;

use std::collections::VecDeque;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use crossbeam_channel::{bounded, Sender};
use mlua::Lua;
use mlua_isle::{Isle, IslePool};

/// VMs alive while one more is spawned.
const ALIVE: usize = 200;

/// The baseline VM: a thread owning a plain `Lua`, parked on a channel.
struct Plain {
    stop: Option<Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The Lua heap right after `Lua::new()`.
    heap: usize,
}

impl Plain {
    /// Returns once the `Lua` exists, as `Isle::spawn` does.
    fn spawn() -> Plain {
        let (ready_tx, ready) = bounded(1);
        let (stop, stopped) = bounded::<()>(1);
        let thread = thread::spawn(move || {
            let lua = Lua::new();
            ready_tx.send(lua.used_memory()).unwrap();
            let _ = stopped.recv();
            drop(lua);
        });
        let heap = ready.recv().unwrap();
        Plain {
            stop: Some(stop),
            thread: Some(thread),
            heap,
        }
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        self.stop.take();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn isle() -> Isle {
    Isle::spawn(|_| Ok(())).unwrap()
}

fn isle_heap(isle: &Isle) -> usize {
    isle.exec(|lua| Ok(lua.used_memory())).unwrap()
}

/// Resident set size of this process, in bytes.
#[cfg(target_os = "linux")]
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

#[cfg(not(target_os = "linux"))]
fn rss() -> usize {
    0
}

/// Gives freed heap back to the OS (glibc keeps it otherwise), so that
/// each round measures growth, not reuse.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time (user and system) of the whole process so far: every
/// thread's, so spinning and work on the VM threads count, and a machine
/// shared with other work changes it less than the wall clock.
#[cfg(unix)]
fn cpu() -> Duration {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(not(unix))]
fn cpu() -> Duration {
    Duration::ZERO
}

/// One round: `ALIVE` VMs spawned one after another and kept, then
/// dropped. Wall and CPU time, and RSS, per VM, and the Lua heap of a VM.
struct Round {
    time: Duration,
    cpu: Duration,
    rss: f64,
    heap: f64,
}

fn round<V>(spawn: impl Fn() -> V, heap: impl Fn(&V) -> usize) -> Round {
    trim();
    let rss0 = rss();
    let mut alive = Vec::with_capacity(ALIVE);
    let (t0, cpu0) = (Instant::now(), cpu());
    for _ in 0..ALIVE {
        alive.push(spawn());
    }
    let (time, cpu) = (t0.elapsed() / ALIVE as u32, (cpu() - cpu0) / ALIVE as u32);
    let rss1 = rss();
    let heap = heap(&alive[ALIVE / 2]) as f64;
    drop(alive);
    Round {
        time,
        cpu,
        rss: (rss1 as f64 - rss0 as f64) / ALIVE as f64,
        heap,
    }
}

/// `ALIVE` VMs kept alive; each criterion iteration drops the oldest
/// (untimed) and times the spawn of a new one.
fn spawn_with_alive<V>(c: &mut Criterion, name: &str, spawn: impl Fn() -> V) {
    let mut alive: VecDeque<V> = (0..ALIVE).map(|_| spawn()).collect();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                drop(alive.pop_front());
                let t0 = Instant::now();
                let v = spawn();
                total += t0.elapsed();
                alive.push_back(v);
            }
            total
        })
    });
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// `median (lo-hi)` of `v`, scaled by `unit`.
fn spread(v: &[f64], unit: f64, digits: usize) -> String {
    let mut v: Vec<f64> = v.iter().map(|x| x / unit).collect();
    let (lo, hi) = range(&v);
    let m = median(&mut v);
    format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})")
}

fn spawn_cost(c: &mut Criterion) {
    // Summaries first, while the process is fresh.
    if common::benching() {
        cold_rounds();
        const ROUNDS: usize = 9;
        // One untimed round each: thread stacks and allocator arenas.
        round(isle, isle_heap);
        round(Plain::spawn, |p| p.heap);
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            base.push(round(Plain::spawn, |p| p.heap));
            ours.push(round(isle, isle_heap));
        }
        let col = |rs: &[Round], f: fn(&Round) -> f64| rs.iter().map(f).collect::<Vec<_>>();
        let us = |r: &Round| r.time.as_secs_f64() * 1e6;
        let cpu_us = |r: &Round| r.cpu.as_secs_f64() * 1e6;
        let rss = |r: &Round| r.rss;
        let heap = |r: &Round| r.heap;
        let ratios: Vec<f64> = ours.iter().zip(&base).map(|(o, b)| us(o) / us(b)).collect();
        println!(
            "summary: Isle::spawn, {ALIVE} alive (target <= baseline)   {} us   baseline thread + Lua::new: {} us   ours/baseline per round {}x   (median (range) of {ROUNDS} rounds)",
            spread(&col(&ours, us), 1.0, 1),
            spread(&col(&base, us), 1.0, 1),
            spread(&ratios, 1.0, 2),
        );
        println!(
            "summary: CPU time per VM (all threads)                 {} us   baseline thread + Lua::new: {} us",
            spread(&col(&ours, cpu_us), 1.0, 1),
            spread(&col(&base, cpu_us), 1.0, 1),
        );
        println!(
            "summary: RSS per VM, {ALIVE} alive (target <= baseline)     {} KiB   baseline thread + Lua::new: {} KiB",
            spread(&col(&ours, rss), 1024.0, 1),
            spread(&col(&base, rss), 1024.0, 1),
        );
        println!(
            "summary: Lua heap per VM                                   {} KiB   baseline Lua::new: {} KiB",
            spread(&col(&ours, heap), 1024.0, 1),
            spread(&col(&base, heap), 1024.0, 1),
        );
    }
    spawn_with_alive(c, "vm_cost/isle_spawn_200_alive", isle);
    spawn_with_alive(c, "vm_cost/thread_lua_new_200_alive", Plain::spawn);
}

/// Set in a child process: which cold round to run (`isle` or `plain`).
const COLD: &str = "MLUA_ISLE_VM_COST_COLD";

/// In a child process: one round, its numbers printed for the parent.
fn cold_child(which: &str) {
    let r = match which {
        "isle" => round(isle, isle_heap),
        _ => round(Plain::spawn, |p| p.heap),
    };
    println!(
        "cold {} {} {} {}",
        r.time.as_secs_f64() * 1e6,
        r.cpu.as_secs_f64() * 1e6,
        r.rss,
        r.heap
    );
}

/// Runs `which`'s cold round in a fresh process: (wall µs, CPU µs, RSS B).
fn cold(which: &str) -> (f64, f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(COLD, which)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("cold ")).unwrap();
    let v: Vec<f64> = line[5..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0], v[1], v[2])
}

fn cold_rounds() {
    const ROUNDS: usize = 5;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(cold("plain"));
        ours.push(cold("isle"));
    }
    let col =
        |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| v.iter().map(f).collect::<Vec<_>>();
    println!(
        "summary: cold (fresh process), {ALIVE} alive: Isle::spawn {} us, CPU {} us, RSS {} KiB per VM   baseline thread + Lua::new: {} us, CPU {} us, RSS {} KiB   (median (range) of {ROUNDS} processes each)",
        spread(&col(&ours, |r| r.0), 1.0, 1),
        spread(&col(&ours, |r| r.1), 1.0, 1),
        spread(&col(&ours, |r| r.2), 1024.0, 1),
        spread(&col(&base, |r| r.0), 1.0, 1),
        spread(&col(&base, |r| r.1), 1.0, 1),
        spread(&col(&base, |r| r.2), 1024.0, 1),
    );
}

fn pool_recycle(c: &mut Criterion) {
    let recycling = IslePool::builder()
        .workers(1)
        .recycle_after(1)
        .build()
        .unwrap();
    let steady = IslePool::builder().workers(1).build().unwrap();
    let request = |pool: &IslePool| assert_eq!(pool.eval::<i64>("return 1").unwrap(), 1);
    let fresh_lua = || {
        let lua = Lua::new();
        assert_eq!(lua.load("return 1").eval::<i64>().unwrap(), 1);
    };
    let mut g = c.benchmark_group("vm_cost");
    g.bench_function("pool_recycle_after_1", |b| b.iter(|| request(&recycling)));
    g.bench_function("pool_no_recycling", |b| b.iter(|| request(&steady)));
    g.bench_function("lua_new_request_drop", |b| b.iter(fresh_lua));
    g.finish();
    if common::benching() {
        let p = common::interleaved(15, 500, || request(&recycling), fresh_lua);
        let (lo, hi) = p.ratio_range();
        let plain = common::per_op(15, 2_000, || request(&steady));
        println!(
            "summary: pool request with recycle_after(1)   {:>8.2?}   baseline Lua::new + request + drop on one thread: {:>8.2?}   ours/baseline per round {:.2}x (range {lo:.2}-{hi:.2}x)   (same pool request without recycling: {plain:.2?})",
            p.ours,
            p.baseline,
            p.ratio(),
        );
    }
    recycling.shutdown().unwrap();
    steady.shutdown().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = spawn_cost, pool_recycle
}

fn main() {
    if let Ok(which) = std::env::var(COLD) {
        return cold_child(&which);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
