//! Lua code behaves in an isle as in plain mlua: what our wrappers add
//! (text-only chunks, interruption checks) narrows nothing else.

use crate::common;

/// `load`'s mode is narrowed to text, never replaced: a caller's `'b'`
/// still refuses text, as Lua does.
#[test]
#[cfg(not(any(feature = "lua51", feature = "luau")))] // 5.1: no mode; Luau: no load
fn load_narrows_the_callers_mode_to_text() {
    use mlua_isle::{Isle, IsleError};
    common::within("load modes", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        // Text is refused where the caller's mode refuses it.
        let refused: (bool, String) = isle
            .eval("local f, e = load('return 1', 'x', 'b') return f == nil, e")
            .unwrap();
        assert!(refused.0, "{refused:?}");
        // LuaJIT words it its own way.
        assert!(
            refused.1.contains("text chunk") || refused.1.contains("wrong mode"),
            "{refused:?}"
        );
        // And accepted where it allows it.
        for mode in ["'t'", "'bt'", "nil"] {
            assert_eq!(
                isle.eval::<i64>(format!("return load('return 1', 'x', {mode})()")),
                Ok(1),
                "mode {mode}"
            );
        }
        // Binary stays refused whatever the caller asks.
        for mode in ["'b'", "'bt'", "nil"] {
            let r: Result<(bool, String), IsleError> = isle.eval(format!(
                "local f, e = load(string.dump(function() end), 'x', {mode}) return f == nil, e"
            ));
            let (refused, message) = r.unwrap();
            assert!(refused, "mode {mode}");
            assert!(
                message.contains("binary") || message.contains("wrong mode"),
                "mode {mode}: {message}"
            );
        }
        // A reader's binary first piece too, under a mode without text.
        let r: (bool, String) = isle
            .eval(
                "local d = string.dump(function() end) local done \
                 local f, e = load(function() if done then return nil end done = true return d end, 'x', 'b') \
                 return f == nil, e",
            )
            .unwrap();
        assert!(r.0, "{r:?}");
    });
}

/// `std_libs` opens only the libraries asked for, and the crate's own
/// install steps (wrappers, sandbox, pattern matcher, print) cope with a
/// set without `string`, `table` or `coroutine`: such a VM evaluates,
/// catches errors, prints, and is still stopped by a time limit.
#[test]
fn a_vm_with_the_math_library_only_works_and_stops() {
    use mlua_isle::mlua::StdLib;
    use mlua_isle::{Isle, IsleError};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    common::within("math only", || {
        for sandbox in [false, true] {
            let printed = Arc::new(Mutex::new(Vec::new()));
            let sink = printed.clone();
            let isle = Isle::builder()
                .std_libs(StdLib::MATH)
                .sandbox(sandbox)
                .print_to(move |line| sink.lock().unwrap().push(line.to_string()))
                .spawn(|_| Ok(()))
                .unwrap();
            let absent: String = isle
                .eval("return type(string) .. type(table) .. type(coroutine) .. type(io)")
                .unwrap();
            let absent_io = if sandbox { "table" } else { "nil" }; // the sandbox's stub
                                                                   // Lua 5.1 and LuaJIT open `coroutine` with the base library.
            let co = if cfg!(any(feature = "lua51", feature = "luajit")) {
                "table"
            } else {
                "nil"
            };
            assert_eq!(
                absent,
                format!("nilnil{co}{absent_io}"),
                "sandbox {sandbox}"
            );
            assert_eq!(isle.eval::<i64>("return math.max(3, 7)"), Ok(7));
            let caught: (bool, bool) = isle
                .eval("local ok, e = pcall(error, {}) return ok, type(e) == 'table'")
                .unwrap();
            assert_eq!(caught, (false, true));
            // 5.1's `load` takes a reader; Luau has `loadstring` only.
            assert_eq!(
                isle.eval::<i64>("return (loadstring or load)('return 2')()"),
                Ok(2)
            );
            isle.eval::<()>("print(1, 'a', nil)").unwrap();
            assert_eq!(*printed.lock().unwrap(), ["1\ta\tnil"]);
            let stopped = isle
                .spawn_eval::<()>("while true do end")
                .timeout(Duration::from_millis(20))
                .wait();
            assert_eq!(stopped, Err(IsleError::Timeout), "sandbox {sandbox}");
            assert_eq!(isle.eval::<i64>("return 1"), Ok(1));
        }
    });
}

/// `unsafe_std_libs` opens `debug` (for trusted code); `std_libs` refuses
/// it; the sandbox still removes it after `init`.
#[test]
fn unsafe_std_libs_opens_debug_and_std_libs_refuses_it() {
    use mlua_isle::mlua::StdLib;
    use mlua_isle::{Isle, IsleError};
    common::within("debug", || {
        let isle = Isle::builder()
            .unsafe_std_libs(StdLib::ALL_SAFE | StdLib::DEBUG)
            .spawn(|_| Ok(()))
            .unwrap();
        let tb: String = isle
            .eval("local function f() return debug.traceback('here') end return f()")
            .unwrap();
        // Luau's traceback has no header (and its `debug` no `getinfo`).
        let header = if cfg!(feature = "luau") {
            "here\n"
        } else {
            "here\nstack traceback:"
        };
        assert!(tb.starts_with(header), "{tb}");
        #[cfg(not(feature = "luau"))]
        assert_eq!(
            isle.eval::<i64>("return debug.getinfo(1, 'l').currentline"),
            Ok(1)
        );
        // (Luau's `debug` is read-only introspection: mlua counts it safe.)
        #[cfg(not(feature = "luau"))]
        {
            let refused = Isle::builder().std_libs(StdLib::DEBUG).spawn(|_| Ok(()));
            assert!(matches!(refused, Err(IsleError::Init(_))), "{refused:?}");
        }
        // The sandbox removes it from request code; init could use it.
        let isle = Isle::builder()
            .unsafe_std_libs(StdLib::ALL_SAFE | StdLib::DEBUG)
            .sandbox(true)
            .spawn(|lua| lua.load("assert(debug.traceback())").exec())
            .unwrap();
        let r = isle.eval::<()>("debug.traceback()");
        assert!(
            matches!(&r, Err(IsleError::Lua(e)) if e.message().contains("not available in the sandbox")),
            "{r:?}"
        );
    });
}

