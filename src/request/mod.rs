//! The request as its caller sees it.

mod chunk;
pub(crate) mod owner;
pub(crate) mod room;
pub(crate) mod spin;
mod state;
mod task;
pub(crate) mod timer;
mod token;

pub use chunk::Chunk;
pub(crate) use room::{Acquire, Admission, Refused, Room};
pub(crate) use state::*;
pub use task::Task;
pub use token::CancelToken;
pub(crate) use token::Reason;
