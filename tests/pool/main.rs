//! The pool: building it (`pool_build`), its queues and their bounds
//! (`pool_backpressure`, `pool_session_limits`), sessions and fair service
//! across them (`pool_sessions`, `pool_fairness`), work stealing
//! (`pool_stealing`), `broadcast`, `map` and `reload` (`pool_broadcast`,
//! `pool_map`, `pool_reload`), recycling (`pool_recycle`), its errors
//! (`pool_errors`), metrics and latency histograms (`pool_metrics`,
//! `latency`), shutdown (`pool_shutdown`), the red team's attacks on the
//! tenant controls (`redteam_tenants`), and on the pool's accounting and
//! promises through its host API (`accounting`).
//!
//! One test binary, each file a module: every backend's suite in CI links
//! it once instead of fifteen times.

#[path = "../common/mod.rs"]
mod common;

mod accounting;
mod latency;
mod pool_backpressure;
mod pool_broadcast;
mod pool_build;
mod pool_errors;
mod pool_fairness;
mod pool_map;
mod pool_metrics;
mod pool_recycle;
mod pool_reload;
mod pool_session_limits;
mod pool_sessions;
mod pool_shutdown;
mod pool_stealing;
mod redteam_tenants;
