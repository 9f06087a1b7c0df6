//! The pool as a server uses it (workers = cores), each row beside its
//! baseline from the same run:
//!
//! - **Many session keys.** 100,000 tiny requests (`add(1, 2)`), keys spread
//!   at random over 1,000 sessions, from 1 and 4 blocking callers and from
//!   one pipelining caller (256 in flight): throughput beside unkeyed work
//!   and beside one key, with the p50 round trip and the process's
//!   involuntary context switches per request; for blocking callers also
//!   the same random alternation over plain threads that each own a `Lua`
//!   (what a thread-per-VM design costs the machine without this crate);
//!   and the same ratio on a pool of one VM, where no request waits for a
//!   thread switch: what a session's request itself costs beside an
//!   unkeyed one. Target: ≥ 0.9x unkeyed.
//! - **Open-loop tail.** Poisson arrivals of ~50 µs jobs at 50/70/80/90% of
//!   capacity (the baseline's throughput when never idle), latency counted
//!   from each request's scheduled arrival (so a late submitter or a slow
//!   hand-off cannot hide behind coordinated omission), split over 1, 2, 4, 8 and 16 submitting
//!   threads: p50/p99/p99.9 beside a rayon pool whose threads each own a
//!   `Lua`, fed the same schedule, and each run's ratio to the rayon run
//!   just before it. Target: p50 and p99 no worse.

mod common;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use mlua::{Function, Lua};
use mlua_isle::{IslePool, Task};

fn workers() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get())
}

fn pool() -> IslePool {
    pool_of(workers())
}

fn pool_of(workers: usize) -> IslePool {
    IslePool::builder()
        .workers(workers)
        .init(|lua| lua.load(common::SCRIPT).exec())
        .build()
        .unwrap()
}

/// A small xorshift generator: the benches need reproducible randomness,
/// not good randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Involuntary context switches of the whole process so far.
fn involuntary_switches() -> u64 {
    // SAFETY: `rusage` is plain data (all zeros is a valid value), and
    // getrusage only writes into the struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    ru.ru_nivcsw as u64
}

// ---------------------------------------------------------------------------
// Many session keys.

/// Which requests a run makes.
#[derive(Clone, Copy, PartialEq)]
enum Keys {
    Unkeyed,
    One,
    Spread(u64),
}

/// The same alternation without this crate: one thread per VM, each
/// owning a plain `Lua`, fed through a channel; each request goes to a
/// thread picked at random, and the caller waits on a reply channel.
struct PlainThreads {
    senders: Vec<crossbeam_channel::Sender<crossbeam_channel::Sender<i64>>>,
}

impl PlainThreads {
    fn new(n: usize) -> PlainThreads {
        let senders = (0..n)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::unbounded::<crossbeam_channel::Sender<i64>>();
                thread::spawn(move || {
                    let lua = Lua::new();
                    lua.load(common::SCRIPT).exec().unwrap();
                    let add: Function = lua.globals().get("add").unwrap();
                    for reply in rx {
                        let _ = reply.send(add.call::<i64>((1, 2)).unwrap());
                    }
                });
                tx
            })
            .collect();
        PlainThreads { senders }
    }

    /// `total` blocking requests from `callers` threads; requests/s.
    fn run(&self, callers: usize, total: usize) -> f64 {
        let start = Instant::now();
        thread::scope(|scope| {
            for t in 0..callers {
                scope.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    for _ in 0..total / callers {
                        let i = (rng.next() % self.senders.len() as u64) as usize;
                        self.senders[i].send(tx.clone()).unwrap();
                        assert_eq!(rx.recv().unwrap(), 3);
                    }
                });
            }
        });
        total as f64 / start.elapsed().as_secs_f64()
    }
}

/// How callers submit.
#[derive(Clone, Copy)]
enum Callers {
    /// `n` threads, each waiting for every answer before the next request.
    Blocking(usize),
    /// One thread keeping `window` requests in flight.
    Pipelined(usize),
}

struct KeyedRun {
    per_sec: f64,
    p50: Duration,
    switches_per_request: f64,
}

