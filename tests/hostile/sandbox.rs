//! `sandbox(true)`: removed functions say so, library tables are read-only,
//! the collector cannot be stopped, finalizers are refused; on an isle and
//! on pool sessions.

#[cfg_attr(
    not(any(feature = "lua54", feature = "lua55", feature = "luau")),
    allow(unused_imports)
)] // used by one test, on these backends
use crate::common;

use std::time::Duration;

use mlua_isle::{Isle, IsleError, IslePool};

fn sandboxed() -> Isle {
    Isle::builder()
        .sandbox(true)
        .default_timeout(Duration::from_secs(10))
        .spawn(|_| Ok(()))
        .unwrap()
}

/// The Lua error message of `code`, which must fail.
fn lua_error(isle: &Isle, code: &str) -> String {
    match isle.eval::<()>(code) {
        Err(IsleError::Lua(e)) => e.message().to_string(),
        other => panic!("{code}: expected a Lua error, got {other:?}"),
    }
}

/// Every global a sandboxed VM has, on any backend: a name not here is one
/// nobody reviewed (Lua 5.1's `module` stayed in the sandbox, handing out
/// the real `io` and `_G`, because no test listed what was left).
const REVIEWED_GLOBALS: &[&str] = &[
    // Lua's base library, in any version.
    "_G",
    "_VERSION",
    "assert",
    "collectgarbage",
    "error",
    "getmetatable",
    "ipairs",
    "load",
    "next",
    "pairs",
    "pcall",
    "print",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "require",
    "select",
    "setmetatable",
    "tonumber",
    "tostring",
    "type",
    "xpcall",
    "warn",
    // Lua 5.1, LuaJIT, Luau.
    "getfenv",
    "setfenv",
    "loadstring",
    "unpack",
    "gcinfo",
    "typeof",
    // Libraries (as views), and the sandbox's unavailable tables.
    "coroutine",
    "table",
    "string",
    "math",
    "utf8",
    "os",
    "bit32",
    "bit",
    "jit",
    "buffer",
    "vector",
    "integer",
    "io",
    "debug",
    "package",
    // The crate's `task` (the `async` feature's task library).
    "task",
];

/// Globals that stay only as functions saying they are not available.
const REFUSED_GLOBALS: &[&str] = &["loadfile", "dofile", "module", "newproxy"];

#[test]
fn every_global_left_in_the_sandbox_was_reviewed() {
    let isle = sandboxed();
    let names: Vec<String> = isle
        .eval("local t = {} for k in pairs(_G) do t[#t + 1] = tostring(k) end return t")
        .unwrap();
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !REVIEWED_GLOBALS.contains(&n.as_str()))
        .filter(|n| !REFUSED_GLOBALS.contains(&n.as_str()))
        .collect();
    assert!(unknown.is_empty(), "globals nobody reviewed: {unknown:?}");
    for name in REFUSED_GLOBALS
        .iter()
        .filter(|n| names.iter().any(|m| m == *n))
    {
        let msg = lua_error(&isle, &format!("{name}('x')"));
        assert!(
            msg.contains(&format!("{name} is not available in the sandbox")),
            "{name}: {msg}"
        );
    }
}

#[test]
fn removed_functions_say_they_are_not_available() {
    let isle = sandboxed();
    for (code, name) in [
        ("os.exit(1)", "os.exit"),
        ("os.execute('true')", "os.execute"),
        ("os.remove('x')", "os.remove"),
        ("os.rename('a', 'b')", "os.rename"),
        ("os.getenv('HOME')", "os.getenv"),
        ("os.tmpname()", "os.tmpname"),
        ("io.open('/etc/passwd')", "io.open"),
        ("io.write('x')", "io.write"),
        ("debug.getinfo(1)", "debug.getinfo"),
        ("loadfile('/etc/passwd')", "loadfile"),
        ("dofile('/etc/passwd')", "dofile"),
        ("package.loadlib('x', 'y')", "package.loadlib"),
    ] {
        // Luau's `os` has only `clock`, `date`, `difftime` and `time`: the
        // others are absent, which is as good.
        if cfg!(feature = "luau") && name.starts_with("os.") {
            assert_eq!(isle.eval::<bool>(&format!("{name} == nil")), Ok(true));
            continue;
        }
        let msg = lua_error(&isle, code);
        assert!(
            msg.contains(&format!("{name} is not available in the sandbox")),
            "{code}: {msg}"
        );
    }
    // What stays: os.time, os.clock, string functions, ...
    assert!(isle.eval::<i64>("os.time()").unwrap() > 0);
    assert_eq!(
        isle.eval::<String>("string.upper('abc')"),
        Ok("ABC".to_string())
    );
    assert_eq!(
        isle.eval::<String>("('abc'):upper()"),
        Ok("ABC".to_string())
    );
}

