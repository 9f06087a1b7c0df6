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
    /// `None` until then.
    pub(super) kept: Option<Kept>,
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

    /// Gives back the room a burst of sessions left unused in `envs`
    /// (see [`oversized`](super::session::oversized)).
    pub(super) fn shrink_envs(&mut self) {
        if super::session::oversized(self.envs.len(), self.envs.capacity()) {
            self.envs.shrink_to(self.envs.len() * 2);
        }
    }

    /// `binding`'s record on this VM, made on its first request (without
    /// its environment: the request makes that, see `SessionEnv`).
    pub(super) fn env(&mut self, binding: &Arc<Binding>) -> &mut Env {
        record(&mut self.envs, binding)
    }

    /// What a request of `binding`'s session is lent of its environment
    /// (see [`Kept`]): what it does not get, it opens itself
    /// ([`open_env`](Self::open_env)).
    pub(super) fn lend_env(&mut self, binding: &Arc<Binding>) -> Option<Table> {
        Kept::lend(&mut record(&mut self.envs, binding).kept)
    }

    /// A request of `binding`'s session has run: the session keeps the
    /// environment the request `made`, or takes back what it was `lent`,
    /// and is busy while the request is `suspended`.
    pub(super) fn session_ran(
        &mut self,
        binding: &Arc<Binding>,
        lent: Option<Table>,
        made: Option<Kept>,
        suspended: bool,
    ) {
        let record = record(&mut self.envs, binding);
        match made {
            Some(kept) => record.kept = Some(kept),
            None => Kept::give_back(&mut record.kept, lent),
        }
        record.busy = suspended;
    }

    /// The environment of session `id`, for its request, which calls this
    /// once it has started (see `SessionEnv`) when it was lent none: the
    /// one kept in the registry (Lua 5.1, LuaJIT), or on the session's
    /// first request a new one, made and kept (`Some`).
    pub(super) fn open_env(&self, id: u64, lua: &Lua) -> Result<(Table, Option<Kept>), IsleError> {
        let opened = match self.envs.get(&id).and_then(|env| env.kept.as_ref()) {
            Some(kept) => kept.table(lua).map(|table| (table, None)),
            None => {
                let factory = self.env_factory.borrow_mut().function(lua);
                factory
                    .and_then(|f| f.call::<Table>(()))
                    .and_then(|table| Kept::new(lua, &table).map(|kept| (table, Some(kept))))
            }
        };
        opened.map_err(|e| match e {
            // Each open session holds one of mlua's references, which live
            // on a Lua stack: a million slots on 5.2+ (on 5.1 and LuaJIT,
            // sessions are kept in the registry: see `Kept`).
            mlua::Error::StackError => IsleError::from_lua(&mlua::Error::runtime(
                "this VM holds as many references to Lua values as its Lua stack \
                 allows: close idle sessions (close_session, session_idle_timeout), \
                 cache fewer chunks (chunk_cache) or add workers",
            )),
            e => crate::interrupt::request_error(lua, &e),
        })
    }
}

fn record<'a>(envs: &'a mut ById<Env>, binding: &Arc<Binding>) -> &'a mut Env {
    envs.entry(binding.id).or_insert_with(|| Env {
        binding: binding.clone(),
        kept: None,
        busy: false,
        waiting: Queue::default(),
    })
}

/// A session's environment between its requests.
///
/// One of mlua's references, lent to each request (taken, and given back
/// after: no Lua work). On Lua 5.1 and LuaJIT mlua keeps its references in
/// the slots of one Lua stack, which stops at 8,000: there an environment
/// is an entry in the registry instead, and each request gets a reference
/// of its own for its run, so open sessions are not bounded by that stack.
/// (Those entries are removed only as sessions close: when the VM closes,
/// mlua's last collection still finds them, unlike the references, which
/// `WorkerVm` drops first. Neither backend's collector has the ephemerons
/// that make a collection slow, see `Vm`'s `Drop`.)
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
pub(super) struct Kept(Table);

/// See the other `Kept`.
#[cfg(any(feature = "lua51", feature = "luajit"))]
pub(super) struct Kept(mlua::RegistryKey);

impl Kept {
    /// Keeps `table`: called inside the request that made it, since on
    /// Lua 5.1 and LuaJIT this writes the registry.
    fn new(lua: &Lua, table: &Table) -> mlua::Result<Kept> {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        return {
            let _ = lua;
            Ok(Kept(table.clone()))
        };
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        lua.create_registry_value(table).map(Kept)
    }

