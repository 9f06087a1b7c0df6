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
