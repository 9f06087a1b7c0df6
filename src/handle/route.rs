//! Where a handle's value lives, and how its requests get back there.
//!
//! - Every VM incarnation gets a unique id when it is built, kept in its
//!   app data ([`VmTag`]) with its owner's id, the owner itself (weakly, as
//!   a [`Home`] that can queue a job at a [`Place`]) and the pool worker it
//!   serves, if any. Set once per VM: a request pays nothing for it.
//! - A pool worker running a session's request hands the session to the
//!   VM with it, which keeps it current in the request's scope
//!   (`vm/scope.rs`) for the time of the run and of each later poll of
//!   the request, if it suspends.
//! - A handle's `Drop` raises its VM's `released` flag; the VM frees the
//!   values of dropped handles before its next request (`Vm::run`), and
//!   reads nothing else while none were dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use mlua::Lua;

use crate::host::submit::Owner;
use crate::pool::session::Binding;
use crate::vm::Job;

/// An isle or pool, as a handle's requests see it: it can queue a job at
/// a place.
pub(crate) trait Home: Send + Sync {
    fn owner(&self) -> &Owner;

    /// Queues `job` to run at `place` (or resolves it with why it cannot).
    fn send(self: Arc<Self>, job: Job, place: &Place);
}

/// Where in its owner a value lives.
#[derive(Clone)]
pub(crate) enum Place {
    /// An isle's VM.
    Isle,
    /// A pool worker's VM (unkeyed work made it).
    Worker(usize),
    /// A pool session (its binding: a key closed and opened again is
    /// another binding).
    Session(Arc<Binding>),
}

/// An owner's [`Home`], set once the owner exists (its VMs start before).
pub(crate) type HomeCell = Arc<OnceLock<Weak<dyn Home>>>;

/// A new, unset [`HomeCell`].
pub(crate) fn home_cell() -> HomeCell {
    Arc::new(OnceLock::new())
}

/// What a VM incarnation knows of itself (in its app data).
pub(crate) struct VmTag {
    pub(crate) id: u64,
    /// The isle's or pool's id.
    pub(crate) owner: u64,
    /// Raised when a handle to one of this VM's values is dropped.
    pub(crate) released: Arc<AtomicBool>,
    /// Set by the front-end once the VM serves it.
    pub(crate) home: Option<(HomeCell, Option<usize>)>,
}

/// Gives the VM `lua` (of `owner`) its unique id; returns its `released`
/// flag.
pub(crate) fn tag(lua: &Lua, owner: u64) -> Arc<AtomicBool> {
    static NEXT_VM: AtomicU64 = AtomicU64::new(1);
    // ORDERING: Relaxed: a unique number; nothing is published by it.
    let id = NEXT_VM.fetch_add(1, Ordering::Relaxed);
    let released = Arc::new(AtomicBool::new(false));
    lua.set_app_data(VmTag {
        id,
        owner,
        released: released.clone(),
        home: None,
    });
    released
}

/// The VM `lua` serves `home` (as pool worker `worker`, if given).
pub(crate) fn set_home(lua: &Lua, home: &HomeCell, worker: Option<usize>) {
    if let Some(mut tag) = lua.app_data_mut::<VmTag>() {
        tag.home = Some((home.clone(), worker));
    }
}

/// Frees the values of dropped handles if any were dropped since the last
/// call: between requests, on the VM thread.
pub(crate) fn expire_released(lua: &Lua, released: &AtomicBool) {
    // ORDERING: a Relaxed look first (the common case: nothing dropped);
    // Acquire on the swap pairs with the handle's Release store, so the
    // registry key its drop queued is on mlua's list (under mlua's own
    // lock, too).
    if released.load(Ordering::Relaxed) && released.swap(false, Ordering::Acquire) {
        lua.expire_registry_values();
    }
}

/// The session whose request runs on this thread now (`vm/scope.rs`).
pub(crate) fn current_session() -> Option<Arc<Binding>> {
    crate::vm::scope::session().and_then(|s| s.downcast::<Binding>().ok())
}

/// True if a session's request runs on this thread now.
pub(crate) fn in_a_session() -> bool {
    crate::vm::scope::in_session()
}
