//! Stopping a request: cancels (`cancel`), time limits (`timeout`), the
//! interrupt hook armed on demand (`arming`), answers on time whatever the
//! VM is doing (`stop_on_time`, and `slow_heap` for the collector), and
//! `__close` handlers that must stay stoppable (`close_handlers`, Lua 5.4
//! and 5.5).
//!
//! One test binary, each file a module: every backend's suite in CI links
//! it once instead of five times.

#[path = "../common/mod.rs"]
mod common;

mod arming;
mod cancel;
#[cfg(any(feature = "lua54", feature = "lua55"))]
mod close_handlers;
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
mod slow_heap;
mod stop_on_time;
mod timeout;
