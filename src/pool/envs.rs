//! The VM a worker serves with, and the session environments living in it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use mlua::{Function, Table};

use super::session::Binding;
use crate::vm::precompiled::Precompiled;
use crate::vm::{Job, Vm};
use crate::IsleError;

/// One session's environment on this VM.
pub(super) struct Env {
    pub(super) binding: Arc<Binding>,
    pub(super) table: Table,
    /// A request of this session is suspended (the `async` feature): the
    /// session's next requests, and its close, wait here, in order.
    pub(super) busy: bool,
    pub(super) waiting: VecDeque<Waiting>,
}

/// What waits behind a session's suspended request.
pub(super) enum Waiting {
    Job(Job),
    Close,
}

/// The VM and what lives in it: replaced as a whole when recycled.
pub(super) struct WorkerVm {
    pub(super) vm: Vm,
    /// Session environments by binding id.
    pub(super) envs: HashMap<u64, Env>,
    pub(super) make_env: mlua::Result<Function>,
    /// Requests run since this VM started.
    pub(super) served: u64,
}

impl WorkerVm {
    pub(super) fn new(vm: Vm) -> WorkerVm {
        let make_env = env_factory(&vm);
        WorkerVm {
            vm,
            envs: HashMap::new(),
            make_env,
            served: 0,
        }
    }

    /// The environment of `binding`, created on its first request.
    pub(super) fn env(&mut self, binding: &Arc<Binding>) -> Result<Table, IsleError> {
        if let Some(env) = self.envs.get(&binding.id) {
            return Ok(env.table.clone());
        }
        let table = new_env(&self.make_env)?;
        self.envs.insert(
            binding.id,
            Env {
                binding: binding.clone(),
                table: table.clone(),
                busy: false,
                waiting: VecDeque::new(),
            },
        );
        Ok(table)
    }
}

/// Builds, once per VM, the Lua function that makes session environments.
///
/// A session's environment is an empty table (what the session writes)
/// whose metatable reads through a small per-session table to the shared
/// globals. The per-session table makes `_G` name the environment itself
/// (so `_G.x = v` stays in the session) and gives the session a `load`
/// whose chunks run in the environment unless given another one. The
/// metatable is hidden (`__metatable = false`), so `getmetatable(_G)` does
/// not lead to the shared globals.
fn env_factory(vm: &Vm) -> mlua::Result<Function> {
    let globals = vm.lua().globals();
    // Reads fall back to the shared globals; in the sandbox, to the globals
    // as init left them, so that unkeyed work cannot rebind what sessions
    // see.
    let shared = crate::sandbox::session_globals(vm.lua())?.unwrap_or_else(|| globals.clone());
    let load: Option<Function> = globals.get("load")?;
    let loadstring: Option<Function> = globals.get("loadstring")?;
    let setfenv: Option<Function> = match crate::sandbox::setfenv(vm.lua())? {
        Some(own) => Some(own),
        None => globals.get("setfenv")?,
    };
    // Where functions carry their environment (`setfenv`: 5.1, LuaJIT,
    // Luau), `load` has no environment argument everywhere (5.1), and
    // `loadstring` none at all: the loaded function gets it set instead.
    SESSION_ENV
        .load(vm.lua())?
        .call((shared, load, loadstring, setfenv))
}

static SESSION_ENV: Precompiled =
    Precompiled::new("=mlua-isle session", include_str!("session_env.lua"));

/// A fresh session environment.
fn new_env(make: &mlua::Result<Function>) -> Result<Table, IsleError> {
    make.as_ref()
        .map_err(Clone::clone)
        .and_then(|f| f.call::<Table>(()))
        .map_err(|e| IsleError::from_lua(&e))
}
