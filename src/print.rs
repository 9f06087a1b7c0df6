//! Where Lua's `print` writes: the host's choice (`print_to`,
//! `discard_print`); by default stdout, or nowhere in the sandbox.

use std::fmt;
use std::sync::Arc;

use mlua::Lua;

/// A host's sink for printed lines.
pub(crate) type Sink = Arc<dyn Fn(&str) + Send + Sync + 'static>;

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
/// sandbox). Runs before `init` and before `cstack.rs` guards `print`.
pub(crate) fn install(lua: &Lua, print: &Print, sandbox: bool) -> mlua::Result<()> {
    let sink = match print {
        Print::Default if !sandbox => return Ok(()),
        Print::Default | Print::Discard => None,
        Print::To(sink) => Some(sink.clone()),
    };
    let emit = lua.create_function(move |_, line: mlua::LuaString| {
        if let Some(sink) = &sink {
            sink(&line.to_string_lossy());
        }
        Ok(())
    })?;
    lua.load(PRINT).set_name("=mlua-isle").call(emit)
}

/// Lua's `print`, formatting as it does (`tostring` of each argument, so
/// `__tostring` and `__name` count and their errors are raised; tabs
/// between), with the line handed to `emit`.
const PRINT: &str = r##"
local emit = ...
local tostring, select, concat = tostring, select, table.concat
print = function(...)
    local n = select("#", ...)
    local parts = { ... }
    for i = 1, n do parts[i] = tostring(parts[i]) end
    emit(concat(parts, "\t", 1, n))
end
"##;
