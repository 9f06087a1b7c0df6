//! A request's Lua results, converted to Rust within the VM's memory limit.
//!
//! Converting copies: a `String` per string, a `Vec` per table, and per
//! *reference*, so a value held many times is copied many times. A script
//! under a 32 MiB `memory_limit` can return one 1 MiB string 200 times
//! (`eval::<Vec<String>>`) and make the host allocate 200 MiB, or nest shared
//! tables so the copy grows exponentially with what Lua holds. Lua's limit
//! counts none of it: it is the host's memory.
//!
//! So with a memory limit, a request's results are first measured as the
//! conversion would copy them, each reference counted again, and refused
//! (`MemoryLimit`) past the limit, before anything is copied. The measure
//! never costs more than Lua itself paid for a value held once (a string
//! 24 bytes plus its length, any other value 16 bytes, a table the sum of
//! its keys and values): results that Lua held without sharing always fit;
//! only sharing can exceed it. It reads tables raw (no `__index`, `__pairs`
//! or any other Lua code runs), stops at the limit, and follows tables 64
//! deep, a table inside itself not at all (no conversion copies a cycle).
//! It measures every value a request returns, also one the Rust type then
//! ignores (a second value where one is asked for): the type is not known
//! here, only whether it is a handle.
//! A request without a memory limit converts as mlua does, and so does a
//! result converted to handles (`LuaHandle`, `Option<LuaHandle>`,
//! `Vec<LuaHandle>`), which copy nothing, whatever the value holds.

use mlua::{FromLua, FromLuaMulti, Lua, MultiValue, Table, Value};

use crate::IsleError;

/// Tables deeper than this are not followed (counted as one value).
const DEEPEST: usize = 64;

/// What a string costs beyond its bytes, and any other value.
const STRING: usize = 24;
const VALUE: usize = 16;

/// The memory limit a result converted to `T` is measured against: none
/// for handles, which keep the value in Lua. (The one place this layer
/// names a type of `handle/`: by `TypeId` only.)
pub(crate) fn limit_for<T: 'static>(limit: Option<usize>) -> Option<usize> {
    use crate::LuaHandle;
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    let handles = [
        TypeId::of::<LuaHandle>(),
        TypeId::of::<Option<LuaHandle>>(),
        TypeId::of::<Vec<LuaHandle>>(),
    ];
    limit.filter(|_| !handles.contains(&t))
}

/// Converts `values` to `T`, refusing results that would take more than
/// `limit` bytes to copy.
pub(crate) fn convert<T: FromLuaMulti>(
    lua: &Lua,
    values: MultiValue,
    limit: usize,
) -> Result<T, IsleError> {
    let mut left = limit;
    let mut path = Vec::new();
    if !values.iter().all(|v| measure(v, &mut left, &mut path)) {
        return Err(too_big(limit));
    }
    T::from_lua_multi(values, lua).map_err(|e| crate::interrupt::request_error(lua, &e))
}

/// [`convert`] for one value.
pub(crate) fn convert_one<T: FromLua>(
    lua: &Lua,
    value: Value,
    limit: usize,
) -> Result<T, IsleError> {
    let mut left = limit;
    if !measure(&value, &mut left, &mut Vec::new()) {
        return Err(too_big(limit));
    }
    T::from_lua(value, lua).map_err(|e| crate::interrupt::request_error(lua, &e))
}

/// Takes what converting `value` copies from `left`; false once that is
/// more than was left. `path`: the tables being measured, outermost first.
fn measure(value: &Value, left: &mut usize, path: &mut Vec<*const std::ffi::c_void>) -> bool {
    let cost = match value {
        Value::String(s) => STRING.saturating_add(s.as_bytes().len()),
        _ => VALUE,
    };
    let Some(rest) = left.checked_sub(cost) else {
        return false;
    };
    *left = rest;
    match value {
        Value::Table(t) => measure_table(t, left, path),
        _ => true,
    }
}

fn measure_table(table: &Table, left: &mut usize, path: &mut Vec<*const std::ffi::c_void>) -> bool {
    let me = table.to_pointer();
    if path.len() >= DEEPEST || path.contains(&me) {
        return true;
    }
    path.push(me);
    let mut fits = true;
    // Raw (`for_each` runs no metamethod); an error ends the walk early.
    let _ = table.for_each::<Value, Value>(|key, value| {
        if measure(&key, left, path) && measure(&value, left, path) {
            Ok(())
        } else {
            fits = false;
            Err(mlua::Error::runtime("past the limit"))
        }
    });
    path.pop();
    fits
}

fn too_big(limit: usize) -> IsleError {
    IsleError::MemoryLimit(format!(
        "the request's results would take more than the VM's memory limit ({limit} bytes) \
         to convert to Rust (each reference to a string or table is copied again); \
         return fewer copies, or keep the value in Lua and return a LuaHandle to it"
    ))
}
