//! Luau: its interrupt runs at every function call, return and loop
//! back-edge while one is set, and mlua's runs a Rust closure through an
//! error-catching trampoline, which alone doubles the cost of Lua function
//! calls. So, as on Lua 5.2–5.5, none is set while a request runs:
//! [`bind_interrupt`] takes away the interrupt mlua's `set_interrupt`
//! installed, and a stopper puts it back (`raise`, after raising `armed`).
//! Luau documents this for its callback table: "interrupt is safe to set
//! from an arbitrary thread" (`lua.h`), and it reads the field afresh at
//! each of those points, on every coroutine. The tick then works as the
//! hook does, and takes the interrupt away again when it finds nothing to
//! stop.

use std::sync::atomic::{AtomicUsize, Ordering};

use mlua::ffi::{self, lua_State};

use super::{Alarm, VmAddrs, SLOT};

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
pub(crate) fn bind(lua: &mlua::Lua) -> mlua::Result<VmAddrs> {
    let main = lua.current_thread().to_pointer() as *mut lua_State;
    Ok(VmAddrs {
        main: callbacks_of(main),
        hook: 0,
    })
}

/// Takes away the interrupt mlua's `set_interrupt` installed on `vm`'s
/// VM (it must have run), before any Lua code runs there; a stopper
/// puts it back.
pub(crate) fn bind_interrupt(vm: &VmAddrs) -> mlua::Result<()> {
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
        unsafe { field(callbacks) }.store(MLUA_INTERRUPT.load(Ordering::SeqCst), Ordering::SeqCst);
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
pub(crate) fn begin(vm: &VmAddrs) {
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
pub(crate) fn unbind(vm: &VmAddrs) {
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