#[test]
fn require_returns_only_modules_already_loaded() {
    let isle = sandboxed();
    assert_eq!(isle.eval::<bool>("require('string') == string"), Ok(true));
    let msg = lua_error(&isle, "require('socket')");
    assert!(msg.contains("not available in the sandbox"), "{msg}");
    // The removed libraries cannot be had through require either.
    let msg = lua_error(&isle, "require('io').open('/etc/passwd')");
    assert!(msg.contains("io.open is not available"), "{msg}");
}

#[test]
fn library_tables_are_read_only() {
    let isle = sandboxed();
    for code in [
        "string.upper = function() return 'pwned' end",
        "table.insert = nil",
        "math.pi = 3",
        "rawset(string, 'upper', print)",
        "setmetatable(string, {})",
        "getmetatable('').__index = {}",
        "require('table').concat = nil",
    ] {
        let r = isle.eval::<()>(code);
        assert!(matches!(r, Err(IsleError::Lua(_))), "{code}: {r:?}");
    }
    // Nothing changed, and reading and iterating still work.
    assert_eq!(isle.eval::<String>("('x'):upper()"), Ok("X".to_string()));
    assert_eq!(
        isle.eval::<String>("string.upper('y')"),
        Ok("Y".to_string())
    );
    assert_eq!(isle.eval::<bool>("math.pi > 3.14"), Ok(true));
    assert_eq!(isle.eval::<bool>("getmetatable('') == false"), Ok(true));
    assert!(
        isle.eval::<i64>("local n = 0 for _ in pairs(string) do n = n + 1 end return n")
            .unwrap()
            > 10
    );
    // Luau's generalized `for` iterates a view too (`__iter`).
    #[cfg(feature = "luau")]
    assert!(
        isle.eval::<i64>("local n = 0 for _ in string do n = n + 1 end return n")
            .unwrap()
            > 10
    );
}

#[test]
fn the_collector_cannot_be_stopped_or_retuned() {
    let isle = sandboxed();
    for opt in [
        "stop",
        "restart",
        "setpause",
        "setstepmul",
        "incremental",
        "generational",
    ] {
        let msg = lua_error(&isle, &format!("collectgarbage('{opt}')"));
        assert!(msg.contains("not available in the sandbox"), "{opt}: {msg}");
    }
    #[cfg(not(feature = "lua51"))] // no 'isrunning' in Lua 5.1
    assert_eq!(isle.eval::<bool>("collectgarbage('isrunning')"), Ok(true));
    assert!(isle.eval::<f64>("collectgarbage('count')").unwrap() > 0.0);
    assert_eq!(isle.eval::<i64>("collectgarbage() return 1"), Ok(1));
}

