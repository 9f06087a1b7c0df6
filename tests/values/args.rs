//! Values in: `eval_with` (arguments a chunk sees as `...`), named chunks
//! (`Chunk::name`: positions and tracebacks under the caller's name), and
//! `call` of paths (`string.upper`, `a.b.c`, `obj:get`) and callable values,
//! on every front (isle, unkeyed pool, session).

use crate::common;

use std::cell::RefCell;
use std::time::Duration;

use common::front::{fronts, Fronts};
use common::{expect_msg, register_signal, within};
use mlua_isle::mlua::{Lua, MetaMethod, UserData, UserDataMethods};
use mlua_isle::{Chunk, Isle, IsleError, IslePool, LuaError, LuaErrorKind};

fn lua_err(r: Result<impl std::fmt::Debug, IsleError>) -> LuaError {
    match r {
        Err(IsleError::Lua(e)) => e,
        other => panic!("expected IsleError::Lua, got {other:?}"),
    }
}

// ===== arguments =====

#[test]
fn arguments_are_the_chunks_dots() {
    fronts().each(|front| {
        assert_eq!(front.eval_with::<i64>("... * 2", 21), Ok(42), "{front}");
        assert_eq!(
            front.eval_with::<i64>("return ... * 2", 4),
            Ok(8),
            "{front}"
        );
        assert_eq!(
            front.eval_with::<String>("local a, b = ... return a .. b", ("x", "y")),
            Ok("xy".to_string()),
            "{front}"
        );
        // Every argument, nils included; none at all.
        assert_eq!(
            front.eval_with::<i64>("select('#', ...)", (1, None::<i64>, 3)),
            Ok(3),
            "{front}"
        );
        assert_eq!(
            front.eval_with::<i64>("select('#', ...)", ()),
            Ok(0),
            "{front}"
        );
        assert_eq!(front.eval::<i64>("select('#', ...)"), Ok(0), "{front}");
        // Several results, and a table argument.
        assert_eq!(
            front.eval_with::<(i64, String)>("local t = ... return #t, t[2]", vec!["a", "b"]),
            Ok((2, "b".to_string())),
            "{front}"
        );
        let task = front.spawn_eval_with::<i64>("local n = ... return n + 1", 1);
        assert_eq!(task.wait(), Ok(2), "{front}");
        // A named chunk takes arguments too.
        let named = Chunk::new("... + 1").name("@inc.lua");
        assert_eq!(front.eval_with::<i64>(&named, 1), Ok(2), "{front}");
        assert_eq!(front.eval_with::<i64>(named, 2), Ok(3), "{front}");
    });
}

#[test]
fn a_permit_takes_arguments_and_paths_too() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let pool = IslePool::builder().workers(1).build().unwrap();
    let s = pool.session("p");
    assert_eq!(
        isle.try_reserve().unwrap().eval_with::<i64>("... + 1", 1),
        Ok(2)
    );
    assert_eq!(
        pool.try_reserve().unwrap().eval_with::<i64>("... + 1", 2),
        Ok(3)
    );
    assert_eq!(
        s.try_reserve()
            .unwrap()
            .spawn_eval_with::<i64>("... + 1", 3)
            .wait(),
        Ok(4)
    );
    assert_eq!(
        s.try_reserve().unwrap().call::<String>("string.upper", "p"),
        Ok("P".into())
    );
    isle.shutdown().unwrap();
    pool.shutdown().unwrap();
}

/// `chunk_id()`: the address of the Lua function that called it (a
/// compiled chunk). Each function is kept alive, so no two distinct
/// functions ever share an address.
fn with_chunk_id(fronts: Fronts) -> Fronts {
    fronts.init(|lua| {
        let keep = RefCell::new(Vec::new());
        let f = lua.create_function(move |lua, ()| {
            let caller = lua
                .inspect_stack(1, |d| d.function())
                .expect("called from a chunk");
            let id = caller.to_pointer() as usize as i64;
            keep.borrow_mut().push(caller);
            Ok(id)
        })?;
        lua.globals().set("chunk_id", f)
    })
}

