//! Sandboxed tenants cannot reach each other: no Lua-visible path hands out
//! a writable library table or a writable table `init` shared, `table.*`
//! refuses to write through views, and C loops over absurd ranges stay
//! stoppable.

use crate::common;

use std::time::Duration;

use mlua_isle::{IsleError, IslePool};

/// What `init` shares with every tenant.
const INIT: &str = r#"
    config = { greeting = 'hello', nested = { x = 1, deeper = { y = 2 } }, list = { 'a', 'b', 'c' } }
    config_list = { 3, 1, 2 }
    api = { greet = function(name) return 'hi ' .. name end }
    local Class = { __index = { get = function(self) return self.n end }, __tostring = function() return 'obj' end }
    obj = setmetatable({ n = 7 }, Class)
"#;

fn pool() -> IslePool {
    IslePool::builder()
        .workers(1)
        .sandbox(true)
        .default_timeout(Duration::from_secs(5))
        .init(|lua| lua.load(INIT).exec())
        .build()
        .unwrap()
}

/// `code` runs (its errors are ignored: it may be refused at any step).
fn attempt(pool: &IslePool, key: &str, code: &str) {
    let _ = pool
        .session(key)
        .eval::<()>(&format!("pcall(function() {code} end)"));
}

/// What a fresh tenant and unkeyed work see of what init shared.
const PRISTINE: &str = r#"
    return config.greeting == 'hello' and config.nested.x == 1 and config.nested.deeper.y == 2
       and config.list[4] == nil and config.list[1] == 'a' and config.list[3] == 'c'
       and config_list[1] == 3 and config_list[2] == 1 and config_list[3] == 2 and config_list[4] == nil
       and api.greet('x') == 'hi x' and obj:get() == 7 and tostring(obj) == 'obj'
       and string.upper('a') == 'A' and ('a'):upper() == 'A' and table.concat({ 'a' }) == 'a'
       and math.floor(1.5) == 1 and next(config) ~= nil and rawget(config, 'greeting') == 'hello'
"#;

fn assert_pristine(pool: &IslePool, after: &str) {
    assert_session_pristine(pool, after);
    assert_eq!(
        pool.eval::<bool>(PRISTINE),
        Ok(true),
        "unkeyed after {after}"
    );
}

fn assert_session_pristine(pool: &IslePool, after: &str) {
    assert_eq!(
        pool.session("victim").eval::<bool>(PRISTINE),
        Ok(true),
        "a session after {after}"
    );
}

/// Every way we know to get at a real table and change it, from a session
/// and from unkeyed work.
const ATTACKS: &[&str] = &[
    // Library tables through iteration.
    "local _, raw = pairs(string) raw.upper = function() return 'pwned' end",
    "local f, s = pairs(string) s.upper = nil",
    "local f, s, c = pairs(table) local k, v = f(s, c) rawset(s, 'concat', nil)",
    "for k, v in pairs(string) do rawset(string, k, nil) end",
    "local _, raw = ipairs(string) raw.upper = nil",
    "local _, raw = next(string) raw.upper = nil",
    "local k = next(string) string[k] = nil",
    "rawset(string, 'upper', nil)",
    "table.insert(string, 1)",
    "setmetatable(string, {})",
    "getmetatable('').__index.upper = nil",
    "require('string').upper = nil",
    "require('table').concat = nil",
    "rawget(string, 'upper')",
    "local mt = getmetatable(string) mt.__index.upper = nil",
    "local e = select(2, pcall(function() string.x = 1 end)) e.upper = nil",
    // Tables init shared.
    "config.greeting = 'x'",
    "config.nested.x = 2",
    "config.nested.deeper.y = 3",
    "rawset(config, 'greeting', 'x')",
    "rawset(config.nested, 'x', 2)",
    "api.greet = function() return 'spy' end",
    "rawset(api, 'greet', print)",
    "setmetatable(config, { __index = function() return 'x' end })",
    "setmetatable(config.nested, {})",
    "table.insert(config_list, 9)",
    "table.insert(config_list, 1, 9)",
    "table.insert(config.list, 'z')",
    "table.remove(config_list)",
    "table.remove(config_list, 1)",
    "table.sort(config_list)",
    "table.sort(config.list, function(a, b) return a > b end)",
    "table.move({ 9, 9, 9 }, 1, 3, 1, config_list)",
    "table.move(config_list, 1, 3, 2)",
    "for k, v in pairs(config) do if type(v) == 'table' then v.x = 99 rawset(v, 1, 99) end end",
    "for k, v in pairs(config) do rawset(config, k, nil) end",
    "for i, v in ipairs(config_list) do config_list[i] = 0 end",
    "local _, raw = pairs(config) raw.greeting = 'x'",
    "local k, v = next(config, nil) config[k] = 'x'",
    "obj.n = 0",
    "getmetatable(obj).__index.get = function() return 0 end",
    "local g = obj.get obj.get = nil",
    "config_list[4] = 1",
    "_G.config.greeting = 'x'",
    "if setfenv then setfenv(api.greet, { }) end",
    "if setfenv then setfenv(0, { }) end",
    "local t = table.unpack and { table.unpack(config.list) } or { unpack(config.list) } t[1] = 'q'",
    "config.list[1] = 'q'",
];

