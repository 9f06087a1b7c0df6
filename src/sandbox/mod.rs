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
//! - `string.find`, `match`, `gmatch` and `gsub` are `sandbox/pattern`'s
//!   matcher, which a cancel, a time limit or the instruction budget can
//!   stop (Lua's C matcher backtracks for minutes out of any hook's reach);
//! - `setmetatable` refuses metatables with `__gc`: finalizers run with hooks
//!   disabled, so one that loops could never be interrupted; for the same
//!   reason `newproxy` (Lua 5.1, LuaJIT, Luau) is unavailable, whose
//!   userdata have a metatable Lua code can write;
//! - request code never holds a writable shared table: the library tables
//!   (`string`, `table`, `math`, `utf8`, `coroutine`, `os`, `bit32`, `bit`,
//!   `jit`, `buffer`, `vector` where they exist), every table `init` put in
//!   the globals (`config`, `api`, ...) and every module `init` loaded are
//!   replaced by read-only views. A view is an empty table whose hidden
//!   metatable reads through to its table and refuses every write; what it
//!   hands out (fields, keys, `pairs`/`next`/`ipairs` iteration, `rawget`)
//!   is a view again when it is a table, made on first use and kept, so
//!   `config.nested == config.nested`. Views forward their table's
//!   operators (`__call`, `__tostring`, `__eq`, arithmetic, ...) with the
//!   view as operand, so a method of a shared object gets the view as
//!   `self` and cannot change the object either. `#view` is the table's
//!   length (0 on Lua 5.1 and LuaJIT, which ignore `__len` on tables;
//!   `table.*` use the real length there). `rawset`, `setmetatable` and
//!   every `table.*` function that writes refuse views with an error
//!   saying so; the string metatable is hidden;
//! - sessions read globals through a copy of the globals taken right after
//!   the sandbox: unkeyed work shares the VM's globals and may rebind them
//!   (`config = ...`), but sessions never see that, nor globals unkeyed work
//!   adds; where functions carry environments (5.1, LuaJIT, Luau),
//!   `getfenv` never hands session code the shared globals, and `setfenv`
//!   cannot replace the environment of a shared function or of the thread;
//! - C loops a hook cannot stop are bounded: `table.insert`, `remove`,
//!   `sort`, `concat`, `unpack` and `move` loop in Lua (where the hook
//!   reaches them) on tables with a metatable (whose `__len` can say
//!   anything), `table.move` over more than 65536 elements too;
//!   `string.rep('', n)` returns at once; `load` refuses sources longer than
//!   `max_load_size` (compiling cannot be interrupted).
//!
//! Errors read as Lua's own: a replacement that calls Lua's C function
//! does it through `pcall` and a small Lua function named as the library
//! names it, then puts the caller's position in front of an error the C
//! function raised (`eval:1: bad argument #1 to 'rep' (string expected, got
//! no value)`); errors raised further in (a comparator, a metamethod) pass
//! unchanged, and missing arguments stay "no value". The differences left
//! (`tests/hostile/sandbox_errors.rs` compares with plain Lua): a function called
//! under another name (`local r = string.rep; r()`) is named as the library
//! names it; a replacement tail-called (`return string.rep()`) places the
//! error at the caller's caller, as a Lua function would; the sandbox's
//! refusals are its own messages, at the caller's position.
//!
//! Functions defined by `init` keep whatever they captured: a function that
//! holds a shared table in an upvalue (`local config = config`) reads and
//! writes the real table, and what it returns is not wrapped; that is the
//! host's API, so keep mutable state out of it or make it per-session.
//! Functions that name a shared table as a global at call time get its view
//! (and fail if they write it).
//!
//! Functions defined by `init` that look up a removed library by its global
//! name at call time will fail under the sandbox; capture what they need in
//! locals instead. SECURITY.md says what this does not protect.

#[cfg(any(feature = "lua54", feature = "lua55"))]
pub(crate) mod pattern;
pub(crate) mod print;
pub(crate) mod room;

use mlua::{Function, Lua, Table};

use crate::vm::precompiled::Precompiled;

/// Where `apply` keeps the table sessions read globals through.
const SESSION_GLOBALS: &str = "mlua-isle session globals";
/// Where `apply` keeps Lua's own `setfenv`.
const SETFENV: &str = "mlua-isle setfenv";
/// Where `apply` keeps `adopt` (see [`adopt`]).
const ADOPT: &str = "mlua-isle sandbox adopt";
/// Where the functions the crate replaced before the sandbox ran (Lua's
/// pattern functions, on 5.4 and 5.5) are kept, each with its replacement.
const REPLACED: &str = "mlua-isle replaced";
/// Where `apply` keeps `set_session_finder` (see [`session_finder`]).
const SESSION_FINDER: &str = "mlua-isle sandbox session finder";

/// Applies the sandbox to `lua` (see the module docs). `load` refuses
/// sources longer than `max_source` bytes.
pub(crate) fn apply(lua: &Lua, max_source: usize) -> mlua::Result<()> {
    let (base, setfenv, adopt, finder): (Table, Option<Function>, Function, Function) =
        SANDBOX.load(lua)?.call((
            max_source,
            lua.named_registry_value::<Option<Table>>(REPLACED)?,
            // Where a level given to `setfenv` cannot be trusted: LuaJIT
            // leaves no trace of a tail call on its stack, and Luau names
            // no call (a metamethod's is not told from a plain one).
            cfg!(any(feature = "luajit", feature = "luau")),
            // Luau's plain `find` and `split` search in C, with no
            // interrupt: the sandbox sends long needles to its matcher.
            cfg!(feature = "luau"),
        ))?;
    lua.unset_named_registry_value(REPLACED)?;
    lua.set_named_registry_value(SESSION_GLOBALS, base)?;
    lua.set_named_registry_value(ADOPT, adopt)?;
    lua.set_named_registry_value(SESSION_FINDER, finder)?;
    lua.set_named_registry_value(SETFENV, setfenv)
}

/// In a sandboxed VM, the Lua function `adopt(key)`, for a global the host
/// set after the sandbox (a pool's reload): a table there is replaced by
/// its read-only view, and the global goes into the copy sessions read
/// ([`session_globals`]). `None` without the sandbox.
pub(crate) fn adopt(lua: &Lua) -> mlua::Result<Option<Function>> {
    lua.named_registry_value(ADOPT)
}

/// In a sandboxed VM, the Lua function `set_session_finder(f)`: the VM's
/// `load` and `loadstring` then give a chunk the environment `f()` returns
/// (the calling session's, or `nil`) when not given one. `None` without
/// the sandbox.
pub(crate) fn session_finder(lua: &Lua) -> mlua::Result<Option<Function>> {
    lua.named_registry_value(SESSION_FINDER)
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

static SANDBOX: Precompiled = Precompiled::new("=mlua-isle sandbox", include_str!("sandbox.lua"));