fn keyed_run(pool: &IslePool, keys: Keys, callers: Callers, total: usize) -> KeyedRun {
    let sessions: Vec<_> = match keys {
        Keys::Unkeyed => Vec::new(),
        Keys::One => vec![pool.session(0u64)],
        Keys::Spread(n) => (0..n).map(|k| pool.session(k)).collect(),
    };
    // Bind every key before timing (the first request of a key binds it).
    for s in &sessions {
        s.call::<i64>("add", (1, 2)).unwrap();
    }
    let request = |rng: &mut Rng| -> Task<i64> {
        match keys {
            Keys::Unkeyed => pool.spawn_call("add", (1, 2)),
            _ => {
                let s = &sessions[(rng.next() % sessions.len() as u64) as usize];
                s.spawn_call("add", (1, 2))
            }
        }
    };
    let switches = involuntary_switches();
    let start = Instant::now();
    let mut lat: Vec<Duration> = match callers {
        Callers::Blocking(n) => thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|t| {
                    let request = &request;
                    scope.spawn(move || {
                        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                        let mut lat = Vec::with_capacity(total / n);
                        for _ in 0..total / n {
                            let t0 = Instant::now();
                            assert_eq!(request(&mut rng).wait().unwrap(), 3);
                            lat.push(t0.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        }),
        Callers::Pipelined(window) => {
            let mut rng = Rng(0x2545_F491_4F6C_DD1D);
            let mut flight = std::collections::VecDeque::with_capacity(window);
            let mut lat = Vec::with_capacity(total);
            for _ in 0..total {
                if flight.len() == window {
                    let (t0, task): (Instant, Task<i64>) = flight.pop_front().unwrap();
                    assert_eq!(task.wait().unwrap(), 3);
                    lat.push(t0.elapsed());
                }
                flight.push_back((Instant::now(), request(&mut rng)));
            }
            for (t0, task) in flight {
                assert_eq!(task.wait().unwrap(), 3);
                lat.push(t0.elapsed());
            }
            lat
        }
    };
    let elapsed = start.elapsed();
    let switches = involuntary_switches() - switches;
    for s in &sessions {
        s.close();
    }
    let n = lat.len();
    KeyedRun {
        per_sec: n as f64 / elapsed.as_secs_f64(),
        p50: common::quantile(&mut lat, 0.5),
        switches_per_request: switches as f64 / n as f64,
    }
}

fn many_keys(c: &mut Criterion) {
    let pool = pool();
    let shapes = [
        ("1 blocking caller", Callers::Blocking(1)),
        ("4 blocking callers", Callers::Blocking(4)),
        (
            "1 pipelined caller (256 in flight)",
            Callers::Pipelined(256),
        ),
    ];
    let mut g = c.benchmark_group("sessions_many_keys");
    g.sample_size(10);
    for (name, callers) in shapes {
        g.bench_function(format!("1000_keys_{name}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let r = keyed_run(&pool, Keys::Spread(1000), callers, 10_000);
                        Duration::from_secs_f64(1.0 / r.per_sec)
                    })
                    .sum()
            })
        });
    }
    g.finish();
    if !common::benching() {
        return;
    }
    let total = 100_000;
    let plain = PlainThreads::new(workers());
    // One VM: the same requests with no thread to switch to, so the ratio
    // is what a session's request costs beside an unkeyed one.
    let single = pool_of(1);
    for (name, callers) in shapes {
        // Rounds alternate the three key shapes, so each ratio compares
        // runs that shared the machine's weather.
        let mut ratios = Vec::new();
        let mut single_ratios = Vec::new();
        let mut rows = Vec::new();
        for _ in 0..5 {
            let unkeyed = keyed_run(&pool, Keys::Unkeyed, callers, total);
            let one = keyed_run(&pool, Keys::One, callers, total);
            let spread = keyed_run(&pool, Keys::Spread(1000), callers, total);
            let plain = match callers {
                Callers::Blocking(n) => Some(plain.run(n, total)),
                Callers::Pipelined(_) => None,
            };
            ratios.push(spread.per_sec / unkeyed.per_sec);
            rows.push((spread, unkeyed, one, plain));
            let unkeyed = keyed_run(&single, Keys::Unkeyed, callers, total);
            let spread = keyed_run(&single, Keys::Spread(1000), callers, total);
            single_ratios.push(spread.per_sec / unkeyed.per_sec);
        }
        single_ratios.sort_by(f64::total_cmp);
        let mut order: Vec<usize> = (0..ratios.len()).collect();
        order.sort_by(|&a, &b| ratios[a].total_cmp(&ratios[b]));
        let mid = order[order.len() / 2];
        let (spread, unkeyed, one, plain) = &rows[mid];
        let plain = plain.map_or(String::new(), |p| {
            format!(
                " | same alternation over {} plain threads+Lua (channels) {:>6.0}k req/s",
                workers(),
                p / 1e3
            )
        });
        println!(
            "summary: sessions, {name:<36} 1,000 keys {:>6.0}k req/s, p50 {:>7.2?}, {:.2} invol. switches/req | baseline unkeyed {:>6.0}k req/s, p50 {:>7.2?}, {:.2} sw/req | one key {:>6.0}k req/s{plain} | 1,000 keys / unkeyed: median {:.2}x (range {:.2}-{:.2}x, 5 rounds, same round's median shown; target >= 0.9x)",
            spread.per_sec / 1e3,
            spread.p50,
            spread.switches_per_request,
            unkeyed.per_sec / 1e3,
            unkeyed.p50,
            unkeyed.switches_per_request,
            one.per_sec / 1e3,
            ratios[mid],
            ratios[order[0]],
            ratios[order[order.len() - 1]],
        );
        println!(
            "summary: sessions, {name:<36} on 1 VM (no thread switch): 1,000 keys / unkeyed median {:.2}x (range {:.2}-{:.2}x, 5 rounds)",
            single_ratios[2],
            single_ratios[0],
            single_ratios[4],
        );
    }
}

