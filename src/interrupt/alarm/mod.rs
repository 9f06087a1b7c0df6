//! Arming the interrupt hook on demand, so that Lua code runs at full speed
//! until a request must stop.
//!
//! With a count hook installed, Lua 5.x checks for it on every instruction,
//! which makes pure-Lua code 2–3x slower whatever the interval. So on Unix,
//! and unless the VM counts instructions (`max_instructions`), no hook is
//! installed while a request runs. To stop one, the stopping thread raises
//! the VM thread's [`Alarm`]: it sets the `armed` flag, then sends the VM
//! thread a signal (`SIGURG`), whose handler installs the hook, with a count
//! of 1, on the Lua thread (main state or coroutine) running at that moment.
//! This is how Lua's own `lua.c` stops a script on Ctrl-C, and what
//! `lua_sethook` is written for (its comment in `ldebug.c`: "This function can
//! be called during a signal, under reasonable assumptions").
//!
//! The hook then ticks on the next instruction; `hook.rs` checks the
//! request's stop reason and raises the interruption, or removes itself if
//! there is nothing to stop (a late signal for a request that has finished).
//!
//! # Knowing which Lua thread runs
//!
//! A hook set on one `lua_State` does not reach another, and a coroutine
//! already running has its own. So every switch between Lua threads goes
//! through this module: `coroutine.resume`, `coroutine.wrap` and (Lua 5.4
//! on) `coroutine.close` are replaced by C functions of ours
//! (`tracked_resume`, `tracked_wrap`, `tracked_close`), which record the
//! state about to run in the thread-local `Slot` before calling Lua's own
//! resume or close, and the caller's state after it returns. After recording a
//! switch, they check `armed` themselves and arm the new state if it is set:
//! a signal that landed just before the switch armed the state being left.
//!
//! Coroutines resumed by Rust code through mlua's `Thread` API are not
//! tracked: mlua's thread event callback (`ON_RESUME`, set by `hook.rs`)
//! gives each the VM's hook before it runs, ticking every `hook_interval`
//! instructions ([`hook_resumed_from_rust`]), so those stay cancellable, at
//! the old price.
//!
//! # The handshake with a stopping thread
//!
//! The VM thread, before it marks a request `RUNNING`, clears `armed` and
//! stores its alarm id in the request header; the `RUNNING` CAS publishes
//! both. A stopping thread records the stop reason, fails to resolve the
//! request as queued (seeing `RUNNING`, hence the id), and calls [`raise`].
//! So either the request never runs, or the stopper signals the VM thread,
//! which by then runs it (or has finished it: a late signal only costs one
//! hook tick).
//!
//! # Why this is sound
//!
//! - **The handler touches only its own thread's Lua.** It runs on the VM
//!   thread it interrupted and reads that thread's `Slot`; the only Lua call
//!   it makes is `lua_sethook` on the state recorded as running, which Lua
//!   documents as safe to call from a signal handler (it stores the hook,
//!   its count and mask, and sets the `trap` flag of the frames on the call
//!   chain, all of which the interrupted code tolerates changing under it).
//!   It allocates nothing, takes no lock, and calls no Rust code that could
//!   panic.
//! - **Every state it may arm is alive.** The main state is recorded by
//!   `begin` and forgotten by `unbind` before its VM is dropped (the VM is
//!   dropped on its own thread, so no signal handler can run in between).
//!   A coroutine is recorded only while Lua's resume (or close) runs it,
//!   and it is the resumer's argument 1, so it cannot be collected; the
//!   resumer's state is recorded again as soon as that call returns, which
//!   it always does: given a coroutine, Lua's resume and close (5.2–5.5)
//!   return their errors instead of raising them (Lua 5.1's resume raises
//!   some, which is why 5.1 is not supported here).
//! - **The signal reaches a live thread.** `raise` sends it while holding
//!   the alarm's thread lock; a VM thread clears its id under that lock
//!   before it exits, so the `pthread_t` is valid whenever it is used.
//! - **The tracked functions are well-formed Lua C functions.** They use
//!   only the stack slots Lua guarantees (`LUA_MINSTACK`), and their frames
//!   own nothing: when Lua's error handling `longjmp`s over them (an
//!   argument error, the interruption raised by the check), nothing is
//!   left undone but the switch record, which is only ever skipped on the
//!   paths argued above not to raise.
//! - **Luau's interrupt is written from other threads** (`mod luau`), as
//!   Luau's `lua.h` allows for that one field, and always atomically on
//!   our side. A stopper writes it only under the alarm's `vm_lock`, while
//!   the address it writes to is set; the VM thread clears that address
//!   under the same lock before the VM is dropped.
//!
//! Everything `unsafe` in the crate is in this module, but for the Lua C
//! functions of `native.rs` (Lua 5.1 and LuaJIT only), which argue their own
//! soundness. What lives here:
//!
//! - the alarm, its signal handler and the tracked coroutine switches
//!   (`mod unix`), described above;
//! - Luau's interrupt, armed on demand (`mod luau`);
//! - Lua 5.4/5.5's C hooks: the tick, and raising the interruption from
//!   the next instruction (`mod raise`);
//! - Lua 5.2–5.5's catchers as C functions, invisible to Lua code:
//!   `pcall`, `xpcall`, `load`, `loadfile`, `dofile` and the untracked
//!   `coroutine.resume` (`mod protected`, which argues its own soundness);
//! - `new_lua_with_unsafe_libs`, for the host's `unsafe_std_libs`.

// Luau has no hooks to arm: only the alarm, its interrupt (`mod luau`),
// the stubs below and `SUPPORTED` are used.
#![cfg_attr(feature = "luau", allow(dead_code))]

#[cfg(any(feature = "lua51", feature = "luajit"))]
pub(crate) mod native;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{const_rwlock, RwLock};

/// The per-VM-thread flag stoppers raise, and how to reach the thread.
pub(crate) struct Alarm {
    /// True while the running request must stop: hooks must tick on every
    /// Lua thread that runs.
    armed: AtomicBool,
    #[cfg(all(unix, not(feature = "luau")))]
    thread: parking_lot::Mutex<Option<libc::pthread_t>>,
    /// Luau: the address of the callback table of the VM this thread runs
    /// (0: none yet, or dropped), which `raise` writes the interrupt into.
    /// Written by the VM thread under `vm_lock`, read by stoppers under it.
    #[cfg(feature = "luau")]
    callbacks: std::sync::atomic::AtomicUsize,
    #[cfg(feature = "luau")]
    vm_lock: parking_lot::Mutex<()>,
}

/// Alarms of live VM threads; a request header stores `index + 1`.
static ALARMS: RwLock<Vec<Option<Arc<Alarm>>>> = const_rwlock(Vec::new());

/// Whether hooks can be armed on demand here: on Unix, for the PUC-Rio Lua
/// backends from 5.2 on. Not Lua 5.1: its `coroutine.resume` raises "too
/// many arguments to resume" (`luaL_error`) instead of returning it, which
/// would skip the switch back in [`tracked_resume`] and leave a suspended
/// coroutine recorded as running. Not LuaJIT (its hook is per VM, and traces
/// never call it) nor Luau (no hooks: an interrupt callback instead).
pub(crate) const SUPPORTED: bool = cfg!(all(
    unix,
    any(
        feature = "lua52",
        feature = "lua53",
        feature = "lua54",
        feature = "lua55"
    )
));

/// Stops the request running on the VM thread with alarm `id` (0: none).
/// Called by a stopping thread after recording the stop reason.
pub(crate) fn raise(id: u32) {
    if id == 0 {
        return;
    }
    let alarms = ALARMS.read();
    let Some(Some(alarm)) = alarms.get(id as usize - 1) else {
        return;
    };
    // ORDERING: SeqCst, after the reason was stored: whoever sees `armed`
    // (the signal handler, the tracked switches, the hook) sees the reason.
    // A swap, not a store: a read-modify-write continues the release
    // sequence of a raise for the same request that came first.
    alarm.armed.swap(true, Ordering::SeqCst);
    #[cfg(all(unix, not(feature = "luau")))]
    {
        // Holding the lock keeps the thread from exiting (its guard clears
        // the id under this lock first), so the `pthread_t` is live.
        let thread = alarm.thread.lock();
        if let Some(t) = *thread {
            // SAFETY: `t` names a live thread (see above), and the handler is
            // installed before any thread id is registered. A failure can
            // only be ESRCH (not possible, as argued) and is harmless.
            unsafe {
                libc::pthread_kill(t, unix::SIGNAL);
            }
        }
    }
    #[cfg(feature = "luau")]
    luau::arm(alarm);
}

/// This thread's alarm, registered on first use and unregistered when the
/// thread exits. Returns `None` where arming on demand is not supported
/// (Luau's interrupt is armed on demand everywhere: see `mod luau`).
pub(crate) fn this_thread() -> Option<ThreadAlarm> {
    if !SUPPORTED && !cfg!(feature = "luau") {
        return None;
    }
    GUARD.with(|g| {
        let mut g = g.borrow_mut();
        let guard = g.get_or_insert_with(Registration::new);
        Some(ThreadAlarm {
            id: guard.id,
            alarm: guard.alarm.clone(),
        })
    })
}

thread_local! {
    static GUARD: std::cell::RefCell<Option<Registration>> = const { std::cell::RefCell::new(None) };
}

/// A VM thread's registration, owned by the thread; dropped when it exits.
struct Registration {
    id: u32,
    alarm: Arc<Alarm>,
}

