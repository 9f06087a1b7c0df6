//! Lua awaiting Rust: 2,000 requests, each calling a simulated `fetch`
//! (an async Rust function taking 20-50 ms), on a pool of only 2 VMs.
//! While a fetch is pending its request is suspended and the VM serves
//! others, so they are all in flight at once.
//!
//! The delay comes from a timer thread (no runtime needed); with the
//! `tokio` feature it is `tokio::time::sleep`, in the runtime the pool's
//! builder is called in.
//!
//! Run: `cargo run --release --features async --example async`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mlua_isle::{IsleError, IslePool, Task};

const REQUESTS: usize = 2_000;

/// Fetches in flight now, and the most seen at once.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

const SCRIPT: &str = r#"
-- A handler as one would write it: looks synchronous, awaits underneath.
function handle(i)
    local body = fetch("https://example.test/items/" .. i)
    return #body
end
"#;

/// A pretend HTTP GET: 20-50 ms of waiting, then a body.
async fn fetch(url: String) -> mlua::Result<String> {
    let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
    MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
    let ms = 20 + url.bytes().map(u64::from).sum::<u64>() % 31;
    delay(Duration::from_millis(ms)).await;
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    Ok(format!("<html>{url}</html>"))
}

#[cfg(feature = "tokio")]
async fn delay(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Without tokio: a timer thread completes a oneshot at the deadline.
#[cfg(not(feature = "tokio"))]
async fn delay(d: Duration) {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    timer::after(d, tx);
    let _ = rx.await;
}

#[cfg(not(feature = "tokio"))]
mod timer {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use futures::channel::oneshot::Sender;

    type Due = BTreeMap<(Instant, u64), Sender<()>>;

    struct Timer {
        due: Mutex<Due>,
        changed: Condvar,
    }

    fn timer() -> &'static Timer {
        static TIMER: OnceLock<&'static Timer> = OnceLock::new();
        TIMER.get_or_init(|| {
            let t: &'static Timer = Box::leak(Box::new(Timer {
                due: Mutex::new(BTreeMap::new()),
                changed: Condvar::new(),
            }));
            std::thread::spawn(move || run(t));
            t
        })
    }

    fn run(t: &Timer) {
        let mut due = t.due.lock().unwrap();
        loop {
            let now = Instant::now();
            match due.first_key_value().map(|(k, _)| k.0) {
                None => due = t.changed.wait(due).unwrap(),
                Some(at) if at > now => due = t.changed.wait_timeout(due, at - now).unwrap().0,
                Some(_) => {
                    let mut fire = Vec::new();
                    while let Some(e) = due.first_entry() {
                        if e.key().0 > now {
                            break;
                        }
                        fire.push(e.remove());
                    }
                    drop(due);
                    for tx in fire {
                        let _ = tx.send(());
                    }
                    due = t.due.lock().unwrap();
                }
            }
        }
    }

    /// Sends on `tx` after `d`.
    pub fn after(d: Duration, tx: Sender<()>) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let t = timer();
        let key = (Instant::now() + d, SEQ.fetch_add(1, Ordering::Relaxed));
        let mut due = t.due.lock().unwrap();
        let earliest = due.first_key_value().is_none_or(|(k, _)| key < *k);
        due.insert(key, tx);
        drop(due);
        if earliest {
            t.changed.notify_one();
        }
    }
}

fn main() -> Result<(), IsleError> {
    // With tokio: the builder picks up the runtime it is called in.
    #[cfg(feature = "tokio")]
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("tokio runtime");
    #[cfg(feature = "tokio")]
    let _in_rt = rt.enter();

    let pool = IslePool::builder()
        .workers(2)
        .init(|lua| {
            let fetch = lua.create_async_function(|_, url: String| fetch(url))?;
            lua.globals().set("fetch", fetch)?;
            lua.load(SCRIPT).exec()
        })
        .build()?;
    println!(
        "pool of {} Lua VMs; {REQUESTS} requests, each awaiting a 20-50 ms fetch ({})",
        pool.workers(),
        if cfg!(feature = "tokio") {
            "tokio::time::sleep"
        } else {
            "timer thread"
        }
    );

    // Watch each worker's `suspended` metric while the requests run.
    let done = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (pool, done) = (pool.clone(), done.clone());
        thread::spawn(move || {
            let mut peak = vec![0; pool.workers()];
            while done.load(Ordering::Relaxed) == 0 {
                for (p, w) in peak.iter_mut().zip(pool.metrics().workers) {
                    *p = (*p).max(w.suspended);
                }
                thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };

    let start = Instant::now();
    let tasks: Vec<Task<usize>> = (0..REQUESTS)
        .map(|i| pool.spawn_call("handle", i))
        .collect();
    let mut bytes = 0;
    for t in tasks {
        bytes += t.wait()?;
    }
    let elapsed = start.elapsed();
    done.store(1, Ordering::Relaxed);
    let peak = watcher.join().expect("watcher");

    println!(
        "{REQUESTS} requests done in {elapsed:.2?} ({bytes} bytes fetched); one after another they would take ~{:.0} s on 2 blocking VMs",
        REQUESTS as f64 * 0.035 / 2.0
    );
    println!(
        "fetches in flight at once: at most {}",
        MAX_IN_FLIGHT.load(Ordering::SeqCst)
    );
    let m = pool.metrics();
    for (i, (w, peak)) in m.workers.iter().zip(&peak).enumerate() {
        println!(
            "  VM {i}: {} completed, suspended at most {peak} at once (now {})",
            w.completed, w.suspended
        );
    }
    pool.shutdown()
}
