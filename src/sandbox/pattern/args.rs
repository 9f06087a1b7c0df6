//! Reading the library functions' arguments as Lua's `luaL_check*` do.

use super::*;

/// `luaL_typename`.
pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) | Value::UserData(_) | Value::Error(_) => "userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        other => other.type_name(),
    }
}

/// The arguments of one call, checked as `lauxlib.c` does.
pub(super) struct Args<'a> {
    pub(super) lua: &'a Lua,
    pub(super) tags: &'a Tags,
    pub(super) args: &'a MultiValue,
    /// The function's name in the `string` table.
    pub(super) fname: &'static str,
}

impl<'a> Args<'a> {
    pub(super) fn new(
        lua: &'a Lua,
        tags: &'a Tags,
        args: &'a MultiValue,
        fname: &'static str,
    ) -> Self {
        Args {
            lua,
            tags,
            args,
            fname,
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<&Value> {
        self.args.get(i)
    }

    /// The type `luaL_typeerror` names: `__name` from the metatable, "light
    /// userdata", "no value", or the type.
    pub(super) fn type_arg(&self, i: usize) -> String {
        let field = |mt: Table| mt.raw_get::<Option<LuaString>>("__name").ok().flatten();
        let name = match self.get(i) {
            None => return "no value".into(),
            Some(Value::LightUserData(_)) => return "light userdata".into(),
            Some(Value::Table(t)) => t.metatable().and_then(field),
            Some(v @ Value::UserData(ud)) => match ud.metatable() {
                Ok(mt) => mt.get::<Option<LuaString>>("__name").ok().flatten(),
                // mlua only reads the metatables of its own userdata types;
                // `getmetatable` reads the others' (unless they hide it).
                Err(_) => (self.tags.getmetatable)
                    .call::<Option<Table>>(v.clone())
                    .ok()
                    .flatten()
                    .and_then(field),
            },
            Some(_) => None,
        };
        match name {
            Some(n) => n.to_string_lossy(),
            None => type_name(self.get(i).unwrap_or(&Value::Nil)).into(),
        }
    }

    /// `luaL_argerror`: named after how the Lua wrapper was called (level 1;
    /// level 0 is this Rust function).
    pub(super) fn arg_error(&self, arg: usize, extramsg: &str) -> Fail {
        let (name, method) = self
            .lua
            .inspect_stack(1, |d| {
                let n = d.names();
                (
                    n.name.map(|n| n.into_owned()),
                    n.name_what == Some("method"),
                )
            })
            .unwrap_or((None, false));
        let mut arg = arg;
        if method {
            arg -= 1; // do not count 'self'
            if arg == 0 {
                let name = name.unwrap_or_default();
                return Fail::lua(format!("calling '{name}' on bad self ({extramsg})"));
            }
        }
        // Where Lua would find the function in package.loaded.
        let name = name.unwrap_or_else(|| format!("string.{}", self.fname));
        Fail::lua(format!("bad argument #{arg} to '{name}' ({extramsg})"))
    }

    pub(super) fn type_error(&self, i: usize, expected: &str) -> Fail {
        let got = self.type_arg(i);
        self.arg_error(i + 1, &format!("{expected} expected, got {got}"))
    }

    /// `luaL_checklstring` on argument `i` (0-based): numbers are converted.
    /// Borrowed when it is a string already: cloning a reference costs.
    pub(super) fn check_string(&self, i: usize) -> Res<Cow<'_, LuaString>> {
        match self.get(i) {
            Some(Value::String(s)) => Ok(Cow::Borrowed(s)),
            Some(v @ (Value::Integer(_) | Value::Number(_))) => {
                match self.lua.coerce_string(v.clone())? {
                    Some(s) => Ok(Cow::Owned(s)),
                    None => Err(self.type_error(i, "string")),
                }
            }
            _ => Err(self.type_error(i, "string")),
        }
    }

    /// `luaL_optinteger` on argument `i` (0-based).
    pub(super) fn opt_integer(&self, i: usize, def: i64) -> Res<i64> {
        match self.get(i) {
            None | Some(Value::Nil) => Ok(def),
            Some(Value::Integer(n)) => Ok(*n),
            Some(v) => {
                if let Some(n) = self.lua.coerce_integer(v.clone())? {
                    Ok(n)
                } else if self.lua.coerce_number(v.clone())?.is_some() {
                    Err(self.arg_error(i + 1, "number has no integer representation"))
                } else {
                    Err(self.type_error(i, "number"))
                }
            }
        }
    }
}

/// `posrelatI`: a relative initial position (negative counts from the
/// end), clipped to `[1, inf)`.
pub(super) fn posrelat_init(pos: i64, len: usize) -> usize {
    if pos > 0 {
        usize::try_from(pos).unwrap_or(usize::MAX)
    } else if pos == 0 || pos.unsigned_abs() > len as u64 {
        1
    } else {
        len - pos.unsigned_abs() as usize + 1
    }
}

pub(super) fn truthy(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

pub(super) fn fail() -> MultiValue {
    MultiValue::from_vec(vec![Value::Nil])
}
