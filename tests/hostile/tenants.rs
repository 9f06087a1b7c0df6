//! What the attacks on tenants' isolation share: a sandboxed pool of one
//! VM (so every tenant meets on it), and results shown for messages.

use std::time::Duration;

use mlua_isle::{IsleError, IslePool};

/// A sandboxed pool of one VM whose `init` runs `init`; requests stop
/// after 5 s (the attacks' own watchdog for loops).
pub fn sandboxed_pool(init: &'static str) -> IslePool {
    IslePool::builder()
        .workers(1)
        .sandbox(true)
        .default_timeout(Duration::from_secs(5))
        .init(move |lua| lua.load(init).exec())
        .build()
        .unwrap()
}

/// A result as a short string, for comparing and for assertion messages.
pub fn shown<T: std::fmt::Debug>(r: Result<T, IsleError>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("ERR {e}"),
    }
}
