//! Memory our own Rust functions take on a VM's behalf.
//!
//! Lua's library functions build their results in buffers allocated by the
//! VM's allocator, so a VM's `memory_limit` bounds them: past it, the
//! allocation fails and Lua raises its memory error. Rust functions of ours
//! that build something from Lua input (the sandbox's `gsub` result, in
//! `sandbox/pattern`) hold it in Rust memory the allocator never sees; they ask
//! [`fits`] before growing it, and raise the memory error ([`MEMORY_ERROR`])
//! when it does not fit, as Lua's `luaL_Buffer` does.

use mlua::Lua;

/// Lua's memory error message (`MEMERRMSG`). From Lua 5.4 on, `lua_error`
/// with exactly this string raises a memory error (`LUA_ERRMEM`), which is
/// what `error(MEMORY_ERROR, 0)` does from Lua code.
pub(crate) const MEMORY_ERROR: &str = "not enough memory";

/// The VM's memory limit, if it has one. (mlua 0.12 has no getter: the
/// limit is read by setting it and putting it back, two stores.)
pub(super) fn limit(lua: &Lua) -> Option<usize> {
    // Where an instruction budget counts the limit's refusals, mlua cannot
    // tell the limit (`interrupt/alarm/refusals.rs`): it is kept there.
    #[cfg(any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    ))]
    if let Some(limit) = crate::interrupt::alarm::refusals::limit(lua) {
        return (limit != 0).then_some(limit);
    }
    let limit = lua.set_memory_limit(0).ok()?;
    let _ = lua.set_memory_limit(limit);
    (limit != 0).then_some(limit)
}

/// Whether `bytes` more, held outside the VM's allocator, fit under its
/// memory limit beside what the VM uses now.
pub(super) fn fits(lua: &Lua, bytes: usize) -> bool {
    match limit(lua) {
        Some(limit) => lua
            .used_memory()
            .checked_add(bytes)
            .is_some_and(|total| total <= limit),
        None => true,
    }
}
