//! The VM a worker serves with, and the session environments living in it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Arc;

use mlua::{Function, Lua, Table};

use super::session::{Binding, ById};
use crate::vm::precompiled::Precompiled;
use crate::vm::{Job, Vm};
use crate::IsleError;

/// One session's environment on this VM (one per open session: kept small).
pub(super) struct Env {
    pub(super) binding: Arc<Binding>,
    /// Made by the session's first request, inside it (see `SessionEnv`):
    /// `None` until then, and while a request of the session runs (it has
    /// the table meanwhile).
    pub(super) table: Option<Table>,
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
    /// Session environments by binding id. Before `vm`: dropped first, so
    /// the collection mlua runs as the VM closes finds them unreachable
    /// (see `Vm`'s `Drop`).
    pub(super) envs: ById<Env>,
    env_factory: RefCell<EnvFactory>,
    pub(super) vm: Vm,
    /// Requests run since this VM started.
    pub(super) served: Cell<u64>,
}

impl WorkerVm {
    pub(super) fn new(vm: Vm) -> WorkerVm {
        let env_factory = RefCell::new(EnvFactory::Parts(env_parts(&vm)));
        WorkerVm {
            vm,
            envs: ById::default(),
            env_factory,
            served: Cell::new(0),
        }
    }

    /// `binding`'s record on this VM, made on its first request (without
    /// its environment: the request makes that, see `SessionEnv`).
    pub(super) fn env(&mut self, binding: &Arc<Binding>) -> &mut Env {
        self.envs.entry(binding.id).or_insert_with(|| Env {
            binding: binding.clone(),
            table: None,
            busy: false,
            waiting: Queue::default(),
        })
    }

    /// Makes a session's environment, for its first request (which calls
    /// this once it has started: see `SessionEnv`).
    pub(super) fn make_env(&self, lua: &Lua) -> Result<Table, IsleError> {
        let factory = self.env_factory.borrow_mut().function(lua);
        factory
            .and_then(|f| f.call::<Table>(()))
            .map_err(|e| match e {
                // Each open session holds one of mlua's references, which live
                // on a Lua stack: 8,000 slots on Lua 5.1 and LuaJIT, a million
                // on 5.2+.
                mlua::Error::StackError => IsleError::from_lua(&mlua::Error::runtime(
                    "this VM holds as many open sessions as its Lua stack allows \
                 (about 8,000 on Lua 5.1 and LuaJIT): close idle \
                 sessions (close_session, session_idle_timeout) or add workers",
                )),
                e => crate::interrupt::request_error(lua, &e),
            })
    }
}

/// The Lua function that makes a VM's session environments
/// (`session_env.lua`), built on the first session's request: a pool whose
/// VMs serve no session (or that recycles them often) does not pay for it
/// at every VM start.
///
/// A session's environment is a table holding `_G` (itself, so `_G.x = v`
/// stays in the session) and what the session writes. Its metatable, one
/// for the VM and hidden (`__metatable = false`, so `getmetatable(_G)` does
/// not lead to the shared globals), reads through to the VM's session
/// `load` (whose chunks run in the calling session's environment unless
/// given another) and to the shared globals.
enum EnvFactory {
    /// What it closes over, taken when the VM started.
    Parts(mlua::Result<EnvParts>),
    Built(Function),
}

/// What session environments read through, taken when the VM starts
/// (after `init` and the sandbox), so that what unkeyed work later does to
/// the globals does not change it.
struct EnvParts {
    /// Reads fall back to the shared globals; in the sandbox, to the
    /// globals as init left them (a copy only sessions read: `is_copy`),
    /// so that unkeyed work cannot rebind what sessions see.
    shared: Table,
    is_copy: bool,
    load: Option<Function>,
    loadstring: Option<Function>,
    /// Where functions carry their environment (`setfenv`: 5.1, LuaJIT,
    /// Luau), `load` has no environment argument everywhere (5.1), and
    /// `loadstring` none at all: the loaded function gets it set instead.
    setfenv: Option<Function>,
}

impl EnvFactory {
    /// The factory, built now if it was not (a failure is returned, and
    /// the next session's request tries again).
    fn function(&mut self, lua: &Lua) -> mlua::Result<Function> {
        let built = match self {
            EnvFactory::Built(f) => return Ok(f.clone()),
            EnvFactory::Parts(Err(e)) => return Err(e.clone()),
            EnvFactory::Parts(Ok(p)) => {
                let caller_env =
                    lua.create_function(|lua, meta: Table| Ok(caller_env(lua, &meta)))?;
                SESSION_ENV.load(lua)?.call::<Function>((
                    p.shared.clone(),
                    p.is_copy,
                    p.load.clone(),
                    p.loadstring.clone(),
                    p.setfenv.clone(),
                    caller_env,
                ))?
            }
        };
        *self = EnvFactory::Built(built.clone());
        Ok(built)
    }
}

fn env_parts(vm: &Vm) -> mlua::Result<EnvParts> {
    let globals = vm.lua().globals();
    let copy = crate::sandbox::session_globals(vm.lua())?;
    Ok(EnvParts {
        is_copy: copy.is_some(),
        shared: copy.unwrap_or_else(|| globals.clone()),
        load: globals.get("load")?,
        loadstring: globals.get("loadstring")?,
        setfenv: match crate::sandbox::setfenv(vm.lua())? {
            Some(own) => Some(own),
            None => globals.get("setfenv")?,
        },
    })
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

static SESSION_ENV: Precompiled =
    Precompiled::new("=mlua-isle session", include_str!("session_env.lua"));
