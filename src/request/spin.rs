//! Brief spinning before parking.
//!
//! Waking a parked thread costs tens of microseconds on small machines, far
//! more than a request takes. Both sides of a hop therefore wait actively for
//! a short while first: the VM thread waiting for the next request, and the
//! caller waiting for its result.
//!
//! The flag is checked at every `spin_loop` hint (an exponential backoff
//! would sleep through the moment the answer lands), and every 32 checks
//! (well under a microsecond) the thread yields its core, until `SPIN_FOR`
//! has passed without news; then it parks, so an idle isle or pool uses no
//! CPU.
//!
//! The yields are what keeps spinning cheap when there are more threads
//! than cores, which in a server is the normal case: a waiting caller or an
//! idle worker must not sit on a core that the VM thread it waits for (or
//! another caller) needs. That matters most for work only one VM may run (a
//! session's requests): when a caller's requests alternate between two VMs
//! on a 2-core machine, the caller and both VM threads want a core, and
//! with 5 µs of spinning before the first yield, 1,000 session keys from
//! one blocking caller ran at 0.14x the speed of unkeyed work; yielding
//! from the start more than doubled that (benches/load.rs). When no other
//! thread wants the core, a yield returns at once.
//!
//! A waiting caller spins even when its request is still queued behind
//! others, and so will not be answered within the spin. Parking at once
//! looks cheaper, but it is not: whoever resolves a request with a parked
//! waiter must wake it, and that wake-up is paid on the VM thread (a
//! syscall, and often a switch to the woken caller on the VM's core). On a
//! busy machine a spinning waiter's yields hand its core to the threads
//! that need it, so those few turns cost the VMs less than a wake-up per
//! request. Measured in benches/load.rs with open-loop arrivals of 50 µs
//! jobs at 80% load from 8 and 16 submitting threads (each with its own
//! waiting thread): with waiters on queued requests parking at once, about
//! 0.37 waits per request ended parked, and the p50 latency was 11–67 ms,
//! against 2.3–14 ms for rayon beside it. With the spin, almost none park,
//! and the p50 was 0.8–6.7 ms, at or below rayon's in the same run.
//!
//! Under loom (see `src/sync/mod.rs`), which models no time and would never see
//! a spin end, a spin checks its condition once.

use std::time::{Duration, Instant};

/// Total time before giving up and parking.
const SPIN_FOR: Duration = Duration::from_micros(50);

/// Waits actively until `ready()` is true or `SPIN_FOR` has passed; returns
/// the last `ready()`.
pub(crate) fn spin_until(ready: impl FnMut() -> bool) -> bool {
    spin(SPIN_FOR, true, ready)
}

/// Spins, never yielding, until `ready()` is true or `limit` has passed;
/// returns the last `ready()`. For short waits whose caller must not lose
/// its core: on a busy machine a yield can cost a whole scheduler tick.
pub(crate) fn spin_hot(limit: Duration, ready: impl FnMut() -> bool) -> bool {
    spin(limit, false, ready)
}

/// Under loom: one check (see the module docs).
#[cfg(mlua_isle_loom)]
fn spin(_limit: Duration, _yielding: bool, mut ready: impl FnMut() -> bool) -> bool {
    ready()
}

/// Checks `ready()` at every spin hint for at most `limit`, yielding every
/// 32 checks if `yielding`.
#[cfg(not(mlua_isle_loom))]
fn spin(limit: Duration, yielding: bool, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        if ready() {
            return true;
        }
        n = n.wrapping_add(1);
        // The clock costs ~20 ns: read it every 32 checks, and yield there.
        if n.is_multiple_of(32) {
            if start.elapsed() >= limit {
                return ready();
            }
            if yielding {
                std::thread::yield_now();
                continue;
            }
        }
        std::hint::spin_loop();
    }
}