impl Registration {
    fn new() -> Registration {
        #[cfg(all(unix, not(feature = "luau")))]
        {
            unix::install_handler();
            unix::unblock();
        }
        let alarm = Arc::new(Alarm {
            armed: AtomicBool::new(false),
            #[cfg(all(unix, not(feature = "luau")))]
            // SAFETY: `pthread_self` has no preconditions.
            thread: parking_lot::Mutex::new(Some(unsafe { libc::pthread_self() })),
            #[cfg(feature = "luau")]
            callbacks: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(feature = "luau")]
            vm_lock: parking_lot::Mutex::new(()),
        });
        let index = {
            let mut alarms = ALARMS.write();
            match alarms.iter().position(Option::is_none) {
                Some(i) => {
                    alarms[i] = Some(alarm.clone());
                    i
                }
                None => {
                    alarms.push(Some(alarm.clone()));
                    alarms.len() - 1
                }
            }
        };
        SLOT.with(|s| {
            s.armed
                .store(Arc::as_ptr(&alarm) as *mut Alarm, Ordering::SeqCst)
        });
        Registration {
            id: index as u32 + 1,
            alarm,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // First the handler: from now on it ignores signals on this thread.
        SLOT.with(|s| {
            s.armed.store(std::ptr::null_mut(), Ordering::SeqCst);
            s.running.store(std::ptr::null_mut(), Ordering::SeqCst);
            s.main.store(std::ptr::null_mut(), Ordering::SeqCst);
            s.hook.store(0, Ordering::SeqCst);
        });
        #[cfg(all(unix, not(feature = "luau")))]
        {
            *self.alarm.thread.lock() = None;
        }
        ALARMS.write()[self.id as usize - 1] = None;
    }
}

/// A handle to the current VM thread's alarm, for the hook and the VM.
#[derive(Clone)]
pub(crate) struct ThreadAlarm {
    id: u32,
    alarm: Arc<Alarm>,
}

impl ThreadAlarm {
    /// The id a request header stores.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// Before a request runs: nothing to stop yet.
    pub(crate) fn clear(&self) {
        self.alarm.armed.store(false, Ordering::SeqCst);
    }

    /// True while the running request must stop.
    pub(crate) fn is_armed(&self) -> bool {
        self.alarm.armed.load(Ordering::SeqCst)
    }

    /// Marks the running request as stopping (the hook found its reason):
    /// every Lua thread switched to from now on is armed.
    pub(crate) fn set_armed(&self) {
        self.alarm.armed.store(true, Ordering::SeqCst);
    }

    /// Clears `armed` and returns whether it was set.
    pub(crate) fn take(&self) -> bool {
        self.alarm.armed.swap(false, Ordering::SeqCst)
    }
}

impl std::fmt::Debug for ThreadAlarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadAlarm").field("id", &self.id).finish()
    }
}

#[cfg(all(unix, not(feature = "luau")))]
pub(crate) use unix::{
    begin, bind, disarm_main, disarm_running, hook_resumed_from_rust, rearm_running,
    tracked_resume_close, tracked_wrap_with, unbind,
};

/// A VM's main state and hook function, as addresses (see [`bind`]). On
/// Luau, `main` is the address of the VM's callback table instead, and
/// `hook` is unused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding {
    main: usize,
    hook: usize,
}

#[cfg(feature = "luau")]
pub(crate) use luau::{
    begin, bind, bind_interrupt, disarm_main, disarm_running, rearm_running, unbind,
};

/// Off Unix (and not Luau) hooks are never armed on demand: these are
/// never called.
#[cfg(all(not(unix), not(feature = "luau")))]
pub(crate) fn bind(_lua: &mlua::Lua) -> mlua::Result<Binding> {
    unreachable!("alarms are not supported here")
}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(crate) fn begin(_vm: &Binding) {}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(crate) fn unbind(_vm: &Binding) {}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(crate) fn rearm_running() {}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(crate) fn disarm_main() {}

/// No coroutine switches to track: Luau's interrupt is per VM, and off Unix
/// nothing is armed on demand.
#[cfg(not(all(unix, not(feature = "luau"))))]
pub(crate) fn tracked_resume_close(
    _lua: &mlua::Lua,
    _check: &mlua::Function,
) -> mlua::Result<(mlua::Function, Option<mlua::Function>)> {
    unreachable!("alarms are not supported here")
}

#[cfg(not(all(unix, not(feature = "luau"))))]
pub(crate) fn tracked_wrap_with(
    _lua: &mlua::Lua,
    _wrap_error: &mlua::Function,
) -> mlua::Result<mlua::Function> {
    unreachable!("alarms are not supported here")
}

#[cfg(all(not(unix), not(feature = "luau")))]
pub(crate) fn disarm_running(_lua: &mlua::Lua) -> bool {
    false
}

/// Lua 5.4 and 5.5: raising the interruption from a C hook of ours.
///
/// mlua's hook trampoline (no longer used here: see [`tick_hook`]) raises a
/// hook's error after `lua_settop(L, 0)` (or 1) on the hook's
/// frame, which in a count hook is the running Lua function's frame: Lua
/// closes that function's to-be-closed variables right there, inside the
/// hook, where hooks are disabled (`allowhook` is 0). A `__close` handler
/// that loops would then never be stopped: cancel, time limits, budgets and
/// shutdown all hang. So the hook never raises through mlua: it installs
/// [`raise_hook`] on the running Lua thread instead, and returns. On the next
/// instruction `raise_hook` raises with `lua_error` straight away, as
/// `lua.c` stops a script; Lua's protected call that catches it restores
/// `allowhook` before it closes the variables, so their handlers run with
/// `raise_hook` still set, and are interrupted in turn.
///
/// `raise_hook` raises while the VM thread is stopping a request
/// ([`raise_from_next_instruction`] until [`end_raising`]); a thread that
/// still has it afterwards (a coroutine that survived the stop, resumed
/// later) gets the VM's hook ([`tick_hook`]) back, ticking at the count it had.
#[cfg(any(feature = "lua54", feature = "lua55"))]
mod raise {
    use std::cell::Cell;
    use std::ffi::c_int;

    use mlua::ffi::{self, lua_Debug, lua_State};

    thread_local! {
        /// True while this VM thread's request must stop.
        static STOPPING: Cell<bool> = const { Cell::new(false) };
        /// The VM's hook function (as an address) and the count to give a
        /// thread whose `raise_hook` finds nothing to stop.
        static RESTORE: Cell<(usize, c_int)> = const { Cell::new((0, 0)) };
    }

    /// The message of the error `raise_hook` raises (the request resolves
    /// with its stop reason, whatever the error says).
    const MESSAGE: &std::ffi::CStr = c"mlua-isle: the request must stop";

    /// From the VM's tick (or a Rust function called from Lua), on the VM
    /// thread: the Lua thread running now raises on its next instruction,
    /// and on every one after, until [`end_raising`]. `count` is the count
    /// the hook ticks at on this VM.
    pub(crate) fn raise_from_next_instruction(lua: &mlua::Lua, count: u32) {
        let state = lua.current_thread().to_pointer() as *mut lua_State;
        STOPPING.set(true);
        // SAFETY: `state` is the Lua thread running on this OS thread (we
        // are called from its hook or from a function it called), alive
        // while it runs; `lua_gethook` and `lua_sethook` only read and
        // store its hook fields.
        unsafe {
            if let Some(hook) = ffi::lua_gethook(state) {
                if hook as usize != raise_hook as *const () as usize {
                    let count = c_int::try_from(count).unwrap_or(c_int::MAX);
                    RESTORE.set((hook as usize, count));
                }
            }
            ffi::lua_sethook(state, Some(raise_hook), ffi::LUA_MASKCOUNT, 1);
        }
    }

    /// After a request: `raise_hook` raises no more on this thread.
    pub(crate) fn end_raising() {
        STOPPING.set(false);
    }

    /// The registry key (its address) of the VM's tick function.
    static TICK_KEY: u8 = 0;

    fn tick_key() -> *const std::ffi::c_void {
        std::ptr::addr_of!(TICK_KEY).cast()
    }

    /// Makes `tick` the function [`tick_hook`] calls on `lua`'s VM.
    pub(crate) fn set_tick(lua: &mlua::Lua, tick: &mlua::Function) -> mlua::Result<()> {
        // SAFETY: `exec_raw` pushes `tick` and runs the closure protected;
        // `lua_rawsetp` pops it into the registry, leaving the stack as it
        // was.
        unsafe {
            lua.exec_raw::<()>(tick, |state| {
                ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, tick_key());
            })
        }
    }

    /// Sets [`tick_hook`] on the Lua thread running now (the main state,
    /// outside requests), ticking every `every` instructions.
    pub(crate) fn tick_every(lua: &mlua::Lua, every: u32) {
        let state = lua.current_thread().to_pointer() as *mut lua_State;
        let every = c_int::try_from(every).unwrap_or(c_int::MAX).max(1);
        // SAFETY: `state` is a live thread of `lua`, used on its own OS
        // thread; `lua_sethook` only stores its hook fields.
        unsafe { ffi::lua_sethook(state, Some(tick_hook), ffi::LUA_MASKCOUNT, every) };
    }

    /// The VM's count hook on Lua 5.4 and 5.5: calls the VM's tick function
    /// (a Rust function, through mlua), if one is set yet.
    ///
    /// Not mlua's hook trampoline: it runs the callback on the hook's frame,
    /// which in a count hook is the running Lua function's, and when mlua's
    /// pool of preallocated error values is empty (after a Rust callback
    /// raised an error) it makes one and moves it to the bottom of that
    /// frame with `lua_insert(L, 1)`. That moves the function's
    /// to-be-closed variables: Lua 5.5 checks and aborts ("moving a
    /// to-be-closed slot"), 5.4 does not check and closes the wrong value
    /// later. Called through `lua_call`, the tick gets a C frame of its own,
    /// whose bottom holds nothing but what mlua put there.
    unsafe extern "C-unwind" fn tick_hook(state: *mut lua_State, _ar: *mut lua_Debug) {
        // SAFETY: a hook may push values (Lua keeps LUA_MINSTACK free slots
        // for it) and call functions; the registry lookup by a light
        // userdata key allocates nothing. The tick raises only Lua errors
        // (mlua catches Rust panics in its callback), which unwind Lua's C
        // frames to the nearest protected call, as an error of mlua's hook
        // would.
        unsafe {
            if ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, tick_key()) == ffi::LUA_TFUNCTION {
                ffi::lua_call(state, 0, 0);
            } else {
                ffi::lua_pop(state, 1);
            }
        }
    }

    /// Raises the interruption, or gives the thread the VM's hook back when
    /// nothing is stopping (see the module docs).
    unsafe extern "C-unwind" fn raise_hook(state: *mut lua_State, _ar: *mut lua_Debug) {
        if STOPPING.get() {
            // SAFETY: a hook may push a value (Lua keeps LUA_MINSTACK free
            // slots for it) and raise an error, which unwinds only Lua's
            // own C frames (`luaD_hook`, the interpreter) to the nearest
            // protected call: no Rust frame is skipped.
            unsafe {
                ffi::lua_pushstring(state, MESSAGE.as_ptr());
                ffi::lua_error(state);
            }
        }
        let (hook, count) = RESTORE.get();
        // SAFETY: `hook` is 0 or the address of the VM's `lua_Hook` (stored
        // above from `lua_gethook`; function pointers and `usize` have the
        // same size); `state` is the running thread.
        unsafe {
            if hook == 0 {
                ffi::lua_sethook(state, None, 0, 0);
            } else {
                let hook: ffi::lua_Hook = std::mem::transmute(hook);
                ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, count.max(1));
            }
        }
    }
}

