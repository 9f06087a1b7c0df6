//! Per-VM memory limits, per-request instruction budgets, and text-only
//! chunks, on every front end (an isle, a pool, a session).

use crate::common;

use common::front::{fronts, Fronts};
use common::PATIENCE;
use mlua_isle::{Isle, IsleError};

const MB: usize = 1 << 20;

/// Fronts whose VMs may use 4 MiB.
fn limited() -> Fronts {
    fronts().memory_limit(4 * MB)
}

#[test]
fn a_request_past_the_memory_limit_fails_and_the_vm_recovers() {
    limited().each(|front| {
        front.eval::<()>("kept = 'state'").unwrap();
        let r = front.eval::<()>("local t = {} for i = 1, 1e8 do t[i] = i end");
        assert!(matches!(r, Err(IsleError::MemoryLimit(_))), "{r:?} {front}");
        // The garbage is gone and the next requests run normally.
        let used: usize = front.exec(|lua| Ok(lua.used_memory())).unwrap();
        assert!(used < 2 * MB, "still holding {used} bytes {front}");
        assert_eq!(
            front.eval::<i64>("local t = {} for i = 1, 1000 do t[i] = i end return #t"),
            Ok(1000)
        );
        // The state set before survives the failed request.
        assert_eq!(front.eval::<String>("kept"), Ok("state".to_string()));
    });
}

#[test]
fn a_huge_string_rep_is_a_memory_limit_error() {
    limited().each(|front| {
        let r = front.eval::<usize>("return #string.rep('x', 1e9)");
        assert!(matches!(r, Err(IsleError::MemoryLimit(_))), "{r:?} {front}");
        assert_eq!(front.eval::<usize>("#string.rep('x', 1000)"), Ok(1000));
    });
}

#[test]
fn lua_code_may_catch_its_own_memory_error() {
    limited().each(|front| {
        let r = front.eval::<bool>("local ok = pcall(string.rep, 'x', 1e9) return ok");
        assert_eq!(r, Ok(false), "{front}");
    });
}

#[test]
fn init_runs_under_the_memory_limit() {
    let r = Isle::builder()
        .memory_limit(MB)
        .spawn(|lua| lua.load("big = string.rep('x', 4 * 1024 * 1024)").exec());
    assert!(matches!(r, Err(IsleError::Init(_))), "{r:?}");
}

#[test]
#[cfg(not(feature = "luau"))] // no instruction count: max_instructions is refused
fn a_request_past_its_instruction_budget_fails() {
    fronts().max_instructions(100_000).each(|front| {
        assert_eq!(
            front.eval::<()>("while true do end"),
            Err(IsleError::InstructionLimit),
            "{front}"
        );
        // Inside coroutines and pcall loops too.
        assert_eq!(
            front.eval::<()>(
                "coroutine.wrap(function() while true do pcall(function() end) end end)()"
            ),
            Err(IsleError::InstructionLimit),
            "{front}"
        );
        assert_eq!(
            front.eval::<i64>("local n = 0 for i = 1, 100 do n = n + i end return n"),
            Ok(5050)
        );
    });
}

#[test]
#[cfg(not(feature = "luau"))] // no instruction count: max_instructions is refused
fn the_instruction_budget_is_per_request() {
    fronts().max_instructions(100_000).each(|front| {
        // Each run uses about half the budget; together they would exceed it.
        for _ in 0..10 {
            assert_eq!(
                front.eval::<i64>("local n = 0 for i = 1, 10000 do n = n + 1 end return n"),
                Ok(10_000),
                "{front}"
            );
        }
    });
}