#[test]
fn eval_with_arguments_shares_the_cached_chunk_of_plain_eval() {
    with_chunk_id(fronts()).each(|front| {
        // Not a tail call: the chunk's frame is still there when asked.
        let src = "local id = chunk_id() return id";
        let plain = front.eval::<i64>(src).unwrap();
        assert_eq!(front.eval::<i64>(src), Ok(plain), "{front}");
        for arg in 0..3 {
            assert_eq!(front.eval_with::<i64>(src, arg), Ok(plain), "{front}");
        }
        assert_eq!(front.eval_with::<i64>(src, ("a", 2)), Ok(plain), "{front}");
        // One compile for a `Chunk` made once, evaluated many times...
        let chunk = Chunk::new(src).name("=ids");
        let named = front.eval::<i64>(&chunk).unwrap();
        assert_eq!(front.eval_with::<i64>(&chunk, 1), Ok(named), "{front}");
        assert_eq!(
            front.eval_with::<i64>(chunk.clone(), 2),
            Ok(named),
            "{front}"
        );
        // ...but a name is part of the key.
        assert_ne!(named, plain, "{front}");
    });
}

#[test]
fn an_argument_is_data_never_source() {
    fronts().each(|front| {
        let hostile = "'); os.exit(1); ('";
        assert_eq!(
            front.eval_with::<String>("...", hostile),
            Ok(hostile.to_string()),
            "{front}"
        );
        front
            .eval_with::<()>("stored = ...", "end end error('ran')")
            .unwrap();
        assert_eq!(
            front.eval::<String>("stored"),
            Ok("end end error('ran')".to_string()),
            "{front}"
        );
        // A string that looks like a number stays a string.
        assert_eq!(
            front.eval_with::<String>("type(...)", "1 + 1"),
            Ok("string".to_string()),
            "{front}"
        );
    });
}

#[test]
fn results_that_do_not_convert_are_conversion_errors_naming_the_type() {
    fronts().each(|front| {
        let e = lua_err(front.eval_with::<i64>("...", "abc"));
        assert_eq!(e.kind(), LuaErrorKind::Conversion, "{e:?} {front}");
        assert!(e.message().contains("i64"), "{e:?} {front}");
        assert!(e.message().contains("string"), "{e:?} {front}");
        let e = lua_err(front.eval_with::<Vec<String>>("...", 5));
        assert_eq!(e.kind(), LuaErrorKind::Conversion, "{e:?} {front}");
        let e = lua_err(front.call::<i64>("string.upper", "x"));
        assert_eq!(e.kind(), LuaErrorKind::Conversion, "{e:?} {front}");
        assert!(e.message().contains("i64"), "{e:?} {front}");
        // The VM carries on.
        assert_eq!(front.eval_with::<i64>("...", 7), Ok(7), "{front}");
    });
}

// ===== chunk names =====