#[cfg(any(feature = "lua54", feature = "lua55"))]
pub(crate) use raise::{end_raising, raise_from_next_instruction, set_tick, tick_every};

/// Lua 5.2–5.5: the catchers `hook.rs` wraps, as C functions, so that
/// they stay invisible to Lua code: a C function reports no line events to
/// a debug hook, and in `debug.traceback()` or `debug.getinfo(level)` it
/// stands where Lua's own function would, under the same name (found in
/// the globals, where it is installed).
///
/// - `pcall` and `xpcall` are Lua's own (`luaB_pcall`, `luaB_xpcall`,
///   `finishpcall` of `lbaselib.c`), built on `lua_pcallk` with a
///   continuation, so they stay yieldable and return what Lua's return. On
///   an error, the error value goes to the interruption check (upvalue
///   [`CHECK`]: it raises a pending interruption, resumes a wrapped Rust
///   panic, flags a memory error) before `false, error` is returned.
/// - `xpcall` runs the user's message handler through [`handler`], a C
///   closure made per call, which records the error value it saw (the
///   check gets it too: a handler may turn a Rust panic into a string) and
///   skips the user's handler while the request is stopping (an error
///   raised inside a hook runs the handler with hooks off, where a handler
///   that loops could never be stopped).
/// - `load` (and 5.2's `loadstring`), `loadfile`: Lua's own C function is
///   called on our own frame (so its argument errors name and place
///   themselves as Lua's), after the caller's mode is narrowed to text
///   (unless binary chunks are allowed); a mode refusing text keeps
///   refusing it, and then a binary string or a reader's binary first piece
///   is refused by us. A failed load's message goes to the check.
/// - `dofile`: Lua's, loading text only, yieldable (`lua_callk`).
/// - `coroutine.resume` where switches are not tracked: Lua's, called on
///   our frame, with a failed resume's error value given to the check.
///
/// # Why this is sound
///
/// - **Stack slots.** A C function gets `LUA_MINSTACK` (20) free slots
///   above its arguments, in a call and in a continuation. These functions
///   push at most four values above what they found (or, after a failed
///   protected call, above the error value, which sits below where the
///   arguments ended), and before handing their frame to one of Lua's own
///   functions they grow the stack again by `LUA_MINSTACK`
///   (`luaL_checkstack`, which raises Lua's "stack overflow" if it cannot).
/// - **Upvalues.** Every closure is made here ([`closure`],
///   `lua_pushcclosure` in [`xpcall`]) with the upvalues the function
///   reads, at the indices named by the constants below; the originals are
///   checked to be C functions without upvalues (Lua's base library
///   registers them so) before they are ever called on our frames.
/// - **Errors.** Lua raises errors through these frames with `longjmp`
///   (an argument error, the check's interruption, the callee's error
///   rethrown by `lua_error`). Their Rust frames own nothing with a
///   destructor, only integers, pointers and borrowed C strings, so
///   nothing is skipped. They are `extern "C-unwind"` as Lua C functions
///   are declared by mlua: should a Rust panic ever unwind through (mlua
///   catches them in its callbacks, so none does), it would unwind rather
///   than abort.
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
mod protected {
    use std::ffi::c_int;

    use mlua::ffi::{self, lua_State};

    /// Upvalue 1 of every function here: the interruption check, a
    /// function taking the error values a catcher saw.
    const CHECK: c_int = 1;
    /// Upvalue 2: `xpcall`'s `stopping` (a function returning whether the
    /// request stops); for the others, Lua's own function.
    const STOPPING: c_int = 2;
    const ORIGINAL: c_int = 2;
    /// Upvalue 3 of `load`, `loadfile`, `dofile`: whether binary chunks
    /// are allowed.
    const BINARY_OK: c_int = 3;

    /// Upvalues of [`handler`]: the user's handler, `stopping`, and the
    /// last error value the handler saw.
    const USER_HANDLER: c_int = 1;
    const HANDLER_STOPPING: c_int = 2;
    const SEEN: c_int = 3;

    /// `xpcall`'s continuation context (`pcall`'s is 0): where the
    /// results start, as in Lua's `luaB_xpcall`.
    const XPCALL: c_int = 2;

    /// The message of a binary chunk refused (Lua's own, for mode `'t'`).
    const REFUSED: &std::ffi::CStr = c"attempt to load a binary chunk (mode is 't')";

