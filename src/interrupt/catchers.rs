//! The catchers: `pcall`, `xpcall`, `load` (and kin), and the coroutine
//! functions, replaced so that the error value they catch is checked at
//! once (see the module docs of `interrupt`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlua::Lua;

use super::alarm;
use super::errors::is_memory_error;
use super::hook::Interrupt;
#[cfg(any(feature = "lua54", feature = "lua55"))]
use crate::sandbox::room::MEMORY_ERROR;
#[cfg(not(any(feature = "lua52", feature = "lua53")))]
use crate::vm::precompiled::Precompiled;

/// The guarded `coroutine.close` and `wrap` (see [`guard_close`]).
#[cfg(any(feature = "lua54", feature = "lua55"))]
static GUARD_CLOSE: Precompiled = Precompiled::new(
    "=mlua-isle",
    r##"
            local close, check, stopping, create, resume, status, memory_error,
                  type, error, select, pcall = ...
            -- Not installed where switches are tracked: the tracked close checks.
            -- Lua's errors as Lua words and places them (a tail call to a
            -- C function still leaves our frame as its caller).
            local function closed(ok, ...)
                if ok then return ... end
                local e = ...
                if e == memory_error then error(e, 0) end
                error(e, 2) -- tail-called: level 2 is our caller's caller
            end
            local function guarded_close(...)
                if stopping() then check() end
                local co = ...
                if type(co) ~= "thread" then
                    local got = select("#", ...) == 0 and "no value" or type(co)
                    error("bad argument #1 to 'close' (thread expected, got " .. got .. ")", 2)
                end
                return closed(pcall(close, co))
            end
            local function after(co, ok, ...)
                if ok then return ... end
                local err = ...
                if status(co) == "dead" and not stopping() then
                    local closed, e = close(co)
                    if not closed then err = e end
                end
                check(err)
                if err == memory_error then error(err, 0) end
                error(err, 2) -- tail-called: level 2 is the wrapped function's caller
            end
            local function wrap(...)
                local f = ...
                if type(f) ~= "function" then
                    local got = select("#", ...) == 0 and "no value" or type(f)
                    error("bad argument #1 to 'wrap' (function expected, got " .. got .. ")", 2)
                end
                local co = create(f)
                return function(...) return after(co, resume(co, ...)) end
            end
            return guarded_close, wrap
            "##,
);

/// Wraps `pcall`, `xpcall`, `coroutine.resume` and `load` (see the module
/// docs and the comments inside), and
/// makes `load`, `loadfile` and `dofile` take text only unless
/// `binary_chunks`.
pub(super) fn install_wrappers(
    lua: &Lua,
    this: &Arc<Interrupt>,
    binary_chunks: bool,
) -> mlua::Result<()> {
    let state = this.clone();
    // Converting the error value to a `Value` resumes a wrapped Rust panic.
    // Called with the error values a catcher saw (xpcall: the one its
    // handler got, and its result).
    let check = lua.create_function(move |lua, errs: mlua::Variadic<mlua::Value>| {
        if errs.iter().any(is_memory_error) {
            // ORDERING: Relaxed: only the VM thread touches it.
            state.out_of_memory.store(true, Ordering::Relaxed);
        }
        if let Some(reason) = state.stop_reason() {
            Interrupt::interrupt(&state, lua, reason)?;
        }
        Ok(())
    })?;
    let state = this.clone();
    let stopping = lua.create_function(move |_, ()| Ok(state.stop_reason().is_some()))?;
    let globals = lua.globals();
    // The host may not open `coroutine` or `string` (`std_libs`).
    let coroutine: Option<mlua::Table> = globals.get("coroutine")?;
    // Switches need tracking where the hook is armed by a signal (Luau's
    // interrupt reads the flag on every Lua thread).
    let tracked = alarm::SUPPORTED && this.on_demand.is_some();
    if let Some(coroutine) = &coroutine {
        if tracked {
            install_tracked_coroutines(lua, coroutine, &check, &stopping)?;
        } else {
            // The hook ticks on a count, which a new Lua thread starts
            // afresh (`alarm/threads.rs`). Before `guard_close`, whose
            // `wrap` calls the `create` it finds.
            let state = this.clone();
            let charge = lua.create_function(move |lua, ()| Interrupt::thread_made(&state, lua))?;
            alarm::charge_new_threads(lua, coroutine, &charge)?;
        }
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        guard_close(lua, coroutine, &check, &stopping, tracked)?;
    }
    // Lua 5.2–5.5: C functions, invisible to Lua code (`interrupt/alarm`).
    #[cfg(any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    ))]
    return alarm::install_catchers(lua, &check, &stopping, binary_chunks, !tracked);
    #[cfg(not(any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    )))]
    install_lua_catchers(
        lua,
        &check,
        &stopping,
        binary_chunks,
        tracked,
        coroutine.as_ref(),
    )
}

