//! Awaiting Lua from async code: a `Task` is a `Future` (std `Waker`, no
//! runtime ties), so it works under tokio or any other executor.
//!
//! Run: `cargo run --release --example tokio`

use std::time::Duration;

use mlua_isle::{Isle, IsleError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), IsleError> {
    let isle = Isle::spawn(|lua| {
        lua.load("function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end")
            .exec()
    })?;

    // The runtime thread never blocks while Lua works.
    let fib = isle.spawn_call::<i64>("fib", 25);
    let ticker = async {
        let mut ticks = 0;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ticks += 1;
        }
        ticks
    };
    let (fib, ticks) = tokio::join!(fib, ticker);
    println!(
        "fib(25) = {} (runtime ticked {ticks} times meanwhile)",
        fib?
    );

    // A time limit works the same when awaited.
    let r = isle
        .spawn_eval::<()>("while true do end")
        .timeout(Duration::from_millis(50))
        .await;
    println!("runaway script: {r:?}");

    isle.shutdown()
}
