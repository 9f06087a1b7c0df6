//! Helpers shared by the benches: a summary that prints our number beside
//! its baseline, so the ratio is visible in one run.

#![allow(dead_code)]

use std::time::{Duration, Instant};

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

/// Measures `ours` and `baseline` in alternating rounds (so both see the
/// same machine weather) and returns their medians per op and the median of
/// the per-round ratios.
pub fn interleaved(
    rounds: usize,
    iters: u64,
    mut ours: impl FnMut(),
    mut baseline: impl FnMut(),
) -> (Duration, Duration, f64) {
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
    (
        quantile(&mut o, 0.5),
        quantile(&mut b, 0.5),
        ratios[ratios.len() / 2],
    )
}

/// The `q` quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}

/// Prints one summary line: `what`, our time, the baseline's, and the
/// ratio (median of per-round ratios when measured with `interleaved`).
pub fn report(what: &str, ours: Duration, baseline_name: &str, baseline: Duration, ratio: f64) {
    println!(
        "summary: {what:<40} {ours:>10.2?}   baseline {baseline_name}: {baseline:>10.2?}   ratio {ratio:.2}x"
    );
}
