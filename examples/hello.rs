//! One Lua VM on its own thread, used from several threads at once.
//!
//! Run: `cargo run --release --example hello`

use std::thread;
use std::time::Instant;

use mlua_isle::{Isle, IsleError};

fn main() -> Result<(), IsleError> {
    let isle = Isle::spawn(|lua| {
        lua.globals().set("greeting", "hello")?;
        lua.load("function add(a, b) return a + b end").exec()
    })?;

    let s: String = isle.eval("greeting .. ' from ' .. _VERSION")?;
    println!("{s}");

    // The handle is Send + Sync: share clones across threads.
    let start = Instant::now();
    let per_thread = 50_000;
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let isle = isle.clone();
            thread::spawn(move || -> Result<i64, IsleError> {
                let mut sum = 0;
                for i in 0..per_thread {
                    sum += isle.call::<i64>("add", (t, i))?;
                }
                Ok(sum)
            })
        })
        .collect();
    for w in workers {
        let sum = w.join().expect("worker thread panicked")?;
        println!("a caller thread summed {sum}");
    }
    let elapsed = start.elapsed();
    let calls = 2 * per_thread;
    println!(
        "{calls} cross-thread calls in {elapsed:.2?} ({:.2?} per call)",
        elapsed / calls as u32
    );

    // Errors keep Lua's position, and the VM stays usable after them.
    match isle.eval::<()>("local t = nil\nreturn t.field") {
        Err(IsleError::Lua(e)) => println!("Lua error: {}", e.message()),
        other => println!("unexpected: {other:?}"),
    }

    isle.shutdown()
}
