//! What an idle session costs, beside a plain mlua environment table:
//!
//! - ours: 100k sessions open on a 2-VM pool, each having run one request
//!   that set one global (`session.exec(|_, env| env.set("x", 1))`), one
//!   request at a time (also shown: 1,024 requests in flight at a time,
//!   whose freed memory stays between the sessions' own and keeps pages
//!   resident: that is glibc's and the request path's, not the sessions');
//! - baseline: a plain `Lua` holding 100k environment tables, each
//!   `setmetatable({ x = 1 }, { __index = _G })` (its own metatable, as a
//!   naive per-tenant environment has), held in a Rust `Vec<Table>` (as the
//!   pool holds its environments).
//!
//! Both measured the same way, in alternating rounds of the same run, each
//! round in a fresh child process: resident memory (`/proc/self/statm`),
//! Lua heap (`used_memory` after full collections; ours summed over the
//! VMs) and bytes malloc has handed out (`mallinfo2`), before and after,
//! divided by the count. glibc keeps freed memory resident (a hash table's
//! old buckets, a finished request's allocations), in one arena per
//! thread: `malloc_trim(0)` before every reading gives the free pages of
//! every arena back, and the fresh process leaves no earlier round's
//! memory to reuse, so the difference is what the live sessions hold.
//! Then every session is closed and the Lua heap read again: it must come
//! back.
//!
//! Target: ours ≤ 450 B resident per session (2x the plain table).
//!
//! The criterion part times global reads inside a session request against
//! the same request unkeyed (a session reads library globals through its
//! environment's metatable, which must not make them noticeably slower),
//! and opening sessions.

mod common;

use std::time::Duration;

use criterion::{criterion_group, Criterion};
use mlua::{Lua, Table};
use mlua_isle::{IslePool, Task};

/// One reading of the process and its Lua heap(s).
#[derive(Clone, Copy)]
struct Reading {
    rss: usize,
    heap: usize,
    live: usize,
}

/// Bytes resident, after giving free pages back.
fn rss() -> usize {
    trim();
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes malloc has handed out and not had back, over every arena, and in
/// blocks of their own (big hash tables).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn live() -> usize {
    // SAFETY: mallinfo2 only reads glibc's own arenas, under their locks.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn live() -> usize {
    0
}

fn reading(heap: usize) -> Reading {
    Reading {
        heap,
        rss: rss(),
        live: live(),
    }
}

/// The Lua heap of every VM of `pool`, after full collections.
fn pool_heap(pool: &IslePool) -> usize {
    pool.broadcast(|lua| {
        lua.gc_collect()?;
        lua.gc_collect()?;
        Ok(lua.used_memory())
    })
    .into_iter()
    .map(|r| r.unwrap())
    .sum()
}

fn lua_heap(lua: &Lua) -> usize {
    lua.gc_collect().unwrap();
    lua.gc_collect().unwrap();
    lua.used_memory()
}

/// Per session (or table): bytes resident, of Lua heap, handed out by
/// malloc; and the Lua heap left once all are closed, against before
/// (bytes, whole pool).
struct Sample {
    rss: f64,
    heap: f64,
    live: f64,
    heap_left: f64,
}

impl Sample {
    fn new(n: usize, before: Reading, after: Reading, closed: usize) -> Sample {
        let per = |a: usize, b: usize| (a as f64 - b as f64) / n as f64;
        Sample {
            rss: per(after.rss, before.rss),
            heap: per(after.heap, before.heap),
            live: per(after.live, before.live),
            heap_left: closed as f64 - before.heap as f64,
        }
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.rss, self.heap, self.live, self.heap_left
        )
    }

    fn parse(line: &str) -> Option<Sample> {
        let v: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let [rss, heap, live, heap_left] = v[..] else {
            return None;
        };
        Some(Sample {
            rss,
            heap,
            live,
            heap_left,
        })
    }
}

/// Opens `n` sessions on a fresh 2-VM pool, each setting one global: one
/// request at a time (`batch` 1), or `batch` requests submitted before
/// waiting for them.
fn ours(n: usize, batch: usize) -> Sample {
    let pool = IslePool::builder().workers(2).build().unwrap();
    // Warm: the VMs have run a session request and a close.
    pool.session("warm").exec(|_, env| env.set("x", 1)).unwrap();
    pool.close_session("warm");
    let before = reading(pool_heap(&pool));
    let keys: Vec<u64> = (0..n as u64).collect();
    for batch in keys.chunks(batch) {
        let tasks: Vec<Task<()>> = batch
            .iter()
            .map(|&k| pool.session(k).spawn_exec(|_, env| env.set("x", 1)))
            .collect();
        for t in tasks {
            t.wait().unwrap();
        }
    }
    let after = reading(pool_heap(&pool));
    assert_eq!(pool.metrics().sessions_open, n, "every session open");
    for k in keys {
        assert!(pool.close_session(k));
    }
    // The broadcast queues behind the closes.
    let closed = pool_heap(&pool);
    pool.shutdown().unwrap();
    Sample::new(n, before, after, closed)
}