    /// Calls the check with `n` values from the top of the stack (left
    /// there).
    ///
    /// # Safety
    /// Called from one of this module's closures, whose upvalue [`CHECK`]
    /// is the check, with at least `n` values on the stack and `n + 1`
    /// slots free.
    unsafe fn check(state: *mut lua_State, n: c_int) {
        // SAFETY: as the caller guarantees; the check returns nothing or
        // raises (through our frame, which owns nothing).
        unsafe {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(CHECK));
            for _ in 0..n {
                ffi::lua_pushvalue(state, -(n + 1));
            }
            ffi::lua_call(state, n, 0);
        }
    }

    /// After a protected call: on an error (on top), hands it to the check
    /// (`xpcall`: with the one its handler saw, first) and returns `false,
    /// error`; otherwise returns the results above `extra` values. Lua's
    /// `finishpcall` (5.3–5.5), checked.
    ///
    /// # Safety
    /// A continuation of [`pcall`] or [`xpcall`] (their frame).
    #[cfg(not(feature = "lua52"))]
    unsafe extern "C-unwind" fn finish(
        state: *mut lua_State,
        status: c_int,
        extra: ffi::lua_KContext,
    ) -> c_int {
        // SAFETY: the frame is `pcall`'s or `xpcall`'s: after an error, the
        // stack holds `true` (xpcall: `f`, the handler, `true`) and the
        // error value, far below LUA_MINSTACK; at index 2 of `xpcall`'s is
        // our `handler` closure, whose upvalue SEEN exists.
        unsafe {
            if status != ffi::LUA_OK && status != ffi::LUA_YIELD {
                if extra == XPCALL as ffi::lua_KContext {
                    ffi::lua_getupvalue(state, 2, SEEN);
                    ffi::lua_pushvalue(state, -2);
                    check(state, 2);
                    ffi::lua_pop(state, 2);
                } else {
                    check(state, 1);
                }
                ffi::lua_pushboolean(state, 0);
                ffi::lua_pushvalue(state, -2);
                return 2;
            }
            ffi::lua_gettop(state) - extra as c_int
        }
    }

    /// `pcall(f, ...)`; upvalue 1: the check. Lua's `luaB_pcall` (5.3–5.5).
    #[cfg(not(feature = "lua52"))]
    unsafe extern "C-unwind" fn pcall(state: *mut lua_State) -> c_int {
        // SAFETY: `luaL_checkany` raises Lua's argument error; one push
        // (`true`), within LUA_MINSTACK; the protected call replaces `f`
        // and its arguments by the results or the error value.
        unsafe {
            ffi::luaL_checkany(state, 1);
            ffi::lua_pushboolean(state, 1);
            ffi::lua_insert(state, 1);
            let n = ffi::lua_gettop(state) - 2;
            let status = ffi::lua_pcallk(state, n, ffi::LUA_MULTRET, 0, 0, Some(finish));
            finish(state, status, 0)
        }
    }

    /// `xpcall(f, handler, ...)`; upvalues: the check, `stopping`. Lua's
    /// `luaB_xpcall` (5.3–5.5), with the user's handler behind ours.
    #[cfg(not(feature = "lua52"))]
    unsafe extern "C-unwind" fn xpcall(state: *mut lua_State) -> c_int {
        // SAFETY: `luaL_checktype` raises Lua's argument error. Three
        // pushes make our handler (replacing the user's at index 2), two
        // more `true` and `f`: within LUA_MINSTACK. After the rotation the
        // stack is `f, handler, true, f, args...`, as in Lua's.
        unsafe {
            let n = ffi::lua_gettop(state);
            ffi::luaL_checktype(state, 2, ffi::LUA_TFUNCTION);
            push_handler(state);
            ffi::lua_pushboolean(state, 1);
            ffi::lua_pushvalue(state, 1);
            ffi::lua_rotate(state, 3, 2);
            let status = ffi::lua_pcallk(
                state,
                n - 2,
                ffi::LUA_MULTRET,
                2,
                XPCALL as ffi::lua_KContext,
                Some(finish),
            );
            finish(state, status, XPCALL as ffi::lua_KContext)
        }
    }

    /// Lua 5.2's `finishpcall`, checked: the status replaces slot 1 (`nil`
    /// for `pcall`, the handler for `xpcall`).
    ///
    /// # Safety
    /// On the frame of [`pcall`] or [`xpcall`], after their protected call.
    #[cfg(feature = "lua52")]
    unsafe fn finish(state: *mut lua_State, ok: bool, ctx: c_int) -> c_int {
        // SAFETY: as in 5.3's `finish`; 5.2's `xpcall` has our handler at
        // index 1. `lua_checkstack` grants the status's slot or says there
        // is none, as in Lua's own.
        unsafe {
            if !ok {
                if ctx == XPCALL {
                    ffi::lua_getupvalue(state, 1, SEEN);
                    ffi::lua_pushvalue(state, -2);
                    check(state, 2);
                    ffi::lua_pop(state, 2);
                } else {
                    check(state, 1);
                }
            }
            if ffi::lua_checkstack(state, 1) == 0 {
                ffi::lua_settop(state, 0);
                ffi::lua_pushboolean(state, 0);
                ffi::lua_pushstring(state, c"stack overflow".as_ptr());
                return 2;
            }
            ffi::lua_pushboolean(state, c_int::from(ok));
            ffi::lua_replace(state, 1);
            ffi::lua_gettop(state)
        }
    }

    /// Lua 5.2's continuation of both: the status says yielded (fine) or
    /// an error recovered from.
    #[cfg(feature = "lua52")]
    unsafe extern "C-unwind" fn resumed(state: *mut lua_State) -> c_int {
        let mut ctx = 0;
        // SAFETY: our continuation's frame.
        unsafe {
            let status = ffi::lua_getctx(state, &mut ctx);
            finish(state, status == ffi::LUA_YIELD, ctx)
        }
    }

    /// Lua 5.2's `pcall`.
    #[cfg(feature = "lua52")]
    unsafe extern "C-unwind" fn pcall(state: *mut lua_State) -> c_int {
        // SAFETY: as in 5.3's; Lua 5.2's layout: a slot for the status,
        // then `f` and its arguments.
        unsafe {
            ffi::luaL_checkany(state, 1);
            ffi::lua_pushnil(state);
            ffi::lua_insert(state, 1);
            let n = ffi::lua_gettop(state) - 2;
            let status = ffi::lua_pcallk(state, n, ffi::LUA_MULTRET, 0, 0, Some(resumed));
            finish(state, status == ffi::LUA_OK, 0)
        }
    }

    /// Lua 5.2's `xpcall`: any handler value (5.2 checks only that there
    /// is one).
    #[cfg(feature = "lua52")]
    unsafe extern "C-unwind" fn xpcall(state: *mut lua_State) -> c_int {
        // SAFETY: as in 5.3's; Lua 5.2's layout: the handler (ours) at 1,
        // `f` at 2, its arguments.
        unsafe {
            let n = ffi::lua_gettop(state);
            if n < 2 {
                ffi::luaL_argerror(state, 2, c"value expected".as_ptr());
            }
            push_handler(state);
            ffi::lua_pushvalue(state, 1); // exchange `f`...
            ffi::lua_copy(state, 2, 1); // ...and the handler
            ffi::lua_replace(state, 2);
            let status = ffi::lua_pcallk(state, n - 2, ffi::LUA_MULTRET, 1, XPCALL, Some(resumed));
            finish(state, status == ffi::LUA_OK, XPCALL)
        }
    }

    /// Replaces the user's handler (index 2) with our [`handler`] over it.
    ///
    /// # Safety
    /// On [`xpcall`]'s frame, with at least two arguments.
    unsafe fn push_handler(state: *mut lua_State) {
        // SAFETY: three pushes, within LUA_MINSTACK; upvalue STOPPING of
        // `xpcall` is `stopping`; the closure pops the three.
        unsafe {
            ffi::lua_pushvalue(state, 2);
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(STOPPING));
            ffi::lua_pushnil(state);
            ffi::lua_pushcclosure(state, handler, 3);
            ffi::lua_replace(state, 2);
        }
    }

    /// `xpcall`'s message handler: records the error value, and hands it to
    /// the user's handler unless the request is stopping.
    unsafe extern "C-unwind" fn handler(state: *mut lua_State) -> c_int {
        // SAFETY: Lua calls a message handler with the error value and
        // takes one result. Upvalues: as made in `push_handler`. At most
        // two pushes, within LUA_MINSTACK.
        unsafe {
            ffi::lua_settop(state, 1);
            ffi::lua_pushvalue(state, 1);
            ffi::lua_replace(state, ffi::lua_upvalueindex(SEEN));
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(HANDLER_STOPPING));
            ffi::lua_call(state, 0, 1);
            let stopping = ffi::lua_toboolean(state, -1) != 0;
            ffi::lua_pop(state, 1);
            if stopping {
                return 1;
            }
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(USER_HANDLER));
            ffi::lua_insert(state, 1);
            ffi::lua_call(state, 1, 1);
            1
        }
    }

    /// Calls Lua's own function (upvalue [`ORIGINAL`]) on our frame, with
    /// the room Lua gives a C function; returns its result count.
    ///
    /// # Safety
    /// From one of this module's closures made by [`closure`], whose
    /// original was checked to be a C function without upvalues.
    unsafe fn original(state: *mut lua_State) -> c_int {
        // SAFETY: the caller guarantees the upvalue; `luaL_checkstack`
        // raises "stack overflow" where Lua would refuse a C call.
        unsafe {
            let f = ffi::lua_tocfunction(state, ffi::lua_upvalueindex(ORIGINAL));
            ffi::luaL_checkstack(state, ffi::LUA_MINSTACK, std::ptr::null());
            match f {
                Some(f) => f(state),
                None => ffi::luaL_error(state, c"mlua-isle: not a C function".as_ptr()),
            }
        }
    }

    /// After Lua's `load` or `loadfile` returned `n` results: a failure
    /// (`nil` or `fail`, then the message) is handed to the check.
    ///
    /// # Safety
    /// As [`check`], with the `n` results on top.
    unsafe fn check_load(state: *mut lua_State, n: c_int) -> c_int {
        // SAFETY: as the caller guarantees; two pushes are free (a C
        // function's results are within its room).
        unsafe {
            if n >= 2 && ffi::lua_isnil(state, -n) != 0 {
                check(state, 1);
            }
        }
        n
    }

    /// True if the value at `idx` is a mode string (or number) containing
    /// `c`.
    ///
    /// # Safety
    /// `idx` is a valid index of `state`'s running frame.
    unsafe fn mode_has(state: *mut lua_State, idx: c_int, c: u8) -> bool {
        let mut len = 0;
        // SAFETY: for a string or number, `lua_tolstring` returns a pointer
        // to `len` bytes owned by the stack slot (a number is converted in
        // place, as Lua's `luaL_optstring` would), read before anything is
        // popped.
        unsafe {
            let p = ffi::lua_tolstring(state, idx, &mut len);
            !p.is_null() && std::slice::from_raw_parts(p.cast::<u8>(), len).contains(&c)
        }
    }

    /// True for an absent or `nil` value, or a string or number: what
    /// Lua's `luaL_optstring` accepts.
    ///
    /// # Safety
    /// `idx` is an index of the running frame.
    unsafe fn optional_string(state: *mut lua_State, idx: c_int) -> bool {
        // SAFETY: `lua_type` accepts any acceptable index.
        let t = unsafe { ffi::lua_type(state, idx) };
        matches!(
            t,
            ffi::LUA_TNONE | ffi::LUA_TNIL | ffi::LUA_TSTRING | ffi::LUA_TNUMBER
        )
    }

    /// Sets argument `idx` to the mode `"t"`, filling absent arguments
    /// below it with `nil` (which Lua's functions take as absent).
    ///
    /// # Safety
    /// On our frame; `idx` ≤ 3.
    unsafe fn text_mode(state: *mut lua_State, idx: c_int) {
        // SAFETY: at most three slots above the arguments, plus one push.
        unsafe {
            if ffi::lua_gettop(state) < idx {
                ffi::lua_settop(state, idx);
            }
            ffi::lua_pushstring(state, c"t".as_ptr());
            ffi::lua_replace(state, idx);
        }
    }

    /// `load(chunk, name, mode, env)` (and 5.2's `loadstring`); upvalues:
    /// the check, Lua's function, whether binary chunks are allowed.
    unsafe extern "C-unwind" fn load(state: *mut lua_State) -> c_int {
        // SAFETY: upvalues as made by `closure`; every index read is an
        // argument slot (absent ones read as none). What is pushed or
        // replaced stays within the first three argument slots plus one.
        unsafe {
            if ffi::lua_toboolean(state, ffi::lua_upvalueindex(BINARY_OK)) == 0 {
                let chunk = ffi::lua_type(state, 1);
                // Anything else: Lua's function raises its argument error.
                let chunk_ok = matches!(
                    chunk,
                    ffi::LUA_TSTRING | ffi::LUA_TNUMBER | ffi::LUA_TFUNCTION
                );
                let mode = ffi::lua_type(state, 3);
                if chunk_ok && optional_string(state, 3) && !mode_has(state, 3, b'B') {
                    if mode == ffi::LUA_TNONE || mode == ffi::LUA_TNIL || mode_has(state, 3, b't') {
                        // The caller's mode, narrowed to text.
                        text_mode(state, 3);
                    } else if chunk == ffi::LUA_TSTRING {
                        // The caller's mode refuses text (Lua says so); binary
                        // is refused here.
                        let mut len = 0;
                        let s = ffi::lua_tolstring(state, 1, &mut len);
                        if len > 0 && *s.cast::<u8>() == 27 {
                            ffi::lua_pushnil(state);
                            ffi::lua_pushstring(state, REFUSED.as_ptr());
                            return 2;
                        }
                    } else if chunk == ffi::LUA_TFUNCTION {
                        // So is a reader's binary first piece.
                        ffi::lua_pushvalue(state, 1);
                        ffi::lua_pushboolean(state, 1);
                        ffi::lua_pushcclosure(state, text_reader, 2);
                        ffi::lua_replace(state, 1);
                    }
                }
            }
            let n = original(state);
            check_load(state, n)
        }
    }

    /// A reader refusing a binary first piece; upvalues: the user's reader,
    /// and whether the first piece is still to come.
    unsafe extern "C-unwind" fn text_reader(state: *mut lua_State) -> c_int {
        // SAFETY: upvalues as made in `load`; Lua's `load` calls a reader
        // with no arguments and takes one result; one push, then the
        // message, within LUA_MINSTACK. The piece is read while on the
        // stack.
        unsafe {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
            ffi::lua_call(state, 0, 1);
            if ffi::lua_toboolean(state, ffi::lua_upvalueindex(2)) != 0
                && ffi::lua_type(state, -1) == ffi::LUA_TSTRING
            {
                let mut len = 0;
                let s = ffi::lua_tolstring(state, -1, &mut len);
                if len > 0 {
                    ffi::lua_pushboolean(state, 0);
                    ffi::lua_replace(state, ffi::lua_upvalueindex(2));
                    if *s.cast::<u8>() == 27 {
                        ffi::lua_pushstring(state, REFUSED.as_ptr());
                        ffi::lua_error(state);
                    }
                }
            }
            1
        }
    }

    /// `loadfile(name, mode, env)`; upvalues as `load`'s. The mode becomes
    /// text unless binary chunks are allowed.
    unsafe extern "C-unwind" fn loadfile(state: *mut lua_State) -> c_int {
        // SAFETY: as in `load`.
        unsafe {
            if ffi::lua_toboolean(state, ffi::lua_upvalueindex(BINARY_OK)) == 0
                && optional_string(state, 1)
                && optional_string(state, 2)
                && !mode_has(state, 2, b'B')
            {
                text_mode(state, 2);
            }
            let n = original(state);
            check_load(state, n)
        }
    }

    /// `dofile(name)`: Lua's `luaB_dofile`, loading text only unless binary
    /// chunks are allowed, with a failed load's message checked.
    unsafe extern "C-unwind" fn dofile(state: *mut lua_State) -> c_int {
        // SAFETY: as Lua's own: `luaL_optstring` raises Lua's argument
        // error; the name stays on the stack (slot 1) while it is used;
        // `luaL_loadfilex` pushes the chunk or the message; the call
        // replaces the chunk by its results.
        unsafe {
            let name = ffi::luaL_optstring(state, 1, std::ptr::null());
            ffi::lua_settop(state, 1);
            let binary_ok = ffi::lua_toboolean(state, ffi::lua_upvalueindex(BINARY_OK)) != 0;
            let mode = if binary_ok {
                std::ptr::null()
            } else {
                c"t".as_ptr()
            };
            if ffi::luaL_loadfilex(state, name, mode) != ffi::LUA_OK {
                check(state, 1);
                ffi::lua_error(state);
            }
            ffi::lua_callk(state, 0, ffi::LUA_MULTRET, 0, Some(dofile_done));
            ffi::lua_gettop(state) - 1
        }
    }

    /// `dofile`'s continuation: the chunk's results (above the name).
    #[cfg(not(feature = "lua52"))]
    unsafe extern "C-unwind" fn dofile_done(
        state: *mut lua_State,
        _status: c_int,
        _ctx: ffi::lua_KContext,
    ) -> c_int {
        // SAFETY: `dofile`'s frame.
        unsafe { ffi::lua_gettop(state) - 1 }
    }

    #[cfg(feature = "lua52")]
    unsafe extern "C-unwind" fn dofile_done(state: *mut lua_State) -> c_int {
        // SAFETY: `dofile`'s frame.
        unsafe { ffi::lua_gettop(state) - 1 }
    }

    /// `coroutine.resume`, where switches are not tracked; upvalues: the
    /// check, Lua's function. A failed resume's error goes to the check.
    unsafe extern "C-unwind" fn resume(state: *mut lua_State) -> c_int {
        // SAFETY: as in `original`; Lua's resume returns `true, values...`
        // or `false, error` (or raises its argument error).
        unsafe {
            let n = original(state);
            if ffi::lua_toboolean(state, -n) == 0 {
                check(state, 1);
            }
            n
        }
    }

    /// Our C function `f` closed over `upvalues`.
    fn closure(
        lua: &mlua::Lua,
        f: ffi::lua_CFunction,
        upvalues: impl mlua::IntoLuaMulti,
    ) -> mlua::Result<mlua::Function> {
        // SAFETY: `f` is one of this module's functions, reading the
        // upvalues its callers give here; `exec_raw` pushes them, and the
        // closure replaces them as the one result.
        unsafe {
            lua.exec_raw::<mlua::Function>(upvalues, |state| {
                let n = ffi::lua_gettop(state);
                ffi::lua_pushcclosure(state, f, n);
            })
        }
    }

    /// `f`, if it is a C function without upvalues (which can run on a
    /// frame of ours).
    fn plain_c_function(lua: &mlua::Lua, f: &mlua::Function) -> mlua::Result<()> {
        let mut plain = false;
        // SAFETY: reads the pushed function only; `lua_getupvalue` pushes
        // nothing when there is no upvalue 1, else we pop what it pushed.
        unsafe {
            lua.exec_raw::<()>(f, |state| {
                plain = ffi::lua_tocfunction(state, -1).is_some();
                if !ffi::lua_getupvalue(state, -1, 1).is_null() {
                    ffi::lua_pop(state, 1);
                    plain = false;
                }
            })?;
        }
        if plain {
            Ok(())
        } else {
            Err(mlua::Error::runtime(
                "mlua-isle: the standard library's functions are not Lua's own",
            ))
        }
    }

    /// Installs this module's `pcall`, `xpcall`, `load`, `loadstring`,
    /// `loadfile`, `dofile` over Lua's (those present), and our
    /// `coroutine.resume` when `resume` is true (switches not tracked).
    pub(crate) fn install_catchers(
        lua: &mlua::Lua,
        check: &mlua::Function,
        stopping: &mlua::Function,
        binary_ok: bool,
        resume: bool,
    ) -> mlua::Result<()> {
        let globals = lua.globals();
        globals.set("pcall", closure(lua, pcall, check.clone())?)?;
        globals.set(
            "xpcall",
            closure(lua, xpcall, (check.clone(), stopping.clone()))?,
        )?;
        let loaders: [(&str, ffi::lua_CFunction); 4] = [
            ("load", load),
            ("loadstring", load),
            ("loadfile", loadfile),
            ("dofile", dofile),
        ];
        for (name, f) in loaders {
            if let Some(original) = globals.get::<Option<mlua::Function>>(name)? {
                plain_c_function(lua, &original)?;
                let wrapped = closure(lua, f, (check.clone(), original, binary_ok))?;
                globals.set(name, wrapped)?;
            }
        }
        if resume {
            if let Some(coroutine) = globals.get::<Option<mlua::Table>>("coroutine")? {
                let original: mlua::Function = coroutine.get("resume")?;
                plain_c_function(lua, &original)?;
                coroutine.set(
                    "resume",
                    closure(lua, self::resume, (check.clone(), original))?,
                )?;
            }
        }
        Ok(())
    }

    /// Lua 5.5's `string.rep`, refusing results longer than Lua 5.4 allows
    /// (`INT_MAX` bytes) as 5.4 refuses them: 5.5 accepts any length a
    /// `size_t` holds, and a failed allocation makes mlua abort the
    /// process, so one `string.rep('x', 1e12)` would kill it. Everything
    /// else (argument errors, names, positions) is Lua's own function's,
    /// run on our frame.
    #[cfg(feature = "lua55")]
    unsafe extern "C-unwind" fn capped_rep(state: *mut lua_State) -> c_int {
        /// The length `rep` will see for argument `i`, if it is one it
        /// takes (a string, or a number it converts as it would).
        ///
        /// # Safety
        /// `state` is running this C function, with `i` a valid index.
        unsafe fn len(state: *mut lua_State, i: c_int) -> Option<u64> {
            // SAFETY: the caller guarantees `i`; converting a number in
            // place is what `luaL_checklstring` in `rep` does anyway.
            unsafe {
                match ffi::lua_type(state, i) {
                    ffi::LUA_TSTRING | ffi::LUA_TNUMBER => {
                        let mut l = 0usize;
                        ffi::lua_tolstring(state, i, &mut l);
                        Some(l as u64)
                    }
                    ffi::LUA_TNONE | ffi::LUA_TNIL => Some(0),
                    _ => None,
                }
            }
        }
        // SAFETY: indices 1–3 are valid (absent ones read as none); the
        // error raised is Lua's `luaL_error`, over no Rust value with a
        // destructor; `original` is called as its docs require.
        unsafe {
            let mut is_int = 0;
            let n = ffi::lua_tointegerx(state, 2, &mut is_int);
            if is_int != 0 && n > 0 {
                if let (Some(l), Some(lsep)) = (len(state, 1), len(state, 3)) {
                    let total = (n as u64)
                        .saturating_mul(l.saturating_add(lsep))
                        .saturating_sub(lsep);
                    if l + lsep > 0 && total > i32::MAX as u64 {
                        return ffi::luaL_error(state, c"resulting string too large".as_ptr());
                    }
                }
            }
            original(state)
        }
    }

    /// Replaces Lua 5.5's `string.rep` with [`capped_rep`].
    #[cfg(feature = "lua55")]
    pub(crate) fn cap_string_rep(lua: &mlua::Lua) -> mlua::Result<()> {
        let Some(string) = lua.globals().get::<Option<mlua::Table>>("string")? else {
            return Ok(());
        };
        let original: mlua::Function = string.get("rep")?;
        plain_c_function(lua, &original)?;
        // Upvalue 1 (`CHECK`) is unused here.
        string.set("rep", closure(lua, capped_rep, (false, original))?)
    }
}

