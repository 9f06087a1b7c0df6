//! `eval` sources: compiling them, and the per-VM cache of compiled chunks
//! that lets a source seen before skip the compiler.
//!
//! A compiled main chunk is a closure whose only upvalue is `_ENV`; calling
//! it again does what a fresh load would do (fresh locals, fresh nested
//! closures), provided `_ENV` still holds the table it was loaded with.
//! Nothing can change that upvalue except code naming `_ENV` and the `debug`
//! library (which mlua's safe mode never loads; mlua's own
//! `Function::set_environment` detaches a function's `_ENV` rather than
//! writing to the shared one), so sources that mention `_ENV` are compiled
//! every time and never cached. Lua 5.1-style backends keep the environment
//! in the function itself (`setfenv` may change it): there a hit puts it
//! back before the call.
//!
//! The cache lives on the VM thread only (`RefCell`, no locks). Entries are
//! keyed by the environment the chunk runs in (the globals, or a session's
//! table, which the entry holds so its identity is never reused while the
//! entry exists), the chunk's name and the source text. Arguments are not
//! part of the key: `eval_with` calls the same compiled function with them
//! (the chunk sees them as `...`). Least recently used entries go first
//! when a bound is reached: a number of entries, and a total of source (and
//! name) bytes (so huge sources do not pin memory).

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use mlua::{Function, Lua, Table};

use crate::{Chunk, IsleError, LuaErrorKind};

mod lru;

use lru::{Entry, Lru};

/// Source bytes a cache holds at most (an eighth of the memory limit, if
/// that is lower). The compiled code an entry pins takes Lua memory of the
/// same order as its source.
const MAX_BYTES: usize = 1 << 20;

/// Compiles `code` as `eval` runs it: as an expression if it parses as one
/// (as Lua's REPL does), else as a block; named `name` (as Lua takes it,
/// with its `@` or `=`). Either way the chunk's arguments are its `...`.
///
/// # Errors
/// Whatever Lua says about the source (a syntax error, or its parser running
/// out of C stack on deeply nested source) is of kind `Syntax`; running out
/// of memory stays `MemoryLimit`.
fn compile(lua: &Lua, env: Option<&Table>, name: &str, code: &str) -> Result<Function, IsleError> {
    let compile = |source: &str| {
        let chunk = lua
            .load(source)
            .set_name(name)
            .set_mode(mlua::chunk::ChunkMode::Text);
        match env {
            Some(env) => chunk.set_environment(env.clone()),
            None => chunk,
        }
        .into_function()
    };
    // LuaJIT tail-calls C functions too, so `return error('x')` would lose
    // the caller's position ("eval:1:"): there the expression is an
    // argument of an identity function instead, keeping all its values (a
    // `...` in it is still the chunk's own: it is not inside the function).
    #[cfg(feature = "luajit")]
    let expression = format!("return (function(...) return ... end)({code}\n)");
    #[cfg(not(feature = "luajit"))]
    let expression = format!("return {code}");
    match compile(&expression) {
        Ok(f) => Ok(f),
        Err(_) => compile(code).map_err(compile_error),
    }
}

fn compile_error(e: mlua::Error) -> IsleError {
    match IsleError::from_lua(&e) {
        IsleError::Lua(l) => IsleError::Lua(l.with_kind(LuaErrorKind::Syntax)),
        other => other,
    }
}

/// One VM's compiled `eval` chunks, least recently used evicted first.
pub(crate) struct ChunkCache {
    lru: RefCell<Lru>,
    hasher: RandomState,
    /// Entries kept at most; 0 disables the cache.
    max_entries: usize,
    /// Total source bytes kept at most.
    max_bytes: usize,
    /// Longest source cached: a quarter of `max_bytes`, so that one source
    /// never empties the whole cache.
    max_source: usize,
}

impl ChunkCache {
    /// A cache of at most `entries` chunks (0: none) for a VM limited to
    /// `memory_limit` bytes.
    pub(super) fn new(entries: usize, memory_limit: Option<usize>) -> Self {
        let max_bytes = memory_limit.map_or(MAX_BYTES, |limit| (limit / 8).min(MAX_BYTES));
        ChunkCache {
            lru: RefCell::new(Lru::default()),
            hasher: RandomState::new(),
            max_entries: entries,
            max_bytes,
            max_source: max_bytes / 4,
        }
    }

