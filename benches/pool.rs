//! Pool throughput beside its baselines (workers = cores):
//!
//! - `ideal`: the jobs run serially by plain mlua on one thread (no hook,
//!   as our VMs run until a request must stop), divided by the worker count;
//! - `parallel_plain_mlua`: one thread per worker, each with a plain `Lua`,
//!   running a fixed share of the jobs with no coordination at all: what
//!   the machine itself gives (two busy threads on a shared 2-core VM get
//!   well under twice the work of one);
//! - `rayon_thread_local_lua`: a rayon pool, each thread owning a `Lua`
//!   (what one would write without this crate);
//! - `round_robin_isles`: N `Isle`s, job i sent to isle i mod N;
//! - `isle_pool`: our work-stealing pool; and `isle_pool_sessions`, the same
//!   jobs through 64 session keys.
//!
//! Workloads: uniform ~50 µs jobs; skewed (5% take 5 ms, clustered at the
//! start); tiny requests submitted as tasks from 4 threads, and the same
//! calls through one `IslePool::map`.
//! Targets: uniform ≥ 95% of ideal, skewed ≥ 90%, tiny ≥ 1 M requests/s,
//! sessions ≥ 90% of unkeyed.

mod common;

use std::cell::RefCell;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use mlua::{Function, Lua};
use mlua_isle::{Isle, IslePool, Task};

fn workers() -> usize {
    num_cpus()
}

fn num_cpus() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get())
}

/// The jobs, as `spin` arguments.
fn uniform(n: usize, short: i64) -> Vec<i64> {
    vec![short; n]
}

fn skewed(n: usize, short: i64, long: i64) -> Vec<i64> {
    let longs = n / 20;
    (0..n)
        .map(|i| if i < longs { long } else { short })
        .collect()
}

fn serial(jobs: &[i64]) -> Duration {
    let lua = common::plain_lua();
    let spin: Function = lua.globals().get("spin").unwrap();
    let start = Instant::now();
    for &j in jobs {
        spin.call::<i64>(j).unwrap();
    }
    start.elapsed()
}

/// The jobs split in advance over `workers()` threads (job i to thread
/// i mod n), each with a plain `Lua` made before the clock starts.
fn parallel(jobs: &[i64]) -> Duration {
    let n = workers();
    let ready = std::sync::Barrier::new(n + 1);
    let go = std::sync::Barrier::new(n + 1);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|k| {
                let (ready, go) = (&ready, &go);
                scope.spawn(move || {
                    let lua = common::plain_lua();
                    let spin: Function = lua.globals().get("spin").unwrap();
                    ready.wait();
                    go.wait();
                    for &j in jobs.iter().skip(k).step_by(n) {
                        spin.call::<i64>(j).unwrap();
                    }
                    Instant::now()
                })
            })
            .collect();
        ready.wait();
        let start = Instant::now();
        go.wait();
        let end = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap_or(start);
        end - start
    })
}

fn run_rayon(pool: &rayon::ThreadPool, jobs: &[i64]) -> Duration {
    use rayon::prelude::*;
    thread_local! {
        static LUA: RefCell<Option<(Lua, Function)>> = const { RefCell::new(None) };
    }
    let start = Instant::now();
    pool.install(|| {
        jobs.par_iter().with_max_len(1).for_each(|&j| {
            LUA.with(|l| {
                let mut l = l.borrow_mut();
                let (_, spin) = l.get_or_insert_with(|| {
                    let lua = common::plain_lua();
                    let f: Function = lua.globals().get("spin").unwrap();
                    (lua, f)
                });
                spin.call::<i64>(j).unwrap();
            })
        })
    });
    start.elapsed()
}

fn run_round_robin(isles: &[Isle], jobs: &[i64]) -> Duration {
    let start = Instant::now();
    let tasks: Vec<Task<i64>> = jobs
        .iter()
        .enumerate()
        .map(|(i, &j)| isles[i % isles.len()].spawn_call("spin", j))
        .collect();
    for t in tasks {
        t.wait().unwrap();
    }
    start.elapsed()
}