#[test]
fn a_named_chunk_reports_positions_and_tracebacks_under_its_name() {
    fronts().each(|front| {
        let src =
            "local total = ...\n\nif total < 0 then error('negative total') end\nreturn total";
        let file = Chunk::new(src).name("@handlers/checkout.lua");
        assert_eq!(front.eval_with::<i64>(&file, 5), Ok(5), "{front}");
        let e = lua_err(front.eval_with::<i64>(&file, -1));
        assert_eq!(e.kind(), LuaErrorKind::Runtime, "{e:?} {front}");
        assert!(
            e.message()
                .starts_with("handlers/checkout.lua:3: negative total"),
            "{e:?} {front}"
        );
        let tb = e.traceback().expect("a traceback");
        assert!(tb.contains("handlers/checkout.lua:3"), "{tb} {front}");

        let e = lua_err(front.eval::<()>(Chunk::new("\nerror('x')").name("=label")));
        assert!(e.message().starts_with("label:2: x"), "{e:?} {front}");
        // Neither prefix: taken as a label.
        let e = lua_err(front.eval::<()>(Chunk::new("error('x')").name("plain")));
        assert!(e.message().starts_with("plain:1: x"), "{e:?} {front}");
        // The default stays `eval`.
        let e = lua_err(front.eval::<()>("error('x')"));
        assert!(e.message().starts_with("eval:1: x"), "{e:?} {front}");
        let e = lua_err(front.eval::<()>(Chunk::new("error('x')").name("")));
        assert!(e.message().starts_with("eval:1: x"), "{e:?} {front}");
        // Syntax errors too.
        let e = lua_err(front.eval::<()>(Chunk::new("x = = 1").name("@bad.lua")));
        assert_eq!(e.kind(), LuaErrorKind::Syntax, "{e:?} {front}");
        assert!(e.message().contains("bad.lua:1:"), "{e:?} {front}");
    });
}

#[test]
fn hostile_names_stay_one_line_and_cannot_fake_errors() {
    fronts().each(|front| {
        // A newline or NUL would start a new line in messages (or make the
        // name unusable): they become `?`.
        let e =
            lua_err(front.eval::<()>(Chunk::new("error('x')").name("=a\nstack traceback:\n\0b")));
        assert!(
            e.message().starts_with("a?stack traceback:??b:1: x"),
            "{e:?} {front}"
        );
        // A long name: Lua cuts it; still a Lua error with its message.
        let long = format!("@{}/end.lua", "d".repeat(5000));
        let e = lua_err(front.eval::<()>(Chunk::new("error('x')").name(&long)));
        assert!(e.message().contains("end.lua:1: x"), "{e:?} {front}");
        let e = lua_err(front.eval::<()>(Chunk::new("error('x')").name("=".repeat(5000))));
        assert!(e.message().ends_with(":1: x"), "{e:?} {front}");
        // A name that reads like a position and a memory error does not
        // make a plain error a memory one.
        let e =
            lua_err(front.eval::<()>(Chunk::new("error('boom')").name("=x:1: not enough memory")));
        assert!(e.message().ends_with(":1: boom"), "{e:?} {front}");
        let e = lua_err(front.eval::<()>(
            Chunk::new("error('not enough memory!')").name("=y:12: not enough memory"),
        ));
        assert_eq!(e.kind(), LuaErrorKind::Runtime, "{e:?} {front}");
        assert_eq!(front.eval::<i64>("1"), Ok(1), "{front}");
    });
}

#[test]
fn a_memory_error_rethrown_under_a_strange_name_is_still_one() {
    const MB: usize = 1 << 20;
    // `error(e)` puts the chunk's position in front of Lua's memory error.
    let src = "local ok, e = pcall(function() local t = {} for i = 1, 1e8 do t[i] = i end end)\n\
               assert(not ok)\nerror(e)";
    fronts().memory_limit(4 * MB).each(|front| {
        for name in ["=a\nb", "=a: b:7: c", "@x:1:", "plain name"] {
            let r = front.eval::<()>(Chunk::new(src).name(name));
            assert!(
                matches!(r, Err(IsleError::MemoryLimit(_))),
                "{name:?}: {r:?} {front}"
            );
        }
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2), "{front}");
    });
}

// ===== call paths =====

const PATHS_INIT: &str = r#"
    obj = { n = 41 }
    function obj:get(k) return self.n + k end
    a = { b = { c = function(x) return x * 3 end, obj = obj } }
    callable = setmetatable({ tag = 'me' }, { __call = function(self, x) return self.tag .. x end })
    obj.called = callable
    obj.cm = setmetatable({ tag = 'm' }, { __call = function(m, o, x) return m.tag .. o.n .. x end })
    -- A `__call` that is itself callable: (inner, outer, args...).
    chain = setmetatable({ tag = 'outer' }, { __call = setmetatable({ tag = 'inner' }, {
        __call = function(inner, outer, x) return inner.tag .. '/' .. outer.tag .. '/' .. x end }) })
    proxy = setmetatable({}, { __index = function(_, k) return function(x) return k .. x end end })
    greeting = 'hi'
    function deep_chain(n)
        local f = function(...) return select('#', ...) end
        for _ = 1, n do f = setmetatable({}, { __call = f }) end
        return f
    end
    chain5, chain20 = deep_chain(5), deep_chain(20)
