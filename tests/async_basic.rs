#![cfg(feature = "async")]
mod common;
use mlua_isle::{Isle, IsleError, IslePool};
use std::time::Duration;

fn sleeper(lua: &mlua::Lua) -> mlua::Result<()> {
    let f = lua.create_async_function(|_, ms: u64| async move {
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            let _ = tx.send(());
        });
        let _ = rx.await;
        Ok(ms)
    })?;
    lua.globals().set("sleep_ms", f)
}

#[test]
fn isle_suspends() {
    let isle = Isle::spawn(sleeper).unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| isle.spawn_eval::<u64>("return sleep_ms(50)"))
        .collect();
    let t = std::time::Instant::now();
    for t in tasks {
        assert_eq!(t.wait().unwrap(), 50);
    }
    eprintln!("50 x 50ms on one isle: {:?}", t.elapsed());
    assert_eq!(isle.eval::<i64>("1+1").unwrap(), 2);
}

#[test]
fn pool_suspends_and_cancel() {
    let pool = IslePool::builder()
        .workers(2)
        .init(sleeper)
        .build()
        .unwrap();
    eprintln!("a");
    let t0 = pool.spawn_eval::<u64>("return sleep_ms(10)");
    assert_eq!(t0.wait().unwrap(), 10);
    eprintln!("b");
    let t = pool.spawn_eval::<u64>("return sleep_ms(100000)");
    std::thread::sleep(Duration::from_millis(50));
    t.cancel();
    eprintln!("c");
    let t2 = pool.spawn_eval::<u64>("return sleep_ms(10)");
    assert_eq!(t2.wait().unwrap(), 10);
    eprintln!("d");
    let s = pool.session("a");
    let a = s.spawn_eval::<u64>("x = 1; local r = sleep_ms(30); x = x + 1; return x");
    let b = s.spawn_eval::<u64>("return x");
    assert_eq!(a.wait().unwrap(), 2);
    assert_eq!(b.wait().unwrap(), 2);
    eprintln!("e");
    let t3 = pool.spawn_exec_async(|lua| async move {
        let f: mlua::Function = lua.globals().get("sleep_ms")?;
        f.call_async::<u64>(5).await
    });
    assert_eq!(t3.wait().unwrap(), 5);
    eprintln!("f");
    drop(pool);
    eprintln!("g");
    let _ = IsleError::Cancelled;
}