#[test]
#[cfg(not(feature = "luau"))] // no instruction count: max_instructions is refused
fn a_budget_smaller_than_the_hook_interval_is_still_enforced() {
    let isle = Isle::builder()
        .hook_interval(10_000)
        .max_instructions(50)
        .spawn(|_| Ok(()))
        .unwrap();
    assert_eq!(
        isle.eval::<()>("for i = 1, 1000 do end"),
        Err(IsleError::InstructionLimit)
    );
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
#[cfg(not(feature = "luau"))] // no instruction count: max_instructions is refused
fn the_pool_enforces_the_budget_on_every_vm() {
    let pool = mlua_isle::IslePool::builder()
        .workers(2)
        .max_instructions(50_000)
        .build()
        .unwrap();
    let r = pool.broadcast(|lua| lua.load("while true do end").exec());
    assert_eq!(r, vec![Err(IsleError::InstructionLimit); 2]);
    assert_eq!(
        pool.session(1).eval::<()>("while true do end"),
        Err(IsleError::InstructionLimit)
    );
    assert_eq!(pool.eval::<i64>("2 * 21"), Ok(42));
}

#[test]
#[cfg(not(feature = "luau"))] // Luau: no `load`, `string.dump` or binary chunks
fn eval_refuses_binary_chunks() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let r = isle.eval::<()>("\x1bLua");
    match r {
        Err(IsleError::Lua(e)) => assert!(e.message().contains("binary"), "{e:?}"),
        other => panic!("expected a Lua error, got {other:?}"),
    }
}

/// `load` of a string: `loadstring` on Lua 5.1, whose `load` takes a
/// reader function only. (Luau has neither: the tests using it are
/// compiled out there.)
#[cfg(not(feature = "luau"))]
fn load_string(code: &str) -> String {
    if cfg!(feature = "lua51") {
        code.replace("load(", "loadstring(")
    } else {
        code.to_string()
    }
}

#[test]
#[cfg(not(feature = "luau"))] // Luau: no `load`, `string.dump` or binary chunks
fn lua_load_refuses_binary_chunks_by_default() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let err: String = isle
        .eval(load_string(
            "local f, err = load(string.dump(function() return 1 end), 'x', 'b')
             assert(f == nil)
             return err",
        ))
        .unwrap();
    // LuaJIT says "attempt to load chunk with wrong mode".
    assert!(
        err.contains("binary") || err.contains("wrong mode"),
        "{err}"
    );
    // Text still loads, with or without a mode.
    assert_eq!(
        isle.eval::<i64>(load_string("return load('return 7')()")),
        Ok(7)
    );
    assert_eq!(
        isle.eval::<i64>(load_string("return load('return 8', 'c', 'bt')()")),
        Ok(8)
    );
}

#[test]
#[cfg(not(feature = "luau"))] // Luau: no `load`, `string.dump` or binary chunks
fn binary_chunks_load_when_allowed() {
    let isle = Isle::builder()
        .allow_binary_chunks(true)
        .spawn(|_| Ok(()))
        .unwrap();
    assert_eq!(
        isle.eval::<i64>(load_string(
            "return load(string.dump(function() return 1 end))()"
        )),
        Ok(1)
    );
}

#[test]
#[cfg(not(feature = "luau"))] // no instruction count: max_instructions is refused
fn requests_under_the_budget_are_never_stopped() {
    // Lua's instruction countdown carries over from one request to the
    // next; that must not be charged to the next request.
    let isle = Isle::builder()
        .max_instructions(1000)
        .spawn(|_| Ok(()))
        .unwrap();
    for _ in 0..200 {
        assert_eq!(
            isle.eval::<i64>("local n = 0 for i = 1, 60 do n = n + i end return n"),
            Ok(1830)
        );
    }
}

#[test]
#[cfg(feature = "luau")]
fn luau_refuses_an_instruction_budget_at_spawn() {
    let r = Isle::builder().max_instructions(1000).spawn(|_| Ok(()));
    assert!(
        matches!(&r, Err(IsleError::Init(m)) if m.contains("max_instructions")),
        "{:?}",
        r.err()
    );
}

/// Runs out of memory (with a limit of a few MiB).
const GROW: &str = "local t = {} for i = 1, 1e8 do t[i] = i end";

