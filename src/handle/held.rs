//! What a handle holds: the value's registry key on its VM, where that VM
//! is, and the checks that let a value out only to its own VM (and
//! session); with `FromLua` and `IntoLua`, how a request makes a handle
//! and passes one back into Lua.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use mlua::{FromLua, IntoLua, Lua, RegistryKey, Value};

use super::route::{Home, Place, VmTag};
use super::LuaHandle;
use crate::IsleError;

/// What the clones of one handle share.
pub(super) struct Held {
    /// Taken in `Drop`, before the VM is told (see `route::expire_released`).
    pub(super) key: Option<RegistryKey>,
    /// The Lua type of the value.
    pub(super) kind: &'static str,
    /// The VM incarnation holding it, and its owner.
    pub(super) vm: u64,
    pub(super) owner: u64,
    /// Raised on drop: the VM frees the value.
    pub(super) released: Arc<AtomicBool>,
    pub(super) home: Weak<dyn Home>,
    pub(super) place: Place,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.key.take());
        // ORDERING: Release: the key queued above is visible to the VM that
        // sees the flag (see `route::expire_released`).
        self.released.store(true, Ordering::Release);
    }
}

/// How a handle's value is asked for: by its own request, or as an
/// argument to any request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    Own,
    Argument,
}

impl Held {
    /// The value, on the VM thread running a request for it (or taking it
    /// as an argument).
    pub(super) fn value(&self, lua: &Lua, use_: Use) -> mlua::Result<Value> {
        let (id, owner, worker) = match lua.app_data_ref::<VmTag>() {
            Some(t) => (t.id, t.owner, t.home.as_ref().and_then(|h| h.1)),
            None => (0, 0, None),
        };
        if id != self.vm {
            let same_slot = owner == self.owner
                && match &self.place {
                    Place::Isle => true,
                    Place::Worker(w) => worker == Some(*w),
                    Place::Session(b) => worker == Some(b.worker),
                };
            if use_ == Use::Own || same_slot {
                return Err(lost(self.vm_gone()));
            }
            return Err(self.foreign(
                "it belongs to another Lua VM; pass it only to requests of the isle, \
                 pool worker or session that made it, or make the value again there",
            ));
        }
        // Unkeyed work's value (a closure over the VM's globals, the
        // globals themselves) would give a session's code what every
        // unkeyed request shares; and it could reach a session only when
        // that session happens to live on the same worker.
        if let (Place::Worker(_), Use::Argument) = (&self.place, use_) {
            if crate::handle::route::in_a_session() {
                return Err(self.foreign(
                    "it was made by unkeyed work; pass it only to unkeyed requests of the \
                     pool worker that made it, not to a session's",
                ));
            }
        }
        if let Place::Session(b) = &self.place {
            match super::route::current_session() {
                Some(s) if s.id == b.id => {}
                Some(s) if use_ == Use::Own || s.key == b.key => {
                    return Err(lost(self.session_gone()));
                }
                _ => {
                    return Err(self.foreign(&format!(
                        "it belongs to session `{}`; pass it only to that session's requests",
                        b.key
                    )))
                }
            }
        }
        let Some(key) = &self.key else {
            unreachable!("a live handle has its key")
        };
        lua.registry_value(key)
    }

    fn vm_gone(&self) -> String {
        let whose = match &self.place {
            Place::Session(b) => format!(" (session `{}`)", b.key),
            _ => String::new(),
        };
        format!(
            "the Lua VM holding this {}{whose} was recycled or replaced; its value is gone: \
             make the value again",
            self.kind
        )
    }

    fn session_gone(&self) -> String {
        let key = match &self.place {
            Place::Session(b) => b.key.to_string(),
            _ => String::new(),
        };
        format!(
            "the session `{key}` holding this {} was closed (or expired); its value is gone: \
             make the value again",
            self.kind
        )
    }

    fn foreign(&self, why: &str) -> mlua::Error {
        mlua::Error::FromLuaConversionError {
            from: self.kind,
            to: "an argument here (from a LuaHandle)".to_string(),
            message: Some(why.to_string()),
        }
    }
}

fn lost(message: String) -> mlua::Error {
    mlua::Error::external(IsleError::HandleLost(message))
}

/// A value a handle cannot hold, or a VM that cannot make one.
fn not_held(from: &'static str, message: String) -> mlua::Error {
    mlua::Error::FromLuaConversionError {
        from,
        to: "LuaHandle".to_string(),
        message: Some(message),
    }
}

impl FromLua for LuaHandle {
    /// Makes a handle to `value` (a function, table or userdata) on an
    /// isle's or pool's VM, inside a request: the handle remembers the VM,
    /// and the session if a session's request made it.
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<LuaHandle> {
        let kind = value.type_name();
        match &value {
            Value::Function(_) | Value::Table(_) | Value::UserData(_) => {}
            Value::Nil => {
                return Err(not_held(
                    kind,
                    "expected a function, table or userdata, got nil".to_string(),
                ))
            }
            Value::Thread(_) => {
                return Err(not_held(
                    kind,
                    "a coroutine belongs to the request that made it; return a function instead"
                        .to_string(),
                ))
            }
            _ => {
                return Err(not_held(
                    kind,
                    format!(
                        "a handle holds a function, table or userdata; take a {kind} as a plain \
                         Rust type"
                    ),
                ))
            }
        }
        let (vm, owner, released, home, worker) = {
            let tag = lua.app_data_ref::<VmTag>();
            let Some(tag) = tag else {
                return Err(not_held(
                    kind,
                    "this Lua state is not an isle's or pool's VM".to_string(),
                ));
            };
            let Some((home, worker)) = tag.home.as_ref().and_then(|(c, w)| Some((c.get()?, *w)))
            else {
                return Err(not_held(
                    kind,
                    "the VM is still starting (in `init`); make handles in requests".to_string(),
                ));
            };
            (
                tag.id,
                tag.owner,
                tag.released.clone(),
                home.clone(),
                worker,
            )
        };
        let place = match super::route::current_session() {
            Some(b) => Place::Session(b),
            None => worker.map_or(Place::Isle, Place::Worker),
        };
        let key = lua.create_registry_value(value)?;
        Ok(LuaHandle {
            held: Arc::new(Held {
                key: Some(key),
                kind,
                vm,
                owner,
                released,
                home,
                place,
            }),
        })
    }
}

impl IntoLua for LuaHandle {
    /// The value again, on its own VM (in its own session, for a session's
    /// handle); elsewhere a conversion error saying where it belongs, or
    /// [`IsleError::HandleLost`] if its VM or session is gone.
    fn into_lua(self, lua: &Lua) -> mlua::Result<Value> {
        self.held.value(lua, Use::Argument)
    }
}
