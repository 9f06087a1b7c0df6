//! Errors raised through the sandbox's replacements (and the interruption
//! wrappers of `pcall`, `xpcall`, `load`) read as Lua's own: same message,
//! the caller's position, the function named as Lua names it. Each snippet
//! runs in a sandboxed isle and in plain mlua (same backend); only the
//! sandbox's documented refusals may differ.

use crate::common;

use mlua_isle::mlua::Lua;
use mlua_isle::Isle;

/// Runs a snippet as chunk `eval` and describes how it ended.
const HARNESS: &str = r#"
local src = ...
local f, e = (loadstring or load)(src, "=eval") -- 5.1: load takes a reader; Luau: no load
if not f then return "compile: " .. tostring(e) end
local ok, e = pcall(f)
return tostring(ok) .. " " .. tostring(e)
"#;

/// Snippets whose outcome must be Lua's.
const SAME: &[&str] = &[
    "string.find('x', '%')",
    "string.find()",
    "local s = 'x' s:find('%')",
    "string.find('x', '[a')",
    "string.match(1, {})",
    "string.gmatch()",
    "string.gsub('x', '(', '')",
    "('x'):gsub('x', '%2')",
    "string.rep()",
    "string.rep({})",
    "string.rep('x', 'y')",
    "setmetatable(1)",
    "setmetatable({}, 1)",
    "setmetatable({})",
    "collectgarbage('bad')",
    "collectgarbage(1)",
    "collectgarbage({})",
    "table.concat({{}})",
    "table.concat({1, 2}, 1, 1, 'x')",
    "table.insert({}, 1, 2, 3)",
    "table.insert(1, 2)",
    "table.insert()",
    "table.remove(1)",
    "table.sort({3, 2, 1}, 1)",
    "table.sort(1)",
    "table.sort({1, 2, 3}, function(a, b) error('cmp') end)",
    "local t = setmetatable({}, {__index = function() error('boom') end}) return t.x",
    "table.concat(setmetatable({}, {__index = function() return {} end, __len = function() return 1 end}))",
    "local t = setmetatable({}, {}) table.insert(t, 'a') table.insert(t, 1, 'b') \
     assert(t[1] == 'b' and t[2] == 'a') assert(table.remove(t, 1) == 'b') error(#t)",
    "require()",
    "require({})",
    "load()",
    "load(nil)",
    "load({})",
    "load('x =', 'c')",
    "pcall()",
    "rawget()",
    "rawget(1)",
    "rawget(string)",
    "rawset(1)",
    "rawset({})",
    "next(1)",
    "next({}, 'nope')",
    "pairs()",
    "ipairs()",
    "coroutine.wrap(function() error('x') end)()",
    "error()",
    "error('msg', 2)",
];

/// `xpcall`'s argument check (Luau and 5.1 word theirs otherwise).
#[cfg(not(any(feature = "lua51", feature = "luau", feature = "luajit")))]
const SAME_XPCALL: &[&str] = &[
    "xpcall()",
    "xpcall(print)",
    "xpcall(print, nil)",
    "xpcall(print, {})",
];
#[cfg(any(feature = "lua51", feature = "luau", feature = "luajit"))]
const SAME_XPCALL: &[&str] = &[];

/// Snippets whose outcome is Lua 5.2+'s: on 5.1 and LuaJIT the sandbox's
/// `table.insert`/`remove` on tables with a metatable check positions as
/// 5.4 does, and the untracked `coroutine.resume` wrapper names no function
/// in its argument error (known differences).
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
const SAME_5_2: &[&str] = &[
    "table.insert(setmetatable({}, {}), 5, 1)",
    "table.remove(setmetatable({}, {}), 5)",
    "coroutine.resume()",
];
#[cfg(any(feature = "lua51", feature = "luajit"))]
const SAME_5_2: &[&str] = &[];

