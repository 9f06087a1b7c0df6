//! `IslePoolBuilder`, and starting the workers.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Worker as Deque};
use crossbeam_utils::CachePadded;
use mlua::Lua;
use parking_lot::Mutex;

use super::metrics::{StripedCounter, WorkerCounters};
use super::session::Sessions;
use super::shared::Shared;
use super::sleep::Sleep;
use super::worker::Worker;
use super::{IslePool, PoolInner};
use crate::config::{vm_options, VmConfig};
use crate::submit::Owner;
use crate::timer::Timer;
use crate::vm::{next_owner_id, Vm};
use crate::IsleError;

type Init = dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync;

/// Configures and starts an [`IslePool`]. Created by [`IslePool::builder`].
#[derive(Clone, Default)]
pub struct IslePoolBuilder {
    config: VmConfig,
    workers: Option<usize>,
    init: Option<Arc<Init>>,
    queue_capacity: Option<usize>,
    session_idle_timeout: Option<Duration>,
    recycle_after: Option<u64>,
    recycle_above: Option<usize>,
}

impl IslePoolBuilder {
    /// Number of VMs (default: the number of CPUs).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Runs on every VM before it serves requests (and is where shared
    /// globals and functions come from). Default: nothing. As with
    /// [`IsleBuilder::spawn`](crate::IsleBuilder::spawn), it must leave the
    /// VM's hook (on Luau, its interrupt) in place.
    pub fn init<F>(mut self, init: F) -> Self
    where
        F: Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static,
    {
        self.init = Some(Arc::new(init));
        self
    }

    vm_options!();

