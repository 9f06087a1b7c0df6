//! Hostile scripts and the sandbox: odd and hostile scripts (`hostile`),
//! tenants that cannot reach each other (`isolation`), memory limits and
//! instruction budgets (`limits`), `sandbox(true)` (`sandbox`), errors that
//! read as Lua's own (`sandbox_errors`), and Lua behaving as in plain mlua
//! (`transparency`).
//!
//! One test binary, each file a module: every backend's suite in CI links
//! it once instead of six times.

#[path = "../common/mod.rs"]
mod common;

mod caller_tricks;
mod crossings;
mod hostile;
mod isolation;
mod iterators_and_metamethods;
mod limits;
mod message_handlers;
mod nearest_caller;
mod sandbox;
mod sandbox_errors;
mod shared_by_init;
mod tenants;
mod transparency;
