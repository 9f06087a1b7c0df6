//! What `call` calls: a global function, a path to one (`string.upper`,
//! `a.b.c`), a method (`obj:get`, `a.b:get`), or a callable value (a table
//! or userdata with a `__call` metamethod).
//!
//! The first name resolves as a global (in a session, its environment,
//! falling back to the shared globals); later names index the value found
//! so far as Lua's `a.b` does (`__index` honoured, so a sandbox's read-only
//! views of shared tables work). The lookups run inside the request, so a
//! looping `__index` is stopped by a cancel or a time limit like any Lua
//! code. A plain name (no `.` or `:`) that finds a function costs what a
//! global lookup does: no allocation.

use mlua::{Function, IntoLuaMulti, Lua, MultiValue, ObjectLike, Value};

use crate::vm::{lua_type, Ctx, Run};
use crate::IsleError;

/// `__call` metamethods followed at most, one through the next (a
/// callable table whose `__call` is a callable table, ...). Lua 5.4 follows
/// such chains; 5.1 does not; every backend follows this many here.
const MAX_CALL_CHAIN: usize = 8;

/// A resolved `call` target.
pub(crate) struct Target {
    function: Function,
    /// Values passed before the caller's arguments: the callables whose
    /// `__call` was followed (outermost last) and the object of a method
    /// call. Empty (no allocation) for a plain function.
    before: Vec<Value>,
}

impl Target {
    /// Calls the target with `args` (after the values it passes first).
    pub(crate) fn call<A, T>(&self, ctx: &Ctx<'_>, args: A) -> Run<T>
    where
        A: IntoLuaMulti,
        T: mlua::FromLuaMulti + 'static,
    {
        if self.before.is_empty() {
            return ctx.call(&self.function, args);
        }
        match self.args(ctx.lua, args) {
            Ok(args) => ctx.call(&self.function, args),
            Err(e) => Run::Done(Err(crate::interrupt::request_error(ctx.lua, &e))),
        }
    }

    /// The function to call.
    #[cfg(feature = "async")]
    pub(crate) fn function(&self) -> &Function {
        &self.function
    }

    /// The caller's `args`, after the values the target passes first.
    pub(crate) fn args(&self, lua: &Lua, args: impl IntoLuaMulti) -> mlua::Result<MultiValue> {
        let mut all = args.into_lua_multi(lua)?;
        for v in self.before.iter().rev() {
            all.push_front(v.clone());
        }
        Ok(all)
    }
}

/// Resolves `path` for a request running in `ctx`.
///
/// # Errors
/// [`IsleError::NotFound`] with the path up to the first name that is
/// `nil`; [`IsleError::Lua`] for a path that is not well formed, a value
/// that cannot be indexed midway, a target that cannot be called, or an
/// error (or stop) raised by an `__index` metamethod.
pub(crate) fn resolve(ctx: &Ctx<'_>, path: &str) -> Result<Target, IsleError> {
    let err = |e: mlua::Error| crate::interrupt::request_error(ctx.lua, &e);
    if !path.is_empty() && !path.contains(['.', ':']) {
        // The common case: one global.
        return match ctx
            .with_scope(|scope| scope.get::<Value>(path))
            .map_err(err)?
        {
            Value::Nil => Err(IsleError::NotFound(path.to_string())),
            Value::Function(function) => Ok(Target {
                function,
                before: Vec::new(),
            }),
            other => callable(ctx.lua, &Named(path), other, Vec::new()),
        };
    }
    let (dotted, method) = parse(path)?;
    let mut names = dotted.split('.');
    let first = names.next().unwrap_or_default();
    let mut value = ctx
        .with_scope(|scope| scope.get::<Value>(first))
        .map_err(err)?;
    let mut end = first.len();
    let missing = |end: usize| IsleError::NotFound(path[..end].to_string());
    if value.is_nil() {
        return Err(missing(end));
    }
    for name in names {
        value = index(ctx.lua, path, &path[..end], &value, name)?;
        end += 1 + name.len();
        if value.is_nil() {
            return Err(missing(end));
        }
    }
    let mut before = Vec::new();
    if let Some(name) = method {
        let function = index(ctx.lua, path, &path[..end], &value, name)?;
        if function.is_nil() {
            return Err(missing(path.len()));
        }
        before.push(value);
        value = function;
    }
    callable(ctx.lua, &Named(path), value, before)
}

/// Splits a path with a `.` or `:` into its dotted part and its method.
fn parse(path: &str) -> Result<(&str, Option<&str>), IsleError> {
    let (dotted, method) = match path.split_once(':') {
        Some((dotted, method)) => (dotted, Some(method)),
        None => (path, None),
    };
    let why = if path.is_empty() {
        Some("it is empty")
    } else if dotted.is_empty() {
        Some("nothing before `:`")
    } else if method.is_some_and(|m| m.contains(':')) {
        Some("more than one `:`")
    } else if method.is_some_and(|m| m.contains('.')) {
        Some("`:` may only come before the last name")
    } else if method.is_some_and(str::is_empty) {
        Some("nothing after `:`")
    } else if dotted.split('.').any(str::is_empty) {
        Some("an empty name (a leading, trailing or doubled `.`)")
    } else {
        None
    };
    match why {
        Some(why) => Err(lua_error(format!(
            "invalid call path `{path}`: {why}; write `name`, `a.b.c` or `a.b:method`"
        ))),
        None => Ok((dotted, method)),
    }
}

/// `value[name]` as Lua's `value.name` does it, `value` being what `at`
/// (a prefix of `path`) resolved to.
fn index(lua: &Lua, path: &str, at: &str, value: &Value, name: &str) -> Result<Value, IsleError> {
    let err = |e: mlua::Error| crate::interrupt::request_error(lua, &e);
    let through = |index: Value, this: &Value| match index {
        Value::Table(t) => t.get::<Value>(name).map_err(err),
        Value::Function(f) => f.call::<Value>((this.clone(), name)).map_err(err),
        _ => Err(not_indexable(path, at, value, name)),
    };
    match value {
        Value::Table(t) => t.get::<Value>(name).map_err(err),
        Value::UserData(u) => match metafield(lua, value, "__index") {
            Value::Nil => Err(not_indexable(path, at, value, name)),
            _ => u.get::<Value>(name).map_err(err),
        },
        Value::String(_) => through(metafield(lua, value, "__index"), value),
        _ => Err(not_indexable(path, at, value, name)),
    }
}

fn not_indexable(path: &str, at: &str, value: &Value, name: &str) -> IsleError {
    lua_error(format!(
        "call path `{path}`: `{at}` is a {}, not a table: cannot look `{name}` up in it",
        lua_type(value)
    ))
}

/// The target that calls `value` (with `before` passed first): `value`
/// itself if a function, else its `__call` metamethod with `value` in
/// front, followed through at most [`MAX_CALL_CHAIN`] callables. `what`
/// names the value in errors (`call path \`a.b\``, `global \`f\``, ...).
pub(crate) fn callable(
    lua: &Lua,
    what: &dyn std::fmt::Display,
    mut value: Value,
    mut before: Vec<Value>,
) -> Result<Target, IsleError> {
    for _ in 0..=MAX_CALL_CHAIN {
        let next = match &value {
            Value::Function(function) => {
                return Ok(Target {
                    function: function.clone(),
                    before,
                })
            }
            Value::Table(_) | Value::UserData(_) => metafield(lua, &value, "__call"),
            _ => Value::Nil,
        };
        if next.is_nil() {
            return Err(lua_error(format!(
                "{what} is not a function (it is a {}, without a `__call` metamethod)",
                lua_type(&value)
            )));
        }
        before.insert(0, std::mem::replace(&mut value, next));
    }
    Err(lua_error(format!(
        "{what}: more than {MAX_CALL_CHAIN} `__call` metamethods, each a callable value: \
         give the function itself"
    )))
}

/// How `callable` names `path` in its errors.
struct Named<'a>(&'a str);

