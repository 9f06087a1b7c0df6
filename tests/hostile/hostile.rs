//! Hostile and odd scripts: each fails with a clear error (the right
//! `IsleError` variant, a message that says what went wrong), and the VM
//! serves the next request with its state intact. Checked on an isle and on
//! a pool session.
//!
//! Every request waits at most `PATIENCE`: a hang fails the test instead of
//! stalling the run. A script that could abort the process runs in a child
//! process (see `isolated`), so an abort fails one test, not the binary.

use crate::common;

use common::{in_child, PATIENCE};
use mlua_isle::mlua::{self, BString, FromLuaMulti};
use mlua_isle::{Isle, IsleError, IslePool, LuaError, LuaErrorKind, Session};

const MB: usize = 1 << 20;

/// Where a hostile script runs: an isle, or a session of a two-VM pool.
/// Both hold the global `kept`, set before the script, to show that the
/// VM's state survives it.
enum Target {
    Isle(Isle),
    Session(Session),
}

impl Target {
    fn isle(memory_limit: Option<usize>) -> Target {
        let mut b = Isle::builder();
        if let Some(limit) = memory_limit {
            b = b.memory_limit(limit);
        }
        Target::Isle(b.spawn(|lua| lua.globals().set("kept", "state")).unwrap())
    }

    fn session(memory_limit: Option<usize>) -> Target {
        let mut b = IslePool::builder().workers(2);
        if let Some(limit) = memory_limit {
            b = b.memory_limit(limit);
        }
        // The session keeps the pool alive.
        let session = b.build().unwrap().session("hostile");
        session.eval::<()>("kept = 'state'").unwrap();
        Target::Session(session)
    }

    /// An isle and a pool session, both with `memory_limit` if given.
    fn both(memory_limit: Option<usize>) -> [Target; 2] {
        [Target::isle(memory_limit), Target::session(memory_limit)]
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Isle(_) => "isle",
            Target::Session(_) => "pool session",
        }
    }

    /// Evaluates `code`, failing the test if it has not resolved after
    /// `PATIENCE`.
    fn eval<T: FromLuaMulti + Send + 'static>(
        &self,
        code: impl Into<mlua_isle::Chunk>,
    ) -> Result<T, IsleError> {
        let mut task = match self {
            Target::Isle(isle) => isle.spawn_eval(code),
            Target::Session(s) => s.spawn_eval(code),
        };
        task.wait_timeout(PATIENCE)
            .unwrap_or_else(|| panic!("{}: the request hung", self.name()))
    }

    /// The VM answers, and the state set before the hostile script is there.
    fn assert_serving(&self) {
        assert_eq!(self.eval::<i64>("1 + 1"), Ok(2), "{}", self.name());
        assert_eq!(
            self.eval::<String>("kept"),
            Ok("state".to_string()),
            "{}",
            self.name()
        );
    }
}

/// The Lua error of `r`, checked to be of `kind`.
#[track_caller]
fn lua_error<T: std::fmt::Debug>(r: Result<T, IsleError>, kind: LuaErrorKind) -> LuaError {
    match r {
        Err(IsleError::Lua(e)) if e.kind() == kind => e,
        other => panic!("expected a Lua error of kind {kind:?}, got {other:?}"),
    }
}

