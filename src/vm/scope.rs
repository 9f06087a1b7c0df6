//! What a request carries on its VM thread besides its token (which the
//! interrupt holds): the session it belongs to and the capture of its
//! prints.
//!
//! Current from the start of its run to its end, and again around each
//! later poll of a suspended request and while a stopped one is dropped
//! (`job/suspended.rs`), all through [`enter`] and [`Entered::leave`]. So
//! what runs for a request finds that request's: a `LuaHandle` made then
//! belongs to its session (`handle/route.rs`), a line printed goes to its
//! capture (`sandbox/print.rs`), even when suspended requests interleave
//! on one VM. Between requests (init, reloads, the collector's finalizers
//! after a request) there is none.
//!
//! Each part is kept in a thread-local of the lowest layer that reads it:
//! the session here (read by `handle/`, above), the capture beside `print`
//! (`sandbox/`, below). A request with neither pays four swaps of a
//! thread-local per run, and no allocation.

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::sandbox::print::{self, Capture};

/// A session, as the VM layer holds it: opaque (a pool's binding, which
/// `handle/route.rs` reads back).
pub(crate) type SessionTag = Arc<dyn Any + Send + Sync>;

/// One request's scope.
#[derive(Default)]
pub(crate) struct Scope {
    /// The session whose request this is (pool workers only).
    pub(crate) session: Option<SessionTag>,
    /// Where its prints go, if the host captures them (set by its work).
    pub(crate) capture: Option<Rc<Capture>>,
}

impl Scope {
    /// Makes this scope current; returns the one current before.
    fn swap_in(self) -> Scope {
        Scope {
            session: SESSION.replace(self.session),
            capture: print::replace_current(self.capture),
        }
    }
}

thread_local! {
    /// The session of the running request's scope.
    static SESSION: RefCell<Option<SessionTag>> = const { RefCell::new(None) };
}

/// Makes `scope` current until the guard is left. Dropped instead (an
/// unwind), the guard restores the scope before and drops this one.
pub(crate) fn enter(scope: Scope) -> Entered {
    Entered(Some(scope.swap_in()))
}

/// A scope made current by [`enter`].
pub(crate) struct Entered(Option<Scope>);

impl Entered {
    /// Restores the scope current before [`enter`], and gives back the
    /// request's, as its run left it.
    pub(crate) fn leave(mut self) -> Scope {
        self.0.take().unwrap_or_default().swap_in()
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some(before) = self.0.take() {
            drop(before.swap_in());
        }
    }
}

/// The session of the running request, if it is a session's.
pub(crate) fn session() -> Option<SessionTag> {
    SESSION.with_borrow(Clone::clone)
}

/// True if the running request is a session's.
pub(crate) fn in_session() -> bool {
    SESSION.with_borrow(Option::is_some)
}