fn run_pool(pool: &IslePool, jobs: &[i64]) -> Duration {
    let start = Instant::now();
    let tasks: Vec<Task<i64>> = jobs.iter().map(|&j| pool.spawn_call("spin", j)).collect();
    for t in tasks {
        t.wait().unwrap();
    }
    start.elapsed()
}

fn run_sessions(pool: &IslePool, jobs: &[i64]) -> Duration {
    let sessions: Vec<_> = (0..64u32).map(|k| pool.session(k)).collect();
    let start = Instant::now();
    let tasks: Vec<Task<i64>> = jobs
        .iter()
        .enumerate()
        .map(|(i, &j)| sessions[i % sessions.len()].spawn_call("spin", j))
        .collect();
    for t in tasks {
        t.wait().unwrap();
    }
    start.elapsed()
}

struct Setup {
    pool: IslePool,
    isles: Vec<Isle>,
    rayon: rayon::ThreadPool,
}

fn setup() -> Setup {
    let n = workers();
    Setup {
        pool: IslePool::builder()
            .workers(n)
            .init(|lua| lua.load(common::SCRIPT).exec())
            .build()
            .unwrap(),
        isles: (0..n)
            .map(|_| Isle::spawn(|lua| lua.load(common::SCRIPT).exec()).unwrap())
            .collect(),
        rayon: rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    }
}

/// Benches one workload and prints its summary (makespan vs ideal).
fn workload(c: &mut Criterion, s: &Setup, name: &str, jobs: &[i64]) {
    let mut g = c.benchmark_group(format!("pool_{name}"));
    g.sample_size(10);
    g.bench_function("serial_direct_mlua", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| serial(jobs)).sum())
    });
    g.bench_function("parallel_plain_mlua", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| parallel(jobs)).sum())
    });
    g.bench_function("rayon_thread_local_lua", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run_rayon(&s.rayon, jobs)).sum())
    });
    g.bench_function("round_robin_isles", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run_round_robin(&s.isles, jobs)).sum())
    });
    g.bench_function("isle_pool", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run_pool(&s.pool, jobs)).sum())
    });
    g.bench_function("isle_pool_sessions", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run_sessions(&s.pool, jobs)).sum())
    });
    g.finish();
    if !common::benching() {
        return;
    }
    // Summary: all six measured in each round (so they share the machine's
    // weather), ratios taken per round, medians reported.
    let mut rows: Vec<[f64; 6]> = (0..7)
        .map(|_| {
            let ideal = serial(jobs).as_secs_f64() / workers() as f64;
            let pool = run_pool(&s.pool, jobs).as_secs_f64();
            let sessions = run_sessions(&s.pool, jobs).as_secs_f64();
            let rr = run_round_robin(&s.isles, jobs).as_secs_f64();
            let rayon = run_rayon(&s.rayon, jobs).as_secs_f64();
            let machine = parallel(jobs).as_secs_f64();
            [ideal, pool, sessions, rr, rayon, machine]
        })
        .collect();
    let median = |rows: &mut Vec<[f64; 6]>, f: &dyn Fn(&[f64; 6]) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ms = |x: f64| Duration::from_secs_f64(x);
    let ideal = median(&mut rows, &|r| r[0]);
    let pool = median(&mut rows, &|r| r[1]);
    let eff = median(&mut rows, &|r| 100.0 * r[0] / r[1]);
    let sess_eff = median(&mut rows, &|r| 100.0 * r[0] / r[2]);
    let sess_vs = median(&mut rows, &|r| 100.0 * r[1] / r[2]);
    let rr_eff = median(&mut rows, &|r| 100.0 * r[0] / r[3]);
    let rayon_eff = median(&mut rows, &|r| 100.0 * r[0] / r[4]);
    let machine_eff = median(&mut rows, &|r| 100.0 * r[0] / r[5]);
    let of_machine = median(&mut rows, &|r| 100.0 * r[5] / r[1]);
    let sess_of_machine = median(&mut rows, &|r| 100.0 * r[5] / r[2]);
    println!(
        "summary: pool {name:<8} makespan {:>9.2?}, ideal {:.2?} (medians) | per round, median: ours {eff:5.1}% of ideal; baselines, % of ideal: parallel plain mlua {machine_eff:5.1}%, rayon+thread-local Lua {rayon_eff:5.1}%, round-robin isles {rr_eff:5.1}%",
        ms(pool),
        ms(ideal),
    );
    println!(
        "summary: pool {name:<8} per round, median: ours as % of parallel plain mlua: unkeyed {of_machine:5.1}%, sessions {sess_of_machine:5.1}% | sessions {sess_eff:5.1}% of ideal, {sess_vs:5.1}% of unkeyed"
    );
}