/// Checks that `r` is `MemoryLimit` with a message about memory.
#[track_caller]
fn assert_memory_limit<T: std::fmt::Debug>(r: Result<T, IsleError>) {
    match r {
        Err(IsleError::MemoryLimit(m)) => assert!(m.contains("memory"), "{m}"),
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
}

/// How the parser words an unexpected token and an unfinished string.
#[cfg(not(feature = "luau"))]
const SYNTAX_WORDING: [&str; 2] = ["unexpected symbol", "unfinished string"];
#[cfg(feature = "luau")]
const SYNTAX_WORDING: [&str; 2] = [
    "Expected identifier when parsing expression",
    "Malformed string",
];

#[test]
fn syntax_errors_are_syntax_errors_with_their_position() {
    let [unexpected, unfinished] = SYNTAX_WORDING;
    for t in Target::both(None) {
        let e = lua_error(t.eval::<()>("x = = 1"), LuaErrorKind::Syntax);
        assert!(e.message().starts_with("eval:1:"), "{e:?}");
        assert!(e.message().contains(unexpected), "{e:?}");
        let e = lua_error(
            t.eval::<()>("local a = 1\nlocal function f(\nreturn a end"),
            LuaErrorKind::Syntax,
        );
        assert!(e.message().starts_with("eval:3:"), "{e:?}");
        let e = lua_error(t.eval::<()>("return 'open"), LuaErrorKind::Syntax);
        assert!(e.message().contains(unfinished), "{e:?}");
        t.assert_serving();
    }
}

#[test]
fn error_with_a_table_is_a_runtime_error() {
    for t in Target::both(None) {
        // A plain table has no message: its fields make one, and the
        // table is kept (tests/values/error_values.rs).
        let e = lua_error(t.eval::<()>("error({code = 42})"), LuaErrorKind::Runtime);
        assert_eq!(e.message(), "{code = 42}", "{e:?}");
        assert!(e.value().is_some(), "{e:?}");
        // With `__tostring`, that is the message.
        let e = lua_error(
            t.eval::<()>(
                "error(setmetatable({}, {__tostring = function() return 'custom message' end}))",
            ),
            LuaErrorKind::Runtime,
        );
        assert_eq!(e.message(), "custom message");
        t.assert_serving();
    }
}

#[test]
fn error_with_nil_is_a_runtime_error() {
    for t in Target::both(None) {
        for code in ["error(nil)", "error()"] {
            let e = lua_error(t.eval::<()>(code), LuaErrorKind::Runtime);
            assert_eq!(e.message(), "nil", "{code}");
            assert!(
                e.traceback().is_some_and(|tb| tb.contains("error")),
                "{e:?}"
            );
        }
        t.assert_serving();
    }
}

#[test]
#[cfg(not(any(feature = "luajit", feature = "luau")))]
fn error_with_an_object_whose_tostring_fails_is_a_runtime_error() {
    for t in Target::both(None) {
        // The error raised by `__tostring` replaces the unprintable one.
        let e = lua_error(
            t.eval::<()>(
                "error(setmetatable({}, {__tostring = function() error('tostring exploded') end}))",
            ),
            LuaErrorKind::Runtime,
        );
        assert!(e.message().contains("tostring exploded"), "{e:?}");
        let e = lua_error(
            t.eval::<()>("error(setmetatable({}, {__tostring = function() return {} end}))"),
            LuaErrorKind::Runtime,
        );
        assert!(
            e.message().contains("'__tostring' must return a string"),
            "{e:?}"
        );
        let e = lua_error(
            t.eval::<()>(
                "error(setmetatable({}, {__tostring = function(self) return tostring(self) end}))",
            ),
            LuaErrorKind::Runtime,
        );
        assert!(e.message().contains("stack overflow"), "{e:?}");
        t.assert_serving();
    }
}

/// LuaJIT and Luau run the message handler (mlua's, which calls
/// `__tostring`) as an error handler: an error inside it is "error in error
/// handling". A `__tostring` that recurses overflows Luau's stack and fails
/// the same way; on LuaJIT it keeps failing there until a limit stops it.
#[test]
#[cfg(any(feature = "luajit", feature = "luau"))]
fn error_with_an_object_whose_tostring_fails_is_a_runtime_error() {
    const RECURSES: &str =
        "error(setmetatable({}, {__tostring = function(self) return tostring(self) end}))";
    for t in Target::both(None) {
        for code in [
            "error(setmetatable({}, {__tostring = function() error('tostring exploded') end}))",
            "error(setmetatable({}, {__tostring = function() return {} end}))",
        ] {
            let e = lua_error(t.eval::<()>(code), LuaErrorKind::Runtime);
            assert_eq!(e.message(), "error in error handling", "{e:?}");
        }
        #[cfg(feature = "luau")]
        {
            let e = lua_error(t.eval::<()>(RECURSES), LuaErrorKind::Runtime);
            assert_eq!(e.message(), "error in error handling", "{e:?}");
        }
        #[cfg(feature = "luajit")]
        {
            let r = match &t {
                Target::Isle(isle) => isle.spawn_eval::<()>(RECURSES),
                Target::Session(s) => s.spawn_eval::<()>(RECURSES),
            }
            .timeout(std::time::Duration::from_millis(50))
            .wait_timeout(PATIENCE)
            .expect("the request hung");
            assert_eq!(r, Err(IsleError::Timeout));
        }
        t.assert_serving();
    }
}

#[test]
fn an_error_object_whose_tostring_never_returns_is_stopped_by_the_limits() {
    const CODE: &str = "error(setmetatable({}, {__tostring = function() while true do end end}))";
    // Luau counts no instructions: only the time limit below applies.
    #[cfg(not(feature = "luau"))]
    {
        let isle = Isle::builder()
            .max_instructions(1_000_000)
            .spawn(|_| Ok(()))
            .unwrap();
        assert_eq!(isle.eval::<()>(CODE), Err(IsleError::InstructionLimit));
        assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
    }
    let t = Target::session(None);
    let Target::Session(s) = &t else {
        unreachable!()
    };
    let r = s
        .spawn_eval::<()>(CODE)
        .timeout(std::time::Duration::from_millis(50))
        .wait_timeout(PATIENCE)
        .expect("the request hung");
    assert_eq!(r, Err(IsleError::Timeout));
    t.assert_serving();
}

#[test]
fn runaway_recursion_is_a_stack_overflow_error() {
    const CODE: &str = "local function f() return 1 + f() end f()";
    for t in Target::both(None) {
        let e = lua_error(t.eval::<()>(CODE), LuaErrorKind::Runtime);
        // LuaJIT reports its stack overflow without a position.
        #[cfg(not(feature = "luajit"))]
        assert!(e.message().starts_with("eval:1:"), "{e:?}");
        assert!(e.message().contains("stack overflow"), "{e:?}");
        t.assert_serving();
    }
    // Lua's stack (up to a million slots) needs tens of MB: under a smaller
    // limit the memory runs out first. (LuaJIT's 65500 slots need 1 MB;
    // Luau stops at 20000 calls, long before 16 MB; Lua 5.1's stack stops
    // far sooner.)
    #[cfg(not(any(feature = "luajit", feature = "luau", feature = "lua51")))]
    for t in Target::both(Some(16 * MB)) {
        assert_memory_limit(t.eval::<()>(CODE));
        t.assert_serving();
    }
}

#[test]
fn deep_nesting_through_pcall_reaches_the_c_stack_limit() {
    // The innermost pcall fails with the overflow; every level above
    // returns what the one below returned: the error message.
    const CODE: &str = "local depth = 0
        local function f()
            depth = depth + 1
            local _, err = pcall(f)
            return err
        end
        return f(), depth";
    for t in Target::both(None) {
        let (err, depth) = t.eval::<(String, i64)>(CODE).unwrap();
        assert!(err.contains("stack overflow"), "{err}");
        // LuaJIT's pcall uses no C stack: its Lua stack (65500 slots) runs
        // out instead, thousands of levels deep. So does Luau's inside a
        // coroutine, where requests run with the `async` feature.
        #[cfg(not(any(feature = "luajit", all(feature = "luau", feature = "async"))))]
        assert!((100..1000).contains(&depth), "{depth}");
        #[cfg(any(feature = "luajit", all(feature = "luau", feature = "async")))]
        assert!((1000..65_500).contains(&depth), "{depth}");
        t.assert_serving();
    }
}

#[test]
fn deep_nesting_through_pcall_returning_every_level_is_an_error_not_a_crash() {
    in_child(
        "deep_nesting_through_pcall_returning_every_level_is_an_error_not_a_crash",
        || {
            for t in Target::both(None) {
                // `return pcall(f)` hands every level's results up: about 200.
                assert_eq!(
                    t.eval::<()>("local function f() return pcall(f) end f()"),
                    Ok(())
                );
                t.assert_serving();
            }
        },
    );
}

#[test]
fn pcall_of_a_function_returning_many_values_works() {
    in_child("pcall_of_a_function_returning_many_values_works", || {
        for t in Target::both(None) {
            #[cfg(not(feature = "lua51"))]
            let code = "local t = {} for i = 1, 30 do t[i] = i end
                        local unpack = table.unpack or unpack -- LuaJIT: 5.1's
                        return select('#', pcall(unpack, t)),
                               select('#', xpcall(unpack, print, t))";
            // Lua 5.1: `unpack`, and xpcall passes no arguments.
            #[cfg(feature = "lua51")]
            let code = "local t = {} for i = 1, 30 do t[i] = i end
                        return select('#', pcall(unpack, t)),
                               select('#', xpcall(function() return unpack(t) end, print))";
            assert_eq!(t.eval::<(i64, i64)>(code), Ok((31, 31)));
            t.assert_serving();
        }
    });
}

#[test]
fn errors_blamed_on_pcall_carry_no_position() {
    for t in Target::both(None) {
        for (code, want) in [
            ("return select(2, pcall(error, 'msg'))", "msg"),
            (
                "local function check(x) if not x then error('bad x', 2) end end
                 return select(2, pcall(check, nil))",
                "bad x",
            ),
            // (Lua 5.1's xpcall passes no arguments.)
            #[cfg(not(feature = "lua51"))]
            (
                "return select(2, xpcall(error, function(e) return e end, 'msg'))",
                "msg",
            ),
        ] {
            assert_eq!(t.eval::<String>(code), Ok(want.to_string()), "{code}");
        }
    }
}

#[test]
#[cfg_attr(feature = "lua51", ignore = "Lua 5.1 cannot yield across pcall")]
fn a_coroutine_can_yield_inside_pcall() {
    for t in Target::both(None) {
        for protect in [
            "pcall(coroutine.yield, 1)",
            "xpcall(coroutine.yield, function(e) return e end, 1)",
        ] {
            let code = format!(
                "local co = coroutine.wrap(function()
                     local ok, v = {protect}
                     return tostring(ok) .. ' ' .. tostring(v)
                 end)
                 local first = co()
                 if first ~= 1 then return 'did not yield: ' .. tostring(first) end
                 return co(2)"
            );
            assert_eq!(
                t.eval::<String>(code),
                Ok("true 2".to_string()),
                "{protect}"
            );
        }
        t.assert_serving();
    }
}

