//! Repeated `eval` of the same ~50-line source: the compiled-chunk cache
//! against compiling each time.
//!
//! - `isle_eval_cached`: `Isle::eval` with the cache on (the default);
//! - `isle_eval_uncached`: the same with `chunk_cache(0)`;
//! - `direct_load_call`: same-thread `lua.load(src).call()` (what an
//!   uncached eval does, without the hop);
//! - `direct_call_compiled`: same-thread call of the chunk compiled once
//!   (the floor: running it, no compile, no hop).
//!
//! Target: the cached eval ≥ 5x faster than the uncached one.
//!
//! `eval_args`: a cached `eval_with` whose chunk takes its input as `...`
//! against a cached `eval` of the same chunk with the input written in
//! (same shape, same work), for a tiny chunk and for the pricing script
//! (its customer as two arguments).
//!
//! - `tiny_eval_with_args` / `tiny_eval_no_args`: `local a, b = ...` with
//!   `(1, 2)`, against `local a, b = 1, 2`;
//! - `script_eval_with_args` / `script_eval_no_args`: the pricing script
//!   with `("gold", 12)`, against the same with the values in the source.
//!
//! Target: with arguments ≤ 1.2x without.

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use mlua::{Function, Lua};
use mlua_isle::{Chunk, Isle};

/// A pricing script as an application might keep it: helpers, a rules
/// table, then one pass over an order. Most of its lines are definitions,
/// so it is cheap to run and the compile is most of an uncached eval.
const SCRIPT: &str = r#"
-- Prices an order: helpers, a rules table, then one pass over the lines.
local function round2(x)
  return math.floor(x * 100 + 0.5) / 100
end

local function clamp(x, lo, hi)
  if x < lo then return lo end
  if x > hi then return hi end
  return x
end

local function lookup(t, key, default)
  local v = t[key]
  if v == nil then return default end
  return v
end

local rules = {
  currency = "EUR",
  tax = { standard = 0.2, reduced = 0.055, none = 0 },
  discounts = { gold = 0.1, silver = 0.05 },
  max_discount = 0.15,
  shipping = { base = 4.9, free_above = 60 },
}

local function discount_rate(customer)
  local rate = lookup(rules.discounts, customer.tier, 0)
  if customer.orders > 10 then rate = rate + 0.02 end
  return clamp(rate, 0, rules.max_discount)
end

local function line_total(line)
  local tax = lookup(rules.tax, line.tax, rules.tax.standard)
  return line.qty * line.price * (1 + tax)
end

local function shipping(subtotal)
  if subtotal >= rules.shipping.free_above then return 0 end
  return rules.shipping.base
end

local order = {
  customer = { tier = "gold", orders = 12 },
  lines = {
    { qty = 2, price = 9.5, tax = "standard" },
    { qty = 1, price = 24, tax = "reduced" },
    { qty = 3, price = 4.25, tax = "none" },
  },
}

local subtotal = 0
for _, line in ipairs(order.lines) do
  subtotal = subtotal + line_total(line)
end
local total = subtotal * (1 - discount_rate(order.customer)) + shipping(subtotal)
return round2(total)
"#;

/// `SCRIPT` taking its customer as arguments, or (`args: false`) with the
/// same values written in: the same shape either way.
fn script_with_customer(args: bool) -> String {
    let head = match args {
        true => "local tier, orders = ...\n",
        false => "local tier, orders = \"gold\", 12\n",
    };
    let body = SCRIPT.replace(
        "customer = { tier = \"gold\", orders = 12 }",
        "customer = { tier = tier, orders = orders }",
    );
    assert_ne!(body, SCRIPT, "the script's customer line moved");
    format!("{head}{body}")
}

fn isle(entries: usize) -> Isle {
    Isle::builder()
        .chunk_cache(entries)
        .spawn(|_| Ok(()))
        .unwrap()
}

