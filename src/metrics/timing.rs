//! Timing one request's run on its VM thread: its queue wait (from its
//! submission to its start) and its run time, recorded once it returns;
//! with the `tracing` feature, a span around the run.

use std::time::{Duration, Instant};

use super::latency::RunSink;
use super::pending::{Pending, Sample};
use crate::vm::{take_started, Job, Outcome};

/// A request's run, started: see [`Timing::start`].
pub(crate) struct Timing {
    start: Instant,
    #[cfg(feature = "tracing")]
    span: tracing::span::EnteredSpan,
}

impl Timing {
    /// Starts timing `job`'s run, now or at `at` (the end of the run just
    /// before, if the VM went straight from it to this one); with `tracing`,
    /// creates and enters its span (`worker`: the pool worker's index;
    /// `session`: its key, asked for only with `tracing`).
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(crate) fn start<K: std::fmt::Display>(
        job: &Job,
        at: Option<Instant>,
        worker: Option<usize>,
        session: impl FnOnce() -> Option<K>,
    ) -> Timing {
        let start = at.unwrap_or_else(Instant::now);
        #[cfg(feature = "tracing")]
        let span = {
            let (owner, submitted) = job.owner_and_submitted();
            let wait = start.saturating_duration_since(submitted);
            span(owner, worker, session(), wait)
        };
        Timing {
            start,
            #[cfg(feature = "tracing")]
            span,
        }
    }

    /// The run returned with `outcome` (`None`: it suspended): adds its
    /// queue wait and run time to `pending` (bound for `sink`), and
    /// returns the run time.
    pub(crate) fn finish(
        self,
        outcome: Option<Outcome>,
        pending: &mut Pending,
        sink: &impl RunSink,
    ) -> Duration {
        let run = self.start.elapsed();
        // `None` only for a request that never started (`Skipped`), which
        // no histogram takes.
        let submitted = take_started().unwrap_or(self.start);
        let sample = Sample {
            outcome,
            queue_wait: self.start.saturating_duration_since(submitted),
            run_time: run,
        };
        pending.push(sample, sink);
        #[cfg(feature = "tracing")]
        {
            self.span.record("run_time_ns", run.as_nanos() as u64);
            self.span.record("outcome", outcome_name(outcome));
        }
        run
    }

    /// When the run started.
    pub(crate) fn started(&self) -> Instant {
        self.start
    }
}

#[cfg(feature = "tracing")]
fn span(
    owner: u64,
    worker: Option<usize>,
    session: Option<impl std::fmt::Display>,
    wait: Duration,
) -> tracing::span::EnteredSpan {
    tracing::debug_span!(
        target: "mlua_isle",
        "lua_request",
        owner,
        worker,
        session = session.as_ref().map(tracing::field::display),
        queue_wait_ns = wait.as_nanos() as u64,
        run_time_ns = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
    .entered()
}

#[cfg(feature = "tracing")]
fn outcome_name(outcome: Option<Outcome>) -> &'static str {
    match outcome {
        Some(Outcome::Completed) => "completed",
        Some(Outcome::Failed) => "failed",
        Some(Outcome::OutOfMemory) => "out_of_memory",
        Some(Outcome::Cancelled) => "cancelled",
        Some(Outcome::Skipped) => "skipped",
        None => "suspended",
    }
}