/// Rebinding what init shared: a session's rebindings stay in the session;
/// unkeyed work shares the VM's globals (documented), but its rebindings
/// must not reach sessions.
const REBINDINGS: &[&str] = &[
    "config = { greeting = 'x' }",
    "_G.api = { greet = function() return 'spy' end }",
    "rawset(_G, 'obj', { })",
    "string = { upper = function() return 'x' end }",
    "next = function() end pairs = next",
    "local env = getfenv and getfenv(api.greet) if env then env.config = { greeting = 'x' } end",
    "local env = getfenv and getfenv(0) if env then env.config = { greeting = 'x' } end",
];

#[test]
fn no_path_hands_out_a_writable_shared_table() {
    common::within("attacks", || {
        let pool = pool();
        assert_pristine(&pool, "start");
        for code in ATTACKS {
            attempt(&pool, "attacker", code);
            assert_pristine(&pool, code);
            // Unkeyed work may not poison sessions either.
            let _ = pool.eval::<()>(&format!("pcall(function() {code} end)"));
            assert_pristine(&pool, code);
        }
        for code in REBINDINGS {
            attempt(&pool, "attacker", code);
            assert_pristine(&pool, code);
        }
        for code in REBINDINGS {
            pool.eval::<()>(*code).unwrap();
            assert_session_pristine(&pool, code);
        }
        // A global unkeyed work adds is not seen by sessions.
        pool.eval::<()>("planted = 'x'").unwrap();
        assert_eq!(
            pool.session("victim").eval::<Option<String>>("planted"),
            Ok(None)
        );
    });
}

