//! One Lua VM as seen from its own thread: creation, init, and running jobs.

pub(crate) mod backend;
pub(crate) mod chunk;
#[cfg(feature = "async")]
mod clock;
pub(crate) mod config;
#[cfg(feature = "async")]
mod coroutine;
#[cfg(feature = "luajit")]
pub(crate) mod cstack;
mod job;
pub(crate) mod precompiled;
pub(crate) mod result;
pub(crate) mod scope;
#[cfg(feature = "async")]
mod suspend;
#[cfg(feature = "async")]
pub(crate) mod tasks;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mlua::{Lua, LuaOptions};

use crate::interrupt::Interrupt;
use crate::vm::chunk::ChunkCache;
use crate::vm::config::VmConfig;
use crate::IsleError;
#[cfg(feature = "async")]
pub(crate) use job::call_later;
pub(crate) use job::{take_started, Ctx, Job, Outcome, Run, SessionEnv};

/// Lua's `type()` of `v`: `number` for integers too, `userdata` for light
/// userdata and mlua's error values.
pub(crate) fn lua_type(v: &mlua::Value) -> &'static str {
    match v {
        mlua::Value::Integer(_) | mlua::Value::Number(_) => "number",
        mlua::Value::LightUserData(_) | mlua::Value::UserData(_) | mlua::Value::Error(_) => {
            "userdata"
        }
        other => other.type_name(),
    }
}

/// A VM living on the current thread.
pub(crate) struct Vm {
    /// Requests waiting for a future, and the coroutines requests run as
    /// (they hold Lua values: before `lua`).
    #[cfg(feature = "async")]
    suspension: suspend::Suspension,
    #[cfg(feature = "async")]
    coroutines: std::rc::Rc<coroutine::Coroutines>,
    /// Compiled `eval` chunks (they hold Lua values: declared before `lua`,
    /// so they are dropped first).
    chunks: ChunkCache,
    lua: Lua,
    interrupt: Arc<Interrupt>,
    /// Raised when a `LuaHandle` to a value of this VM is dropped.
    released: Arc<AtomicBool>,
    memory_limit: Option<usize>,
    /// Bytes in use right after the last full collection (with a limit).
    live: Cell<usize>,
    /// Request code is a tenant's: the globals are emptied before the VM
    /// is closed (see `Drop`).
    sandboxed: bool,
    /// With an instruction budget, the allocations the memory limit
    /// refuses are counted for it (`interrupt/alarm/refusals.rs`).
    #[cfg(any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    ))]
    refusals: Option<crate::interrupt::alarm::refusals::Counting>,
}

impl Drop for Vm {
    /// Besides ending what is suspended: mlua's `Lua` runs a full
    /// collection when dropped, before it closes the state, and a tenant
    /// can build a heap that takes minutes to collect (a long shuffled
    /// chain of weak-keyed entries, whose convergence in the collector's
    /// atomic step is quadratic). No stop reaches that: it runs outside any
    /// request, on the thread that drops the VM (a recycling worker, a VM
    /// thread that shutdown joins). So a sandboxed VM's globals are emptied
    /// first (raw, no metamethod runs), once nothing of the VM runs any
    /// more: what tenants' code can write is reached only through them,
    /// its sessions' environments and its cached chunks (both dropped
    /// before the state: the pool's `WorkerVm` and `Vm`'s field order), and
    /// the collection then marks only what the host built and sweeps the
    /// rest, in time linear in the heap. Closing the state runs no
    /// collection of its own. Outside the sandbox the globals stay: a
    /// trusted script's finalizers may read them while the state closes.
    fn drop(&mut self) {
        self.close_suspended(&mut |_, _| {});
        // mlua's allocator back, before mlua looks for its memory state.
        #[cfg(any(
            feature = "lua52",
            feature = "lua53",
            feature = "lua54",
            feature = "lua55"
        ))]
        drop(self.refusals.take());
        if let Some(binding) = self.interrupt.binding() {
            crate::interrupt::alarm::unbind(&binding);
        }
        if self.sandboxed {
            // A VM at its memory limit must still take a reference to its
            // globals (mlua panics when it cannot): the VM is going anyway.
            if self.memory_limit.is_some() {
                let _ = self.lua.set_memory_limit(0);
            }
            // Fails only where globals are read-only (Luau's own sandbox,
            // which ours does not use): they stay, and are collected.
            let _ = self.lua.globals().clear();
        }
    }
}

