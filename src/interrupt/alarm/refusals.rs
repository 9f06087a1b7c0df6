//! Counting the allocations a VM's memory limit refuses, for the
//! instruction budget (Lua 5.2–5.5).
//!
//! When an allocation fails, these Lua versions run a full collection and
//! try once more (the emergency collection) before they raise the memory
//! error. A heap held at its limit therefore costs a collection of the
//! whole heap at every allocation, whether the allocation then fits (the
//! collection freed the last one's garbage) or fails (and Lua code catches
//! the error and goes on): milliseconds for one instruction, which no
//! instruction count sees. So where a VM has a budget, its allocator is
//! wrapped: each allocation the limit refuses is counted on the VM's
//! thread, and the hook's tick charges the count to the running request
//! (`interrupt/hook.rs`).
//!
//! mlua's allocator stays the one that allocates (the wrapper passes every
//! call on with mlua's own user data, so blocks allocated before and after
//! are the same allocator's), but mlua recognises its memory state by its
//! allocator function: while ours is in place, `Lua::set_memory_limit`
//! fails (`MemoryControlNotAvailable`) and `Lua::used_memory` asks Lua's
//! collector instead (the same count). So the wrapper goes in once the VM
//! has started (its limit set, `init` run), the limit it was started with
//! is kept in the VM's app data for the crate's own reads ([`limit`]), and the
//! wrapper comes out before the VM is dropped ([`Counting`]'s `Drop`),
//! when mlua frees its memory state only if it still finds it.

use std::cell::Cell;
use std::os::raw::c_void;
use std::sync::OnceLock;

use mlua::ffi;

/// mlua's allocator, which ours passes every call on to (every VM mlua
/// makes has the same one).
static MLUA_ALLOC: OnceLock<ffi::lua_Alloc> = OnceLock::new();

thread_local! {
    /// Allocations refused on this thread since [`take_refused`] last
    /// looked: a VM's, since a VM lives on one thread.
    static REFUSED: Cell<u64> = const { Cell::new(0) };
}

/// The memory limit a VM whose allocator is wrapped was started with
/// (0: none), which mlua cannot tell while it is (app data).
struct Limit(usize);

/// Passes the call on to mlua's allocator, and counts a refused
/// allocation (a null answer to a request for memory).
unsafe extern "C" fn counting(
    ud: *mut c_void,
    ptr: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    let Some(alloc) = MLUA_ALLOC.get() else {
        // Never: set before this function is installed anywhere.
        return std::ptr::null_mut();
    };
    // SAFETY: the arguments are Lua's, for the allocator it was given with
    // `ud` (mlua's, installed with its own user data, `ud`): the call is
    // the one Lua would have made without the wrapper.
    let block = unsafe { alloc(ud, ptr, osize, nsize) };
    if block.is_null() && nsize > 0 {
        // `try_with`: never panics (this function must not unwind), even
        // on a thread whose locals are being destroyed.
        let _ = REFUSED.try_with(|n| n.set(n.get().saturating_add(1)));
    }
    block
}

/// The allocations refused on this thread since the last call.
pub(crate) fn take_refused() -> u64 {
    REFUSED.try_with(|n| n.replace(0)).unwrap_or(0)
}

/// `lua`'s memory limit while its refusals are counted: `Some(0)` for
/// none; `None` if they are not (mlua answers then).
pub(crate) fn limit(lua: &mlua::Lua) -> Option<usize> {
    lua.app_data_ref::<Limit>().map(|l| l.0)
}

/// Refusals counted for one VM; the wrapper comes out when this is
/// dropped, which must happen before the VM is.
pub(crate) struct Counting {
    /// The VM's main state (whose global state holds the allocator).
    state: *mut ffi::lua_State,
    ud: *mut c_void,
}

/// Wraps `lua`'s allocator. Call on the VM's thread, outside any request,
/// once its limit is set; `None` if the allocator is not mlua's (nothing
/// is wrapped then).
pub(crate) fn count(lua: &mlua::Lua) -> Option<Counting> {
    // mlua has no getter: set it and put it back (0: none).
    let limit = lua.set_memory_limit(0).ok()?;
    let _ = lua.set_memory_limit(limit);
    let state = super::running_state(lua);
    let mut ud = std::ptr::null_mut();
    // SAFETY: `state` is a live thread of `lua`, on its own OS thread;
    // `lua_getallocf` only reads the global state's allocator fields.
    let alloc = unsafe { ffi::lua_getallocf(state, &mut ud) };
    let mlua = *MLUA_ALLOC.get_or_init(|| alloc);
    if !std::ptr::fn_addr_eq(alloc, mlua) {
        return None;
    }
    // SAFETY: as above; no allocation is under way (we run between Lua
    // calls), and the new allocator hands every call to the old one with
    // the same user data, so every block stays valid under it.
    unsafe { ffi::lua_setallocf(state, counting, ud) };
    lua.set_app_data(Limit(limit));
    take_refused();
    Some(Counting { state, ud })
}

impl Drop for Counting {
    fn drop(&mut self) {
        if let Some(&mlua) = MLUA_ALLOC.get() {
            // SAFETY: the VM (hence `state`) is alive until after this
            // (`Vm`'s `Drop`), on this thread, between Lua calls; mlua's
            // allocator takes over every block, as it allocated them all.
            unsafe { ffi::lua_setallocf(self.state, mlua, self.ud) };
        }
    }
}