#[test]
fn deep_nesting_through_gsub_callbacks_is_a_c_stack_overflow_error() {
    // Lua 5.5's traceback names it "field 'gsub'".
    // (Lua 5.2: "function 'gsub'"; Luau: "function 'gsub'".)
    const GSUB_IN_TRACEBACK: &str = if cfg!(feature = "lua55") {
        "field 'gsub'"
    } else if cfg!(any(feature = "lua52", feature = "luau")) {
        "'gsub'"
    } else {
        "string.gsub"
    };
    const CODE: &str = "local function f(s) return (string.gsub(s, '.', f)) end f('x')";
    // (LuaJIT would overflow the real stack without `vm/cstack.rs`.)
    in_child(
        "deep_nesting_through_gsub_callbacks_is_a_c_stack_overflow_error",
        || {
            for t in Target::both(None) {
                let e = lua_error(t.eval::<()>(CODE), LuaErrorKind::Runtime);
                assert!(e.message().contains("C stack overflow"), "{e:?}");
                assert!(
                    e.traceback()
                        .is_some_and(|tb| tb.contains(GSUB_IN_TRACEBACK)),
                    "{e:?}"
                );
                // Through coroutines, the same limit.
                let e = lua_error(
                    t.eval::<()>("local function f() return coroutine.wrap(f)() end f()"),
                    LuaErrorKind::Runtime,
                );
                assert!(e.message().contains("C stack overflow"), "{e:?}");
                t.assert_serving();
            }
        },
    );
}

