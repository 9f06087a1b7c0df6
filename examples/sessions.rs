//! Per-tenant sessions: state that lives in one VM, isolated from other
//! tenants, closed explicitly or when idle.
//!
//! Run: `cargo run --release --example sessions`

use std::time::Duration;

use mlua_isle::{IsleError, IslePool};

fn main() -> Result<(), IsleError> {
    let pool = IslePool::builder()
        .workers(2)
        .init(|lua| {
            // Shared, read by every session.
            lua.globals().set("PRICE", 3)?;
            lua.load("function total(n) return n * PRICE end").exec()
        })
        .session_idle_timeout(Duration::from_millis(200))
        .build()?;

    let alice = pool.session("alice");
    let bob = pool.session("bob");

    // Each session has its own globals; reads fall back to the shared ones.
    alice.eval::<()>("cart = 2")?;
    bob.eval::<()>("cart = 5")?;
    let a: i64 = alice.eval("total(cart)")?;
    let b: i64 = bob.eval("total(cart)")?;
    println!("alice pays {a}, bob pays {b}");

    // A session can define its own functions; `call` finds them first.
    alice.eval::<()>("function add(n) cart = cart + n return cart end")?;
    println!("alice's cart: {}", alice.call::<i64>("add", 3)?);
    println!(
        "bob cannot see alice's function: {:?}",
        bob.call::<i64>("add", 1)
    );

    // `exec` hands over the session's environment table.
    let keys = alice.exec(|_lua, env| {
        let mut names: Vec<String> = env
            .pairs::<String, mlua::Value>()
            .map(|kv| kv.map(|(k, _)| k))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    })?;
    println!("alice's globals: {keys:?}");

    // Closing drops the state; the next use starts fresh.
    pool.close_session("bob");
    println!(
        "bob after close: cart = {:?}",
        bob.eval::<Option<i64>>("cart")?
    );

    // Idle sessions are closed by the pool.
    std::thread::sleep(Duration::from_millis(600));
    println!(
        "alice after idling: cart = {:?}",
        alice.eval::<Option<i64>>("cart")?
    );
    println!(
        "sessions expired so far: {}",
        pool.metrics().sessions_expired
    );

    pool.shutdown()
}
