//! What cancellation costs a running script: pure-Lua workloads run by
//! plain mlua on one thread (no hook: the baseline), by plain mlua with a
//! permanent count hook (what a hook-based cancel costs when it is always
//! installed), and by an `Isle` (hook armed only when a request must stop).
//! An `Isle` with `max_instructions` keeps a permanent hook, and is shown
//! too (not on Luau, which refuses it).
//!
//! Target: `isle` ≤ 1.1x `plain_mlua` on every shape.

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
#[cfg(not(feature = "luau"))]
use mlua::HookTriggers;
use mlua::{Function, Lua, VmState};
use mlua_isle::Isle;

/// Workload shapes: (name, Lua source defining a global function `work`).
const SHAPES: &[(&str, &str)] = &[
    (
        "arith_loop",
        "function work() local s = 0 for i = 1, 200000 do s = (s + i * 3) % 1000003 end return s end",
    ),
    (
        "function_calls",
        "local function f(x) return x + 1 end
         function work() local s = 0 for i = 1, 100000 do s = f(s) end return s end",
    ),
    (
        "table_building",
        "function work() local t = {} for i = 1, 20000 do t[i] = { i, x = i } end return #t end",
    ),
    (
        "string_ops",
        "function work() local t = {} for i = 1, 5000 do t[#t + 1] = ('%d:%s'):format(i, ('x'):rep(i % 7)) end return #table.concat(t) end",
    ),
    (
        "table_sort",
        "function work() local t = {} for i = 1, 20000 do t[i] = (i * 7919) % 20011 end table.sort(t) return t[1] end",
    ),
    (
        // The isle's `pcall`/`xpcall` are its own (C on Lua 5.2–5.5):
        // these compare them with Lua's.
        "pcall_calls",
        "local function f(x) return x + 1 end
         function work() local s = 0 for i = 1, 50000 do local _, v = pcall(f, s) s = v end return s end",
    ),
    (
        "xpcall_errors",
        "local function h(e) return e end
         function work() local n = 0 for i = 1, 20000 do if not xpcall(error, h, i) then n = n + 1 end end return n end",
    ),
    (
        "coroutines",
        "function work()
             local gen = coroutine.wrap(function() for i = 1, 20000 do coroutine.yield(i) end end)
             local s = 0 for _ = 1, 20000 do s = s + gen() end return s
         end",
    ),
];

fn plain(src: &str, hooked: bool) -> (Lua, Function) {
    let lua = Lua::new();
    #[cfg(not(feature = "luau"))]
    if hooked {
        lua.set_global_hook(HookTriggers::new().every_nth_instruction(1000), |_, _| {
            Ok(VmState::Continue)
        })
        .unwrap();
    }
    // Luau has no hooks: its interrupt is the equivalent.
    #[cfg(feature = "luau")]
    if hooked {
        lua.set_interrupt(|_| Ok(VmState::Continue));
    }
    lua.load(src).exec().unwrap();
    let f: Function = lua.globals().get("work").unwrap();
    (lua, f)
}

fn isle(src: &'static str) -> Isle {
    Isle::spawn(move |lua| lua.load(src).exec()).unwrap()
}

/// An isle counting instructions against a budget it never reaches. Luau
/// counts none: it refuses `max_instructions`.
#[cfg(not(feature = "luau"))]
fn isle_with_budget(src: &'static str) -> Isle {
    Isle::builder()
        .max_instructions(u64::MAX / 2)
        .spawn(move |lua| lua.load(src).exec())
        .unwrap()
}

fn hook_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("hook_cost");
    g.sample_size(10);
    for &(name, src) in SHAPES {
        let (_l, f) = plain(src, false);
        g.bench_function(format!("{name}/plain_mlua"), |b| {
            b.iter(|| f.call::<mlua::Value>(()).unwrap())
        });
        let (_lh, fh) = plain(src, true);
        g.bench_function(format!("{name}/mlua_permanent_hook"), |b| {
            b.iter(|| fh.call::<mlua::Value>(()).unwrap())
        });
        let i = isle(src);
        g.bench_function(format!("{name}/isle"), |b| {
            b.iter(|| i.call::<()>("work", ()).unwrap())
        });
    }
    g.finish();
    if !common::benching() {
        return;
    }

    for &(name, src) in SHAPES {
        let (_l, f) = plain(src, false);
        let (_lh, fh) = plain(src, true);
        let i = isle(src);
        let base = || {
            f.call::<mlua::Value>(()).unwrap();
        };
        let ours = common::interleaved(
            11,
            10,
            || {
                i.call::<()>("work", ()).unwrap();
            },
            base,
        );
        common::report(
            &format!("{name}: isle (target <= 1.1x)"),
            &ours,
            "plain_mlua",
        );
        let hooked = common::interleaved(
            11,
            10,
            || {
                fh.call::<mlua::Value>(()).unwrap();
            },
            base,
        );
        common::report(
            &format!("{name}: mlua + permanent hook"),
            &hooked,
            "plain_mlua",
        );
        #[cfg(not(feature = "luau"))]
        {
            let ib = isle_with_budget(src);
            let budget = common::interleaved(
                11,
                10,
                || {
                    ib.call::<()>("work", ()).unwrap();
                },
                base,
            );
            common::report(
                &format!("{name}: isle + max_instructions"),
                &budget,
                "plain_mlua",
            );
            ib.shutdown().unwrap();
        }
        i.shutdown().unwrap();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = hook_cost
}
criterion_main!(benches);
