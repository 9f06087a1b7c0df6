//! Per-VM interrupt state, the hook's tick, and what a job calls around
//! its work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(not(any(feature = "luau", feature = "lua54", feature = "lua55")))]
use mlua::HookTriggers;
use mlua::{Lua, VmState};
use parking_lot::Mutex;

use crate::interrupt::alarm::{self, ThreadAlarm, VmAddrs};
use crate::request::{CancelToken, Reason};

/// `Interrupt::executed` before a request's first tick.
const FIRST_TICK: u64 = u64::MAX;

/// `Interrupt::executed` while the crate's own Lua work runs inside a
/// request (see [`Interrupt::uncounted`]): not charged to its budget.
const UNCOUNTED: u64 = u64::MAX - 1;

/// Per-VM hook state, shared by the hook closure and the VM thread.
///
/// Uses `Arc`/`Mutex` rather than `Rc`/`RefCell` so the crate also builds
/// when another crate turns on mlua's `send` feature.
pub(crate) struct Interrupt {
    /// The running request's token; `None` between requests and during init.
    pub(super) current: Mutex<Option<CancelToken>>,
    /// Raised by the owner when it is dropped: stop whatever runs.
    pub(super) abort: Arc<AtomicBool>,
    /// Instructions between checks.
    pub(super) interval: u32,
    /// True once the running request's interruption has been raised.
    pub(super) fired: AtomicBool,
    /// True once a wrapper of ours caught Lua's memory error during the
    /// running request (see [`request_error`]).
    pub(super) out_of_memory: AtomicBool,
    /// `max_instructions`, and the count so far for the running request
    /// (advanced by `interval` per tick).
    pub(super) budget: Option<u64>,
    pub(super) executed: AtomicU64,
    /// Ticks that found mlua's async wrapper running while a request must
    /// stop, and let it run (see `interrupt_from_hook`), left in this
    /// stop; set when a request enters. Not on Lua 5.4 and 5.5, whose
    /// `alarm::raise` keeps its own count.
    #[cfg(all(feature = "async", not(any(feature = "lua54", feature = "lua55"))))]
    wrapper_left: std::sync::atomic::AtomicU32,
    /// Set when the hook is armed on demand (see `interrupt/alarm`) instead of
    /// ticking all the time: this thread's alarm and the VM's binding.
    pub(super) on_demand: Option<(ThreadAlarm, VmAddrs)>,
    /// The tokens of the requests suspended on this VM (the `async`
    /// feature), by slot: an aborting owner stops them too.
    #[cfg(feature = "async")]
    suspended: Mutex<std::collections::HashMap<usize, CancelToken>>,
}

/// What the hook is told of the VM's options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HookOptions {
    /// Instructions between checks where the hook ticks all the time.
    pub(crate) interval: u32,
    /// Instructions one request may execute.
    pub(crate) budget: Option<u64>,
    /// Tick all the time even where the hook could be armed on demand.
    pub(crate) permanent: bool,
    /// Whether `load` and friends accept binary chunks.
    pub(crate) binary_chunks: bool,
}

