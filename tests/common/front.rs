//! One test body against every front end: an [`Isle`], an [`IslePool`]
//! taking unkeyed work, and a pool [`Session`] share their request methods
//! (`eval`, `call`, `exec` and their `spawn_*` forms), and a request behaves
//! the same whichever one it went through.
//!
//! Each pool has one worker, so on every front "a request submitted later
//! has answered" means the earlier ones have finished (requests run one at
//! a time, in submission order, on one VM).
//!
//! ```ignore
//! fronts().init(|lua| lua.globals().set("x", 1)).each(|front| {
//!     assert_eq!(front.eval::<i64>("x + 1"), Ok(2), "{front}");
//! });
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mlua_isle::mlua::{self, FromLuaMulti, IntoLuaMulti, Lua};
use mlua_isle::{Chunk, Isle, IsleError, IslePool, Session, Task};

type Init = Arc<dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync>;

/// Which front end a [`Front`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Isle,
    Pool,
    Session,
}

pub const KINDS: [Kind; 3] = [Kind::Isle, Kind::Pool, Kind::Session];

/// Runs `body` once for each kind, printing the kind first (so a failure
/// shows which it was): for tests that build each front themselves.
pub fn each_kind(mut body: impl FnMut(Kind)) {
    for kind in KINDS {
        eprintln!("--- on the {kind:?} front");
        body(kind);
    }
}

/// How to build the fronts of a test; see [`fronts`].
#[derive(Clone, Default)]
pub struct Fronts {
    init: Option<Init>,
    default_timeout: Option<Duration>,
    stop_grace: Option<Duration>,
    memory_limit: Option<usize>,
    max_instructions: Option<u64>,
    name: Option<String>,
}

/// Fronts with no init and default options.
pub fn fronts() -> Fronts {
    Fronts::default()
}

impl Fronts {
    /// Runs on every VM before it serves (on a VM replacing a wedged one
    /// too).
    pub fn init(mut self, init: impl Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static) -> Self {
        self.init = Some(Arc::new(init));
        self
    }

    pub fn default_timeout(mut self, limit: Duration) -> Self {
        self.default_timeout = Some(limit);
        self
    }

    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = Some(grace);
        self
    }

    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    pub fn max_instructions(mut self, n: u64) -> Self {
        self.max_instructions = Some(n);
        self
    }

    /// Names the threads: `PREFIXi` for the isle, `PREFIXp-0` and
    /// `PREFIXs-0` for the pools' workers (see [`Front::vm_thread`]). At
    /// most 5 bytes, so that `-deadline` still fits Linux's 15.
    pub fn name(mut self, prefix: &str) -> Self {
        assert!(prefix.len() <= 5, "thread name prefix {prefix:?} too long");
        self.name = Some(prefix.to_string());
        self
    }

    /// A fresh front of `kind`, with its own VM.
    pub fn build(&self, kind: Kind) -> Front {
        let name = self.name.as_ref().map(|p| {
            let suffix = match kind {
                Kind::Isle => 'i',
                Kind::Pool => 'p',
                Kind::Session => 's',
            };
            format!("{p}{suffix}")
        });
        let init = self.init.clone();
        let handle = match kind {
            Kind::Isle => {
                let mut b = Isle::builder();
                if let Some(d) = self.default_timeout {
                    b = b.default_timeout(d);
                }
                if let Some(g) = self.stop_grace {
                    b = b.stop_grace(g);
                }
                if let Some(n) = self.memory_limit {
                    b = b.memory_limit(n);
                }
                if let Some(n) = self.max_instructions {
                    b = b.max_instructions(n);
                }
                if let Some(n) = &name {
                    b = b.name(n.clone());
                }
                if let Some(init) = init {
                    b = b.init(move |lua| init(lua));
                }
                Handle::Isle(b.build().expect("the isle starts"))
            }
            Kind::Pool | Kind::Session => {
                let mut b = IslePool::builder().workers(1);
                if let Some(d) = self.default_timeout {
                    b = b.default_timeout(d);
                }
                if let Some(g) = self.stop_grace {
                    b = b.stop_grace(g);
                }
                if let Some(n) = self.memory_limit {
                    b = b.memory_limit(n);
                }
                if let Some(n) = self.max_instructions {
                    b = b.max_instructions(n);
                }
                if let Some(n) = &name {
                    b = b.name(n.clone());
                }
                if let Some(init) = init {
                    b = b.init(move |lua| init(lua));
                }
                let pool = b.build().expect("the pool starts");
                match kind {
                    Kind::Pool => Handle::Pool(pool),
                    _ => {
                        let session = pool.session("tenant");
                        Handle::Session(pool, session)
                    }
                }
            }
        };
        Front { kind, name, handle }
    }

    /// Runs `body` once on a fresh front of each kind, one after another.
    /// The kind is printed first, so a failure shows which front it was.
    pub fn each(&self, mut body: impl FnMut(Front)) {
        each_kind(|kind| body(self.build(kind)));
    }
}

