//! Reading a raised Lua value into an [`ErrorValue`], on the VM thread,
//! within bounds.

use mlua::{Lua, Table, Value};

use super::{ErrorValue, FieldKey, Scalar};

/// Bytes of [`ErrorValue::text`] kept.
pub(super) const MAX_TEXT: usize = 1024;
/// Bytes of a string kept in a field (key or value).
pub(super) const MAX_STRING: usize = 256;
/// Fields kept.
const MAX_FIELDS: usize = 64;
/// Entries of a table looked at (a million-field table costs this many).
const MAX_SCAN: usize = 256;

/// Reads `value`, and returns it with its full `tostring` text (`None` if
/// `__tostring` failed), which the caller matches against the message
/// mlua made of it.
///
/// Runs the value's `__tostring` (Lua code: the caller runs this inside
/// the request, under its stop machinery; mlua calls it protected).
pub(crate) fn read(lua: &Lua, value: &Value) -> (ErrorValue, Option<String>) {
    let mut truncated = false;
    let full = tostring(lua, value);
    let text = match &full {
        Ok(t) => cap(t, MAX_TEXT, &mut truncated),
        Err(e) => cap(&format!("(tostring failed: {e})"), MAX_TEXT, &mut truncated),
    };
    let mut fields = Vec::new();
    let mut omitted = false;
    let mut plain_table = false;
    if let Value::Table(t) = value {
        plain_table = is_plain(t);
        read_fields(t, &mut fields, &mut omitted, &mut truncated);
    }
    #[cfg(feature = "serde")]
    let json = super::json::to_json(value, &mut truncated);
    let value = ErrorValue {
        type_name: crate::vm::lua_type(value),
        text,
        scalar: scalar(value, usize::MAX, &mut truncated),
        fields,
        plain_table,
        omitted,
        truncated,
        #[cfg(feature = "serde")]
        json,
    };
    (value, full.ok())
}

/// Lua's `tostring` of `v`: numbers as Lua writes them, the rest through
/// `luaL_tolstring` (`__tostring`, `__name`), protected.
fn tostring(lua: &Lua, v: &Value) -> mlua::Result<String> {
    match v {
        Value::Integer(_) | Value::Number(_) => Ok(lua
            .coerce_string(v.clone())?
            .map(|s| s.to_string_lossy())
            .unwrap_or_default()),
        other => other.to_string(),
    }
}

/// A table whose `tostring` is its address: no `__tostring`, no `__name`
/// (which Luau's `tostring` does not read), read raw: the metatable as it
/// is, whatever `__metatable` says.
fn is_plain(t: &Table) -> bool {
    let unset = |mt: &Table, key| matches!(mt.raw_get::<Value>(key), Ok(Value::Nil));
    t.metatable().is_none_or(|mt| {
        unset(&mt, "__tostring") && (cfg!(feature = "luau") || unset(&mt, "__name"))
    })
}

/// The scalar fields of `t`, read raw, within bounds, sorted.
fn read_fields(
    t: &Table,
    fields: &mut Vec<(FieldKey, Scalar)>,
    omitted: &mut bool,
    truncated: &mut bool,
) {
    for (seen, pair) in t.pairs::<Value, Value>().enumerate() {
        if seen == MAX_SCAN || fields.len() == MAX_FIELDS {
            *omitted = true;
            *truncated = true;
            break;
        }
        let Ok((k, v)) = pair else {
            *omitted = true;
            break;
        };
        let key = match k {
            Value::String(s) => Some(FieldKey::Name(lossy(&s, MAX_STRING, truncated))),
            Value::Integer(i) => Some(FieldKey::Index(i)),
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                Some(FieldKey::Index(n as i64))
            }
            _ => None,
        };
        match (key, scalar(&v, MAX_STRING, truncated)) {
            (Some(k), Some(v)) if !matches!(v, Scalar::Nil) => fields.push((k, v)),
            _ => *omitted = true,
        }
    }
    fields.sort_by(|a, b| a.0.cmp(&b.0));
}

/// `v` as a scalar, strings cut to `max` bytes; `None` for the rest.
fn scalar(v: &Value, max: usize, truncated: &mut bool) -> Option<Scalar> {
    Some(match v {
        Value::Nil => Scalar::Nil,
        Value::Boolean(b) => Scalar::Boolean(*b),
        Value::Integer(i) => Scalar::Integer(*i),
        Value::Number(n) => Scalar::Number(*n),
        Value::String(s) => Scalar::String(lossy(s, max.min(MAX_TEXT), truncated)),
        _ => return None,
    })
}

/// At most `max` bytes of `s`, lossily UTF-8.
pub(super) fn lossy(s: &mlua::LuaString, max: usize, truncated: &mut bool) -> String {
    let bytes = s.as_bytes();
    if bytes.len() > max {
        *truncated = true;
        cap(&String::from_utf8_lossy(&bytes[..max]), max, truncated)
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn cap(s: &str, max: usize, truncated: &mut bool) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    *truncated = true;
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