// ---------------------------------------------------------------------------
// Open-loop tail.

/// Something that runs `spin(arg)` for a submitter and lets a collector
/// wait for the answer.
trait Server: Sync {
    type Pending: Send + 'static;
    fn submit(&self, arg: i64) -> Self::Pending;
    fn wait(pending: Self::Pending);
}

impl Server for IslePool {
    type Pending = Task<i64>;
    fn submit(&self, arg: i64) -> Task<i64> {
        self.spawn_call("spin", arg)
    }
    fn wait(pending: Task<i64>) {
        pending.wait().unwrap();
    }
}

/// The baseline: a rayon pool, each thread with its own `Lua`; the answer
/// comes back through a one-slot channel.
struct Rayon(rayon::ThreadPool);

impl Server for Rayon {
    type Pending = crossbeam_channel::Receiver<i64>;
    fn submit(&self, arg: i64) -> Self::Pending {
        thread_local! {
            static LUA: RefCell<Option<(Lua, Function)>> = const { RefCell::new(None) };
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0.spawn(move || {
            let x = LUA.with(|l| {
                let mut l = l.borrow_mut();
                let (_, spin) = l.get_or_insert_with(|| {
                    let lua = common::plain_lua();
                    let f: Function = lua.globals().get("spin").unwrap();
                    (lua, f)
                });
                spin.call::<i64>(arg).unwrap()
            });
            let _ = tx.send(x);
        });
        rx
    }
    fn wait(pending: Self::Pending) {
        pending.recv().unwrap();
    }
}

/// Runs `n` Poisson arrivals at `rate` per second, split over `submitters`
/// threads (each its own Poisson stream of `rate / submitters`); each
/// submitter hands its requests, in order, to its own collector thread,
/// which waits for each and records finish − scheduled arrival.
fn open_loop<S: Server>(
    server: &S,
    arg: i64,
    rate: f64,
    n: usize,
    submitters: usize,
) -> (Vec<Duration>, u64) {
    let per = n / submitters;
    let mean_gap = submitters as f64 / rate;
    let late = AtomicU64::new(0);
    let mut all = thread::scope(|scope| {
        let handles: Vec<_> = (0..submitters)
            .map(|t| {
                let late = &late;
                scope.spawn(move || {
                    let (tx, rx) = crossbeam_channel::unbounded::<(Instant, S::Pending)>();
                    let collector = thread::Builder::new()
                        .name("collector".into())
                        .spawn(move || {
                            let mut lat = Vec::with_capacity(per);
                            for (at, pending) in rx {
                                S::wait(pending);
                                lat.push(at.elapsed());
                            }
                            lat
                        })
                        .unwrap();
                    precise_sleeps();
                    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (t as u64 + 1));
                    let start = Instant::now() + Duration::from_millis(1);
                    let mut at = start;
                    for _ in 0..per {
                        at += Duration::from_secs_f64(-rng.unit().ln() * mean_gap);
                        let now = Instant::now();
                        if at > now {
                            thread::sleep(at - now);
                        } else if now - at > Duration::from_micros(100) {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        tx.send((at, server.submit(arg))).unwrap();
                    }
                    drop(tx);
                    collector.join().unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    all.sort();
    (all, late.into_inner())
}

/// Makes this thread's sleeps end on time: Linux lets a sleep overrun by
/// the thread's timer slack (50 µs by default), which would bunch the
/// arrivals together.
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes
    // only this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Jobs per second when `n` jobs are submitted at once.
fn saturated<S: Server>(server: &S, arg: i64, n: usize) -> f64 {
    let start = Instant::now();
    let pending: Vec<_> = (0..n).map(|_| server.submit(arg)).collect();
    for p in pending {
        S::wait(p);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Tail {
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

fn tail(mut lat: Vec<Duration>) -> Tail {
    Tail {
        p50: common::quantile(&mut lat, 0.5),
        p99: common::quantile(&mut lat, 0.99),
        p999: common::quantile(&mut lat, 0.999),
    }
}

fn open_loop_tail(c: &mut Criterion) {
    let pool = pool();
    let rayon = Rayon(
        rayon::ThreadPoolBuilder::new()
            .num_threads(workers())
            .build()
            .unwrap(),
    );
    let (arg, took) = common::calibrate(Duration::from_micros(50));
    // Capacity: what the baseline gets through when it is never idle (a
    // burst submitted at once), median of 5; loads are fractions of it.
    let median = |f: &dyn Fn() -> f64| {
        let mut v: Vec<f64> = (0..5).map(|_| f()).collect();
        v.sort_by(f64::total_cmp);
        v[2]
    };
    let capacity = median(&|| saturated(&rayon, arg, 4_000));
    let ours_saturated = median(&|| saturated(&pool, arg, 4_000));
    let mut g = c.benchmark_group("open_loop_tail");
    g.sample_size(10);
    g.bench_function("isle_pool_80pct_1_submitter", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| tail(open_loop(&pool, arg, 0.8 * capacity, 2_000, 1).0).p99)
                .sum()
        })
    });
    g.finish();
    if !common::benching() {
        return;
    }
    println!(
        "summary: open loop: jobs of {took:.2?} (plain mlua); capacity (the baseline's saturated throughput, median of 5) {capacity:.0} jobs/s on {} workers; ours saturated {ours_saturated:.0} jobs/s ({:.2}x)",
        workers(),
        ours_saturated / capacity,
    );
    let mut cases: Vec<(f64, usize)> = [0.5, 0.7, 0.8, 0.9].iter().map(|&l| (l, 1)).collect();
    cases.extend([2, 4, 8, 16].iter().map(|&s| (0.8, s)));
    let n = 20_000;
    const RUNS: usize = 5;
    for (load, submitters) in cases {
        let rate = load * capacity;
        let mut ours = Vec::new();
        let mut base = Vec::new();
        let mut late = 0;
        for _ in 0..RUNS {
            let (lat, l) = open_loop(&rayon, arg, rate, n, submitters);
            base.push(tail(lat));
            let (lat, l2) = open_loop(&pool, arg, rate, n, submitters);
            ours.push(tail(lat));
            late += l + l2;
        }
        let range = |v: &[Tail], f: fn(&Tail) -> Duration| {
            let mut x: Vec<Duration> = v.iter().map(f).collect();
            x.sort();
            format!("{:.2?}-{:.2?}", x[0], x[x.len() - 1])
        };
        // The machine's load moves both sides by several times from one
        // run to the next: each run's ratio (ours against the rayon run
        // just before it) says more than the two ranges.
        let ratio = |f: fn(&Tail) -> Duration| {
            let mut r: Vec<f64> = ours
                .iter()
                .zip(&base)
                .map(|(o, b)| f(o).as_secs_f64() / f(b).as_secs_f64())
                .collect();
            r.sort_by(f64::total_cmp);
            format!(
                "{:.2}x ({:.2}-{:.2}x)",
                r[r.len() / 2],
                r[0],
                r[r.len() - 1]
            )
        };
        println!(
            "summary: open loop {:>3.0}% load, {submitters:>2} submitters | ours p50 {:>17} p99 {:>17} p99.9 {:>17} | baseline rayon+thread-local Lua p50 {:>17} p99 {:>17} p99.9 {:>17} | ours/baseline per run, median (range): p50 {} p99 {} (ranges over {RUNS} runs of {n}; {:.2}% of arrivals submitted >100 µs late)",
            load * 100.0,
            range(&ours, |t| t.p50),
            range(&ours, |t| t.p99),
            range(&ours, |t| t.p999),
            range(&base, |t| t.p50),
            range(&base, |t| t.p99),
            range(&base, |t| t.p999),
            ratio(|t| t.p50),
            ratio(|t| t.p99),
            100.0 * late as f64 / (2 * RUNS * n) as f64,
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = many_keys, open_loop_tail
}
criterion_main!(benches);
