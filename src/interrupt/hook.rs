//! The interrupt hook: how a running request learns it must stop.
//!
//! A count hook is installed on the VM once, before `init` runs: mlua's
//! global hook, or on Lua 5.4 and 5.5 a C hook of ours (`alarm.rs`,
//! `tick_hook`) that calls the same tick from a C frame of its own (mlua's
//! trampoline moves values on the running function's frame, across its
//! to-be-closed variables). Coroutines resumed from Rust through mlua's
//! `Thread::resume` get it when resumed (mlua's `ON_RESUME` thread event).
//! It runs in one of three modes:
//! - **Armed on demand** (Unix, PUC-Rio Lua, no `max_instructions`): the
//!   hook is removed from the main state right away, so Lua code runs at
//!   full speed; a stopping thread signals the VM thread, which arms the
//!   hook on the running Lua thread with a count of 1 (see `alarm.rs`). A
//!   tick with nothing to stop removes the hook again.
//! - **Luau** has no hooks: its interrupt, while one is set, runs at every
//!   function call, return and loop back-edge, on every coroutine. It is
//!   armed on demand too: a stopper sets it (Luau allows that from any
//!   thread), and a tick with nothing to stop takes it away (`alarm.rs`).
//! - **Ticking all the time** (elsewhere, and when counting instructions):
//!   Lua copies a thread's hook into every coroutine it creates, so
//!   coroutines are covered too. Every `hook_interval` instructions the hook
//!   looks at the running request's stop reason (and the VM's abort flag,
//!   raised when the last handle is dropped). With a count hook set, Lua 5.4
//!   traps on every instruction, which slows pure-Lua loops 2–3x whatever
//!   the interval.
//!
//! Once a request must stop, the hook re-arms itself on the running
//! coroutine with a count of 1 and raises a Lua error. Whatever catches that
//! error (`pcall`, `load`'s protected reader, ...) is interrupted again by
//! the very next instruction it runs on that coroutine, so the error climbs
//! until it leaves the request. Some catchers are wrapped at start-up, so
//! that the error value they catch is checked at once: a pending
//! interruption, or a Rust panic (which mlua hands to Lua as an error value),
//! is raised again in the caller.
//!
//! On Lua 5.2–5.5 the wrappers are C functions (`alarm.rs`, `mod
//! protected`), invisible to Lua code: no line events for a debug hook, no
//! frames of their own in tracebacks or `debug.getinfo` levels. Lua 5.1,
//! LuaJIT and Luau keep wrappers written in Lua.
//! - `pcall`, `xpcall`: Lua's own (yieldable) functions, wrapped (on Lua
//!   5.2–5.5, rebuilt in C on `lua_pcallk` with a continuation; on Lua
//!   5.1, ours of `native.rs`, which check the stack). `xpcall`
//!   also skips the user's message handler while the request is stopping:
//!   an error raised inside a hook runs the handler with hooks disabled, so
//!   a handler that loops forever could never be stopped. (mlua's own
//!   panic-proof `pcall` is not used: it cannot yield, and it overflows the
//!   Lua stack when the callee returns many values.)
//! - `coroutine.resume` (and, armed on demand, `coroutine.close` and
//!   `coroutine.wrap`), whose caller runs on another coroutine; and `load`,
//!   which returns its reader's error.
//!
//! Finally, a request whose interruption fired resolves with its stop reason
//! even if its code ended normally after swallowing it.
//!
//! Raising an error costs a `longjmp`; unwinding a Rust panic through mlua
//! instead costs tens of microseconds, which is why it is not used.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(not(any(feature = "luau", feature = "lua54", feature = "lua55")))]
use mlua::HookTriggers;
use mlua::{Lua, VmState};
use parking_lot::Mutex;

use crate::interrupt::alarm::{self, Binding, ThreadAlarm};
use crate::vm::config::VmConfig;
use crate::sandbox::room::MEMORY_ERROR;
use crate::request::{CancelToken, Reason};
use crate::IsleError;

/// `Interrupt::executed` before a request's first tick.
const FIRST_TICK: u64 = u64::MAX;

