//! `sandbox(true)`: what Lua code may not do.
//!
//! Applied once per VM, right after `init` (which is trusted: it may use any
//! library to set things up, and may extend the library tables before they
//! are frozen). From then on:
//! - `io`, `debug`, `package`, `loadfile`, `dofile`, and `os.exit`,
//!   `os.execute`, `os.remove`, `os.rename`, `os.getenv`, `os.tmpname`,
//!   `os.setlocale` (and LuaJIT's `jit.on`, `jit.opt`, `jit.attach`: the
//!   JIT must stay off for cancellation) raise "... is not available in the
//!   sandbox";
//! - `require` returns only modules already loaded (by `init`), never loads
//!   one, so no C module and no file can be loaded;
//! - `collectgarbage` accepts only `collect`, `count`, `step` and
//!   `isrunning`: the collector cannot be stopped or retuned;
//! - `string.find`, `match`, `gmatch` and `gsub` are `pattern.rs`'s
//!   matcher, which a cancel, a time limit or the instruction budget can
//!   stop (Lua's C matcher backtracks for minutes out of any hook's reach);
//! - `setmetatable` refuses metatables with `__gc`: finalizers run with hooks
//!   disabled, so one that loops could never be interrupted; for the same
//!   reason `newproxy` (Lua 5.1, LuaJIT, Luau) is unavailable, whose
//!   userdata have a metatable Lua code can write;
//! - the library tables (`string`, `table`, `math`, `utf8`, `coroutine`,
//!   `os`, `bit32`, `bit`, `jit` where they exist, and every table module `init` loaded) are replaced by read-only
//!   views; the string metatable and the views' metatables are hidden, and
//!   `rawset` refuses the views (`pairs` and `ipairs` iterate them; `#`
//!   gives 0 on Lua 5.1 and LuaJIT, which ignore `__len` on tables).
//!
//! Functions defined by `init` that look up a removed library by its global
//! name at call time will fail under the sandbox; capture what they need in
//! locals instead. SECURITY.md says what this does not protect.

use mlua::{Function, Lua, Table};

/// Where `apply` keeps the table sessions read globals through.
const SESSION_GLOBALS: &str = "mlua-isle session globals";
/// Where `apply` keeps Lua's own `setfenv`.
const SETFENV: &str = "mlua-isle setfenv";

/// Applies the sandbox to `lua` (see the module docs). `load` refuses
/// sources longer than `max_source` bytes.
pub(crate) fn apply(lua: &Lua, max_source: usize) -> mlua::Result<()> {
    let (base, setfenv): (Table, Option<Function>) = lua
        .load(SANDBOX)
        .set_name("=mlua-isle sandbox")
        .call(max_source)?;
    lua.set_named_registry_value(SESSION_GLOBALS, base)?;
    lua.set_named_registry_value(SETFENV, setfenv)
}

/// Lua's own `setfenv` (5.1, LuaJIT, Luau), which the sandbox replaces.
pub(crate) fn setfenv(lua: &Lua) -> mlua::Result<Option<Function>> {
    lua.named_registry_value(SETFENV)
}

/// In a sandboxed VM, the globals as `init` and the sandbox left them (a
/// copy: what unkeyed work later sets or rebinds is not in it), which
/// session environments read through; `None` without the sandbox.
pub(crate) fn session_globals(lua: &Lua) -> mlua::Result<Option<Table>> {
    lua.named_registry_value(SESSION_GLOBALS)
}

const SANDBOX: &str = include_str!("sandbox/sandbox.lua");