"#;

struct Counter(i64);

impl UserData for Counter {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get", |_, this, k: i64| Ok(this.0 + k));
        methods.add_meta_method(MetaMethod::Call, |_, this, k: i64| Ok(this.0 * k));
    }
}

fn path_fronts() -> Fronts {
    fronts().init(|lua: &Lua| {
        lua.load(PATHS_INIT).exec()?;
        lua.globals().set("counter", Counter(10))
    })
}

#[test]
fn call_takes_dotted_paths_and_methods() {
    path_fronts().each(|front| {
        assert_eq!(
            front.call::<String>("string.upper", "abc"),
            Ok("ABC".into()),
            "{front}"
        );
        assert_eq!(front.call::<i64>("a.b.c", 2), Ok(6), "{front}");
        assert_eq!(front.call::<i64>("obj:get", 1), Ok(42), "{front}");
        assert_eq!(front.call::<i64>("a.b.obj:get", 2), Ok(43), "{front}");
        // `__index` is honoured on the way.
        assert_eq!(
            front.call::<String>("proxy.hello", "!"),
            Ok("hello!".into()),
            "{front}"
        );
        // A string's methods, through its metatable.
        assert_eq!(
            front.call::<String>("greeting:upper", ()),
            Ok("HI".into()),
            "{front}"
        );
        assert_eq!(
            front.call::<String>("greeting:sub", (2, 2)),
            Ok("i".into()),
            "{front}"
        );
        // Userdata: a method, and its `__call`.
        assert_eq!(front.call::<i64>("counter:get", 1), Ok(11), "{front}");
        assert_eq!(front.call::<i64>("counter", 3), Ok(30), "{front}");
        // Plain globals still work, spawned too.
        assert_eq!(front.spawn_call::<i64>("a.b.c", 3).wait(), Ok(9), "{front}");
        assert_eq!(
            front.call::<String>("tostring", 5),
            Ok("5".into()),
            "{front}"
        );
    });
}

#[test]
fn callable_tables_are_called_as_lua_calls_them() {
    path_fronts().each(|front| {
        assert_eq!(
            front.call::<String>("callable", "!"),
            Ok("me!".into()),
            "{front}"
        );
        assert_eq!(
            front.call::<String>("obj.called", "?"),
            Ok("me?".into()),
            "{front}"
        );
        // A method that is a callable table: __call(method, obj, args...).
        assert_eq!(
            front.call::<String>("obj:cm", "!"),
            Ok("m41!".into()),
            "{front}"
        );
        assert_eq!(
            front.call::<String>("chain", "x"),
            Ok("inner/outer/x".into()),
            "{front}"
        );
        // Five levels: the function sees the five callables and the argument.
        assert_eq!(front.call::<i64>("chain5", 1), Ok(6), "{front}");
        let e = lua_err(front.call::<i64>("chain20", 1));
        assert!(e.message().contains("`chain20`"), "{e:?} {front}");
        assert!(e.message().contains("__call"), "{e:?} {front}");
    });
}

#[test]
fn a_session_resolves_its_own_names_first() {
    let pool = IslePool::builder().workers(1).build().unwrap();
    let s = pool.session("t");
    s.eval::<()>("mine = { f = function(x) return 'mine ' .. x end }")
        .unwrap();
    assert_eq!(s.call::<String>("mine.f", 1), Ok("mine 1".into()));
    assert_eq!(s.call::<String>("string.upper", "s"), Ok("S".into()));
    // Unkeyed work does not see it.
    assert_eq!(
        pool.call::<String>("mine.f", 1),
        Err(IsleError::NotFound("mine".into()))
    );
    pool.shutdown().unwrap();
}