/// Per-VM hook state, shared by the hook closure and the VM thread.
///
/// Uses `Arc`/`Mutex` rather than `Rc`/`RefCell` so the crate also builds
/// when another crate turns on mlua's `send` feature.
pub(crate) struct Interrupt {
    /// The running request's token; `None` between requests and during init.
    current: Mutex<Option<CancelToken>>,
    /// Raised by the owner when it is dropped: stop whatever runs.
    abort: Arc<AtomicBool>,
    /// Instructions between checks.
    interval: u32,
    /// True once the running request's interruption has been raised.
    fired: AtomicBool,
    /// True once a wrapper of ours caught Lua's memory error during the
    /// running request (see [`request_error`]).
    out_of_memory: AtomicBool,
    /// `max_instructions`, and the count so far for the running request
    /// (advanced by `interval` per tick).
    budget: Option<u64>,
    executed: AtomicU64,
    /// Set when the hook is armed on demand (see `alarm.rs`) instead of
    /// ticking all the time: this thread's alarm and the VM's binding.
    on_demand: Option<(ThreadAlarm, Binding)>,
}

impl Interrupt {
    /// Installs the hook on `lua` and registers the state for
    /// [`current_token`].
    pub(crate) fn install(
        lua: &Lua,
        config: &VmConfig,
        abort: Arc<AtomicBool>,
    ) -> mlua::Result<Arc<Self>> {
        // LuaJIT never calls hooks from compiled traces, so a hot loop would
        // run on uncancelled: the JIT stays off in every VM (the price: the
        // interpreter's speed). Before `init`, so nothing is compiled yet.
        #[cfg(feature = "luajit")]
        {
            // Without the `jit` library (`std_libs`) the JIT still runs:
            // open it to turn it off, then take it away again.
            let opened = lua.globals().get::<Option<mlua::Table>>("jit")?.is_none();
            if opened {
                lua.load_std_libs(mlua::StdLib::JIT)?;
            }
            lua.load("jit.off() jit.flush()")
                .set_name("=mlua-isle")
                .exec()?;
            if opened {
                lua.load("jit = nil if package then package.loaded.jit = nil end")
                    .set_name("=mlua-isle")
                    .exec()?;
            }
        }
        let budget = config.max_instructions;
        #[cfg(feature = "luau")]
        if budget.is_some() {
            // Luau calls its interrupt at function calls and loop back-edges,
            // never per instruction: a count would not be instructions.
            return Err(mlua::Error::runtime(
                "mlua-isle: max_instructions is not available with Luau \
                 (its interrupt counts no instructions); use a time limit instead",
            ));
        }
        // Check often enough to notice a small budget.
        let interval = match budget {
            Some(b) => u64::from(config.hook_interval).min(b) as u32,
            None => config.hook_interval,
        };
        let interval = interval.max(1);
        // An instruction budget needs the hook to count all the time; the
        // user may want it ticking anyway (`permanent_hook`).
        let alarm = alarm::this_thread().filter(|_| budget.is_none() && !config.permanent_hook);
        // The closure needs the final `Arc`, which needs `on_demand`, which
        // needs the hook installed: install a placeholder hook first (on
        // 5.4 and 5.5, ours, which does nothing until it has a tick).
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        alarm::tick_every(lua, interval);
        #[cfg(not(any(feature = "luau", feature = "lua54", feature = "lua55")))]
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(interval),
            |_, _| Ok(VmState::Continue),
        )?;
        let on_demand = match alarm {
            Some(alarm) => Some((alarm, alarm::bind(lua)?)),
            None => None,
        };
        let this = Arc::new(Interrupt {
            current: Mutex::new(None),
            abort,
            interval,
            fired: AtomicBool::new(false),
            out_of_memory: AtomicBool::new(false),
            budget,
            executed: AtomicU64::new(0),
            on_demand,
        });
        set_hook(lua, &this, this.interval)?;
        // Luau: no interrupt until a stopper puts it back.
        #[cfg(feature = "luau")]
        if let Some((_, binding)) = &this.on_demand {
            alarm::bind_interrupt(binding)?;
        }
        #[cfg(not(feature = "luau"))]
        if this.on_demand.is_some() {
            lua.remove_hook(); // armed on demand only
                               // A coroutine a Rust callback resumes (mlua's `Thread::resume`)
                               // passes no tracked switch: it ticks instead.
            #[cfg(unix)]
            lua.set_thread_event_callback(
                mlua::thread::ThreadTriggers::ON_RESUME,
                move |_, event| {
                    if let mlua::thread::ThreadEvent::Resume(thread) = event {
                        alarm::hook_resumed_from_rust(&thread, interval);
                    }
                    Ok(())
                },
            );
        }
        install_wrappers(lua, &this, config.binary_chunks)?;
        lua.set_app_data(this.clone());
        Ok(this)
    }

    /// After a request: puts the normal interval back if the interruption
    /// fired (it re-armed the hook with a count of 1).
    pub(crate) fn reset(&self, lua: &Lua, this: &Arc<Self>) {
        let fired = self.fired.swap(false, Ordering::Relaxed);
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        alarm::end_raising();
        // Luau's interrupt has no interval to put back.
        #[cfg(not(feature = "luau"))]
        if fired {
            // Cannot fail for a count hook on the main thread; if it did, the
            // VM would only stay slower, never wrong.
            #[cfg(not(any(feature = "lua54", feature = "lua55")))]
            let _ = set_hook(lua, this, self.interval);
            #[cfg(any(feature = "lua54", feature = "lua55"))]
            {
                let _ = this;
                alarm::tick_every(lua, self.interval);
            }
        }
        #[cfg(feature = "luau")]
        let _ = (fired, lua, this);
        if let Some((alarm, _)) = &self.on_demand {
            // A signal for the request that just ended may still arrive: it
            // arms the main state once, and the first tick removes it.
            alarm.clear();
            alarm::disarm_main();
        }
    }

    /// The VM's binding, when hooks are armed on demand.
    pub(crate) fn binding(&self) -> Option<Binding> {
        self.on_demand.as_ref().map(|(_, b)| *b)
    }

    /// Stops the running request, if any, with `Shutdown`. Called by an
    /// owner that is aborting, after raising the abort flag: it reaches Rust
    /// callbacks that poll their token, which the hook never interrupts.
    pub(crate) fn abort_running(&self) {
        if let Some(token) = self.current.lock().as_ref() {
            token.stop(Reason::Shutdown);
        }
    }

    /// True while this VM runs `req` (for the owner's wedge check: a
    /// stopped request's caller has its answer, but its VM may still be in
    /// it).
    pub(crate) fn runs(&self, req: &Arc<dyn crate::request::Cancel>) -> bool {
        self.current
            .lock()
            .as_ref()
            .is_some_and(|t| t.is_for(req))
    }

    /// The running request's stop reason, if it must stop.
    fn stop_reason(&self) -> Option<Reason> {
        let current = self.current.lock();
        let token = current.as_ref()?;
        match token.reason() {
            Some(r) => Some(r),
            None if self.abort.load(Ordering::Relaxed) => {
                token.stop(Reason::Shutdown);
                Some(Reason::Shutdown)
            }
            None => None,
        }
    }

    /// Raises the interruption (see the module docs), from a Rust function
    /// called by Lua.
    fn interrupt(this: &Arc<Self>, lua: &Lua, reason: Reason) -> mlua::Result<VmState> {
        Interrupt::stop_running(this, lua)?;
        Err(mlua::Error::external(reason.error()))
    }

    /// Raises the interruption from the hook. On Lua 5.4 and 5.5 the hook
    /// must not raise through mlua, which would run the running function's
    /// `__close` handlers inside the hook, where nothing can stop them: the
    /// next instruction raises instead, from a C hook (`alarm::raise`).
    fn interrupt_from_hook(this: &Arc<Self>, lua: &Lua, reason: Reason) -> mlua::Result<VmState> {
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        {
            let _ = reason;
            Interrupt::stop_running(this, lua)?;
            Ok(VmState::Continue)
        }
        #[cfg(not(any(feature = "lua54", feature = "lua55")))]
        Interrupt::interrupt(this, lua, reason)
    }

    /// Makes every Lua thread tick (or, on 5.4 and 5.5, raise) from its next
    /// instruction on, until the request ends.
    fn stop_running(this: &Arc<Self>, lua: &Lua) -> mlua::Result<()> {
        this.fired.store(true, Ordering::Relaxed);
        if let Some((alarm, _)) = &this.on_demand {
            // Every Lua thread switched to from now on ticks at once.
            alarm.set_armed();
        }
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        alarm::raise_from_next_instruction(lua, this.interval);
        #[cfg(all(not(feature = "luau"), not(any(feature = "lua54", feature = "lua55"))))]
        set_hook(lua, this, 1)?;
        // Luau: the interrupt must stay set until the request ends. The
        // stopper sets it, but this may run first (from a `pcall` check).
        #[cfg(feature = "luau")]
        {
            let _ = lua;
            if this.on_demand.is_some() {
                alarm::rearm_running();
            }
        }
        Ok(())
    }

    /// Counts `n` more instructions of the running request against its
    /// budget, stopping it once the budget is spent.
    fn charge(&self, n: u64) {
        let Some(budget) = self.budget else {
            return;
        };
        // ORDERING: Relaxed: only the VM thread touches the count.
        let executed = self.executed.load(Ordering::Relaxed);
        let executed = if executed == FIRST_TICK {
            0
        } else {
            executed.saturating_add(n)
        };
        self.executed.store(executed, Ordering::Relaxed);
        if executed >= budget {
            if let Some(token) = self.current.lock().as_ref() {
                token.stop(Reason::InstructionLimit);
            }
        }
    }

    #[cfg(any(feature = "lua54", feature = "lua55"))]
    /// The sandbox's pattern matcher (`pattern.rs`) polls this every so
    /// many steps: the steps count as instructions against the budget, and
    /// a request that must stop is interrupted there, as by the hook.
    pub(crate) fn pattern_poll(this: &Arc<Self>) -> crate::sandbox::pattern::Poll {
        let this = this.clone();
        Arc::new(move |lua, steps| {
            if this.executed.load(Ordering::Relaxed) == FIRST_TICK {
                // The request's first count: start from zero.
                this.executed.store(0, Ordering::Relaxed);
            }
            this.charge(u64::from(steps));
            match this.stop_reason() {
                Some(reason) => Interrupt::interrupt(&this, lua, reason).map(|_| ()),
                None => Ok(()),
            }
        })
    }

    fn tick(this: &Arc<Self>, lua: &Lua) -> mlua::Result<VmState> {
        // Lua's countdown carries over between requests, so the first tick
        // of a request may come after any number of instructions up to the
        // interval: it is not counted. A request is therefore never stopped
        // before its budget, and at most one interval after it.
        this.charge(u64::from(this.interval));
        if let Some(reason) = this.stop_reason() {
            return Interrupt::interrupt_from_hook(this, lua, reason);
        }
        if let Some((alarm, _)) = &this.on_demand {
            // Armed for nothing: a signal for a request that has ended, or
            // a thread armed while the last one was stopping. Clear the alarm
            // first, then look again: a stop raised before the clear is
            // seen now, one raised after it arms again.
            alarm.take();
            if let Some(reason) = this.stop_reason() {
                return Interrupt::interrupt_from_hook(this, lua, reason);
            }
            // Take the hook away, unless a stopper raised the alarm
            // meanwhile.
            if alarm::disarm_running(lua) && alarm.is_armed() {
                alarm::rearm_running();
            }
        }
        Ok(VmState::Continue)
    }
}

