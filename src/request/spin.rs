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

/// True once a spin started at `since` would be over: a request still
/// queued by then waits behind other work.
#[cfg(not(mlua_isle_loom))]
pub(crate) fn spun_out(since: Instant) -> bool {
    since.elapsed() >= SPIN_FOR
}

/// Under loom: never, since its runs must not depend on the clock.
#[cfg(mlua_isle_loom)]
pub(crate) fn spun_out(_since: Instant) -> bool {
    false
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
