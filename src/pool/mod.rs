//! `IslePool`: N isles behind one work-stealing dispatcher, with sticky
//! sessions.
//!
//! - `builder.rs`: options, and starting the workers (with a guard that stops
//!   the started ones if a later one fails);
//! - `shared.rs`: the queues every worker shares, and finding work;
//! - `sleep.rs`: the sleep/wake protocol;
//! - `worker.rs`: the worker loop; `envs.rs`: the VM it serves with, and
//!   the session environments in it;
//! - `session.rs`: sessions and their binding to VMs; `fair.rs`: serving
//!   the sessions bound to one VM in turn;
//! - `shutdown.rs`: graceful, bounded and abortive shutdown;
//! - `wedge.rs`: replacing a worker stuck in a stopped request;
//! - `reload/`: versioned code on every VM (`IslePool::reload`);
//! - `metrics.rs`: counters.

mod builder;
mod envs;
mod fair;
mod key;
mod metrics;
mod reload;
pub(crate) mod session;
mod shared;
mod shutdown;
mod sleep;
mod wedge;
mod worker;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlua::Lua;

pub use builder::IslePoolBuilder;
pub use key::SessionKey;
pub use metrics::{PoolMetrics, SessionMetrics, WorkerMetrics};
pub use session::Session;

use crate::handle::route::{Home, Place};
use crate::host::reserve::{reserve_methods, Permit};
use crate::host::submit::{request_methods, Owner, Submit};
use crate::host::Host;
use crate::request::owner::on_owner_thread;
use crate::request::{Admission, Room};
use crate::vm::Job;
use crate::{IsleError, Task};
use builder::Spawner;
use shared::{Pinned, Shared};

/// A pool of Lua VMs, each on its own thread, sharing one dispatcher.
///
/// Unkeyed requests (`eval`, `call`, `exec`, `spawn_*`) run on whichever VM
/// is free: work goes to a global queue, idle workers take it in batches and
/// steal from each other, so a long request on one VM never holds back work
/// another VM could do. [`session`](Self::session) pins a key to one VM, with
/// its own globals.
///
/// `IslePool` is a cheap handle (`Clone + Send + Sync`). Every VM is a full
/// isle: its own thread, hook and per-request cancellation, so everything
/// [`Task`] promises holds here too.
///
/// ```
/// use mlua_isle::IslePool;
///
/// let pool = IslePool::new(2, |lua| lua.load("function sq(x) return x * x end").exec())?;
/// let tasks: Vec<_> = (0..10).map(|i| pool.spawn_call::<i64>("sq", i)).collect();
/// let sum: i64 = tasks.into_iter().map(|t| t.wait().unwrap()).sum();
/// assert_eq!(sum, 285);
///
/// let alice = pool.session("alice");
/// alice.eval::<()>("visits = (visits or 0) + 1")?;
/// assert_eq!(alice.eval::<i64>("visits")?, 1);
/// assert_eq!(pool.eval::<Option<i64>>("visits")?, None); // not a shared global
/// pool.shutdown()?;
/// # Ok::<(), mlua_isle::IsleError>(())
/// ```
#[derive(Clone)]
pub struct IslePool {
    inner: Arc<PoolInner>,
}

/// The owner of the workers; dropped with the last handle.
struct PoolInner {
    /// The worker threads, owner id, timer and default time limit.
    host: Host,
    shared: Arc<Shared>,
    /// Starts replacement workers.
    spawner: Spawner,
}

impl IslePool {
    /// A builder to set options before starting.
    pub fn builder() -> IslePoolBuilder {
        IslePoolBuilder::default()
    }

    /// Starts `workers` VMs, running `init` on each.
    ///
    /// # Errors
    /// As for [`IslePoolBuilder::build`].
    pub fn new<F>(workers: usize, init: F) -> Result<IslePool, IsleError>
    where
        F: Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static,
    {
        IslePoolBuilder::default()
            .workers(workers)
            .init(init)
            .build()
    }

    request_methods!(exec);

    reserve_methods!();

    /// A handle to the session `key` (`&str`, `String`, or any integer).
    /// The key is bound to a VM on its first request, and stays bound until
    /// [`close_session`](Self::close_session) or the idle timeout.
    pub fn session(&self, key: impl Into<SessionKey>) -> Session {
        Session::new(self.clone(), key.into())
    }