/// Ticks every `every` instructions, on every coroutine.
#[cfg(not(any(feature = "luau", feature = "lua54", feature = "lua55")))]
fn set_hook(lua: &Lua, this: &Arc<Interrupt>, every: u32) -> mlua::Result<()> {
    let this = this.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(every),
        move |lua, _| Interrupt::tick(&this, lua),
    )
}

/// Ticks every `every` instructions, on every coroutine. Lua 5.4 and 5.5:
/// through a C hook of ours calling the tick as a Rust function
/// (`alarm::tick_every`), not mlua's hook, which would move the running
/// function's to-be-closed variables.
#[cfg(any(feature = "lua54", feature = "lua55"))]
fn set_hook(lua: &Lua, this: &Arc<Interrupt>, every: u32) -> mlua::Result<()> {
    let this = this.clone();
    let tick = lua.create_function(move |lua, ()| Interrupt::tick(&this, lua).map(|_| ()))?;
    alarm::set_tick(lua, &tick)?;
    alarm::tick_every(lua, every);
    Ok(())
}

/// Luau has no hooks: its interrupt, called at every function call, return
/// and loop back-edge (on every coroutine) while it is set, ticks instead;
/// there is no interval. Armed on demand, it is taken away at once
/// (`alarm::bind_interrupt`).
#[cfg(feature = "luau")]
fn set_hook(lua: &Lua, this: &Arc<Interrupt>, _every: u32) -> mlua::Result<()> {
    let this = this.clone();
    lua.set_interrupt(move |lua| Interrupt::tick(&this, lua));
    Ok(())
}

