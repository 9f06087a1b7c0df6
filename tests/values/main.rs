//! Values in and out of requests: arguments, chunk names and call paths
//! (`args`), `LuaHandle` (`handles`), print capture (`print_capture`),
//! raised error values (`error_values`), `Serde<T>` (`serde_values`, with the
//! `serde` feature), and the red team's attacks on all of them
//! (`redteam`).
//!
//! One test binary, each file a module: every backend's suite in CI links
//! it once instead of six times.

#[path = "../common/mod.rs"]
mod common;

mod args;
mod error_values;
mod handles;
mod print_capture;
mod redteam;
mod serde_values;
