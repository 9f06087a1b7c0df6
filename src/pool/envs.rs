//! The VM a worker serves with, and the session environments living in it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use mlua::{Function, Lua, Table};

use super::session::Binding;
use crate::vm::{Job, Vm};
use crate::IsleError;

/// One session's environment on this VM (one per open session: kept small).
pub(super) struct Env {
    pub(super) binding: Arc<Binding>,
    pub(super) table: Table,
    /// A request of this session is suspended (the `async` feature): the
    /// session's next requests, and its close, wait here, in order.
    pub(super) busy: bool,
    pub(super) waiting: Queue,
}

/// What waits behind a session's suspended request, in order: a pointer
/// until something does (rare; `VecDeque` inline would be 32 bytes in
/// every session's record).
#[derive(Default)]
#[allow(clippy::box_collection)] // the point: 8 bytes inline, not 32
pub(super) struct Queue(Option<Box<VecDeque<Waiting>>>);

impl Queue {
    pub(super) fn push_back(&mut self, w: Waiting) {
        self.0.get_or_insert_default().push_back(w);
    }

    pub(super) fn pop_front(&mut self) -> Option<Waiting> {
        let queue = self.0.as_mut()?;
        let w = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        w
    }
}

impl IntoIterator for Queue {
    type Item = Waiting;
    type IntoIter = std::iter::Flatten<std::option::IntoIter<VecDeque<Waiting>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.map(|q| *q).into_iter().flatten()
    }
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
                waiting: Queue::default(),
            },
        );
        Ok(table)
    }
}

/// Builds, once per VM, the Lua function that makes session environments
/// (`session_env.lua`).
///
/// A session's environment is a table holding `_G` (itself, so `_G.x = v`
/// stays in the session) and what the session writes. Its metatable, one
/// for the VM and hidden (`__metatable = false`, so `getmetatable(_G)` does
/// not lead to the shared globals), reads through to the VM's session
/// `load` (whose chunks run in the calling session's environment unless
/// given another) and to the shared globals.
fn env_factory(vm: &Vm) -> mlua::Result<Function> {
    let lua = vm.lua();
    let globals = lua.globals();
    // Reads fall back to the shared globals; in the sandbox, to the globals
    // as init left them (a copy only sessions read), so that unkeyed work
    // cannot rebind what sessions see.
    let copy = crate::sandbox::session_globals(lua)?;
    let is_copy = copy.is_some();
    let shared = copy.unwrap_or_else(|| globals.clone());
    let load: Option<Function> = globals.get("load")?;
    let loadstring: Option<Function> = globals.get("loadstring")?;
    let setfenv: Option<Function> = match crate::sandbox::setfenv(lua)? {
        Some(own) => Some(own),
        None => globals.get("setfenv")?,
    };
    let caller_env = lua.create_function(|lua, meta: Table| Ok(caller_env(lua, &meta)))?;
    lua.load(include_str!("session_env.lua"))
        .set_name("=mlua-isle session")
        .call((shared, is_copy, load, loadstring, setfenv, caller_env))
}

/// The environment of the nearest function on the call stack whose
/// environment is a session's (has the metatable `meta`, which Lua code
/// cannot reach).
fn caller_env(lua: &Lua, meta: &Table) -> Option<Table> {
    (1..)
        .map_while(|level| lua.inspect_stack(level, |d| d.function()))
        .filter_map(|f| f.environment())
        .find(|env| env.metatable().as_ref() == Some(meta))
}

/// A fresh session environment.
fn new_env(make: &mlua::Result<Function>) -> Result<Table, IsleError> {
    make.as_ref()
        .map_err(Clone::clone)
        .and_then(|f| f.call::<Table>(()))
        .map_err(|e| IsleError::from_lua(&e))
}