/// Wraps `pcall`, `xpcall`, `coroutine.resume` and `load` (see the module
/// docs and the comments inside), and
/// makes `load`, `loadfile` and `dofile` take text only unless
/// `binary_chunks`.
fn install_wrappers(lua: &Lua, this: &Arc<Interrupt>, binary_chunks: bool) -> mlua::Result<()> {
    let state = this.clone();
    // Converting the error value to a `Value` resumes a wrapped Rust panic.
    // Called with the error values a catcher saw (xpcall: the one its
    // handler got, and its result).
    let check = lua.create_function(move |lua, errs: mlua::Variadic<mlua::Value>| {
        if errs.iter().any(is_memory_error) {
            // ORDERING: Relaxed: only the VM thread touches it.
            state.out_of_memory.store(true, Ordering::Relaxed);
        }
        if let Some(reason) = state.stop_reason() {
            Interrupt::interrupt(&state, lua, reason)?;
        }
        Ok(())
    })?;
    let state = this.clone();
    let stopping = lua.create_function(move |_, ()| Ok(state.stop_reason().is_some()))?;
    let globals = lua.globals();
    // The host may not open `coroutine` or `string` (`std_libs`).
    let coroutine: Option<mlua::Table> = globals.get("coroutine")?;
    // Switches need tracking where the hook is armed by a signal (Luau's
    // interrupt reads the flag on every Lua thread).
    let tracked = alarm::SUPPORTED && this.on_demand.is_some();
    if let Some(coroutine) = &coroutine {
        if tracked {
            install_tracked_coroutines(lua, coroutine, &check, &stopping)?;
        }
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        guard_close(lua, coroutine, &check, &stopping, tracked)?;
    }
    // Lua 5.2–5.5: C functions, invisible to Lua code (`alarm.rs`).
    #[cfg(any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    ))]
    return alarm::install_catchers(lua, &check, &stopping, binary_chunks, !tracked);
    #[cfg(not(any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    )))]
    install_lua_catchers(
        lua,
        &check,
        &stopping,
        binary_chunks,
        tracked,
        coroutine.as_ref(),
    )
}