#[test]
fn pool_map_takes_a_path() {
    let pool = IslePool::builder()
        .workers(2)
        .init(|lua| lua.load(PATHS_INIT).exec())
        .build()
        .unwrap();
    assert_eq!(
        pool.map::<i64, i64>("a.b.c", 1..=4),
        vec![Ok(3), Ok(6), Ok(9), Ok(12)]
    );
    assert_eq!(
        pool.map::<i64, i64>("obj:get", [1, 2]),
        vec![Ok(42), Ok(43)]
    );
    assert_eq!(
        pool.map::<String, String>("callable", ["a".to_string()]),
        vec![Ok("mea".to_string())]
    );
    assert!(pool
        .map::<i64, i64>("a.nope", [1, 2])
        .iter()
        .all(|r| *r == Err(IsleError::NotFound("a.nope".into()))));
    pool.shutdown().unwrap();
}

#[test]
fn a_missing_name_is_not_found_up_to_that_name() {
    path_fronts().each(|front| {
        for (path, missing) in [
            ("nope", "nope"),
            ("nope.x.y", "nope"),
            ("string.nope", "string.nope"),
            ("a.b.nope.c", "a.b.nope"),
            ("obj:nope", "obj:nope"),
            ("nope:get", "nope"),
        ] {
            let r = front.call::<()>(path, ());
            assert_eq!(
                r,
                Err(IsleError::NotFound(missing.into())),
                "{path} {front}"
            );
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains(&format!("`{missing}`")), "{msg} {front}");
        }
    });
}

#[test]
fn a_path_through_or_to_a_wrong_value_says_what_it_found() {
    path_fronts().each(|front| {
        let e = lua_err(front.call::<()>("obj.n.x", ()));
        assert!(e.message().contains("`obj.n.x`"), "{e:?} {front}");
        assert!(e.message().contains("`obj.n` is a number"), "{e:?} {front}");
        let e = lua_err(front.call::<()>("obj.n", ()));
        assert!(e.message().contains("`obj.n`"), "{e:?} {front}");
        assert!(e.message().contains("not a function"), "{e:?} {front}");
        assert!(e.message().contains("number"), "{e:?} {front}");
        let e = lua_err(front.call::<()>("greeting", ()));
        assert!(e.message().contains("not a function"), "{e:?} {front}");
        assert!(e.message().contains("string"), "{e:?} {front}");
        let e = lua_err(front.call::<()>("obj:n", ()));
        assert!(e.message().contains("not a function"), "{e:?} {front}");
        // A number has no methods.
        let e = lua_err(front.call::<()>("obj.n:x", ()));
        assert!(e.message().contains("`obj.n` is a number"), "{e:?} {front}");
    });
}

#[test]
fn a_malformed_path_is_refused_clearly() {
    path_fronts().each(|front| {
        for bad in ["", "a..b", "a.", ".a", "a:b:c", ":x", "obj:", "a:b.c"] {
            let e = lua_err(front.call::<()>(bad, ()));
            assert!(
                e.message().contains(&format!("invalid call path `{bad}`")),
                "{bad:?}: {e:?} {front}"
            );
        }
        assert_eq!(front.call::<i64>("a.b.c", 1), Ok(3), "{front}");
    });
}

#[test]
fn an_error_in_the_called_function_keeps_its_position() {
    fronts()
        .init(|lua| {
            lua.load("t = { f = function() error('inside') end }")
                .set_name("@lib.lua")
                .exec()
        })
        .each(|front| {
            let e = lua_err(front.call::<()>("t.f", ()));
            assert!(
                e.message().starts_with("lib.lua:1: inside"),
                "{e:?} {front}"
            );
        });
}