/// Scripts whose memory error travels through catchers and re-raisers
/// before failing the request.
#[cfg_attr(feature = "luau", allow(unused_mut))] // no `load`, no `<close>`
fn out_of_memory_scripts() -> Vec<String> {
    let mut scripts = vec![
        format!("coroutine.wrap(function() {GROW} end)()"),
        format!("coroutine.wrap(function() return #string.rep('x', 1e9) end)()"),
        format!("local ok, e = coroutine.resume(coroutine.create(function() {GROW} end)) error(e)"),
        format!("assert(coroutine.resume(coroutine.create(function() {GROW} end)))"),
        format!("local ok, e = pcall(function() {GROW} end) error(e)"),
        format!("local ok, e = pcall(function() {GROW} end) error(e, 0)"),
        format!("local ok, e = pcall(function() {GROW} end) error('gave up: ' .. tostring(e))"),
        format!(
            "local ok, e = xpcall(function() {GROW} end, function(m) return 'handled: ' .. tostring(m) end) \
             error(e)"
        ),
        format!(
            "pcall(coroutine.wrap(function() {GROW} end)) error('failed after running out')"
        ),
    ];
    // Luau has no `load`.
    #[cfg(not(feature = "luau"))]
    scripts.push(format!(
        "local f, e = load(function() {GROW} end) assert(f == nil) error(e)"
    ));
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    scripts.extend([
        format!("do local x <close> = setmetatable({{}}, {{__close = function() {GROW} end}}) end"),
        format!(
            "local co = coroutine.create(function() \
                 local x <close> = setmetatable({{}}, {{__close = function() {GROW} end}}) \
                 coroutine.yield() end) \
             coroutine.resume(co) local ok, e = coroutine.close(co) error(e)"
        ),
        format!(
            "coroutine.wrap(function() \
                 local x <close> = setmetatable({{}}, {{__close = function(_, e) error(e, 0) end}}) \
                 {GROW} end)()"
        ),
    ]);
    scripts
}

#[test]
fn running_out_of_memory_is_a_memory_limit_error_however_the_error_travels() {
    for permanent_hook in [false, true] {
        let isle = Isle::builder()
            .memory_limit(4 * MB)
            .permanent_hook(permanent_hook)
            .spawn(|_| Ok(()))
            .unwrap();
        for script in out_of_memory_scripts() {
            let r = isle
                .spawn_eval::<()>(script.clone())
                .wait_timeout(PATIENCE)
                .expect("the request hung");
            assert!(
                matches!(r, Err(IsleError::MemoryLimit(_))),
                "permanent_hook({permanent_hook}): {script}\n{r:?}"
            );
            assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
        }
        // A caught memory error that the script recovers from is no failure.
        assert_eq!(
            isle.eval::<bool>(format!("return (pcall(function() {GROW} end))")),
            Ok(false)
        );
        // A later request is judged on its own.
        assert!(matches!(
            isle.eval::<()>("error('unrelated')"),
            Err(IsleError::Lua(_))
        ));
    }
}

/// A new session's first request makes the session's environment inside
/// the request, so on a VM with no room left it fails as any request would
/// (a memory-limit error, the VM usable), and once there is room the
/// session's next request makes it and runs.
#[test]
fn a_new_session_on_a_full_vm_fails_its_first_request_then_works() {
    let pool = mlua_isle::IslePool::builder()
        .workers(1)
        .memory_limit(4 * MB)
        .build()
        .unwrap();
    // Fills the room with a chain of small live tables until one more does
    // not fit (a growing array would leave up to half of it free).
    let filled = pool.eval::<()>("while true do hoard = { hoard } end");
    assert!(
        matches!(filled, Err(IsleError::MemoryLimit(_))),
        "{filled:?}"
    );
    let tenant = pool.session("tenant");
    let first = tenant.eval::<i64>("mine = 7 return mine");
    assert!(matches!(first, Err(IsleError::MemoryLimit(_))), "{first:?}");
    // Room again (from Rust: with none, even a request's coroutine may not
    // fit; collected there, since Lua 5.1 and Luau have no emergency
    // collection).
    pool.exec(|lua| {
        lua.globals()
            .raw_set("hoard", mlua_isle::mlua::Value::Nil)?;
        lua.gc_collect()
    })
    .unwrap();
    assert_eq!(tenant.eval::<i64>("mine = 7 return mine"), Ok(7));
    assert_eq!(tenant.eval::<i64>("return mine"), Ok(7));
    assert_eq!(pool.eval::<Option<i64>>("return mine"), Ok(None));
    pool.shutdown().unwrap();
}

