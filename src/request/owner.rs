//! Which owner (isle or pool) a thread serves, and blocking waits between
//! owners: waiting on your own VM, or on a ring of isles waiting on one
//! another, can never end and is refused (`IsleError::Reentrant`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::IsleError;

thread_local! {
    /// The owner id (isle or pool) whose VM runs on this thread; 0 elsewhere.
    static OWNER: Cell<u64> = const { Cell::new(0) };
    /// True on an isle's VM thread: its owner has no other VM, so while it
    /// blocks, nothing else serves that owner.
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Which isle's VM thread blocks, without a time limit, on which owner's
/// request: `(waiting isle, awaited owner)`. Short, and touched only by
/// blocking waits made from VM threads.
static WAITS: parking_lot::Mutex<Vec<(u64, u64)>> = parking_lot::Mutex::new(Vec::new());

/// Marks this VM thread as its owner's only one (an isle's).
pub(crate) fn serves_alone() {
    ALONE.with(|a| a.set(true));
}

/// An isle's VM thread blocking on another owner; removed when dropped.
pub(crate) struct Waiting(u64);

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waits = WAITS.lock();
        if let Some(i) = waits.iter().position(|&(isle, _)| isle == self.0) {
            waits.swap_remove(i);
        }
    }
}

/// Called before this thread blocks, with no time limit, on a request of
/// `owner`. On an isle's VM thread: fails `Reentrant` if `owner` is, through
/// the isles blocked on one another, waiting for this isle (none of them
/// could ever go on); else records the wait until the guard is dropped.
/// Elsewhere (a plain thread, a pool's VM thread, whose pool has other VMs)
/// nothing can deadlock on this thread: no check.
pub(crate) fn blocking_on(owner: u64) -> Result<Option<Waiting>, IsleError> {
    if !ALONE.with(Cell::get) {
        return Ok(None);
    }
    let me = OWNER.with(Cell::get);
    let mut waits = WAITS.lock();
    let mut next = Some(owner);
    for _ in 0..=waits.len() {
        match next {
            Some(o) if o == me => return Err(IsleError::Reentrant),
            Some(o) => next = waits.iter().find(|w| w.0 == o).map(|w| w.1),
            None => break,
        }
    }
    waits.push((me, owner));
    Ok(Some(Waiting(me)))
}

/// A fresh owner id; never 0.
pub(crate) fn next_owner_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// True on a VM thread of `owner`: blocking on that owner here would
/// deadlock.
pub(crate) fn on_owner_thread(owner: u64) -> bool {
    OWNER.with(|o| o.get() == owner)
}

/// Marks this thread as a VM thread of `owner`.
pub(crate) fn enter(owner: u64) {
    OWNER.with(|o| o.set(owner));
}
