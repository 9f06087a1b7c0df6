//! The `async` feature: the contracts with suspended requests
//! (`async_contracts`), stops reaching Lua code on mlua's async threads
//! (`async_stop`), and the Lua `task` library (`async_tasks`).
//!
//! One test binary, each file a module: every backend's suite in CI links
//! it once instead of three times. Built only with `async` (Cargo.toml).

#[path = "../common/mod.rs"]
mod common;

#[cfg(feature = "async")]
mod async_contracts;
#[cfg(feature = "async")]
mod async_stop;
#[cfg(feature = "async")]
mod async_tasks;
