//! Requests on an isle and on every front: `eval`, `call`, `exec` and their
//! errors (`requests`), loose ends of the API (`api`), `Task<T>` (`task`),
//! an isle's queue bound (`isle_backpressure`), reentrant calls
//! (`reentrant`), panics (`panics`), the compiled-chunk cache
//! (`chunk_cache`), the VM thread's lifecycle and shutdown (`lifecycle`,
//! `shutdown`), idle threads (`idle`), nothing leaking (`leaks`), and the
//! exactly-once stress test (`exactly_once`).
//!
//! One test binary, each file a module: every backend's suite in CI links
//! it once instead of twelve times.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod chunk_cache;
mod exactly_once;
mod idle;
mod isle_backpressure;
mod leaks;
mod lifecycle;
mod panics;
mod reentrant;
mod requests;
mod shutdown;
mod task;
