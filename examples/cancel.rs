//! Stopping runaway scripts: cancel, time limits, and a Rust callback that
//! gives up when its request is cancelled.
//!
//! Run: `cargo run --release --example cancel`

use std::time::{Duration, Instant};

use mlua_isle::{current_token, Isle, IsleError};

fn main() -> Result<(), IsleError> {
    let isle = Isle::spawn(|lua| {
        // A Rust function that would block for a long time: it checks its
        // request's token, since the hook cannot interrupt Rust code.
        let slow_io = lua.create_function(|lua, ()| {
            let token = current_token(lua).expect("runs inside a request");
            for _ in 0..10_000 {
                if token.is_cancelled() {
                    return Err(mlua::Error::runtime("slow_io: cancelled"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok("done")
        })?;
        lua.globals().set("slow_io", slow_io)
    })?;

    // 1. Cancel an infinite loop, even one that tries to swallow errors.
    let task = isle.spawn_eval::<()>("while true do pcall(function() while true do end end) end");
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    task.cancel();
    println!(
        "cancelled loop: {:?} after {:.2?}",
        task.wait(),
        t0.elapsed()
    );

    // 2. A time limit (time spent queued counts).
    let t0 = Instant::now();
    let task = isle
        .spawn_eval::<()>("local n = 0 while true do n = n + 1 end")
        .timeout(Duration::from_millis(100));
    println!(
        "time-limited loop: {:?} after {:.2?}",
        task.wait(),
        t0.elapsed()
    );

    // 3. A blocking Rust callback that checks its token.
    let task = isle.spawn_call::<String>("slow_io", ());
    std::thread::sleep(Duration::from_millis(20));
    task.cancel();
    println!("cancelled callback: {:?}", task.wait());

    // The VM is fine afterwards.
    println!("next request: {:?}", isle.eval::<i64>("6 * 7"));
    isle.shutdown()
}
