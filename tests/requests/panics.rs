//! Panics in Rust code run on the VM thread fail their request with
//! `Panic(message)`; Lua cannot swallow them, and the VM keeps serving (on
//! every front end: an isle, a pool, a session).

use crate::common;

use common::front::{fronts, Front, Fronts};
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{Isle, IsleError};

/// Fronts with Rust functions that panic: `explode()` with a `&str`
/// payload, `explode_with(n)` with a formatted `String` payload.
fn fronts_with_panicking_functions() -> Fronts {
    fronts().init(|lua: &Lua| {
        let explode = lua.create_function(|_, ()| -> mlua::Result<()> { panic!("kaboom") })?;
        let explode_with = lua.create_function(|_, n: i64| -> mlua::Result<()> {
            std::panic::panic_any(format!("kaboom #{n}"))
        })?;
        lua.globals().set("explode", explode)?;
        lua.globals().set("explode_with", explode_with)
    })
}

/// Sets `kept`, to be checked by [`assert_still_serving`].
fn keep_state(front: &Front) {
    front.eval::<()>("kept = 'state survives'").unwrap();
}

fn assert_still_serving(front: &Front) {
    assert_eq!(front.eval::<i64>("1 + 1"), Ok(2), "{front}");
    assert_eq!(
        front.eval::<String>("kept"),
        Ok("state survives".to_string()),
        "{front}"
    );
}

#[test]
fn panic_in_exec_is_panic_with_its_message_and_the_vm_serves_on() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let r = front.exec(|_| -> mlua::Result<()> { panic!("exec went wrong") });
        assert_eq!(
            r,
            Err(IsleError::Panic("exec went wrong".to_string())),
            "{front}"
        );
        assert_still_serving(&front);
        let t = front.spawn_exec(|_| -> mlua::Result<i64> { panic!("again") });
        assert_eq!(
            t.wait(),
            Err(IsleError::Panic("again".to_string())),
            "{front}"
        );
        assert_still_serving(&front);
    });
}

#[test]
fn panic_with_a_string_payload_keeps_the_message() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let n = 7;
        let r = front.exec(move |_| -> mlua::Result<()> { panic!("formatted {n}") });
        assert_eq!(
            r,
            Err(IsleError::Panic("formatted 7".to_string())),
            "{front}"
        );
        assert_eq!(
            front.call::<()>("explode_with", 3),
            Err(IsleError::Panic("kaboom #3".to_string())),
            "{front}"
        );
        assert_still_serving(&front);
    });
}

#[test]
fn panic_with_a_non_string_payload_is_still_a_panic() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let r = front.exec(|_| -> mlua::Result<()> { std::panic::panic_any(42u32) });
        assert!(matches!(r, Err(IsleError::Panic(_))), "{r:?} {front}");
        assert_still_serving(&front);
    });
}

#[test]
fn panic_in_a_rust_function_called_from_lua_is_panic() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        assert_eq!(
            front.eval::<()>("explode()"),
            Err(IsleError::Panic("kaboom".to_string())),
            "{front}"
        );
        assert_eq!(
            front.call::<()>("explode", ()),
            Err(IsleError::Panic("kaboom".to_string())),
            "{front}"
        );
        assert_still_serving(&front);
    });
}

#[test]
fn pcall_does_not_swallow_a_panic() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let r = front.eval::<()>("local ok, e = pcall(explode); swallowed = true");
        assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())), "{front}");
        let r = front.eval::<()>("pcall(function() explode_with(9) end); swallowed = true");
        assert_eq!(r, Err(IsleError::Panic("kaboom #9".to_string())), "{front}");
        let r = front.eval::<()>("xpcall(explode, function(m) return m end); swallowed = true");
        assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())), "{front}");
        let r = front.eval::<()>("return select(2, pcall(explode))");
        assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())), "{front}");
        // A failed catcher skips its check for plain values: a handler that
        // turns the panic into a string, or a table, must not hide it.
        for handler in [
            "tostring",
            "function(m) return {m} end",
            "function() return 1 end",
        ] {
            let code = format!("xpcall(explode, {handler}); swallowed = true");
            let r = front.eval::<()>(code.as_str());
            assert_eq!(
                r,
                Err(IsleError::Panic("kaboom".to_string())),
                "{code} {front}"
            );
        }
        assert_eq!(front.eval::<bool>("swallowed == nil"), Ok(true), "{front}");
        assert_still_serving(&front);
    });
}

#[test]
fn panic_inside_a_coroutine_is_panic() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let r = front.eval::<()>("coroutine.wrap(function() explode() end)(); swallowed = true");
        assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())), "{front}");
        assert_eq!(front.eval::<bool>("swallowed == nil"), Ok(true), "{front}");
        assert_still_serving(&front);
    });
}

#[test]
fn coroutine_resume_does_not_swallow_a_panic() {
    // (Lua 5.1 makes coroutines of Lua functions only.)
    let body = if cfg!(feature = "lua51") {
        "function() explode() end"
    } else {
        "explode"
    };
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let r = front.eval::<()>(format!(
            "coroutine.resume(coroutine.create({body})); swallowed = true"
        ));
        assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())), "{front}");
        assert_eq!(front.eval::<bool>("swallowed == nil"), Ok(true), "{front}");
        assert_still_serving(&front);
    });
}

#[test]
fn panic_in_a_rust_function_called_from_exec_is_panic() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        let r = front.exec(|lua| {
            let f: mlua::Function = lua.globals().get("explode")?;
            f.call::<()>(())
        });
        assert_eq!(r, Err(IsleError::Panic("kaboom".to_string())), "{front}");
        assert_still_serving(&front);
    });
}

#[test]
fn many_panics_in_a_row_leave_the_vm_serving() {
    fronts_with_panicking_functions().each(|front| {
        keep_state(&front);
        for i in 0..50 {
            assert_eq!(
                front.call::<()>("explode_with", i),
                Err(IsleError::Panic(format!("kaboom #{i}"))),
                "{front}"
            );
        }
        assert_still_serving(&front);
        front.shutdown().unwrap();
    });
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
    common::expect_msg(&started, "the loop started");
    task.cancel();
    let mut task = task;
    let r = task.wait_timeout(common::PATIENCE);
    assert!(
        matches!(r, Some(Err(IsleError::Cancelled))),
        "{:?}",
        r.map(|r| r.map(|_| ()))
    );
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}