/// Lua 5.1, LuaJIT and Luau (no continuations for C functions to yield
/// across, or none we can reach): the catchers wrapped in Lua.
#[cfg(not(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
)))]
fn install_lua_catchers(
    lua: &Lua,
    check: &mlua::Function,
    stopping: &mlua::Function,
    binary_chunks: bool,
    tracked: bool,
    coroutine: Option<&mlua::Table>,
) -> mlua::Result<()> {
    let globals = lua.globals();
    // Lua 5.1's own overrun the stack when the callee's results fill it.
    #[cfg(feature = "lua51")]
    let (pcall, xpcall) = crate::interrupt::alarm::native::protected_calls(lua)?;
    #[cfg(not(feature = "lua51"))]
    let (pcall, xpcall): (mlua::Function, mlua::Function) =
        (globals.get("pcall")?, globals.get("xpcall")?);
    // `load`'s checks, in Rust: `string` may be missing.
    let is_binary = lua.create_function(|_, s: mlua::Value| {
        Ok(matches!(s, mlua::Value::String(s) if s.as_bytes().first() == Some(&27)))
    })?;
    let allows_text = lua.create_function(|_, mode: mlua::Value| {
        Ok(matches!(mode, mlua::Value::String(m) if m.as_bytes().contains(&b't')))
    })?;
    lua.load(
        r##"
        local check, stopping, pcall, xpcall, resume, load, loadfile, binary_ok, tracked,
              loadstring, reader_only, is_binary, allows_text = ...
        local type, error, select = type, error, select
        -- Lua's own pcall and xpcall (yieldable; 5.1: ours), with the error value
        -- checked: a Rust panic or a pending interruption is raised again.
        local function after(ok, ...)
            if not ok then check((...)) end
            return ok, ...
        end
        -- Lua's argument errors are raised here, placed at our caller, as
        -- Lua's functions place them.
        _G.pcall = function(...)
            local f = ...
            if f == nil and select("#", ...) == 0 then
                error("bad argument #1 to 'pcall' (value expected)", 2)
            end
            return after(pcall(...))
        end
        local function after_x(seen, ok, ...)
            if not ok then check(seen.e, (...)) end
            return ok, ...
        end
        local function protected(f, handler, ...)
            local seen = {}
            return after_x(seen, xpcall(f, function(e)
                seen.e = e
                -- Raised by the hook, this runs with hooks disabled: never
                -- hand it to user code that could loop.
                if stopping() then return e end
                return handler(e)
            end, ...))
        end
        -- Lua 5.1's xpcall is ours (`native.rs`); Luau and LuaJIT check
        -- and word their arguments themselves.
        _G.xpcall = protected
        if not tracked and resume then
            coroutine.resume = function(...)
                -- Lua's own argument error, without this wrapper's name
                -- and position (Luau makes no tail calls).
                if type((...)) ~= "thread" then
                    local _, e = pcall(resume, ...)
                    error(e, 0)
                end
                return after(resume(...)) -- as for pcall
            end
        end
        local function after_load(f, ...)
            if f == nil then check((...)) end
            return f, ...
        end
        local function binary(s)
            return not binary_ok and is_binary(s)
        end
        local refused = "attempt to load a binary chunk (mode is 't')"
        -- Lua 5.1's `load` takes a reader function only, and no mode: its
        -- first piece is checked instead.
        local function text_reader(read)
            local first = true
            return function()
                local piece = read()
                if first and type(piece) == "string" and piece ~= "" then
                    first = false
                    if binary(piece) then error(refused, 0) end
                end
                return piece
            end
        end
        if load then
            local function text_load(chunk, name, mode, ...)
                if not binary_ok then
                    if reader_only then
                        -- 5.1: no mode; the reader's first piece is checked.
                        if type(chunk) == "function" then chunk = text_reader(chunk) end
                    elseif mode == nil or allows_text(mode) then
                        mode = "t" -- the caller's mode, narrowed to text
                    elseif binary(chunk) then
                        return nil, refused
                    elseif type(chunk) == "function" then
                        -- The caller's mode refuses text (Lua says so); the
                        -- reader's first piece must not be binary either.
                        chunk = text_reader(chunk)
                    end
                end
                return after_load(load(chunk, name, mode, ...))
            end
            _G.load = function(...)
                local t = type((...))
                if t ~= "function" and (reader_only or (t ~= "string" and t ~= "number")) then
                    local got = select("#", ...) == 0 and "no value" or t
                    error("bad argument #1 to 'load' (function expected, got " .. got .. ")", 2)
                end
                return text_load(...)
            end
        end
        -- `loadstring` (5.1, LuaJIT, Luau): no mode argument in 5.1.
        if loadstring then
            _G.loadstring = function(s, ...)
                if binary(s) then return nil, refused end
                return after_load(loadstring(s, ...))
            end
        end
        if loadfile then
            local function text_loadfile(file, mode, ...)
                if not binary_ok then mode = "t" end
                return after_load(loadfile(file, mode, ...))
            end
            _G.loadfile = text_loadfile
            _G.dofile = function(file)
                local f, err = text_loadfile(file)
                if not f then error(err, 2) end
                return f()
            end
        end
        "##,
    )
    .set_name("=mlua-isle")
    .call::<()>((
        check.clone(),
        stopping.clone(),
        pcall,
        xpcall,
        match coroutine {
            Some(c) => c.get::<Option<mlua::Function>>("resume")?,
            None => None,
        },
        globals.get::<Option<mlua::Function>>("load")?,
        globals.get::<Option<mlua::Function>>("loadfile")?,
        binary_chunks,
        tracked,
        globals.get::<Option<mlua::Function>>("loadstring")?,
        cfg!(feature = "lua51"),
        is_binary,
        allows_text,
    ))
}