#[test]
fn finalizers_are_refused() {
    let isle = sandboxed();
    let msg = lua_error(
        &isle,
        "setmetatable({}, { __gc = function() while true do end end }) collectgarbage()",
    );
    assert!(msg.contains("__gc metamethods are not available"), "{msg}");
    // Other metamethods are fine.
    assert_eq!(
        isle.eval::<i64>(
            "local t = setmetatable({}, { __index = function() return 5 end }) return t.x"
        ),
        Ok(5)
    );
    // Lua 5.1's and LuaJIT's `newproxy(true)` makes a userdata with a
    // metatable of its own, which could be given a `__gc` directly. (Luau
    // has it too, and runs no `__gc` of Lua's; it goes all the same.)
    const PROXY: &str = "local p = newproxy(true)
        getmetatable(p).__gc = function() finalized = true end
        p = nil collectgarbage()";
    if cfg!(any(feature = "lua51", feature = "luajit", feature = "luau")) {
        let msg = lua_error(&isle, PROXY);
        assert!(msg.contains("newproxy is not available"), "{msg}");
    } else {
        assert_eq!(isle.eval::<bool>("newproxy == nil"), Ok(true));
    }
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

/// A function the sandbox removes (Luau has no `io`).
#[cfg(not(feature = "luau"))]
const REMOVED: &str = "io.write";
#[cfg(feature = "luau")]
const REMOVED: &str = "debug.traceback";

#[test]
fn init_runs_before_the_sandbox_and_may_extend_libraries() {
    let isle = Isle::builder()
        .sandbox(true)
        .spawn(|lua| {
            lua.load(format!(
                "function string.shout(s) return s:upper() .. '!' end
                 local write = {REMOVED} -- captured before the sandbox
                 function can_write() return type(write) == 'function' end"
            ))
            .exec()
        })
        .unwrap();
    assert_eq!(isle.eval::<String>("('hi'):shout()"), Ok("HI!".to_string()));
    assert_eq!(isle.eval::<bool>("can_write()"), Ok(true));
    assert!(matches!(
        isle.eval::<()>("string.shout = nil"),
        Err(IsleError::Lua(_))
    ));
}

/// `<close>` is Lua 5.4 on.
#[cfg(any(feature = "lua54", feature = "lua55"))]
const CLOSE: Option<&str> = Some(
    "local t <close> = setmetatable({}, { __close = function() while true do end end }) error('x')",
);
#[cfg(not(any(feature = "lua54", feature = "lua55")))]
const CLOSE: Option<&str> = None;

/// Backtracking for minutes in Lua's C matcher; the sandbox's counts. It
/// replaces the C matcher on Lua 5.4 and 5.5 only (see BACKENDS.md).
#[cfg(any(feature = "lua54", feature = "lua55"))]
const BUDGETED_PATTERNS: &[&str] = &[
    "string.find(('a'):rep(30), ('a?'):rep(30) .. ('a'):rep(30))",
    "for _ in ('a'):rep(40):gmatch(('a?'):rep(40) .. ('a'):rep(40)) do end",
];
#[cfg(not(any(feature = "lua54", feature = "lua55")))]
const BUDGETED_PATTERNS: &[&str] = &[];

/// A `load` reader that never returns (Luau has no `load`).
#[cfg(not(feature = "luau"))]
const LOAD_READER: Option<&str> = Some("while true do load(function() while true do end end) end");
#[cfg(feature = "luau")]
const LOAD_READER: Option<&str> = None;

/// A sandboxed isle with a limit, and the error that limit gives: an
/// instruction budget; on Luau, which counts no instructions (the budget is
/// refused), a time limit.
fn limited_sandbox() -> (Isle, IsleError) {
    let builder = Isle::builder().sandbox(true);
    #[cfg(not(feature = "luau"))]
    let (builder, limit) = (
        builder.max_instructions(1_000_000),
        IsleError::InstructionLimit,
    );
    #[cfg(feature = "luau")]
    let (builder, limit) = (
        builder.default_timeout(Duration::from_millis(500)),
        IsleError::Timeout,
    );
    (builder.spawn(|_| Ok(())).unwrap(), limit)
}

#[test]
fn a_sandboxed_script_cannot_outlive_its_limits() {
    let (isle, limit) = limited_sandbox();
    for code in [
        "while true do end",
        "while true do pcall(function() while true do end end) end",
        "while true do xpcall(function() while true do end end, function() while true do end end) end",
        "local co = coroutine.wrap(function() while true do end end) co()",
        "table.sort({3, 2, 1, 5, 4}, function(a, b) while true do end end)",
        "string.gsub('aaa', 'a', function() while true do end end)",
    ]
    .into_iter()
    .chain(LOAD_READER)
    .chain(BUDGETED_PATTERNS.iter().copied())
    .chain(CLOSE)
    {
        assert_eq!(isle.eval::<()>(code), Err(limit.clone()), "{code}");
        assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2), "after {code}");
    }
}