/// A Lua state with `libs` open (in mlua's safe mode unless `unsafe_libs`:
/// the host chose that with `unsafe_std_libs`, whose docs say what it
/// gives Lua code), its garbage collector stopped.
///
/// Stopped, because everything a VM allocates before `init` lives as long
/// as the VM: the incremental steps Lua takes while the libraries open and
/// the crate installs its functions only mark what stays (about a tenth of
/// a VM's start, and of every recycled pool VM's). On PUC-Rio Lua the
/// libraries open after the stop, as `Lua::new_with` would open them
/// (LuaJIT's mlua stops the collector for them itself); restarting it
/// before `init` is the caller's job.
fn new_lua(libs: mlua::StdLib, unsafe_libs: bool) -> mlua::Result<Lua> {
    let new = |libs| {
        if unsafe_libs {
            Ok(crate::interrupt::alarm::new_lua_with_unsafe_libs(
                libs,
                LuaOptions::new(),
            ))
        } else {
            Lua::new_with(libs, LuaOptions::new())
        }
    };
    // `debug` in safe mode: `new_with`'s own refusal, worded as it words it.
    let later = cfg!(not(any(feature = "luajit", feature = "luau")))
        && (unsafe_libs || !libs.contains(mlua::StdLib::DEBUG));
    if !later {
        let lua = new(libs)?;
        lua.gc_stop();
        return Ok(lua);
    }
    let lua = new(mlua::StdLib::NONE)?;
    lua.gc_stop();
    lua.load_std_libs(libs)?;
    Ok(lua)
}

impl Vm {
    /// Creates the VM, installs the hook and runs `init`. Must be called on
    /// the thread that will own the VM; marks that thread as `owner`'s.
    pub(crate) fn start(
        owner: u64,
        config: &VmConfig,
        abort: Arc<AtomicBool>,
        init: impl FnOnce(&Lua) -> mlua::Result<()>,
    ) -> Result<Vm, IsleError> {
        Self::start_then(owner, config, abort, init, |_| Ok(()))
    }