#[test]
fn shared_tables_read_as_before() {
    common::within("reads", || {
        let pool = pool();
        let s = pool.session("reader");
        let code = r#"
            local out = {}
            out[#out + 1] = tostring(config.nested == config.nested)
            out[#out + 1] = tostring(config.nested.deeper == config.nested.deeper)
            local keys = {}
            for k, v in pairs(config) do keys[#keys + 1] = k end
            table.sort(keys)
            out[#out + 1] = table.concat(keys, ',')
            local items = {}
            for i, v in ipairs(config.list) do items[#items + 1] = i .. v end
            out[#out + 1] = table.concat(items, ',')
            out[#out + 1] = table.concat(config.list, '-')
            out[#out + 1] = select('#', (table.unpack or unpack)(config.list))
            out[#out + 1] = tostring(#config_list)
            local n = 0
            for k, v in next, config do n = n + 1 end
            out[#out + 1] = tostring(n)
            out[#out + 1] = tostring(next({}) == nil)
            out[#out + 1] = type(config.nested)
            local sorted = {}
            for i = 1, 3 do sorted[i] = config_list[i] end
            table.sort(sorted)
            out[#out + 1] = table.concat(sorted, ',')
            return table.concat(out, '|')
        "#;
        // `#` on a table ignores `__len` on Lua 5.1 and LuaJIT: 0 there.
        let len = if cfg!(any(feature = "lua51", feature = "luajit")) {
            "0"
        } else {
            "3"
        };
        assert_eq!(
            s.eval::<String>(code),
            Ok(format!(
                "true|true|greeting,list,nested|1a,2b,3c|a-b-c|3|{len}|3|true|table|1,2,3"
            ))
        );
    });
}

#[test]
fn writes_through_views_fail_with_clear_errors() {
    common::within("errors", || {
        let pool = pool();
        let s = pool.session("w");
        for (code, says) in [
            (
                "config.greeting = 'x'",
                "cannot set config.greeting: tables shared by init are read-only",
            ),
            ("config.nested.x = 2", "cannot set config.nested.x"),
            (
                "string.upper = nil",
                "cannot set string.upper: library tables are read-only",
            ),
            ("do rawset(config, 'a', 1) end", "cannot set config.a"),
            (
                "table.insert(config_list, 1)",
                "table.insert cannot change config_list",
            ),
            (
                "table.sort(config.list)",
                "table.sort cannot change config.list",
            ),
            (
                "table.remove(config_list)",
                "table.remove cannot change config_list",
            ),
        ] {
            // (Not a tail call, which has no position in Lua either.)
            match s.eval::<()>(&format!("do {code} end")) {
                Err(IsleError::Lua(e)) => {
                    let msg = e.message().to_string();
                    assert!(msg.contains(says), "{code}: {msg}");
                    assert!(msg.contains(":1:"), "{code}: no position in {msg}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        // The session's own tables are its own.
        assert_eq!(
            s.eval::<i64>("local t = {} table.insert(t, 5) rawset(t, 2, 6) return t[1] + t[2]"),
            Ok(11)
        );
    });
}

/// C loops over absurd ranges, or over a table whose `__len` says anything:
/// in the sandbox they loop in Lua, or refuse, so a limit stops them.
#[test]
fn c_loops_over_huge_ranges_are_stoppable() {
    let pool = IslePool::builder()
        .workers(1)
        .sandbox(true)
        .build()
        .unwrap();
    let huge = "setmetatable({}, { __len = function() return 2^53 end })";
    let mut cases = vec![
        format!("table.insert({huge}, 1, 'x')"),
        format!("table.remove({huge}, 1)"),
        format!("table.concat(setmetatable({{}}, {{ __index = function() return 'x' end, __len = function() return 2^53 end }}))"),
        format!("table.sort(setmetatable({{}}, {{ __index = function(_, i) return -i end, __len = function() return 2^30 end }}))"),
        "string.rep('', 1e15)".to_string(),
        "for i = 1, 1e9 do local s = string.rep('', 1e9) end".to_string(),
    ];
    if !cfg!(any(feature = "lua51", feature = "luajit")) {
        cases.push("table.move({}, 1, 1e15, 2)".to_string());
        cases.push("table.move({}, -1e15, 1e15, 1, {})".to_string());
    }
    for code in cases {
        let what = code.clone();
        let pool = pool.clone();
        let r = common::within(&what, move || {
            pool.spawn_eval::<()>(code)
                .timeout(Duration::from_millis(200))
                .wait()
        });
        assert!(
            matches!(r, Err(IsleError::Timeout) | Err(IsleError::Lua(_)) | Ok(())),
            "{what}: {r:?}"
        );
    }
    assert_eq!(pool.eval::<i64>("return #string.rep('', 1e15)"), Ok(0));
}

#[test]
fn load_refuses_giant_sources() {
    common::within("load", || {
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .max_load_size(1000)
            .build()
            .unwrap();
        if cfg!(feature = "luau") {
            return; // no `load` on Luau
        }
        let msg = pool
            .eval::<String>(
                "local f, e = (loadstring or load)('return x' .. (' or x'):rep(1000)) return e",
            )
            .unwrap();
        assert!(msg.contains("chunk too large for the sandbox"), "{msg}");
        let msg = pool
            .eval::<String>(
                "local n = 0 local f, e = load(function() n = n + 1 if n == 1 then return 'return x' elseif n < 400 then return ' or x' end end) return e",
            )
            .unwrap();
        assert!(msg.contains("chunk too large for the sandbox"), "{msg}");
        assert_eq!(
            pool.eval::<i64>("return (loadstring or load)('return 1 + 1')()"),
            Ok(2)
        );
    });
}

#[test]
fn print_goes_to_the_hosts_sink_formatted_as_lua_does() {
    common::within("print", || {
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        let pool = IslePool::builder()
            .workers(1)
            .sandbox(true)
            .print_to(move |line| {
                let _ = tx.send(line.to_string());
            })
            .build()
            .unwrap();
        pool.session("p")
            .eval::<()>(
                "print(1, nil, 'x', true, 2.5, setmetatable({}, { __tostring = function() return 'T' end })) print()",
            )
            .unwrap();
        assert_eq!(common::expect_msg(&rx, "a line"), "1\tnil\tx\ttrue\t2.5\tT");
        assert_eq!(common::expect_msg(&rx, "an empty line"), "");
        // `__tostring` errors are raised as Lua raises them.
        let r = pool
            .eval::<()>("print(setmetatable({}, { __tostring = function() error('boom') end }))");
        assert!(
            matches!(&r, Err(IsleError::Lua(e)) if e.message().contains("boom")),
            "{r:?}"
        );
    });
}

/// Run by `sandboxed_print_does_not_write_stdout` in a child process whose
/// stdout is a pipe nobody reads.
#[test]
fn child_prints_a_lot_in_the_sandbox() {
    if std::env::var_os("MLUA_ISLE_PRINT_CHILD").is_none() {
        return;
    }
    let isle = mlua_isle::Isle::builder()
        .sandbox(true)
        .spawn(|_| Ok(()))
        .unwrap();
    let r = isle
        .spawn_eval::<()>("for i = 1, 1e5 do print(('x'):rep(100)) end")
        .timeout(Duration::from_secs(5))
        .wait();
    assert_eq!(r, Ok(()));
    eprintln!("CHILD DONE");
}

#[test]
fn sandboxed_print_does_not_write_stdout() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            // Its full name in this binary (tests/hostile/main.rs).
            "isolation::child_prints_a_lot_in_the_sandbox",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MLUA_ISLE_PRINT_CHILD", "1")
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut s);
        let _ = tx.send(s);
    });
    let out = rx.recv_timeout(common::PATIENCE);
    let _ = child.kill();
    let _ = child.wait();
    let out = out.expect("the child hung: print blocked on stdout");
    assert!(out.contains("CHILD DONE"), "{out}");
}