#[cfg(feature = "lua55")]
pub(crate) use protected::cap_string_rep;
#[cfg(any(
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55"
))]
pub(crate) use protected::install_catchers;

/// What the signal handler and the tracked switches need, per VM thread.
struct Slot {
    /// The thread's `Alarm` (its `armed` flag is the first field read);
    /// null when the thread is not a registered VM thread.
    armed: std::sync::atomic::AtomicPtr<Alarm>,
    /// The Lua thread (`lua_State`) running now; null outside requests.
    running: std::sync::atomic::AtomicPtr<mlua::ffi::lua_State>,
    /// The VM's main `lua_State`.
    main: std::sync::atomic::AtomicPtr<mlua::ffi::lua_State>,
    /// The hook function to arm (mlua's global hook trampoline), as an
    /// address; 0 until `bind`. Unused on Luau.
    hook: std::sync::atomic::AtomicUsize,
}

thread_local! {
    // Const-initialised and without a destructor: reading it from a signal
    // handler is a plain thread-local access.
    static SLOT: Slot = const {
        Slot {
            armed: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            running: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            main: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            hook: std::sync::atomic::AtomicUsize::new(0),
        }
    };
}

/// Luau: its interrupt runs at every function call, return and loop
/// back-edge while one is set, and mlua's runs a Rust closure through an
/// error-catching trampoline, which alone doubles the cost of Lua function
/// calls. So, as on Lua 5.2–5.5, none is set while a request runs:
/// [`bind_interrupt`] takes away the interrupt mlua's `set_interrupt`
/// installed, and a stopper puts it back (`raise`, after raising `armed`).
/// Luau documents this for its callback table: "interrupt is safe to set
/// from an arbitrary thread" (`lua.h`), and it reads the field afresh at
/// each of those points, on every coroutine. The tick then works as the
/// hook does, and takes the interrupt away again when it finds nothing to
/// stop.
#[cfg(feature = "luau")]
mod luau {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mlua::ffi::{self, lua_State};

