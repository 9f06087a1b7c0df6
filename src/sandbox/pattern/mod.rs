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

/// Called every [`POLL_EVERY`] matcher steps with the steps since the last
/// call.
pub(crate) type Poll = Arc<dyn Fn(&Lua, u32) -> mlua::Result<()> + Send + Sync>;

/// Matcher steps between two calls of the [`Poll`] callback.
pub(crate) const POLL_EVERY: u32 = 1000;

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
        Arc::new(Ctx {
            poll,
            pending: AtomicU32::new(0),
        }),
    )
}

/// Shared by the four functions of one VM.
struct Ctx {
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

const GLUE: &str = r#"
local ERR, GO, CALL, INDEX, find_rs, match_rs, gmatch_rs, gsub_rs, error = ...
-- Always tail-called, so that level 2 is the caller of the string
-- function, whose position a C library error also carries.
-- A level comes with the message only for the memory error (0: raised
-- as is, which Lua turns into a memory error).
local function check(...)
    if ... == ERR then
        local _, msg, level = ...
        error(msg, level or 2)
    end
    return ...
end
local function find(...) return check(find_rs(...)) end
local function match(...) return check(match_rs(...)) end
local function gmatch(...)
    local it, msg, level = gmatch_rs(...)
    if it == ERR then error(msg, level or 2) end
    return function() return check(it()) end
end
-- gsub with a function or a table: step returns CALL or INDEX and what to
-- call or index with, takes the result, and returns the final result at
-- the end. Tail calls throughout: the stack stays flat, and check's
-- level 2 is still gsub's caller.
local function go(step, repl, tag, ...)
    if tag == CALL then return go(step, repl, step((repl(...)))) end
    if tag == INDEX then return go(step, repl, step((repl[(...)]))) end
    return check(tag, ...)
end
local function gsub(...)
    local a, b, c = gsub_rs(...)
    if a == GO then return go(b, c, b()) end
    if a == ERR then error(b, c or 2) end
    return a, b
end
return find, match, gmatch, gsub
"#;

fn install_ctx(lua: &Lua, string: &Table, ctx: Arc<Ctx>) -> mlua::Result<()> {
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
    let rust = |f: fn(&Lua, &Arc<Ctx>, &Arc<Tags>, &MultiValue) -> Res<MultiValue>| {
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
        lua.load(GLUE).set_name("=mlua-isle patterns").call((
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
    string.set("find", find)?;
    string.set("match", match_)?;
    string.set("gmatch", gmatch)?;
    string.set("gsub", gsub)?;
    Ok(())
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

// ---------------------------------------------------------------------------
// Step counting

/// Counts one call's steps, polling every [`POLL_EVERY`].
struct Budget<'a> {
    lua: &'a Lua,
    ctx: &'a Ctx,
    steps: u32,
}

impl<'a> Budget<'a> {
    fn new(lua: &'a Lua, ctx: &'a Ctx) -> Self {
        // ORDERING: Relaxed: only the VM's thread runs the matcher.
        let steps = ctx.pending.load(Ordering::Relaxed);
        Budget { lua, ctx, steps }
    }

    #[inline(always)]
    fn tick(&mut self) -> Res<()> {
        self.steps += 1;
        if self.steps >= POLL_EVERY {
            return self.poll();
        }
        Ok(())
    }

    /// Counts one step per [`BYTES_PER_STEP`] bytes of `bytes`.
    #[inline(always)]
    fn charge_bytes(&mut self, bytes: usize) -> Res<()> {
        if bytes >= BYTES_PER_STEP {
            let n = u32::try_from(bytes / BYTES_PER_STEP).unwrap_or(u32::MAX);
            self.steps = self.steps.saturating_add(n);
            if self.steps >= POLL_EVERY {
                return self.poll();
            }
        }
        Ok(())
    }

    /// `a == b` (of equal lengths), counting the bytes compared until the
    /// first difference (to within a chunk).
    fn equal(&mut self, a: &[u8], b: &[u8]) -> Res<bool> {
        const CHUNK: usize = 8 * BYTES_PER_STEP;
        for (x, y) in a.chunks(CHUNK).zip(b.chunks(CHUNK)) {
            self.charge_bytes(x.len())?;
            if x != y {
                return Ok(false);
            }
        }
        Ok(true)
    }

    #[cold]
    #[inline(never)]
    fn poll(&mut self) -> Res<()> {
        let n = std::mem::take(&mut self.steps);
        (self.ctx.poll)(self.lua, n).map_err(Fail::stop)
    }
}

impl Drop for Budget<'_> {
    fn drop(&mut self) {
        self.ctx.pending.store(self.steps, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// The result buffer

/// `gsub`'s result as it is built: Rust memory, so every growth is checked
/// against the VM's memory limit (as Lua's `luaL_Buffer`, allocated by the
/// VM, is), and every byte copied counts as matcher work, so that a huge
/// replacement is stoppable.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
}

impl Out {
    #[inline]
    fn push(&mut self, budget: &mut Budget<'_>, bytes: &[u8]) -> Res<()> {
        budget.charge_bytes(bytes.len())?;
        if self.bytes.capacity() - self.bytes.len() < bytes.len() {
            self.grow(budget.lua, bytes.len())?;
        }
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    /// Makes room for `more` bytes: doubles, or takes just what is needed
    /// when doubling would not fit under the memory limit.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, lua: &Lua, more: usize) -> Res<()> {
        let (len, cap) = (self.bytes.len(), self.bytes.capacity());
        let need = len.checked_add(more).ok_or_else(Fail::memory)?;
        let doubled = cap.saturating_mul(2).max(need).max(64);
        // The buffer held is the new one (a reallocation may briefly hold
        // both, as Lua's allocator does).
        let new_cap = [doubled, need]
            .into_iter()
            .find(|&c| room::fits(lua, c))
            .ok_or_else(Fail::memory)?;
        self.bytes
            .try_reserve_exact(new_cap - len)
            .map_err(|_| Fail::memory())
    }

    /// The result as a Lua string. Like `luaL_pushresult`, this needs the
    /// buffer and the string at once.
    fn into_string(self, lua: &Lua) -> Res<LuaString> {
        let held = self.bytes.capacity();
        if !room::fits(lua, held.saturating_add(self.bytes.len())) {
            return Err(Fail::memory());
        }
        Ok(lua.create_string(&self.bytes)?)
    }
}

// ---------------------------------------------------------------------------
// The matcher

#[derive(Clone, Copy)]
struct Capture {
    init: usize,
    /// A length, or `CAP_UNFINISHED` / `CAP_POSITION`.
    len: isize,
}

/// One capture's value.
enum Cap {
    /// `src[start..end]`.
    Str(usize, usize),
    /// A position capture (1-based).
    Pos(usize),
}

/// `MatchState`: positions are indices into `src` and `pat`. Reading past
/// the end of either gives 0, as C reads the terminating NUL.
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    level: usize,
    depth: u32,
    capture: [Capture; MAX_CAPTURES],
    budget: Budget<'a>,
}

fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace: also '\v', which Rust's is_ascii_whitespace omits.
        b's' => matches!(c, b' ' | b'\t'..=b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0, // deprecated, still accepted
        _ => return cl == c,
    };
    if cl.is_ascii_lowercase() {
        res
    } else {
        !res
    }
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], budget: Budget<'a>) -> Self {
        Matcher {
            src,
            pat,
            level: 0,
            depth: MAX_DEPTH,
            capture: [Capture { init: 0, len: 0 }; MAX_CAPTURES],
            budget,
        }
    }

    /// Before each match attempt.
    fn reprep(&mut self) {
        self.level = 0;
        self.depth = MAX_DEPTH;
    }

    #[inline(always)]
    fn pb(&self, p: usize) -> u8 {
        self.pat.get(p).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn sb(&self, s: usize) -> u8 {
        self.src.get(s).copied().unwrap_or(0)
    }

    /// The end of the single-character class at `p`.
    fn classend(&mut self, p: usize) -> Res<usize> {
        let plen = self.pat.len();
        let start = p;
        let mut p = p + 1;
        match self.pat[start] {
            b'%' => {
                if p == plen {
                    return lua_err("malformed pattern (ends with '%')");
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.pb(p) == b'^' {
                    p += 1;
                }
                loop {
                    // Look for a ']'.
                    if p == plen {
                        return lua_err("malformed pattern (missing ']')");
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == b'%' && p < plen {
                        p += 1; // skip escapes (e.g. '%]')
                    }
                    if self.pb(p) == b']' {
                        break;
                    }
                }
                self.budget.charge_bytes(p - start)?;
                Ok(p + 1)
            }
            _ => Ok(p),
        }
    }

    /// Whether `c` is in the set `[...]` at `p`, whose `]` is at `ec`.
    fn bracket_class(&self, c: u8, p: usize, ec: usize) -> bool {
        let mut p = p;
        let mut sig = true;
        if self.pb(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if self.pat[p] == b'%' {
                p += 1;
                if match_class(c, self.pb(p)) {
                    return sig;
                }
            } else if self.pb(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.pat[p - 2] <= c && c <= self.pat[p] {
                    return sig;
                }
            } else if self.pat[p] == c {
                return sig;
            }
        }
    }

    /// [`Self::bracket_class`], counting the set's length.
    #[inline]
    fn set_match(&mut self, c: u8, p: usize, ec: usize) -> Res<bool> {
        self.budget.charge_bytes(ec - p)?;
        Ok(self.bracket_class(c, p, ec))
    }

    /// Whether the class at `p` (ending at `ep`) matches the byte at `s`.
    #[inline]
    fn single_match(&mut self, s: usize, p: usize, ep: usize) -> Res<bool> {
        let Some(&c) = self.src.get(s) else {
            return Ok(false);
        };
        Ok(match self.pat[p] {
            b'.' => true,
            b'%' => match_class(c, self.pb(p + 1)),
            b'[' => self.set_match(c, p, ep - 1)?,
            pc => pc == c,
        })
    }

    /// `%bxy` at `s`, with `x` at `p`.
    fn match_balance(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return lua_err("malformed pattern (missing arguments to '%b')");
        }
        if self.sb(s) != self.pat[p] {
            return Ok(None);
        }
        let (b, e) = (self.pat[p], self.pat[p + 1]);
        let mut cont = 1usize;
        let mut s = s + 1;
        while s < self.src.len() {
            self.budget.tick()?;
            let c = self.src[s];
            if c == e {
                cont -= 1;
                if cont == 0 {
                    return Ok(Some(s + 1));
                }
            } else if c == b {
                cont += 1;
            }
            s += 1;
        }
        Ok(None) // the subject ends out of balance
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Res<Option<usize>> {
        let mut i = 0;
        while self.single_match(s + i, p, ep)? {
            i += 1;
            self.budget.tick()?;
        }
        // Try the rest with the most repetitions first.
        loop {
            if let Some(r) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(r));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, s: usize, p: usize, ep: usize) -> Res<Option<usize>> {
        let mut s = s;
        loop {
            if let Some(r) = self.do_match(s, ep + 1)? {
                return Ok(Some(r));
            }
            if self.single_match(s, p, ep)? {
                s += 1; // one more repetition
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Res<Option<usize>> {
        if self.level >= MAX_CAPTURES {
            return lua_err("too many captures");
        }
        self.capture[self.level] = Capture { init: s, len: what };
        self.level += 1;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.level -= 1; // undo the capture
        }
        Ok(r)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        let Some(l) = (0..self.level)
            .rev()
            .find(|&l| self.capture[l].len == CAP_UNFINISHED)
        else {
            return lua_err("invalid pattern capture");
        };
        // Capture lengths fit: slices never exceed isize::MAX bytes.
        self.capture[l].len = (s - self.capture[l].init) as isize;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.capture[l].len = CAP_UNFINISHED; // undo
        }
        Ok(r)
    }

    /// `%1`–`%9` (and the invalid `%0`) at `s`; `d` is the digit.
    fn match_capture(&mut self, s: usize, d: u8) -> Res<Option<usize>> {
        // '%0' is never valid: it is index "%0", -1 here.
        let valid = usize::from(d)
            .checked_sub(usize::from(b'1'))
            .filter(|&l| l < self.level && self.capture[l].len != CAP_UNFINISHED);
        let Some(l) = valid else {
            return Err(Fail::capture_index(usize::from(d - b'0')));
        };
        let Capture { init, len } = self.capture[l];
        // A position capture's length is negative: as a size_t in C it
        // never fits, so a back reference to it always fails.
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        if self.src.len() - s >= len
            && self
                .budget
                .equal(&self.src[init..init + len], &self.src[s..s + len])?
        {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    /// `match`: the end of the match of `pat[p..]` at `s`, if any.
    fn do_match(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        if self.depth == 0 {
            return lua_err("pattern too complex");
        }
        self.depth -= 1;
        let r = self.match_here(s, p);
        self.depth += 1;
        r
    }

    /// The body of `match`; the loop replaces C's `goto init` (tail calls).
    fn match_here(&mut self, mut s: usize, mut p: usize) -> Res<Option<usize>> {
        let plen = self.pat.len();
        loop {
            self.budget.tick()?;
            if p == plen {
                return Ok(Some(s));
            }
            match self.pat[p] {
                b'(' => {
                    return if self.pb(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == plen => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                b'%' => match self.pb(p + 1) {
                    b'b' => match self.match_balance(s, p + 2)? {
                        Some(e) => {
                            s = e;
                            p += 4;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    b'f' => {
                        p += 2;
                        if self.pb(p) != b'[' {
                            return lua_err("missing '[' after '%f' in pattern");
                        }
                        let ep = self.classend(p)?;
                        let previous = if s == 0 { 0 } else { self.src[s - 1] };
                        let current = self.sb(s);
                        if !self.set_match(previous, p, ep - 1)?
                            && self.set_match(current, p, ep - 1)?
                        {
                            p = ep;
                            continue;
                        }
                        return Ok(None);
                    }
                    d @ b'0'..=b'9' => match self.match_capture(s, d)? {
                        Some(e) => {
                            s = e;
                            p += 2;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    _ => {}
                },
                _ => {}
            }
            // A single-character class, with an optional suffix.
            let ep = self.classend(p)?;
            let suffix = self.pb(ep);
            if !self.single_match(s, p, ep)? {
                if matches!(suffix, b'*' | b'?' | b'-') {
                    // Accept empty.
                    p = ep + 1;
                    continue;
                }
                return Ok(None); // '+' or no suffix
            }
            match suffix {
                b'?' => {
                    if let Some(r) = self.do_match(s + 1, ep + 1)? {
                        return Ok(Some(r));
                    }
                    p = ep + 1;
                }
                b'+' => return self.max_expand(s + 1, p, ep),
                b'*' => return self.max_expand(s, p, ep),
                b'-' => return self.min_expand(s, p, ep),
                _ => {
                    s += 1;
                    p = ep;
                }
            }
        }
    }

    /// `get_onecapture`: capture `i`, or the whole match `s..e` if there
    /// are no captures and `i == 0`.
    fn get_capture(&self, i: usize, s: usize, e: usize) -> Res<Cap> {
        if i >= self.level {
            if i != 0 {
                return Err(Fail::capture_index(i + 1));
            }
            return Ok(Cap::Str(s, e));
        }
        let Capture { init, len } = self.capture[i];
        match len {
            CAP_UNFINISHED => lua_err("unfinished capture"),
            CAP_POSITION => Ok(Cap::Pos(init + 1)),
            len => Ok(Cap::Str(init, init + len as usize)),
        }
    }

    fn capture_value(&self, lua: &Lua, cap: Cap) -> Res<Value> {
        Ok(match cap {
            Cap::Str(a, b) => Value::String(lua.create_string(&self.src[a..b])?),
            Cap::Pos(n) => Value::Integer(n as i64),
        })
    }

    /// `push_captures`: all captures, or the whole match `s..e` if there
    /// are none (and `whole` is given).
    fn push_captures(
        &self,
        lua: &Lua,
        whole: Option<(usize, usize)>,
        out: &mut Vec<Value>,
    ) -> Res<()> {
        let n = if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        };
        let (s, e) = whole.unwrap_or((0, 0));
        for i in 0..n {
            out.push(self.capture_value(lua, self.get_capture(i, s, e)?)?);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Arguments

/// `luaL_typename`.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) | Value::UserData(_) | Value::Error(_) => "userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        other => other.type_name(),
    }
}

/// The arguments of one call, checked as `lauxlib.c` does.
struct Args<'a> {
    lua: &'a Lua,
    tags: &'a Tags,
    args: &'a MultiValue,
    /// The function's name in the `string` table.
    fname: &'static str,
}

impl Args<'_> {
    fn get(&self, i: usize) -> Option<&Value> {
        self.args.get(i)
    }

    /// The type `luaL_typeerror` names: `__name` from the metatable, "light
    /// userdata", "no value", or the type.
    fn type_arg(&self, i: usize) -> String {
        let field = |mt: Table| mt.raw_get::<Option<LuaString>>("__name").ok().flatten();
        let name = match self.get(i) {
            None => return "no value".into(),
            Some(Value::LightUserData(_)) => return "light userdata".into(),
            Some(Value::Table(t)) => t.metatable().and_then(field),
            Some(v @ Value::UserData(ud)) => match ud.metatable() {
                Ok(mt) => mt.get::<Option<LuaString>>("__name").ok().flatten(),
                // mlua only reads the metatables of its own userdata types;
                // `getmetatable` reads the others' (unless they hide it).
                Err(_) => (self.tags.getmetatable)
                    .call::<Option<Table>>(v.clone())
                    .ok()
                    .flatten()
                    .and_then(field),
            },
            Some(_) => None,
        };
        match name {
            Some(n) => n.to_string_lossy(),
            None => type_name(self.get(i).unwrap_or(&Value::Nil)).into(),
        }
    }

    /// `luaL_argerror`: named after how the Lua wrapper was called (level 1;
    /// level 0 is this Rust function).
    fn arg_error(&self, arg: usize, extramsg: &str) -> Fail {
        let (name, method) = self
            .lua
            .inspect_stack(1, |d| {
                let n = d.names();
                (
                    n.name.map(|n| n.into_owned()),
                    n.name_what == Some("method"),
                )
            })
            .unwrap_or((None, false));
        let mut arg = arg;
        if method {
            arg -= 1; // do not count 'self'
            if arg == 0 {
                let name = name.unwrap_or_default();
                return Fail::lua(format!("calling '{name}' on bad self ({extramsg})"));
            }
        }
        // Where Lua would find the function in package.loaded.
        let name = name.unwrap_or_else(|| format!("string.{}", self.fname));
        Fail::lua(format!("bad argument #{arg} to '{name}' ({extramsg})"))
    }

    fn type_error(&self, i: usize, expected: &str) -> Fail {
        let got = self.type_arg(i);
        self.arg_error(i + 1, &format!("{expected} expected, got {got}"))
    }

    /// `luaL_checklstring` on argument `i` (0-based): numbers are converted.
    /// Borrowed when it is a string already: cloning a reference costs.
    fn check_string(&self, i: usize) -> Res<Cow<'_, LuaString>> {
        match self.get(i) {
            Some(Value::String(s)) => Ok(Cow::Borrowed(s)),
            Some(v @ (Value::Integer(_) | Value::Number(_))) => {
                match self.lua.coerce_string(v.clone())? {
                    Some(s) => Ok(Cow::Owned(s)),
                    None => Err(self.type_error(i, "string")),
                }
            }
            _ => Err(self.type_error(i, "string")),
        }
    }

    /// `luaL_optinteger` on argument `i` (0-based).
    fn opt_integer(&self, i: usize, def: i64) -> Res<i64> {
        match self.get(i) {
            None | Some(Value::Nil) => Ok(def),
            Some(Value::Integer(n)) => Ok(*n),
            Some(v) => {
                if let Some(n) = self.lua.coerce_integer(v.clone())? {
                    Ok(n)
                } else if self.lua.coerce_number(v.clone())?.is_some() {
                    Err(self.arg_error(i + 1, "number has no integer representation"))
                } else {
                    Err(self.type_error(i, "number"))
                }
            }
        }
    }
}

/// `posrelatI`: a relative initial position (negative counts from the
/// end), clipped to `[1, inf)`.
fn posrelat_init(pos: i64, len: usize) -> usize {
    if pos > 0 {
        usize::try_from(pos).unwrap_or(usize::MAX)
    } else if pos == 0 || pos.unsigned_abs() > len as u64 {
        1
    } else {
        len - pos.unsigned_abs() as usize + 1
    }
}

fn truthy(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

fn fail() -> MultiValue {
    MultiValue::from_vec(vec![Value::Nil])
}

// ---------------------------------------------------------------------------
// The library functions

/// `lmemfind`: the first occurrence of `needle` in `hay`.
fn mem_find(budget: &mut Budget<'_>, hay: &[u8], needle: &[u8]) -> Res<Option<usize>> {
    let Some((&first, rest)) = needle.split_first() else {
        return Ok(Some(0)); // empty strings are everywhere
    };
    if needle.len() > hay.len() {
        return Ok(None);
    }
    let last = hay.len() - needle.len(); // the last possible start
    let mut i = 0;
    while i <= last {
        let Some(skip) = hay[i..=last].iter().position(|&c| c == first) else {
            budget.charge_bytes(last + 1 - i)?;
            return Ok(None);
        };
        i += skip;
        budget.tick()?;
        budget.charge_bytes(skip)?;
        if budget.equal(&hay[i + 1..i + needle.len()], rest)? {
            return Ok(Some(i));
        }
        i += 1;
    }
    Ok(None)
}

/// `string.find` (`find`) and `string.match`.
fn str_find_aux(
    lua: &Lua,
    ctx: &Arc<Ctx>,
    tags: &Tags,
    args: &MultiValue,
    find: bool,
) -> Res<MultiValue> {
    let fname = if find { "find" } else { "match" };
    let a = Args {
        lua,
        tags,
        args,
        fname,
    };
    let s = a.check_string(0)?;
    let p = a.check_string(1)?;
    let (s, p) = (s.as_bytes(), p.as_bytes());
    let ls = s.len();
    let init = posrelat_init(a.opt_integer(2, 1)?, ls) - 1;
    if init > ls {
        return Ok(fail()); // starts after the subject's end
    }
    let mut out = Vec::new();
    if find && (truthy(args.get(3)) || !p.iter().any(|c| SPECIALS.contains(c))) {
        // A plain search.
        let mut budget = Budget::new(lua, ctx);
        if let Some(at) = mem_find(&mut budget, &s[init..], &p)? {
            let start = init + at;
            out.push(Value::Integer(start as i64 + 1));
            out.push(Value::Integer((start + p.len()) as i64));
            return Ok(MultiValue::from_vec(out));
        }
        return Ok(fail());
    }
    let anchor = p.first() == Some(&b'^');
    let pat = if anchor { &p[1..] } else { &p[..] };
    let mut m = Matcher::new(&s, pat, Budget::new(lua, ctx));
    let mut s1 = init;
    loop {
        m.reprep();
        if let Some(e) = m.do_match(s1, 0)? {
            if find {
                out.push(Value::Integer(s1 as i64 + 1));
                out.push(Value::Integer(e as i64));
                m.push_captures(lua, None, &mut out)?;
            } else {
                m.push_captures(lua, Some((s1, e)), &mut out)?;
            }
            return Ok(MultiValue::from_vec(out));
        }
        if anchor || s1 >= ls {
            return Ok(fail());
        }
        s1 += 1;
    }
}

/// `string.gmatch`: returns the iterator (wrapped by the Lua side).
fn gmatch(lua: &Lua, ctx: &Arc<Ctx>, tags: &Arc<Tags>, args: &MultiValue) -> Res<MultiValue> {
    let a = Args {
        lua,
        tags,
        args,
        fname: "gmatch",
    };
    let s = a.check_string(0)?;
    let p = a.check_string(1)?;
    let ls = s.as_bytes().len();
    // Past the end: nothing to find.
    let init = (posrelat_init(a.opt_integer(2, 1)?, ls) - 1).min(ls + 1);
    let mut state = Gmatch {
        s: s.into_owned(),
        p: p.into_owned(),
        src: init,
        lastmatch: None,
    };
    let (ctx, tags) = (ctx.clone(), tags.clone());
    let it =
        lua.create_function_mut(move |lua, (): ()| deliver(lua, &tags, state.next(lua, &ctx)))?;
    Ok(MultiValue::from_vec(vec![Value::Function(it)]))
}

struct Gmatch {
    s: LuaString,
    p: LuaString,
    /// Where the next search starts.
    src: usize,
    /// The end of the last match: an empty match there is skipped.
    lastmatch: Option<usize>,
}

impl Gmatch {
    fn next(&mut self, lua: &Lua, ctx: &Ctx) -> Res<MultiValue> {
        let (s, p) = (self.s.as_bytes(), self.p.as_bytes());
        let mut m = Matcher::new(&s, &p, Budget::new(lua, ctx));
        let mut src = self.src;
        while src <= s.len() {
            m.reprep();
            if let Some(e) = m.do_match(src, 0)? {
                if Some(e) != self.lastmatch {
                    self.src = e;
                    self.lastmatch = Some(e);
                    let mut out = Vec::new();
                    m.push_captures(lua, Some((src, e)), &mut out)?;
                    return Ok(MultiValue::from_vec(out));
                }
            }
            src += 1;
        }
        Ok(MultiValue::new()) // not found
    }
}

/// What `gsub` replaces matches with.
enum Repl {
    String(LuaString),
    Function,
    Table,
}

/// `string.gsub`. A string replacement is done here at once; for a
/// function or a table, returns the step function for the Lua side.
fn gsub(lua: &Lua, ctx: &Arc<Ctx>, tags: &Arc<Tags>, args: &MultiValue) -> Res<MultiValue> {
    let a = Args {
        lua,
        tags,
        args,
        fname: "gsub",
    };
    let src = a.check_string(0)?;
    let p = a.check_string(1)?;
    let srcl = src.as_bytes().len();
    let max_s = a.opt_integer(3, srcl as i64 + 1)?;
    let repl_value = args.get(2).cloned().unwrap_or(Value::Nil);
    let repl = match &repl_value {
        Value::String(_) | Value::Integer(_) | Value::Number(_) => {
            match lua.coerce_string(repl_value.clone())? {
                Some(r) => Repl::String(r),
                None => return Err(a.type_error(2, "string/function/table")),
            }
        }
        Value::Function(_) => Repl::Function,
        Value::Table(_) => Repl::Table,
        _ => return Err(a.type_error(2, "string/function/table")),
    };
    let anchor = p.as_bytes().first() == Some(&b'^');
    let mut state = Gsub {
        src: src.into_owned(),
        p: p.into_owned(),
        anchor,
        pos: 0,
        lastmatch: None,
        n: 0,
        max_s,
        changed: false,
        buf: Out::default(),
        pending: None,
        repl,
    };
    if let Repl::String(_) = state.repl {
        return state.run(lua, ctx, tags);
    }
    let go = Value::Table(tags.go.clone());
    let (ctx, tags) = (ctx.clone(), tags.clone());
    // Called with no value first, then with each replacement value.
    let step = lua.create_function_mut(move |lua, value: Value| {
        let r = state.step(lua, &ctx, &tags, value);
        deliver(lua, &tags, r)
    })?;
    Ok(MultiValue::from_vec(vec![
        go,
        Value::Function(step),
        repl_value,
    ]))
}

struct Gsub {
    src: LuaString,
    p: LuaString,
    anchor: bool,
    /// The next position to match at.
    pos: usize,
    lastmatch: Option<usize>,
    /// Replacements made, and the most allowed.
    n: i64,
    max_s: i64,
    changed: bool,
    buf: Out,
    /// The match whose replacement the Lua side is computing.
    pending: Option<(usize, usize)>,
    repl: Repl,
}

impl Gsub {
    /// Takes the Lua side's replacement value for the pending match (none
    /// on the first call), then goes on.
    fn step(&mut self, lua: &Lua, ctx: &Ctx, tags: &Tags, value: Value) -> Res<MultiValue> {
        if let Some((s, e)) = self.pending.take() {
            self.add_value(&mut Budget::new(lua, ctx), s, e, value)?;
            self.pos = e;
            self.lastmatch = Some(e);
            if self.anchor {
                return self.result(lua, ctx);
            }
        }
        self.run(lua, ctx, tags)
    }

    /// The end of `add_value`, once the value is known.
    fn add_value(&mut self, budget: &mut Budget<'_>, s: usize, e: usize, value: Value) -> Res<()> {
        match value {
            // nil or false: keep the original text.
            Value::Nil | Value::Boolean(false) => {
                self.buf.push(budget, &self.src.as_bytes()[s..e])?;
            }
            v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
                if let Some(r) = budget.lua.coerce_string(v)? {
                    self.buf.push(budget, &r.as_bytes())?;
                }
                self.changed = true;
            }
            v => {
                let msg = format!("invalid replacement value (a {})", type_name(&v));
                return Err(Fail::lua(msg));
            }
        }
        Ok(())
    }

    /// The matching loop of `str_gsub`, until the end or until the Lua
    /// side must compute a replacement.
    fn run(&mut self, lua: &Lua, ctx: &Ctx, tags: &Tags) -> Res<MultiValue> {
        let src = self.src.as_bytes();
        let p = self.p.as_bytes();
        let pat = if self.anchor { &p[1..] } else { &p[..] };
        let mut m = Matcher::new(&src, pat, Budget::new(lua, ctx));
        while self.n < self.max_s {
            m.reprep();
            match m.do_match(self.pos, 0)? {
                Some(e) if Some(e) != self.lastmatch => {
                    self.n += 1;
                    let s = self.pos;
                    match &self.repl {
                        Repl::String(r) => {
                            add_s(&mut m, &mut self.buf, &r.as_bytes(), s, e)?;
                            self.changed = true;
                            self.pos = e;
                            self.lastmatch = Some(e);
                        }
                        Repl::Function => {
                            let mut out = vec![Value::Table(tags.call.clone())];
                            m.push_captures(lua, Some((s, e)), &mut out)?;
                            self.pending = Some((s, e));
                            return Ok(MultiValue::from_vec(out));
                        }
                        Repl::Table => {
                            let key = m.capture_value(lua, m.get_capture(0, s, e)?)?;
                            self.pending = Some((s, e));
                            let out = vec![Value::Table(tags.index.clone()), key];
                            return Ok(MultiValue::from_vec(out));
                        }
                    }
                }
                _ if self.pos < src.len() => {
                    // No match here: keep one character.
                    self.buf.push(&mut m.budget, &src[self.pos..=self.pos])?;
                    self.pos += 1;
                }
                _ => break, // end of the subject
            }
            if self.anchor {
                break;
            }
        }
        drop(m);
        drop(src);
        self.result(lua, ctx)
    }

    fn result(&mut self, lua: &Lua, ctx: &Ctx) -> Res<MultiValue> {
        let s = if self.changed {
            let rest = &self.src.as_bytes()[self.pos..];
            self.buf.push(&mut Budget::new(lua, ctx), rest)?;
            std::mem::take(&mut self.buf).into_string(lua)?
        } else {
            self.src.clone() // the original string
        };
        Ok(MultiValue::from_vec(vec![
            Value::String(s),
            Value::Integer(self.n),
        ]))
    }
}

/// `add_s`: appends the replacement string `r` for the match `s..e`.
fn add_s(m: &mut Matcher<'_>, buf: &mut Out, r: &[u8], s: usize, e: usize) -> Res<()> {
    let mut rest = r;
    while let Some(at) = rest.iter().position(|&c| c == b'%') {
        buf.push(&mut m.budget, &rest[..at])?;
        let c = rest.get(at + 1).copied().unwrap_or(0);
        match c {
            b'%' => buf.push(&mut m.budget, b"%")?,
            b'0' => buf.push(&mut m.budget, &m.src[s..e])?,
            b'1'..=b'9' => match m.get_capture(usize::from(c - b'1'), s, e)? {
                Cap::Str(a, b) => buf.push(&mut m.budget, &m.src[a..b])?,
                Cap::Pos(n) => {
                    let mut digits = [0u8; 24];
                    let mut w = &mut digits[..];
                    let _ = write!(w, "{n}");
                    let len = 24 - w.len();
                    buf.push(&mut m.budget, &digits[..len])?;
                }
            },
            _ => return lua_err("invalid use of '%' in replacement string"),
        }
        rest = &rest[at + 2..];
    }
    buf.push(&mut m.budget, rest)
}

#[cfg(test)]
mod tests;
