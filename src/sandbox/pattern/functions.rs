//! The library functions: `find`, `match`, `gmatch`, `gsub`.

use super::*;

/// `lmemfind`: the first occurrence of `needle` in `hay`.
pub(super) fn mem_find(budget: &mut Budget<'_>, hay: &[u8], needle: &[u8]) -> Res<Option<usize>> {
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
pub(super) fn str_find_aux(
    lua: &Lua,
    ctx: &Arc<PatternCtx>,
    tags: &Tags,
    args: &MultiValue,
    find: bool,
) -> Res<MultiValue> {
    let fname = if find { "find" } else { "match" };
    let a = Args::new(lua, tags, args, fname);
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
pub(super) fn gmatch(
    lua: &Lua,
    ctx: &Arc<PatternCtx>,
    tags: &Arc<Tags>,
    args: &MultiValue,
) -> Res<MultiValue> {
    let a = Args::new(lua, tags, args, "gmatch");
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

pub(super) struct Gmatch {
    pub(super) s: LuaString,
    pub(super) p: LuaString,
    /// Where the next search starts.
    pub(super) src: usize,
    /// The end of the last match: an empty match there is skipped.
    pub(super) lastmatch: Option<usize>,
}

impl Gmatch {
    pub(super) fn next(&mut self, lua: &Lua, ctx: &PatternCtx) -> Res<MultiValue> {
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
pub(super) enum Repl {
    String(LuaString),
    Function,
    Table,
}

/// `string.gsub`. A string replacement is done here at once; for a
/// function or a table, returns the step function for the Lua side.
pub(super) fn gsub(
    lua: &Lua,
    ctx: &Arc<PatternCtx>,
    tags: &Arc<Tags>,
    args: &MultiValue,
) -> Res<MultiValue> {
    let a = Args::new(lua, tags, args, "gsub");
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

pub(super) struct Gsub {
    pub(super) src: LuaString,
    pub(super) p: LuaString,
    pub(super) anchor: bool,
    /// The next position to match at.
    pub(super) pos: usize,
    pub(super) lastmatch: Option<usize>,
    /// Replacements made, and the most allowed.
    pub(super) n: i64,
    pub(super) max_s: i64,
    pub(super) changed: bool,
    pub(super) buf: Out,
    /// The match whose replacement the Lua side is computing.
    pub(super) pending: Option<(usize, usize)>,
    pub(super) repl: Repl,
}

impl Gsub {
    /// Takes the Lua side's replacement value for the pending match (none
    /// on the first call), then goes on.
    pub(super) fn step(
        &mut self,
        lua: &Lua,
        ctx: &PatternCtx,
        tags: &Tags,
        value: Value,
    ) -> Res<MultiValue> {
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
    pub(super) fn add_value(
        &mut self,
        budget: &mut Budget<'_>,
        s: usize,
        e: usize,
        value: Value,
    ) -> Res<()> {
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
    pub(super) fn run(&mut self, lua: &Lua, ctx: &PatternCtx, tags: &Tags) -> Res<MultiValue> {
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

    pub(super) fn result(&mut self, lua: &Lua, ctx: &PatternCtx) -> Res<MultiValue> {
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
pub(super) fn add_s(m: &mut Matcher<'_>, buf: &mut Out, r: &[u8], s: usize, e: usize) -> Res<()> {
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
