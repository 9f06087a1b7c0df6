//! `IslePoolBuilder`, and starting the workers.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Worker as Deque};
use crossbeam_utils::CachePadded;
use mlua::Lua;

use super::metrics::{StripedCounter, WorkerCounters};
use super::reload::{self, Reloads};
use super::session::{Binding, Sessions};
use super::shared::Shared;
use super::sleep::Sleep;
use super::worker::{StartVm, Worker};
use super::{IslePool, PoolInner};
use crate::host::submit::Owner;
use crate::host::{Host, Lifecycle, Queues, Spawn, Starting, VmThread};
use crate::request::Room;
use crate::sync::Parker;
use crate::vm::config::{at_least_one, vm_options, VmConfig, VmInit};
use crate::vm::{Job, Vm};
use crate::IsleError;

/// Configures and starts an [`IslePool`]. Created by [`IslePool::builder`].
#[derive(Clone, Default)]
pub struct IslePoolBuilder {
    config: VmConfig,
    workers: Option<usize>,
    init: Option<Arc<VmInit>>,
    queue_capacity: Option<usize>,
    session_idle_timeout: Option<Duration>,
    recycle_after: Option<u64>,
    recycle_above: Option<usize>,
    fifo_sessions: bool,
    session_queue_capacity: Option<usize>,
}

impl IslePoolBuilder {
    /// Number of VMs (default: the number of CPUs); at least 1.
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

    /// At most `n` requests may wait in the pool's queues (sessions' and
    /// unkeyed alike; a request stops counting once it starts, or resolves
    /// while queued). A request beyond that resolves
    /// [`IsleError::QueueFull`] at once, and the caller never blocks. To
    /// wait for room instead, take it first with
    /// [`IslePool::reserve_timeout`] or [`IslePool::reserve`] (also on
    /// sessions). Default: unbounded; at least 1.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = Some(n);
        self
    }

    /// At most `n` requests of one session may wait in its VM's queue; a
    /// request of that session beyond it resolves [`IsleError::QueueFull`]
    /// at once, while other sessions' requests are still taken. A request
    /// counts until it starts, or resolves while queued (as for
    /// [`queue_capacity`](Self::queue_capacity), which still bounds the
    /// pool as a whole). A session's [`reserve`](crate::Session::reserve)
    /// and `reserve_timeout` wait for room in the session's queue, then in
    /// the pool's. Default: a session is bounded only by `queue_capacity`.
    ///
    /// The bound belongs to the session while it is open: a session
    /// closed (or expired) and opened again starts with an empty count,
    /// while its old requests still run.
    pub fn session_queue_capacity(mut self, n: usize) -> Self {
        self.session_queue_capacity = Some(n);
        self
    }

    /// Serves the session work queued on a VM first come, first served
    /// (`true`), instead of in turns across sessions (the default).
    ///
    /// By default a VM's sessions with queued work take turns, one request
    /// each, and a session whose requests run long waits more turns (its
    /// requests' run time is the cost): a tenant that queues thousands of
    /// requests delays another tenant on the same VM by about one of its
    /// requests, not by all of them. Each session's own requests still run
    /// in the order submitted. First come, first served gives up that
    /// isolation for a strict order across sessions.
    ///
    /// One more difference, with the `async` feature: first come, first
    /// served, the requests of a session queued behind its suspended
    /// request wait in the worker thread itself. If that worker is wedged
    /// and replaced, they resolve only once the stuck thread gets back
    /// (fairly served, they wait in the pool's queue, and the replacement
    /// answers them `SessionLost`).
    pub fn fifo_sessions(mut self, on: bool) -> Self {
        self.fifo_sessions = on;
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
        self.recycle_after = Some(n);
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
    /// `init` failed (or panicked; the lowest-numbered one, if several
    /// did), or whose thread could not be spawned. `Init` also for a zero
    /// given to an option that counts something (`workers`,
    /// `queue_capacity`, `recycle_after`, `recycle_when_memory_above`, `hook_interval`,
    /// `max_instructions`, `memory_limit`), naming it. Workers already
    /// started are stopped and joined before this returns.
    pub fn build(self) -> Result<IslePool, IsleError> {
        let n = self.workers.unwrap_or_else(num_cpus::get);
        at_least_one("workers", Some(n as u64))?;
        at_least_one("recycle_after", self.recycle_after)?;
        at_least_one("queue_capacity", self.queue_capacity.map(|n| n as u64))?;
        at_least_one(
            "session_queue_capacity",
            self.session_queue_capacity.map(|n| n as u64),
        )?;
        at_least_one(
            "recycle_when_memory_above",
            self.recycle_above.map(|b| b as u64),
        )?;
        let mut config = self.config;
        config.check()?;
        config.resolve();
        let init = self.init.unwrap_or_else(|| Arc::new(|_: &Lua| Ok(())));
        let owner = Owner::new(&config);
        let id = owner.id;
        let (sleep, parkers) = Sleep::new(n);
        let locals: Vec<Deque<_>> = (0..n).map(|_| Deque::new_fifo()).collect();
        let life = Lifecycle::new(n);
        let shared = Arc::new(Shared {
            injector: Injector::new(),
            stealers: locals.iter().map(Deque::stealer).collect(),
            pinned: (0..n).map(|_| Injector::new()).collect(),
            fair: (0..n).map(|_| CachePadded::default()).collect(),
            control: (0..n).map(|_| Injector::new()).collect(),
            bound: (0..n).map(|_| Injector::new()).collect(),
            reloads: Reloads::default(),
            versions: (0..n).map(|_| AtomicU64::new(0)).collect(),
            sleep,
            life: life.clone(),
            sessions: Sessions::new(n),
            counters: (0..n)
                .map(|_| CachePadded::new(WorkerCounters::default()))
                .collect(),
            submitted: StripedCounter::new(),
            rejected: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            sessions_expired: AtomicU64::new(0),
            room: self.queue_capacity.map(Room::new),
            session_capacity: self.session_queue_capacity,
            idle_timeout: self.session_idle_timeout,
            recycle_after: self.recycle_after,
            recycle_above: self.recycle_above,
            epoch: Instant::now(),
            fifo_sessions: self.fifo_sessions,
            home: crate::handle::route::home_cell(),
        });

        // A VM runs `init`, then the reloads (committed and in flight) as
        // they stand when it starts.
        let start_vm: StartVm = {
            let (config, abort) = (config.clone(), life.abort_flag());
            let shared = shared.clone();
            Arc::new(move || {
                let (done, pending) = shared.reloads.snapshot();
                Vm::start_then(
                    id,
                    &config,
                    abort.clone(),
                    |lua| init(lua),
                    |lua| reload::replay(lua, &done, pending.as_ref()),
                )
            })
        };
        let spawner = Spawner {
            shared: shared.clone(),
            config: config.clone(),
            start_vm,
        };
        // All start (and run `init`) in parallel; each is then waited for.
        let mut startup = Startup {
            shared: shared.clone(),
            starting: Vec::with_capacity(n),
            started: Vec::with_capacity(n),
        };
        for (index, (local, parker)) in locals.into_iter().zip(parkers).enumerate() {
            let slot = WorkerSlot {
                index,
                generation: 0,
                local,
                parker,
                batch: true,
            };
            let starting = spawner
                .spawn(slot, None)
                .map_err(|e| name_worker(index, e))?;
            startup.starting.push(starting);
        }
        while !startup.starting.is_empty() {
            let index = startup.started.len();
            let thread = startup
                .starting
                .remove(0)
                .ready()
                .map_err(|e| name_worker(index, e))?;
            startup.started.push(thread);
        }
        let threads = std::mem::take(&mut startup.started);
        let inner = Arc::new(PoolInner {
            host: Host::new(owner, life, threads),
            shared,
            spawner,
        });
        let home: std::sync::Weak<dyn crate::handle::route::Home> =
            Arc::downgrade(&inner) as std::sync::Weak<PoolInner>;
        let _ = inner.shared.home.set(home);
        let weak = Arc::downgrade(&inner);
        inner.host.owner.timer.on_overdue(Arc::new(move |req| {
            if let Some(inner) = weak.upgrade() {
                inner.replace_if_running(req);
            }
        }));
        Ok(IslePool { inner })
    }
}