#[test]
fn deep_nesting_through_any_library_callback_is_an_error_not_a_crash() {
    // Each nests C functions that call back into Lua, some with no Lua code
    // in between (a sort comparing with `table.sort`, a `__tostring` that is
    // `print`). LuaJIT counts no C calls: without the guard of `vm/cstack.rs`
    // every one of these kills the process (SIGSEGV).
    in_child(
        "deep_nesting_through_any_library_callback_is_an_error_not_a_crash",
        || {
            // Lua 5.1's and Luau's `string.format` call no `__tostring`.
            const FORMAT: &str = if cfg!(any(feature = "lua51", feature = "luau")) {
                "string expected"
            } else {
                "C stack overflow"
            };
            // LuaJIT: the comparators' Lua stack runs out first; and readers
            // run from Lua there (`vm/cstack.rs`), so they nest Lua calls.
            const LUA_STACK_ON_LUAJIT: &str = if cfg!(feature = "luajit") {
                "stack overflow"
            } else {
                "C stack overflow"
            };
            let cases = [
                (
                    "local t = {} t[1] = table.sort t[2] = t table.sort(t, table.sort)",
                    "C stack overflow",
                ),
                (
                    "print(setmetatable({}, { __tostring = print }))",
                    "C stack overflow",
                ),
                (
                    "local t t = setmetatable({}, { __tostring = function()
                         return string.format('%s', t)
                     end })
                     return string.format('%s', t)",
                    FORMAT,
                ),
                (
                    "local function f(a, b) table.sort({3, 2, 1}, f) return a < b end
                     table.sort({3, 2, 1}, f)",
                    LUA_STACK_ON_LUAJIT,
                ),
                // `os.time` reads its table through `__index` (Luau's reads
                // it raw: "field 'day' missing").
                (
                    "local mt = {}
                     mt.__index = function() return os.time(setmetatable({}, mt)) end
                     os.time(setmetatable({}, mt))",
                    if cfg!(feature = "luau") {
                        "missing"
                    } else {
                        "C stack overflow"
                    },
                ),
                (
                    "local function f()
                         local ok, e = coroutine.resume(coroutine.create(f))
                         if not ok then error(e, 0) end
                     end
                     f()",
                    "C stack overflow",
                ),
                // Every level prefixes its position to the message.
                (
                    "local function f() local co = coroutine.wrap(function() f() end) co() end
                     f()",
                    "C stack overflow",
                ),
                // Luau has no `load`.
                #[cfg(not(feature = "luau"))]
                (
                    "local function read()
                         local f, e = load(read)
                         if not f then error(e, 0) end
                         return ''
                     end
                     local _, e = load(read)
                     error(e, 0)",
                    LUA_STACK_ON_LUAJIT,
                ),
            ];
            for t in Target::both(None) {
                for (code, want) in cases {
                    let e = lua_error(t.eval::<()>(code), LuaErrorKind::Runtime);
                    assert!(e.message().contains(want), "{code}: {e:?}");
                    #[cfg(feature = "luajit")]
                    if want == "stack overflow" {
                        assert!(!e.message().contains("C stack overflow"), "{code}: {e:?}");
                    }
                }
                t.assert_serving();
            }
        },
    );
}

#[test]
fn nested_coroutines_stop_with_an_error_not_a_crash() {
    // Lua 5.4 stops at about 200 (its C call limit); on LuaJIT, which has
    // none, `vm/cstack.rs` allows 1000.
    const DEEPEST: &str = "local depth = 0
        local function f()
            depth = depth + 1
            return coroutine.wrap(f)()
        end
        local ok, e = pcall(f)
        return depth, e";
    // What may nest after failed resumes and caught overflows, which must
    // leave nothing behind.
    const NEST: i64 = if cfg!(feature = "luajit") { 1000 } else { 150 };
    let after_failures = format!(
        "local co co = coroutine.create(function()
             for _ = 1, 3000 do coroutine.resume(co) end -- itself: fails
             return 1
         end)
         assert(select(2, coroutine.resume(co)) == 1)
         local function deepest() return coroutine.wrap(deepest)() end
         for _ = 1, 3 do assert(not pcall(deepest)) end
         local function f(n)
             if n == 0 then return 0 end
             return 1 + coroutine.wrap(f)(n - 1)
         end
         return f({NEST})"
    );
    in_child("nested_coroutines_stop_with_an_error_not_a_crash", || {
        for t in Target::both(None) {
            let (depth, e) = t.eval::<(i64, String)>(DEEPEST).unwrap();
            assert!(e.contains("C stack overflow"), "{e}");
            #[cfg(feature = "luajit")]
            assert_eq!(depth, 1001);
            #[cfg(not(feature = "luajit"))]
            assert!((100..1000).contains(&depth), "{depth}");
            assert_eq!(t.eval::<i64>(after_failures.as_str()), Ok(NEST));
            t.assert_serving();
        }
    });
}

