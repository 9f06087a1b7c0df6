//! Where Lua's `print` writes: the host's choice (`print_to`,
//! `discard_print`); by default stdout, or nowhere in the sandbox. And,
//! whatever the choice, the lines of a request the host captures
//! (`capture_print`, `host/capture.rs`): those go to the request's
//! [`Capture`] instead.
//!
//! `print` is always ours, so that a capture catches every way of calling
//! it (`local p = print`, `pcall(print, ..)`, `string.gsub(s, p, print)`):
//! which request a line belongs to is decided when `print` runs, by the
//! capture current on the VM thread (see [`CURRENT`]). Where `print` stays
//! Lua's own (`Default` outside the sandbox), ours calls Lua's C `print`
//! unless a capture is current, so uncaptured output is byte for byte what
//! it was (also its order with `io.write`, which shares C's stdout
//! buffer). On Lua 5.2-5.5 ours is then a C function running Lua's on its
//! own frame (`interrupt/alarm/protected/print.rs`): to Lua code it is
//! Lua's `print` (a C function, its errors and tracebacks Lua's). On Lua
//! 5.1, LuaJIT and Luau it is written in Lua (one more frame in a
//! traceback taken inside a `__tostring` it calls; `string.dump` accepts
//! it).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua, Table, Value};

use crate::vm::precompiled::Precompiled;

/// A host's sink for printed lines.
pub(super) type Sink = Arc<dyn Fn(&str) + Send + Sync + 'static>;

/// Where `print` goes.
#[derive(Clone, Default)]
pub(crate) enum Print {
    /// Lua's own `print` (stdout), or, in the sandbox, nowhere.
    #[default]
    Default,
    /// Formatted as Lua does, then dropped.
    Discard,
    /// Each line (without its newline) to the host's function.
    To(Sink),
}

impl fmt::Debug for Print {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Print::Default => "Default",
            Print::Discard => "Discard",
            Print::To(_) => "To(..)",
        })
    }
}

thread_local! {
    /// The capture of the request running on this thread, if the host
    /// captures its prints: part of the request's scope (`vm/scope.rs`),
    /// kept here, below the VM layer, for `print` to read. Set by the
    /// request's work when it starts (`Capture::begin`), and swapped in
    /// and out with the rest of its scope around its run and every later
    /// poll, so between requests (init, reloads, the collector's
    /// finalizers after a request) there is none. A `Cell` of an `Rc`:
    /// `take` and `set`, no borrow flag, no allocation.
    static CURRENT: Cell<Option<Rc<Capture>>> = const { Cell::new(None) };
}

/// Makes `capture` current, and returns the one current before (a
/// request's scope is entered or left: `vm/scope.rs`).
pub(crate) fn replace_current(capture: Option<Rc<Capture>>) -> Option<Rc<Capture>> {
    CURRENT.replace(capture)
}

/// True if a capture is current (never while the thread's locals are
/// being destroyed: a VM dropped then may still run finalizers).
pub(crate) fn capturing() -> bool {
    CURRENT
        .try_with(|c| {
            let capture = c.take();
            let some = capture.is_some();
            c.set(capture);
            some
        })
        .unwrap_or(false)
}

/// The current capture (a clone of the `Rc`: what `print` runs may print
/// again while it is held).
fn current() -> Option<Rc<Capture>> {
    CURRENT
        .try_with(|c| {
            let capture = c.take();
            let copy = capture.clone();
            c.set(capture);
            copy
        })
        .ok()
        .flatten()
}

/// How a captured request's work ended, for the pool's metrics: a request
/// that resolves with its lines has produced a value, which may hold an
/// error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Not yet, or stopped (the request's own outcome says how).
    Running,
    Completed,
    Failed,
    OutOfMemory,
}

