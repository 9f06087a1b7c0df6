//! Brief spinning before parking.
//!
//! Waking a parked thread costs tens of microseconds on small machines, far
//! more than a request takes. Both sides of a hop therefore wait actively for
//! a short while first: the VM thread waiting for the next request, and the
//! caller waiting for its result.
//!
//! The flag is checked at every `spin_loop` hint (an exponential backoff
//! would sleep through the moment the answer lands). After `HOT_FOR` the
//! thread also yields every 32 checks, which lets a worker that shares its
//! core run, until `SPIN_FOR` has passed without news; then it parks, so an
//! idle isle or pool uses no CPU.
//!
//! Under loom (see `src/sync/mod.rs`), which models no time and would never see
//! a spin end, a spin checks its condition once.

use std::time::{Duration, Instant};

/// Tight spinning, checking at every hint.
const HOT_FOR: Duration = Duration::from_micros(5);
/// Total time before giving up and parking.
const SPIN_FOR: Duration = Duration::from_micros(50);

/// Waits actively until `ready()` is true or `SPIN_FOR` has passed; returns
/// the last `ready()`.
pub(crate) fn spin_until(ready: impl FnMut() -> bool) -> bool {
    spin(SPIN_FOR, HOT_FOR, ready)
}

/// Spins, never yielding, until `ready()` is true or `limit` has passed;
/// returns the last `ready()`. For short waits whose caller must not lose
/// its core: on a busy machine a yield can cost a whole scheduler tick.
pub(crate) fn spin_hot(limit: Duration, ready: impl FnMut() -> bool) -> bool {
    spin(limit, limit, ready)
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
fn spin(_limit: Duration, _hot_for: Duration, mut ready: impl FnMut() -> bool) -> bool {
    ready()
}

/// Checks `ready()` at every spin hint for at most `limit`, yielding every
/// 32 checks once `hot_for` has passed.
#[cfg(not(mlua_isle_loom))]
fn spin(limit: Duration, hot_for: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        if ready() {
            return true;
        }
        n = n.wrapping_add(1);
        // The clock costs ~20 ns: read it every 32 checks. Past `hot_for`,
        // yield there too.
        if n.is_multiple_of(32) {
            let spent = start.elapsed();
            if spent >= limit {
                return ready();
            }
            if spent >= hot_for {
                std::thread::yield_now();
                continue;
            }
        }
        std::hint::spin_loop();
    }
}