#[test]
fn pcall_of_results_that_fill_the_stack_still_returns_its_status() {
    // `f` returns 8001 values: more than a C function's stack may hold on
    // Lua 5.1 (8000 slots), so 5.1's pcall and xpcall have no room for
    // their status (Lua 5.1's own would write past the stack, or abort in a
    // checked build) and answer as Lua 5.2 does. Elsewhere (LuaJIT's pcall
    // is no C function) all the values come back.
    const CODE: &str = "local function f(...) return ... end
        local t = {} for i = 1, 7990 do t[i] = i end
        local unpack = table.unpack or unpack
        local function g() return f(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, unpack(t)) end
        local function call() return pcall(g) end
        local function xcall() return xpcall(g, print) end
        return select('#', call()), tostring((select(2, call()))),
               select('#', xcall()), tostring((select(2, xcall())))";
    in_child(
        "pcall_of_results_that_fill_the_stack_still_returns_its_status",
        || {
            for t in Target::both(None) {
                let got = t.eval::<(i64, String, i64, String)>(CODE);
                let (n, first) = if cfg!(feature = "lua51") {
                    (2, "stack overflow")
                } else {
                    (8002, "1")
                };
                assert_eq!(got, Ok((n, first.to_string(), n, first.to_string())));
                t.assert_serving();
            }
        },
    );
}

#[test]
fn string_rep_with_a_huge_count_is_a_memory_limit_error() {
    for t in Target::both(Some(16 * MB)) {
        assert_memory_limit(t.eval::<usize>("#string.rep('x', 1e9)"));
        assert_memory_limit(t.eval::<usize>("#string.rep('ab', 1e8, ',')"));
        t.assert_serving();
        assert_eq!(t.eval::<usize>("#string.rep('x', 1e6)"), Ok(1_000_000));
    }
    // Past what a Lua string may hold, Lua refuses before allocating. (Lua
    // 5.1 and 5.2 take the count as a C `int`: 1e12 does not survive it.)
    #[cfg(not(any(
        feature = "luajit",
        feature = "luau",
        feature = "lua51",
        feature = "lua52"
    )))]
    for t in Target::both(None) {
        let e = lua_error(
            t.eval::<usize>("#string.rep('x', 1e12)"),
            LuaErrorKind::Runtime,
        );
        assert!(e.message().contains("resulting string too large"), "{e:?}");
        t.assert_serving();
    }
    // LuaJIT takes the count as a 32-bit integer (1e12 wraps to an empty
    // string), and refuses a buffer past 2 GB as "not enough memory".
    #[cfg(feature = "luajit")]
    for t in Target::both(None) {
        assert_eq!(t.eval::<usize>("#string.rep('x', 1e12)"), Ok(0));
        assert_memory_limit(t.eval::<usize>("#string.rep('xx', 2^31 - 1)"));
        t.assert_serving();
    }
    // Luau too takes a 32-bit count (1e12 wraps to an empty string), and
    // refuses a result past 1 GB before allocating.
    #[cfg(feature = "luau")]
    for t in Target::both(None) {
        assert_eq!(t.eval::<usize>("#string.rep('x', 1e12)"), Ok(0));
        let e = lua_error(
            t.eval::<usize>("#string.rep('xx', 2^31 - 1)"),
            LuaErrorKind::Runtime,
        );
        assert!(e.message().contains("resulting string too large"), "{e:?}");
        t.assert_serving();
    }
}

