//! The value a failing request raised (`LuaError::value`): kept beside the
//! message and traceback, however the error left the request, readable
//! without the VM, and bounded whatever a hostile script raises.

use crate::common;

use std::time::Duration;

use common::front::fronts;
use common::within;
use mlua_isle::mlua::{self, Function, Lua};
use mlua_isle::{ErrorValue, FieldKey, Isle, IsleError, LuaError, LuaErrorKind, Scalar};

/// The Lua error of `r`, or a failure naming what came instead.
fn lua_error<T: std::fmt::Debug>(r: Result<T, IsleError>) -> LuaError {
    match r {
        Err(IsleError::Lua(e)) => e,
        other => panic!("expected a Lua error, got {other:?}"),
    }
}

/// The raised value of `r`'s Lua error, which must have one.
fn raised<T: std::fmt::Debug>(r: Result<T, IsleError>) -> (LuaError, ErrorValue) {
    let e = lua_error(r);
    let v = e
        .value()
        .cloned()
        .unwrap_or_else(|| panic!("no value kept: {e:?}"));
    (e, v)
}

fn code_42(v: &ErrorValue) {
    assert_eq!(v.type_name(), "table");
    assert_eq!(
        v.fields(),
        [
            (FieldKey::Name("code".into()), Scalar::Integer(42)),
            (FieldKey::Name("msg".into()), Scalar::String("no".into())),
        ]
    );
    assert!(v.is_complete() && !v.is_truncated(), "{v:?}");
}

/// `via_rust(f)`: a Rust function that calls `f` and fails with its error.
fn init_paths(lua: &Lua) -> mlua::Result<()> {
    let via_rust = lua.create_function(|_, f: Function| f.call::<()>(()))?;
    lua.globals().set("via_rust", via_rust)?;
    lua.load("function fail() error({ code = 42, msg = 'no' }) end")
        .exec()
}

#[test]
fn a_raised_table_keeps_its_fields_and_reads_in_the_message() {
    within("a raised table", || {
        fronts().init(init_paths).each(|front| {
            let (e, v) = raised(front.eval::<()>("error({ code = 42, msg = 'no' })"));
            assert_eq!(e.kind(), LuaErrorKind::Runtime, "{front}");
            assert_eq!(e.message(), r#"{code = 42, msg = "no"}"#, "{front}");
            assert!(e.traceback().is_some(), "{front}: the traceback stays");
            assert!(v.text().starts_with("table: "), "{front}: {v:?}");
            assert_eq!(v.field("code"), Some(&Scalar::Integer(42)));
            code_42(&v);
            // The VM serves on.
            assert_eq!(front.eval::<i64>("return 1"), Ok(1), "{front}");
        });
    });
}

#[test]
fn the_value_survives_every_path_out_of_the_request() {
    within("every path", || {
        fronts().init(init_paths).each(|front| {
            for code in [
                "fail()",
                "local function deeper() fail() end deeper()",
                "via_rust(fail)",
                "via_rust(function() via_rust(fail) end)",
                "coroutine.wrap(fail)()",
                "local ok, e = coroutine.resume(coroutine.create(fail)) error(e)",
                "local ok, e = pcall(fail) error(e)",
                "local ok, e = xpcall(fail, function(e) return e end) error(e)",
                "local ok, e = pcall(fail) error(e, 2)",
                "error({ code = 42, msg = 'no' }, 2)",
            ] {
                let (e, v) = raised(front.eval::<()>(code));
                assert_eq!(e.message(), r#"{code = 42, msg = "no"}"#, "{front}: {code}");
                code_42(&v);
            }
            let (_, v) = raised(front.call::<()>("fail", ()));
            code_42(&v);
        });
    });
}

#[cfg(any(feature = "lua53", feature = "lua54", feature = "lua55"))]
#[test]
fn assert_with_a_table_keeps_it() {
    within("assert", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (_, v) = raised(isle.eval::<()>("assert(false, { code = 42, msg = 'no' })"));
        code_42(&v);
        // A string message is placed as Lua places it, and keeps no value.
        let e = lua_error(isle.eval::<()>("assert(false, 'plain')"));
        assert!(e.value().is_none());
        assert!(e.message().ends_with("plain"), "{e:?}");
        assert_eq!(isle.eval::<i64>("return assert(7, 'unused')"), Ok(7));
    });
}

#[test]
fn strings_keep_no_value_and_their_position() {
    within("strings", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let e = lua_error(isle.eval::<()>("\n error('boom')"));
        assert!(e.value().is_none());
        assert_eq!(e.message(), "eval:2: boom");
        let e = lua_error(isle.eval::<()>("local function f() error('up', 2) end\n f()"));
        assert_eq!(e.message(), "eval:2: up");
        let e = lua_error(isle.eval::<()>("error('bare', 0)"));
        assert_eq!(e.message(), "bare");
        // Not raised by the script: no value.
        let e = lua_error(isle.eval::<()>("local t = nil; t.x = 1"));
        assert!(e.value().is_none(), "{e:?}");
    });
}

