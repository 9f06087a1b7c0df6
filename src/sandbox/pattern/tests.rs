//! The Rust matcher against Lua's own (C) one, plus the budget.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use mlua::{Lua, LuaString, Table};

use super::{install, install_ctx, PatternCtx, Poll, POLL_EVERY};

/// Serializes results in both VMs, without the pattern functions.
const HARNESS: &str = r##"
local format, concat, select, type, tostring, pcall = string.format, table.concat, select, type, tostring, pcall
local mtype = math.type
local function ser1(v)
    local t = type(v)
    if t == "string" then return format("%q", v)
    elseif t == "number" then return mtype(v) .. ":" .. tostring(v)
    elseif t == "nil" or t == "boolean" then return tostring(v)
    else return t end
end
local function pack(...)
    local n = select("#", ...)
    local parts = { tostring(n) }
    for i = 1, n do parts[#parts + 1] = ser1((select(i, ...))) end
    return concat(parts, " ")
end
_G.pack = pack

local function gm(s, p, init)
    local res = {}
    local it = string.gmatch(s, p, init)
    for _ = 1, 100 do
        local r = pack(it())
        res[#res + 1] = r
        if r == "0" then break end
    end
    return concat(res, "; ")
end

local REPLS = { "<%0>", "%1", "[%2]", "%%", "x", "%9", "%a", "%", "", 7, 2.5, "%1%1", "a%0b%1c" }
local T1 = { a = "A", b = false, ["a("] = 1, [1] = "one", [2] = 2.5, x = {}, ["("] = "P", [""] = "E",
    ["1"] = "uno", ["()"] = "pp" }
local T2 = setmetatable({ aa = "double" }, { __index = function(_, k)
    if type(k) == "number" then return k * 2 end
    if k == "b" then return true end
    return nil
end })

function case(s, p, init)
    local out = {}
    local function add(...) out[#out + 1] = pack(...) end
    add(pcall(string.find, s, p))
    add(pcall(string.find, s, p, init))
    add(pcall(string.find, s, p, init, true))
    add(pcall(string.match, s, p))
    add(pcall(string.match, s, p, init))
    add(pcall(gm, s, p))
    add(pcall(gm, s, p, init))
    for _, r in ipairs(REPLS) do
        add(pcall(string.gsub, s, p, r))
        add(pcall(string.gsub, s, p, r, 2))
    end
    add(pcall(string.gsub, s, p, T1))
    add(pcall(string.gsub, s, p, T2, 3))
    local log = {}
    local k = 0
    add(pcall(string.gsub, s, p, function(...)
        log[#log + 1] = pack(...)
        k = k + 1
        local m = k % 6
        if m == 0 then return nil
        elseif m == 1 then return false
        elseif m == 2 then return "R"
        elseif m == 3 then return 42
        elseif m == 4 then return 1.5
        else return "%1", "extra" end
    end))
    add(pcall(string.gsub, s, p, function(a)
        log[#log + 1] = pack(a)
        if #log % 4 == 3 then return {} end
        return a
    end))
    add(pcall(string.gsub, s, p, function()
        error("boom")
    end, 1))
    add(pcall(string.gsub, s, p, function()
        error({ "table error" })
    end))
    add(pcall(string.gsub, s, p, function(...)
        return select("#", ...)
    end))
    out[#out + 1] = concat(log, ", ")
    return concat(out, "\n")
end

function run(code)
    local f = assert(load(code, "=code"))
    return pack(pcall(f))
end
"##;

fn no_poll() -> Poll {
    Arc::new(|_, _| Ok(()))
}

/// Lua's own matcher.
fn c_vm() -> Lua {
    let lua = Lua::new();
    lua.load(HARNESS).set_name("=harness").exec().unwrap();
    lua
}

/// The Rust matcher.
fn rust_vm(poll: Poll) -> Lua {
    let lua = Lua::new();
    let string: Table = lua.globals().get("string").unwrap();
    install(&lua, &string, poll).unwrap();
    lua.load(HARNESS).set_name("=harness").exec().unwrap();
    lua
}

struct Diff {
    c: Lua,
    rust: Lua,
    cases: usize,
    failures: Vec<String>,
}

impl Diff {
    fn new() -> Self {
        Diff {
            c: c_vm(),
            rust: rust_vm(no_poll()),
            cases: 0,
            failures: Vec::new(),
        }
    }

    fn call(lua: &Lua, f: &str, args: impl mlua::IntoLuaMulti + Clone) -> Vec<u8> {
        let f: mlua::Function = lua.globals().get(f).unwrap();
        let r: LuaString = f.call(args).unwrap();
        r.as_bytes().to_vec()
    }

    fn compare(&mut self, what: String, c: Vec<u8>, r: Vec<u8>) {
        self.cases += 1;
        if c != r {
            let (c, r) = (String::from_utf8_lossy(&c), String::from_utf8_lossy(&r));
            let mut first = String::new();
            for (lc, lr) in c.lines().zip(r.lines()) {
                if lc != lr {
                    first = format!("\n  C:    {lc}\n  Rust: {lr}");
                    break;
                }
            }
            if first.is_empty() {
                first = format!("\n  C:    {c}\n  Rust: {r}");
            }
            self.failures.push(format!("{what}{first}"));
        }
    }

    /// All four functions on one subject and pattern.
    fn case(&mut self, s: &[u8], p: &[u8], init: i64) {
        let args = |lua: &Lua| {
            (
                lua.create_string(s).unwrap(),
                lua.create_string(p).unwrap(),
                init,
            )
        };
        let c = Self::call(&self.c, "case", args(&self.c));
        let r = Self::call(&self.rust, "case", args(&self.rust));
        let what = format!(
            "case s={:?} p={:?} init={init}",
            String::from_utf8_lossy(s),
            String::from_utf8_lossy(p)
        );
        self.compare(what, c, r);
    }

    /// A chunk run in both VMs.
    ///
    /// A chunk that tail-calls a string function (`return string.gsub(...)`)
    /// loses its frame to our Lua wrapper, where C keeps it for a C
    /// function: its errors carry no position (see the module docs). Only
    /// there the position prefix is stripped before comparing.
    fn code(&mut self, code: &str) {
        let mut c = Self::call(&self.c, "run", code);
        let mut r = Self::call(&self.rust, "run", code);
        if code.starts_with("return string.") {
            c = strip_position(&c);
            r = strip_position(&r);
        }
        self.compare(format!("code {code}"), c, r);
    }

    fn check(self) -> usize {
        if !self.failures.is_empty() {
            let n = self.failures.len();
            let shown: Vec<_> = self.failures.into_iter().take(25).collect();
            panic!(
                "{n} of {} comparisons differ:\n{}",
                self.cases,
                shown.join("\n")
            );
        }
        self.cases
    }
}

fn strip_position(out: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(out)
        .replace("\"code:1: ", "\"")
        .into_bytes()
}

/// Hand-written subjects and patterns.
const CASES: &[(&str, &str)] = &[
    ("", ""),
    ("", "a"),
    ("", ".*"),
    ("", "^$"),
    ("", "()"),
    ("a", ""),
    ("abc", ""),
    ("aaab", "a*"),
    ("aaab", "a+"),
    ("aaab", "a-"),
    ("aaab", "a-b"),
    ("aaab", "a?"),
    ("aaab", "a?b"),
    ("aaab", "^a-$"),
    ("aaab", "^a-b$"),
    ("aaa", "^.-$"),
    ("aaa", "b*"),
    ("aaa", "ab*a"),
    ("aba", "ab*a"),
    ("alo xyzK", "(%w+)K"),
    ("254 K", "(%d*)K"),
    ("alo ", "(%w*)$"),
    ("alo ", "(%w+)$"),
    ("hello world", "%w+"),
    ("hello world", "(%w+) (%w+)"),
    ("hello world from Lua", "(%w+)%s*(%w+)"),
    ("  trim me  ", "^%s*(.-)%s*$"),
    ("key = value", "(%w+)%s*=%s*(%w+)"),
    ("x = 1, y = 22, z = 333", "(%w+) = (%d+)"),
    ("THE (quick) fox", "%((%a+)%)"),
    ("THE (quick) fox", "%f[%a]%a+"),
    ("THE (quick) fox", "%f[%l]%a+"),
    ("THE (quick) fox", "%f[%A]"),
    ("THE (quick) fox", "%f[%z]"),
    ("THE (quick) fox", "%f[^%z]"),
    ("a\0b\0", "%f[%z]"),
    ("a\0b\0", "%z+"),
    ("a\0b\0", "[%z]"),
    ("a\0b\0", "\0"),
    ("a\0b\0", "b\0$"),
    ("a\0b\0", "[\0-\x01]"),
    ("f(a(b)c)d", "%b()"),
    ("f(a(b)c)d(", "%b()"),
    ("((((", "%b()"),
    ("))((", "%b)("),
    ("[x[y]]", "%b[]"),
    ("abab", "%bab"),
    ("aaa", "%baa"),
    ("x", "%b"),
    ("x", "%bx"),
    ("x", "%b()x"),
    ("[[]]", "%b[]%b[]"),
    ("hello", "(l)%1"),
    ("hello", "(l+)%1"),
    ("abcabc", "(abc)%1"),
    ("abab", "(a)(b)%1%2"),
    ("abab", "(a)(b)%2%1"),
    ("xx", "()%1"),
    ("xx", "(x)%2"),
    ("xx", "%1(x)"),
    ("xx", "(x%1)"),
    ("xx", "%0"),
    ("xx", "(x)%0"),
    ("aaa", "()a()"),
    ("aaa", "()"),
    ("aaa", "(()a)"),
    ("aaa", "(a)(a)(a)"),
    ("aaa", "((a)(a))"),
    ("abc", "(a"),
    ("abc", "a)"),
    ("abc", ")"),
    ("abc", "(()"),
    ("abc", "((a)"),
    ("abc", "%"),
    ("abc", "a%"),
    ("abc", "["),
    ("abc", "[a"),
    ("abc", "[]"),
    ("abc", "[^]"),
    ("abc", "[]]"),
    ("a]c", "[]]"),
    ("a]c", "[^]]"),
    ("a]c", "[^]a]+"),
    ("a-c", "[a-]+"),
    ("a-c", "[-a]+"),
    ("a-c", "[%-]"),
    ("a-c", "[a%-c]+"),
    ("abc-", "[a-c]+"),
    ("abc", "[c-a]"),
    ("a%c", "[%%]"),
    ("a%c", "[%]"),
    ("a]c", "[%]]"),
    ("abc", "[%a-z]+"),
    ("a-z", "[%a-z]+"),
    ("abc", "[a-%]"),
    ("abc", "%f"),
    ("abc", "%fa"),
    ("abc", "%f[a"),
    ("abc", "%f[a]"),
    ("abc", "%f[^a]"),
    ("abc", "%f[]"),
    ("a.b", "."),
    ("a.b", "%."),
    ("a.b", "%.+"),
    ("a+b", "a+b"),
    ("a+b", "a%+b"),
    ("a$b", "a$b"),
    ("a$b", "$b"),
    ("a$b", "$"),
    ("a$", "$$"),
    ("a^b", "a^b"),
    ("^ab", "^^"),
    ("^ab", "^^a"),
    ("ab", "^"),
    ("ab", "^$"),
    ("ab", "^b"),
    ("ab", "b$"),
    ("ab", "a$"),
    ("ab", "*"),
    ("ab", "+"),
    ("ab", "-"),
    ("ab", "?"),
    ("a*b", "a*b"),
    ("a*b", "a%*b"),
    ("a--b", "-+"),
    ("a--b", "%-+"),
    ("abc", ".-"),
    ("abc", ".-$"),
    ("abc", ".-b"),
    ("abc", "a.-c"),
    ("aXbXc", "(.-)X"),
    ("aXbXc", "(.*)X"),
    ("aXbXc", "^(.-)X"),
    ("tab\there", "%s"),
    ("vt\x0bhere", "%s"),
    ("ff\x0chere", "%s+"),
    ("cr\rlf\n", "%c+"),
    ("del\x7f", "%c"),
    ("A1_b2", "%w+"),
    ("A1_b2", "%W"),
    ("A1_b2", "%u%d"),
    ("A1_b2", "%l%d"),
    ("0x1F", "%x+"),
    ("0x1F", "%X"),
    ("a,b;c.d!e", "%p"),
    ("a,b;c.d!e", "%P+"),
    ("a b", "%g+"),
    ("a b", "%G"),
    ("\u{e9}t\u{e9}", "%a+"),
    ("\u{e9}t\u{e9}", "[\u{80}-\u{ff}]+"),
    ("\u{e9}t\u{e9}", "\u{e9}"),
    ("abc", "%q"),
    ("q", "%q"),
    ("abc", "%E"),
    ("a\nb", "^a$"),
    ("a\nb", "\n"),
    ("one two  three", "%s*"),
    ("one two  three", "%S*"),
    ("one two  three", "()%s*()"),
    ("abc", "()(%a)()"),
    ("abc", "()"),
    ("abc", "%w*"),
    ("abc", "%w-"),
    ("abc", "x*"),
    ("hello.world.lua", "[^.]+"),
    ("hello.world.lua", "%.(%w+)$"),
    ("/usr/local/bin", "[^/]+"),
    ("2024-01-15", "(%d+)-(%d+)-(%d+)"),
    ("2024-01-15", "^(%d%d%d%d)-(%d%d)-(%d%d)$"),
    ("<a><b></b></a>", "<(%w+)>"),
    ("<a><b></b></a>", "</?(%w+)>"),
    ("$HOME/x", "%$(%w+)"),
    ("a = $a, b = $b", "%$(%w+)"),
    ("[[long]]", "%[%[(.-)%]%]"),
    ("aaa", "a-a-a-$"),
    ("abcd", "(a)(b)(c)(d)"),
    ("abcdefghij", "(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)"),
    ("abcdefghij", "(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)%9"),
    ("abcdefghijj", "(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)%10"),
    ("  x", "^%s*$"),
    ("   ", "^%s*$"),
    ("1.5e10", "^[+-]?%d+%.?%d*[eE]?[+-]?%d*$"),
    ("ab", "[a][b]"),
    ("ab", "[a]?[b]?[c]?"),
    ("ab", "[^%a]*"),
    ("ab12", "%d?%d?$"),
    ("%a", "%%a"),
    ("%a", "%%%a"),
    ("100%", "%d+%%"),
];

#[test]
fn differential_hand_written() {
    let mut d = Diff::new();
    for &(s, p) in CASES {
        for init in [1, 2, -1, -3, 0, 4, 100, -100] {
            d.case(s.as_bytes(), p.as_bytes(), init);
        }
    }
    let n = d.check();
    eprintln!("hand-written pattern comparisons: {n}");
}

/// Snippets about arguments, coercion, limits and the replacement rules.
const SNIPPETS: &[&str] = &[
    // Argument checks and their messages.
    "local r = string.find() return r",
    "local r = string.find('a') return r",
    "local r = string.find('a', {}) return r",
    "local r = string.find('a', setmetatable({}, {__name = 'MyType'})) return r",
    "local r = string.find({}, 'a') return r",
    "local r = string.find('a', 'a', 'x') return r",
    "local r = string.find('a', 'a', 1.5) return r",
    "local r = string.find('a', 'a', '1.5') return r",
    "local r = string.find('a', 'a', {}) return r",
    "return string.find('abc', 'c', '2')",
    "return string.find('abc', 'c', 2.0)",
    "return string.find('abc', 'c', '0x2')",
    "return string.find('abc', 'b', nil, true)",
    "return string.find('a.c', '.', 1, true)",
    "return string.find('a.c', '.', 1, 0)",
    "return string.find('a.c', '.', 1, false)",
    "return string.find('a.c', '.', 1, nil)",
    "return string.find('abc', '', 4)",
    "return string.find('abc', '', 5)",
    "return string.find('abc', '', -10)",
    "return string.find('abc', 'c', math.maxinteger)",
    "return string.find('abc', 'c', math.mininteger)",
    "return string.match('abc', 'c', math.mininteger)",
    "local r = ('x'):find(nil) return r",
    "local r = ('x'):find('x', {}) return r",
    "local s = 'x' local r = s.find(nil) return r",
    "local f = string.find local r = f(nil) return r",
    "local r = string.match() return r",
    "local r = string.match('a', 'a', 'z') return r",
    "local r = string.gmatch() return r",
    "local r = string.gmatch('a') return r",
    "local r = string.gmatch('a', 'a', 'z') return r",
    "local r = string.gsub() return r",
    "local r = string.gsub('a') return r",
    "local r = string.gsub('a', 'a') return r",
    "local r = string.gsub('a', 'a', nil) return r",
    "local r = string.gsub('a', 'a', true) return r",
    "local r = string.gsub('a', 'a', print, 'x') return r",
    "local r = string.gsub('a', 'a', nil, 'x') return r",
    "local r = string.gsub('a', 'a', 'b', 1.5) return r",
    "local r = string.gsub('a', 'a', io.stdout) return r",
    "local r = string.match(io.stdout, 'a') return r",
    "local r = string.gsub('a', 'a', coroutine.create(print)) return r",
    "return pcall(string.find)",
    "return pcall(string.gsub, 'a', 'a')",
    "return pcall(string.gsub, 'a', 'a', {}, {})",
    // Numbers as strings.
    "return string.find(12345, 34)",
    "return string.find(12345, 34, -2)",
    "return string.match(1.5, '%d')",
    "return string.match(2^53, '.+')",
    "return string.match(-0.0, '.+')",
    "return string.match(1e100, '.+')",
    "return string.gsub(10, '1', 2)",
    "return string.gsub(1.5, '%.', ',')",
    "return string.gsub(123, 'x', 'y')",
    "return math.type((string.gsub(123, 'x', 'y')))",
    "return string.gsub('abc', 'b', 3.0)",
    "return string.gsub('abc', '%w', 2^63)",
    "return string.gsub('abc', '%w', {a = 1.0, b = 2^63, c = -0.0})",
    "return string.gsub('abc', '%w', function(c) return c == 'b' and 0.1 or 7 end)",
    "return string.gsub('abc', '(b)', '%1', '1')",
    "return string.gsub('abc', '%w', '-', 0)",
    "return string.gsub('abc', '%w', '-', -1)",
    "return string.gsub('abc', '%w', '-', math.maxinteger)",
    "return string.gsub('abc', '', '-')",
    "return string.gsub('abc', '%w*', '-')",
    "return string.gsub('abc', '%w-', '-')",
    "return string.gsub('abc', 'b*', '-')",
    "return string.gsub('abc', '^', '>')",
    "return string.gsub('abc', '$', '<')",
    "return string.gsub('abc', '^a', '')",
    "return string.gsub('aaa', '^a', 'b')",
    "return string.gsub('aaa', '^a*', 'b')",
    "return string.gsub('xaaa', '^a', 'b')",
    "return string.gsub('hello world', '%w+', '%0 %0', 1)",
    "return string.gsub('hello world', '(%w+)', '<%1>')",
    "return string.gsub('hello world', '%w+', '%2')",
    "return string.gsub('hello world', '(%w+)', '%2')",
    "return string.gsub('hello world', '()', '%1')",
    "return string.gsub('hello world', 'o()', '%1')",
    "return string.gsub('hello world', 'o()', {})",
    "return string.gsub('hello world', 'o()', {[6] = 'six'})",
    "return string.gsub('hello world', 'o()', function(p) return p * 10 end)",
    "return string.gsub('hello', 'l', {l = true})",
    "return string.gsub('hello', 'l', function() return true end)",
    "return string.gsub('hello', 'l', function() return print end)",
    "return string.gsub('hello', 'l', function() return coroutine.create(print) end)",
    "return string.gsub('hello', 'l', function() return io.stdout end)",
    "return string.gsub('hello', 'l', function() end)",
    "return string.gsub('hello', '(l)(l)', function(a, b) return b .. a .. '!' end)",
    "return string.gsub('hello', '(h)(e', 'x')",
    "return string.gsub('hello', 'x(', 'x')",
    "return string.gsub('hello', '(h', print)",
    "return string.gsub('hello', '(h', {})",
    "return string.gsub('hello', 'x', '%')",
    "return string.gsub('hello', 'h', '%')",
    "return string.gsub('hello', 'h', '%x')",
    "return string.gsub('hello', 'h', '100%%')",
    "return string.gsub('hello', 'h', 'a\\0b%0')",
    "return string.gsub('hello', 'h', '%\\0')",
    "return string.gsub('hello', '', {})",
    "return string.gsub('hello', '.', {h = 1, e = 'E', l = false})",
    "return string.gsub('hello', '.', setmetatable({}, {__index = function(_, k) return k:upper() end}))",
    "return string.gsub('hello', '.', setmetatable({}, {__index = function(_, k) error('idx ' .. k) end}))",
    "return string.gsub('abc', '%w', function(c) error({c}) end)",
    "return select('#', string.gsub('abc', '%w', '-'))",
    "return select('#', string.find('abc', 'x'))",
    "return select('#', string.match('abc', 'x'))",
    "return select('#', string.find('abc', 'b', 10))",
    "local it = string.gmatch('ab', '.') it() it() return select('#', it())",
    "local it = string.gmatch('ab', '.') it() it() it() return select('#', it())",
    // gmatch details.
    "local t = {} for a, b in string.gmatch('k=v, x=y', '(%w+)=(%w+)') do t[#t+1] = a .. b end return table.concat(t, ',')",
    "local t = {} for w in string.gmatch('one two three', '%a+', 5) do t[#t+1] = w end return table.concat(t, ',')",
    "local t = {} for w in string.gmatch('one two three', '%a+', -5) do t[#t+1] = w end return table.concat(t, ',')",
    "local t = {} for w in string.gmatch('one two three', '%a+', 100) do t[#t+1] = w end return #t",
    "local t = {} for w in string.gmatch('abc', '') do t[#t+1] = w end return #t",
    "local t = {} for w in string.gmatch('abc', '()') do t[#t+1] = w end return table.concat(t, ',')",
    "local t = {} for w in string.gmatch('^a^a', '^a') do t[#t+1] = w end return table.concat(t, ',')",
    "local t = {} for w in string.gmatch('abc', '%w*') do t[#t+1] = w end return table.concat(t, '|')",
    "local t = {} for w in string.gmatch('a,b,,c', '([^,]*)') do t[#t+1] = w end return table.concat(t, '|')",
    "local it = string.gmatch('abc', '(') local r = it() return r",
    "local it = string.gmatch('abc', '%') local r = it() return r",
    "local r = ('abc'):gsub('(', 'x') return r",
    "local r = ('abc'):match('(', 'x') return r",
    "local it = string.gmatch('abc', '[a') return 'created'",
    "local it = string.gmatch('abc', '.') return it('ignored', 'args')",
    // Limits.
    "return string.find(string.rep('a', 300), string.rep('a?', 300))",
    "return string.find(string.rep('a', 198), string.rep('a?', 198))",
    "return string.find(string.rep('a', 199), string.rep('a?', 199))",
    "return string.find(string.rep('a', 200), string.rep('a?', 200))",
    "return string.match(string.rep('a', 50), string.rep('(a)', 32))",
    "return string.match(string.rep('a', 50), string.rep('(a)', 33))",
    "return string.match(string.rep('a', 50), string.rep('()', 32))",
    "return string.match(string.rep('a', 50), string.rep('()', 33))",
    "return string.match('x', string.rep('(', 40))",
    "return string.find(string.rep('(', 300) .. string.rep(')', 300), '%b()')",
    "return string.find(string.rep('x', 1000) .. 'y', '.-y')",
    "return string.find(string.rep('x', 1000) .. 'y', 'x*y')",
    "return string.gsub(string.rep('ab', 500), '(a)(b)', '%2%1')",
    "return #string.gsub(string.rep('ab', 5000), 'b', 'xyz')",
    "return string.find(string.rep('a', 10000), string.rep('a', 5000) .. 'b', 1, true)",
    "return string.find(string.rep('a', 100) .. 'b', string.rep('a', 50) .. 'b')",
    "return string.find(string.rep('[', 100) .. ']' , '[' .. string.rep('%[', 50) .. ']+')",
];

#[test]
fn differential_snippets() {
    let mut d = Diff::new();
    for code in SNIPPETS {
        d.code(code);
    }
    let n = d.check();
    eprintln!("snippet comparisons: {n}");
}

/// A tiny xorshift generator: no dependencies, the same cases every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const SUBJECT_BYTES: &[u8] = b"aab()[]%-.x 1";

const ATOMS: &[&str] = &[
    "a", "a", "b", "x", " ", "1", ".", ".", "%a", "%d", "%s", "%w", "%p", "%x", "%l", "%A", "%S",
    "%W", "%z", "%(", "%)", "%.", "%%", "%-", "%[", "%]", "[ab]", "[^a]", "[a-c]", "[%a%d]", "[]]",
    "[^]a]", "[a-]", "[-a]", "[%]]", "[(]", "[.]", "[%s%p]", "[^%s]", "(", "(", ")", ")", "()",
    "%b()", "%b[]", "%bab", "%f[%a]", "%f[%W]", "%f[a]", "%f[^a]", "%1", "%1", "%2", "$", "^",
];

/// Rare, mostly malformed pieces.
const ODD: &[&str] = &[
    "%0", "%b", "%bx", "%fa", "%f", "[", "[^", "%", "]", "-", "*", "?", "+", "%9", "\0", "%f[%z]",
];

const QUANTIFIERS: &[&str] = &["", "", "", "", "*", "+", "-", "?"];

fn random_case(rng: &mut XorShift) -> (Vec<u8>, Vec<u8>, i64) {
    let mut s = Vec::new();
    for _ in 0..rng.below(13) {
        if rng.below(40) == 0 {
            s.push(0);
        } else {
            s.push(*rng.pick(SUBJECT_BYTES));
        }
    }
    let mut p = Vec::new();
    if rng.below(6) == 0 {
        p.push(b'^');
    }
    for _ in 0..1 + rng.below(6) {
        let atom = if rng.below(15) == 0 {
            rng.pick(ODD)
        } else {
            rng.pick(ATOMS)
        };
        p.extend_from_slice(atom.as_bytes());
        p.extend_from_slice(rng.pick(QUANTIFIERS).as_bytes());
    }
    if rng.below(8) == 0 {
        p.push(b'$');
    }
    let init = rng.below(31) as i64 - 15;
    (s, p, init)
}

#[test]
fn differential_random() {
    // PATTERN_CASES and PATTERN_SEED explore further than the default run.
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("PATTERN_CASES").unwrap_or(4000);
    let seed = env("PATTERN_SEED").unwrap_or(0x9E37_79B9_7F4A_7C15);
    let mut d = Diff::new();
    let mut rng = XorShift(seed.max(1));
    for _ in 0..cases {
        let (s, p, init) = random_case(&mut rng);
        d.case(&s, &p, init);
    }
    let n = d.check();
    eprintln!("random pattern comparisons: {n}");
}

// ---------------------------------------------------------------------------
// The budget

/// A Rust VM whose poll counts calls and steps, and fails from call
/// `fail_at` on (1-based; 0: never).
fn counting_vm(fail_at: u32) -> (Lua, Arc<AtomicU32>, Arc<AtomicU64>, Arc<PatternCtx>) {
    let calls = Arc::new(AtomicU32::new(0));
    let steps = Arc::new(AtomicU64::new(0));
    let (c, s) = (calls.clone(), steps.clone());
    let ctx = Arc::new(PatternCtx {
        poll: Arc::new(move |_, n| {
            let k = c.fetch_add(1, Ordering::Relaxed) + 1;
            s.fetch_add(u64::from(n), Ordering::Relaxed);
            if fail_at != 0 && k >= fail_at {
                return Err(mlua::Error::runtime("stopped by poll"));
            }
            Ok(())
        }),
        pending: AtomicU32::new(0),
    });
    let lua = Lua::new();
    let string: Table = lua.globals().get("string").unwrap();
    install_ctx(&lua, &string, ctx.clone()).unwrap();
    (lua, calls, steps, ctx)
}

fn total_steps(steps: &AtomicU64, ctx: &PatternCtx) -> u64 {
    steps.load(Ordering::Relaxed) + u64::from(ctx.pending.load(Ordering::Relaxed))
}

const PATHOLOGICAL: &str =
    "return string.find(string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30))";

fn is_poll_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::CallbackError { cause, .. } => is_poll_error(cause),
        mlua::Error::RuntimeError(m) => m == "stopped by poll",
        _ => false,
    }
}

#[test]
fn poll_error_stops_the_pathological_pattern() {
    let (lua, calls, steps, ctx) = counting_vm(1);
    let start = std::time::Instant::now();
    let err = lua.load(PATHOLOGICAL).exec().unwrap_err();
    let elapsed = start.elapsed();
    assert!(is_poll_error(&err), "{err:?}");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    assert_eq!(total_steps(&steps, &ctx), u64::from(POLL_EVERY));
    eprintln!("pathological pattern stopped after {POLL_EVERY} steps, in {elapsed:?}");

    // The functions still work afterwards (the poll now fails at once,
    // so only with fewer steps than a poll).
    let r: (i64, i64) = lua
        .load("return string.find('hello', 'l+')")
        .eval()
        .unwrap();
    assert_eq!(r, (3, 4));
}

#[test]
fn poll_error_after_many_polls() {
    let (lua, calls, steps, ctx) = counting_vm(50);
    let err = lua.load(PATHOLOGICAL).exec().unwrap_err();
    assert!(is_poll_error(&err), "{err:?}");
    assert_eq!(calls.load(Ordering::Relaxed), 50);
    assert_eq!(total_steps(&steps, &ctx), 50 * u64::from(POLL_EVERY));
}

#[test]
fn poll_error_is_not_caught_as_a_string() {
    // pcall sees mlua's error value, not a string.
    let (lua, calls, _, _) = counting_vm(1);
    let r: (bool, String) = lua
        .load(
            "local ok, e = pcall(string.find, string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30))
             return ok, type(e)",
        )
        .eval()
        .unwrap();
    assert_eq!(r, (false, "userdata".to_string()));
    assert_eq!(calls.load(Ordering::Relaxed), 1);
}

#[test]
fn poll_errors_reach_every_function() {
    for code in [
        "return string.match(string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30))",
        "for _ in string.gmatch(string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30)) do end",
        "return string.gsub(string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30), 'x')",
        "return string.gsub(string.rep('a', 30), string.rep('a?', 30) .. string.rep('a', 30), print)",
        // Linear, but long: %b and a plain search poll too.
        "return string.gsub(string.rep('(', 20000), '%b()', '')",
        "return string.find(string.rep('a', 20000), string.rep('a', 10000) .. 'b', 1, true)",
        "return string.find(string.rep('a', 20000), string.rep('a', 10000) .. 'b.')",
        "return string.find(string.rep('a', 20000), '(' .. string.rep('a', 5000) .. ')%1b')",
    ] {
        let (lua, calls, _, _) = counting_vm(3);
        let err = lua.load(code).exec().unwrap_err();
        assert!(is_poll_error(&err), "{code}: {err:?}");
        assert_eq!(calls.load(Ordering::Relaxed), 3, "{code}");
    }
}

#[test]
fn steps_follow_the_work() {
    // '.-b' on n 'a's: each of the n + 1 start positions tries every
    // length of '.-', about n^2 / 2 steps of the core routine in all.
    let (lua, _, steps, ctx) = counting_vm(0);
    let n = 2000u64;
    let r: Option<i64> = lua
        .load(format!("return string.find(string.rep('a', {n}), '.-b')"))
        .eval()
        .unwrap();
    assert_eq!(r, None);
    let total = total_steps(&steps, &ctx);
    assert!(
        (n * n / 2..=4 * n * n).contains(&total),
        "{total} steps for n = {n}"
    );

    // Carried over from call to call: many small calls add up.
    let before = total_steps(&steps, &ctx);
    lua.load("for i = 1, 1000 do string.find('abc', 'c$') end")
        .exec()
        .unwrap();
    let small = total_steps(&steps, &ctx) - before;
    assert!((3000..=20_000).contains(&small), "{small}");
}

#[test]
fn unit_cases() {
    let lua = rust_vm(no_poll());
    let eval = |code: &str| -> String {
        let f: mlua::Function = lua.globals().get("run").unwrap();
        f.call::<String>(code).unwrap()
    };
    assert_eq!(
        eval("return string.find('hello', 'l')"),
        "3 true integer:3 integer:3"
    );
    assert_eq!(
        eval("return string.match('key=val', '(%w+)=(%w+)')"),
        r#"3 true "key" "val""#
    );
    assert_eq!(
        eval("return string.gsub('abc', '%w', '%0%0')"),
        r#"3 true "aabbcc" integer:3"#
    );
    assert_eq!(
        eval("local r = string.find('a', '%') return r"),
        r#"2 false "code:1: malformed pattern (ends with '%')""#
    );
    assert_eq!(
        eval("local r = string.find('a', '[a') return r"),
        r#"2 false "code:1: malformed pattern (missing ']')""#
    );
    assert_eq!(
        eval("local r = string.match('a', '%1') return r"),
        r#"2 false "code:1: invalid capture index %1""#
    );
    assert_eq!(
        eval("local r = string.find(nil, 'a') return r"),
        r#"2 false "code:1: bad argument #1 to 'find' (string expected, got nil)""#
    );
    assert_eq!(
        eval("local r = ('x'):find({}) return r"),
        r#"2 false "code:1: bad argument #1 to 'find' (string expected, got table)""#
    );
    assert_eq!(
        eval("local r = string.gsub('abc', '%w', function(c) if c == 'b' then return {} end end) return r"),
        r#"2 false "code:1: invalid replacement value (a table)""#
    );
    // The known difference: a tail call of the function loses the
    // caller's frame (C keeps it for a C function), so no position, and
    // the name is the one Lua finds in package.loaded.
    assert_eq!(
        eval("return string.find('a', '%')"),
        r#"2 false "malformed pattern (ends with '%')""#
    );
    assert_eq!(
        eval("return string.find()"),
        r#"2 false "bad argument #1 to 'string.find' (string expected, got no value)""#
    );
    // The replacement function's own errors keep their value and position.
    assert_eq!(
        eval("return string.gsub('abc', '%w', function(c) error('no ' .. c) end)"),
        r#"2 false "code:1: no a""#
    );
    // A replacement function may yield (Lua's C gsub cannot).
    assert_eq!(
        eval(
            "local co = coroutine.wrap(function()
                return string.gsub('ab', '%w', function(c) return coroutine.yield(c) end)
             end)
             local first = co()
             local second = co(first:upper())
             return first, second, co(second:upper())"
        ),
        r#"5 true "a" "b" "AB" integer:2"#
    );
    // Frontier at both ends, position captures and %b.
    assert_eq!(
        eval("return string.gsub('THE (quick) fox', '%f[%a]%a+%f[%A]', '<%0>')"),
        r#"3 true "<THE> (<quick>) <fox>" integer:3"#
    );
    assert_eq!(
        eval("return string.match('f(a(b)c)d', '()(%b())()')"),
        r#"4 true integer:2 "(a(b)c)" integer:9"#
    );
}

#[test]
fn deepest_patterns_fit_a_small_stack() {
    // 200 levels of the core routine, through each kind of recursion.
    const CODE: &[&str] = &[
        "return string.find(string.rep('a', 300), string.rep('a?', 199))",
        "return string.find(string.rep('a', 300), string.rep('a-', 199) .. '$')",
        "return string.find(string.rep('ab', 300), string.rep('a*b', 199))",
        "return string.find(string.rep('ab', 300), string.rep('a+b', 199))",
        "return string.find(string.rep('a', 300), string.rep('(a*)', 32))",
        "return string.find(string.rep('a', 300), string.rep('()a?', 32) .. string.rep('a?', 104))",
        "return string.find(string.rep('a', 300), string.rep('(a-)', 32) .. string.rep('a?', 100))",
        "return pcall(string.find, string.rep('a', 300), string.rep('a?', 200))",
        "return pcall(string.find, string.rep('a', 300), string.rep('a-', 200) .. '$')",
    ];
    fn run(lua: &Lua) -> Vec<String> {
        CODE.iter()
            .map(|code| {
                let f: mlua::Function = lua.globals().get("run").unwrap();
                f.call::<String>(*code).unwrap()
            })
            .collect()
    }
    let expected = run(&c_vm());
    let stack = std::env::var("PATTERN_STACK_KB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(512)
        * 1024;
    let got = std::thread::Builder::new()
        .stack_size(stack)
        .spawn(|| run(&rust_vm(no_poll())))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(got, expected);
    assert!(got[CODE.len() - 1].contains("pattern too complex"));
    assert!(got[CODE.len() - 2].contains("pattern too complex"));
    assert!(!got[CODE.len() - 3].contains("pattern too complex"));
}

/// Rough timings against Lua's C matcher; run with optimizations:
/// `cargo test --release --lib pattern::tests::speed -- --ignored --nocapture`
#[test]
#[ignore]
fn speed_against_c() {
    const BENCH: &[(&str, &str)] = &[
        ("find, short", "for i = 1, 200000 do string.find('hello world', 'o w') end"),
        ("find, class", "for i = 1, 200000 do string.find('hello world', '%s+w') end"),
        ("match, captures", "for i = 1, 100000 do string.match('key = value', '(%w+)%s*=%s*(%w+)') end"),
        ("gsub string, 1 MB", "local s = string.rep('hello world ', 90000) for i = 1, 3 do s:gsub('%w+', '<%0>') end"),
        ("gsub function, 1 MB", "local s = string.rep('hello world ', 90000) for i = 1, 3 do s:gsub('%w+', string.upper) end"),
        ("gmatch words, 1 MB", "local s = string.rep('hello world ', 90000) for i = 1, 3 do for w in s:gmatch('%a+') do end end"),
        ("backtracking .-", "local s = string.rep('a', 3000) for i = 1, 3 do s:find('.-b') end"),
        ("a? x 20", "local s = string.rep('a', 20) s:find(string.rep('a?', 20) .. string.rep('a', 20))"),
        ("%b() 1 MB", "local s = string.rep('(x)', 300000) for i = 1, 3 do s:gsub('%b()', '') end"),
    ];
    let c = c_vm();
    let rust = rust_vm(no_poll());
    for (name, code) in BENCH {
        // The best of 5: the machine may be busy.
        let time = |lua: &Lua| {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    lua.load(*code).exec().unwrap();
                    start.elapsed()
                })
                .min()
                .unwrap()
        };
        let (tc, tr) = (time(&c), time(&rust));
        eprintln!(
            "{name:24} C {:>9.2?}  Rust {:>9.2?}  ({:.2}x)",
            tc,
            tr,
            tr.as_secs_f64() / tc.as_secs_f64()
        );
    }
}
