//! `IslePool::reload`: versioned code, on every VM now and every VM
//! started later.
//!
//! The pool keeps the committed reload functions (version `n` is the
//! `n`-th) and the one in flight, under one lock. A VM that starts (the
//! first ones, recycled ones, replacements of wedged ones) takes them under
//! that lock and runs them after `init`, the one in flight included: so a
//! VM started while a reload is in flight ends on its version whichever
//! way the race goes (a slot's reload job finds it there already and does
//! nothing).
//!
//! A reload, one at a time:
//! 1. the function becomes the one in flight;
//! 2. each worker gets a reload job on its control queue, which it takes
//!    before any other work (so only the request running now delays it),
//!    and runs it with an undo record (`undo.rs`);
//! 3. all succeeded: it is committed (VMs starting from now run it as a
//!    committed one), and the workers drop their undo records; one failed:
//!    it is dropped (VMs starting from now do not run it), and every worker
//!    gets a rollback on its control queue, behind its reload job, and the
//!    reload returns once all have rolled back.
//!
//! Why no VM is left behind: a worker takes its control queue in order, and
//! a VM replaces another in its slot only on the worker's own thread
//! (recycling) or while the old thread is stuck in one request (a wedged
//! worker), so a VM started before the function was in flight is serving
//! its slot before that slot's reload job is taken; and one started after
//! runs the function itself. The same holds for rollbacks.
//!
//! A VM stuck inside `f` (a Rust function that does not return) is stopped
//! by the pool's `default_timeout` and, a grace period later, replaced.
//! The caller wakes as soon as one job fails and drops the reload, so a
//! replacement starting a grace period later does not run `f` again (were
//! the caller's thread held off the CPU all that time, it would, as it
//! would run a hanging `init`).

mod undo;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use mlua::Lua;
use parking_lot::Mutex;

use super::shared::Shared;
use super::IslePool;
use crate::request::owner::{blocking_on, on_owner_thread};
use crate::request::Request;
use crate::vm::Job;
use crate::{IsleError, Task};

pub(super) use undo::{commit, replay, rollback, version};

/// A reload function.
pub(super) type ReloadFn = dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync;

/// Work on a worker's control queue: taken before any other work.
pub(super) enum Control {
    /// Run a reload (a request of the pool's owner: its time limit and
    /// stops apply).
    Reload(Job),
    /// Roll reload `version` back if this VM ran it, then say so.
    Rollback(u64, crossbeam_channel::Sender<()>),
    /// Reload `version` is committed: drop its undo record.
    Commit(u64),
}

/// The pool's reloads.
#[derive(Default)]
pub(super) struct Reloads {
    /// Held for the whole of a reload: one at a time, so versions are in
    /// the order reloads commit.
    serial: Mutex<()>,
    state: Mutex<State>,
    /// `state.done.len()`, for metrics.
    committed: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The committed reload functions, in version order.
    done: Vec<Arc<ReloadFn>>,
    /// The reload in flight (version `done.len() + 1`).
    pending: Option<Arc<ReloadFn>>,
}

impl Reloads {
    /// The committed version.
    pub(super) fn version(&self) -> u64 {
        // ORDERING: Relaxed: a figure for metrics; `reload` returns the
        // version itself.
        self.committed.load(Ordering::Relaxed)
    }

    /// What a VM starting now runs after `init`: the committed reloads,
    /// then the one in flight.
    pub(super) fn snapshot(&self) -> (Vec<Arc<ReloadFn>>, Option<Arc<ReloadFn>>) {
        let state = self.state.lock();
        (state.done.clone(), state.pending.clone())
    }

    /// Puts `f` in flight; returns its version.
    fn begin(&self, f: Arc<ReloadFn>) -> u64 {
        let mut state = self.state.lock();
        state.pending = Some(f);
        state.done.len() as u64 + 1
    }

    /// The reload in flight is committed.
    fn commit(&self) {
        let mut state = self.state.lock();
        if let Some(f) = state.pending.take() {
            state.done.push(f);
        }
        self.committed
            .store(state.done.len() as u64, Ordering::Relaxed);
    }

    /// The reload in flight is dropped.
    fn abort(&self) {
        self.state.lock().pending = None;
    }
}

