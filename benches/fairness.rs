//! Fair service of the sessions bound to one VM, beside first come, first
//! served (`fifo_sessions(true)`), from the same run:
//!
//! - **A flood and a quiet tenant.** On a 2-VM pool, tenant A queues 10,000
//!   requests of 1 ms while tenant B, bound to the same VM, sends a 1 ms
//!   request every 10 ms (open loop: latency counts from each request's
//!   scheduled time). Printed: B's p50/p99/p99.9/max, and the pool's
//!   throughput (A's and B's requests over the time until all are done).
//!   Target: B's p99 ≤ 3 ms; throughput within 5% of first come, first
//!   served. `MLUA_ISLE_FLOOD=n` runs a smaller flood.
//! - **The fair queue's own cost.** 256 tiny session requests in flight,
//!   over 16 keys on 2 VMs, fair beside first come, first served.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use mlua_isle::{IslePool, Session, Task};

const JOB: Duration = Duration::from_millis(1);
const QUIET_EVERY: Duration = Duration::from_millis(10);

fn pool(fifo: bool) -> IslePool {
    IslePool::builder()
        .workers(2)
        .fifo_sessions(fifo)
        .build()
        .unwrap()
}

/// CPU work on the VM thread for `d`.
fn spin(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn job(s: &Session) -> Task<()> {
    s.spawn_exec(|_, _| {
        spin(JOB);
        Ok(())
    })
}

/// Two sessions bound to the same VM (a new key binds to the least loaded
/// VM: open keys until one lands beside the first). The others stay open
/// and idle.
fn two_on_one_vm(pool: &IslePool) -> (Session, Session, Vec<Session>) {
    let a = pool.session("flood");
    a.eval::<()>("").unwrap();
    let home = a.metrics().unwrap().worker;
    let mut others = Vec::new();
    for i in 0.. {
        let s = pool.session(format!("quiet-{i}"));
        s.eval::<()>("").unwrap();
        if s.metrics().unwrap().worker == home {
            return (a, s, others);
        }
        others.push(s);
    }
    unreachable!()
}

struct Run {
    quiet: Vec<Duration>,
    throughput: f64,
}

/// A floods `flood` jobs; B sends one every `QUIET_EVERY` until the flood
/// is done.
fn flood_and_quiet(fifo: bool, flood: usize) -> Run {
    let pool = pool(fifo);
    let (a, b, _others) = two_on_one_vm(&pool);
    let (tx, rx) = mpsc::channel::<(Instant, Task<()>)>();
    let collector = thread::spawn(move || {
        rx.into_iter()
            .map(|(scheduled, task)| {
                task.wait().unwrap();
                scheduled.elapsed()
            })
            .collect::<Vec<_>>()
    });
    let start = Instant::now();
    let flood: Vec<Task<()>> = (0..flood).map(|_| job(&a)).collect();
    let mut sent = 0;
    let mut next = start;
    while !flood.last().unwrap().is_finished() {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        tx.send((next, job(&b))).unwrap();
        sent += 1;
        next += QUIET_EVERY;
    }
    drop(tx);
    let n = flood.len();
    for t in flood {
        t.wait().unwrap();
    }
    let quiet = collector.join().unwrap();
    let took = start.elapsed();
    pool.shutdown().unwrap();
    Run {
        quiet,
        throughput: (n + sent) as f64 / took.as_secs_f64(),
    }
}

fn summary() {
    let flood: usize = std::env::var("MLUA_ISLE_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut runs = [true, false].map(|fifo| (fifo, flood_and_quiet(fifo, flood)));
    let [(_, fifo), (_, fair)] = &mut runs;
    let q = |r: &mut Run, p: f64| common::quantile(&mut r.quiet, p);
    println!(
        "summary: fairness: tenant B (1 ms every 10 ms) beside a flood of {flood} x 1 ms on its VM; B's requests: fair {}, first come first served {}",
        fair.quiet.len(),
        fifo.quiet.len()
    );
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0)] {
        println!(
            "summary: fairness: B latency {name:<5} fair {:>10.2?}   baseline first come first served: {:>10.2?}",
            q(fair, p),
            q(fifo, p)
        );
    }
    println!(
        "summary: fairness: pool throughput fair {:.0} req/s   baseline first come first served: {:.0} req/s   fair/baseline {:.3}x",
        fair.throughput,
        fifo.throughput,
        fair.throughput / fifo.throughput
    );
}

fn cost(c: &mut Criterion) {
    for fifo in [false, true] {
        let pool = pool(fifo);
        let keys: Vec<Session> = (0..16).map(|i| pool.session(i)).collect();
        let name = if fifo {
            "sessions: 256 in flight over 16 keys, first come first served"
        } else {
            "sessions: 256 in flight over 16 keys, fair"
        };
        c.bench_function(name, |bench| {
            bench.iter(|| {
                let tasks: Vec<Task<()>> = (0..256)
                    .map(|i| keys[i % 16].spawn_eval::<()>(""))
                    .collect();
                for t in tasks {
                    t.wait().unwrap();
                }
            })
        });
        pool.shutdown().unwrap();
    }
    if common::benching() {
        summary();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = cost
}
criterion_main!(benches);
