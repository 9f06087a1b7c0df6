//! The official Lua 5.4.8 test files (`tests/lua-testes/`, Lua's MIT
//! licence in its `LICENSE`) run through an isle and through plain mlua,
//! with every library (`unsafe_std_libs(ALL)`: they need `debug`), in
//! portable and soft mode (`_port`, `_soft`). Each file must end the same
//! way in both. Files known to differ are listed in
//! `tests/lua-testes/README.md`, with why.
#![cfg(feature = "lua54")]

mod common;

use mlua_isle::mlua::{Lua, LuaOptions, StdLib};
use mlua_isle::Isle;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/lua-testes");

/// Files that must end as in plain mlua.
const FILES: &[&str] = &[
    "calls",
    "errors",
    "coroutine",
    "nextvar",
    "strings",
    "pm",
    "sort",
    "closure",
    "goto",
    "locals",
    "literals",
    "vararg",
    "events",
    "constructs",
    "tpack",
    "utf8",
    "math",
    "bitwise",
    "db",
];

/// Files that still differ (see the README): run, outcome reported, not
/// compared.
const KNOWN_DIFFERENT: &[&str] = &[];

/// Portable, soft mode; helper modules (`tracegc`, `bwcoercion`) from
/// the folder.
fn prelude() -> String {
    format!("_port = true _soft = true package.path = '{DIR}/?.lua;' .. package.path")
}

/// How running `file` ended: "ok" or the error message.
fn run_plain(file: &str) -> String {
    let source = std::fs::read(format!("{DIR}/{file}.lua")).unwrap();
    // The reference VM, as `unsafe_std_libs(ALL)` makes ours.
    let lua = unsafe { Lua::unsafe_new_with(StdLib::ALL, LuaOptions::new()) };
    lua.load(prelude()).exec().unwrap();
    match lua.load(&source).set_name(format!("@{file}.lua")).exec() {
        Ok(()) => "ok".into(),
        Err(e) => first_line(&e.to_string()),
    }
}

fn run_isle(isle: &Isle, file: &str) -> String {
    let source = std::fs::read(format!("{DIR}/{file}.lua")).unwrap();
    let name = format!("@{file}.lua");
    let r = isle.exec(move |lua| lua.load(&source).set_name(name).exec());
    match r {
        Ok(()) => "ok".into(),
        Err(e) => first_line(&e.to_string()),
    }
}

/// The message's first line, without `IsleError`'s "Lua " in front.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.strip_prefix("Lua ").unwrap_or(line).to_string()
}

#[test]
fn lua_5_4_8_test_files_end_as_in_plain_mlua() {
    let mut diffs = Vec::new();
    for file in FILES.iter().chain(KNOWN_DIFFERENT) {
        // One watchdog per file.
        let diff = common::within(file, move || {
            let isle = Isle::builder()
                .unsafe_std_libs(StdLib::ALL)
                // They load what `string.dump` makes.
                .allow_binary_chunks(true)
                .spawn(|lua| lua.load(prelude()).exec())
                .unwrap();
            let ours = run_isle(&isle, file);
            let plain = run_plain(file);
            eprintln!("{file}.lua: isle {ours:?}, plain {plain:?}");
            (ours != plain && !KNOWN_DIFFERENT.contains(file))
                .then(|| format!("{file}.lua\n  isle:  {ours}\n  plain: {plain}"))
        });
        diffs.extend(diff);
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