#[test]
fn scalars_nil_and_false_are_kept() {
    within("scalars", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (e, v) = raised(isle.eval::<()>("error(nil)"));
        assert_eq!((e.message(), v.type_name()), ("nil", "nil"));
        assert_eq!(v.as_scalar(), Some(&Scalar::Nil));
        let (e, v) = raised(isle.eval::<()>("error(false)"));
        assert_eq!((e.message(), v.type_name()), ("false", "boolean"));
        assert_eq!(v.as_scalar(), Some(&Scalar::Boolean(false)));
        let (_, v) = raised(isle.eval::<()>("error(print)"));
        assert_eq!(v.type_name(), "function");
        assert!(v.as_scalar().is_none() && v.fields().is_empty());
        // Numbers: a value from Lua 5.3 on; 5.1, 5.2, LuaJIT and Luau make
        // them a positioned string, as their own `error` does.
        let r = isle.eval::<()>("error(42)");
        if cfg!(any(
            feature = "lua51",
            feature = "lua52",
            feature = "luajit",
            feature = "luau"
        )) {
            assert!(lua_error(r).value().is_none());
        } else {
            let (e, v) = raised(r);
            assert_eq!(
                (e.message(), v.as_scalar()),
                ("42", Some(&Scalar::Integer(42)))
            );
        }
    });
}

#[test]
fn tostring_and_name_give_the_text() {
    within("__tostring", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (e, v) = raised(isle.eval::<()>(
            "error(setmetatable({ code = 7 }, { __tostring = function(t) return 'E' .. t.code end }))",
        ));
        assert_eq!((e.message(), v.text()), ("E7", "E7"));
        assert_eq!(v.field("code"), Some(&Scalar::Integer(7)));
        // Luau's `tostring` does not read `__name`.
        #[cfg(not(feature = "luau"))]
        {
            let (e, v) =
                raised(isle.eval::<()>("error(setmetatable({}, { __name = 'AppError' }))"));
            assert!(v.text().starts_with("AppError: "), "{v:?}");
            assert_eq!(e.message(), v.text());
        }
    });
}

#[test]
fn a_swallowed_value_is_not_blamed_for_a_later_error() {
    within("swallowed", || {
        fronts().init(init_paths).each(|front| {
            let e = lua_error(front.eval::<()>("pcall(fail) local t = nil; t.x = 1"));
            assert!(e.value().is_none(), "{front}: {e:?}");
            // Nor is another request's, even if its text is the message.
            let fails = "local t = nil; t.x = 1";
            let message = lua_error(front.eval::<()>(fails)).message().to_string();
            let fake =
                format!("setmetatable({{}}, {{ __tostring = function() return {message:?} end }})");
            let swallow = format!("return (pcall(error, {fake}))");
            assert_eq!(front.eval::<bool>(&swallow), Ok(false), "{front}");
            let e = lua_error(front.eval::<()>(fails));
            assert_eq!(e.message(), message);
            assert!(e.value().is_none(), "{front}: {e:?}");
        });
    });
}

#[test]
fn nested_tables_are_left_out_of_the_fields() {
    within("nested", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (e, v) = raised(isle.eval::<()>("error({ 'first', code = 1, detail = { a = 1 } })"));
        assert_eq!(
            v.fields(),
            [
                (FieldKey::Index(1), Scalar::String("first".into())),
                (FieldKey::Name("code".into()), Scalar::Integer(1)),
            ]
        );
        assert!(!v.is_complete());
        assert_eq!(e.message(), r#"{[1] = "first", code = 1, …}"#);
    });
}