/// The lines one request printed, bounded: whole lines, as long as their
/// bytes (each line's, plus one for its newline) fit in `limit`; past
/// that, nothing more is kept and `truncated` is set.
pub(crate) struct Capture {
    limit: usize,
    used: Cell<usize>,
    lines: RefCell<Vec<String>>,
    truncated: Cell<bool>,
    /// The work has its result and the lines are taken: what the request
    /// prints from now on (its coroutines' close handlers, its children
    /// being cancelled) is still its own, and kept by nobody.
    closed: Cell<bool>,
    ended: Cell<Ended>,
}

impl Capture {
    /// A capture for the request starting now, made current.
    pub(crate) fn begin(limit: usize) -> Rc<Capture> {
        let capture = Rc::new(Capture {
            limit,
            used: Cell::new(0),
            lines: RefCell::new(Vec::new()),
            truncated: Cell::new(false),
            closed: Cell::new(false),
            ended: Cell::new(Ended::Running),
        });
        replace_current(Some(capture.clone()));
        capture
    }

    /// The lines so far and whether some were left out; the capture keeps
    /// no more after this. `ended`: how the work ended.
    pub(crate) fn finish(&self, ended: Ended) -> (Vec<String>, bool) {
        self.closed.set(true);
        self.ended.set(ended);
        (self.lines.take(), self.truncated.get())
    }

    pub(crate) fn ended(&self) -> Ended {
        self.ended.get()
    }

    /// Keeps the line `parts[1..=n]` (tab separated) if it fits. Its size
    /// is known before anything is copied: a huge line that does not fit
    /// costs no allocation.
    fn push(&self, parts: &Table, n: i64) -> mlua::Result<()> {
        if self.closed.get() || self.truncated.get() {
            return Ok(());
        }
        let room = self.limit - self.used.get();
        let mut size = n.max(1) as usize; // its newline and tabs
        for i in 1..=n {
            if let Value::String(s) = parts.raw_get::<Value>(i)? {
                size = size.saturating_add(s.as_bytes().len());
            }
            if size > room {
                self.truncated.set(true);
                return Ok(());
            }
        }
        let line = String::from_utf8_lossy(&join(parts, n)?).into_owned();
        // Non-strings (`tostring` gave one: a `__tostring` returning a
        // number on Lua 5.1) and U+FFFD replacements are counted now.
        let size = line.len() + 1;
        if size > room {
            self.truncated.set(true);
            return Ok(());
        }
        self.used.set(self.used.get() + size);
        self.lines.borrow_mut().push(line);
        Ok(())
    }
}

/// Raises Lua's memory error unless the line `parts[1..=n]` fits under the
/// VM's memory limit: it is joined in Rust memory, which the limit does not
/// see, and one string printed many times in a line (`print(s, s, s, ..)`)
/// would make it many times what the VM holds. Lua code building that line
/// (`table.concat`) fails the same way. Its size is known before anything
/// is copied.
fn joinable(lua: &Lua, parts: &Table, n: i64) -> mlua::Result<()> {
    let mut size = n.max(1) as usize; // its newline and tabs
    for i in 1..=n {
        if let Value::String(s) = parts.raw_get::<Value>(i)? {
            size = size.saturating_add(s.as_bytes().len());
        }
    }
    if super::room::fits(lua, size) {
        return Ok(());
    }
    Err(mlua::Error::MemoryError(super::room::MEMORY_ERROR.into()))
}

/// The line `parts[1..=n]`, tab separated, as bytes.
fn join(parts: &Table, n: i64) -> mlua::Result<Vec<u8>> {
    let mut line = Vec::new();
    for i in 1..=n {
        if i > 1 {
            line.push(b'\t');
        }
        match parts.raw_get::<Value>(i)? {
            Value::String(s) => line.extend_from_slice(&s.as_bytes()),
            other => line.extend_from_slice(other.to_string()?.as_bytes()),
        }
    }
    Ok(line)
}

/// Where uncaptured lines go.
#[derive(Clone)]
enum Out {
    /// Lua's own `print` gets them (this is only a fallback: see `emit`).
    Own,
    Nowhere,
    Sink(Sink),
}