impl std::fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.contains(['.', ':']) {
            write!(f, "call path `{}`", self.0)
        } else {
            write!(f, "global `{}`", self.0)
        }
    }
}

/// The field `key` of `value`'s metatable (read raw, as Lua reads
/// metamethods), or `nil`.
fn metafield(lua: &Lua, value: &Value, key: &str) -> Value {
    let metatable = match value {
        Value::Table(t) => t.metatable(),
        Value::UserData(u) => {
            return u
                .metatable()
                .and_then(|m| m.get::<Value>(key))
                .unwrap_or(Value::Nil)
        }
        Value::String(_) => lua.type_metatable::<mlua::LuaString>(),
        _ => None,
    };
    metatable
        .and_then(|m| m.raw_get::<Value>(key).ok())
        .unwrap_or(Value::Nil)
}

fn lua_error(message: String) -> IsleError {
    IsleError::from_lua(&mlua::Error::runtime(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_or_say_why_not() {
        assert_eq!(parse("a.b.c").unwrap(), ("a.b.c", None));
        assert_eq!(parse("a.b:get").unwrap(), ("a.b", Some("get")));
        assert_eq!(parse("obj:get").unwrap(), ("obj", Some("get")));
        for (bad, why) in [
            ("", "empty"),
            ("a..b", "empty name"),
            ("a.", "empty name"),
            (".a", "empty name"),
            ("a:b:c", "more than one"),
            (":x", "nothing before"),
            ("a:", "nothing after"),
            ("a:b.c", "last name"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains(&format!("`{bad}`")),
                "{bad}: {e}"
            );
        }
    }
}
