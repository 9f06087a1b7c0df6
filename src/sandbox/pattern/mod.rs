//! Lua 5.4's pattern matching (`string.find`, `match`, `gmatch`, `gsub`) in
//! Rust, with a step budget.
//!
//! Lua's own matcher backtracks without executing a single Lua instruction,
//! so the count hook can never interrupt it: `string.find(('a'):rep(30),
//! ('a?'):rep(30) .. ('a'):rep(30))` runs for minutes. This matcher has the
//! structure of `lstrlib.c` (the same recursion, limited to the same 200
//! levels, the same loops for `*`, `+`, `-` and `?`, the same errors) and
//! counts its steps: every pass through the core routine, every character a
//! quantifier, `%b` or a plain search tries, and one per 32 bytes of sets
//! scanned and of text compared (back references, plain search). Every
//! [`POLL_EVERY`] steps (counted across calls) it calls a [`Poll`]
//! callback; an error from the callback ends the call with that error, as
//! is (an mlua error value, not a string).
//!
//! Semantics are Lua 5.4's, on bytes, with C-locale character classes;
//! arguments are checked and converted as `lauxlib.c` does, with the same
//! messages ("bad argument #2 to 'find' (string expected, got nil)"), the
//! function named from the call site as `luaL_argerror` does.
//!
//! Errors Lua raises with `luaL_error` must reach Lua code as plain
//! strings, as the C functions raise them, not as mlua error userdata.
//! Rust cannot raise a Lua string error, so each function is a small Lua
//! wrapper around the Rust one: the Rust side returns a private tag and the
//! message, and the wrapper calls `error(message, 2)`, which gives the
//! message the caller's position, as `luaL_error` does. For the same reason
//! `gsub` calls a replacement function (or indexes a replacement table)
//! from its Lua wrapper, between steps of the Rust matcher: what that
//! function raises keeps its value, as through `lua_call`.
//!
//! What differs from C (the tests compare everything else with Lua's own
//! functions):
//! - a tail call (`return s:find(p)`) replaces the caller's frame with the
//!   wrapper's, where C keeps it for a C function: an error then carries
//!   the position of the caller's caller (none if that is not Lua code),
//!   and an argument error names the function `'string.find'`;
//! - a replacement function may yield, where C's `gsub` fails with
//!   "attempt to yield across a C-call boundary";
//! - the four functions are Lua functions (`debug.getinfo` says so, and
//!   `string.dump` accepts them);
//! - the `__name` in a bad argument message is read through
//!   `getmetatable`, so a userdata that hides its metatable is named
//!   `userdata`;
//! - each call costs more: about 0.5 us more than C's for a short find
//!   (mlua's call and string access), 2-4x C's time per match for `gmatch`
//!   and `gsub` with a function; matching itself takes 0.6-2x C's time.

use std::borrow::Cow;
use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use mlua::{Function, IntoLuaMulti, Lua, LuaString, MultiValue, Table, Value};

use crate::sandbox::room::{self, MEMORY_ERROR};
use crate::vm::precompiled::Precompiled;

mod args;
mod budget;
mod functions;
mod matcher;

use args::*;
use budget::*;
use functions::*;
use matcher::*;

/// Called every [`POLL_EVERY`] matcher steps with the steps since the last
/// call.
pub(crate) type Poll = Arc<dyn Fn(&Lua, u32) -> mlua::Result<()> + Send + Sync>;

/// Matcher steps between two calls of the [`Poll`] callback.
pub(super) const POLL_EVERY: u32 = 1000;

/// `LUA_MAXCAPTURES`.
const MAX_CAPTURES: usize = 32;
/// `MAXCCALLS`: nesting of the core routine before "pattern too complex".
const MAX_DEPTH: u32 = 200;
const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;
/// A pattern without these is searched for as plain text by `find`.
const SPECIALS: &[u8] = b"^$*+?.([%-";
/// Bytes of set or compared text that count as one step.
const BYTES_PER_STEP: usize = 32;

/// Replaces `find`, `match`, `gmatch` and `gsub` in `string` (a table) with
/// the budgeted matcher.
pub(crate) fn install(lua: &Lua, string: &Table, poll: Poll) -> mlua::Result<()> {
    install_ctx(
        lua,
        string,
        Arc::new(PatternCtx {
            poll,
            pending: AtomicU32::new(0),
        }),
    )
}

/// Shared by the four functions of one VM.
struct PatternCtx {
    poll: Poll,
    /// Steps counted since the last poll, carried from call to call.
    pending: AtomicU32,
}

/// Private values the Rust functions hand to the Lua wrappers.
struct Tags {
    /// Followed by a message: raise it as a Lua error.
    err: Table,
    /// `gsub` with a function or table: followed by the step function and
    /// the replacement.
    go: Table,
    /// Followed by the captures: call the replacement function with them.
    call: Table,
    /// Followed by the first capture: index the replacement table with it.
    index: Table,
    /// Lua's `getmetatable`, for the `__name` of userdata in messages.
    getmetatable: Function,
}

