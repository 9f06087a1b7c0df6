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

/// The `q` quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}

/// Prints one summary line: `what`, our time, and the ratio to `baseline`.
pub fn report(what: &str, ours: Duration, baseline_name: &str, baseline: Duration) {
    println!(
        "summary: {what:<40} {:>10.2?}   baseline {baseline_name}: {:>10.2?}   ratio {:.2}x",
        ours,
        baseline,
        ours.as_secs_f64() / baseline.as_secs_f64()
    );
}
