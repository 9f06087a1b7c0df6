//! Panics in Rust code run on the VM thread fail their request with
//! `Panic(message)`; Lua cannot swallow them, and the isle keeps serving.

use mlua_isle::mlua::{self, Lua};
use mlua_isle::{Isle, IsleError};

/// An isle with Rust functions that panic: `explode()` with a `&str`
/// payload, `explode_with(n)` with a formatted `String` payload.
fn isle_with_panicking_functions() -> Isle {
    Isle::spawn(|lua: &Lua| {
        let explode = lua.create_function(|_, ()| -> mlua::Result<()> { panic!("kaboom") })?;
        let explode_with = lua.create_function(|_, n: i64| -> mlua::Result<()> {
            std::panic::panic_any(format!("kaboom #{n}"))
        })?;
        lua.globals().set("explode", explode)?;
        lua.globals().set("explode_with", explode_with)?;
        lua.globals().set("kept", "state survives")
    })
    .unwrap()
}

fn assert_still_serving(isle: &Isle) {
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    assert_eq!(
        isle.eval::<String>("kept"),
        Ok("state survives".to_string())
    );
}

#[test]
fn panic_in_exec_is_panic_with_its_message_and_the_isle_serves_on() {
    let isle = isle_with_panicking_functions();
    let r = isle.exec(|_| -> mlua::Result<()> { panic!("exec went wrong") });
    assert_eq!(r, Err(IsleError::Panic("exec went wrong".to_string())));
    assert_still_serving(&isle);
    let t = isle.spawn_exec(|_| -> mlua::Result<i64> { panic!("again") });
    assert_eq!(t.wait(), Err(IsleError::Panic("again".to_string())));
    assert_still_serving(&isle);
}

#[test]
fn panic_with_a_string_payload_keeps_the_message() {
    let isle = isle_with_panicking_functions();
    let n = 7;
    let r = isle.exec(move |_| -> mlua::Result<()> { panic!("formatted {n}") });
    assert_eq!(r, Err(IsleError::Panic("formatted 7".to_string())));
    assert_eq!(
        isle.call::<()>("explode_with", 3),
        Err(IsleError::Panic("kaboom #3".to_string()))
    );
    assert_still_serving(&isle);
}

#[test]
fn panic_with_a_non_string_payload_is_still_a_panic() {
    let isle = isle_with_panicking_functions();
    let r = isle.exec(|_| -> mlua::Result<()> { std::panic::panic_any(42u32) });
    assert!(matches!(r, Err(IsleError::Panic(_))), "{r:?}");
    assert_still_serving(&isle);
}

#[test]
fn panic_in_a_rust_function_called_from_lua_is_panic() {
    let isle = isle_with_panicking_functions();
    assert_eq!(
        isle.eval::<()>("explode()"),
        Err(IsleError::Panic("kaboom".to_string()))
    );
    assert_eq!(
        isle.call::<()>("explode", ()),
        Err(IsleError::Panic("kaboom".to_string()))
    );
    assert_still_serving(&isle);
}

#[test]
fn pcall_does_not_swallow_a_panic() {
    let isle = isle_with_panicking_functions();
    let r = isle.eval::<()>("local ok, e = pcall(explode); swallowed = true");
    assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())));
    let r = isle.eval::<()>("pcall(function() explode_with(9) end); swallowed = true");
    assert_eq!(r, Err(IsleError::Panic("kaboom #9".to_string())));
    let r = isle.eval::<()>("xpcall(explode, function(m) return m end); swallowed = true");
    assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())));
    assert_eq!(isle.eval::<bool>("swallowed == nil"), Ok(true));
    assert_still_serving(&isle);
}

#[test]
fn panic_inside_a_coroutine_is_panic() {
    let isle = isle_with_panicking_functions();
    let r = isle.eval::<()>("coroutine.wrap(function() explode() end)(); swallowed = true");
    assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())));
    assert_eq!(isle.eval::<bool>("swallowed == nil"), Ok(true));
    assert_still_serving(&isle);
}

#[test]
fn coroutine_resume_does_not_swallow_a_panic() {
    let isle = isle_with_panicking_functions();
    // (Lua 5.1 makes coroutines of Lua functions only.)
    let body = if cfg!(feature = "lua51") {
        "function() explode() end"
    } else {
        "explode"
    };
    let r = isle.eval::<()>(format!(
        "coroutine.resume(coroutine.create({body})); swallowed = true"
    ));
    assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())));
    assert_eq!(isle.eval::<bool>("swallowed == nil"), Ok(true));
    assert_still_serving(&isle);
}

#[test]
fn panic_in_a_rust_function_called_from_exec_is_panic() {
    let isle = isle_with_panicking_functions();
    let r = isle.exec(|lua| {
        let f: mlua::Function = lua.globals().get("explode")?;
        f.call::<()>(())
    });
    assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())));
    assert_still_serving(&isle);
}

#[test]
fn many_panics_in_a_row_leave_the_isle_serving() {
    let isle = isle_with_panicking_functions();
    for i in 0..50 {
        assert_eq!(
            isle.call::<()>("explode_with", i),
            Err(IsleError::Panic(format!("kaboom #{i}")))
        );
    }
    assert_still_serving(&isle);
    isle.shutdown().unwrap();
}

#[test]
fn a_discarded_result_that_panics_on_drop_still_resolves_the_request() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("Bomb dropped");
        }
    }
    let (tx, started) = crossbeam_channel::unbounded::<()>();
    let isle = Isle::builder()
        .hook_interval(1)
        .spawn(move |lua| {
            let f = lua.create_function(move |_, ()| {
                let _ = tx.send(());
                Ok(())
            })?;
            lua.globals().set("started", f)
        })
        .unwrap();
    // The closure swallows its interruption and returns a value; the request
    // resolves with the stop reason and the value is dropped (and panics).
    let task = isle.spawn_exec(|lua| {
        let _ = lua.load("started() while true do end").exec();
        Ok(Bomb)
    });
    started.recv().unwrap();
    task.cancel();
    let mut task = task;
    let r = task.wait_timeout(std::time::Duration::from_secs(10));
    assert!(
        matches!(r, Some(Err(IsleError::Cancelled))),
        "{:?}",
        r.map(|r| r.map(|_| ()))
    );
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}
