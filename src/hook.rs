//! The interrupt hook: how a running request learns it must stop.
//!
//! A count hook is installed on the VM once, before `init` runs, with
//! `set_global_hook`; Lua copies a thread's hook into every coroutine it
//! creates, so coroutines are covered too. Every `hook_interval` instructions
//! the hook looks at the running request's stop reason (and the VM's abort
//! flag, raised when the last handle is dropped).
//!
//! Once a request must stop, the hook unwinds with an [`Interrupted`] payload
//! (`resume_unwind`, so no panic message is printed). mlua carries it through
//! Lua frames as a wrapped panic, and with `catch_rust_panics(false)` (set in
//! `vm.rs`) `pcall` and `xpcall` re-raise it without running a message
//! handler: Lua code cannot catch it. `coroutine.resume` can, but the hook is
//! still armed for the resumer, so its next tick raises again. The worker's
//! `catch_unwind` turns the payload back into the stop reason.
//!
//! Raising a plain Lua error instead would not do: an error raised inside a
//! hook runs `xpcall`'s message handler with hooks disabled, so a handler
//! that loops forever could never be stopped. Under `panic = "abort"` there is
//! no unwinding, and the hook falls back to a Lua error plus re-arming itself
//! with a count of 1 on the running coroutine (so `pcall` loops still stop);
//! there, a looping `xpcall` message handler cannot be interrupted.
//!
//! Price: with a count hook set, Lua 5.4 traps on every instruction, which
//! slows pure-Lua loops 2–3x whatever the interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mlua::{HookTriggers, Lua, VmState};
use parking_lot::Mutex;

use crate::request::RunScope;
use crate::token::{CancelToken, Reason};

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
    /// True while some coroutine runs the count-1 hook (`panic = "abort"`
    /// builds only).
    escalated: AtomicBool,
}

/// The unwind payload that stops a request (see the module docs).
pub(crate) struct Interrupted;

impl Interrupt {
    /// Installs the hook on `lua` and registers the state for
    /// [`current_token`].
    pub(crate) fn install(
        lua: &Lua,
        interval: u32,
        abort: Arc<AtomicBool>,
    ) -> mlua::Result<Arc<Self>> {
        let this = Arc::new(Interrupt {
            current: Mutex::new(None),
            abort,
            interval: interval.max(1),
            escalated: AtomicBool::new(false),
        });
        set_hook(lua, &this, this.interval)?;
        lua.set_app_data(this.clone());
        Ok(this)
    }

    /// Puts the normal interval back after a request that was stopped.
    pub(crate) fn reset(&self, lua: &Lua, this: &Arc<Self>) {
        if self.escalated.swap(false, Ordering::Relaxed) {
            // Cannot fail for a count hook on the main thread; if it did, the
            // VM would only stay slower, never wrong.
            let _ = set_hook(lua, this, self.interval);
        }
    }

    fn tick(this: &Arc<Self>, lua: &Lua) -> mlua::Result<VmState> {
        let reason = {
            let current = this.current.lock();
            let Some(token) = current.as_ref() else {
                return Ok(VmState::Continue);
            };
            match token.req.header().reason() {
                Some(r) => r,
                None if this.abort.load(Ordering::Relaxed) => {
                    token.stop(Reason::Shutdown);
                    Reason::Shutdown
                }
                None => return Ok(VmState::Continue),
            }
        };
        #[cfg(panic = "unwind")]
        {
            let _ = (lua, reason);
            std::panic::resume_unwind(Box::new(Interrupted))
        }
        #[cfg(not(panic = "unwind"))]
        {
            // Stop at every instruction of this coroutine from now on.
            this.escalated.store(true, Ordering::Relaxed);
            set_hook(lua, this, 1)?;
            Err(mlua::Error::external(reason.error()))
        }
    }
}

fn set_hook(lua: &Lua, this: &Arc<Interrupt>, every: u32) -> mlua::Result<()> {
    let this = this.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(every),
        move |lua, _| Interrupt::tick(&this, lua),
    )
}

impl RunScope for Interrupt {
    fn enter(&self, token: &CancelToken) {
        *self.current.lock() = Some(token.clone());
    }

    fn leave(&self) {
        *self.current.lock() = None;
    }
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
