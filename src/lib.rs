//! Lua VMs (through [`mlua`]) that any thread can use.
//!
//! `mlua::Lua` is `!Send`: it must stay on the thread that created it. An
//! [`Isle`] gives a VM a thread of its own and hands out a `Send + Sync`
//! handle; every request crosses to that thread and its result comes back.
//!
//! ```
//! use mlua_isle::{Isle, IsleError};
//!
//! let isle = Isle::spawn(|lua| {
//!     lua.load("function add(a, b) return a + b end").exec()
//! })?;
//!
//! let sum: i64 = isle.call("add", (40, 2))?;            // blocking
//! let task = isle.spawn_eval::<String>("'hi from ' .. _VERSION");
//! assert_eq!(sum, 42);
//! assert!(task.wait()?.starts_with("hi from Lua"));    // or `.await` it
//!
//! // Runaway code is interrupted; the VM stays usable.
//! let runaway = isle.spawn_eval::<()>("while true do end");
//! runaway.cancel();
//! assert_eq!(runaway.wait(), Err(IsleError::Cancelled));
//! assert_eq!(isle.eval::<i64>("1 + 1")?, 2);
//!
//! isle.shutdown()?;
//! # Ok::<(), IsleError>(())
//! ```
//!
//! See the README for the guarantees about cancellation, time limits and
//! shutdown.
//!
//! # Stopping running Lua
//!
//! A running request is stopped (by [`Task::cancel`], a time limit, an
//! instruction budget or shutdown) by an interrupt hook, which raises a Lua
//! error that Lua code cannot catch and keep going: every catcher (`pcall`,
//! `xpcall`, `coroutine.resume`, `load`'s reader, `__close` handlers) is
//! interrupted again at once. The hook runs in one of three modes:
//!
//! - **Armed on demand** (Unix, Lua 5.2–5.5, unless
//!   [`max_instructions`](IsleBuilder::max_instructions) or
//!   [`permanent_hook`](IsleBuilder::permanent_hook)): no hook runs while a
//!   request runs, so Lua code runs at full speed. To stop it, the stopper
//!   signals the VM thread (`SIGURG`), whose handler sets a count hook on
//!   the Lua thread running at that moment; it fires at the next
//!   instruction.
//! - **Luau's interrupt**, armed on demand too: Luau has no hooks, but lets
//!   any thread set its interrupt, which then runs at the next function
//!   call, return or loop back-edge, on every coroutine.
//! - **Ticking all the time** (Lua 5.1, LuaJIT, other platforms, and with
//!   `max_instructions` or `permanent_hook`): a count hook checks every
//!   [`hook_interval`](IsleBuilder::hook_interval) instructions whether the
//!   request must stop. Lua then traps on every instruction, which makes
//!   pure-Lua code 2–3x slower whatever the interval.
//!
//! Rust functions called from Lua, and long C functions, are not reached by
//! the hook; the caller is answered on time anyway (see
//! [`IsleBuilder::stop_grace`]), and a Rust callback can poll its
//! request's token ([`current_token`]).
//!
//! # How the crate is built
//!
//! The source is in layers, each a folder that depends only on the ones
//! below it:
//!
//! - `sync/`: the atomics, locks and parkers the layers above
//!   synchronise with, replaced by [loom](https://docs.rs/loom)'s models
//!   under `--cfg mlua_isle_loom` (the README says how to run them).
//! - `request/`: a request as its caller sees it: the state machine that
//!   resolves it exactly once, [`Task`], [`CancelToken`], time limits. It
//!   knows nothing of Lua.
//! - `sandbox/`: the sandbox, with its budgeted pattern matcher (which is
//!   handed the function that polls for a stop).
//! - `interrupt/`: how running Lua learns it must stop (the hook and the
//!   catchers); its `alarm/` holds all of the crate's `unsafe` code.
//! - `vm/`: one VM as its thread sees it: creation, options, the job that
//!   runs a request, the compiled-chunk cache.
//! - `host/`: the VM thread's lifecycle (start, serve, stop with grace,
//!   replace when wedged), shared by [`Isle`] and each pool worker, and the
//!   one path every request is built on.
//! - `isle.rs` and `pool/`: the front ends.
//!
//! A request's path, for `isle.eval(..)`: `host/submit.rs` builds the
//! request (`request/state.rs`), its [`Task`] (`request/task.rs`) and the job
//! that carries the work (`vm/job.rs`); `isle.rs` queues the job, and its VM
//! thread hands it to `vm/mod.rs`, which runs it and resolves the request;
//! the caller's `Task::wait` wakes with the result.

#![deny(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_code)]

mod error;
mod host;
mod interrupt;
mod isle;
mod pool;
mod request;
mod sandbox;
mod sync;
mod vm;

pub use error::{IsleError, LuaError, LuaErrorKind};
pub use interrupt::current_token;
pub use isle::{Isle, IsleBuilder};
pub use pool::{IslePool, IslePoolBuilder, PoolMetrics, Session, SessionKey, WorkerMetrics};
pub use request::{CancelToken, Task};

// The README's examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The `mlua` crate this one is built on, for its types (`Lua`, `Table`, ...).
pub use mlua;