/// Known differences on Luau (skipped there): the sandbox's `table.concat`,
/// `insert` and `remove` check as Lua 5.4 does, our `pcall` words its
/// argument error as 5.4's, and mlua's Luau `require` is written in Lua
/// (its errors carry its own position).
const NOT_ON_LUAU: &[&str] = &[
    "table.concat({{}})",
    "table.concat(setmetatable({}, {__index = function() return {} end, __len = function() return 1 end}))",
    "require()",
    "require({})",
    "pcall()",
    "os.exit()", // Luau has none: nothing to refuse
    "table.insert(setmetatable({}, {}), 5, 1)",
    "table.remove(setmetatable({}, {}), 5)",
    "coroutine.resume()",
];

/// Known differences on Lua 5.2 and 5.3 (skipped there): the sandbox's
/// `table.*` on tables with a metatable check as Lua 5.4 does (5.3's
/// `remove` blames argument #1; 5.2's `concat` reads raw).
const NOT_ON_5_2_5_3: &[&str] = &[
    "table.remove(setmetatable({}, {}), 5)",
    "table.concat(setmetatable({}, {__index = function() return {} end, __len = function() return 1 end}))",
];

/// Whether `snippet` is compared on this backend.
fn compared(snippet: &&&str) -> bool {
    let skipped: &[&str] = if cfg!(feature = "luau") {
        NOT_ON_LUAU
    } else if cfg!(any(feature = "lua52", feature = "lua53")) {
        NOT_ON_5_2_5_3
    } else {
        &[]
    };
    !skipped.contains(snippet)
}

/// Snippets the sandbox refuses: its own message, at the caller's position.
const REFUSED: &[&str] = &[
    "collectgarbage('stop')",
    "setmetatable({}, {__gc = function() end})",
    "table.insert(string, 1)",
    "table.remove(string)",
    "table.sort(string)",
    "rawset(string, 1, 2)",
    "require('no such module')",
    "io.write('x')",
    "debug.traceback()",
    "os.exit()",
];

#[test]
fn sandbox_errors_read_as_lua_s_own() {
    common::within("sandbox errors", || {
        let isle = Isle::builder()
            .sandbox(true)
            .spawn(|lua| {
                let harness = lua.load(HARNESS).set_name("=harness").into_function()?;
                lua.globals().set("harness", harness)
            })
            .unwrap();
        let plain = Lua::new();
        let harness = plain.load(HARNESS).into_function().unwrap();
        let mut diffs = Vec::new();
        for snippet in SAME
            .iter()
            .chain(SAME_XPCALL)
            .chain(SAME_5_2)
            .filter(compared)
        {
            let ours = isle.call::<String>("harness", *snippet).unwrap();
            let lua = harness.call::<String>(*snippet).unwrap();
            if ours != lua {
                diffs.push(format!("{snippet}\n  sandbox: {ours}\n  lua:     {lua}"));
            }
        }
        assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
        for snippet in REFUSED.iter().filter(compared) {
            let ours = isle.call::<String>("harness", *snippet).unwrap();
            assert!(
                ours.starts_with("false eval:1: ") && ours.contains("sandbox"),
                "{snippet}: {ours}"
            );
        }
    });
}

/// Outside the sandbox too, the interruption wrappers check arguments as
/// Lua does, and place the error at the caller.
#[test]
fn wrapped_catchers_check_arguments_as_lua_does() {
    common::within("wrapper errors", || {
        let isle = Isle::spawn(|lua| {
            let harness = lua.load(HARNESS).set_name("=harness").into_function()?;
            lua.globals().set("harness", harness)
        })
        .unwrap();
        let plain = Lua::new();
        let harness = plain.load(HARNESS).into_function().unwrap();
        let snippets = ["pcall()", "pcall(nil)", "load()", "load(nil)", "load({})"];
        for snippet in snippets
            .iter()
            .chain(SAME_XPCALL)
            .chain(SAME_5_2)
            .filter(compared)
        {
            let ours = isle.call::<String>("harness", *snippet).unwrap();
            let lua = harness.call::<String>(*snippet).unwrap();
            assert_eq!(ours, lua, "{snippet}");
        }
    });
}