impl IslePool {
    /// Runs `f` on every VM and makes it part of what every VM started
    /// later runs (after `init`), as the next version of the pool's code.
    /// Returns that version (the first reload's is 1; 0 is `init` alone).
    /// Blocks until every VM runs it.
    ///
    /// Each VM runs `f` between requests: before any work queued on it,
    /// once the request running there now (if any) has ended. Recycled VMs
    /// and those replacing wedged ones run `init`, then every committed
    /// reload in order (unlike [`broadcast`](Self::broadcast), whose
    /// effects go with the VM). Sessions keep their state, and read the
    /// globals `f` sets as they read those of `init` (in the sandbox too,
    /// where a table `f` puts in the globals becomes a read-only view, as
    /// those of `init` do). Reloads run one at a time; the version each
    /// returns is one more than the last committed.
    ///
    /// If `f` fails on any VM (an error, a panic, the pool's
    /// `default_timeout`, a stop), the reload is rolled back: no VM stays
    /// on the new version, VMs started later do not run `f`, and the error
    /// is returned once every VM is back (under `default_timeout`, once
    /// every VM is back or that long plus one `stop_grace` has passed: a
    /// VM stuck for good rolls back when it gets back). What rolls back is the global
    /// table: entries `f` added are removed, and those it changed or
    /// removed get their values back (in the sandbox, also in the copy
    /// sessions read). Changes inside tables reachable from the globals, to
    /// the registry, to session environments or outside Lua are not
    /// undone. Until the reload ends, VMs where `f` has run serve requests
    /// with it.
    ///
    /// `f` runs under the VM's `memory_limit` like any request: on a VM
    /// whose sessions hold memory near the limit, a reload that allocates
    /// fails `MemoryLimit` and is rolled back everywhere (keep headroom:
    /// size the limit for it, or recycle VMs above a mark with
    /// `recycle_when_memory_above`).
    ///
    /// On a live VM, `f` runs under the pool's `default_timeout` (without
    /// one, a VM where `f` never returns holds the reload, as it would any
    /// request). Like `init`, it runs with no time limit on a VM that starts
    /// while it is in flight or after it committed, so it must not hang;
    /// and there, as for `init`, a failure is a failure to start (a
    /// recycled VM then keeps serving, counted in
    /// [`WorkerMetrics::recycle_failures`](crate::WorkerMetrics::recycle_failures)).
    /// The committed functions are kept for the life of the pool.
    ///
    /// ```
    /// use mlua_isle::IslePool;
    ///
    /// let pool = IslePool::new(2, |lua| lua.load("function greet() return 'hi' end").exec())?;
    /// let v = pool.reload(|lua| lua.load("function greet() return 'hello' end").exec())?;
    /// assert_eq!(v, 1);
    /// assert_eq!(pool.call::<String>("greet", ())?, "hello");
    /// assert_eq!(pool.metrics().version, 1);
    /// # Ok::<(), mlua_isle::IsleError>(())
    /// ```
    ///
    /// # Errors
    /// The first error `f` gave on a VM (as for [`exec`](Self::exec)),
    /// after the roll back; [`IsleError::Shutdown`] if the pool has shut
    /// down (or, if it may then not finish, shuts down meanwhile);
    /// [`IsleError::Reentrant`] from one of this pool's VM threads (or from
    /// an isle's VM thread this pool's requests are waiting for).
    pub fn reload<F>(&self, f: F) -> Result<u64, IsleError>
    where
        F: Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static,
    {
        let owner = self.inner.host.owner.id;
        if on_owner_thread(owner) {
            return Err(IsleError::Reentrant);
        }
        // From an isle's VM thread: refused if the pool waits on that isle.
        let _waiting = blocking_on(owner)?;
        self.run_reload(
            Arc::new(f),
            || true,
            |commit| {
                commit();
                true
            },
        )
    }

    /// Like [`reload`](Self::reload), but returns at once with a [`Task`]
    /// (run by a thread of its own) resolving to the new version. The task
    /// has no time limit of its own (the pool's `default_timeout` applies
    /// to `f` on each VM); cancelling it, dropping it unfinished, or its
    /// [`timeout`](Task::timeout) passing before the reload commits rolls
    /// the reload back (it resolves `Cancelled` or `Timeout` at once; `f`
    /// is stopped on the VMs where it still runs, and the roll back
    /// finishes on its own thread).
    pub fn spawn_reload<F>(&self, f: F) -> Task<u64>
    where
        F: Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static,
    {
        let owner = &self.inner.host.owner;
        let req = Arc::new(Request::new(owner.id, |_| {}));
        let task = Task::new(req.clone(), owner.timer.clone());
        let unspawned = req.clone();
        let pool = self.clone();
        let f: Arc<ReloadFn> = Arc::new(f);
        let spawned = std::thread::Builder::new()
            .name("mlua-isle-reload".into())
            .spawn(move || {
                // Commits only if the task is still wanted, in one step
                // with resolving it: a cancel either comes first (and the
                // reload rolls back) or finds it resolved.
                let commit =
                    |commit: &mut dyn FnMut() -> u64| req.resolve_unstarted(|| Ok(commit()));
                // A task dropped or cancelled before its turn never runs.
                let wanted = || !req.header().is_done();
                if let Err(e) = pool.run_reload(f, wanted, commit) {
                    req.abandon(e);
                }
            });
        if let Err(e) = spawned {
            unspawned.abandon(IsleError::Init(format!(
                "could not start the reload's thread: {e}"
            )));
        }
        task
    }

