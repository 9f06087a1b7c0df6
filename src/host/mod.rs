//! The VM thread: its lifecycle, shared by `Isle` and each pool worker.

pub(crate) mod submit;
