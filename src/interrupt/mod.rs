//! The interrupt hook: how a running request learns it must stop.
//!
//! A count hook is installed on the VM once, before `init` runs: mlua's
//! global hook, or on Lua 5.4 and 5.5 a C hook of ours (`interrupt/alarm`,
//! `tick_hook`) that calls the same tick from a C frame of its own (mlua's
//! trampoline moves values on the running function's frame, across its
//! to-be-closed variables). Lua threads resumed from Rust through mlua's
//! `Thread` API (`resume`, `into_async`, `Function::call_async`) are
//! tracked through mlua's thread events (see `alarm`).
//! It runs in one of the three modes the crate docs describe ("Stopping
//! running Lua"): armed on demand, where the hook is removed from the main
//! state right away and `alarm/` arms it when a stop comes (a tick with
//! nothing to stop removes it again); Luau's interrupt, set and taken away
//! the same way; or ticking all the time, where Lua copies a thread's hook
//! into every coroutine it creates, and every `hook_interval` instructions
//! the hook looks at the running request's stop reason (and the owner's
//! abort flag).
//!
//! Once a request must stop, the hook re-arms itself on the running
//! coroutine with a count of 1 and raises a Lua error. Whatever catches that
//! error (`pcall`, `load`'s protected reader, ...) is interrupted again by
//! the very next instruction it runs on that coroutine, so the error climbs
//! until it leaves the request. Some catchers are wrapped at start-up, so
//! that the error value they catch is checked at once: a pending
//! interruption, or a Rust panic (which mlua hands to Lua as an error value),
//! is raised again in the caller.
//!
//! On Lua 5.2–5.5 the wrappers are C functions (`interrupt/alarm`, `mod
//! protected`), invisible to Lua code: no line events for a debug hook, no
//! frames of their own in tracebacks or `debug.getinfo` levels. Lua 5.1,
//! LuaJIT and Luau keep wrappers written in Lua.
//! - `pcall`, `xpcall`: Lua's own (yieldable) functions, wrapped (on Lua
//!   5.2–5.5, rebuilt in C on `lua_pcallk` with a continuation; on Lua
//!   5.1, ours of `interrupt/alarm/native.rs`, which check the stack). `xpcall`
//!   also skips the user's message handler while the request is stopping:
//!   an error raised inside a hook runs the handler with hooks disabled, so
//!   a handler that loops forever could never be stopped. (mlua's own
//!   panic-proof `pcall` is not used: it cannot yield, and it overflows the
//!   Lua stack when the callee returns many values.)
//! - `coroutine.resume` (and, armed on demand, `coroutine.close` and
//!   `coroutine.wrap`), whose caller runs on another coroutine; and `load`,
//!   which returns its reader's error.
//! - Ticking all the time, `coroutine.create` and `coroutine.wrap` (and
//!   `task.spawn`): a new Lua thread starts a countdown of its own, so each
//!   is charged one interval when it is made, and sees a pending stop there
//!   (`alarm/threads.rs`): a tree of coroutines that each end before their
//!   first tick is counted and stopped.
//!
//! Finally, a request whose interruption fired resolves with its stop reason
//! even if its code ended normally after swallowing it.
//!
//! Raising an error costs a `longjmp`; unwinding a Rust panic through mlua
//! instead costs tens of microseconds, which is why it is not used.

#[allow(unsafe_code)]
pub(crate) mod alarm;
mod catchers;
mod errors;
mod hook;
mod raised;

pub use errors::current_token;
pub(crate) use errors::request_error;
#[cfg(feature = "async")]
pub(crate) use hook::thread_made;
pub(crate) use hook::{HookOptions, Interrupt};