    /// The compiled function of `chunk` running in `env` (the globals when
    /// `None`): the cached one, or a fresh compile, cached if it succeeds.
    ///
    /// # Errors
    /// As for `compile`. Errors are not cached.
    pub(crate) fn load(
        &self,
        lua: &Lua,
        env: Option<&Table>,
        chunk: &Chunk,
    ) -> Result<Function, IsleError> {
        let (code, name) = (chunk.source(), chunk.lua_name());
        if self.max_entries == 0 || code.len() > self.max_source || code.contains("_ENV") {
            return compile(lua, env, name, code);
        }
        let env_id = env.map_or(0, |t| t.to_pointer() as usize);
        // One hash per request, shared by the lookup and the insert.
        let hash = self.hasher.hash_one((env_id, chunk.given_name(), code));
        let cached = self.lru.borrow_mut().get(hash, env_id, chunk);
        if let Some(function) = cached {
            reset_env(lua, env, &function);
            return Ok(function);
        }
        let function = compile(lua, env, name, code)?;
        let entry = Entry {
            hash,
            env_id,
            _env: env.cloned(),
            chunk: chunk.clone(),
            function: function.clone(),
        };
        self.lru
            .borrow_mut()
            .insert(entry, self.max_entries, self.max_bytes);
        Ok(function)
    }

    /// Drops the chunks compiled for `env` (a session's table that is going
    /// away: the entries would keep it alive).
    pub(crate) fn forget_env(&self, env: &Table) {
        let env_id = env.to_pointer() as usize;
        self.lru.borrow_mut().remove_where(|e| e.env_id == env_id);
    }

    /// Drops every entry (the VM ran out of memory: give the room back).
    pub(super) fn clear(&self) {
        *self.lru.borrow_mut() = Lru::default();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lru.borrow().len()
    }
}

/// Puts back the environment a function was compiled with, where Lua code
/// can change it (`setfenv`).
#[cfg(any(feature = "lua51", feature = "luajit", feature = "luau"))]
fn reset_env(lua: &Lua, env: Option<&Table>, function: &Function) {
    let want = env.cloned().unwrap_or_else(|| lua.globals());
    if function.environment().as_ref() != Some(&want) {
        let _ = function.set_environment(want);
    }
}