/// The length `FITS_THE_LIMIT` builds: 3 MB, about 6 MB at its peak under
/// an 8 MB limit (a 3 MB buffer, then the 3 MB string).
///
/// Lua 5.1: 2 MB. Its `luaL_Buffer` pushes 8 KB pieces and concatenates them
/// level by level, so the last concatenation holds the pieces, the VM's
/// concatenation buffer and the result at once: three times the length (a
/// fresh VM under 8 MB builds at most about 2.5 MB; 3 MB never fits).
#[cfg(not(feature = "lua51"))]
const FIT_LEN: usize = 3 << 20;
#[cfg(feature = "lua51")]
const FIT_LEN: usize = 2 << 20;
#[cfg(not(feature = "lua51"))]
const FITS_THE_LIMIT: &str = "#string.rep('x', 3145728)"; // 3 << 20
#[cfg(feature = "lua51")]
const FITS_THE_LIMIT: &str = "#string.rep('x', 2097152)"; // 2 << 20
/// How many 1 MB strings `leaves_garbage()` builds: about 7 MB of garbage on
/// Lua 5.4, which `string.rep`'s buffer cannot reclaim by itself: the VM must
/// collect it between requests. Fewer where six do not fit under 8 MB:
/// - Lua 5.2, 5.3: the collector falls further behind during the request;
///   five still leave more garbage than `FITS_THE_LIMIT` has room for;
/// - Lua 5.1: four. Its string building (see `FIT_LEN`) makes garbage three
///   times the length and 5.1 has no emergency collection: five 1 MB
///   strings do not fit 8 MB even as one request. Four leave about 7.3 MB
///   (without the VM's collection between requests), and after the failed
///   `string.rep('x', 1e9)` about 7.6 MB, which fails `FITS_THE_LIMIT`
///   unless the VM collects. Garbage from a request that returned normally
///   is reclaimed on 5.1 by the collector's own steps during the next
///   request (its buffer grows in 8 KB pieces, each a step), so there the
///   second test below passes with or without the VM's collection;
/// - LuaJIT builds strings in a buffer that doubles (a 2 MB one for `..` of
///   a 1 MB string, kept between requests) and gets no emergency collection
///   when an allocation fails;
/// - Luau has no emergency collection either.
const GARBAGE_STRINGS: i64 = if cfg!(feature = "luau") {
    3
} else if cfg!(any(feature = "luajit", feature = "lua51")) {
    4
} else if cfg!(any(feature = "lua52", feature = "lua53")) {
    5
} else {
    6
};
/// Builds `GARBAGE_STRINGS` strings of 1 MB and returns normally.
fn leaves_garbage() -> String {
    format!(
        "local t = {{}} for i = 1, {GARBAGE_STRINGS} do t[i] = string.rep('x', 1048576) .. i end return #t"
    )
}

#[test]
fn garbage_is_collected_after_a_request_that_hit_the_memory_limit() {
    for t in Target::both(Some(8 * MB)) {
        assert_eq!(t.eval::<usize>(FITS_THE_LIMIT), Ok(FIT_LEN), "{}", t.name());
    }
    for t in Target::both(Some(8 * MB)) {
        assert_eq!(t.eval::<i64>(leaves_garbage()), Ok(GARBAGE_STRINGS));
        assert_memory_limit(t.eval::<usize>("#string.rep('x', 1e9)"));
        assert_eq!(t.eval::<usize>(FITS_THE_LIMIT), Ok(FIT_LEN), "{}", t.name());
    }
}

#[test]
fn garbage_left_by_an_earlier_request_does_not_fail_a_request_that_fits() {
    for t in Target::both(Some(8 * MB)) {
        assert_eq!(t.eval::<i64>(leaves_garbage()), Ok(GARBAGE_STRINGS));
        assert_eq!(t.eval::<usize>(FITS_THE_LIMIT), Ok(FIT_LEN), "{}", t.name());
    }
}

#[test]
fn a_non_utf8_result_fails_as_string_and_works_as_bstring() {
    for t in Target::both(None) {
        let e = lua_error(t.eval::<String>("'ok\\255\\254'"), LuaErrorKind::Conversion);
        assert!(e.message().contains("utf-8"), "{e:?}");
        assert_eq!(
            t.eval::<BString>("'ok\\255\\254'"),
            Ok(BString::from(&b"ok\xff\xfe"[..]))
        );
        // Inside a table too.
        let e = lua_error(
            t.eval::<Vec<String>>("{'fine', '\\192'}"),
            LuaErrorKind::Conversion,
        );
        assert!(e.message().contains("utf-8"), "{e:?}");
        assert_eq!(
            t.eval::<Vec<BString>>("{'fine', '\\192'}"),
            Ok(vec![BString::from("fine"), BString::from(&b"\xc0"[..])])
        );
        t.assert_serving();
    }
}

