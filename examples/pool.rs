//! The main demo: a pool of Lua VMs running scripts in parallel, plus
//! per-tenant sessions, tiny requests one by one and in one `map`, and a
//! runaway script cancelled, with throughput printed along the way.
//!
//! Run: `cargo run --release --example pool`

use std::thread;
use std::time::{Duration, Instant};

use mlua_isle::{IsleError, IslePool, Task};

const SCRIPTS: &str = r#"
-- A bit of real work: count the primes below n.
function primes_below(n)
    local count = 0
    for i = 2, n - 1 do
        local prime = true
        for d = 2, math.floor(math.sqrt(i)) do
            if i % d == 0 then prime = false break end
        end
        if prime then count = count + 1 end
    end
    return count
end

function id(x) return x end
"#;

fn main() -> Result<(), IsleError> {
    let pool = IslePool::builder()
        .name("demo")
        .init(|lua| lua.load(SCRIPTS).exec())
        .default_timeout(Duration::from_secs(10))
        .build()?;
    println!("pool of {} Lua VMs", pool.workers());

    // 1. Parallel scripts: unkeyed work goes to whichever VM is free.
    let jobs = 2_000;
    let start = Instant::now();
    let tasks: Vec<Task<i64>> = (0..jobs)
        .map(|i| pool.spawn_call("primes_below", 1_000 + i % 500))
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.wait()?;
    }
    let elapsed = start.elapsed();
    println!(
        "{jobs} scripts in {elapsed:.2?}: {:.0} scripts/s (checksum {total})",
        jobs as f64 / elapsed.as_secs_f64()
    );

    // 2. Sessions: each tenant's state lives in one VM, in its own globals.
    let tenants = 200;
    let per_tenant = 50;
    let start = Instant::now();
    thread::scope(|scope| {
        for shard in 0..4 {
            let pool = &pool;
            scope.spawn(move || -> Result<(), IsleError> {
                let sessions: Vec<_> = (shard..tenants)
                    .step_by(4)
                    .map(|t| pool.session(t))
                    .collect();
                let mut last = Vec::new();
                for _ in 0..per_tenant {
                    for s in &sessions {
                        last.push(s.spawn_eval::<i64>("hits = (hits or 0) + 1 return hits"));
                    }
                }
                for t in last {
                    t.wait()?;
                }
                Ok(())
            });
        }
    });
    let elapsed = start.elapsed();
    let requests = tenants * per_tenant;
    let hits: i64 = pool.session(7).eval("hits")?;
    println!(
        "{requests} session requests from 4 threads in {elapsed:.2?}: {:.0} requests/s; tenant 7 saw {hits} hits",
        requests as f64 / elapsed.as_secs_f64()
    );
    let shared: Option<i64> = pool.eval("hits")?;
    println!("unkeyed code sees no tenant's globals: hits = {shared:?}");

    // 3. Tiny requests: the cost of the hop itself.
    let n = 200_000;
    let start = Instant::now();
    thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let tasks: Vec<Task<i64>> = (0..n / 4).map(|i| pool.spawn_call("id", i)).collect();
                for t in tasks {
                    t.wait().expect("tiny request");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    println!(
        "{n} tiny requests from 4 threads in {elapsed:.2?}: {:.2} M requests/s",
        n as f64 / elapsed.as_secs_f64() / 1e6
    );

    // 4. The same tiny calls in one batch call: no hop per call.
    let start = Instant::now();
    let ids: Vec<Result<i64, IsleError>> = pool.map("id", 0..n);
    let elapsed = start.elapsed();
    assert!(ids.iter().all(Result::is_ok));
    println!(
        "{n} tiny calls through one pool.map in {elapsed:.2?}: {:.2} M calls/s",
        n as f64 / elapsed.as_secs_f64() / 1e6
    );

    // 5. Cancelling a runaway script: no hook runs until it is needed.
    let runaway = pool.spawn_eval::<()>("while true do end");
    thread::sleep(Duration::from_millis(20)); // let it run a little
    let start = Instant::now();
    runaway.cancel();
    let r = runaway.wait();
    println!(
        "cancelled a running endless loop in {:.2?}: {r:?}",
        start.elapsed()
    );

    let m = pool.metrics();
    for (i, w) in m.workers.iter().enumerate() {
        println!(
            "  VM {i}: {} completed, {} failed, busy {:.2?}, {} sessions",
            w.completed, w.failed, w.busy, w.sessions
        );
    }
    pool.shutdown()
}
