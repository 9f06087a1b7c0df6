//! [`Serde<T>`]: Rust values in and out of requests through serde (the
//! `serde` feature).

use std::any::type_name;
use std::ops::{Deref, DerefMut};

use mlua::serde::{DeserializeOptions, LuaSerdeExt, SerializeOptions};
use mlua::{FromLua, IntoLua, Lua, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A Rust value that crosses into or out of Lua through serde (the `serde`
/// feature).
///
/// As a result type, `Serde<T>` (`T: DeserializeOwned`) reads the Lua value
/// into `T`; as an argument, `Serde(value)` (`T: Serialize`) builds it as a
/// Lua value. It works wherever a request takes or returns values (`eval`,
/// `call`, their `spawn_*` forms, tuples of them), on an
/// [`Isle`](crate::Isle), an [`IslePool`](crate::IslePool) and a
/// [`Session`](crate::Session) alike, without an `exec` closure:
///
/// ```
/// use mlua_isle::{Isle, IsleError, Serde};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Deserialize)]
/// struct Config { port: u16, hosts: Vec<String>, debug: Option<bool> }
///
/// #[derive(Serialize)]
/// struct Request { path: String, retries: u32 }
///
/// #[derive(Debug, PartialEq, Deserialize)]
/// struct Reply { status: u16, body: String }
///
/// let isle = Isle::spawn(|lua| {
///     lua.load(r#"
///         function handle(req)
///             return { status = 200, body = req.path .. " x" .. req.retries }
///         end
///     "#).exec()
/// })?;
///
/// let cfg: Serde<Config> = isle.eval("return { port = 8080, hosts = { 'a', 'b' } }")?;
/// assert_eq!(cfg.port, 8080); // `Deref`s to the value
/// assert_eq!(cfg.into_inner().hosts, ["a", "b"]);
///
/// let reply = isle.call::<Serde<Reply>>("handle", Serde(Request { path: "/".into(), retries: 3 }))?;
/// assert_eq!(reply.0, Reply { status: 200, body: "/ x3".into() });
///
/// // A value that does not fit is a `Conversion` error naming the type.
/// let err = isle.eval::<Serde<Config>>("return { port = 'http' }").unwrap_err();
/// assert!(err.to_string().contains("Config"), "{err}");
/// # Ok::<(), IsleError>(())
/// ```
///
/// # How values map
///
/// mlua's serde support does the work, with these options:
///
/// - Rust to Lua: structs and maps become tables keyed by name, sequences
///   tables indexed from 1, `None` and `()` become `nil` (not mlua's `null`
///   sentinel, so Lua code tests them as usual: `if req.field then`), and
///   sequences get no metatable (mlua's default, `array_metatable`, is one
///   table shared by every such array in the VM: in a pool or a sandbox it
///   would be a table tenants share; so an empty `Vec` reaches Lua as `{}`).
///   Every table is new, owned by the request.
/// - Lua to Rust: `nil` reads as `None` or `()`, a table as a struct, map,
///   sequence or enum (a string names a unit variant; `{ Variant = value }`
///   a variant with data). Functions, threads and userdata inside are
///   refused, and so are tables that contain themselves. Tables are read
///   as they are (`pairs` and `__index` are not consulted).
///
/// A value that does not fit fails the request with
/// [`IsleError::Lua`](crate::IsleError::Lua) of kind
/// [`Conversion`](crate::LuaErrorKind::Conversion), whose message names
/// the Rust type and what did not fit (serde's words, e.g. ``missing field
/// `port` `` or `invalid type: string "http", expected u16`). An argument
/// too big for the VM's [`memory_limit`](crate::IsleBuilder::memory_limit)
/// fails with [`IsleError::MemoryLimit`](crate::IsleError::MemoryLimit),
/// as any value would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serde<T>(pub T);

impl<T> Serde<T> {
    /// The wrapped value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Serde<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Serde<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T> From<T> for Serde<T> {
    fn from(value: T) -> Serde<T> {
        Serde(value)
    }
}

/// What mlua's serializer is told (see [`Serde`], "How values map").
fn to_lua_options() -> SerializeOptions {
    SerializeOptions::new()
        .set_array_metatable(false)
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
}

/// What mlua's deserializer is told (see [`Serde`], "How values map").
fn from_lua_options() -> DeserializeOptions {
    DeserializeOptions::new()
        .deny_unsupported_types(true)
        .deny_recursive_tables(true)
        // No deeper than a result is measured against the memory limit.
        .recursion_limit(crate::vm::result::DEEPEST)
}

impl<T: DeserializeOwned> FromLua for Serde<T> {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let from = crate::vm::lua_type(&value);
        lua.from_value_with::<T>(value, from_lua_options())
            .map(Serde)
            .map_err(|e| match e {
                // The VM's memory limit, not a value that did not fit.
                e @ mlua::Error::MemoryError(_) => e,
                e => mlua::Error::FromLuaConversionError {
                    from,
                    to: type_name::<T>().to_string(),
                    message: Some(cause(&e)),
                },
            })
    }
}

impl<T: Serialize> IntoLua for Serde<T> {
    fn into_lua(self, lua: &Lua) -> mlua::Result<Value> {
        lua.to_value_with(&self.0, to_lua_options())
            .map_err(|e| match e {
                // The VM's memory limit (`MemoryLimit`), not a value that
                // did not fit.
                e @ mlua::Error::MemoryError(_) => e,
                e => mlua::Error::SerializeError(format!(
                    "error converting {} to a Lua value ({})",
                    type_name::<T>(),
                    cause(&e)
                )),
            })
    }
}

/// serde's words for what did not fit, without mlua's prefix, cut to
/// [`CAUSE`] bytes: serde quotes the value it refused (`invalid type:
/// string "..."`), which may be a string of megabytes.
fn cause(e: &mlua::Error) -> String {
    let m = match e {
        mlua::Error::SerializeError(m) | mlua::Error::DeserializeError(m) => m.clone(),
        other => other.to_string(),
    };
    crate::error_value::cap(&m, CAUSE, &mut false)
}

/// The longest cause a conversion error quotes, in bytes.
const CAUSE: usize = 1024;