#[test]
fn a_huge_table_result_converts_and_under_a_small_limit_is_a_memory_error() {
    const CODE: &str = "local t = {} for i = 1, 1e6 do t[i] = i end return t";
    for t in Target::both(None) {
        let v = t.eval::<Vec<i64>>(CODE).unwrap();
        assert_eq!((v.len(), v[0], v[999_999]), (1_000_000, 1, 1_000_000));
        t.assert_serving();
    }
    for t in Target::both(Some(4 * MB)) {
        assert_memory_limit(t.eval::<Vec<i64>>(CODE));
        t.assert_serving();
    }
    // Built from Rust, the table counts against the limit just the same.
    let isle = Isle::builder()
        .memory_limit(4 * MB)
        .spawn(|_| Ok(()))
        .unwrap();
    assert_memory_limit(isle.exec(|lua| lua.create_sequence_from(0..1_000_000i64).map(|_| ())));
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn very_long_source_code_runs_or_fails_clearly() {
    const LINES: usize = (5 * MB) / "n = n + 1\n".len();
    let statements = format!("n = 0\n{}return n", "n = n + 1\n".repeat(LINES));
    let literal = format!("return #'{}'", "a".repeat(5 * MB));
    let locals = "local x = 1\n".repeat((5 * MB) / "local x = 1\n".len());
    for t in Target::both(None) {
        assert_eq!(t.eval::<usize>(statements.clone()), Ok(LINES));
        assert_eq!(t.eval::<usize>(literal.clone()), Ok(5 * MB));
        // Lua's limit of 200 locals per function, reported where it is hit.
        #[cfg(not(feature = "luau"))]
        {
            let e = lua_error(t.eval::<()>(locals.clone()), LuaErrorKind::Syntax);
            // (Lua 5.5 reports it one line later, at the token after the 201st.)
            let line = if cfg!(feature = "lua55") {
                "eval:202:"
            } else {
                "eval:201:"
            };
            assert!(e.message().starts_with(line), "{e:?}");
            // (Lua 5.1 and LuaJIT: "main function has more than 200 local
            // variables".)
            let words = if cfg!(any(feature = "lua51", feature = "luajit")) {
                "more than 200 local variables"
            } else {
                "too many local variables"
            };
            assert!(e.message().contains(words), "{e:?}");
        }
        // Luau has no such limit here: a constant local takes no register.
        #[cfg(feature = "luau")]
        assert_eq!(t.eval::<()>(locals.clone()), Ok(()));
        t.assert_serving();
    }
    // Compiling needs memory too: under a small limit it runs out. (Luau
    // folds `#'...'` to a number, and compiles outside the VM's memory:
    // loading the string constant is what runs out there.)
    #[cfg(feature = "luau")]
    let literal = format!("return '{}'", "a".repeat(5 * MB));
    for t in Target::both(Some(4 * MB)) {
        assert_memory_limit(t.eval::<()>(literal.clone()));
        t.assert_serving();
    }
}

#[test]
fn too_many_results_is_a_runtime_error() {
    for t in Target::both(None) {
        let e = lua_error(
            t.eval::<mlua::Variadic<Option<i64>>>("return (table.unpack or unpack)({}, 1, 1e6)"),
            LuaErrorKind::Runtime,
        );
        assert!(e.message().contains("too many results"), "{e:?}");
        let e = lua_error(
            t.eval::<mlua::Variadic<i64>>("return string.byte(string.rep('x', 1e7), 1, -1)"),
            LuaErrorKind::Runtime,
        );
        assert!(e.message().contains("string slice too long"), "{e:?}");
        // Many, but within Lua's stack: they all arrive. (A LuaJIT C
        // function pushes at most 8000 values, and so does Lua 5.1's C
        // stack; on Lua 5.4, up to a million.)
        const MANY: usize = if cfg!(any(feature = "luajit", feature = "lua51")) {
            7_000
        } else {
            100_000
        };
        let v = t
            .eval::<mlua::Variadic<i64>>(format!(
                "local t = {{}} for i = 1, {MANY} do t[i] = i end return (table.unpack or unpack)(t)"
            ))
            .unwrap();
        assert_eq!((v.len(), v[MANY - 1]), (MANY, MANY as i64));
        t.assert_serving();
    }
}

/// How the parser refuses source nested too deeply: Lua 5.4 and 5.5 run
/// out of their C-stack count, 5.2 and 5.3 of their C levels, 5.1 and
/// LuaJIT count syntax levels (LuaJIT gives a position).
#[cfg(not(any(
    feature = "luajit",
    feature = "luau",
    feature = "lua51",
    feature = "lua52",
    feature = "lua53"
)))]
const TOO_DEEP: &[&str] = &["C stack overflow"];
#[cfg(any(feature = "lua52", feature = "lua53"))]
const TOO_DEEP: &[&str] = &["too many C levels"];
#[cfg(any(feature = "luajit", feature = "lua51"))]
const TOO_DEEP: &[&str] = &["too many syntax levels"];
/// Luau: a table constructor runs out of its 255 registers, an expression
/// out of the compiler's recursion depth.
#[cfg(feature = "luau")]
const TOO_DEEP: &[&str] = &["Out of registers", "Exceeded allowed recursion depth"];

/// Whether `message` is one of `TOO_DEEP`.
fn too_deep(message: &str) -> bool {
    TOO_DEEP.iter().any(|m| message.contains(m))
}

/// Loads the source `SRC` with Lua's own loader: the type of what it
/// returned, and its error.
#[cfg(not(any(feature = "luau", feature = "lua51")))]
const LOAD_SRC: &str = "local f, err = load(SRC) return type(f), err";
/// `load` of a string is `loadstring` in Lua 5.1.
#[cfg(feature = "lua51")]
const LOAD_SRC: &str = "local f, err = loadstring(SRC) return type(f), err";
/// Luau has no `load`, and mlua's `loadstring` raises its error.
#[cfg(feature = "luau")]
const LOAD_SRC: &str =
    "local ok, err = pcall(loadstring, SRC) return ok and 'function' or 'nil', tostring(err)";

/// Source nested deeper than the parser's C-stack limit (200 levels).
fn deeply_nested() -> [String; 3] {
    [
        format!("return {}{}", "{".repeat(300), "}".repeat(300)),
        format!("return {}1{}", "(".repeat(100_000), ")".repeat(100_000)),
        format!("return {}1", "- ".repeat(100_000)),
    ]
}