    /// Closes the session `key`: requests already queued for it still run,
    /// then its VM drops its environment. The next request for `key` starts
    /// a fresh session (possibly on another VM, where it may run before or
    /// beside the closed session's last requests: the two sessions share
    /// nothing but the key). Returns whether it was open.
    /// Never blocks on the VM.
    pub fn close_session(&self, key: impl Into<SessionKey>) -> bool {
        let shared = &self.inner.shared;
        session::close(shared, &shared.sessions.hashed(key.into()))
    }

    /// Runs `f` once on every VM (after the session work already queued on
    /// it) and returns one result per VM, in worker order. Blocks until all
    /// have run.
    ///
    /// What `f` leaves in a VM lives as long as that VM: a VM recycled
    /// ([`recycle_after`](IslePoolBuilder::recycle_after),
    /// [`recycle_when_memory_above`](IslePoolBuilder::recycle_when_memory_above))
    /// or replaced (a wedged one) starts from `init` and never sees it, and
    /// a failure on one VM changes nothing on the others. To load or
    /// replace code everywhere, for good and all or nothing, use
    /// [`reload`](Self::reload).
    ///
    /// # Errors
    /// Per VM, inside the `Vec`: as for [`exec`](Self::exec). Every entry is
    /// [`IsleError::Reentrant`] when called from one of this pool's VM
    /// threads.
    pub fn broadcast<T, F>(&self, f: F) -> Vec<Result<T, IsleError>>
    where
        T: Send + 'static,
        F: Fn(&Lua) -> mlua::Result<T> + Send + Sync + 'static,
    {
        let shared = &self.inner.shared;
        if on_owner_thread(self.inner.host.owner.id) {
            return (0..shared.workers())
                .map(|_| Err(IsleError::Reentrant))
                .collect();
        }
        let f = Arc::new(f);
        let tasks: Vec<Task<T>> = (0..shared.workers())
            .map(|w| {
                let f = f.clone();
                let (task, job) = self
                    .inner
                    .host
                    .owner
                    .request(crate::host::submit::exec(move |lua: &Lua| f(lua)));
                if shared.life.is_closed() {
                    job.abandon(IsleError::Shutdown);
                } else {
                    shared.pinned[w].push(Pinned::Broadcast(job));
                    shared.sleep.wake(w);
                }
                task
            })
            .collect();
        self.after_push();
        tasks.into_iter().map(Task::wait).collect()
    }

    /// Calls the function `name` (a global, or a path as
    /// [`call`](Self::call) takes it) once per input, spread over the VMs,
    /// and returns one result per input, in input order. Blocks until all
    /// are done.
    ///
    /// For many small calls this is much faster than one request each: the
    /// inputs travel in batches (a few per VM, so idle VMs can steal), and
    /// each batch looks `name` up once. A batch is one request: the pool's
    /// `default_timeout` applies to each batch, a Lua error fails only its
    /// own input, and a batch that cannot run or is stopped (full queue,
    /// shutdown, time limit, a Rust panic) gives its error to each of its
    /// inputs.
    ///
    /// ```
    /// use mlua_isle::IslePool;
    ///
    /// let pool = IslePool::new(2, |lua| lua.load("function sq(x) return x * x end").exec())?;
    /// let squares = pool.map::<i64, i64>("sq", 1..=5);
    /// assert_eq!(squares, vec![Ok(1), Ok(4), Ok(9), Ok(16), Ok(25)]);
    /// # Ok::<(), mlua_isle::IsleError>(())
    /// ```
    ///
    /// # Errors
    /// Per input, inside the `Vec`: as for [`call`](Self::call). Every
    /// entry is [`IsleError::Reentrant`] when called from one of this
    /// pool's VM threads.
    pub fn map<A, T>(
        &self,
        name: impl Into<String>,
        inputs: impl IntoIterator<Item = A>,
    ) -> Vec<Result<T, IsleError>>
    where
        A: mlua::IntoLuaMulti + Send + 'static,
        T: mlua::FromLuaMulti + Send + 'static,
    {
        let inputs: Vec<A> = inputs.into_iter().collect();
        if on_owner_thread(self.inner.host.owner.id) {
            return inputs.iter().map(|_| Err(IsleError::Reentrant)).collect();
        }
        // A few batches per VM: enough for stealing to even out uneven
        // inputs, few enough that each hop carries many calls.
        let batches = (self.workers() * 4).clamp(1, inputs.len().max(1));
        let size = inputs.len().div_ceil(batches).max(1);
        let name: Arc<str> = Arc::from(name.into());
        let mut tasks = Vec::with_capacity(batches);
        let mut inputs = inputs.into_iter();
        loop {
            let batch: Vec<A> = inputs.by_ref().take(size).collect();
            if batch.is_empty() {
                break;
            }
            let len = batch.len();
            tasks.push((
                len,
                self.spawn(crate::host::submit::call_each(name.clone(), batch)),
            ));
        }
        let mut out = Vec::new();
        for (len, task) in tasks {
            match task.wait() {
                Ok(results) => out.extend(results),
                Err(e) => out.extend(std::iter::repeat_n(e, len).map(Err)),
            }
        }
        out
    }