fn repeated_eval(c: &mut Criterion) {
    let cached = isle(64);
    let uncached = isle(0);
    let lua = Lua::new();
    let compiled: Function = lua.load(SCRIPT).into_function().unwrap();
    let expected = compiled.call::<f64>(()).unwrap();
    assert_eq!(cached.eval::<f64>(SCRIPT).unwrap(), expected);
    assert_eq!(uncached.eval::<f64>(SCRIPT).unwrap(), expected);

    let mut g = c.benchmark_group("repeated_eval");
    g.bench_function("isle_eval_cached", |b| {
        b.iter(|| cached.eval::<f64>(SCRIPT).unwrap())
    });
    g.bench_function("isle_eval_uncached", |b| {
        b.iter(|| uncached.eval::<f64>(SCRIPT).unwrap())
    });
    g.bench_function("direct_load_call", |b| {
        b.iter(|| lua.load(SCRIPT).call::<f64>(()).unwrap())
    });
    g.bench_function("direct_call_compiled", |b| {
        b.iter(|| compiled.call::<f64>(()).unwrap())
    });
    g.finish();
    if !common::benching() {
        return;
    }

    // Each pair in alternating rounds, so the ratio is taken under the same
    // machine load.
    let ours = || {
        cached.eval::<f64>(SCRIPT).unwrap();
    };
    let vs_uncached = common::interleaved(15, 2_000, ours, || {
        uncached.eval::<f64>(SCRIPT).unwrap();
    });
    common::report("isle_eval cached", &vs_uncached, "chunk_cache(0)");
    println!(
        "summary: {:<40} {:>10.1}x   (target >= 5x; chunk_cache(0) / cached, median of the per-round ratios)",
        "speedup of the cache",
        1.0 / vs_uncached.ratio()
    );
    let vs_load = common::interleaved(15, 2_000, ours, || {
        lua.load(SCRIPT).call::<f64>(()).unwrap();
    });
    common::report("isle_eval cached", &vs_load, "direct load+call");
    let vs_compiled = common::interleaved(15, 2_000, ours, || {
        compiled.call::<f64>(()).unwrap();
    });
    common::report("isle_eval cached", &vs_compiled, "direct call, compiled");
    cached.shutdown().unwrap();
    uncached.shutdown().unwrap();
}

fn eval_args(c: &mut Criterion) {
    let isle = isle(64);
    const TINY_ARGS: &str = "local a, b = ... return a + b";
    const TINY: &str = "local a, b = 1, 2 return a + b";
    // Made once, as a caller evaluating it often would: no copy per request.
    let (script_args, script) = (
        Chunk::new(script_with_customer(true)),
        Chunk::new(script_with_customer(false)),
    );
    assert_eq!(isle.eval_with::<i64>(TINY_ARGS, (1, 2)).unwrap(), 3);
    assert_eq!(isle.eval::<i64>(TINY).unwrap(), 3);
    let expected = isle.eval::<f64>(SCRIPT).unwrap();
    assert_eq!(
        isle.eval_with::<f64>(&script_args, ("gold", 12)).unwrap(),
        expected
    );
    assert_eq!(isle.eval::<f64>(&script).unwrap(), expected);

    let mut g = c.benchmark_group("eval_args");
    g.bench_function("tiny_eval_with_args", |b| {
        b.iter(|| isle.eval_with::<i64>(TINY_ARGS, (1, 2)).unwrap())
    });
    g.bench_function("tiny_eval_no_args", |b| {
        b.iter(|| isle.eval::<i64>(TINY).unwrap())
    });
    g.bench_function("script_eval_with_args", |b| {
        b.iter(|| isle.eval_with::<f64>(&script_args, ("gold", 12)).unwrap())
    });
    g.bench_function("script_eval_no_args", |b| {
        b.iter(|| isle.eval::<f64>(&script).unwrap())
    });
    g.finish();
    if !common::benching() {
        return;
    }

    let tiny = common::interleaved(
        15,
        20_000,
        || {
            isle.eval_with::<i64>(TINY_ARGS, (1, 2)).unwrap();
        },
        || {
            isle.eval::<i64>(TINY).unwrap();
        },
    );
    common::report("tiny eval_with (1, 2)", &tiny, "eval, values in source");
    let priced = common::interleaved(
        15,
        2_000,
        || {
            isle.eval_with::<f64>(&script_args, ("gold", 12)).unwrap();
        },
        || {
            isle.eval::<f64>(&script).unwrap();
        },
    );
    common::report(
        "script eval_with (gold, 12)",
        &priced,
        "eval, values in source",
    );
    for (what, p) in [("tiny", &tiny), ("script", &priced)] {
        println!(
            "summary: {:<40} {:>10.2}x   (target <= 1.2x; with / without arguments, median of the per-round ratios)",
            format!("{what}: cached eval with arguments"),
            p.ratio()
        );
    }
    isle.shutdown().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = repeated_eval, eval_args
}
criterion_main!(benches);