/// The catchers in Lua (see [`install_lua_catchers`]).
#[cfg(not(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
)))]
static CATCHERS: Precompiled = Precompiled::new("=mlua-isle", include_str!("catchers.lua"));

/// Lua 5.1, LuaJIT and Luau (no continuations for C functions to yield
/// across, or none we can reach): the catchers wrapped in Lua.
#[cfg(not(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
)))]
fn install_lua_catchers(
    lua: &Lua,
    check: &mlua::Function,
    stopping: &mlua::Function,
    binary_chunks: bool,
    tracked: bool,
    coroutine: Option<&mlua::Table>,
) -> mlua::Result<()> {
    let globals = lua.globals();
    // Lua 5.1's own overrun the stack when the callee's results fill it.
    #[cfg(feature = "lua51")]
    let (pcall, xpcall) = crate::interrupt::alarm::native::protected_calls(lua)?;
    #[cfg(not(feature = "lua51"))]
    let (pcall, xpcall): (mlua::Function, mlua::Function) =
        (globals.get("pcall")?, globals.get("xpcall")?);
    // `load`'s checks, in Rust: `string` may be missing.
    let is_binary = lua.create_function(|_, s: mlua::Value| {
        Ok(matches!(s, mlua::Value::String(s) if s.as_bytes().first() == Some(&27)))
    })?;
    let allows_text = lua.create_function(|_, mode: mlua::Value| {
        Ok(matches!(mode, mlua::Value::String(m) if m.as_bytes().contains(&b't')))
    })?;
    CATCHERS.load(lua)?.call::<()>((
        check.clone(),
        stopping.clone(),
        pcall,
        xpcall,
        match coroutine {
            Some(c) => c.get::<Option<mlua::Function>>("resume")?,
            None => None,
        },
        globals.get::<Option<mlua::Function>>("load")?,
        globals.get::<Option<mlua::Function>>("loadfile")?,
        binary_chunks,
        tracked,
        globals.get::<Option<mlua::Function>>("loadstring")?,
        cfg!(feature = "lua51"),
        is_binary,
        allows_text,
    ))
}

/// With hooks armed on demand, replaces `coroutine.resume`, `close` and
/// `wrap` with `interrupt/alarm`'s tracked versions, which also hand a failed
/// resume's error to `check`, as the wrapper above does.
fn install_tracked_coroutines(
    lua: &Lua,
    coroutine: &mlua::Table,
    check: &mlua::Function,
    stopping: &mlua::Function,
) -> mlua::Result<()> {
    let (resume, close) = alarm::tracked_resume_close(lua, check)?;
    // A wrapped coroutine's error is raised as Lua's `coroutine.wrap`
    // raises it, after the check (see `alarm::tracked_wrap_with`).
    let wrap = alarm::tracked_wrap_with(lua, check, close.as_ref(), stopping)?;
    coroutine.set("resume", resume)?;
    if let Some(close) = close {
        coroutine.set("close", close)?;
    }
    coroutine.set("wrap", wrap)
}

/// Lua 5.4 and 5.5: a coroutine killed by an error raised in a hook (the
/// interruption) keeps hooks disabled (Lua leaves its `allowhook` at 0), so
/// closing it would run its `__close` handlers where nothing can stop them.
/// While a request is stopping, `coroutine.close` raises the interruption
/// instead of closing (as the tracked `coroutine.wrap` skips closing): the
/// coroutine stays dead with its variables unclosed, as after an error
/// nobody closes.
///
/// Where switches are not tracked, Lua's own `coroutine.wrap` would close
/// such a coroutine: it is replaced by one that does what 5.4's does (close
/// a coroutine that died by an error, put the caller's position in front
/// of a string error, raise a memory error as is), but skips the closing
/// while the request stops, and hands the error to `check`.
#[cfg(any(feature = "lua54", feature = "lua55"))]
fn guard_close(
    lua: &Lua,
    coroutine: &mlua::Table,
    check: &mlua::Function,
    stopping: &mlua::Function,
    tracked: bool,
) -> mlua::Result<()> {
    if tracked {
        return Ok(()); // the tracked close checks
    }
    let (close, wrap): (mlua::Function, mlua::Function) = GUARD_CLOSE.load(lua)?.call((
        coroutine.get::<mlua::Function>("close")?,
        check.clone(),
        stopping.clone(),
        coroutine.get::<mlua::Function>("create")?,
        coroutine.get::<mlua::Function>("resume")?,
        coroutine.get::<mlua::Function>("status")?,
        MEMORY_ERROR,
        lua.globals().get::<mlua::Function>("type")?,
        lua.globals().get::<mlua::Function>("error")?,
        lua.globals().get::<mlua::Function>("select")?,
        lua.globals().get::<mlua::Function>("pcall")?,
    ))?;
    coroutine.set("close", close)?;
    coroutine.set("wrap", wrap)
}