#[cfg(any(feature = "lua54", feature = "lua55", feature = "luau"))]
/// Patterns that backtrack exponentially: minutes each in Lua's C matcher,
/// which no hook can interrupt (the sandbox's replaces it, on 5.4 and 5.5).
/// Luau's calls its interrupt at every step.
const BACKTRACKING: &[&str] = &[
    "string.find(('a'):rep(30), ('a?'):rep(30) .. ('a'):rep(30))",
    "return ('a'):rep(40):match(('a?'):rep(40) .. ('a'):rep(40))",
    "string.gsub(('a'):rep(40), ('a?'):rep(40) .. ('a'):rep(40), 'x')",
    "for _ in ('a'):rep(40):gmatch(('a?'):rep(40) .. ('a'):rep(40)) do end",
    "return ('x'):rep(5000):find(('.-x'):rep(8) .. 'y')",
];

#[test]
#[cfg(any(feature = "lua54", feature = "lua55", feature = "luau"))]
fn sandboxed_pattern_matching_is_stopped_by_cancel_and_time_limit() {
    let isle = Isle::builder().sandbox(true).spawn(|_| Ok(())).unwrap();
    let (tx, started) = crossbeam_channel::unbounded();
    let pool = IslePool::builder()
        .workers(1)
        .sandbox(true)
        .init(move |lua| common::register_signal(lua, "started", tx.clone()))
        .build()
        .unwrap();
    for code in BACKTRACKING {
        let task = isle
            .spawn_eval::<()>(*code)
            .timeout(Duration::from_millis(50));
        let r = common::within(code, move || task.wait());
        assert_eq!(r, Err(IsleError::Timeout), "{code}");
        let task = pool
            .session("s")
            .spawn_eval::<()>(format!("started() {code}"));
        common::expect_msg(&started, "the pattern runs");
        task.cancel();
        let r = common::within(code, move || task.wait());
        assert_eq!(r, Err(IsleError::Cancelled), "{code}");
        assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2), "after {code}");
        assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2), "after {code}");
    }
}

#[test]
fn sandboxed_pattern_functions_still_work() {
    let isle = sandboxed();
    let code = r#"
        local out = {}
        out[#out + 1] = ("hello world"):find("o w")
        out[#out + 1] = select(2, string.find("key=value", "(%w+)=(%w+)"))
        out[#out + 1] = ("2024-11-24"):match("(%d+)-(%d+)")
        local words = {}
        for w in ("one two  three"):gmatch("%a+") do words[#words + 1] = w end
        out[#out + 1] = table.concat(words, ",")
        out[#out + 1] = (string.gsub("abc", "%w", "%0%0"))
        out[#out + 1] = (string.gsub("$name is $age", "%$(%w+)", { name = "Ann", age = 7 }))
        out[#out + 1] = (("x y z"):gsub("%a", string.upper))
        local ok, err = pcall(string.find, "x", "[a")
        out[#out + 1] = err
        return table.concat(out, "|")
    "#;
    assert_eq!(
        isle.eval::<String>(code),
        Ok("5|9|2024|one,two,three|aabbcc|Ann is 7|X Y Z|malformed pattern (missing ']')".into())
    );
}

#[test]
fn sessions_of_a_sandboxed_pool_cannot_touch_shared_state() {
    let pool = IslePool::builder()
        .workers(2)
        .sandbox(true)
        .init(|lua| lua.globals().set("SHARED", 1))
        .build()
        .unwrap();
    let s = pool.session("tenant");
    // Writes land in the session, even through _G and rawset.
    s.eval::<()>("SHARED = 2; _G.SHARED = 3; rawset(_G, 'SHARED', 4)")
        .unwrap();
    assert_eq!(s.eval::<i64>("SHARED"), Ok(4));
    assert_eq!(pool.session("other").eval::<i64>("SHARED"), Ok(1));
    // No way back to the shared globals.
    assert_eq!(s.eval::<bool>("getmetatable(_G) == false"), Ok(true));
    assert_eq!(
        s.eval::<bool>(
            "package == nil or type(package.loaded) ~= 'table' or package.loaded._G == nil"
        ),
        Ok(true)
    );
    assert!(matches!(
        s.eval::<()>("string.len = nil"),
        Err(IsleError::Lua(_))
    ));
    assert_eq!(pool.eval::<i64>("SHARED"), Ok(1));
}