/// A session's first request opens the session's environment (and a VM's
/// first session builds what makes them): the crate's Lua work, not the
/// request's, so not charged to its instruction budget. New sessions'
/// first requests fit in a budget that fits an unkeyed request, from the
/// VM's first session on.
#[test]
#[cfg(not(feature = "luau"))] // no instruction count: max_instructions is refused
fn opening_a_sessions_environment_is_not_charged_to_its_budget() {
    let pool = |budget| {
        mlua_isle::IslePool::builder()
            .workers(1)
            .max_instructions(budget)
            .build()
            .unwrap()
    };
    let smallest = (1..=50)
        .find(|&b| pool(b).eval::<i64>("return 1").is_ok())
        .expect("an unkeyed request fits in some budget");
    // Twice that fits the unkeyed request wherever the hook's count stands
    // when it starts (the count is checked every `budget` instructions, and
    // a request is stopped at its second check).
    let budget = 2 * smallest;
    let pool = pool(budget);
    for k in 0..20 {
        let first = pool.session(k).eval::<i64>("return 1");
        assert_eq!(first, Ok(1), "session {k}, budget {budget}");
    }
    // The budget still holds in a session's first request.
    let over = pool
        .session("over")
        .eval::<i64>("local n = 0 for i = 1, 100 do n = n + i end return n");
    assert_eq!(over, Err(IsleError::InstructionLimit), "budget {budget}");
}

/// A heap held at its memory limit makes Lua run a full collection at
/// every allocation (its emergency collection, before it gives up), and
/// whether the allocation then fits or fails, no instruction count sees
/// that work: one instruction can cost milliseconds. The budget counts
/// each allocation refused at the limit as the collection it caused, so it
/// still stops such a loop, within one hook interval of the first refusal
/// past the budget. (The request's own time limit is the watchdog: without
/// the charge, these loops run for hours under a 5M budget.) Lua 5.1,
/// LuaJIT and Luau collect nothing before they refuse an allocation (and
/// Luau has no budget).
#[test]
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
fn the_budget_stops_a_loop_that_keeps_the_heap_at_its_limit() {
    // Fills the heap until an allocation fails, and keeps what it made.
    const FILL: &str = "local hog = {} pcall(function() while true do hog[#hog + 1] = {} end end) ";
    // Each new table fits once the collection frees the last one, or the
    // error is caught.
    let loops = [
        "while true do pcall(error, {}) end",
        "while true do pcall(function() local t = { {}, {} } end) end",
        "while true do pcall(function() return tostring({}) .. 'x' end) end",
    ];
    for sandbox in [false, true] {
        let isle = Isle::builder()
            .sandbox(sandbox)
            .memory_limit(4 * MB)
            .max_instructions(5_000_000)
            .spawn(|_| Ok(()))
            .unwrap();
        for body in loops {
            let r = isle
                .spawn_eval::<()>(format!("{FILL}{body}"))
                .timeout(4 * PATIENCE)
                .wait();
            assert!(
                matches!(r, Err(IsleError::InstructionLimit)),
                "sandbox {sandbox}, `{body}` at the limit: {r:?}"
            );
            // The VM serves on, its memory back.
            assert_eq!(isle.eval::<i64>("return 6 * 7"), Ok(42));
        }
    }
}

