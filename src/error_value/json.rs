//! The raised value as a `serde_json::Value` (the `serde` feature), and
//! [`ErrorValue::deserialize`].

use mlua::{Table, Value};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value as Json};

use super::read::{lossy, MAX_STRING};
use super::ErrorValue;
use crate::{IsleError, LuaError, LuaErrorKind};

/// Tables nested deeper are left out.
const MAX_DEPTH: usize = 8;
/// Values converted in all (a million-field table costs this many).
const MAX_NODES: usize = 512;

impl ErrorValue {
    /// The raised value as JSON-like data (the `serde` feature): `nil` is
    /// `null`; a table whose keys are exactly `1..=n` an array; any other
    /// table an object (integer keys written as strings; other keys left
    /// out). Functions, threads and userdata become a string naming their
    /// type (`"<function>"`), as does a table met again inside itself
    /// (`"<cycle>"`) and one nested past 8 levels (`"<too deep>"`); at most
    /// 512 values are read in all, strings at most 256 bytes; anything cut
    /// sets [`is_truncated`](Self::is_truncated). Tables are read raw.
    pub fn serde_value(&self) -> &serde_json::Value {
        &self.json
    }

    /// Reads the raised value as a `T` (the `serde` feature), from
    /// [`serde_value`](Self::serde_value).
    ///
    /// ```
    /// use mlua_isle::{Isle, IsleError};
    /// use serde::Deserialize;
    ///
    /// #[derive(Debug, PartialEq, Deserialize)]
    /// struct AppError { code: u16, msg: String }
    ///
    /// let isle = Isle::spawn(|_| Ok(()))?;
    /// let err = isle.eval::<()>("error({ code = 404, msg = 'no such page' })").unwrap_err();
    /// let value = err.as_lua().and_then(|e| e.value()).expect("a table was raised");
    /// let app: AppError = value.deserialize()?;
    /// assert_eq!(app, AppError { code: 404, msg: "no such page".into() });
    /// # Ok::<(), IsleError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`IsleError::Lua`] of kind [`Conversion`](LuaErrorKind::Conversion)
    /// naming `T`, when the value does not fit.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, IsleError> {
        T::deserialize(&self.json).map_err(|e| {
            IsleError::Lua(LuaError::new(
                LuaErrorKind::Conversion,
                format!(
                    "error converting the raised Lua {} to {} ({e})",
                    self.type_name,
                    std::any::type_name::<T>()
                ),
            ))
        })
    }
}

/// `value` as JSON, within the bounds above.
pub(super) fn to_json(value: &Value, truncated: &mut bool) -> Json {
    let mut walk = Walk {
        nodes: 0,
        path: Vec::new(),
        truncated: false,
    };
    let json = walk.value(value);
    *truncated |= walk.truncated;
    json
}

struct Walk {
    nodes: usize,
    /// The tables being read, outer first: one met again is a cycle.
    path: Vec<*const std::ffi::c_void>,
    truncated: bool,
}

impl Walk {
    fn value(&mut self, v: &Value) -> Json {
        self.nodes += 1;
        match v {
            Value::Nil => Json::Null,
            Value::Boolean(b) => Json::Bool(*b),
            Value::Integer(i) => Json::from(*i),
            Value::Number(n) => Number::from_f64(*n).map_or(Json::Null, Json::Number),
            Value::String(s) => Json::String(lossy(s, MAX_STRING, &mut self.truncated)),
            Value::Table(t) => self.table(t),
            other => Json::String(format!("<{}>", crate::vm::lua_type(other))),
        }
    }

    fn table(&mut self, t: &Table) -> Json {
        let at = t.to_pointer();
        if self.path.contains(&at) {
            self.truncated = true;
            return Json::String("<cycle>".into());
        }
        if self.path.len() == MAX_DEPTH {
            self.truncated = true;
            return Json::String("<too deep>".into());
        }
        self.path.push(at);
        let mut entries: Vec<(Value, Json)> = Vec::new();
        for pair in t.pairs::<Value, Value>() {
            if self.nodes >= MAX_NODES {
                self.truncated = true;
                break;
            }
            let Ok((k, v)) = pair else {
                self.truncated = true;
                break;
            };
            let v = self.value(&v);
            entries.push((k, v));
        }
        self.path.pop();
        self.json_of(entries)
    }

    /// An array if the keys are exactly `1..=n`, else an object.
    fn json_of(&mut self, mut entries: Vec<(Value, Json)>) -> Json {
        let index = |k: &Value| match k {
            Value::Integer(i) => Some(*i),
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => Some(*n as i64),
            _ => None,
        };
        let n = entries.len() as i64;
        if n > 0
            && entries
                .iter()
                .all(|(k, _)| index(k).is_some_and(|i| (1..=n).contains(&i)))
        {
            entries.sort_by_key(|(k, _)| index(k));
            return Json::Array(entries.into_iter().map(|(_, v)| v).collect());
        }
        let mut map = Map::new();
        for (k, v) in entries {
            let key = match (&k, index(&k)) {
                (Value::String(s), _) => lossy(s, MAX_STRING, &mut self.truncated),
                (_, Some(i)) => i.to_string(),
                _ => {
                    self.truncated = true;
                    continue;
                }
            };
            map.insert(key, v);
        }
        Json::Object(map)
    }
}