    /// Runs a reload, if its turn comes while it is still `wanted` (checked
    /// once the reloads before it are done). Once all VMs ran `f`, `decide`
    /// is given the commit (which returns the version): it runs it and says
    /// true, or says false (the caller no longer wants it: roll back,
    /// resolving `Cancelled`).
    fn run_reload(
        &self,
        f: Arc<ReloadFn>,
        wanted: impl Fn() -> bool,
        decide: impl FnOnce(&mut dyn FnMut() -> u64) -> bool,
    ) -> Result<u64, IsleError> {
        let shared = &*self.inner.shared;
        let reloads = &shared.reloads;
        let _one_at_a_time = reloads.serial.lock();
        if shared.life.is_closed() {
            return Err(IsleError::Shutdown);
        }
        if !wanted() {
            return Err(IsleError::Cancelled);
        }
        let version = reloads.begin(f.clone());
        let mut tasks: Vec<Task<()>> =
            (0..shared.workers())
                .map(|w| {
                    let f = f.clone();
                    let (task, job) = self.inner.host.owner.request(crate::host::submit::exec(
                        move |lua: &Lua| undo::apply(lua, version, &*f),
                    ));
                    shared.push_control(w, Control::Reload(job));
                    task
                })
                .collect();
        self.after_push();
        let ran = first_error(&mut tasks, &wanted).and_then(|()| {
            let mut commit = || {
                reloads.commit();
                for w in 0..shared.workers() {
                    // Every slot's VM runs it (see the module docs): shown
                    // now, not when each worker gets to say so.
                    // ORDERING: Relaxed: statistics.
                    shared.versions[w].store(version, Ordering::Relaxed);
                }
                version
            };
            if decide(&mut commit) {
                Ok(())
            } else {
                Err(IsleError::Cancelled)
            }
        });
        match ran {
            Ok(()) => {
                for w in 0..shared.workers() {
                    shared.push_control(w, Control::Commit(version));
                }
                self.after_push();
                Ok(version)
            }
            Err(e) => {
                // VMs starting from now do not run it; those that did roll
                // back, each after its reload job (still queued or running
                // on some: they are left to end, not stopped, so that a VM
                // inside `f` in a Rust function is not taken for wedged).
                reloads.abort();
                let (ack, acks) = crossbeam_channel::bounded(shared.workers());
                for w in 0..shared.workers() {
                    shared.push_control(w, Control::Rollback(version, ack.clone()));
                }
                drop(ack);
                self.after_push();
                // Ends when every worker has rolled back, or (shutdown) its
                // queue was drained, dropping the sender unsent. Under a
                // `default_timeout`, at most that long plus one grace: a
                // slot whose VM is stuck for good (wedged, its replacement
                // unable to start) rolls back when it gets back, and must
                // not hold the reload's caller, or the next reload.
                let owner = &self.inner.host.owner;
                match owner.default_timeout {
                    Some(d) => {
                        let deadline = Instant::now()
                            .checked_add(d)
                            .and_then(|t| t.checked_add(owner.timer.grace()));
                        while match deadline {
                            Some(at) => acks.recv_deadline(at).is_ok(),
                            None => acks.recv().is_ok(),
                        } {}
                    }
                    None => while acks.recv().is_ok() {},
                }
                drop(tasks);
                Err(e)
            }
        }
    }
}

/// How often a reload whose caller may give up (`spawn_reload`) looks
/// whether it still wants it, while VMs run `f`.
const WANTED_EVERY: Duration = Duration::from_millis(20);

/// Waits until every task has succeeded, or one has failed (its error; the
/// others go on). If the caller stops wanting the reload meanwhile (its
/// task cancelled, dropped or timed out), stops the VMs' runs of `f` (one
/// may loop) and returns `Cancelled`.
fn first_error(tasks: &mut [Task<()>], wanted: &dyn Fn() -> bool) -> Result<(), IsleError> {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut open: Vec<usize> = (0..tasks.len()).collect();
    loop {
        let mut i = 0;
        while i < open.len() {
            match Pin::new(&mut tasks[open[i]]).poll(&mut cx) {
                Poll::Ready(Ok(())) => {
                    open.swap_remove(i);
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => i += 1,
            }
        }
        if open.is_empty() {
            return Ok(());
        }
        if !wanted() {
            for task in tasks.iter() {
                task.cancel();
            }
            return Err(IsleError::Cancelled);
        }
        // Woken by any task's completion (or spuriously: then polled
        // again), or after a while to look at `wanted` again.
        std::thread::park_timeout(WANTED_EVERY);
    }
}

impl Shared {
    /// Queues `c` on worker `w`'s control queue and wakes it.
    pub(super) fn push_control(&self, w: usize, c: Control) {
        self.control[w].push(c);
        self.sleep.wake(w);
    }
}