    use super::{Alarm, Binding, SLOT};

    // The interrupt field is one word, as `field` assumes.
    const _: () = {
        type Field = Option<unsafe extern "C-unwind" fn(*mut lua_State, std::ffi::c_int)>;
        assert!(std::mem::size_of::<Field>() == std::mem::size_of::<AtomicUsize>());
        assert!(std::mem::align_of::<Field>() == std::mem::align_of::<AtomicUsize>());
    };

    /// mlua's interrupt (one function serves every VM), as an address; 0
    /// until the first `bind_interrupt`.
    static MLUA_INTERRUPT: AtomicUsize = AtomicUsize::new(0);

    /// The `interrupt` field of the callback table at `callbacks`, as an
    /// atomic word.
    ///
    /// # Safety
    /// `callbacks` must be the address of a live `lua_Callbacks`.
    unsafe fn field<'a>(callbacks: usize) -> &'a AtomicUsize {
        let callbacks = callbacks as *mut ffi::lua_Callbacks;
        // SAFETY: the field is a nullable function pointer: one aligned word
        // (asserted below). Our writes to it are atomic and Luau reads it
        // with plain loads: a race that Luau's `lua.h` declares safe for
        // this one field ("interrupt is safe to set from an arbitrary
        // thread"), and that we rely on as documented, like `lua_sethook`
        // in a signal handler on 5.2–5.5. mlua's own plain writes to it
        // (`set_interrupt`, and clearing it when the VM is dropped) happen on
        // the VM's thread before the VM is bound and after `unbind`, when no
        // stopper writes it.
        unsafe { AtomicUsize::from_ptr(std::ptr::addr_of_mut!((*callbacks).interrupt).cast()) }
    }

    /// The address of `lua`'s callback table.
    fn callbacks_of(main: *mut lua_State) -> usize {
        // SAFETY: `main` is a live state, used on its own thread;
        // `lua_callbacks` returns the address of its VM's table.
        unsafe { ffi::lua_callbacks(main) as usize }
    }

    /// Records `lua` (on its own thread) for arming on demand.
    pub(crate) fn bind(lua: &mlua::Lua) -> mlua::Result<Binding> {
        let main = lua.current_thread().to_pointer() as *mut lua_State;
        Ok(Binding {
            main: callbacks_of(main),
            hook: 0,
        })
    }

