//! Brief spinning before parking.
//!
//! Waking a parked thread costs tens of microseconds on small machines, far
//! more than a request takes. Both sides of a hop therefore wait actively for
//! a short while first: the VM thread waiting for the next request, and the
//! caller waiting for its result.
//!
//! For the first `HOT_FOR` the flag is checked at every `spin_loop` hint (an
//! exponential backoff would sleep through the moment the answer lands).
//! After that the thread yields between checks, which lets a worker that
//! shares its core run, until `SPIN_FOR` has passed without news; then it
//! parks, so an idle isle or pool uses no CPU.

use std::time::{Duration, Instant};

/// Tight spinning, checking at every hint.
const HOT_FOR: Duration = Duration::from_micros(5);
/// Total time before giving up and parking.
const SPIN_FOR: Duration = Duration::from_micros(50);

/// Waits actively until `ready()` is true or `SPIN_FOR` has passed; returns
/// the last `ready()`.
pub(crate) fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut n = 0u32;
    // Hot: the clock costs ~20 ns, so read it every 32 checks.
    loop {
        if ready() {
            return true;
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(32) && start.elapsed() >= HOT_FOR {
            break;
        }
        std::hint::spin_loop();
    }
    // Polite: yield between checks.
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= SPIN_FOR {
            return false;
        }
        std::thread::yield_now();
    }
}
