//! The matcher: Lua 5.4's `lstrlib.c` matcher, step by step, budgeted.

use super::*;

#[derive(Clone, Copy)]
pub(super) struct Capture {
    pub(super) init: usize,
    /// A length, or `CAP_UNFINISHED` / `CAP_POSITION`.
    pub(super) len: isize,
}

/// One capture's value.
pub(super) enum Cap {
    /// `src[start..end]`.
    Str(usize, usize),
    /// A position capture (1-based).
    Pos(usize),
}

/// `MatchState`: positions are indices into `src` and `pat`. Reading past
/// the end of either gives 0, as C reads the terminating NUL.
pub(super) struct Matcher<'a> {
    pub(super) src: &'a [u8],
    pub(super) pat: &'a [u8],
    pub(super) level: usize,
    pub(super) depth: u32,
    pub(super) capture: [Capture; MAX_CAPTURES],
    pub(super) budget: Budget<'a>,
}

pub(super) fn match_class(c: u8, cl: u8) -> bool {
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
    pub(super) fn new(src: &'a [u8], pat: &'a [u8], budget: Budget<'a>) -> Self {
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
    pub(super) fn reprep(&mut self) {
        self.level = 0;
        self.depth = MAX_DEPTH;
    }

    #[inline(always)]
    pub(super) fn pb(&self, p: usize) -> u8 {
        self.pat.get(p).copied().unwrap_or(0)
    }

    #[inline(always)]
    pub(super) fn sb(&self, s: usize) -> u8 {
        self.src.get(s).copied().unwrap_or(0)
    }

    /// The end of the single-character class at `p`.
    pub(super) fn classend(&mut self, p: usize) -> Res<usize> {
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
    pub(super) fn bracket_class(&self, c: u8, p: usize, ec: usize) -> bool {
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
    pub(super) fn set_match(&mut self, c: u8, p: usize, ec: usize) -> Res<bool> {
        self.budget.charge_bytes(ec - p)?;
        Ok(self.bracket_class(c, p, ec))
    }

    /// Whether the class at `p` (ending at `ep`) matches the byte at `s`.
    #[inline]
    pub(super) fn single_match(&mut self, s: usize, p: usize, ep: usize) -> Res<bool> {
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
    pub(super) fn match_balance(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
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

    pub(super) fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Res<Option<usize>> {
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

    pub(super) fn min_expand(&mut self, s: usize, p: usize, ep: usize) -> Res<Option<usize>> {
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

    pub(super) fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Res<Option<usize>> {
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

    pub(super) fn end_capture(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
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
    pub(super) fn match_capture(&mut self, s: usize, d: u8) -> Res<Option<usize>> {
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
    pub(super) fn do_match(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        if self.depth == 0 {
            return lua_err("pattern too complex");
        }
        self.depth -= 1;
        let r = self.match_here(s, p);
        self.depth += 1;
        r
    }

    /// The body of `match`; the loop replaces C's `goto init` (tail calls).
    pub(super) fn match_here(&mut self, mut s: usize, mut p: usize) -> Res<Option<usize>> {
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
    pub(super) fn get_capture(&self, i: usize, s: usize, e: usize) -> Res<Cap> {
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

    pub(super) fn capture_value(&self, lua: &Lua, cap: Cap) -> Res<Value> {
        Ok(match cap {
            Cap::Str(a, b) => Value::String(lua.create_string(&self.src[a..b])?),
            Cap::Pos(n) => Value::Integer(n as i64),
        })
    }

    /// `push_captures`: all captures, or the whole match `s..e` if there
    /// are none (and `whole` is given).
    pub(super) fn push_captures(
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
