//! How running Lua learns it must stop.

#[allow(unsafe_code)]
pub(crate) mod alarm;
mod hook;

pub use hook::current_token;
pub(crate) use hook::*;