/// A sandboxed pool of one VM whose requests stop after `ms`: a VM still
/// stuck in C half a second later is replaced (its sessions lost, which
/// the tests below look for).
fn one_sandboxed_vm_stopping_at(ms: u64) -> mlua_isle::IslePool {
    mlua_isle::IslePool::builder()
        .workers(1)
        .sandbox(true)
        .default_timeout(std::time::Duration::from_millis(ms))
        .stop_grace(std::time::Duration::from_millis(500))
        .build()
        .unwrap()
}

/// A plain table whose border Lua finds near 2^62: 63 entries at 1, 2, 4,
/// ... 2^62, all in its hash part, so `#t` doubles through them.
fn far_border_table() -> String {
    let keys: Vec<String> = (0..63).map(|k| format!("[{}]=true", 1u64 << k)).collect();
    format!("local t = {{{}}}", keys.join(","))
}

/// `table.insert(t, 1, x)` and `table.remove(t, 1)` on a table whose
/// border is near 2^62 would shift that many elements in C, where no hook
/// reaches. In the sandbox they shift in Lua, under the request's limits:
/// the time limit stops them there, and the session keeps its VM (a VM
/// stuck in C past `stop_grace` is replaced, and its sessions lost). The
/// other table functions stop early on such a table by themselves.
#[test]
fn the_sandbox_shifts_a_table_with_a_far_border_under_the_requests_limits() {
    common::in_child(
        "the_sandbox_shifts_a_table_with_a_far_border_under_the_requests_limits",
        || {
            common::within("far border", || {
                let pool = one_sandboxed_vm_stopping_at(200);
                let s = pool.session("tenant");
                s.eval::<()>("kept = 'state'").unwrap();
                let t = far_border_table();
                for op in [
                    "table.insert(t, 1, 'x')",
                    "table.remove(t, 1)",
                    "table.insert(t, 'x')",
                    "table.remove(t)",
                    "table.move(t, 1, #t, 2)",
                    "table.concat(t)",
                    "table.sort(t)",
                    "table.unpack(t)",
                    "for _ in ipairs(t) do end",
                ] {
                    let r = s.eval::<()>(format!("{t} {op}"));
                    assert!(
                        matches!(r, Ok(()) | Err(IsleError::Timeout | IsleError::Lua(_))),
                        "`{op}`: {r:?}"
                    );
                    assert_eq!(
                        s.eval::<String>("kept"),
                        Ok("state".to_string()),
                        "after `{op}`"
                    );
                }
            });
        },
    );
}

/// A tree of short coroutines: each runs fewer instructions than the hook
/// interval, then starts two more, 60 levels deep. Lua keeps the hook's
/// countdown per Lua thread and a new one starts afresh, so no tick ever
/// came: the tree ran past its budget and its time limit for ever (the VM
/// wedged, replaced, and its thread spinning). Each new thread is charged
/// its first countdown when it is made, and sees a pending stop there.
const TREE: &str = "work = 0
    local wrap = coroutine.wrap
    local function node(d)
        for _ = 1, 440 do end
        work = work + 440
        if d < 60 then wrap(node)(d + 1) wrap(node)(d + 1) end
    end
    wrap(node)(1)";

/// The same with one level: a loop making coroutines that each run 400
/// instructions.
const CHURN: &str = "work = 0
    while true do
        coroutine.wrap(function() for _ = 1, 400 do end end)()
        work = work + 400
    end";

#[test]
#[cfg(not(feature = "luau"))]
fn short_coroutines_are_counted_against_the_budget() {
    common::in_child("short_coroutines_are_counted_against_the_budget", || {
        common::within("short coroutines, budget", || {
            const BUDGET: u64 = 200_000;
            for sandbox in [false, true] {
                let isle = Isle::builder()
                    .sandbox(sandbox)
                    .max_instructions(BUDGET)
                    .spawn(|_| Ok(()))
                    .unwrap();
                for body in [TREE, CHURN] {
                    let r = isle.eval::<()>(body);
                    assert!(
                        matches!(r, Err(IsleError::InstructionLimit)),
                        "sandbox {sandbox}: {r:?}"
                    );
                    // The loops' own instructions alone (each `for` step is
                    // one), which the budget must have covered.
                    let work: f64 = isle.eval("return work").unwrap();
                    assert!(work <= 2.0 * BUDGET as f64, "sandbox {sandbox}: {work} ran");
                }
            }
        });
    });
}