/// With hooks armed on demand, replaces `coroutine.resume`, `close` and
/// `wrap` with `alarm.rs`'s tracked versions, which also hand a failed
/// resume's error to `check`, as the wrapper above does.
fn install_tracked_coroutines(
    lua: &Lua,
    coroutine: &mlua::Table,
    check: &mlua::Function,
    stopping: &mlua::Function,
) -> mlua::Result<()> {
    let (resume, close) = alarm::tracked_resume_close(lua, check)?;
    // How Lua's `coroutine.wrap` raises a coroutine's error: from 5.4 on, a
    // coroutine that died by it is closed first (its `__close` handlers may
    // replace the error), and a string gets the position of the wrapped
    // function's caller (level 3: this function, the C function, its caller).
    let wrap_error: mlua::Function = lua
        .load(
            r#"
            local check, close, status, error, memory_error, stopping = ...
            return function(co, err)
                -- A coroutine killed by the interruption is not closed
                -- (see `guard_close`).
                if close and status(co) == "dead" and not stopping() then
                    local closed, e = close(co)
                    if not closed then err = e end
                end
                check(err)
                -- Lua's memory error is raised as is (5.4's wrap), which
                -- keeps it a memory error.
                if err == memory_error then error(err, 0) end
                error(err, 3)
            end
            "#,
        )
        .set_name("=mlua-isle")
        .call((
            check.clone(),
            close.clone(),
            coroutine.get::<mlua::Function>("status")?,
            lua.globals().get::<mlua::Function>("error")?,
            MEMORY_ERROR,
            stopping.clone(),
        ))?;
    let wrap = alarm::tracked_wrap_with(lua, &wrap_error)?;
    coroutine.set("resume", resume)?;
    if let Some(close) = close {
        coroutine.set("close", close)?;
    }
    coroutine.set("wrap", wrap)
}

