//! `CancelToken`: the handle that stops one request.

use std::fmt;
use std::sync::Arc;

use super::Cancel;

/// Why a request was stopped from outside. Stored in the request header as a
/// `u8`; the first reason recorded wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Reason {
    Cancelled = 1,
    Timeout = 2,
    Shutdown = 3,
    InstructionLimit = 4,
}

impl Reason {
    pub(crate) fn from_u8(v: u8) -> Option<Reason> {
        match v {
            1 => Some(Reason::Cancelled),
            2 => Some(Reason::Timeout),
            3 => Some(Reason::Shutdown),
            4 => Some(Reason::InstructionLimit),
            _ => None,
        }
    }

    pub(crate) fn error(self) -> crate::IsleError {
        match self {
            Reason::Cancelled => crate::IsleError::Cancelled,
            Reason::Timeout => crate::IsleError::Timeout,
            Reason::Shutdown => crate::IsleError::Shutdown,
            Reason::InstructionLimit => crate::IsleError::InstructionLimit,
        }
    }
}

/// Cancels one request. Cheap to clone; `Send + Sync`, so it can be handed to
/// any thread.
///
/// - A request cancelled while queued never runs, and its task resolves
///   [`IsleError::Cancelled`](crate::IsleError::Cancelled) at once.
/// - A running request is interrupted as soon as its Lua code next reaches a
///   check (microseconds, for ordinary Lua code), including inside
///   coroutines and `pcall` loops; once cancelled, Lua code cannot catch
///   the interruption and carry on. Where the checks are depends on the
///   hook's mode (see [the crate docs](crate#stopping-running-lua)), so a
///   few instructions may still run after `cancel` returns. A long C
///   function runs to its end first (on PUC Lua and LuaJIT, a pattern match
///   outside the sandbox, say; Luau's matcher checks at every step), but
///   the caller is answered on time anyway.
/// - Cancelling a request that already finished changes nothing.
///
/// Rust functions called from Lua are not interrupted by the hook. One that
/// blocks or loops can ask [`current_token`](crate::current_token) for its
/// request's token and return early when [`is_cancelled`](Self::is_cancelled)
/// says so.
#[derive(Clone)]
pub struct CancelToken {
    req: Arc<dyn Cancel>,
}

impl CancelToken {
    /// The token of the request `req`.
    pub(crate) fn of(req: Arc<dyn Cancel>) -> CancelToken {
        CancelToken { req }
    }

    /// Cancels the request. Idempotent; never blocks: on a running request
    /// it spins for at most 20 µs, letting the VM finish on its own, then
    /// answers the request's caller itself.
    pub fn cancel(&self) {
        self.stop(Reason::Cancelled);
    }

    /// True once the request was asked to stop: cancelled, timed out,
    /// interrupted by shutdown, or out of its instruction budget (the stops
    /// whose errors [`IsleError::is_cancellation`](crate::IsleError::is_cancellation)
    /// recognises). False if it finished before any of these.
    pub fn is_cancelled(&self) -> bool {
        self.req.header().reason().is_some()
    }

    /// The one way a request is stopped (cancel, time limit, shutdown,
    /// budget): resolves it now and, if it was running, has the owner watch
    /// that its VM lets go in time.
    pub(crate) fn stop(&self, reason: Reason) {
        if self.req.stop(reason) {
            super::timer::watch(&self.req);
        }
    }

    /// Why the request was stopped, if it was.
    pub(crate) fn reason(&self) -> Option<Reason> {
        self.req.header().reason()
    }

    /// True if this is the token of `req`.
    pub(crate) fn is_for(&self, req: &Arc<dyn Cancel>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.req), Arc::as_ptr(req))
    }

    /// True if this is the token of the request `req` points to.
    pub(crate) fn is(&self, req: &std::sync::Weak<dyn Cancel>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.req), req.as_ptr())
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<dyn Cancel> {
        Arc::downgrade(&self.req)
    }
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .field("finished", &self.req.header().is_done())
            .finish()
    }
}