/// With `_ENV` (Lua 5.2+), sources that could change it are not cached.
#[cfg(not(any(feature = "lua51", feature = "luajit", feature = "luau")))]
fn reset_env(_: &Lua, _: Option<&Table>, _: &Function) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(source: &str) -> Chunk {
        Chunk::new(source)
    }

    fn same(a: &Function, b: &Function) -> bool {
        a.to_pointer() == b.to_pointer()
    }

    #[test]
    fn a_second_load_reuses_the_compiled_function() {
        let lua = Lua::new();
        let cache = ChunkCache::new(4, None);
        let a = cache
            .load(&lua, None, &c("local t = {} return #t"))
            .unwrap();
        let b = cache
            .load(&lua, None, &c("local t = {} return #t"))
            .unwrap();
        assert!(same(&a, &b));
        let two = cache.load(&lua, None, &c("1 + 1")).unwrap();
        assert!(same(&two, &cache.load(&lua, None, &c("1 + 1")).unwrap()));
        assert_eq!(two.call::<i64>(()).unwrap(), 2);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn each_environment_has_its_own_entry() {
        let lua = Lua::new();
        let cache = ChunkCache::new(4, None);
        let env = lua.create_table().unwrap();
        let plain = cache.load(&lua, None, &c("return x")).unwrap();
        let scoped = cache.load(&lua, Some(&env), &c("return x")).unwrap();
        assert!(!same(&plain, &scoped));
        assert!(same(
            &scoped,
            &cache.load(&lua, Some(&env), &c("return x")).unwrap()
        ));
        cache.forget_env(&env);
        assert_eq!(cache.len(), 1);
        assert!(same(
            &plain,
            &cache.load(&lua, None, &c("return x")).unwrap()
        ));
    }

    #[test]
    fn each_name_has_its_own_entry_and_arguments_are_dots() {
        let lua = Lua::new();
        let cache = ChunkCache::new(4, None);
        let src = "... * 2";
        let plain = cache.load(&lua, None, &c(src)).unwrap();
        let named = cache.load(&lua, None, &c(src).name("@f.lua")).unwrap();
        assert!(!same(&plain, &named));
        assert!(same(
            &named,
            &cache.load(&lua, None, &c(src).name("@f.lua")).unwrap()
        ));
        assert_eq!(plain.call::<i64>(21).unwrap(), 42);
        assert_eq!(named.call::<i64>(4).unwrap(), 8);
        let err = cache
            .load(&lua, None, &c("local x = ...\nerror('no')").name("@f.lua"))
            .unwrap()
            .call::<()>(())
            .unwrap_err();
        assert!(err.to_string().contains("f.lua:2: no"), "{err}");
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let lua = Lua::new();
        let cache = ChunkCache::new(2, None);
        let a = cache.load(&lua, None, &c("'a'")).unwrap();
        let b = cache.load(&lua, None, &c("'b'")).unwrap();
        cache.load(&lua, None, &c("'a'")).unwrap(); // a is now newer than b
        cache.load(&lua, None, &c("'c'")).unwrap(); // evicts b
        assert_eq!(cache.len(), 2);
        assert!(same(&a, &cache.load(&lua, None, &c("'a'")).unwrap()));
        assert!(!same(&b, &cache.load(&lua, None, &c("'b'")).unwrap()));
    }

    #[test]
    fn bounds_on_bytes_and_source_size_hold() {
        let lua = Lua::new();
        // 64 KiB limit: 8 KiB of source in all, 2 KiB per source.
        let cache = ChunkCache::new(100, Some(64 << 10));
        let long = format!("return '{}'", "x".repeat(3000));
        let a = cache.load(&lua, None, &c(&long)).unwrap();
        assert!(!same(&a, &cache.load(&lua, None, &c(&long)).unwrap()));
        assert_eq!(cache.len(), 0);
        for i in 0..10 {
            let src = format!("return '{}'", i.to_string().repeat(1500));
            cache.load(&lua, None, &c(&src)).unwrap();
        }
        assert_eq!(cache.len(), 5);
        assert!(cache.lru.borrow().bytes() <= 8 << 10);
    }

    #[test]
    fn removal_keeps_the_list_consistent() {
        let lua = Lua::new();
        let cache = ChunkCache::new(8, None);
        let envs: Vec<Table> = (0..3).map(|_| lua.create_table().unwrap()).collect();
        for round in 0..3 {
            for (k, env) in envs.iter().enumerate() {
                for j in 0..2 {
                    let src = format!("return {k} * 10 + {j}");
                    let f = cache.load(&lua, Some(env), &c(&src)).unwrap();
                    assert_eq!(f.call::<i64>(()).unwrap(), k as i64 * 10 + j);
                }
            }
            cache.forget_env(&envs[round]);
            cache.lru.borrow().assert_consistent();
        }
    }

    #[cfg(any(feature = "lua51", feature = "luajit", feature = "luau"))]
    #[test]
    fn a_chunk_that_changes_its_environment_gets_it_back() {
        let lua = Lua::new();
        let cache = ChunkCache::new(4, None);
        let src = "if marker then return 'stale' end \
                   setfenv(1, setmetatable({ marker = true }, { __index = _G })) \
                   return 'fresh'";
        for _ in 0..3 {
            let f = cache.load(&lua, None, &c(src)).unwrap();
            assert_eq!(f.call::<String>(()).unwrap(), "fresh");
        }
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn sources_naming_env_and_errors_are_not_cached() {
        let lua = Lua::new();
        let cache = ChunkCache::new(4, None);
        cache
            .load(&lua, None, &c("local e = _ENV return 1"))
            .unwrap();
        assert!(cache.load(&lua, None, &c("x = = 1")).is_err());
        assert_eq!(cache.len(), 0);
        let off = ChunkCache::new(0, None);
        off.load(&lua, None, &c("1")).unwrap();
        assert_eq!(off.len(), 0);
    }
}