    /// Like [`start`](Self::start), then runs `then` after the sandbox (a
    /// pool's reloads: they meet the VM as live VMs do). A failure of
    /// `then` is a failure to start, as one of `init` is.
    pub(crate) fn start_then(
        owner: u64,
        config: &VmConfig,
        abort: Arc<AtomicBool>,
        init: impl FnOnce(&Lua) -> mlua::Result<()>,
        then: impl FnOnce(&Lua) -> mlua::Result<()>,
    ) -> Result<Vm, IsleError> {
        crate::request::owner::enter(owner);
        let init_error = |e: mlua::Error| IsleError::Init(IsleError::from_lua(&e).to_string());
        // Lua's pcall/xpcall stay (they can yield; on 5.1, ours replace
        // them): interrupt/catchers.rs wraps them so a Rust panic they catch is raised
        // again, never swallowed.
        let lua = new_lua(config.std_libs, config.unsafe_libs).map_err(init_error)?;
        let released = crate::handle::route::tag(&lua, owner);
        crate::sandbox::print::install(&lua, &config.print, config.sandbox).map_err(init_error)?;
        #[cfg(feature = "luajit")]
        crate::vm::cstack::install(
            &lua,
            config
                .vm_stack_size()
                .unwrap_or(crate::vm::config::STD_STACK_SIZE),
        )
        .map_err(init_error)?;
        #[cfg(feature = "async")]
        let keep_current = coroutine::KeepCurrent::new();
        #[cfg(feature = "async")]
        let coroutines = coroutine::Coroutines::new(&lua).map_err(init_error)?;
        let interrupt = Interrupt::install(&lua, config.hook(), abort).map_err(init_error)?;
        #[cfg(feature = "lua55")]
        crate::interrupt::alarm::cap_string_rep(&lua).map_err(init_error)?;
        lua.gc_restart(); // stopped by `new_lua`
        if let Some(limit) = config.memory_limit {
            lua.set_memory_limit(limit).map_err(init_error)?;
        }
        let init_then_sandbox = |lua: &Lua| {
            #[cfg(feature = "async")]
            if config.task_library {
                tasks::install(lua)?;
            }
            init(lua)?;
            if config.sandbox {
                // Lua's C pattern matcher cannot be interrupted: the
                // sandbox's is budgeted (Lua 5.4's semantics, so only there).
                #[cfg(any(feature = "lua54", feature = "lua55"))]
                if let Some(string) = lua.globals().get::<Option<mlua::Table>>("string")? {
                    crate::sandbox::pattern::install(
                        lua,
                        &string,
                        Interrupt::pattern_poll(&interrupt),
                    )?;
                }
                crate::sandbox::apply(lua, config.max_source)?;
            }
            then(lua)
        };
        match catch_unwind(AssertUnwindSafe(|| init_then_sandbox(&lua))) {
            Ok(Ok(())) => Ok(Vm {
                #[cfg(feature = "async")]
                coroutines: {
                    keep_current.started();
                    coroutines
                },
                #[cfg(any(
                    feature = "lua52",
                    feature = "lua53",
                    feature = "lua54",
                    feature = "lua55"
                ))]
                refusals: config
                    .max_instructions
                    .and_then(|_| crate::interrupt::alarm::refusals::count(&lua)),
                #[cfg(feature = "async")]
                suspension: suspend::Suspension::new(),
                chunks: ChunkCache::new(config.chunk_cache, config.memory_limit),
                live: Cell::new(lua.used_memory()),
                lua,
                interrupt,
                released,
                memory_limit: config.memory_limit,
                sandboxed: config.sandbox,
            }),
            Ok(Err(e)) => Err(init_error(e)),
            Err(payload) => Err(IsleError::from_panic(&*payload)),
        }
    }

    /// Runs one job (a session's request when `session` is given: in its
    /// environment, which the request makes if the session has none yet,
    /// see [`SessionEnv`]). `None`
    /// if it suspended (the `async` feature): it resolves later, from
    /// [`resume_woken`](Self::resume_woken), which hands back `tag` with
    /// its outcome.
    ///
    /// The job catches panics of the work itself. A panic after the request
    /// resolved (a result nobody waits for panicking when dropped, a waker
    /// panicking) is caught here, so the VM thread keeps serving; the request
    /// has its result already.
    // Without `async`, `Ran` has one variant.
    #[cfg_attr(not(feature = "async"), allow(clippy::infallible_destructuring_match))]
    pub(crate) fn run(
        &self,
        job: Job,
        session: Option<(&SessionEnv<'_>, scope::SessionTag)>,
        tag: u64,
    ) -> Option<Outcome> {
        crate::handle::route::expire_released(&self.lua, &self.released);
        #[cfg(feature = "async")]
        let (slot, waker) = self.suspension.reserve();
        let (session_env, session) = session.unzip();
        let keep_room = |out_of_memory| self.keep_room(out_of_memory);
        let ctx = Ctx {
            lua: &self.lua,
            session_env,
            session,
            chunks: &self.chunks,
            memory_limit: self.memory_limit,
            keep_room: self.keep_room_fn(&keep_room),
            #[cfg(feature = "async")]
            coroutines: &self.coroutines,
            #[cfg(feature = "async")]
            waker: &waker,
        };
        let ran = catch_unwind(AssertUnwindSafe(|| job.run(&ctx, &self.interrupt)))
            .unwrap_or(job::Ran::Done(Outcome::Failed));
        self.interrupt.reset(&self.lua, &self.interrupt);
        let outcome = match ran {
            job::Ran::Done(outcome) => outcome,
            #[cfg(feature = "async")]
            job::Ran::Suspended(paused) => {
                self.interrupt.set_suspended(slot, Some(paused.token()));
                self.suspension.park(slot, paused, tag);
                return None;
            }
        };
        #[cfg(feature = "async")]
        self.suspension.release(slot);
        let _ = tag;
        Some(outcome)
    }

    /// Polls the suspended requests whose futures woke; `ran` gets the tag
    /// of each and how long its poll ran (before `done`, if it resolved),
    /// `done` the tag and outcome of each that resolved.
    pub(crate) fn resume_woken(
        &self,
        ran: &mut dyn FnMut(u64, std::time::Duration),
        done: &mut dyn FnMut(u64, Outcome),
    ) {
        #[cfg(feature = "async")]
        for slot in self.suspension.woken() {
            let Some((mut paused, tag, waker)) = self.suspension.unpark(slot) else {
                continue; // resolved since (a stale wake-up)
            };
            let start = std::time::Instant::now();
            let polled = catch_unwind(AssertUnwindSafe(|| {
                let keep_room = |out_of_memory| self.keep_room(out_of_memory);
                let r = paused.poll(
                    &self.lua,
                    &self.interrupt,
                    &waker,
                    self.keep_room_fn(&keep_room),
                );
                coroutine::close_terminated();
                r
            }));
            self.interrupt.reset(&self.lua, &self.interrupt);
            ran(tag, start.elapsed());
            match polled {
                Ok(None) => self.suspension.park(slot, paused, tag),
                Ok(Some(outcome)) => self.resolved(slot, tag, outcome, done),
                Err(_) => {
                    // A panic outside the work's own poll (a waker, a
                    // result's drop): the request has resolved or is
                    // resolved now.
                    let outcome = self.stop_paused(paused);
                    self.resolved(slot, tag, outcome, done);
                }
            }
        }
        let _ = (ran, done);
    }

    /// Stops every suspended request (`Shutdown`) and drops its work:
    /// when the VM stops serving.
    pub(crate) fn close_suspended(&self, done: &mut dyn FnMut(u64, Outcome)) {
        #[cfg(feature = "async")]
        for slot in self.suspension.occupied() {
            if let Some((paused, tag, _)) = self.suspension.unpark(slot) {
                let outcome = self.stop_paused(paused);
                self.resolved(slot, tag, outcome, done);
            }
        }
        let _ = done;
    }

    #[cfg(feature = "async")]
    fn stop_paused(&self, paused: job::Paused) -> Outcome {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let outcome = paused.stop(&self.lua, &self.interrupt);
            coroutine::close_terminated();
            outcome
        }))
        .unwrap_or(Outcome::Cancelled);
        self.interrupt.reset(&self.lua, &self.interrupt);
        outcome
    }

    #[cfg(feature = "async")]
    fn resolved(
        &self,
        slot: usize,
        tag: u64,
        outcome: Outcome,
        done: &mut dyn FnMut(u64, Outcome),
    ) {
        self.interrupt.set_suspended(slot, None);
        self.suspension.release(slot);
        done(tag, outcome);
    }

    /// How many requests this VM holds suspended.
    pub(crate) fn suspended(&self) -> usize {
        #[cfg(feature = "async")]
        return self.suspension.count();
        #[cfg(not(feature = "async"))]
        0
    }

    /// True if a suspended request woke and waits to be polled. Any thread
    /// may ask through [`wakeups`](Self::wakeups).
    pub(crate) fn has_woken(&self) -> bool {
        #[cfg(feature = "async")]
        return self.suspension.wakeups.any();
        #[cfg(not(feature = "async"))]
        false
    }

    /// Sets how a suspended request's wake-up reaches this VM's thread.
    pub(crate) fn on_wake(&self, nudge: impl Fn() + Send + Sync + 'static) {
        #[cfg(feature = "async")]
        self.suspension.on_wake(Box::new(nudge));
        #[cfg(not(feature = "async"))]
        let _ = nudge;
    }

    /// `keep_room` for a request's `Ctx`: `None` without a memory limit.
    fn keep_room_fn<'a>(&self, keep_room: &'a dyn Fn(bool)) -> job::KeepRoom<'a> {
        self.memory_limit.map(|_| keep_room)
    }

    /// Runs `f`, Lua work of the VM's own between requests (a pool's
    /// reload being committed or rolled back), with the collector held.
    /// The collector runs only inside requests: a step taken here could run
    /// a tenant's finalizer, or the atomic phase of a heap built to be slow
    /// to collect (see `Drop`), where no stop reaches and no VM is judged
    /// wedged. For rare work only: restarting the collector resets its
    /// debt, so the next request takes a step. (A session's environment,
    /// made once per session, is made by its first request instead: see
    /// `SessionEnv`.)
    ///
    /// On Lua 5.1 and LuaJIT a tenant can make no finalizer (the sandbox
    /// takes `newproxy`), their collectors have no ephemerons (what makes
    /// the slow heap slow), and whether the host stopped the collector
    /// cannot be read: `f` just runs.
    pub(crate) fn between_requests<R>(&self, f: impl FnOnce(&Lua) -> R) -> R {
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        let _held = self.lua.gc_is_running().then(|| {
            self.lua.gc_stop();
            struct Restart<'a>(&'a Lua);
            impl Drop for Restart<'_> {
                fn drop(&mut self) {
                    self.0.gc_restart();
                }
            }
            Restart(&self.lua)
        });
        f(&self.lua)
    }

    /// Under a memory limit, collects the garbage at the end of a request
    /// when it has eaten more than a quarter of the room that live data
    /// leaves, or after running out of memory; so every request starts
    /// with at least three quarters of that room free. (Buffers built by
    /// `string.rep`, `table.concat`, ... get no emergency collection:
    /// garbage left by earlier requests must not stand in their way.)
    ///
    /// The request calls it before it resolves (`Ctx::keep_room`): a
    /// collection can take as long as a tenant's heap makes it (see
    /// `Drop`), and only inside a request does a stop reach it, and the VM
    /// get replaced if it does not let go.
    fn keep_room(&self, out_of_memory: bool) {
        let Some(limit) = self.memory_limit else {
            return;
        };
        let live = self.live.get();
        let room = limit.saturating_sub(live);
        if out_of_memory {
            // Cached chunks must not keep a VM short of memory.
            self.chunks.clear();
        }
        if out_of_memory || self.lua.used_memory() > live.saturating_add(room / 4) {
            let _ = self.lua.gc_collect();
            self.live.set(self.lua.used_memory());
        }
    }

    /// The VM's interrupt state, for owners that abort.
    pub(crate) fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The VM's compiled `eval` chunks.
    pub(crate) fn chunks(&self) -> &ChunkCache {
        &self.chunks
    }

    pub(crate) fn lua(&self) -> &Lua {
        &self.lua
    }
}
