//! [`Chunk`]: the source an `eval` runs, and the name its errors carry.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// The name Lua gets for a chunk that was not named: errors read
/// `eval:LINE: message`.
const DEFAULT_NAME: &str = "=eval";

/// Lua source for [`eval`](crate::Isle::eval) and its siblings, with the
/// name its errors and tracebacks give it.
///
/// Every `eval` takes `impl Into<Chunk>`, so a `&str`, a `String` or a
/// `format!(..)` works as before; build a `Chunk` to name it. The source is
/// held in an `Arc`: a chunk made once and evaluated many times (cloned, or
/// passed as `&chunk`) is not copied per request.
///
/// The name follows Lua's convention for chunk names:
/// - `@path` names a file: errors read `path:LINE:` (Lua shortens a long
///   path from the left, `...ut/checkout.lua:3:`);
/// - `=label` is used as it is: errors read `label:LINE:` (Lua cuts a long
///   label: at about 60 bytes on PUC Lua and LuaJIT);
/// - a name with neither prefix is taken as a label (`"checkout"` is
///   `"=checkout"`), so that errors read `checkout:LINE:` rather than Lua's
///   `[string "checkout"]:LINE:`;
/// - an empty name (or a lone `@` or `=`) keeps the default, `eval`.
///
/// Control characters in a name (newlines, NUL, ...) become `?`: a name is
/// one line of an error message and cannot fake another. The cache of
/// compiled chunks keys on the name too, so the same source under two names
/// is two entries.
///
/// ```
/// use mlua_isle::{Chunk, Isle};
///
/// let isle = Isle::spawn(|_| Ok(()))?;
/// let checkout = Chunk::new("local total = ...\nif total < 0 then error('negative') end\nreturn total")
///     .name("@handlers/checkout.lua");
/// assert_eq!(isle.eval_with::<i64>(&checkout, 42)?, 42);
/// let err = isle.eval_with::<i64>(&checkout, -1).unwrap_err();
/// assert!(err.to_string().contains("handlers/checkout.lua:2: negative"), "{err}");
/// # Ok::<(), mlua_isle::IsleError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Chunk {
    source: Arc<str>,
    /// The name as Lua gets it (with its `@` or `=`); `None` for the
    /// default.
    name: Option<Arc<str>>,
}

impl Chunk {
    /// A chunk of `source`, named `eval` (errors read `eval:LINE:`).
    pub fn new(source: impl Into<Arc<str>>) -> Chunk {
        Chunk {
            source: source.into(),
            name: None,
        }
    }

    /// Names the chunk: `@path` for a file, `=label` (or a plain `label`)
    /// for anything else. See the [type's docs](Chunk) for the rules.
    #[must_use]
    pub fn name(mut self, name: impl AsRef<str>) -> Chunk {
        self.name = lua_name(name.as_ref()).map(Arc::from);
        self
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The name as Lua gets it: `=eval` unless named, else the name given
    /// (control characters replaced), with `=` in front if it had neither
    /// `@` nor `=`.
    pub fn lua_name(&self) -> &str {
        self.name.as_deref().unwrap_or(DEFAULT_NAME)
    }

    /// The name if one was given (`None`: the default), for the cache's
    /// hash: an unnamed chunk hashes no name bytes.
    pub(crate) fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The source, shared (the cache keeps it without a copy).
    pub(crate) fn shared_source(&self) -> &Arc<str> {
        &self.source
    }
}

/// The name Lua gets for `name`, or `None` for the default.
fn lua_name(name: &str) -> Option<String> {
    let (prefix, rest) = match name.as_bytes().first() {
        Some(b'@' | b'=') => name.split_at(1),
        _ => ("=", name),
    };
    if rest.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(prefix.len() + rest.len());
    out.push_str(prefix);
    out.extend(rest.chars().map(|c| if c.is_control() { '?' } else { c }));
    // The default spelled out is the default (one cache entry).
    (out != DEFAULT_NAME).then_some(out)
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("name", &self.lua_name())
            .field("source", &self.source)
            .finish()
    }
}

impl From<&str> for Chunk {
    fn from(source: &str) -> Chunk {
        Chunk::new(source)
    }
}

impl From<&mut str> for Chunk {
    fn from(source: &mut str) -> Chunk {
        Chunk::new(&*source)
    }
}

impl From<String> for Chunk {
    fn from(source: String) -> Chunk {
        Chunk::new(source)
    }
}

impl From<&String> for Chunk {
    fn from(source: &String) -> Chunk {
        Chunk::new(source.as_str())
    }
}

impl From<Box<str>> for Chunk {
    fn from(source: Box<str>) -> Chunk {
        Chunk::new(source)
    }
}

impl From<Cow<'_, str>> for Chunk {
    fn from(source: Cow<'_, str>) -> Chunk {
        Chunk::new(source)
    }
}

impl From<Arc<str>> for Chunk {
    fn from(source: Arc<str>) -> Chunk {
        Chunk::new(source)
    }
}

impl From<&Chunk> for Chunk {
    fn from(chunk: &Chunk) -> Chunk {
        chunk.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_luas_convention() {
        assert_eq!(Chunk::new("1").lua_name(), "=eval");
        assert_eq!(Chunk::new("1").name("@a/b.lua").lua_name(), "@a/b.lua");
        assert_eq!(Chunk::new("1").name("=label").lua_name(), "=label");
        assert_eq!(Chunk::new("1").name("plain").lua_name(), "=plain");
        for empty in ["", "@", "="] {
            assert_eq!(Chunk::new("1").name(empty).lua_name(), "=eval");
        }
        assert_eq!(Chunk::new("1").name("a\nb\0c\r").lua_name(), "=a?b?c?");
        // Renaming back to the default.
        assert_eq!(Chunk::new("1").name("x").name("").lua_name(), "=eval");
        assert_eq!(Chunk::new("1").name("eval"), Chunk::new("1"));
    }

    #[test]
    fn clones_share_the_source() {
        let a = Chunk::new("return 1").name("x");
        let b = Chunk::from(&a);
        assert!(Arc::ptr_eq(a.shared_source(), b.shared_source()));
        assert_eq!(a, b);
    }
}
