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
//! # Async: Lua awaits Rust
//!
//! With the `async` feature, a request can wait for Rust futures without
//! holding its VM. Register async functions with mlua's
//! [`Lua::create_async_function`](https://docs.rs/mlua/0.12/mlua/struct.Lua.html#method.create_async_function) (in
//! `init`, say); Lua code calls them like any function:
//!
//! ```
//! # #[cfg(feature = "async")] {
//! use mlua_isle::IslePool;
//!
//! let pool = IslePool::builder()
//!     .workers(1)
//!     .init(|lua| {
//!         let fetch = lua.create_async_function(|_, key: String| async move {
//!             // A database, an HTTP call, a timer: any future, any runtime.
//!             Ok(format!("value of {key}"))
//!         })?;
//!         lua.globals().set("fetch", fetch)
//!     })
//!     .build()?;
//! let v: String = pool.eval("return fetch('a') .. '!'")?;
//! assert_eq!(v, "value of a!");
//! # }
//! # Ok::<(), mlua_isle::IsleError>(())
//! ```
//!
//! - **What suspends.** Every request's Lua function runs as a coroutine.
//!   When an async function it calls (at any depth of Lua calls, through
//!   `pcall` too) returns a pending future, the request is *suspended*:
//!   its VM goes on with other requests, queued or woken, and polls it
//!   again when the future's waker fires. So one VM serves thousands of
//!   waiting requests. `spawn_exec_async` (on [`Isle`], [`IslePool`],
//!   [`Session`]) runs an async closure on the VM the same way.
//! - **What does not.** A request that never waits is polled once and
//!   resolves on the spot, as without the feature. A *synchronous* Rust
//!   callback that blocks still blocks its VM. An async function cannot
//!   wait where Lua cannot yield: inside a coroutine Lua code created
//!   (`coroutine.wrap`/`resume`), a `table.sort` comparator, a metamethod
//!   called from C, `pcall` on Lua 5.1; there it fails or misbehaves, as in
//!   plain mlua. Lua code runs in a coroutine: `coroutine.isyieldable()` is
//!   true, and a `coroutine.yield()` at the request's top level is ignored.
//! - **Sessions** keep their order: a session's requests run one at a
//!   time, in submission order, and a suspended one holds its session, not
//!   its VM.
//! - **Stops.** Cancel, time limits, dropping the [`Task`] and shutdown
//!   resolve a suspended request at once; its VM then drops its future and
//!   closes its coroutine (its `__close` handlers run, and can be stopped
//!   as for any stopped request). [`current_token`] in an async function
//!   is the calling request's. A panic in an async function resolves
//!   [`IsleError::Panic`]. Memory limits, instruction budgets (counted
//!   across suspensions) and the sandbox apply as before.
//! - **Wakers** are plain [`std::task::Waker`]s: any runtime, or none, may
//!   wake a suspended request. With the `tokio` feature, the VM threads run
//!   inside a tokio runtime's context, so `tokio::time::sleep` and tokio I/O
//!   work in async functions: the one given to
//!   `tokio_handle`, or else the one the
//!   builder is called from.
//! - **Limits.** [`max_suspended`](IsleBuilder::max_suspended) caps what
//!   one VM holds suspended; [`WorkerMetrics::suspended`] counts them.
//! - **Concurrency inside Lua.** With
//!   [`task_library(true)`](IsleBuilder::task_library), Lua code gets a
//!   global `task`: `task.sleep(seconds)`, and `task.spawn(f, ...)`,
//!   returning a handle with `:join()` (`f`'s results, or its error raised)
//!   and `:cancel()`. Children run beside the request that spawned them
//!   and end with it: cancelled when it returns, fails, is cancelled or
//!   times out. A child that failed and was never joined fails its request.
//!
//!   ```lua
//!   local a, b = task.spawn(fetch, 'x'), task.spawn(fetch, 'y')
//!   return a:join(), b:join()
//!   ```
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
//!   resolves it exactly once, [`Task`], [`CancelToken`], time limits, the
//!   room of a bounded queue with its waiters (`room.rs`), and the source
//!   an `eval` sends ([`Chunk`]). It knows nothing of Lua.
//! - `sandbox/`: the sandbox, with its budgeted pattern matcher (which is
//!   handed the function that polls for a stop), and `print` (where its
//!   lines go, a request's capture among them: `print.rs`).
//! - `interrupt/`: how running Lua learns it must stop (the hook and the
//!   catchers); its `alarm/` holds all of the crate's `unsafe` code.
//! - `vm/`: one VM as its thread sees it: creation, options, the job that
//!   runs a request, the compiled-chunk cache, the request's scope (its
//!   session and print capture, current around its run and every poll:
//!   `scope.rs`). With `async`: requests as
//!   coroutines (`coroutine.rs`), the suspended ones and their wakers
//!   (`suspend.rs`, `job/suspended.rs`), the `task` library (`tasks.rs`,
//!   `clock.rs`).
//! - `host/`: the VM thread's lifecycle (start, serve, stop with grace,
//!   replace when wedged), shared by [`Isle`] and each pool worker, and the
//!   one path every request is built on (`submit.rs`; `call_path.rs`
//!   resolves what `call` names; `reserve.rs` takes room ahead of a
//!   request: [`Permit`]; `capture.rs` captures what a request prints:
//!   [`PrintCapture`]).
//! - `isle.rs` and `pool/`: the front ends.
//! - `handle/`: [`LuaHandle`], a value that stays on its VM, whose requests
//!   go back through the front end (isle, pool worker or session) that made
//!   it. It sits beside the front ends rather than above them: each gives
//!   its VMs a way back to it (`route.rs`: a VM's identity and home), the
//!   one place they call into it.
//!
//! Beside the layers: `error.rs` ([`IsleError`]), `error_value/` (a raised
//! value read on the VM: [`ErrorValue`]) and, with `serde`, `typed.rs`
//! (`Serde`).
//!
//! A request's path, for `isle.eval(..)`: `host/submit.rs` builds the
//! request (`request/state.rs`), its [`Task`] (`request/task.rs`) and the job
//! that carries the work (`vm/job.rs`); `isle.rs` queues the job, and its VM
//! thread hands it to `vm/mod.rs`, which runs it and resolves the request;
//! the caller's `Task::wait` wakes with the result.

#![deny(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_code)]

mod error;
mod error_value;
mod handle;
mod host;
mod interrupt;
mod isle;
mod metrics;
mod pool;
mod request;
mod sandbox;
mod sync;
#[cfg(feature = "serde")]
mod typed;
mod vm;

pub use error::{IsleError, LuaError, LuaErrorKind};
pub use error_value::{ErrorValue, FieldKey, Scalar};
pub use handle::LuaHandle;
pub use host::capture::{PrintCapture, Printed};
pub use host::reserve::{Permit, Reserve};
pub use interrupt::current_token;
pub use isle::{Isle, IsleBuilder};
pub use metrics::{IsleMetrics, LatencyHistogram};
pub use pool::{
    IslePool, IslePoolBuilder, PoolMetrics, Session, SessionKey, SessionMetrics, WorkerMetrics,
};
pub use request::{CancelToken, Chunk, Task};
#[cfg(feature = "serde")]
pub use typed::Serde;

// The README's examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The `mlua` crate this one is built on, for its types (`Lua`, `Table`, ...).
pub use mlua;