/// With the hook ticking all the time (`permanent_hook`), a time limit
/// reaches the tree too, and the VM serves on (a VM stuck past
/// `stop_grace` would be replaced, its globals gone).
#[test]
fn a_time_limit_reaches_short_coroutines_when_the_hook_ticks_all_the_time() {
    common::in_child(
        "a_time_limit_reaches_short_coroutines_when_the_hook_ticks_all_the_time",
        || {
            common::within("short coroutines, permanent hook", || {
                let isle = Isle::builder()
                    .permanent_hook(true)
                    .stop_grace(std::time::Duration::from_secs(2))
                    .spawn(|_| Ok(()))
                    .unwrap();
                isle.eval::<()>("kept = 'state'").unwrap();
                for body in [TREE, CHURN] {
                    let r = isle
                        .spawn_eval::<()>(body)
                        .timeout(std::time::Duration::from_millis(200))
                        .wait();
                    assert!(matches!(r, Err(IsleError::Timeout)), "{r:?}");
                    assert_eq!(isle.eval::<String>("kept"), Ok("state".to_string()));
                }
            });
        },
    );
}

/// Luau searches a plain needle in C, with no interrupt: a 1 MiB needle in
/// 4 MiB of text took minutes, and the VM was replaced (its sessions lost).
/// In the sandbox a long needle goes to Luau's matcher, which the time
/// limit reaches; `split` with a long separator too. What they find is
/// what Luau's own functions find.
#[test]
#[cfg(feature = "luau")]
fn luau_plain_searches_with_long_needles_stop_on_time() {
    common::in_child("luau_plain_searches_with_long_needles_stop_on_time", || {
        common::within("long needles", || {
            let pool = one_sandboxed_vm_stopping_at(200);
            let victim = pool.session("victim");
            victim.eval::<()>("kept = 'state'").unwrap();
            let attacker = pool.session("attacker");
            let setup = "local s = string.rep('a', 2^22) local p = string.rep('a', 2^20) .. 'b' ";
            for op in [
                "return string.find(s, p)",
                "return string.find(s, p, 1, true)",
                "return s:find(p, 2)",
                "return #s:split(p)",
            ] {
                let r = attacker.eval::<Option<i64>>(format!("{setup}{op}"));
                assert_eq!(r, Err(IsleError::Timeout), "`{op}`");
                assert_eq!(
                    victim.eval::<String>("kept"),
                    Ok("state".to_string()),
                    "after `{op}`"
                );
            }
            // The same answers as Luau's own functions.
            let plain = Isle::spawn(|_| Ok(())).unwrap();
            // Without magic characters, and (found only as plain) with.
            let (needle, magic) = ("string.rep('ab,', 40)", "string.rep('ab(%', 40)");
            for op in [
                format!("return string.find('x' .. {needle} .. 'y', {needle})"),
                format!("return string.find('x' .. {needle} .. 'y', {needle}, 3)"),
                format!("return string.find('xx' .. {needle} .. {needle}, {needle}, -90)"),
                format!("return string.find('x' .. {magic} .. 'y', {magic}, 1, true)"),
                format!("return string.find('x' .. {magic}, {magic} .. 'z', 1, true)"),
                format!("return table.concat(('1' .. {magic} .. '2' .. {magic} .. {magic}):split({magic}), '|')"),
                format!("return #({needle}):split({needle})"),
            ] {
                let ours = victim.eval::<mlua_isle::mlua::Variadic<String>>(op.as_str());
                let luau = plain.eval::<mlua_isle::mlua::Variadic<String>>(op.as_str());
                assert_eq!(ours.map(|v| v.to_vec()), luau.map(|v| v.to_vec()), "`{op}`");
            }
        });
    });
}
