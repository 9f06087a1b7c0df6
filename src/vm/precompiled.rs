//! The crate's own Lua code, compiled once per process.
//!
//! Every VM runs a few chunks of ours (the catchers, the sandbox, ...).
//! Compiling one costs more than loading its bytecode (Lua's parser and
//! the garbage it leaves: 10-20 µs and several KiB per chunk on small
//! machines), and a VM's start is what every `Isle::spawn` and every
//! recycled pool VM pays. So the first VM to need a chunk compiles it from
//! source and keeps its bytecode (with its debug information: positions
//! and names read as from the source); later VMs load that.
//!
//! Only this module loads binary chunks, and only bytecode it made itself
//! in this process from the crate's own source; Lua code's `load` keeps
//! refusing them (`allow_binary_chunks`).

use std::sync::OnceLock;

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua};

/// A chunk of the crate's own Lua code; see the module docs.
pub(crate) struct Precompiled {
    /// The chunk's name, as `Chunk::set_name` takes it (`=mlua-isle`).
    name: &'static str,
    source: &'static str,
    /// Set by the first VM that compiles it. Stays unset if dumping is not
    /// possible (each VM then compiles).
    bytecode: OnceLock<Vec<u8>>,
}

impl Precompiled {
    pub(crate) const fn new(name: &'static str, source: &'static str) -> Precompiled {
        Precompiled {
            name,
            source,
            bytecode: OnceLock::new(),
        }
    }

    /// The chunk as a function of `lua`, not yet called.
    pub(crate) fn load(&self, lua: &Lua) -> mlua::Result<Function> {
        if let Some(bytecode) = self.bytecode.get() {
            return load_binary(lua, self.name, bytecode);
        }
        // Luau: its compiler makes the bytecode (with mlua's default
        // options, as `Lua::load` of the source would).
        #[cfg(feature = "luau")]
        {
            let bytecode = mlua::chunk::Compiler::new().compile(self.source)?;
            load_binary(lua, self.name, self.bytecode.get_or_init(|| bytecode))
        }
        // PUC-Rio Lua and LuaJIT: compiled here, then dumped unstripped.
        #[cfg(not(feature = "luau"))]
        {
            let f = lua
                .load(self.source)
                .set_name(self.name)
                .set_mode(ChunkMode::Text)
                .into_function()?;
            // `dump` panics only where Lua cannot grow its stack or
            // allocate: this VM has its function, the next one compiles.
            let dumped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.dump(false)));
            if let Ok(bytecode) = dumped {
                let _ = self.bytecode.set(bytecode);
            }
            Ok(f)
        }
    }
}

fn load_binary(lua: &Lua, name: &str, bytecode: &[u8]) -> mlua::Result<Function> {
    lua.load(bytecode)
        .set_name(name)
        .set_mode(ChunkMode::Binary)
        .into_function()
}

#[cfg(test)]
mod tests {
    use super::*;

    static CHUNK: Precompiled = Precompiled::new(
        "=mlua-isle test",
        "local a = ...\nreturn function(b) return a + b, debug and debug.traceback() end",
    );

    #[test]
    fn later_vms_load_the_bytecode_of_the_first() {
        for _ in 0..3 {
            let lua = Lua::new();
            let f: Function = CHUNK.load(&lua).unwrap().call(40).unwrap();
            assert_eq!(f.call::<i64>(2).unwrap(), 42);
            let info = f.info();
            assert_eq!(info.source.as_deref(), Some("=mlua-isle test"));
            assert_eq!(info.line_defined, Some(2));
        }
        assert!(CHUNK.bytecode.get().is_some());
    }
}
