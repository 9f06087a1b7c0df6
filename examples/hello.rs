//! One Lua VM on its own thread, used from several threads at once.
//!
//! Run: `cargo run --release --example hello`

use std::thread;
use std::time::{Duration, Instant};

use mlua_isle::{Isle, IsleError};

/// Calls per timed batch.
const BATCH: u32 = 1_000;

fn main() -> Result<(), IsleError> {
    let isle = Isle::spawn(|lua| {
        lua.globals().set("greeting", "hello")?;
        lua.load("function add(a, b) return a + b end").exec()
    })?;

    let s: String = isle.eval("greeting .. ' from ' .. _VERSION")?;
    println!("{s}");

    // One caller: each call is a round trip to the VM thread and back.
    // Timed in batches: the fastest batch shows the machine at its
    // quietest, the median what this run mostly got.
    let mut batches = Vec::new();
    for _ in 0..100 {
        let start = Instant::now();
        for i in 0..BATCH {
            isle.call::<i64>("add", (1, i))?;
        }
        batches.push(start.elapsed() / BATCH);
    }
    batches.sort();
    println!(
        "one caller:  {:.2?} per call in the fastest batch, {:.2?} in the median one",
        batches[0], batches[50]
    );

    // The handle is Send + Sync: share clones across threads. The VM still
    // runs one request at a time, so the callers take turns.
    let start = Instant::now();
    let callers: Vec<_> = (0..2)
        .map(|t| {
            let isle = isle.clone();
            thread::spawn(move || -> Result<(), IsleError> {
                for i in 0..50 * BATCH {
                    isle.call::<i64>("add", (t, i))?;
                }
                Ok(())
            })
        })
        .collect();
    for c in callers {
        c.join().expect("caller thread panicked")?;
    }
    let per_call: Duration = start.elapsed() / (100 * BATCH);
    println!("two callers: {per_call:.2?} per call (wall time / calls, both at once)");

    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "  These are wall-clock times on this machine as it is now. The README's\n  \
         `Isle::call` figure (~0.6 µs) is the bench's hot round trip from one\n  \
         caller. Two callers and the VM thread are three busy threads on {cores}\n  \
         core(s), and other programs may want them too: a hop that finds no\n  \
         free core waits for the scheduler, which takes microseconds."
    );

    // Errors keep Lua's position, and the VM stays usable after them.
    match isle.eval::<()>("local t = nil\nreturn t.field") {
        Err(IsleError::Lua(e)) => println!("Lua error: {}", e.message()),
        other => println!("unexpected: {other:?}"),
    }

    isle.shutdown()
}