    /// The environment, lent to a request of the session until it is
    /// given back ([`give_back`](Self::give_back)); on Lua 5.1 and LuaJIT
    /// none: the request gets it itself ([`table`](Self::table)), since
    /// that takes a slot of mlua's stack, which may be full.
    fn lend(kept: &mut Option<Kept>) -> Option<Table> {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        return kept.take().map(|k| k.0);
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        {
            let _ = kept;
            None
        }
    }

    /// The environment.
    fn table(&self, lua: &Lua) -> mlua::Result<Table> {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        return {
            let _ = lua;
            Ok(self.0.clone())
        };
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        lua.registry_value(&self.0)
    }

    /// Takes back what [`lend`](Self::lend) lent (`None`: nothing was).
    fn give_back(kept: &mut Option<Kept>, lent: Option<Table>) {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        if let Some(table) = lent {
            *kept = Some(Kept(table));
        }
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        let _ = (kept, lent);
    }

    /// The session closed: its cached chunks go, and on Lua 5.1 and
    /// LuaJIT its registry entry (the environment is garbage then, as
    /// elsewhere once its reference is dropped).
    pub(super) fn forget(self, vm: &Vm) {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        vm.chunks().forget_env(&self.0);
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        {
            if let Ok(table) = self.table(vm.lua()) {
                vm.chunks().forget_env(&table);
            }
            let _ = vm.lua().remove_registry_value(self.0);
        }
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
    /// The functions the factory calls, as the VM started with them: it is
    /// built later, when unkeyed work may have rebound the globals.
    setmetatable: Function,
    select: Function,
    error: Function,
    type_of: Function,
    /// The sandbox's `set_session_finder` (see `sandbox::session_finder`).
    finder: Option<Function>,
}

impl EnvFactory {
    /// The factory, built now if it was not (a failure is returned, and
    /// the next session's request tries again).
    fn function(&mut self, lua: &Lua) -> mlua::Result<Function> {
        let built = match self {
            EnvFactory::Built(f) => return Ok(f.clone()),
            EnvFactory::Parts(Err(e)) => return Err(e.clone()),
            EnvFactory::Parts(Ok(p)) => {
                let strict = p.is_copy;
                let caller_env =
                    lua.create_function(move |lua, (meta, named): (Table, Option<bool>)| {
                        Ok(caller_env(lua, &meta, strict, named.unwrap_or(false)))
                    })?;
                let in_session = lua.create_function(|_, ()| Ok(crate::vm::scope::in_session()))?;
                // Whether a value is a table with that metatable (read raw:
                // a session environment's hides it).
                let has_metatable = lua.create_function(|_, (v, meta): (mlua::Value, Table)| {
                    Ok(matches!(v, mlua::Value::Table(t) if t.metatable().as_ref() == Some(&meta)))
                })?;
                // It reads no global (what it calls comes in as arguments),
                // so its environment only marks its functions as shared:
                // the sandbox's `getfenv` does not hand the environment of
                // a function of the shared globals out, nor `setfenv`
                // change it (the session `load` is every session's).
                let chunk = SESSION_ENV.load(lua)?;
                chunk.call::<Function>((
                    p.shared.clone(),
                    p.is_copy,
                    p.load.clone(),
                    p.loadstring.clone(),
                    p.setfenv.clone(),
                    caller_env,
                    p.select.clone(),
                    p.setmetatable.clone(),
                    p.error.clone(),
                    p.type_of.clone(),
                    p.finder.clone(),
                    in_session,
                    has_metatable,
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
        setmetatable: globals.get("setmetatable")?,
        select: globals.get("select")?,
        error: globals.get("error")?,
        type_of: globals.get("type")?,
        finder: crate::sandbox::session_finder(vm.lua())?,
    })
}

/// The environment of the code calling `load`, and whether it is a
/// session's (has the metatable `meta`, which Lua code cannot reach).
///
/// In the sandbox (`strict`), that of the nearest Lua function on the
/// running Lua thread's call stack that is not the crate's own (C
/// functions and the crate's chunks, named "mlua-isle...", are passed
/// over); `(nil, false)` when there is none (`load` itself is a
/// coroutine's body). The nearest caller, not a session function deeper
/// down: a function of the shared globals (one `init` defined, or one
/// unkeyed work rebound) that a session's request runs must not get that
/// session's environment, nor load into the shared globals.
///
/// Outside the sandbox, where tenants are not kept apart from hostile code
/// anyway, the nearest function of a session, however deep (so a function
/// of `init`'s that calls a session's `load` for it loads into the
/// session); `None` if there is none.
fn caller_env(lua: &Lua, meta: &Table, strict: bool, named: bool) -> (Option<Table>, bool, bool) {
    /// One level of the call stack, as the search sees it.
    enum Level {
        /// The crate's, or a C function's: passed over.
        Passed {
            tail: bool,
            /// Called by a metamethod or a generic `for` (not a call the
            /// Lua frame below wrote).
            indirect: bool,
        },
        /// The caller is not known past here: Lua 5.1's mark of a frame a
        /// tail call replaced, or the crate's `xpcall` message handler
        /// (what a handler calls runs above whoever raised the error).
        Replaced,
        Lua(Function),
    }
    let levels = (1..).map_while(|level| {
        lua.inspect_stack(level, |d| {
            let source = d.source();
            // Exactly the prefix the sandbox refuses in tenants' chunk names.
            let ours = source
                .source
                .as_deref()
                .is_some_and(|s| s.starts_with(CRATE_CHUNKS));
            #[cfg(any(
                feature = "lua52",
                feature = "lua53",
                feature = "lua54",
                feature = "lua55"
            ))]
            let tail = d.is_tail_call();
            #[cfg(not(any(
                feature = "lua52",
                feature = "lua53",
                feature = "lua54",
                feature = "lua55"
            )))]
            let tail = false;
            #[cfg(any(
                feature = "lua52",
                feature = "lua53",
                feature = "lua54",
                feature = "lua55"
            ))]
            if source.what == "C" && crate::interrupt::alarm::is_message_handler(lua, &d.function())
            {
                // xpcall's message handler runs at the error's level: what
                // it calls has no caller of its own.
                return Level::Replaced;
            }
            // The message handler of the crate's `xpcall` in Lua (5.1,
            // LuaJIT, Luau): the same barrier.
            if source.source.as_deref() == Some(MESSAGE_HANDLER) {
                return Level::Replaced;
            }
            match source.what {
                "tail" => Level::Replaced,
                "Lua" | "main" if !ours => Level::Lua(d.function()),
                _ => {
                    let what = d.names().name_what;
                    // Lua 5.1 and LuaJIT name no metamethod: a call their
                    // code did not write has no name.
                    // Acted on for `getfenv`/`setfenv` only (`named`):
                    // `(loadstring or load)(s)` has no name either.
                    #[cfg(any(feature = "lua51", feature = "luajit"))]
                    let unnamed = named && what.is_none();
                    #[cfg(not(any(feature = "lua51", feature = "luajit")))]
                    let unnamed = {
                        let _ = named;
                        false
                    };
                    let indirect = unnamed
                        || matches!(what, Some("for iterator" | "metamethod" | "hook" | "__gc"));
                    Level::Passed { tail, indirect }
                }
            }
        })
    });
    let is_session = |env: &Table| env.metatable().as_ref() == Some(meta);
    if !strict {
        // Outside the sandbox: the nearest function of any session.
        let env = levels
            .filter_map(|l| match l {
                Level::Lua(f) => f.environment(),
                _ => None,
            })
            .find(is_session);
        return (env, true, false);
    }
    let mut indirect_call = false;
    for level in levels {
        match level {
            // The Lua frame did not call what it called: a metamethod or
            // an iterator it was handed.
            Level::Lua(_) if indirect_call => return (None, false, true),
            Level::Lua(f) => {
                let env = f.environment();
                let session = env.as_ref().is_some_and(is_session);
                return (env, session, false);
            }
            // A tail call replaced the caller's frame (`return load(s)`
            // in a function of the shared globals would otherwise load for
            // whoever called that function): the caller is not known.
            Level::Replaced | Level::Passed { tail: true, .. } => return (None, false, false),
            Level::Passed { indirect, .. } => indirect_call = indirect,
        }
    }
    (None, false, false)
}

/// The chunk names of the crate's own Lua code, which the sandbox does not
/// let tenants' chunks take (`sandbox.lua`, `crate_named`).
const CRATE_CHUNKS: &str = "=mlua-isle";
/// The chunk of the message handler of the crate's `xpcall` written in Lua
/// (`interrupt/catchers.lua`).
const MESSAGE_HANDLER: &str = "=mlua-isle handler";

static SESSION_ENV: Precompiled =
    Precompiled::new("=mlua-isle session", include_str!("session_env.lua"));
