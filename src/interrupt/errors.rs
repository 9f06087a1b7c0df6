//! What a request's error becomes (`request_error`), and the token of the
//! running request for Rust callbacks (`current_token`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlua::Lua;

use crate::request::CancelToken;
use crate::sandbox::room::MEMORY_ERROR;
use crate::{IsleError, LuaErrorKind};

use super::hook::Interrupt;

/// Whether `v` is Lua's memory error as a catcher sees it: Lua's message
/// (Lua 5.3's buffers: their own), or an mlua error (a Rust callback's)
/// that is one.
pub(super) fn is_memory_error(v: &mlua::Value) -> bool {
    match v {
        mlua::Value::String(s) => is_memory_message(&s.as_bytes()),
        mlua::Value::Error(e) => matches!(IsleError::from_lua(e), IsleError::MemoryLimit(_)),
        _ => false,
    }
}

/// Whether a string error value is Lua's memory error message.
pub(crate) fn is_memory_message(s: &[u8]) -> bool {
    *s == *MEMORY_ERROR.as_bytes()
        || (cfg!(feature = "lua53") && *s == *b"not enough memory for buffer allocation")
}

/// Converts the error a request's work ended with. A request that ran out
/// of memory fails with [`IsleError::MemoryLimit`] however the memory error
/// travelled: raised straight out (mlua's memory error), re-raised by Lua
/// code or by a library function with a position in front (`error(e)`
/// after a `pcall`, `coroutine.wrap` on older Lua versions; see
/// `IsleError::from_lua`), or caught by one of our wrapped catchers
/// (`pcall`, `xpcall`, `coroutine.resume`/`wrap`/`close`, `load`'s reader)
/// before the request failed with another error.
///
/// A runtime error keeps the value the script raised, when it was not a
/// string (`interrupt/raised.rs`).
pub(crate) fn request_error(lua: &Lua, err: &mlua::Error) -> IsleError {
    match IsleError::from_lua(err) {
        IsleError::Lua(e) if ran_out_of_memory(lua) => {
            super::raised::forget(lua);
            IsleError::MemoryLimit(e.message().into())
        }
        IsleError::Lua(mut e) if e.kind() == LuaErrorKind::Runtime => {
            super::raised::attach(lua, &mut e);
            IsleError::Lua(e)
        }
        other => {
            super::raised::forget(lua);
            other
        }
    }
}

/// True if a wrapper caught Lua's memory error during the running request.
fn ran_out_of_memory(lua: &Lua) -> bool {
    lua.app_data_ref::<Arc<Interrupt>>()
        .is_some_and(|state| state.out_of_memory.load(Ordering::Relaxed))
}

/// The token of the request running on this VM, for Rust functions called
/// from Lua.
///
/// The hook cannot interrupt Rust code. A callback that blocks or loops
/// should check the token and return early, typically with an error:
///
/// ```
/// use mlua_isle::{current_token, Isle, IsleError};
/// use std::time::Duration;
///
/// let isle = Isle::spawn(|lua| {
///     let wait = lua.create_function(|lua, ()| {
///         let token = current_token(lua).expect("called from a request");
///         while !token.is_cancelled() {
///             std::thread::sleep(Duration::from_millis(1)); // e.g. polling I/O
///         }
///         Err::<(), _>(mlua::Error::runtime("gave up: request cancelled"))
///     })?;
///     lua.globals().set("wait_for_cancel", wait)
/// })?;
///
/// let task = isle.spawn_call::<()>("wait_for_cancel", ());
/// task.cancel_token().cancel();
/// assert_eq!(task.wait(), Err(IsleError::Cancelled));
/// # Ok::<(), IsleError>(())
/// ```
///
/// Returns `None` outside a request (during `init`, or for a `Lua` that is
/// not an isle's).
pub fn current_token(lua: &Lua) -> Option<CancelToken> {
    let state = lua.app_data_ref::<Arc<Interrupt>>()?;
    let token = state.current.lock().clone();
    token
}
