//! Latency metrics shared by `Isle` and `IslePool`: histograms of queue
//! wait and run time, and the isle's counters.
//!
//! - `latency.rs`: the public histogram snapshot and the recorder behind it.
//! - `timing.rs`: timing one request's run (and its `tracing` span).
//! - `pending.rs`: samples a VM thread holds until it hands them over.
//! - `isle.rs`: an isle's counters and their snapshot.

mod isle;
mod latency;
mod pending;
mod timing;

pub(crate) use isle::IsleCounters;
pub use isle::IsleMetrics;
pub use latency::LatencyHistogram;
pub(crate) use latency::LatencyRecorder;
pub(crate) use pending::Pending;
pub(crate) use timing::Timing;