/// The same count of plain environment tables in a plain `Lua`.
fn baseline(n: usize) -> Sample {
    let lua = Lua::new();
    let make: mlua::Function = lua
        .load("return function() return setmetatable({ x = 1 }, { __index = _G }) end")
        .eval()
        .unwrap();
    let before = reading(lua_heap(&lua));
    let mut tables: Vec<Table> = Vec::with_capacity(n);
    for _ in 0..n {
        tables.push(make.call(()).unwrap());
    }
    let after = reading(lua_heap(&lua));
    drop(tables);
    let closed = lua_heap(&lua);
    Sample::new(n, before, after, closed)
}

/// Requests in flight when opening sessions pipelined.
const PIPELINED: usize = 1024;

/// Set in the child processes the memory rounds run in.
const CHILD: &str = "MLUA_ISLE_SESSION_MEMORY";

/// One measurement in a fresh process: what earlier rounds freed, and
/// glibc kept, is not there to be reused (which would make a round look
/// cheaper than it is).
fn in_child(which: &str, n: usize) -> Sample {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(CHILD, format!("{which} {n}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{which}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("sample: ").and_then(Sample::parse))
        .unwrap_or_else(|| panic!("{which}: no sample in {text}"))
}

/// The child's part: measures, prints the sample.
fn child(arg: &str) {
    let (which, n) = arg.split_once(' ').unwrap();
    let n: usize = n.parse().unwrap();
    let s = match which {
        "ours" => ours(n, 1),
        "ours-pipelined" => ours(n, PIPELINED),
        _ => baseline(n),
    };
    println!("sample: {}", s.line());
}

fn range(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn memory(_: &mut Criterion) {
    if !common::benching() {
        // A smoke test, in this process.
        let s = ours(1_000, 1);
        assert!(s.heap > 0.0);
        ours(1_000, PIPELINED);
        baseline(1_000);
        return;
    }
    let (n, rounds) = (100_000, 5);
    let mut o = Vec::new();
    let mut b = Vec::new();
    let mut p = Vec::new();
    for _ in 0..rounds {
        b.push(in_child("baseline", n));
        o.push(in_child("ours", n));
        p.push(in_child("ours-pipelined", n));
    }
    let show = |v: &[Sample], f: fn(&Sample) -> f64| {
        let (lo, mid, hi) = range(&mut v.iter().map(f).collect::<Vec<_>>());
        (format!("{mid:.0} B (range {lo:.0}-{hi:.0})"), mid)
    };
    for (what, f) in [
        ("resident", (|s: &Sample| s.rss) as fn(&Sample) -> f64),
        ("Lua heap", |s| s.heap),
        ("malloc'd", |s| s.live),
    ] {
        let (ours, om) = show(&o, f);
        let (base, bm) = show(&b, f);
        println!(
            "summary: idle session holding one global, {what:<9} ours {ours}   baseline plain env table: {base}   ours/baseline {:.2}x   ({n} on 2 VMs, {rounds} rounds; target: resident <= 450 B)",
            om / bm
        );
    }
    let (piped, _) = show(&p, |s| s.rss);
    let (piped_live, _) = show(&p, |s| s.live);
    println!(
        "summary: idle session holding one global, resident, opened {PIPELINED} requests at a time: ours {piped} (malloc'd {piped_live}): the requests' memory, freed between the sessions', stays resident"
    );
    let left: Vec<String> = o.iter().map(|s| format!("{:.0}", s.heap_left)).collect();
    let held = show(&o, |s| s.heap).1 * n as f64;
    println!(
        "summary: idle sessions all closed: Lua heap left over the pool, bytes, per round: [{}] (of {held:.0} they held)",
        left.join(", ")
    );
}

/// A request that reads a library global 1,000 times.
const READS: &str = r#"
local n = 0
for i = 1, 1000 do
    if type(i) == "number" then n = n + 1 end
end
return n
"#;

fn global_reads(c: &mut Criterion) {
    let pool = IslePool::builder().workers(2).build().unwrap();
    let session = pool.session("reader");
    let mut g = c.benchmark_group("session_global_reads");
    g.bench_function("session", |b| {
        b.iter(|| session.eval::<i64>(READS).unwrap())
    });
    g.bench_function("unkeyed", |b| b.iter(|| pool.eval::<i64>(READS).unwrap()));
    g.finish();
    let mut g = c.benchmark_group("session_open");
    let mut next = 0u64;
    g.bench_function("open_set_one_global_close", |b| {
        b.iter(|| {
            next += 1;
            pool.session(next).exec(|_, env| env.set("x", 1)).unwrap();
            pool.close_session(next);
        })
    });
    g.finish();
    if !common::benching() {
        return;
    }
    let p = common::interleaved(
        15,
        2_000,
        || {
            session.eval::<i64>(READS).unwrap();
        },
        || {
            pool.eval::<i64>(READS).unwrap();
        },
    );
    common::report("1,000 global reads, in a session", &p, "unkeyed");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = memory, global_reads
}

fn main() {
    if let Ok(arg) = std::env::var(CHILD) {
        child(&arg);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