/// Lua 5.4 and 5.5: a coroutine killed by an error raised in a hook (the
/// interruption) keeps hooks disabled (Lua leaves its `allowhook` at 0), so
/// closing it would run its `__close` handlers where nothing can stop them.
/// While a request is stopping, `coroutine.close` raises the interruption
/// instead of closing (as the tracked `coroutine.wrap` skips closing): the
/// coroutine stays dead with its variables unclosed, as after an error
/// nobody closes.
///
/// Where switches are not tracked, Lua's own `coroutine.wrap` would close
/// such a coroutine: it is replaced by one that does what 5.4's does (close
/// a coroutine that died by an error, put the caller's position in front
/// of a string error, raise a memory error as is), but skips the closing
/// while the request stops, and hands the error to `check`.
#[cfg(any(feature = "lua54", feature = "lua55"))]
fn guard_close(
    lua: &Lua,
    coroutine: &mlua::Table,
    check: &mlua::Function,
    stopping: &mlua::Function,
    tracked: bool,
) -> mlua::Result<()> {
    let (close, wrap): (Option<mlua::Function>, Option<mlua::Function>) = lua
        .load(
            r##"
            local close, check, stopping, tracked, create, resume, status, memory_error,
                  type, error, select, pcall = ...
            if tracked then return nil end -- the tracked close checks
            -- Lua's errors as Lua words and places them (a tail call to a
            -- C function still leaves our frame as its caller).
            local function closed(ok, ...)
                if ok then return ... end
                local e = ...
                if e == memory_error then error(e, 0) end
                error(e, 2) -- tail-called: level 2 is our caller's caller
            end
            local function guarded_close(...)
                if stopping() then check() end
                local co = ...
                if type(co) ~= "thread" then
                    local got = select("#", ...) == 0 and "no value" or type(co)
                    error("bad argument #1 to 'close' (thread expected, got " .. got .. ")", 2)
                end
                return closed(pcall(close, co))
            end
            local function after(co, ok, ...)
                if ok then return ... end
                local err = ...
                if status(co) == "dead" and not stopping() then
                    local closed, e = close(co)
                    if not closed then err = e end
                end
                check(err)
                if err == memory_error then error(err, 0) end
                error(err, 2) -- tail-called: level 2 is the wrapped function's caller
            end
            local function wrap(f)
                if type(f) ~= "function" then
                    error("bad argument #1 to 'wrap' (function expected)", 2)
                end
                local co = create(f)
                return function(...) return after(co, resume(co, ...)) end
            end
            return guarded_close, wrap
            "##,
        )
        .set_name("=mlua-isle")
        .call((
            coroutine.get::<mlua::Function>("close")?,
            check.clone(),
            stopping.clone(),
            tracked,
            coroutine.get::<mlua::Function>("create")?,
            coroutine.get::<mlua::Function>("resume")?,
            coroutine.get::<mlua::Function>("status")?,
            MEMORY_ERROR,
            lua.globals().get::<mlua::Function>("type")?,
            lua.globals().get::<mlua::Function>("error")?,
            lua.globals().get::<mlua::Function>("select")?,
            lua.globals().get::<mlua::Function>("pcall")?,
        ))?;
    if let (Some(close), Some(wrap)) = (close, wrap) {
        coroutine.set("close", close)?;
        coroutine.set("wrap", wrap)?;
    }
    Ok(())
}

