//! Requests and their results: `eval`, `call`, `exec`, the errors they give,
//! init, and the builder's thread options.

use crate::common;

use std::thread;
use std::time::Duration;

use common::front::{fronts, Fronts};
use common::{thread_alive, thread_gone};
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{Isle, IsleError, LuaErrorKind};

/// Fronts whose VMs have `add`, `greet` and a global that is no function.
fn fronts_with_add() -> Fronts {
    fronts().init(|lua| {
        lua.load(
            r#"
            function add(a, b) return a + b end
            function greet(name, times) return string.rep("hi " .. name .. ";", times) end
            not_a_function = 5
            "#,
        )
        .exec()
    })
}

fn lua_err(r: Result<impl std::fmt::Debug, IsleError>) -> mlua_isle::LuaError {
    match r {
        Err(IsleError::Lua(e)) => e,
        other => panic!("expected IsleError::Lua, got {other:?}"),
    }
}

// ===== eval, call, exec =====

#[test]
fn eval_accepts_an_expression_and_a_block() {
    fronts().each(|front| {
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2), "{front}");
        assert_eq!(front.eval::<i64>("return 1 + 1"), Ok(2), "{front}");
        assert_eq!(
            front.eval::<i64>("local x = 20\nlocal y = 22\nreturn x + y"),
            Ok(42),
            "{front}"
        );
    });
}

#[test]
fn eval_returns_multiple_values_as_a_tuple() {
    fronts().each(|front| {
        let (a, b, c): (i64, String, bool) = front.eval("1, 'two', true").unwrap();
        assert_eq!((a, b.as_str(), c), (1, "two", true), "{front}");
        let (x, y): (f64, Option<String>) = front.eval("return 2.5, nil").unwrap();
        assert_eq!((x, y), (2.5, None), "{front}");
    });
}

#[test]
fn globals_set_by_one_eval_are_seen_by_the_next() {
    fronts().each(|front| {
        front.eval::<()>("counter = 41").unwrap();
        front.eval::<()>("counter = counter + 1").unwrap();
        assert_eq!(front.eval::<i64>("counter"), Ok(42), "{front}");
    });
}

#[test]
fn call_passes_arguments_and_converts_the_result() {
    fronts_with_add().each(|front| {
        assert_eq!(front.call::<i64>("add", (40, 2)), Ok(42), "{front}");
        assert_eq!(
            front.call::<String>("greet", ("bo".to_string(), 2)),
            Ok("hi bo;hi bo;".to_string()),
            "{front}"
        );
        assert_eq!(
            front.spawn_call::<f64>("add", (0.5, 0.25)).wait(),
            Ok(0.75),
            "{front}"
        );
    });
}

#[test]
fn exec_returns_a_rust_value() {
    fronts_with_add().each(|front| {
        let v: Vec<i64> = front
            .exec(|lua| {
                let add: mlua::Function = lua.globals().get("add")?;
                Ok(vec![add.call((1, 2))?, add.call((3, 4))?])
            })
            .unwrap();
        assert_eq!(v, vec![3, 7], "{front}");
        let t = front.spawn_exec(|lua| lua.globals().get::<i64>("not_a_function"));
        assert_eq!(t.wait(), Ok(5), "{front}");
    });
}

#[test]
fn exec_error_is_a_lua_error() {
    fronts().each(|front| {
        let e = lua_err(front.exec(|_| Err::<(), _>(mlua::Error::runtime("no luck"))));
        assert_eq!(e.kind(), LuaErrorKind::Runtime, "{front}");
        assert!(e.message().contains("no luck"), "{e:?} {front}");
    });
}

// ===== errors =====

#[test]
fn call_of_a_missing_global_is_not_found() {
    fronts_with_add().each(|front| {
        assert_eq!(
            front.call::<()>("no_such_function", ()),
            Err(IsleError::NotFound("no_such_function".to_string())),
            "{front}"
        );
    });
}

#[test]
fn call_of_a_non_function_global_is_a_lua_error() {
    fronts_with_add().each(|front| {
        let e = lua_err(front.call::<()>("not_a_function", ()));
        assert!(e.message().contains("not_a_function"), "{e:?} {front}");
        assert!(e.message().contains("not a function"), "{e:?} {front}");
    });
}

