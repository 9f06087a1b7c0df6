//! Awaiting Lua from async code: a `Task` is a `Future` (std `Waker`, no
//! runtime ties), so it works under tokio or any other executor.
//!
//! Run: `cargo run --release --example tokio`

use std::future::Future;
use std::time::{Duration, Instant};

use mlua_isle::{Isle, IsleError};
use tokio::time::MissedTickBehavior;

/// Runs `work` to its end while a 1 ms interval ticks on the same runtime;
/// returns its output and how many ticks were seen meanwhile.
async fn ticks_during<F: Future>(work: F) -> (F::Output, u32) {
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    interval.tick().await; // the first tick is immediate: not counted
    let mut ticks = 0;
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return (out, ticks),
            _ = interval.tick() => ticks += 1,
        }
    }
}

// One runtime thread: whatever blocks it stops every task on it.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), IsleError> {
    let isle = Isle::spawn(|lua| {
        lua.load("function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end")
            .exec()
    })?;

    // Awaited: the runtime thread is free while the VM thread works.
    let start = Instant::now();
    let (fib, ticks) = ticks_during(isle.spawn_call::<i64>("fib", 30)).await;
    println!(
        "awaited:  fib(30) = {} in {:.0?}; the interval ticked {ticks} times meanwhile",
        fib?,
        start.elapsed()
    );

    // For contrast, the blocking call inside async code (don't do this):
    // the runtime's only thread waits in it, so nothing else runs.
    let start = Instant::now();
    let (fib, ticks) = ticks_during(async { isle.call::<i64>("fib", 30) }).await;
    println!(
        "blocking: fib(30) = {} in {:.0?}; the interval ticked {ticks} times meanwhile",
        fib?,
        start.elapsed()
    );

    // A time limit works the same when awaited.
    let r = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(50))
        .await;
    println!("runaway script with a 50 ms limit: {r:?}");

    isle.shutdown()
}