/// The Rust end of our `print`: the line goes to the current capture, or
/// where `out` says.
fn emit(lua: &Lua, out: Out) -> mlua::Result<Function> {
    // Joins the parts here rather than with `table.concat`: the host may
    // not open the table library (`std_libs`).
    lua.create_function(move |lua, (parts, n): (Table, i64)| {
        if let Some(capture) = current() {
            return capture.push(&parts, n);
        }
        if !matches!(out, Out::Nowhere) {
            joinable(lua, &parts, n)?;
        }
        match &out {
            Out::Sink(sink) => sink(&String::from_utf8_lossy(&join(&parts, n)?)),
            Out::Nowhere => {}
            // Lua's own `print` is called when nothing captures; should a
            // capture end in between, the line still reaches stdout.
            Out::Own => {
                use std::io::Write;
                let mut line = join(&parts, n)?;
                line.push(b'\n');
                let _ = std::io::stdout().lock().write_all(&line);
            }
        }
        Ok(())
    })
}

/// Set as app data where `print` is our C function over Lua's: the
/// crate's `print` it calls while a capture is current is made at the
/// first capture ([`prepare`]), so VMs that never capture do not pay for
/// it. True once made.
struct Lazy(Cell<bool>);

/// Installs our `print` (see the module docs). Runs before `init` and
/// before `vm/cstack.rs` guards `print`.
pub(crate) fn install(lua: &Lua, print: &Print, sandbox: bool) -> mlua::Result<()> {
    let out = match print {
        Print::Default if !sandbox => Out::Own,
        Print::Default | Print::Discard => Out::Nowhere,
        Print::To(sink) => Out::Sink(sink.clone()),
    };
    let globals = lua.globals();
    let Out::Own = out else {
        let ours: Function = PRINT.load(lua)?.call(emit(lua, out)?)?;
        return globals.set("print", ours);
    };
    let own: Function = globals.get("print")?;
    // Lua 5.2-5.5: a C function running Lua's `print` on its own frame
    // (`interrupt/alarm/protected`), indistinguishable from it.
    if let Some(c_print) = crate::interrupt::alarm::print_over(lua, &own)? {
        lua.set_app_data(Lazy(Cell::new(false)));
        return globals.set("print", c_print);
    }
    // Elsewhere, ours in Lua, calling Lua's unless something captures.
    let capturing = lua.create_function(|_, ()| Ok(capturing()))?;
    let ours: Function = PRINT
        .load(lua)?
        .call((emit(lua, Out::Own)?, capturing, own))?;
    globals.set("print", ours)
}

/// Where the C `print` of `interrupt/alarm/protected` finds the crate's
/// `print`, for captured requests.
pub(crate) const CAPTURED_PRINT: &std::ffi::CStr = c"mlua-isle captured print";

/// Before a captured request runs on `lua`: makes what its `print` needs
/// (see [`Lazy`]); nothing to do after the first time.
pub(crate) fn prepare(lua: &Lua) -> mlua::Result<()> {
    let made = match lua.app_data_ref::<Lazy>() {
        Some(lazy) => lazy.0.get(),
        None => return Ok(()),
    };
    if made {
        return Ok(());
    }
    let ours: Function = PRINT.load(lua)?.call(emit(lua, Out::Own)?)?;
    let key = CAPTURED_PRINT.to_str().unwrap_or_default();
    lua.set_named_registry_value(key, ours)?;
    if let Some(lazy) = lua.app_data_ref::<Lazy>() {
        lazy.0.set(true);
    }
    Ok(())
}

/// Lua's `print`, formatting as it does (`tostring` of each argument, so
/// `__tostring` and `__name` count and their errors are raised; tabs
/// between), with the line handed to `emit`. Given `capturing` and Lua's
/// own `print`, it calls that one unless a capture is current.
static PRINT: Precompiled = Precompiled::new(
    "=mlua-isle",
    r##"
local emit, capturing, own = ...
local tostring, select = tostring, select
return function(...)
    if own and not capturing() then return own(...) end
    local n = select("#", ...)
    local parts = { ... }
    for i = 1, n do parts[i] = tostring(parts[i]) end
    emit(parts, n)
end
"##,
);
