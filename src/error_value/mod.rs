//! [`ErrorValue`]: the value a Lua error raised, kept readable without the
//! VM.

#[cfg(feature = "serde")]
mod json;
mod read;

#[cfg(any(feature = "serde", feature = "async"))]
pub(crate) use read::cap;
pub(crate) use read::read;

use std::fmt;

/// The value a failing request raised with `error(value)` (or, from Lua
/// 5.3 on, `assert(false, value)`), when it was not a string: a table, `nil`, a
/// boolean, a number (from Lua 5.3 on: 5.1, 5.2, LuaJIT and Luau's `error`
/// makes one a message), a function, a userdata ... Read on the VM, owned,
/// `Send + Sync`: see [`LuaError::value`](crate::LuaError::value).
///
/// It keeps, within bounds (a hostile script can raise anything):
///
/// - [`type_name`](Self::type_name): Lua's `type()` of the value;
/// - [`text`](Self::text): its `tostring`, as Lua's `tostring` gives it
///   (`__tostring`, `__name`), cut at 1 KiB (then ending in `…`);
/// - [`fields`](Self::fields), for a table: its entries with a string or
///   integer key and a scalar value (`boolean`, number, string), read raw
///   (neither `__index` nor `__pairs` is consulted), at most 64 of them,
///   each string cut at 256 bytes (a cut inside a character ends in
///   `…`), sorted by key;
/// - with the `serde` feature, `serde_value`: the
///   whole value as JSON-like data (see there).
///
/// [`is_truncated`](Self::is_truncated) says whether a bound cut anything.
///
/// ```
/// use mlua_isle::{Isle, IsleError, Scalar};
///
/// let isle = Isle::spawn(|_| Ok(()))?;
/// let err = isle.eval::<()>("error({ code = 42, msg = 'no' })").unwrap_err();
/// let lua = err.as_lua().unwrap();
/// assert_eq!(lua.message(), r#"{code = 42, msg = "no"}"#);
/// let value = lua.value().unwrap();
/// assert_eq!(value.type_name(), "table");
/// assert_eq!(value.field("code"), Some(&Scalar::Integer(42)));
/// assert_eq!(value.field("msg"), Some(&Scalar::String("no".into())));
/// # Ok::<(), IsleError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorValue {
    pub(crate) type_name: &'static str,
    pub(crate) text: String,
    /// The value itself, when it is not a table, function, thread or userdata.
    pub(crate) scalar: Option<Scalar>,
    pub(crate) fields: Vec<(FieldKey, Scalar)>,
    /// A table with no metatable (or one with neither `__tostring` nor
    /// `__name`), whose message is rendered from its fields.
    pub(crate) plain_table: bool,
    /// Entries of the table left out of `fields` (not scalar, or past the
    /// bound).
    pub(crate) omitted: bool,
    pub(crate) truncated: bool,
    #[cfg(feature = "serde")]
    pub(crate) json: serde_json::Value,
}

impl ErrorValue {
    /// Lua's type name of the value (`"table"`, `"nil"`, `"boolean"`,
    /// `"number"`, `"function"`, `"userdata"`, `"thread"` ...).
    pub fn type_name(&self) -> &str {
        self.type_name
    }

    /// The value's `tostring`, as Lua's `tostring` gives it (its
    /// `__tostring`, or its `__name`), run in the request, under its stop
    /// machinery. (A value whose `__tostring` fails is not kept at all:
    /// see [`LuaError::value`](crate::LuaError::value).)
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value itself when it is `nil`, a boolean, a number or a string
    /// (`None` for tables and the rest).
    pub fn as_scalar(&self) -> Option<&Scalar> {
        self.scalar.as_ref()
    }

    /// A table's scalar fields (string or integer key; boolean, number or
    /// string value), sorted: integer keys first, in order, then names.
    /// Nested tables, functions and the like are left out (see
    /// [`is_complete`](Self::is_complete)). Empty for other values.
    pub fn fields(&self) -> &[(FieldKey, Scalar)] {
        &self.fields
    }

    /// The field named `name`, if it is among [`fields`](Self::fields).
    pub fn field(&self, name: &str) -> Option<&Scalar> {
        self.fields.iter().find_map(|(k, v)| match k {
            FieldKey::Name(n) if n == name => Some(v),
            _ => None,
        })
    }

    /// True if [`fields`](Self::fields) holds every entry of the table
    /// (it was flat, and within the bounds).
    pub fn is_complete(&self) -> bool {
        !self.omitted
    }

    /// True if a bound cut something: the text, a string, the number of
    /// fields, or (`serde`) the depth or size of the serde value, or a
    /// table that contains itself.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// A short rendering for the error message: `{code = 42, msg = "no"}`
    /// for a plain table, else the text.
    pub(crate) fn render(&self) -> String {
        if !self.plain_table {
            return self.text.clone();
        }
        let mut out = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            match k {
                FieldKey::Name(n) if is_identifier(n) => out.push_str(n),
                FieldKey::Name(n) => out.push_str(&format!("[{n:?}]")),
                FieldKey::Index(i) => out.push_str(&format!("[{i}]")),
            }
            out.push_str(" = ");
            out.push_str(&v.to_string());
        }
        if self.omitted {
            out.push_str(if self.fields.is_empty() {
                "…"
            } else {
                ", …"
            });
        }
        out.push('}');
        out
    }
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The key of a field of an [`ErrorValue`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldKey {
    /// An integer key (`t[1]`).
    Index(i64),
    /// A string key (`t.code`).
    Name(String),
}

/// A Lua scalar, as kept in an [`ErrorValue`].
///
/// Floats compare by their bits (so `NaN` equals itself, and `0.0` differs
/// from `-0.0`), which makes `Scalar` `Eq`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Scalar {
    /// `nil`.
    Nil,
    /// A boolean.
    Boolean(bool),
    /// An integer (on Lua 5.1, LuaJIT and Luau, a number with an integral
    /// value).
    Integer(i64),
    /// A float.
    Number(f64),
    /// A string (lossily UTF-8, at most 256 bytes in fields).
    String(String),
}

impl PartialEq for Scalar {
    fn eq(&self, other: &Scalar) -> bool {
        match (self, other) {
            (Scalar::Nil, Scalar::Nil) => true,
            (Scalar::Boolean(a), Scalar::Boolean(b)) => a == b,
            (Scalar::Integer(a), Scalar::Integer(b)) => a == b,
            (Scalar::Number(a), Scalar::Number(b)) => a.to_bits() == b.to_bits(),
            (Scalar::String(a), Scalar::String(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Scalar {}

impl fmt::Display for Scalar {
    /// As Lua source: `nil`, `true`, `42`, `0.5`, `"text"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Nil => f.write_str("nil"),
            Scalar::Boolean(b) => write!(f, "{b}"),
            Scalar::Integer(i) => write!(f, "{i}"),
            Scalar::Number(n) => write!(f, "{n:?}"),
            Scalar::String(s) => write!(f, "{s:?}"),
        }
    }
}
