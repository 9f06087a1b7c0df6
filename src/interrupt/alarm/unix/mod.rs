//! The signal that reaches a VM thread, and arming the hook on the Lua
//! thread that runs when it lands.

use std::ffi::c_int;
use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
use std::sync::Once;

use mlua::ffi::{self, lua_State};

use super::{SignalSlot, VmAddrs, RESUMED, SLOT};

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
            // SAFETY: every state the slot lists is alive while listed
            // (see `arm_recorded`); `arm` is what `lua_sethook`'s
            // documentation allows in a signal.
            unsafe { arm_recorded(s) };
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

/// Arms every state that may be running on this thread: the one recorded
/// as running, and each Lua thread resumed from Rust that is listed, with
/// the state it was resumed from. One of them runs: a thread resumed from
/// Rust may have finished (mlua tells of no return), and then the one it
/// was resumed from runs again. Arming one that does not run costs a tick
/// when it next runs.
///
/// # Safety
/// `s` is this thread's slot. Every state it lists is alive: `running`
/// (see `switch_to`), the listed threads (kept alive by `switch::HELD`
/// while listed) and the states they were resumed from (the main state,
/// a request's coroutine during its poll, a coroutine of a tracked
/// switch, or a listed thread, all alive until the entries above them are
/// dropped: `switch::prune`). Entries are written before the list's `len`
/// grows and dropped after it shrinks.
unsafe fn arm_recorded(s: &SignalSlot) {
    // ORDERING: SeqCst, as every read of the slot here: written by this
    // thread only, which the handler interrupts; what matters is program
    // order (entries before `len`), which SeqCst keeps from the compiler.
    let hook = s.hook.load(Ordering::SeqCst);
    // SAFETY: the caller guarantees every listed state is alive.
    unsafe {
        arm(s.running.load(Ordering::SeqCst), hook);
        if let Some(r) = s.resumed() {
            let listed = r.len.load(Ordering::SeqCst).min(RESUMED);
            for i in 0..listed {
                arm(r.threads[i].load(Ordering::SeqCst), hook);
                arm(r.backs[i].load(Ordering::SeqCst), hook);
            }
        }
    }
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

mod switch;
pub(crate) use switch::*;