    /// At most `n` requests may wait in the pool's queues; a request beyond
    /// that resolves [`IsleError::QueueFull`] at once, and the caller never
    /// blocks. Default: unbounded.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = Some(n);
        self
    }

    /// Closes a session (as [`IslePool::close_session`] would) once it has
    /// had no request for `d`. Default: sessions stay open until closed.
    pub fn session_idle_timeout(mut self, d: Duration) -> Self {
        self.session_idle_timeout = Some(d);
        self
    }

    /// Replaces a VM with a fresh one (`init` re-run) after it has run `n`
    /// requests, to shed whatever state and garbage scripts leave behind.
    /// Sessions bound to it lose their state: each one's next request fails
    /// [`IsleError::SessionLost`], and the request after that starts a fresh
    /// session. Default: never.
    pub fn recycle_after(mut self, n: u64) -> Self {
        self.recycle_after = Some(n.max(1));
        self
    }

    /// Replaces a VM with a fresh one when a request leaves it using more
    /// than `bytes` of memory; sessions as for
    /// [`recycle_after`](Self::recycle_after). Default: never.
    pub fn recycle_when_memory_above(mut self, bytes: usize) -> Self {
        self.recycle_above = Some(bytes);
        self
    }

    /// Starts the workers and runs `init` on each; blocks until all have
    /// finished `init`.
    ///
    /// # Errors
    /// [`IsleError::Init`] (or [`IsleError::Panic`]) naming a worker whose
    /// `init` failed (or panicked; the first to report, if several did), or whose thread could not be
    /// spawned; `Init` also for `workers(0)`. Workers already started are
    /// stopped and joined before this returns.
    pub fn build(self) -> Result<IslePool, IsleError> {
        let n = self.workers.unwrap_or_else(num_cpus::get);
        if n == 0 {
            return Err(IsleError::Init("a pool needs at least one worker".into()));
        }
        let config = self.config;
        let init = self.init.unwrap_or_else(|| Arc::new(|_: &Lua| Ok(())));
        let id = next_owner_id();
        let (sleep, parkers) = Sleep::new(n);
        let locals: Vec<Deque<_>> = (0..n).map(|_| Deque::new_fifo()).collect();
        let shared = Arc::new(Shared {
            injector: Injector::new(),
            stealers: locals.iter().map(Deque::stealer).collect(),
            pinned: (0..n).map(|_| Injector::new()).collect(),
            sleep,
            closed: AtomicBool::new(false),
            abort: Arc::new(AtomicBool::new(false)),
            stopped: AtomicBool::new(false),
            sessions: Sessions::new(n),
            counters: (0..n)
                .map(|_| CachePadded::new(WorkerCounters::default()))
                .collect(),
            submitted: StripedCounter::new(),
            rejected: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            sessions_expired: AtomicU64::new(0),
            capacity: self.queue_capacity,
            queued: CachePadded::new(AtomicUsize::new(0)),
            idle_timeout: self.session_idle_timeout,
            recycle_after: self.recycle_after,
            recycle_above: self.recycle_above,
            interrupts: (0..n).map(|_| Mutex::new(None)).collect(),
            epoch: Instant::now(),
        });

        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let (exit_tx, exits) = crossbeam_channel::unbounded();
        let mut guard = Startup {
            shared: shared.clone(),
            threads: Vec::with_capacity(n),
        };
        for (index, (local, parker)) in locals.into_iter().zip(parkers).enumerate() {
            let start_vm = {
                let (config, init, abort) = (config.clone(), init.clone(), shared.abort.clone());
                move || Vm::start(id, &config, abort.clone(), |lua| init(lua))
            };
            let first = start_vm.clone();
            let worker = Worker {
                index,
                shared: shared.clone(),
                local,
                parker,
                restart: Box::new(start_vm),
            };
            let (ready_tx, exit_tx) = (ready_tx.clone(), exit_tx.clone());
            let spawned = config.thread(&format!("-{index}")).spawn(move || {
                let _exit = ExitSignal(exit_tx, index);
                match first() {
                    Ok(vm) => {
                        *worker.shared.interrupts[index].lock() = Some(vm.interrupt());
                        let _ = ready_tx.send((index, Ok(())));
                        worker.run(vm);
                    }
                    Err(e) => {
                        let _ = ready_tx.send((index, Err(e)));
                    }
                }
            });
            match spawned {
                Ok(t) => guard.threads.push(t),
                Err(e) => {
                    return Err(IsleError::Init(format!(
                        "worker {index}: cannot spawn its thread: {e}"
                    )))
                }
            }
        }
        drop(ready_tx);
        for _ in 0..n {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((index, Err(e))) => return Err(name_worker(index, e)),
                Err(_) => return Err(IsleError::Init("a worker died during init".into())),
            }
        }
        let threads = std::mem::take(&mut guard.threads);
        Ok(IslePool {
            inner: Arc::new(PoolInner {
                owner: Owner {
                    id,
                    timer: Timer::new(config.name.clone()),
                    default_timeout: config.default_timeout,
                },
                shared,
                threads: Mutex::new(threads),
                exits,
            }),
        })
    }
}

fn name_worker(index: usize, e: IsleError) -> IsleError {
    match e {
        IsleError::Init(m) => IsleError::Init(format!("worker {index}: {m}")),
        IsleError::Panic(m) => IsleError::Panic(format!("worker {index}: init panicked: {m}")),
        other => other,
    }
}

/// Stops and joins the workers started so far if `build` returns early.
struct Startup {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Startup {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.abort.store(true, Ordering::Release);
        self.shared.closed.store(true, Ordering::Release);
        self.shared.sleep.wake_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Tells `shutdown_timeout` that a worker has exited, however it exits.
struct ExitSignal(crossbeam_channel::Sender<usize>, usize);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

impl fmt::Debug for IslePoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IslePoolBuilder")
            .field("config", &self.config)
            .field("workers", &self.workers)
            .field("init", &self.init.is_some())
            .field("queue_capacity", &self.queue_capacity)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .field("recycle_after", &self.recycle_after)
            .field("recycle_when_memory_above", &self.recycle_above)
            .finish()
    }
}