    /// Takes away the interrupt mlua's `set_interrupt` installed on `vm`'s
    /// VM (it must have run), before any Lua code runs there; a stopper
    /// puts it back.
    pub(crate) fn bind_interrupt(vm: &Binding) -> mlua::Result<()> {
        // SAFETY: `vm.main` is the table of a live VM of this thread, on
        // which no request runs yet (so no stopper writes it).
        let field = unsafe { field(vm.main) };
        let current = field.load(Ordering::SeqCst);
        if current == 0 {
            return Err(mlua::Error::runtime(
                "mlua-isle: no interrupt to take over (set_interrupt must come first)",
            ));
        }
        MLUA_INTERRUPT.store(current, Ordering::SeqCst);
        field.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Puts mlua's interrupt back on the VM `alarm`'s thread runs, if any.
    /// Called by `raise`, after it raised `armed`.
    pub(super) fn arm(alarm: &Alarm) {
        // The lock keeps the VM from being dropped meanwhile: `unbind`
        // clears the address under it first.
        let _vm = alarm.vm_lock.lock();
        let callbacks = alarm.callbacks.load(Ordering::SeqCst);
        if callbacks != 0 {
            // SAFETY: a non-zero address is the table of a live VM (above).
            unsafe { field(callbacks) }
                .store(MLUA_INTERRUPT.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    /// This thread's alarm, if it is a VM thread.
    fn this_alarm<R>(f: impl FnOnce(&Alarm) -> R) -> Option<R> {
        SLOT.with(|s| {
            let alarm = s.armed.load(Ordering::Relaxed);
            // SAFETY: the thread's registration keeps the alarm alive while
            // the pointer is set (it clears it first, on this thread).
            (!alarm.is_null()).then(|| f(unsafe { &*alarm }))
        })
    }

    /// Before a request of `vm` runs: makes it the VM stoppers arm (a pool
    /// may have replaced the one before).
    pub(crate) fn begin(vm: &Binding) {
        this_alarm(|alarm| {
            // ORDERING: only this thread writes `callbacks`.
            if alarm.callbacks.load(Ordering::Relaxed) != vm.main {
                let _vm = alarm.vm_lock.lock();
                alarm.callbacks.store(vm.main, Ordering::SeqCst);
            }
        });
    }

    /// Forgets `vm` before it is dropped: no stopper writes its table
    /// after this returns.
    pub(crate) fn unbind(vm: &Binding) {
        this_alarm(|alarm| {
            let _vm = alarm.vm_lock.lock();
            if alarm.callbacks.load(Ordering::SeqCst) == vm.main {
                alarm.callbacks.store(0, Ordering::SeqCst);
            }
        });
    }

    /// Takes the interrupt away from this thread's VM (between requests,
    /// or after a tick that found nothing to stop). The caller then looks
    /// at `armed` again and calls [`rearm_running`] if it is set: a stopper
    /// that raised it before this store put the interrupt back too early.
    pub(crate) fn disarm_main() {
        this_alarm(|alarm| {
            // ORDERING: only this thread writes `callbacks`.
            let callbacks = alarm.callbacks.load(Ordering::Relaxed);
            if callbacks != 0 {
                // SAFETY: the table of this thread's VM, alive while bound.
                let field = unsafe { field(callbacks) };
                // Most requests never armed it: a load then, not a locked
                // store. (A stopper's write after the load stands.)
                if field.load(Ordering::SeqCst) != 0 {
                    field.store(0, Ordering::SeqCst);
                }
            }
        });
    }

    /// From the tick, with nothing to stop: takes the interrupt away (it is
    /// per VM, so whatever Lua thread runs). Always does.
    pub(crate) fn disarm_running(_lua: &mlua::Lua) -> bool {
        disarm_main();
        true
    }

    /// Puts the interrupt back on this thread's VM.
    pub(crate) fn rearm_running() {
        this_alarm(arm);
    }
}

#[cfg(all(unix, not(feature = "luau")))]
mod unix {
    use std::ffi::c_int;
    use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
    use std::sync::Once;

    use mlua::ffi::{self, lua_State};

    use super::{Binding, SLOT};

    /// The signal used to reach a VM thread. `SIGURG` is ignored by default,
    /// so a stray one never kills the process, and is rarely used by
    /// applications (Go uses it the same way, to preempt goroutines).
    pub(super) const SIGNAL: c_int = libc::SIGURG;

    /// The action that was installed for `SIGNAL` before ours, as the raw
    /// `sigaction` fields we forward to: handler address and flags.
    static PREVIOUS: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
    static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);

    /// Lua's own `coroutine.resume` and `coroutine.close` (5.4 on), as
    /// addresses.
    static ORIGINAL_RESUME: AtomicUsize = AtomicUsize::new(0);
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    static ORIGINAL_CLOSE: AtomicUsize = AtomicUsize::new(0);

    /// Unblocks `SIGNAL` on this thread: a VM thread inherits the signal
    /// mask of the thread that spawned it, which may block it.
    pub(super) fn unblock() {
        // SAFETY: a zeroed `sigset_t` is initialised by `sigemptyset`;
        // `pthread_sigmask` gets valid pointers and only changes this
        // thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, SIGNAL);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }

    pub(super) fn install_handler() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: a zeroed `sigaction` is a valid empty value; the
            // handler has the `SA_SIGINFO` signature; `sigaction` is called
            // with valid pointers. Installed once per process.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(SIGNAL, &action, &mut old) == 0 {
                    PREVIOUS.store(old.sa_sigaction, Ordering::SeqCst);
                    PREVIOUS_FLAGS.store(old.sa_flags as usize, Ordering::SeqCst);
                }
            }
        });
    }

    /// The signal handler: arms the running Lua thread if this is a VM
    /// thread whose request must stop; forwards the signal to the previous
    /// handler if this is not a VM thread.
    extern "C" fn on_signal(sig: c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
        // SAFETY: reads this thread's own slot; the alarm it points to is
        // kept alive by the thread's `Registration`, which clears the pointer
        // before dropping it, on this same thread.
        let ours = SLOT.with(|s| {
            let alarm = s.armed.load(Ordering::SeqCst);
            if alarm.is_null() {
                return false;
            }
            // SAFETY: as above: the registration outlives the pointer.
            if unsafe { &*alarm }.armed.load(Ordering::SeqCst) {
                let running = s.running.load(Ordering::SeqCst);
                // SAFETY: `running` is null or the state running on this
                // thread (see `switch_to`), alive while recorded; `arm` is
                // what `lua_sethook`'s documentation allows in a signal.
                unsafe { arm(running, s.hook.load(Ordering::SeqCst)) };
            }
            true
        });
        if !ours {
            forward(sig, info, context);
        }
    }

    /// Calls the handler that was installed before ours, if it was a
    /// function.
    fn forward(sig: c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
        let previous = PREVIOUS.load(Ordering::SeqCst);
        if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
            return; // SIGURG's default action is to ignore it
        }
        let flags = PREVIOUS_FLAGS.load(Ordering::SeqCst) as c_int;
        // SAFETY: `previous` is the address of the handler the process had
        // installed, of the signature its flags say.
        unsafe {
            if flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(previous);
                f(sig, info, context);
            } else {
                let f: extern "C" fn(c_int) = std::mem::transmute(previous);
                f(sig);
            }
        }
    }

    /// Installs the hook on `state` with a count of 1 (it ticks on the next
    /// instruction).
    ///
    /// # Safety
    /// `state` must be null or a live `lua_State` of this thread's VM, and
    /// `hook` 0 or the address of a `lua_Hook`.
    unsafe fn arm(state: *mut lua_State, hook: usize) {
        if state.is_null() || hook == 0 {
            return;
        }
        // SAFETY: `hook` is a `lua_Hook` address (see `bind`), and function
        // pointers and `usize` have the same size.
        let hook: ffi::lua_Hook = unsafe { std::mem::transmute(hook) };
        // SAFETY: the caller guarantees `state`; `lua_sethook` may run in a
        // signal handler interrupting any code of this thread.
        unsafe { ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, 1) };
    }

    /// Records that `state` runs from now on, and arms it if the running
    /// request must stop.
    ///
    /// # Safety
    /// `state` must be a live `lua_State` of this thread's VM, staying alive
    /// until the next switch.
    unsafe fn switch_to(state: *mut lua_State) {
        SLOT.with(|s| {
            // ORDERING: Relaxed: only this thread (and its signal handler,
            // which runs on it) reads `running`; the fence keeps the store
            // before the load below as far as the compiler is concerned.
            s.running.store(state, Ordering::Relaxed);
            compiler_fence(Ordering::SeqCst);
            let alarm = s.armed.load(Ordering::SeqCst);
            // SAFETY: as in `on_signal`.
            if !alarm.is_null() && unsafe { &*alarm }.armed.load(Ordering::SeqCst) {
                // SAFETY: the caller guarantees `state`.
                unsafe { arm(state, s.hook.load(Ordering::SeqCst)) };
            }
        });
    }

    /// Before a request of `vm` runs: records its main state as running
    /// (and it as the VM of this thread: a pool may have replaced it).
    pub(crate) fn begin(vm: &Binding) {
        // ORDERING: Relaxed: only this thread (and its signal handler, which
        // runs on it) reads these; `switch_to`'s compiler fence orders them
        // before the state is recorded as running.
        SLOT.with(|s| {
            s.hook.store(vm.hook, Ordering::Relaxed);
            s.main.store(vm.main as *mut lua_State, Ordering::Relaxed);
        });
        // SAFETY: the main state is alive as long as its VM, which outlives
        // its requests; `unbind` forgets it before the VM is dropped.
        unsafe { switch_to(vm.main as *mut lua_State) };
    }

    /// Lua's `coroutine.resume` at its address.
    fn original_resume() -> ffi::lua_CFunction {
        // SAFETY: set by `bind` (to a `lua_CFunction`) before any tracked
        // function is reachable from Lua.
        unsafe { std::mem::transmute(ORIGINAL_RESUME.load(Ordering::SeqCst)) }
    }

    /// Calls Lua's `coroutine.resume` on the frame Lua gave us (argument 1
    /// is `co`, a coroutine other than `state`), recording the switch to
    /// `co` and back. Returns the number of results on top of the stack:
    /// `true, values...` or `false, error`.
    ///
    /// # Safety
    /// `state` is the running Lua thread and `co` its argument 1.
    unsafe fn resume_on(state: *mut lua_State, co: *mut lua_State) -> c_int {
        // SAFETY: `co` is referenced from our stack (argument 1), so it is
        // alive until we return. With a coroutine argument, Lua's resume
        // does not raise (it returns its errors), so the second switch
        // always runs.
        unsafe {
            switch_to(co);
            let results = original_resume()(state);
            switch_to(state);
            results
        }
    }

    /// When the `n` results on top start with `false`, hands the error
    /// (on top) to the interruption check, upvalue `check` (it raises a
    /// pending interruption, or a Rust panic, again).
    ///
    /// # Safety
    /// Called from a C function of ours whose upvalue `check` is the check.
    unsafe fn check_failure(state: *mut lua_State, n: c_int, check: c_int) {
        // SAFETY: the `n` results are on the stack; `check` is a function;
        // Lua's API keeps LUA_MINSTACK free slots for the two pushes.
        unsafe {
            if ffi::lua_toboolean(state, -n) == 0 {
                ffi::lua_pushvalue(state, ffi::lua_upvalueindex(check));
                ffi::lua_pushvalue(state, -2);
                ffi::lua_call(state, 1, 0);
            }
        }
    }

    /// `coroutine.resume`, recording the switch to the coroutine and back;
    /// upvalue 1: the interruption check.
    unsafe extern "C-unwind" fn tracked_resume(state: *mut lua_State) -> c_int {
        // SAFETY: `state` is the calling Lua thread, alive during this call.
        let co = unsafe { ffi::lua_tothread(state, 1) };
        if co.is_null() || co == state {
            // Not a coroutine (Lua's function raises the usual argument
            // error), or resuming itself (it returns an error): nothing
            // switches.
            // SAFETY: calling a C function on the frame Lua gave us.
            return unsafe { original_resume()(state) };
        }
        // SAFETY: `co` is argument 1; upvalue 1 is the check.
        unsafe {
            let n = resume_on(state, co);
            check_failure(state, n, 1);
            n
        }
    }

    /// `coroutine.close` (Lua 5.4 on): runs pending `__close` handlers on
    /// the coroutine, so the switch is recorded when there can be some;
    /// upvalue 1: the interruption check.
    #[cfg(any(feature = "lua54", feature = "lua55"))]
    unsafe extern "C-unwind" fn tracked_close(state: *mut lua_State) -> c_int {
        // SAFETY: set by `bind` before this function is reachable from Lua.
        let original: ffi::lua_CFunction =
            unsafe { std::mem::transmute(ORIGINAL_CLOSE.load(Ordering::SeqCst)) };
        // SAFETY: as in `tracked_resume`.
        let co = unsafe { ffi::lua_tothread(state, 1) };
        // Only a suspended coroutine, or one that died by an error, has
        // handlers to run; Lua's function raises for the others (running,
        // normal), which must not be recorded as switched to.
        // SAFETY: `co` is live (argument 1).
        if co.is_null() || co == state || unsafe { ffi::lua_status(co) } == ffi::LUA_OK {
            // SAFETY: calling a C function on the frame Lua gave us.
            return unsafe { original(state) };
        }
        // A coroutine killed by the interruption keeps hooks disabled:
        // while the request stops, its handlers must not run (see
        // `hook::guard_close`). The check raises the interruption.
        let stopping = SLOT.with(|s| {
            let alarm = s.armed.load(Ordering::SeqCst);
            // SAFETY: as in `on_signal`.
            !alarm.is_null() && unsafe { &*alarm }.armed.load(Ordering::SeqCst)
        });
        if stopping {
            // SAFETY: upvalue 1 is the check, a function taking the error
            // value (none here); Lua keeps LUA_MINSTACK slots for the push.
            unsafe {
                ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
                ffi::lua_call(state, 0, 0);
            }
        }
        // SAFETY: as in `resume_on`: closing a suspended or dead coroutine
        // returns its errors; upvalue 1 is the check.
        unsafe {
            switch_to(co);
            let n = original(state);
            switch_to(state);
            check_failure(state, n, 1);
            n
        }
    }

    /// `coroutine.wrap`: creates the coroutine (as `coroutine.create` does)
    /// and returns [`wrapped`] over it; upvalue 1: the Lua function raising
    /// a wrapped coroutine's error (see `hook.rs`).
    unsafe extern "C-unwind" fn tracked_wrap(state: *mut lua_State) -> c_int {
        // SAFETY: `state` is the calling Lua thread. The argument check
        // raises Lua's usual error; `lua_newthread` raises only on memory
        // errors; nothing of ours needs unwinding.
        unsafe {
            ffi::luaL_checktype(state, 1, ffi::LUA_TFUNCTION);
            let co = ffi::lua_newthread(state);
            ffi::lua_pushvalue(state, 1);
            ffi::lua_xmove(state, co, 1);
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
            ffi::lua_pushcclosure(state, wrapped, 2);
        }
        1
    }

    /// The function `coroutine.wrap` returns; upvalues: the coroutine, and
    /// the Lua function raising its errors.
    unsafe extern "C-unwind" fn wrapped(state: *mut lua_State) -> c_int {
        // SAFETY: upvalue 1 is the coroutine, which the closure keeps alive;
        // inserting it as argument 1 makes the frame a `resume` call.
        unsafe {
            let co = ffi::lua_tothread(state, ffi::lua_upvalueindex(1));
            // Lua 5.2/5.3's wrap calls a coroutine with an empty stack dead
            // before resuming it: answered here, as the inserted argument
            // would hide the empty stack (a coroutine calling itself).
            #[cfg(any(feature = "lua52", feature = "lua53"))]
            if co == state && ffi::lua_gettop(state) == 0 {
                ffi::lua_pushboolean(state, 0);
                ffi::lua_pushstring(state, c"cannot resume dead coroutine".as_ptr());
                return raise_wrapped(state, 2);
            }
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
            ffi::lua_insert(state, 1);
            if co == state {
                // Lua's resume answers "cannot resume non-suspended
                // coroutine" without switching.
                let n = original_resume()(state);
                return raise_wrapped(state, n);
            }
            let n = resume_on(state, co);
            if ffi::lua_toboolean(state, -n) != 0 {
                return n - 1; // the values after `true`
            }
            raise_wrapped(state, n)
        }
    }

    /// Raises a wrapped coroutine's error (on top) through upvalue 2.
    ///
    /// # Safety
    /// Called from [`wrapped`] with `n` results of a failed resume on top.
    unsafe fn raise_wrapped(state: *mut lua_State, n: c_int) -> c_int {
        // SAFETY: upvalue 2 is a Lua function taking (coroutine, error) that
        // raises; `lua_error` after it only in case it returned.
        unsafe {
            if ffi::lua_toboolean(state, -n) != 0 {
                return n - 1;
            }
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(2));
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
            ffi::lua_pushvalue(state, -3);
            ffi::lua_call(state, 2, 0);
            ffi::lua_error(state)
        }
    }

    /// Prepares `lua` (on its own thread) for arming on demand: records its
    /// main state and hook function (mlua's global hook must be set
    /// already) and removes the hook from the main state.
    pub(crate) fn bind(lua: &mlua::Lua) -> mlua::Result<Binding> {
        let main = lua.current_thread().to_pointer() as *mut lua_State;
        // Without the coroutine library (`std_libs`) Lua code switches no
        // threads: nothing to track, no originals to record.
        let coroutine: Option<mlua::Table> = lua.globals().get("coroutine")?;
        let original = |f: &mlua::Function| -> Option<ffi::lua_CFunction> {
            let mut c = None;
            // SAFETY: reads the pushed function only; `exec_raw` leaves the
            // stack as it found it.
            let _ = unsafe {
                lua.exec_raw::<()>(f, |state| {
                    c = ffi::lua_tocfunction(state, -1);
                })
            };
            c
        };
        // SAFETY: `main` is the live main state of `lua`, used on its own
        // thread.
        let hook = unsafe { ffi::lua_gethook(main) };
        let unsupported = || {
            mlua::Error::runtime(
                "mlua-isle: cannot arm hooks on demand (no hook, or coroutine functions are not Lua's)",
            )
        };
        let hook = hook.ok_or_else(unsupported)?;
        if let Some(coroutine) = coroutine {
            let resume: mlua::Function = coroutine.get("resume")?;
            let original_resume = original(&resume).ok_or_else(unsupported)?;
            #[cfg(any(feature = "lua54", feature = "lua55"))]
            {
                let close: mlua::Function = coroutine.get("close")?;
                let original_close = original(&close).ok_or_else(unsupported)?;
                // ORDERING: SeqCst, as before: written once with the same value
                // by every VM, read by the tracked functions of this VM.
                ORIGINAL_CLOSE.store(original_close as usize, Ordering::SeqCst);
            }
            // ORDERING: as for ORIGINAL_CLOSE.
            ORIGINAL_RESUME.store(original_resume as usize, Ordering::SeqCst);
        }
        lua.remove_hook();
        Ok(Binding {
            main: main as usize,
            hook: hook as usize,
        })
    }

    /// Our C function `f` closed over one upvalue.
    fn closure(
        lua: &mlua::Lua,
        f: ffi::lua_CFunction,
        upvalue: &mlua::Function,
    ) -> mlua::Result<mlua::Function> {
        // SAFETY: `f` is one of this module's functions, which uphold Lua's
        // C function contract with one upvalue, a function; `exec_raw`
        // pushes it, and the closure replaces it as the one result.
        unsafe {
            lua.exec_raw::<mlua::Function>(upvalue, |state| {
                ffi::lua_pushcclosure(state, f, 1);
            })
        }
    }

    /// The tracked `coroutine.resume` and `coroutine.close` (see the module
    /// docs; `close` only where Lua has it, 5.4 on), given the interruption
    /// check, called with the error value of a failed resume or close.
    pub(crate) fn tracked_resume_close(
        lua: &mlua::Lua,
        check: &mlua::Function,
    ) -> mlua::Result<(mlua::Function, Option<mlua::Function>)> {
        #[cfg(any(feature = "lua54", feature = "lua55"))]
        let close = Some(closure(lua, tracked_close, check)?);
        #[cfg(not(any(feature = "lua54", feature = "lua55")))]
        let close = None;
        Ok((closure(lua, tracked_resume, check)?, close))
    }

    /// The tracked `coroutine.wrap`, given the Lua function that raises a
    /// wrapped coroutine's error (called with the coroutine and the error).
    pub(crate) fn tracked_wrap_with(
        lua: &mlua::Lua,
        wrap_error: &mlua::Function,
    ) -> mlua::Result<mlua::Function> {
        closure(lua, tracked_wrap, wrap_error)
    }

    /// From the hook, with nothing to stop: removes the hook from the Lua
    /// thread running now, if it is the one recorded (a thread this module
    /// tracks: one resumed from Rust through mlua keeps the hook mlua gave
    /// it). Returns whether it did.
    pub(crate) fn disarm_running(lua: &mlua::Lua) -> bool {
        let current = lua.current_thread().to_pointer() as *mut lua_State;
        let tracked = SLOT.with(|s| s.running.load(Ordering::SeqCst) == current);
        if tracked {
            lua.remove_hook();
        }
        tracked
    }

    /// A Lua thread about to be resumed from Rust (mlua's `Thread::resume`,
    /// in a callback of the host's): the tracked switches never see it, so
    /// a signal would arm its resumer, not it. It gets the VM's hook instead,
    /// ticking every `count` instructions, as threads mlua creates do.
    pub(crate) fn hook_resumed_from_rust(thread: &mlua::Thread, count: u32) {
        let state = thread.to_pointer() as *mut lua_State;
        let count = c_int::try_from(count).unwrap_or(c_int::MAX);
        SLOT.with(|s| {
            let hook = s.hook.load(Ordering::SeqCst);
            if hook == 0 || state.is_null() {
                return;
            }
            // SAFETY: `hook` is a `lua_Hook` address (see `bind`); `state`
            // is a live thread of this thread's VM (the caller holds it),
            // about to be resumed; `lua_gethook` and `lua_sethook` read and
            // store its hook fields.
            unsafe {
                if ffi::lua_gethook(state).is_none() {
                    let hook: ffi::lua_Hook = std::mem::transmute(hook);
                    ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, count);
                }
            }
        });
    }

    /// Arms the recorded running state again (from the hook, which has just
    /// removed itself and found the alarm raised meanwhile).
    pub(crate) fn rearm_running() {
        SLOT.with(|s| {
            // SAFETY: `running` is null or the live running state.
            unsafe {
                arm(
                    s.running.load(Ordering::SeqCst),
                    s.hook.load(Ordering::SeqCst),
                )
            }
        });
    }

    /// Forgets `vm` if it is the VM recorded on this thread; called before
    /// it is dropped, so that neither the handler nor a switch can reach its
    /// states any more.
    pub(crate) fn unbind(vm: &Binding) {
        SLOT.with(|s| {
            if s.main.load(Ordering::SeqCst) as usize == vm.main {
                s.running.store(std::ptr::null_mut(), Ordering::SeqCst);
                s.main.store(std::ptr::null_mut(), Ordering::SeqCst);
            }
        });
    }

    /// Removes the hook from the main state if it is set, between requests.
    pub(crate) fn disarm_main() {
        SLOT.with(|s| {
            let main = s.main.load(Ordering::SeqCst);
            if main.is_null() {
                return;
            }
            // SAFETY: `main` is the live main state of this thread's VM
            // (bound, and unbound before the VM is dropped).
            unsafe {
                if ffi::lua_gethookmask(main) != 0 {
                    ffi::lua_sethook(main, None, 0, 0);
                }
            }
        });
    }
}

/// A VM opening `libs` in mlua's unsafe mode (`debug`, `ffi`, C modules),
/// for the host's `unsafe_std_libs`. Here only because this is the crate's
/// one module allowed `unsafe`; it has nothing to do with alarms.
pub(crate) fn new_lua_with_unsafe_libs(libs: mlua::StdLib, options: mlua::LuaOptions) -> mlua::Lua {
    // SAFETY: `Lua::unsafe_new_with` is unsafe because the libraries it may
    // open (`debug`, `ffi`) and the C modules it lets `require` load can
    // break mlua's invariants from Lua code. The host asked for exactly
    // that with `unsafe_std_libs`, whose documentation says so; nothing in
    // this crate relies on those libraries being absent.
    unsafe { mlua::Lua::unsafe_new_with(libs, options) }
}