/// What a worker thread gets for its slot.
pub(super) struct WorkerSlot {
    pub(super) index: usize,
    pub(super) generation: u64,
    pub(super) local: Deque<Job>,
    pub(super) parker: Parker,
    /// False for a replacement (see `Shared::find`).
    pub(super) batch: bool,
}

/// Starts worker threads: the first ones, and replacements of wedged ones.
pub(super) struct Spawner {
    shared: Arc<Shared>,
    config: VmConfig,
    start_vm: StartVm,
}

impl Spawner {
    /// Starts a worker thread for `slot` (see `host::Spawn`): given `go`,
    /// it waits for it and takes from it the sessions lost with the VM it
    /// replaces.
    pub(super) fn spawn(
        &self,
        slot: WorkerSlot,
        go: Option<crossbeam_channel::Receiver<Vec<Arc<Binding>>>>,
    ) -> Result<Starting, IsleError> {
        let WorkerSlot {
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
            max_suspended: self.config.max_suspended,
            pending: Default::default(),
        };
        Spawn {
            slot: index,
            generation,
            start: {
                let start_vm = self.start_vm.clone();
                move || start_vm()
            },
            go,
        }
        .spawn(
            &self.shared.life,
            &self.config,
            &format!("-{index}"),
            move |vm, lost| worker.run(vm, lost.unwrap_or_default()),
        )
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
    starting: Vec<Starting>,
    started: Vec<VmThread>,
}

impl Drop for Startup {
    fn drop(&mut self) {
        if self.starting.is_empty() && self.started.is_empty() {
            return;
        }
        // No request was queued: closed and aborted, every worker exits as
        // soon as its VM has started.
        self.shared.life.close();
        self.shared.life.abort();
        self.shared.wake_all();
        for s in self.starting.drain(..) {
            s.join();
        }
        for t in self.started.drain(..) {
            t.join();
        }
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
