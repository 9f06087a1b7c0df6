//! Where Lua's `print` writes: the host's choice (`print_to`,
//! `discard_print`); by default stdout, or nowhere in the sandbox.

use std::fmt;
use std::sync::Arc;

use mlua::Lua;

use crate::vm::precompiled::Precompiled;

/// A host's sink for printed lines.
pub(super) type Sink = Arc<dyn Fn(&str) + Send + Sync + 'static>;

/// Where `print` goes.
#[derive(Clone, Default)]
pub(crate) enum Print {
    /// Lua's own `print` (stdout), or, in the sandbox, nowhere.
    #[default]
    Default,
    /// Formatted as Lua does, then dropped.
    Discard,
    /// Each line (without its newline) to the host's function.
    To(Sink),
}

impl fmt::Debug for Print {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Print::Default => "Default",
            Print::Discard => "Discard",
            Print::To(_) => "To(..)",
        })
    }
}

/// Replaces `print` unless it stays Lua's own (`Default` outside the
/// sandbox). Runs before `init` and before `vm/cstack.rs` guards `print`.
pub(crate) fn install(lua: &Lua, print: &Print, sandbox: bool) -> mlua::Result<()> {
    let sink = match print {
        Print::Default if !sandbox => return Ok(()),
        Print::Default | Print::Discard => None,
        Print::To(sink) => Some(sink.clone()),
    };
    // Joins the parts here rather than with `table.concat`: the host may
    // not open the table library (`std_libs`).
    let emit = lua.create_function(move |_, (parts, n): (mlua::Table, i64)| {
        let Some(sink) = &sink else { return Ok(()) };
        let mut line = Vec::new();
        for i in 1..=n {
            if i > 1 {
                line.push(b'\t');
            }
            match parts.raw_get::<mlua::Value>(i)? {
                mlua::Value::String(s) => line.extend_from_slice(&s.as_bytes()),
                other => line.extend_from_slice(other.to_string()?.as_bytes()),
            }
        }
        sink(&String::from_utf8_lossy(&line));
        Ok(())
    })?;
    PRINT.load(lua)?.call(emit)
}

/// Lua's `print`, formatting as it does (`tostring` of each argument, so
/// `__tostring` and `__name` count and their errors are raised; tabs
/// between), with the line handed to `emit`.
static PRINT: Precompiled = Precompiled::new(
    "=mlua-isle",
    r##"
local emit = ...
local tostring, select = tostring, select
print = function(...)
    local n = select("#", ...)
    local parts = { ... }
    for i = 1, n do parts[i] = tostring(parts[i]) end
    emit(parts, n)
end
"##,
);
