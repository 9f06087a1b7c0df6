//! `IslePoolBuilder`, and starting the workers.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Worker as Deque};
use crossbeam_utils::sync::Parker;
use crossbeam_utils::CachePadded;
use mlua::Lua;
use parking_lot::{Condvar, Mutex};

use super::metrics::{StripedCounter, WorkerCounters};
use super::session::{Binding, Sessions};
use super::shared::Shared;
use super::sleep::Sleep;
use super::worker::{StartVm, Worker};
use super::{IslePool, PoolInner};
use crate::host::submit::Owner;
use crate::request::owner::next_owner_id;
use crate::request::timer::Timer;
use crate::vm::config::{vm_options, VmConfig};
use crate::vm::Job;
use crate::vm::Vm;
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
            queued: Arc::new(CachePadded::new(AtomicUsize::new(0))),
            idle_timeout: self.session_idle_timeout,
            recycle_after: self.recycle_after,
            recycle_above: self.recycle_above,
            generations: (0..n).map(|_| AtomicU64::new(0)).collect(),
            interrupts: (0..n).map(|_| Mutex::new(None)).collect(),
            epoch: Instant::now(),
        });

        let start_vm: StartVm = {
            let (config, abort) = (config.clone(), shared.abort.clone());
            Arc::new(move || Vm::start(id, &config, abort.clone(), |lua| init(lua)))
        };
        let spawner = Spawner {
            shared: shared.clone(),
            config: config.clone(),
            start_vm,
            exits: Arc::new(Exits::default()),
        };
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let mut guard = Startup {
            shared: shared.clone(),
            threads: Vec::with_capacity(n),
        };
        for (index, (local, parker)) in locals.into_iter().zip(parkers).enumerate() {
            let slot = Slot {
                index,
                generation: 0,
                local,
                parker,
                batch: true,
            };
            match spawner.spawn(slot, ready_tx.clone(), None) {
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
        let inner = Arc::new(PoolInner {
            owner: Owner {
                id,
                timer: Timer::new(config.name.clone(), id, config.stop_grace),
                default_timeout: config.default_timeout,
            },
            shared,
            threads: Mutex::new(threads),
            spawner,
        });
        let weak = Arc::downgrade(&inner);
        inner.owner.timer.on_overdue(Arc::new(move |req| {
            if let Some(inner) = weak.upgrade() {
                inner.replace_if_running(req);
            }
        }));
        Ok(IslePool { inner })
    }
}

/// What a worker thread gets for its slot.
pub(super) struct Slot {
    pub(super) index: usize,
    pub(super) generation: u64,
    pub(super) local: Deque<Job>,
    pub(super) parker: Parker,
    /// False for a replacement (see `Shared::find`).
    pub(super) batch: bool,
}

/// One worker thread of a pool, as its owner keeps it.
pub(super) struct WorkerThread {
    pub(super) index: usize,
    pub(super) generation: u64,
    pub(super) handle: JoinHandle<()>,
}

/// Starts worker threads: the first ones, and replacements of wedged ones.
pub(super) struct Spawner {
    shared: Arc<Shared>,
    config: VmConfig,
    start_vm: StartVm,
    pub(super) exits: Arc<Exits>,
}

/// Reported by a new worker thread once its VM has started (or failed to).
type Ready = crossbeam_channel::Sender<(usize, Result<(), IsleError>)>;

impl Spawner {
    /// Starts a worker thread for `slot`: it starts its VM (running
    /// `init`), reports on `ready`, then, if given `go`, waits for it (a
    /// dropped `go` means "never mind": the thread exits) and takes from it
    /// the sessions lost with the VM it replaces, and serves.
    pub(super) fn spawn(
        &self,
        slot: Slot,
        ready: Ready,
        go: Option<crossbeam_channel::Receiver<Vec<Arc<Binding>>>>,
    ) -> std::io::Result<WorkerThread> {
        let Slot {
            index,
            generation,
            local,
            parker,
            batch,
        } = slot;
        let worker = Worker {
            index,
            shared: self.shared.clone(),
            local,
            parker,
            restart: self.start_vm.clone(),
            generation,
            batch,
        };
        let exits = self.exits.clone();
        let handle = self.config.thread(&format!("-{index}")).spawn(move || {
            let _exit = ExitSignal(exits, index, generation);
            match (worker.restart)() {
                Ok(vm) => {
                    let _ = ready.send((index, Ok(())));
                    let lost = match go.map(|go| go.recv()) {
                        None => Vec::new(),
                        Some(Ok(lost)) => lost,
                        Some(Err(_)) => return,
                    };
                    *worker.shared.interrupts[index].lock() = Some(vm.interrupt());
                    worker.run(vm, lost);
                }
                Err(e) => {
                    let _ = ready.send((index, Err(e)));
                }
            }
        })?;
        Ok(WorkerThread {
            index,
            generation,
            handle,
        })
    }
}

/// Which worker threads have ended, by (slot, generation): waited on by
/// shutdown, which must not count on a stuck, detached thread ever ending.
#[derive(Default)]
pub(super) struct Exits {
    state: Mutex<ExitState>,
    cond: Condvar,
}

#[derive(Default)]
struct ExitState {
    ended: HashSet<(usize, u64)>,
    /// Threads found wedged while the pool was shutting down.
    wedged: HashSet<(usize, u64)>,
}

impl Exits {
    /// Blocks until every thread of `threads` (slot, generation) has ended
    /// or been found wedged (true), or `deadline` passes (false).
    pub(super) fn wait(&self, threads: &[(usize, u64)], deadline: Option<Instant>) -> bool {
        let mut st = self.state.lock();
        loop {
            if threads
                .iter()
                .all(|t| st.ended.contains(t) || st.wedged.contains(t))
            {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut st, d).timed_out() {
                        return false;
                    }
                }
                None => self.cond.wait(&mut st),
            }
        }
    }

    /// True once this thread has ended.
    pub(super) fn ended(&self, t: &WorkerThread) -> bool {
        self.state.lock().ended.contains(&(t.index, t.generation))
    }

    /// Thread (slot, generation) will not stop on its own: shutdown stops
    /// waiting for it.
    pub(super) fn wedged(&self, thread: (usize, u64)) {
        self.state.lock().wedged.insert(thread);
        self.cond.notify_all();
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
    threads: Vec<WorkerThread>,
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
            let _ = t.handle.join();
        }
    }
}

/// Tells shutdown that a worker thread has ended, however it ends.
struct ExitSignal(Arc<Exits>, usize, u64);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        self.0.state.lock().ended.insert((self.1, self.2));
        self.0.cond.notify_all();
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