/// The Lua side of the string functions: tail calls around the Rust ones,
/// so errors and positions are placed as Lua's own functions place them.
static GLUE: Precompiled = Precompiled::new("=mlua-isle patterns", include_str!("glue.lua"));

fn install_ctx(lua: &Lua, string: &Table, ctx: Arc<PatternCtx>) -> mlua::Result<()> {
    // Arc, not Rc: `Tags` is Send + Sync when mlua's `send` feature is on,
    // and mlua then requires Send closures.
    #[allow(clippy::arc_with_non_send_sync)]
    let tags = Arc::new(Tags {
        err: lua.create_table()?,
        go: lua.create_table()?,
        call: lua.create_table()?,
        index: lua.create_table()?,
        getmetatable: lua.globals().get("getmetatable")?,
    });
    let rust = |f: fn(&Lua, &Arc<PatternCtx>, &Arc<Tags>, &MultiValue) -> Res<MultiValue>| {
        let (ctx, tags) = (ctx.clone(), tags.clone());
        lua.create_function(move |lua, args: MultiValue| {
            deliver(lua, &tags, f(lua, &ctx, &tags, &args))
        })
    };
    let find_rs = rust(|lua, ctx, tags, args| str_find_aux(lua, ctx, tags, args, true))?;
    let match_rs = rust(|lua, ctx, tags, args| str_find_aux(lua, ctx, tags, args, false))?;
    let gmatch_rs = rust(gmatch)?;
    let gsub_rs = rust(gsub)?;
    let error: Function = lua.globals().get("error")?;
    let (find, match_, gmatch, gsub): (Function, Function, Function, Function) =
        GLUE.load(lua)?.call((
            tags.err.clone(),
            tags.go.clone(),
            tags.call.clone(),
            tags.index.clone(),
            find_rs,
            match_rs,
            gmatch_rs,
            gsub_rs,
            error,
        ))?;
    // What each replaces, for the sandbox: a table `init` shared may hold
    // Lua's own (`sandbox.lua`, `replaced`).
    let replaced = lua.create_table()?;
    for (name, ours) in [
        ("find", find),
        ("match", match_),
        ("gmatch", gmatch),
        ("gsub", gsub),
    ] {
        if let Some(lua_s) = string.raw_get::<Option<Function>>(name)? {
            replaced.raw_set(lua_s, &ours)?;
        }
        string.set(name, ours)?;
    }
    lua.set_named_registry_value(super::REPLACED, replaced)
}

/// Why a call stopped early. Boxed, so that results stay small through the
/// recursion.
struct Fail(Box<FailKind>);

enum FailKind {
    /// An error Lua raises as a string (`luaL_error`).
    Lua(String),
    /// An error from the poll callback or from mlua, returned as is.
    Stop(mlua::Error),
    /// Lua's memory error: what we build does not fit under the VM's
    /// memory limit (`room.rs`).
    Memory,
}

impl Fail {
    #[cold]
    #[inline(never)]
    fn lua(msg: String) -> Fail {
        Fail(Box::new(FailKind::Lua(msg)))
    }

    #[cold]
    #[inline(never)]
    fn stop(e: mlua::Error) -> Fail {
        Fail(Box::new(FailKind::Stop(e)))
    }

    #[cold]
    #[inline(never)]
    fn memory() -> Fail {
        Fail(Box::new(FailKind::Memory))
    }

    #[cold]
    #[inline(never)]
    fn capture_index(l: usize) -> Fail {
        Fail::lua(format!("invalid capture index %{l}"))
    }
}

impl From<mlua::Error> for Fail {
    fn from(e: mlua::Error) -> Self {
        Fail::stop(e)
    }
}

#[cold]
#[inline(never)]
fn lua_err<T>(msg: &str) -> Res<T> {
    Err(Fail::lua(msg.to_string()))
}

type Res<T> = Result<T, Fail>;

/// Hands a result to the Lua wrapper.
fn deliver(lua: &Lua, tags: &Tags, r: Res<MultiValue>) -> mlua::Result<MultiValue> {
    match r {
        Ok(v) => Ok(v),
        Err(Fail(fail)) => match *fail {
            FailKind::Lua(msg) => (tags.err.clone(), msg).into_lua_multi(lua),
            // Raised as Lua raises it (`luaL_Buffer`, `lua_pushlstring`):
            // the bare message, which `error` turns into a memory error.
            FailKind::Memory | FailKind::Stop(mlua::Error::MemoryError(_)) => {
                (tags.err.clone(), MEMORY_ERROR, 0).into_lua_multi(lua)
            }
            FailKind::Stop(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests;