// ===== hostile values =====

#[test]
fn a_table_with_a_million_fields_is_read_within_bounds() {
    within("a million fields", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (e, v) = raised(
            isle.eval::<()>("local t = {} for i = 1, 1000000 do t['k' .. i] = i end error(t)"),
        );
        assert!(v.fields().len() <= 64, "{}", v.fields().len());
        assert!(v.is_truncated() && !v.is_complete());
        assert!(e.message().len() < 4096, "{}", e.message().len());
        assert!(e.message().ends_with(", …}"), "{}", e.message());
    });
}

#[test]
fn huge_strings_are_cut() {
    within("huge strings", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (_, v) = raised(
            isle.eval::<()>("local s = string.rep('x', 16777216) error({ [s] = s, msg = s })"),
        );
        assert!(v.is_truncated());
        for (k, s) in v.fields() {
            if let FieldKey::Name(k) = k {
                assert!(k.len() <= 260, "{}", k.len());
            }
            if let Scalar::String(s) = s {
                assert!(s.len() <= 260, "{}", s.len());
            }
        }
        let (e, v) = raised(isle.eval::<()>(
            "error(setmetatable({}, { __tostring = function() return string.rep('y', 1048576) end }))",
        ));
        assert!(v.text().len() <= 1030 && v.is_truncated());
        assert_eq!(e.message().len(), 1 << 20, "the message is mlua's, whole");
    });
}

#[test]
fn deep_and_cyclic_tables_resolve() {
    within("deep and cyclic", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (_, v) = raised(isle.eval::<()>(
            "local t = {} local c = t for i = 1, 100000 do c.n = {} c = c.n end error(t)",
        ));
        assert!(v.fields().is_empty() && !v.is_complete());
        let (_, v) = raised(isle.eval::<()>("local t = { a = 1 } t.self = t error(t)"));
        assert_eq!(v.field("a"), Some(&Scalar::Integer(1)));
    });
}

#[test]
fn metamethod_traps_are_not_consulted() {
    within("traps", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        let (e, v) = raised(isle.eval::<()>(
            "local mt = { __index = function() while true do end end, \
                          __pairs = function() while true do end end, \
                          __len = function() while true do end end, \
                          __eq = function() error('eq') end } \
             error(setmetatable({ code = 42, msg = 'no' }, mt))",
        ));
        code_42(&v);
        assert_eq!(e.message(), r#"{code = 42, msg = "no"}"#);
    });
}

#[test]
fn a_failing_tostring_still_resolves() {
    within("failing __tostring", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        for tostring in [
            "function() error('in tostring') end",
            "function() error({ nested = true }) end",
            "function() return {} end",
        ] {
            let e = lua_error(isle.eval::<()>(&format!(
                "error(setmetatable({{ code = 1 }}, {{ __tostring = {tostring} }}))"
            )));
            assert_eq!(e.kind(), LuaErrorKind::Runtime, "{tostring}: {e:?}");
            assert_eq!(isle.eval::<i64>("return 2"), Ok(2));
        }
    });
}

#[test]
fn a_looping_tostring_is_stopped() {
    within("looping __tostring", || {
        let (tx, rx) = crossbeam_channel::unbounded();
        let isle = Isle::spawn(move |lua| common::register_signal(lua, "looping", tx)).unwrap();
        // Loops when mlua asks for the message.
        let task = isle
            .spawn_eval::<()>(
                "error(setmetatable({}, { __tostring = function() while true do end end }))",
            )
            .timeout(Duration::from_millis(50));
        assert_eq!(task.wait(), Err(IsleError::Timeout));
        // Loops only when read for the value, inside the request: the
        // same stop machinery ends it.
        let second_time_loops = "local n = 0 \
             error(setmetatable({}, { __tostring = function() \
                 n = n + 1 if n > 1 then looping() while true do end end return 'once' end }))";
        let task = isle
            .spawn_eval::<()>(second_time_loops)
            .timeout(Duration::from_millis(50));
        assert_eq!(task.wait(), Err(IsleError::Timeout));
        common::expect_msg(&rx, "the first loop");
        let task = isle.spawn_eval::<()>(second_time_loops);
        common::expect_msg(&rx, "the second loop");
        task.cancel();
        assert_eq!(task.wait(), Err(IsleError::Cancelled));
        assert_eq!(isle.eval::<i64>("return 3"), Ok(3));
    });
}