/// What a job calls around its work (`vm/job.rs`).
impl Interrupt {
    /// Before the request is marked running: returns the alarm id stoppers
    /// must raise (0: none; the hook ticks on its own).
    pub(crate) fn prepare(&self) -> u32 {
        match &self.on_demand {
            Some((alarm, binding)) => {
                alarm.clear();
                alarm::begin(binding);
                alarm.id()
            }
            None => 0,
        }
    }

    /// The request of `token` starts running.
    pub(crate) fn enter(&self, token: &CancelToken) {
        self.executed.store(FIRST_TICK, Ordering::Relaxed);
        self.out_of_memory.store(false, Ordering::Relaxed);
        *self.current.lock() = Some(token.clone());
        // ORDERING: `abort_running` raises the flag before taking the lock we
        // just released, so either it saw this token or we see the flag.
        if self.abort.load(Ordering::SeqCst) {
            token.stop(Reason::Shutdown);
        }
    }

    /// Ends the request; true if its interruption was raised.
    pub(crate) fn leave(&self) -> bool {
        *self.current.lock() = None;
        self.fired.load(Ordering::Relaxed)
    }
}

/// Whether `v` is Lua's memory error as a catcher sees it: Lua's message
/// (Lua 5.3's buffers: their own), or an mlua error (a Rust callback's)
/// that is one.
fn is_memory_error(v: &mlua::Value) -> bool {
    match v {
        mlua::Value::String(s) => {
            let s = s.as_bytes();
            *s == *MEMORY_ERROR.as_bytes()
                || (cfg!(feature = "lua53") && *s == *b"not enough memory for buffer allocation")
        }
        mlua::Value::Error(e) => matches!(IsleError::from_lua(e), IsleError::MemoryLimit(_)),
        _ => false,
    }
}

/// Converts the error a request's work ended with. A request that ran out
/// of memory fails with [`IsleError::MemoryLimit`] however the memory error
/// travelled: raised straight out (mlua's memory error), re-raised by Lua
/// code or by a library function with a position in front (`error(e)`
/// after a `pcall`, `coroutine.wrap` on older Lua versions; see
/// `IsleError::from_lua`), or caught by one of our wrapped catchers
/// (`pcall`, `xpcall`, `coroutine.resume`/`wrap`/`close`, `load`'s reader)
/// before the request failed with another error.
pub(crate) fn request_error(lua: &Lua, err: &mlua::Error) -> IsleError {
    match IsleError::from_lua(err) {
        IsleError::Lua(e) if ran_out_of_memory(lua) => IsleError::MemoryLimit(e.message().into()),
        other => other,
    }
}

/// True if a wrapper caught Lua's memory error during the running request.
fn ran_out_of_memory(lua: &Lua) -> bool {
    lua.app_data_ref::<Arc<Interrupt>>()
        .is_some_and(|state| state.out_of_memory.load(Ordering::Relaxed))
}

/// The token of the request running on this VM, for Rust functions called
/// from Lua.
///
/// The hook cannot interrupt Rust code. A callback that blocks or loops
/// should check the token and return early, typically with an error:
///
/// ```
/// use mlua_isle::{current_token, Isle, IsleError};
/// use std::time::Duration;
///
/// let isle = Isle::spawn(|lua| {
///     let wait = lua.create_function(|lua, ()| {
///         let token = current_token(lua).expect("called from a request");
///         while !token.is_cancelled() {
///             std::thread::sleep(Duration::from_millis(1)); // e.g. polling I/O
///         }
///         Err::<(), _>(mlua::Error::runtime("gave up: request cancelled"))
///     })?;
///     lua.globals().set("wait_for_cancel", wait)
/// })?;
///
/// let task = isle.spawn_call::<()>("wait_for_cancel", ());
/// task.cancel_token().cancel();
/// assert_eq!(task.wait(), Err(IsleError::Cancelled));
/// # Ok::<(), IsleError>(())
/// ```
///
/// Returns `None` outside a request (during `init`, or for a `Lua` that is
/// not an isle's).
pub fn current_token(lua: &Lua) -> Option<CancelToken> {
    let state = lua.app_data_ref::<Arc<Interrupt>>()?;
    let token = state.current.lock().clone();
    token
}