#[test]
fn runtime_error_keeps_its_eval_position_and_a_traceback() {
    fronts().each(|front| {
        let e = lua_err(front.eval::<()>("local a = 1\n\nerror('boom')"));
        assert_eq!(e.kind(), LuaErrorKind::Runtime, "{front}");
        assert_eq!(e.message(), "eval:3: boom", "{front}");
        let tb = e.traceback().expect("a runtime error has a traceback");
        assert!(tb.starts_with("stack traceback:"), "{tb}");
        assert!(tb.contains("eval:3"), "{tb}");

        let e = lua_err(front.eval::<()>("local t = nil\nreturn t.field"));
        assert!(e.message().starts_with("eval:2: "), "{e:?} {front}");
        // Luau: "attempt to index nil with 'field'".
        #[cfg(not(feature = "luau"))]
        assert!(e.message().contains("nil value"), "{e:?}");
        #[cfg(feature = "luau")]
        assert!(e.message().contains("attempt to index nil"), "{e:?}");
    });
}

#[test]
fn display_of_a_lua_error_includes_its_message() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let err = isle.eval::<()>("error('shown to users')").unwrap_err();
    assert!(err.to_string().contains("eval:1: shown to users"), "{err}");
}

#[test]
fn syntax_error_has_kind_syntax_and_a_position() {
    fronts().each(|front| {
        let e = lua_err(front.eval::<()>("local x = = 1"));
        assert_eq!(e.kind(), LuaErrorKind::Syntax, "{front}");
        assert!(e.message().starts_with("eval:1:"), "{e:?} {front}");
        let e = lua_err(front.eval::<i64>("1 +"));
        assert_eq!(e.kind(), LuaErrorKind::Syntax, "{front}");
    });
}

#[test]
fn unconvertible_result_is_a_conversion_error() {
    fronts().each(|front| {
        let e = lua_err(front.eval::<i64>("'abc'"));
        assert_eq!(e.kind(), LuaErrorKind::Conversion, "{front}");
        let e = lua_err(front.eval::<String>("{}"));
        assert_eq!(e.kind(), LuaErrorKind::Conversion, "{front}");
    });
}

#[test]
fn the_vm_answers_after_every_kind_of_error_and_keeps_its_state() {
    use LuaErrorKind::{Conversion, Runtime, Syntax};
    fronts_with_add().each(|front| {
        front.eval::<()>("kept = 'still here'").unwrap();
        let failures: Vec<(Result<(), IsleError>, Option<LuaErrorKind>)> = vec![
            (front.eval::<()>("error('runtime')"), Some(Runtime)),
            (front.eval::<()>("this is not lua"), Some(Syntax)),
            (front.eval::<i64>("'abc'").map(drop), Some(Conversion)),
            (front.call::<()>("no_such_function", ()), None),
            (front.call::<()>("not_a_function", ()), Some(Runtime)),
            (
                front.call::<i64>("add", ("x", "y")).map(drop),
                Some(Runtime),
            ),
            (
                front.exec(|_| Err(mlua::Error::runtime("from exec"))),
                Some(Runtime),
            ),
        ];
        for (i, (r, kind)) in failures.into_iter().enumerate() {
            match kind {
                Some(kind) => assert_eq!(lua_err(r).kind(), kind, "failure #{i} {front}"),
                None => assert_eq!(
                    r,
                    Err(IsleError::NotFound("no_such_function".to_string())),
                    "{front}"
                ),
            }
            assert_eq!(front.eval::<i64>("1 + 1"), Ok(2), "after failure #{i}");
        }
        assert_eq!(
            front.eval::<String>("kept"),
            Ok("still here".to_string()),
            "{front}"
        );
    });
}

#[test]
fn errors_are_send_sync_static_and_cross_threads() {
    fn assert_error<E: std::error::Error + Send + Sync + 'static>(_: &E) {}
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let err = isle.eval::<()>("error('travels')").unwrap_err();
    assert_error(&err);
    assert_error(err.as_lua().unwrap());
    // Readable on another thread after the VM is gone.
    isle.shutdown().unwrap();
    drop(isle);
    let message = thread::spawn(move || err.as_lua().unwrap().message().to_string())
        .join()
        .unwrap();
    assert_eq!(message, "eval:1: travels");
}

// ===== the seed README's examples, verbatim =====

#[test]
fn seed_readme_basic_example() {
    use mlua_isle::Isle;

    let isle = Isle::spawn(|lua| {
        lua.globals().set("greeting", "hello")?;
        Ok(())
    })
    .unwrap();

    let result: String = isle.eval("return greeting").unwrap();
    assert_eq!(result, "hello");

    isle.shutdown().unwrap();
}