fn uniform_and_skewed(c: &mut Criterion) {
    let s = setup();
    let (short, _) = common::calibrate(Duration::from_micros(50));
    let long = short * 100;
    workload(c, &s, "uniform", &uniform(2_000, short));
    workload(c, &s, "skewed", &skewed(1_000, short, long));
}

/// Tiny requests as tasks from 4 submitting threads; returns requests/s.
fn tiny_pool(pool: &IslePool, per_thread: usize) -> f64 {
    let start = Instant::now();
    thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let tasks: Vec<Task<i64>> = (0..per_thread)
                    .map(|_| pool.spawn_call("add", (1, 2)))
                    .collect();
                for t in tasks {
                    t.wait().unwrap();
                }
            });
        }
    });
    (4 * per_thread) as f64 / start.elapsed().as_secs_f64()
}

/// The same tiny calls through one `IslePool::map`; returns calls/s.
fn tiny_map(pool: &IslePool, n: usize) -> f64 {
    let start = Instant::now();
    let out = pool.map::<(i64, i64), i64>("add", (0..n).map(|i| (i as i64, 1)));
    assert_eq!(out.len(), n);
    n as f64 / start.elapsed().as_secs_f64()
}

fn tiny_rayon(pool: &rayon::ThreadPool, n: usize) -> f64 {
    use rayon::prelude::*;
    thread_local! {
        static LUA: RefCell<Option<(Lua, Function)>> = const { RefCell::new(None) };
    }
    let start = Instant::now();
    pool.install(|| {
        (0..n).into_par_iter().for_each(|_| {
            LUA.with(|l| {
                let mut l = l.borrow_mut();
                let (_, add) = l.get_or_insert_with(|| {
                    let lua = common::plain_lua();
                    let f: Function = lua.globals().get("add").unwrap();
                    (lua, f)
                });
                add.call::<i64>((1, 2)).unwrap();
            })
        })
    });
    n as f64 / start.elapsed().as_secs_f64()
}

fn tiny(c: &mut Criterion) {
    let s = setup();
    let per_thread = 25_000;
    let mut g = c.benchmark_group("pool_tiny");
    g.sample_size(10);
    g.bench_function("isle_pool_100k_tasks_from_4_threads", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    Duration::from_secs_f64(
                        4.0 * per_thread as f64 / tiny_pool(&s.pool, per_thread),
                    )
                })
                .sum()
        })
    });
    g.bench_function("isle_pool_map_100k", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    Duration::from_secs_f64(
                        4.0 * per_thread as f64 / tiny_map(&s.pool, 4 * per_thread),
                    )
                })
                .sum()
        })
    });
    g.finish();
    if !common::benching() {
        return;
    }
    let ours = (0..5)
        .map(|_| tiny_pool(&s.pool, per_thread))
        .fold(0.0, f64::max);
    let mapped = (0..5)
        .map(|_| tiny_map(&s.pool, 4 * per_thread))
        .fold(0.0, f64::max);
    let rayon = (0..5)
        .map(|_| tiny_rayon(&s.rayon, 4 * per_thread))
        .fold(0.0, f64::max);
    println!(
        "summary: pool tiny requests (target >= 1M/s)   ours {:.2} M/s   baseline rayon+thread-local Lua: {:.2} M/s   (best of 5 each)",
        ours / 1e6,
        rayon / 1e6
    );
    println!(
        "summary: pool tiny calls through map()          ours {:.2} M/s   baseline rayon+thread-local Lua: {:.2} M/s   (best of 5 each)   rayon/ours {:.2}x",
        mapped / 1e6,
        rayon / 1e6,
        rayon / mapped
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = uniform_and_skewed, tiny
}
criterion_main!(benches);