    /// A snapshot of the pool's counters.
    pub fn metrics(&self) -> PoolMetrics {
        self.inner.shared.metrics()
    }

    /// The counters of the session `key` (requests, failures, the VM time
    /// they took), or `None` if it is not open. Reading one key takes the
    /// lock of its shard of the session table, as a request for it does.
    pub fn session_metrics(&self, key: impl Into<SessionKey>) -> Option<SessionMetrics> {
        let sessions = &self.inner.shared.sessions;
        sessions.metrics(&sessions.hashed(key.into()))
    }

    /// True once [`shutdown`](Self::shutdown) (or
    /// [`shutdown_timeout`](Self::shutdown_timeout)) has begun.
    pub fn is_shutdown(&self) -> bool {
        self.inner.shared.life.is_closed()
    }

    /// The number of VMs.
    pub fn workers(&self) -> usize {
        self.inner.shared.workers()
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Counts a new request and refuses it if the pool is closed or full
    /// (see `Submit::enqueue` for `admission`).
    fn admit(&self, job: Job, admission: Option<Admission>) -> Option<Job> {
        let shared = self.shared();
        shared.submitted.add(1);
        if shared.life.is_closed() {
            shared.discarded.fetch_add(1, Ordering::Relaxed);
            job.abandon(IsleError::Shutdown);
            None
        } else if !shared.admit(&job, admission) {
            job.abandon(IsleError::QueueFull);
            None
        } else {
            Some(job)
        }
    }

    /// Counts a new request and refuses it: `QueueFull` (a session's own
    /// queue, or the pool's, is full), or `Shutdown` if the pool is closed.
    fn refuse(&self, job: Job) {
        let shared = self.shared();
        shared.submitted.add(1);
        if shared.life.is_closed() {
            shared.discarded.fetch_add(1, Ordering::Relaxed);
            job.abandon(IsleError::Shutdown);
        } else {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            job.abandon(IsleError::QueueFull);
        }
    }

    /// After a push and its wake-up: if every worker has already exited (a
    /// shutdown raced with this submit), resolve what is left in the queues
    /// ourselves.
    fn after_push(&self) {
        let shared = self.shared();
        shared.life.after_push(|| shared.drain());
    }
}

impl Submit for IslePool {
    fn owner(&self) -> &Owner {
        &self.inner.host.owner
    }

    fn room(&self) -> Option<&Arc<Room>> {
        self.shared().room.as_ref()
    }

    fn is_closed(&self) -> bool {
        self.is_shutdown()
    }

    fn enqueue(&self, job: Job, admission: Option<Admission>) {
        if let Some(job) = self.admit(job, admission) {
            let shared = self.shared();
            shared.injector.push(job);
            shared.sleep.wake_any();
            self.after_push();
        }
    }
}

impl Home for PoolInner {
    fn owner(&self) -> &Owner {
        &self.host.owner
    }

    fn send(self: Arc<Self>, job: Job, place: &Place) {
        let pool = IslePool { inner: self };
        match place {
            Place::Isle => pool.enqueue(job, None),
            Place::Worker(w) => {
                if let Some(job) = pool.admit(job, None) {
                    let shared = pool.shared();
                    shared.pinned[*w].push(Pinned::Direct(job));
                    shared.sleep.wake(*w);
                    pool.after_push();
                }
            }
            Place::Session(binding) => session::send(pool, binding, job),
        }
    }
}

/// A permit of a pool: its request runs on any free VM.
impl Permit<IslePool> {
    request_methods!(@exec [self] self);
}

impl fmt::Debug for IslePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IslePool")
            .field("workers", &self.workers())
            .field("shutdown", &self.is_shutdown())
            .finish()
    }
}
