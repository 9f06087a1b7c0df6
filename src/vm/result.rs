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
//! its values and of its keys that are strings or tables): results that
//! Lua held without sharing always fit; only sharing can exceed it, and
//! a border far past a table's entries (`serde` reads a table with a length
//! as that many values, nils included: each hole below the border is
//! charged as a value). It reads tables raw (no `__index`, `__pairs`
//! or any other Lua code runs), stops at the limit, and follows tables 64
//! deep, a table inside itself 8 deep (a conversion to a type of fixed
//! depth copies it at every level; `Serde` refuses it).
//! No hook reaches it, so it looks every few thousand values whether its
//! request was stopped, and ends: under a large limit, a result shared
//! deeply enough could take seconds to walk.
//! It measures every value a request returns, also one the Rust type then
//! ignores (a second value where one is asked for): the type is not known
//! here, only whether it is a handle.
//! A `map` batch's results are measured input by input: each within the
//! limit (how many inputs there are is the host's choice).
//!
//! A request without a memory limit converts as mlua does, and so does a
//! result converted to handles (`LuaHandle`, `Option<LuaHandle>`,
//! `Vec<LuaHandle>`), which copy nothing, whatever the value holds.

use mlua::{FromLua, FromLuaMulti, Lua, MultiValue, Table, Value};

use crate::IsleError;

/// Tables deeper than this are not followed (counted as one value); no
/// conversion follows them either (`Serde`'s recursion limit is this).
pub(crate) const DEEPEST: usize = 64;

/// How deep a table inside itself is walked again (see `Walk::table`).
const AROUND: usize = 8;

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
    let mut walk = Walk::new(lua, limit);
    for value in values.iter() {
        walk.value(value)?;
    }
    T::from_lua_multi(values, lua).map_err(|e| crate::interrupt::request_error(lua, &e))
}

/// [`convert`] for one value.
pub(crate) fn convert_one<T: FromLua>(
    lua: &Lua,
    value: Value,
    limit: usize,
) -> Result<T, IsleError> {
    Walk::new(lua, limit).value(&value)?;
    T::from_lua(value, lua).map_err(|e| crate::interrupt::request_error(lua, &e))
}

/// How often the walk looks whether its request was stopped: a result
/// shared enough to take a large limit's worth of visits takes seconds to
/// walk, and a stop must end it.
const CHECK_EVERY: usize = 4096;

/// A walk over results, taking what converting each value copies from
/// what is left of the limit.
struct Walk<'a> {
    lua: &'a Lua,
    limit: usize,
    left: usize,
    /// The tables being walked, outermost first.
    path: Vec<*const std::ffi::c_void>,
    visits: usize,
}

impl<'a> Walk<'a> {
    fn new(lua: &'a Lua, limit: usize) -> Self {
        Walk {
            lua,
            limit,
            left: limit,
            path: Vec::new(),
            visits: 0,
        }
    }

    fn value(&mut self, value: &Value) -> Result<(), IsleError> {
        let cost = match value {
            Value::String(s) => STRING.saturating_add(s.as_bytes().len()),
            // Copied to bytes as a string is.
            #[cfg(feature = "luau")]
            Value::Buffer(b) => STRING.saturating_add(b.len()),
            _ => VALUE,
        };
        self.left = self
            .left
            .checked_sub(cost)
            .ok_or_else(|| too_big(self.limit))?;
        self.visits += 1;
        if self.visits.is_multiple_of(CHECK_EVERY) {
            self.check_stop()?;
        }
        match value {
            Value::Table(t) => self.table(t),
            _ => Ok(()),
        }
    }

    /// A key: a number or a boolean costs nothing beyond its entry's value
    /// (an array's indices are not stored at all, and a `Vec` copies none);
    /// a string or table key is measured as a value.
    fn key(&mut self, key: &Value) -> Result<(), IsleError> {
        match key {
            Value::Integer(_) | Value::Number(_) | Value::Boolean(_) => Ok(()),
            _ => self.value(key),
        }
    }

    fn table(&mut self, table: &Table) -> Result<(), IsleError> {
        // A table inside itself is walked again, as a shared one is, while
        // the walk is less than `AROUND` deep: a conversion to a type of
        // fixed depth (`Vec<Vec<Vec<bool>>>`: any value reads as a `bool`)
        // copies it at every level, n references n^depth times. Types are
        // not nested deeper than that; a cycle walked further would charge
        // an object that points back at itself (a linked list's `prev`)
        // for copies no conversion makes.
        let me = table.to_pointer();
        if self.path.len() >= DEEPEST || (self.path.len() >= AROUND && self.path.contains(&me)) {
            return Ok(());
        }
        self.path.push(me);
        let mut ended = Ok(());
        let mut entries = 0usize;
        // Raw (`for_each` runs no metamethod); an error ends it early.
        let _ = table.for_each::<Value, Value>(|key, value| {
            entries += 1;
            ended = self.key(&key).and_then(|()| self.value(&value));
            match ended {
                Ok(()) => Ok(()),
                Err(_) => Err(mlua::Error::runtime("the walk ended")),
            }
        });
        self.path.pop();
        ended?;
        self.holes(table, entries)
    }

    /// What reading `table` as an array of its length adds: one value per
    /// hole below its border. (`serde` reads a table with a length as a
    /// sequence of that many values, nils included. A table with a few
    /// entries at 1, 2, 4, ... 2^62 has a border near 2^62.)
    fn holes(&mut self, table: &Table, entries: usize) -> Result<(), IsleError> {
        let holes = table.raw_len().saturating_sub(entries);
        self.left = self
            .left
            .checked_sub(holes.saturating_mul(VALUE))
            .ok_or_else(|| too_big(self.limit))?;
        Ok(())
    }

    /// The request's stop, if it was stopped (its caller has the answer).
    fn check_stop(&self) -> Result<(), IsleError> {
        match crate::interrupt::current_token(self.lua) {
            Some(token) if token.is_cancelled() => Err(IsleError::Cancelled),
            _ => Ok(()),
        }
    }
}

fn too_big(limit: usize) -> IsleError {
    IsleError::MemoryLimit(format!(
        "the request's results would take more than the VM's memory limit ({limit} bytes) \
         to convert to Rust (each reference to a string or table is copied again); \
         return fewer copies, or keep the value in Lua and return a LuaHandle to it"
    ))
}