/// An isle, a one-worker pool, or a session on one; see the module docs.
#[derive(Clone)]
pub struct Front {
    kind: Kind,
    name: Option<String>,
    handle: Handle,
}

#[derive(Clone)]
enum Handle {
    Isle(Isle),
    Pool(IslePool),
    Session(IslePool, Session),
}

impl fmt::Display for Front {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "on the {:?} front", self.kind)
    }
}

impl Front {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The pool behind a pool or session front.
    pub fn pool(&self) -> Option<&IslePool> {
        match &self.handle {
            Handle::Isle(_) => None,
            Handle::Pool(p) | Handle::Session(p, _) => Some(p),
        }
    }

    /// The name of the VM thread (see [`Fronts::name`]).
    pub fn vm_thread(&self) -> String {
        let name = self.name.as_ref().expect("fronts built without a name");
        match self.kind {
            Kind::Isle => name.clone(),
            Kind::Pool | Kind::Session => format!("{name}-0"),
        }
    }

    /// The name of the deadline thread, as Linux keeps it (15 bytes).
    pub fn deadline_thread(&self) -> String {
        let name = self.name.as_ref().expect("fronts built without a name");
        let mut full = format!("{name}-deadline");
        full.truncate(15);
        full
    }

    pub fn eval<T>(&self, code: impl Into<Chunk>) -> Result<T, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.eval(code),
            Handle::Pool(p) => p.eval(code),
            Handle::Session(_, s) => s.eval(code),
        }
    }

    pub fn spawn_eval<T>(&self, code: impl Into<Chunk>) -> Task<T>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.spawn_eval(code),
            Handle::Pool(p) => p.spawn_eval(code),
            Handle::Session(_, s) => s.spawn_eval(code),
        }
    }

    pub fn eval_with<T>(
        &self,
        code: impl Into<Chunk>,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Result<T, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.eval_with(code, args),
            Handle::Pool(p) => p.eval_with(code, args),
            Handle::Session(_, s) => s.eval_with(code, args),
        }
    }

    pub fn spawn_eval_with<T>(
        &self,
        code: impl Into<Chunk>,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Task<T>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.spawn_eval_with(code, args),
            Handle::Pool(p) => p.spawn_eval_with(code, args),
            Handle::Session(_, s) => s.spawn_eval_with(code, args),
        }
    }

    pub fn call<T>(
        &self,
        name: impl Into<String>,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Result<T, IsleError>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.call(name, args),
            Handle::Pool(p) => p.call(name, args),
            Handle::Session(_, s) => s.call(name, args),
        }
    }

    pub fn spawn_call<T>(
        &self,
        name: impl Into<String>,
        args: impl IntoLuaMulti + Send + 'static,
    ) -> Task<T>
    where
        T: FromLuaMulti + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.spawn_call(name, args),
            Handle::Pool(p) => p.spawn_call(name, args),
            Handle::Session(_, s) => s.spawn_call(name, args),
        }
    }

    /// `exec`; a session's closure is not shown its environment table.
    pub fn exec<T, F>(&self, f: F) -> Result<T, IsleError>
    where
        T: Send + 'static,
        F: FnOnce(&Lua) -> mlua::Result<T> + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.exec(f),
            Handle::Pool(p) => p.exec(f),
            Handle::Session(_, s) => s.exec(move |lua, _| f(lua)),
        }
    }

    /// `spawn_exec`; a session's closure is not shown its environment.
    pub fn spawn_exec<T, F>(&self, f: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Lua) -> mlua::Result<T> + Send + 'static,
    {
        match &self.handle {
            Handle::Isle(i) => i.spawn_exec(f),
            Handle::Pool(p) => p.spawn_exec(f),
            Handle::Session(_, s) => s.spawn_exec(move |lua, _| f(lua)),
        }
    }

    /// Shuts the isle or the pool down (a session's pool: the session has
    /// no shutdown of its own).
    pub fn shutdown(&self) -> Result<(), IsleError> {
        match &self.handle {
            Handle::Isle(i) => i.shutdown(),
            Handle::Pool(p) | Handle::Session(p, _) => p.shutdown(),
        }
    }

    pub fn shutdown_timeout(&self, limit: Duration) -> Result<(), IsleError> {
        match &self.handle {
            Handle::Isle(i) => i.shutdown_timeout(limit),
            Handle::Pool(p) | Handle::Session(p, _) => p.shutdown_timeout(limit),
        }
    }

    /// True once a shutdown has begun: a request made now resolves
    /// `Shutdown` at once.
    pub fn is_closed(&self) -> bool {
        match &self.handle {
            Handle::Isle(i) => i.is_shutdown(),
            Handle::Pool(p) | Handle::Session(p, _) => p.is_shutdown(),
        }
    }

    /// How many wedged VMs were replaced.
    pub fn wedged(&self) -> u64 {
        match &self.handle {
            Handle::Isle(i) => i.wedged(),
            Handle::Pool(p) | Handle::Session(p, _) => {
                p.metrics().workers.iter().map(|w| w.wedged).sum()
            }
        }
    }
}
