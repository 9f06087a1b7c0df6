//! The primitives of the hand-written synchronisation (`request/state.rs`,
//! `pool/sleep.rs`), and their models.
//!
//! Normally these are plain re-exports: std's atomics, `parking_lot`'s lock
//! and condition variable, crossbeam's `Parker`, at no cost. Built with
//! `--cfg mlua_isle_loom` they are loom's (`model.rs`), so that the loom
//! tests in those two modules explore every interleaving and weak-memory
//! outcome of the protocols:
//!
//! ```sh
//! RUSTFLAGS="--cfg mlua_isle_loom -C debug-assertions" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --lib loom
//! ```
//!
//! (Not the usual `--cfg loom`: RUSTFLAGS reach every crate in the build,
//! and tokio, a dev-dependency, does not build with that one.
//! `debug-assertions` keeps the `debug_assert!`s that check a request
//! resolves once.)
//!
//! Loom models no time: under it a deadline or timeout has always passed
//! already (`Condvar::wait_until`, `Parker::park_timeout` return at once),
//! and the spins of `request/spin.rs` check their condition once.

#[cfg(not(mlua_isle_loom))]
pub(crate) use crossbeam_utils::sync::{Parker, Unparker};
#[cfg(not(mlua_isle_loom))]
pub(crate) use parking_lot::{Condvar, Mutex};
#[cfg(not(mlua_isle_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};

#[cfg(mlua_isle_loom)]
mod model;
#[cfg(mlua_isle_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(all(test, mlua_isle_loom))]
pub(crate) use model::check;
#[cfg(mlua_isle_loom)]
pub(crate) use model::{Condvar, Mutex, Parker, Unparker};