#[test]
fn a_source_nested_too_deeply_is_refused_and_the_vm_serves_on() {
    for t in Target::both(None) {
        for code in deeply_nested() {
            // Lua reports its parser's limit as a runtime error without a
            // position; see the ignored test below.
            let r = t.eval::<()>(code);
            match &r {
                Err(IsleError::Lua(e)) => {
                    assert!(too_deep(e.message()), "{e:?}")
                }
                other => panic!("expected a Lua error, got {other:?}"),
            }
        }
        // The same through Lua's own `load`.
        let (f, err) = t
            .eval::<(Option<String>, String)>(LOAD_SRC.replace(
                "SRC",
                &format!("'return {}1{}'", "{".repeat(300), "}".repeat(300)),
            ))
            .unwrap();
        assert_eq!(f.as_deref(), Some("nil"));
        assert!(too_deep(&err), "{err}");
        t.assert_serving();
    }
}

#[test]
fn a_source_nested_too_deeply_is_a_syntax_error() {
    let t = Target::isle(None);
    for code in deeply_nested() {
        // Lua's parser gives this one no position.
        let e = lua_error(t.eval::<()>(code), LuaErrorKind::Syntax);
        assert!(too_deep(e.message()), "{e:?}");
        t.assert_serving();
    }
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc (Linux only)");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in kB");
    kb * 1024
}

/// What `pcall` of a function that ran out of memory returns as its error
/// (Lua 5.3's buffers word it their own way).
#[cfg(not(feature = "lua53"))]
const MEMORY_ERROR: &str = "not enough memory";
#[cfg(feature = "lua53")]
const MEMORY_ERROR: &str = "not enough memory for buffer allocation";

/// A replacement that multiplies a 1 MiB match 8192 times: 8 GiB of
/// result, built by `gsub` (the sandbox's own, on Lua 5.4 and 5.5; Lua's
/// elsewhere), must meet the memory limit long before.
const HUGE_GSUB: &str = "string.gsub(string.rep('a', 2^20), '.+', string.rep('%0', 8192))";

#[test]
fn a_sandboxed_gsub_result_counts_against_the_memory_limit() {
    in_child(
        "a_sandboxed_gsub_result_counts_against_the_memory_limit",
        || {
            let isle = Isle::builder()
                .sandbox(true)
                .memory_limit(32 * MB)
                .spawn(|lua| lua.globals().set("kept", "state"))
                .unwrap();
            let target = Target::Isle(isle);
            assert_memory_limit(target.eval::<usize>(format!("#{HUGE_GSUB}")));
            target.assert_serving();
            // Caught, it is Lua's memory error, as from Lua's own gsub.
            // Lua 5.3's is its buffer's `luaL_error`, which puts the
            // caller's position in front (a C function tail-called from
            // Lua still has its caller's frame under it there).
            let caught = if cfg!(feature = "lua53") {
                format!("eval:1: {MEMORY_ERROR}")
            } else {
                MEMORY_ERROR.to_string()
            };
            assert_eq!(
                target.eval::<(bool, String)>(format!("pcall(function() return {HUGE_GSUB} end)")),
                Ok((false, caught))
            );
            // Replacements from a function or a table, and captures.
            assert_memory_limit(target.eval::<usize>(
                "local big = string.rep('b', 2^20) \
                 return #string.gsub(string.rep('a', 64), '.', function() return big end)",
            ));
            assert_memory_limit(target.eval::<usize>(
                "local t = {a = string.rep('b', 2^20)} \
                 return #string.gsub(string.rep('a', 64), '.', t)",
            ));
            // Captures made by the sandbox's own matcher (Luau's own, which
            // is not ours, answers this one within the limit).
            #[cfg(any(feature = "lua54", feature = "lua55"))]
            assert_memory_limit(target.eval::<usize>(
                "local s = string.rep('a', 9 * 2^20) \
                 return #string.match(s, '((((.+))))')",
            ));
            target.assert_serving();
            let peak = peak_rss();
            assert!(peak < 4 * 32 * MB, "peak RSS {} MiB", peak / MB);
        },
    );
}

#[test]
#[cfg(any(feature = "lua54", feature = "lua55"))] // the sandbox's own matcher
#[cfg(not(feature = "luau"))] // no instruction count
fn building_a_gsub_result_is_stoppable() {
    in_child("building_a_gsub_result_is_stoppable", || {
        // No memory limit: the budget, counting the bytes copied, stops it.
        let isle = Isle::builder()
            .sandbox(true)
            .max_instructions(1_000_000)
            .spawn(|lua| lua.globals().set("kept", "state"))
            .unwrap();
        let target = Target::Isle(isle);
        // Matching takes a thousand steps; the 16 GiB result would take
        // seconds to build.
        assert_eq!(
            target
                .eval::<usize>("#string.gsub(string.rep('a', 1024), '.+', string.rep('%0', 2^24))"),
            Err(IsleError::InstructionLimit)
        );
        target.assert_serving();
        let peak = peak_rss();
        assert!(peak < 256 * MB, "peak RSS {} MiB", peak / MB);
    });
}