impl Interrupt {
    /// Installs the hook on `lua` and registers the state for
    /// [`current_token`](crate::current_token).
    pub(crate) fn install(
        lua: &Lua,
        config: HookOptions,
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
            let jit: mlua::Table = lua.globals().get("jit")?;
            jit.get::<mlua::Function>("off")?.call::<()>(())?;
            jit.get::<mlua::Function>("flush")?.call::<()>(())?;
            if opened {
                lua.globals().set("jit", mlua::Value::Nil)?;
                if let Some(package) = lua.globals().get::<Option<mlua::Table>>("package")? {
                    if let Some(loaded) = package.get::<Option<mlua::Table>>("loaded")? {
                        loaded.set("jit", mlua::Value::Nil)?;
                    }
                }
            }
        }
        let budget = config.budget;
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
            Some(b) => u64::from(config.interval).min(b) as u32,
            None => config.interval,
        };
        let interval = interval.max(1);
        // An instruction budget needs the hook to count all the time; the
        // user may want it ticking anyway (`permanent_hook`).
        let alarm = alarm::this_thread().filter(|_| budget.is_none() && !config.permanent);
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
            #[cfg(all(feature = "async", not(any(feature = "lua54", feature = "lua55"))))]
            wrapper_left: std::sync::atomic::AtomicU32::new(0),
            on_demand,
            #[cfg(feature = "async")]
            suspended: Mutex::new(std::collections::HashMap::new()),
        });
        set_hook(lua, &this, this.interval)?;
        // Luau: no interrupt until a stopper puts it back.
        #[cfg(feature = "luau")]
        if let Some((_, binding)) = &this.on_demand {
            alarm::bind_interrupt(binding)?;
        }
        #[cfg(not(feature = "luau"))]
        if this.on_demand.is_some() {
            // Armed on demand only.
            lua.remove_hook();
            // A Lua thread resumed from Rust (mlua's `Thread` API, which
            // `Function::call_async` uses) passes no tracked switch: mlua's
            // resume event records it instead.
            #[cfg(unix)]
            lua.set_thread_event_callback(
                mlua::thread::ThreadTriggers::ON_RESUME | mlua::thread::ThreadTriggers::ON_YIELD,
                move |_, event| match event {
                    mlua::thread::ThreadEvent::Resume(thread) => {
                        alarm::resumed_from_rust(thread, interval)
                    }
                    mlua::thread::ThreadEvent::Yield(thread) => {
                        alarm::yielded_to_rust(&thread, interval);
                        Ok(())
                    }
                    _ => Ok(()),
                },
            );
        }
        // Before the catchers, which raise again with the `error` they find.
        super::raised::install(lua, &this)?;
        super::catchers::install_wrappers(lua, &this, config.binary_chunks)?;
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
    pub(crate) fn binding(&self) -> Option<VmAddrs> {
        self.on_demand.as_ref().map(|(_, b)| *b)
    }

    /// Stops the running request, if any, with `Shutdown`. Called by an
    /// owner that is aborting, after raising the abort flag: it reaches Rust
    /// callbacks that poll their token, which the hook never interrupts.
    pub(crate) fn abort_running(&self) {
        if let Some(token) = self.current.lock().as_ref() {
            token.stop(Reason::Shutdown);
        }
        #[cfg(feature = "async")]
        self.stop_suspended(Reason::Shutdown);
    }

    /// Stops every request suspended on this VM with `reason` (each
    /// resolves at once; the VM drops its work when it gets to it).
    #[cfg(feature = "async")]
    pub(crate) fn stop_suspended(&self, reason: Reason) {
        let tokens: Vec<CancelToken> = self.suspended.lock().values().cloned().collect();
        for token in tokens {
            token.stop(reason);
        }
    }

    /// Records the request in `slot` as suspended (`Some`) or not.
    #[cfg(feature = "async")]
    pub(crate) fn set_suspended(&self, slot: usize, token: Option<&CancelToken>) {
        let mut suspended = self.suspended.lock();
        match token {
            Some(t) => {
                suspended.insert(slot, t.clone());
            }
            None => {
                suspended.remove(&slot);
            }
        }
    }

    /// True while this VM runs `req` (for the owner's wedge check: a
    /// stopped request's caller has its answer, but its VM may still be in
    /// it).
    pub(crate) fn runs(&self, req: &Arc<dyn crate::request::Cancel>) -> bool {
        self.while_running(req, || ())
    }

    /// Calls `f` if this VM still runs `req`, before the VM can leave it:
    /// its thread's next look at anything `f` changed comes after (`leave`
    /// takes the same lock). True if it did.
    pub(crate) fn while_running(
        &self,
        req: &Arc<dyn crate::request::Cancel>,
        f: impl FnOnce(),
    ) -> bool {
        let current = self.current.lock();
        let running = current.as_ref().is_some_and(|t| t.is_for(req));
        if running {
            f();
        }
        running
    }

    /// The running request's stop reason, if it must stop.
    pub(super) fn stop_reason(&self) -> Option<Reason> {
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
    pub(super) fn interrupt(this: &Arc<Self>, lua: &Lua, reason: Reason) -> mlua::Result<VmState> {
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
        {
            // mlua's wrapper of an async Rust function: a stop that lands
            // in the poll that suspends a request (its future pending, the
            // wrapper about to yield) must not raise there, or the
            // coroutine dies with the future on its stack, dropped only
            // when Lua collects it. The tick lets the wrapper run on,
            // armed: the wrapper yields, the request is found stopped, and
            // its future is dropped by mlua's signal (`vm/coroutine.rs`);
            // anything else the wrapper calls raises. Bounded like
            // `alarm::raise`'s: any chunk can take the wrapper's name.
            #[cfg(feature = "async")]
            if this.wrapper_left.load(Ordering::Relaxed) > 0 && alarm::running_in_async_wrapper(lua)
            {
                // ORDERING: Relaxed: only the VM thread touches the count.
                this.wrapper_left.fetch_sub(1, Ordering::Relaxed);
                Interrupt::stop_running(this, lua)?;
                return Ok(VmState::Continue);
            }
            Interrupt::interrupt(this, lua, reason)
        }
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

    /// Stops raising the interruption on this thread, with no request
    /// entered: a suspended request's futures are dropped now, by resuming
    /// mlua's wrapper, which must not be interrupted (see `vm/coroutine.rs`).
    /// A stop may have fired in the poll that suspended it (the hook ticks
    /// before the instruction that yields). Not used on Lua 5.4 and 5.5,
    /// where the interruption never raises in that wrapper (`alarm::raise`).
    #[cfg(feature = "async")]
    pub(crate) fn quiet(&self) {
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        alarm::end_raising();
    }

    /// Arms the stop machinery for the entered request, whose work is
    /// being dropped because it must stop (a suspended request: `vm/job.rs`):
    /// Lua code that runs meanwhile (its coroutine's `__close` handlers) is
    /// interrupted as if the request had been stopped while running it.
    #[cfg(feature = "async")]
    pub(crate) fn arm_stop(this: &Arc<Self>, lua: &Lua) {
        let _ = Interrupt::stop_running(this, lua);
    }

    /// Counts `n` more instructions of the running request against its
    /// budget, stopping it once the budget is spent.
    fn charge(&self, n: u64) {
        let Some(budget) = self.budget else {
            return;
        };
        // ORDERING: Relaxed: only the VM thread touches the count.
        let executed = match self.executed.load(Ordering::Relaxed) {
            UNCOUNTED => return,
            FIRST_TICK => 0,
            executed => executed.saturating_add(n),
        };
        self.executed.store(executed, Ordering::Relaxed);
        if executed >= budget {
            if let Some(token) = self.current.lock().as_ref() {
                token.stop(Reason::InstructionLimit);
            }
        }
    }

    /// A Lua thread was made while the hook ticks on a count: charges the
    /// instructions it may run before its first tick (its countdown starts
    /// afresh, so a thread that ends sooner is never counted otherwise),
    /// and raises a pending stop. Called by `coroutine.create` and `wrap`
    /// (`alarm/threads.rs`) and for a `task.spawn` child.
    pub(crate) fn thread_made(this: &Arc<Self>, lua: &Lua) -> mlua::Result<()> {
        this.charge(u64::from(this.interval));
        match this.stop_reason() {
            Some(reason) => Interrupt::interrupt(this, lua, reason).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Charges the allocations the memory limit refused since the last
    /// tick (Lua 5.2–5.5: see `alarm/refusals.rs`), each as one instruction
    /// per 8 bytes the VM holds: Lua ran a full collection before refusing
    /// (a full collection of a heap of small tables takes about as long as
    /// 12 to 14 of the cheapest instructions per byte, here). Elsewhere Lua
    /// collects nothing before it refuses, and nothing is counted.
    fn charge_refusals(&self, lua: &Lua) {
        if self.budget.is_none() {
            return;
        }
        let refused = alarm::take_refused();
        if refused > 0 {
            let bytes = u64::try_from(lua.used_memory()).unwrap_or(u64::MAX);
            self.charge(refused.saturating_mul(bytes / 8));
        }
    }

    #[cfg(any(feature = "lua54", feature = "lua55"))]
    /// The sandbox's pattern matcher (`sandbox/pattern`) polls this every so
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
        this.charge_refusals(lua);
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

/// [`Interrupt::thread_made`] on the VM of `lua`, for a Lua thread the
/// crate makes for Lua code (a `task.spawn` child).
#[cfg(feature = "async")]
pub(crate) fn thread_made(lua: &Lua) -> mlua::Result<()> {
    let this = lua.app_data_ref::<Arc<Interrupt>>().map(|i| Arc::clone(&i));
    match this {
        Some(this) if this.on_demand.is_none() => Interrupt::thread_made(&this, lua),
        _ => Ok(()),
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
        // Refusals before the request are not its own.
        if self.budget.is_some() {
            alarm::take_refused();
        }
        // ORDERING: Relaxed: only the VM thread touches the count.
        #[cfg(all(feature = "async", not(any(feature = "lua54", feature = "lua55"))))]
        self.wrapper_left
            .store(alarm::WRAPPER_BUDGET, Ordering::Relaxed);
        self.out_of_memory.store(false, Ordering::Relaxed);
        *self.current.lock() = Some(token.clone());
        // ORDERING: `abort_running` raises the flag before taking the lock we
        // just released, so either it saw this token or we see the flag.
        if self.abort.load(Ordering::SeqCst) {
            token.stop(Reason::Shutdown);
        }
    }

    /// Runs `f`, the crate's own Lua work inside the running request (a
    /// session's environment, opened by its request: `vm/job.rs`), outside
    /// the request's instruction budget, which counts the request's code
    /// from here as from its start. A stop still reaches `f`.
    pub(crate) fn uncounted<R>(&self, f: impl FnOnce() -> R) -> R {
        // ORDERING: Relaxed: only the VM thread touches the count.
        self.executed.store(UNCOUNTED, Ordering::Relaxed);
        let r = f();
        // ORDERING: Relaxed, as above.
        self.executed.store(FIRST_TICK, Ordering::Relaxed);
        r
    }

    /// A suspended request's work runs again, having executed `executed`
    /// instructions so far (see [`executed`](Self::executed)).
    #[cfg(feature = "async")]
    pub(crate) fn enter_again(&self, token: &CancelToken, executed: u64) {
        self.enter(token);
        self.executed.store(executed, Ordering::Relaxed);
    }

    /// The running request's instruction count, to carry over a suspension.
    #[cfg(feature = "async")]
    pub(crate) fn executed(&self) -> u64 {
        self.executed.load(Ordering::Relaxed)
    }

    /// Ends the request; true if its interruption was raised.
    pub(crate) fn leave(&self) -> bool {
        *self.current.lock() = None;
        self.fired.load(Ordering::Relaxed)
    }
}