struct Thing;
impl mlua::UserData for Thing {}

#[test]
fn userdata_and_sandbox_views_are_read_safely() {
    within("userdata and views", || {
        let isle = Isle::builder()
            .sandbox(true)
            .spawn(|lua| {
                lua.globals().set("thing", Thing)?;
                lua.load("shared = { a = 1, nested = { b = 2 } }").exec()
            })
            .unwrap();
        let (_, v) = raised(isle.eval::<()>("error(thing)"));
        assert_eq!(v.type_name(), "userdata");
        let (_, v) = raised(isle.eval::<()>("error(shared)"));
        assert_eq!(v.type_name(), "table");
        let (_, v) = raised(isle.eval::<()>("error(shared.nested)"));
        assert_eq!(v.type_name(), "table");
        assert_eq!(isle.eval::<i64>("return shared.a + shared.nested.b"), Ok(3));
    });
}

#[cfg(feature = "async")]
#[test]
fn the_value_survives_a_suspended_request() {
    within("suspended", || {
        fronts()
            .init(|lua| {
                common::set_yield_once(lua, "pause")?;
                init_paths(lua)
            })
            .each(|front| {
                let (_, v) = raised(front.eval::<()>("pause() fail()"));
                code_42(&v);
                let (_, v) = raised(front.eval::<()>("local ok, e = pcall(fail) pause() error(e)"));
                code_42(&v);
            });
    });
}

#[cfg(feature = "serde")]
mod with_serde {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Deserialize)]
    struct AppError {
        code: u16,
        msg: String,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[test]
    fn the_value_as_serde_data() {
        within("serde value", || {
            fronts().each(|front| {
                let (_, v) = raised(front.eval::<()>(
                    "error({ code = 404, msg = 'gone', tags = { 'a', 'b' }, extra = { n = 1.5 } })",
                ));
                assert_eq!(
                    *v.serde_value(),
                    serde_json::json!({
                        "code": 404, "msg": "gone", "tags": ["a", "b"], "extra": { "n": 1.5 }
                    }),
                    "{front}"
                );
                let app: AppError = v.deserialize().unwrap();
                assert_eq!(app.tags, ["a", "b"]);
                assert_eq!((app.code, app.msg.as_str()), (404, "gone"));
                let err = v.deserialize::<Vec<u8>>().unwrap_err();
                let lua = err.as_lua().unwrap();
                assert_eq!(lua.kind(), LuaErrorKind::Conversion);
                assert!(lua.message().contains("Vec<u8>"), "{err}");
            });
        });
    }

    #[test]
    fn cycles_and_depth_are_bounded() {
        within("serde bounds", || {
            let isle = Isle::spawn(|_| Ok(())).unwrap();
            let (_, v) = raised(isle.eval::<()>("local t = { a = 1 } t.self = t error(t)"));
            assert_eq!(
                *v.serde_value(),
                serde_json::json!({ "a": 1, "self": "<cycle>" })
            );
            assert!(v.is_truncated());
            let (_, v) = raised(isle.eval::<()>(
                "local t = {} local c = t for i = 1, 100000 do c.n = {} c = c.n end error(t)",
            ));
            let mut depth = 0;
            let mut at = v.serde_value();
            while let Some(next) = at.get("n") {
                depth += 1;
                at = next;
            }
            assert!(depth <= 8, "{depth}");
            assert_eq!(*at, serde_json::json!("<too deep>"));
            let (_, v) = raised(
                isle.eval::<()>("local t = {} for i = 1, 1000000 do t[i] = { i } end error(t)"),
            );
            assert!(v.is_truncated());
            let (_, v) = raised(isle.eval::<()>("error({ f = print, [true] = 1 })"));
            assert_eq!(*v.serde_value(), serde_json::json!({ "f": "<function>" }));
            assert_eq!(
                *raised(isle.eval::<()>("error(nil)")).1.serde_value(),
                serde_json::Value::Null
            );
        });
    }
}
