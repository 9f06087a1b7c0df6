//! The alarms of live VM threads: how a stopper finds and raises one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{const_rwlock, RwLock};

/// The per-VM-thread flag stoppers raise, and how to reach the thread.
pub(super) struct Alarm {
    /// True while the running request must stop: hooks must tick on every
    /// Lua thread that runs.
    pub(super) armed: AtomicBool,
    #[cfg(all(unix, not(feature = "luau")))]
    pub(super) thread: parking_lot::Mutex<Option<libc::pthread_t>>,
    /// Luau: the address of the callback table of the VM this thread runs
    /// (0: none yet, or dropped), which `raise` writes the interrupt into.
    /// Written by the VM thread under `vm_lock`, read by stoppers under it.
    #[cfg(feature = "luau")]
    pub(super) callbacks: std::sync::atomic::AtomicUsize,
    #[cfg(feature = "luau")]
    pub(super) vm_lock: parking_lot::Mutex<()>,
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
                libc::pthread_kill(t, super::unix::SIGNAL);
            }
        }
    }
    #[cfg(feature = "luau")]
    super::luau::arm(alarm);
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
            super::unix::install_handler();
            super::unix::unblock();
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
        // The list of Lua threads resumed from Rust comes with the first
        // of them (`SignalSlot::resumed_or_new`): most VMs never resume
        // one, and it is 3 KiB of every VM's resident memory.
        SLOT.with(|s| {
            // ORDERING: SeqCst, as every field of the slot: only this
            // thread and its signal handler read it.
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
            // ORDERING: SeqCst, after `armed` is cleared (above): the
            // handler no longer looks at the slot.
            let list = s.resumed.swap(std::ptr::null_mut(), Ordering::SeqCst);
            if !list.is_null() {
                // SAFETY: allocated by `SignalSlot::resumed_or_new` on this
                // thread with `Box::into_raw`, and no longer reachable: the
                // pointer is cleared, and the handler ignores the slot.
                drop(unsafe { Box::from_raw(list) });
            }
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

/// A VM's main state and hook function, as addresses (see [`bind`]). On
/// Luau, `main` is the address of the VM's callback table instead, and
/// `hook` is unused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmAddrs {
    pub(super) main: usize,
    pub(super) hook: usize,
}

/// What the signal handler and the tracked switches need, per VM thread.
pub(super) struct SignalSlot {
    /// The thread's `Alarm` (its `armed` flag is the first field read);
    /// null when the thread is not a registered VM thread.
    pub(super) armed: std::sync::atomic::AtomicPtr<Alarm>,
    /// The Lua thread (`lua_State`) running now; null outside requests.
    pub(super) running: std::sync::atomic::AtomicPtr<mlua::ffi::lua_State>,
    /// The VM's main `lua_State`.
    pub(super) main: std::sync::atomic::AtomicPtr<mlua::ffi::lua_State>,
    /// The hook function to arm (mlua's global hook trampoline), as an
    /// address; 0 until `bind`. Unused on Luau.
    pub(super) hook: std::sync::atomic::AtomicUsize,
    /// This VM thread's list of the Lua threads resumed from Rust (see
    /// [`Resumed`]); null on other threads, and on Luau.
    pub(super) resumed: std::sync::atomic::AtomicPtr<Resumed>,
}

// Only the Unix signal machinery uses the list.
#[cfg_attr(not(all(unix, not(feature = "luau"))), allow(dead_code))]
impl SignalSlot {
    /// This thread's list of Lua threads resumed from Rust; `None` unless
    /// it is a registered VM thread that has resumed one (none listed).
    pub(super) fn resumed(&self) -> Option<&Resumed> {
        // ORDERING: SeqCst, as every field of the slot (written and read
        // by this thread and its signal handler only).
        let list = self.resumed.load(Ordering::SeqCst);
        // SAFETY: `list` is null or the list `resumed_or_new` allocated on
        // this thread while it was registered; its `Registration`'s drop
        // (at thread exit, after the VM is gone) clears the pointer before
        // freeing it, and the signal handler ignores the slot from the
        // moment `armed` is cleared, before that. Callers use the list
        // within a call on this thread.
        unsafe { list.as_ref() }
    }

    /// This thread's list of Lua threads resumed from Rust, allocated
    /// now if it has none yet; `None` unless it is a registered VM
    /// thread. Called by this thread only, outside its signal handler.
    pub(super) fn resumed_or_new(&self) -> Option<&Resumed> {
        if let Some(list) = self.resumed() {
            return Some(list);
        }
        // ORDERING: SeqCst, as every field of the slot.
        if self.armed.load(Ordering::SeqCst).is_null() {
            return None;
        }
        let list = Box::into_raw(Box::new(Resumed::new()));
        // ORDERING: SeqCst, as every field of the slot: the list is whole
        // before the handler, which reads the pointer with SeqCst on this
        // same thread, can see it.
        self.resumed.store(list, Ordering::SeqCst);
        // SAFETY: just allocated, and freed only by this thread's
        // `Registration` drop, at its exit (see `resumed`).
        Some(unsafe { &*list })
    }
}

/// The Lua threads resumed from Rust (mlua's `Thread` API: `resume`,
/// `into_async`, `Function::call_async`) that may still be running, on one
/// VM thread, innermost last, in `threads[..len]`; `backs[i]` is the state
/// recorded as running when `threads[i]` was resumed. Each is kept alive
/// while listed (`unix::switch`). On the heap, allocated once per VM
/// thread, by the first such resume on it (most VM threads never have
/// one): every thread of the process has a `SignalSlot`.
pub(super) struct Resumed {
    pub(super) threads: [std::sync::atomic::AtomicPtr<mlua::ffi::lua_State>; RESUMED],
    pub(super) backs: [std::sync::atomic::AtomicPtr<mlua::ffi::lua_State>; RESUMED],
    pub(super) len: std::sync::atomic::AtomicUsize,
}

/// How many Lua threads resumed from Rust can run nested at once on one VM
/// thread (each resumed from a Rust function the one before called): Lua's
/// own limit on nested C calls (200, "C stack overflow") comes first.
pub(super) const RESUMED: usize = 200;

#[cfg_attr(not(all(unix, not(feature = "luau"))), allow(dead_code))]
impl Resumed {
    fn new() -> Resumed {
        Resumed {
            threads: [const { std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()) }; RESUMED],
            backs: [const { std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()) }; RESUMED],
            len: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

thread_local! {
    // Const-initialised and without a destructor: reading it from a signal
    // handler is a plain thread-local access.
    pub(super) static SLOT: SignalSlot = const {
        SignalSlot {
            armed: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            running: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            main: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
            hook: std::sync::atomic::AtomicUsize::new(0),
            resumed: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resumed_list_comes_with_the_first_resume_from_rust() {
        if !SUPPORTED {
            return;
        }
        std::thread::spawn(|| {
            // Not a VM thread: no list, and none is made.
            SLOT.with(|s| assert!(s.resumed_or_new().is_none()));
            let _alarm = this_thread().expect("arming on demand is supported");
            SLOT.with(|s| {
                assert!(s.resumed().is_none(), "registering allocates no list");
                let list: *const Resumed = s.resumed_or_new().expect("a VM thread");
                assert_eq!(s.resumed().map(|r| r as *const Resumed), Some(list));
                let again: *const Resumed = s.resumed_or_new().expect("a VM thread");
                assert_eq!(again, list, "one list per thread");
            });
        })
        .join()
        .unwrap();
    }
}