/// Lua 5.2–5.5: the catchers are C functions, invisible to Lua code: a
/// traceback taken inside `pcall`, `xpcall` (in the called function and in
/// the message handler's callee) or a `load`ed chunk, `debug.getinfo`
/// levels seen from there, and the line events of a line hook around
/// `load(s)()` (what `db.lua` checks) are those of plain mlua.
#[test]
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
fn tracebacks_levels_and_line_events_are_plain_mluas() {
    use mlua_isle::mlua::{Lua, LuaOptions, StdLib};
    use mlua_isle::Isle;
    const SCRIPT: &str = r#"
local out = {}
local function add(s) out[#out + 1] = tostring(s) end
-- Up to the main chunk: what runs the chunk below it is the host's.
local function trace(msg)
    local tb = debug.traceback(msg, 1)
    return (tb:match("^(.-main chunk)") or tb)
end
local function levels()
    local t = {}
    for level = 1, 6 do
        local info = debug.getinfo(level, "Sln")
        if not info then break end
        t[#t + 1] = info.what .. ":" .. info.short_src .. ":" .. info.currentline
            .. ":" .. tostring(info.name)
    end
    return table.concat(t, " ")
end
add(select(2, pcall(trace, "pcall")))
add(select(2, pcall(levels)))
add(select(2, xpcall(trace, print, "xpcall")))
add(select(2, xpcall(levels, print)))
add(select(2, xpcall(error, function(e) return e end, "handled")))
add(load("return ...", "=chunk")(trace("loaded")))
add(load("local trace = ... local r = trace('in chunk') return r", "=chunk")(trace))
add(load("local levels = ... local r = levels() return r", "=chunk")(levels))
add(select(3, pcall(pcall, error, "nested")))
-- Line events around `load(s)()`, as `db.lua` records them.
local lines = {}
debug.sethook(function(_, line) lines[#lines + 1] = line end, "l")
load("local a = 1\nlocal b = 2\nreturn a + b", "=chunk")(); debug.sethook()
add(table.concat(lines, ","))
-- And around a failing `pcall` and `xpcall`.
lines = {}
debug.sethook(function(_, line) lines[#lines + 1] = line end, "l")
pcall(error, "x"); xpcall(error, function(e) return e end, "y"); debug.sethook()
add(table.concat(lines, ","))
-- Yielding through them still works.
local co = coroutine.wrap(function()
    return pcall(function() return xpcall(coroutine.yield, print, "yielded") end)
end)
add(tostring(co()))
return table.concat(out, "\n---\n")
"#;
    common::within("transparent catchers", || {
        // The reference: plain mlua with every library.
        let plain = unsafe { Lua::unsafe_new_with(StdLib::ALL, LuaOptions::new()) };
        let expected: String = plain.load(SCRIPT).set_name("=t").eval().unwrap();
        let isle = Isle::builder()
            .unsafe_std_libs(StdLib::ALL)
            .spawn(|_| Ok(()))
            .unwrap();
        let ours: String = isle
            .exec(|lua| lua.load(SCRIPT).set_name("=t").eval())
            .unwrap();
        assert_eq!(ours, expected);
        // Something was compared: every section is there.
        assert_eq!(expected.matches("\n---\n").count(), 11, "{expected}");
        assert!(expected.contains("'pcall'"), "{expected}");
    });
}

/// Where the hook ticks on a count (`permanent_hook`, `max_instructions`)
/// `coroutine.create` and `coroutine.wrap` are ours (each new thread is
/// charged), and on Lua 5.4 and 5.5 `wrap` is written in Lua: their
/// argument errors read as Lua's own. (Not `pcall(coroutine.wrap)` on 5.4
/// and 5.5, where Lua names the function it finds in `coroutine` and our
/// `wrap` can only say `'wrap'`.)
#[test]
fn coroutine_constructors_argue_as_luas_own_where_the_hook_ticks() {
    use mlua_isle::Isle;
    common::within("coroutine constructors", || {
        let isle = Isle::builder()
            .permanent_hook(true)
            .spawn(|_| Ok(()))
            .unwrap();
        let plain = mlua_isle::mlua::Lua::new();
        for snippet in [
            "return select(2, pcall(coroutine.create))",
            "return select(2, pcall(coroutine.create, {}))",
            "return select(2, pcall(function() coroutine.wrap(1) end))",
            "return select(2, pcall(function() coroutine.create(1) end))",
            "return coroutine.wrap(function(...) return select('#', ...) end)(1, nil, 3)",
            "return coroutine.resume(coroutine.create(function(a) return a * 2 end), 21)",
        ] {
            let ours = isle.eval::<String>(format!(
                "return tostring(({}))",
                snippet.trim_start_matches("return ")
            ));
            let lua = plain
                .load(format!(
                    "return tostring(({}))",
                    snippet.trim_start_matches("return ")
                ))
                .set_name("=eval")
                .eval::<String>();
            assert_eq!(ours.ok(), lua.ok(), "{snippet}");
        }
    });
}
