//! Keeping the value a request raised, when it is not a string, so its
//! error can carry it ([`LuaError::value`](crate::LuaError::value)).
//!
//! mlua turns a raised value into its `tostring` text on its way out of a
//! call (its message handler, `pop_error`), and the value is gone. Our
//! `error` and `assert` (`alarm/raising.rs`) hand a raised non-string to
//! [`install`]'s `record` first, which keeps the last one per VM, with the
//! request that raised it. When a request's error reaches
//! [`request_error`](super::request_error), [`attach`] takes the kept
//! value and keeps it with the error if it is this request's and mlua's
//! message is its text: a value raised then swallowed by a `pcall` is not
//! mistaken for the cause of a later, different error (unless the script
//! made its `__tostring` say that error's message: then the script's own
//! value is blamed, in its own request). Errors pass
//! through `request_error` whatever path they took (a plain call, a
//! request's coroutine, a Rust callback, `coroutine.wrap`, a `pcall`
//! followed by `error(e)`), and the value is the same object however often
//! it was raised again.
//!
//! Nothing runs when nothing is raised: the cost is on the error path.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use mlua::{Lua, Value};

use super::hook::Interrupt;
use crate::request::Cancel;
use crate::LuaError;

/// The last non-string value raised on this VM (app data), and the request
/// that raised it (`None`: outside a request). Weak: it compares the
/// request, and keeps none of it alive.
#[derive(Default)]
struct Raised(RefCell<Option<Kept>>);

/// A raised value, and the request that raised it.
type Kept = (Value, Option<Weak<dyn Cancel>>);

/// Installs our `error` and `assert`, and the slot they record in.
pub(super) fn install(lua: &Lua, interrupt: &Arc<Interrupt>) -> mlua::Result<()> {
    lua.set_app_data(Raised::default());
    let state = interrupt.clone();
    // Not called from a finalizer (see `alarm/raising.rs`).
    let record = lua.create_function(move |lua, value: Value| {
        let by = state.current.lock().as_ref().map(|t| t.downgrade());
        if let Some(raised) = lua.app_data_ref::<Raised>() {
            // mlua's own error objects (a Rust error raised again) are
            // not a script's value.
            *raised.0.borrow_mut() = match value {
                Value::Error(_) => None,
                value => Some((value, by)),
            };
        }
        Ok(())
    })?;
    super::alarm::install_raising(lua, &record)
}

/// Keeps the value the running request raised with `err`, if it did (see
/// the module docs). Runs the value's `__tostring`: called inside the
/// request, under its stop machinery.
pub(super) fn attach(lua: &Lua, err: &mut LuaError) {
    let kept = match lua.app_data_ref::<Raised>() {
        Some(raised) => raised.0.borrow_mut().take(),
        None => None,
    };
    let Some((value, Some(by))) = kept else {
        return;
    };
    let ours = lua
        .app_data_ref::<Arc<Interrupt>>()
        .and_then(|state| state.current.lock().clone())
        .is_some_and(|token| token.is(&by));
    if !ours {
        return;
    }
    let (read, text) = crate::error_value::read(lua, &value);
    drop(value);
    let Some(text) = text else {
        return;
    };
    // mlua's message is the text, perhaps behind a context (`what: `).
    let message = err.message();
    let prefix = match message.strip_suffix(text.as_str()) {
        Some(prefix) if prefix.is_empty() || prefix.ends_with(": ") => prefix.to_string(),
        _ => return,
    };
    err.set_value(&prefix, read);
}

/// Forgets the kept value (an error that is not a script's).
pub(super) fn forget(lua: &Lua) {
    if let Some(raised) = lua.app_data_ref::<Raised>() {
        let kept = raised.0.borrow_mut().take();
        drop(raised);
        drop(kept);
    }
}