#[test]
fn paths_work_through_the_sandboxs_read_only_views() {
    let init = |lua: &Lua| {
        lua.load("cfg = { util = { twice = function(x) return 2 * x end } }")
            .exec()
    };
    let isle = Isle::builder().sandbox(true).init(init).build().unwrap();
    let pool = IslePool::builder()
        .workers(1)
        .sandbox(true)
        .init(init)
        .build()
        .unwrap();
    let s = pool.session("tenant");
    let fmt = ("%d", 7);
    assert_eq!(isle.call::<String>("string.format", fmt), Ok("7".into()));
    assert_eq!(pool.call::<String>("string.format", fmt), Ok("7".into()));
    assert_eq!(s.call::<String>("string.format", fmt), Ok("7".into()));
    assert_eq!(isle.call::<i64>("cfg.util.twice", 4), Ok(8));
    assert_eq!(pool.call::<i64>("cfg.util.twice", 4), Ok(8));
    assert_eq!(s.call::<i64>("cfg.util.twice", 4), Ok(8));
    s.eval::<()>("greet = 'hey'").unwrap();
    assert_eq!(s.call::<String>("greet:upper", ()), Ok("HEY".into()));
    assert_eq!(
        pool.call::<String>("greet:upper", ()),
        Err(IsleError::NotFound("greet".into()))
    );
    isle.shutdown().unwrap();
    pool.shutdown().unwrap();
}

#[test]
fn a_looping_index_on_the_path_is_stopped_by_cancel_and_time_limit() {
    common::front::each_kind(|kind| {
        let (tx, started) = crossbeam_channel::unbounded();
        let front = fronts()
            .init(move |lua| {
                register_signal(lua, "started", tx.clone())?;
                lua.load("trap = setmetatable({}, { __index = function() started() while true do end end })")
                    .exec()
            })
            .build(kind);
        within("a looping __index is cancelled", move || {
            let task = front.spawn_call::<()>("trap.x", ());
            expect_msg(&started, "the __index loop started");
            task.cancel();
            assert_eq!(task.wait(), Err(IsleError::Cancelled), "{front}");
            let task = front
                .spawn_call::<()>("trap:x", ())
                .timeout(Duration::from_millis(50));
            assert_eq!(task.wait(), Err(IsleError::Timeout), "{front}");
            // The VM serves on.
            assert_eq!(
                front.call::<String>("string.upper", "ok"),
                Ok("OK".into()),
                "{front}"
            );
        });
    });
}

// ===== suspended requests (the `async` feature) =====

#[cfg(feature = "async")]
#[test]
fn arguments_and_paths_reach_requests_that_suspend() {
    let init = |lua: &Lua| {
        lua.globals().set(
            "later",
            lua.create_async_function(|_, x: i64| async move {
                common::yield_once().await;
                Ok(x)
            })?,
        )?;
        lua.load(
            "box = { k = 10 } function box:add(x) return self.k + later(x) end \
             called = setmetatable({}, { __call = function(self, x) return later(x) * 2 end })",
        )
        .exec()
    };
    let pool = IslePool::builder().workers(2).init(init).build().unwrap();
    within("suspended requests with arguments and paths", move || {
        assert_eq!(pool.eval_with::<i64>("later(...) + 1", 1), Ok(2));
        assert_eq!(pool.call::<i64>("box:add", 5), Ok(15));
        assert_eq!(pool.call::<i64>("called", 4), Ok(8));
        // A batch goes on as one future after its first suspended input:
        // each later input still gets the object, or the callable, first.
        assert_eq!(
            pool.map::<i64, i64>("box:add", 1..=6),
            (11..=16).map(Ok).collect::<Vec<_>>()
        );
        assert_eq!(
            pool.map::<i64, i64>("called", 1..=6),
            (1..=6).map(|x| Ok(x * 2)).collect::<Vec<_>>()
        );
        pool.shutdown().unwrap();
    });
}
