//! Helpers shared by the benches: a summary that prints our number beside
//! its baseline, so the ratio is visible in one run.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use mlua::{Function, Lua};

/// The pool benches' Lua: `spin(n)`, n iterations of arithmetic (a job of
/// a chosen length); `add(a, b)`, the tiny request.
pub const SCRIPT: &str = r#"
function spin(n)
    local x = 0
    for i = 1, n do x = x + i % 7 end
    return x
end
function add(a, b) return a + b end
"#;

/// A plain `Lua` (no hook, as our VMs run until a request must stop) with
/// `SCRIPT` loaded.
pub fn plain_lua() -> Lua {
    let lua = Lua::new();
    lua.load(SCRIPT).exec().unwrap();
    lua
}

/// The `spin` argument that takes about `target` in plain mlua, and the
/// time it then takes.
pub fn calibrate(target: Duration) -> (i64, Duration) {
    let lua = plain_lua();
    let spin: Function = lua.globals().get("spin").unwrap();
    let n = 100_000i64;
    let per = per_op(5, 20, || {
        spin.call::<i64>(n).unwrap();
    });
    let arg = ((target.as_secs_f64() / per.as_secs_f64()) * n as f64).max(1.0) as i64;
    let took = per_op(5, 200, || {
        spin.call::<i64>(arg).unwrap();
    });
    (arg, took)
}

/// True under `cargo bench` (criterion gets `--bench`); false when
/// `cargo test` runs the bench once as a smoke test, where the summaries
/// are skipped.
pub fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Median time per operation of `op`, over `rounds` rounds of `iters` calls.
pub fn per_op(rounds: usize, iters: u64, mut op: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                op();
            }
            start.elapsed() / iters as u32
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

/// Our time beside a baseline's, measured in alternating rounds.
pub struct Paired {
    /// Median time per operation of ours, over the rounds.
    pub ours: Duration,
    /// Median time per operation of the baseline, over the rounds.
    pub baseline: Duration,
    /// `ours / baseline` of each round, sorted.
    ratios: Vec<f64>,
}

impl Paired {
    /// The median of the per-round ratios `ours / baseline`. Each round's
    /// pair saw the same machine load, so this is the ratio to quote; it
    /// need not equal `ours / baseline` of the two medians.
    pub fn ratio(&self) -> f64 {
        self.ratios[self.ratios.len() / 2]
    }

    /// The lowest and highest per-round ratio.
    pub fn ratio_range(&self) -> (f64, f64) {
        (self.ratios[0], self.ratios[self.ratios.len() - 1])
    }

    /// `ours / baseline` of the two medians.
    pub fn ratio_of_medians(&self) -> f64 {
        self.ours.as_secs_f64() / self.baseline.as_secs_f64()
    }
}

/// Measures `ours` and `baseline` in alternating rounds of `iters` calls
/// each, so both see the same machine load.
pub fn interleaved(
    rounds: usize,
    iters: u64,
    mut ours: impl FnMut(),
    mut baseline: impl FnMut(),
) -> Paired {
    let mut o = Vec::new();
    let mut b = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let tb = per_op(1, iters, &mut baseline);
        let to = per_op(1, iters, &mut ours);
        ratios.push(to.as_secs_f64() / tb.as_secs_f64());
        o.push(to);
        b.push(tb);
    }
    ratios.sort_by(f64::total_cmp);
    Paired {
        ours: quantile(&mut o, 0.5),
        baseline: quantile(&mut b, 0.5),
        ratios,
    }
}

/// The `q` quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}

/// Prints one summary line: `what`, our median time, the baseline's, and
/// both ratios, each named: the median of the per-round ratios (with their
/// range) and the ratio of the two medians printed.
pub fn report(what: &str, p: &Paired, baseline_name: &str) {
    let (lo, hi) = p.ratio_range();
    println!(
        "summary: {what:<40} {:>10.2?}   baseline {baseline_name}: {:>10.2?}   ours/baseline: per round {:.2}x (median; range {lo:.2}-{hi:.2}x), of these medians {:.2}x",
        p.ours,
        p.baseline,
        p.ratio(),
        p.ratio_of_medians(),
    );
}