#[test]
fn seed_readme_cancellation_example() {
    use mlua_isle::Isle;

    // The seed README slept 50 ms to let the loop start; `started()` says
    // when it has.
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| common::register_signal(lua, "started", started_tx)).unwrap();

    let task = isle.spawn_eval::<()>("started(); while true do end");

    common::expect_msg(&started, "the loop started");
    task.cancel();

    let result = common::within("the cancelled loop resolves", move || task.wait());
    assert_eq!(result, Err(IsleError::Cancelled));
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

// ===== init =====

#[test]
fn init_error_is_init_with_the_lua_message_and_leaves_no_thread() {
    const NAME: &str = "isl-initerr";
    let r = Isle::builder()
        .name(NAME)
        .spawn(|lua| lua.load("error('bad config')").exec());
    match r {
        Err(IsleError::Init(msg)) => assert!(msg.contains("bad config"), "{msg}"),
        other => panic!("expected Init, got {other:?}"),
    }
    assert!(thread_gone(NAME), "VM thread {NAME} left behind");
}

#[test]
fn init_panic_is_panic_with_its_message_and_leaves_no_thread() {
    const NAME: &str = "isl-initpanic";
    let r = Isle::builder()
        .name(NAME)
        .spawn(|_| -> mlua::Result<()> { panic!("init exploded") });
    assert_eq!(
        r.unwrap_err(),
        IsleError::Panic("init exploded".to_string())
    );
    assert!(thread_gone(NAME), "VM thread {NAME} left behind");
}

#[test]
fn init_runs_before_the_first_request() {
    let isle = Isle::spawn(|lua| {
        lua.load("function double(x) return 2 * x end").exec()?;
        lua.globals().set("ready", true)
    })
    .unwrap();
    // Submitted at once, so they could only succeed if init came first.
    let t = isle.spawn_call::<i64>("double", 21);
    assert_eq!(isle.eval::<bool>("ready"), Ok(true));
    assert_eq!(t.wait(), Ok(42));
}

// ===== builder options =====

#[test]
fn builder_name_names_the_vm_thread() {
    const NAME: &str = "isl-named";
    assert!(!thread_alive(NAME));
    let isle = Isle::builder().name(NAME).spawn(|_| Ok(())).unwrap();
    assert!(thread_alive(NAME), "threads: {:?}", common::thread_names());
    let on_vm = isle
        .exec(|_| Ok(thread::current().name().map(str::to_string)))
        .unwrap();
    assert_eq!(on_vm.as_deref(), Some(NAME));
    isle.shutdown().unwrap();
    assert!(thread_gone(NAME));
}

/// Size of the memory mapping holding `addr`, from `/proc/self/maps`.
fn mapping_size(addr: usize) -> Option<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let range = line.split_whitespace().next()?;
        let (lo, hi) = range.split_once('-')?;
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        );
        (lo <= addr && addr < hi).then_some(hi - lo)
    })
}

#[inline(never)]
fn recurse(depth: usize) -> usize {
    // A big frame, so the depth below needs far more than the default 2 MiB.
    let frame = std::hint::black_box([depth as u8; 4096]);
    if depth == 0 {
        frame[0] as usize
    } else {
        recurse(depth - 1) + std::hint::black_box(frame[100]) as usize
    }
}

#[test]
fn builder_stack_size_sets_the_vm_thread_stack() {
    const STACK: usize = 64 << 20;
    let isle = Isle::builder()
        .name("isl-stack")
        .stack_size(STACK)
        .spawn(|_| Ok(()))
        .unwrap();
    let stack = isle
        .exec(|_| {
            let local = 0u8;
            Ok(mapping_size(std::ptr::addr_of!(local) as usize))
        })
        .unwrap()
        .expect("the VM thread's stack is mapped");
    assert!(stack >= STACK, "VM thread stack is {stack} bytes");
    // ~16 MiB of frames: overflows a default-sized thread stack.
    let depth = 4000;
    let expected: usize = (1..=depth).map(|d| d % 256).sum();
    assert_eq!(isle.exec(move |_| Ok(recurse(depth))), Ok(expected));
}

#[test]
fn builder_options_combine() {
    let isle = Isle::builder()
        .name("isl-combo")
        .stack_size(4 << 20)
        .hook_interval(1)
        .default_timeout(Duration::from_secs(60))
        .spawn(|lua: &Lua| lua.globals().set("x", 1))
        .unwrap();
    assert_eq!(isle.eval::<i64>("x + 1"), Ok(2));
    isle.shutdown().unwrap();
}
