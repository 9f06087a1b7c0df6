//! A pool worker: one VM thread taking work from its queues, stealing when
//! idle, sleeping when there is nothing anywhere.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_deque::Worker as Deque;
use mlua::Lua;

use super::envs::{Waiting, WorkerVm};
use super::fair::FairSlot;
use super::reload::{self, Control};
use super::session::Binding;
use super::shared::{steal_one, Found, Pinned, Shared};
use crate::metrics::{Pending, Timing};
use crate::request::spin::spin_until;
use crate::sync::Parker;
use crate::vm::Vm;
use crate::vm::{Job, Outcome, SessionEnv};
use crate::IsleError;

/// Starts a fresh VM (runs `init`) on the calling thread: a worker's first,
/// a recycled one, or one replacing a wedged worker.
pub(super) type StartVm = Arc<dyn Fn() -> Result<Vm, IsleError> + Send + Sync>;

/// The tag a suspended broadcast job resolves with (`Vm::run`): unkeyed
/// work has 0, a session's request its binding id (from 1).
const BROADCAST: u64 = u64::MAX;

pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) shared: Arc<Shared>,
    pub(super) local: Deque<Job>,
    pub(super) parker: Parker,
    pub(super) restart: StartVm,
    /// This thread's generation in its slot (`Shared::generations`).
    pub(super) generation: u64,
    /// Whether thieves can reach `local` (see `Shared::find`).
    pub(super) batch: bool,
    /// Requests the VM may hold suspended (`max_suspended`).
    pub(super) max_suspended: usize,
    /// Latency samples not yet in this worker's metrics (flushed before
    /// the worker sleeps or ends).
    pub(super) pending: RefCell<Pending>,
}

impl Worker {
    /// The worker loop; returns when the pool shuts down and nothing is
    /// left for this worker.
    ///
    /// `lost`: sessions whose state went with the VM this one replaces.
    pub(super) fn run(self, vm: Vm, mut lost: Vec<Arc<Binding>>) {
        let shared = &*self.shared;
        if shared.idle_timeout.is_none() {
            // Kept only to expire (see `recycle`).
            lost.clear();
        }
        let w = self.index;
        self.wake_on_futures(&vm);
        crate::handle::route::set_home(vm.lua(), &shared.home, Some(w));
        let mut host = WorkerVm::new(vm);
        self.show_version(&host);
        // A replacement for a wedged worker: the session the stuck one was
        // serving is served again.
        shared.fair[w].take_over();
        // Sessions whose VM was recycled (or replaced while wedged): they
        // answer `SessionLost` once.
        let sweep_every = shared
            .idle_timeout
            .map(|d| (d / 4).clamp(Duration::from_millis(1), Duration::from_secs(1)));
        let mut next_sweep = Instant::now();
        let mut pinned_first = false;
        loop {
            // Suspended requests whose futures woke (the `async` feature).
            if host.vm.has_woken() {
                self.resume_woken(&mut host, &mut lost);
                if !self.is_current() {
                    // Found wedged in a resumed poll and replaced: the slot
                    // (its queues, its fair queue, its reloads) is another
                    // thread's now.
                    self.retire();
                    return;
                }
                // The last suspended request may have resolved, and the
                // VM's count be due: a VM whose requests all suspend is
                // recycled too. Not while work of its own waits (a
                // session's requests queued behind the one that resolved
                // run in their session first): the check after the next
                // request recycles then.
                if host.vm.suspended() == 0
                    && !shared.has_pinned_work(w)
                    && self.due_for_recycling(&host)
                {
                    self.recycle(&mut host, &mut lost);
                }
            }
            if shared.life.is_aborting() && host.vm.suspended() > 0 {
                self.close_suspended(&mut host, &mut lost);
            }
            // Reloads: between requests, before any queued work.
            if let Some(c) = shared.control(w) {
                self.control(&mut host, c);
                if !self.is_current() {
                    self.retire();
                    return;
                }
                continue;
            }
            // Busy: take work, unless the VM holds all the suspended
            // requests it may (then it only polls them, and other workers
            // take the unkeyed work). One with requests suspended takes
            // no batches from the global queue: it leaves them to others.
            let room = host.vm.suspended() < self.max_suspended;
            pinned_first = !pinned_first;
            let batch = self.batch && host.vm.suspended() == 0;
            let found = if room {
                shared.find(w, &self.local, pinned_first, batch, self.generation)
            } else {
                None
            };
            if let Some(found) = found {
                // About to be busy: if unkeyed work is still waiting, make
                // sure a sleeping worker comes for it (the wake-up that
                // brought us here may have been meant for it).
                if shared.sleep.anyone_asleep() && shared.has_unkeyed_work() {
                    shared.sleep.wake_any();
                }
                match found {
                    Found::Unkeyed(job) => {
                        self.run_job(&host, job, None, 0);
                    }
                    Found::Pinned(Pinned::Session(binding, job)) => {
                        let (ran, suspended) = self.session_job(&mut host, &binding, job);
                        self.served_key(binding.id, ran, suspended);
                    }
                    Found::Pinned(Pinned::Direct(job)) => {
                        self.run_job(&host, job, None, 0);
                    }
                    Found::Pinned(Pinned::Broadcast(job)) => {
                        // Not a request of the pool's: not in its metrics.
                        if shared.life.is_aborting() {
                            job.abandon(IsleError::Shutdown);
                        } else {
                            host.vm.run(job, None, BROADCAST);
                        }
                    }
                    Found::Pinned(Pinned::Close(id)) => {
                        shared.counters[w]
                            .closes_queued
                            .fetch_sub(1, Ordering::Relaxed);
                        match host.envs.get_mut(&id) {
                            Some(env) if env.busy => env.waiting.push_back(Waiting::Close),
                            _ => self.close(&mut host, id, &mut lost),
                        }
                        self.served_key(id, Duration::ZERO, false);
                    }
                }
                if !self.is_current() {
                    // Found wedged and replaced while in that request: the
                    // slot is another thread's now.
                    self.retire();
                    return;
                }
                if host.vm.suspended() == 0 && self.due_for_recycling(&host) {
                    self.recycle(&mut host, &mut lost);
                }
                // Sessions expire under load too, not only when idle.
                if let Some(every) = sweep_every {
                    if Instant::now() >= next_sweep {
                        self.expire_idle(&mut host, &mut lost);
                        next_sweep = Instant::now() + every;
                    }
                }
                continue;
            }

            // Idle (or at the cap of suspended requests).
            let stopping = || shared.life.is_closed();
            if stopping() && host.vm.suspended() == 0 && !shared.has_work(w, &self.local) {
                self.flush_latency();
                break;
            }
            if spin_until(|| self.more(&host.vm, room)) {
                continue;
            }
            if let Some(every) = sweep_every {
                if Instant::now() >= next_sweep {
                    self.expire_idle(&mut host, &mut lost);
                    next_sweep = Instant::now() + every;
                }
            }
            self.flush_latency();
            let timeout = sweep_every.filter(|_| {
                !host.envs.is_empty() || !lost.is_empty() || !shared.bound[w].is_empty()
            });
            shared
                .sleep
                .sleep(w, &self.parker, timeout, || self.more(&host.vm, room));
        }
    }

    /// Whether an idle worker has something to do: a suspended request
    /// woke, work it may take (`room`: below `max_suspended`) is queued, or
    /// the pool is closing and nothing holds this worker back.
    fn more(&self, vm: &Vm, room: bool) -> bool {
        vm.has_woken()
            || !self.shared.control[self.index].is_empty()
            || (room && self.shared.has_work(self.index, &self.local))
            || (self.shared.life.is_closed() && vm.suspended() == 0)
    }

    /// Work from the control queue (see `reload`). Not requests of the
    /// pool's: not in its metrics.
    fn control(&self, host: &mut WorkerVm, c: Control) {
        match c {
            Control::Reload(job) => {
                if self.shared.life.is_aborting() {
                    job.abandon(IsleError::Shutdown);
                } else {
                    host.vm.run(job, None, BROADCAST);
                    self.show_version(host);
                }
            }
            Control::Rollback(version, ack) => {
                host.vm
                    .between_requests(|lua| reload::rollback(lua, version));
                self.show_version(host);
                let _ = ack.send(());
            }
            Control::Commit(version) => {
                host.vm.between_requests(|lua| reload::commit(lua, version));
            }
        }
    }

    /// Publishes the version of the VM's code (metrics).
    fn show_version(&self, host: &WorkerVm) {
        if self.is_current() {
            // ORDERING: Relaxed: statistics (a rollback's caller learns it
            // through the acknowledgement that follows).
            self.shared.versions[self.index]
                .store(reload::version(host.vm.lua()), Ordering::Relaxed);
        }
    }

    /// Tells the fair queue that the item of session `id` it gave out has
    /// been dealt with, after running for `ran`, or that it `suspended`
    /// (unless this worker was replaced meanwhile: the queue is its
    /// replacement's).
    fn served_key(&self, id: u64, ran: Duration, suspended: bool) {
        if let Some(fair) = self.fair() {
            fair.done(id, self.generation, ran, suspended);
        }
    }

    /// This slot's fair queue, if sessions are served fairly and the slot
    /// is still this worker's.
    fn fair(&self) -> Option<&FairSlot> {
        (!self.shared.fifo_sessions && self.is_current()).then(|| &*self.shared.fair[self.index])
    }

    /// Hands the latency samples not yet recorded to the slot's metrics.
    fn flush_latency(&self) {
        self.pending
            .borrow_mut()
            .flush(&self.shared.counters[self.index].latency);
    }

    /// A request for a session: it runs now, unless a request of the same
    /// session is suspended (then it waits behind it, in order: in the fair
    /// queue, which holds the session's items back meanwhile; with
    /// `fifo_sessions`, here). Returns how long it ran, and whether it
    /// suspended.
    fn session_job(
        &self,
        host: &mut WorkerVm,
        binding: &Arc<Binding>,
        job: Job,
    ) -> (Duration, bool) {
        if binding.lost.load(Ordering::Acquire) {
            self.tell_lost(binding, job);
            binding.counters.resolved(Outcome::Failed);
            self.session_request_done(binding);
            return (Duration::ZERO, false);
        }
        let env = host.env(binding);
        if env.busy {
            env.waiting.push_back(Waiting::Job(job));
            (Duration::ZERO, false)
        } else {
            self.run_session(host, binding, job)
        }
    }

    /// Runs a session's request in its environment; if it suspends, the
    /// session is busy until it resolves. Returns how long it ran, and
    /// whether it suspended.
    fn run_session(
        &self,
        host: &mut WorkerVm,
        binding: &Arc<Binding>,
        job: Job,
    ) -> (Duration, bool) {
        // The request has the session's environment while it runs (or
        // makes it, on the session's first), and gives it back after.
        let lent = host.lend_env(binding);
        let made = Cell::new(None);
        let open = |lua: &Lua| {
            let (table, kept) = host.open_env(binding.id, lua)?;
            made.set(kept);
            Ok(table)
        };
        let env = SessionEnv::new(lent, &open);
        // The session is the request's: a `LuaHandle` made by it belongs
        // to the session (`vm/scope.rs`).
        let session = Some((&env, binding.clone() as crate::vm::scope::SessionTag));
        let (outcome, ran) = self.run_job(host, job, session, binding.id);
        host.session_ran(binding, env.into_table(), made.take(), outcome.is_none());
        binding.counters.ran(ran);
        if let Some(outcome) = outcome {
            binding.counters.resolved(outcome);
            self.session_request_done(binding);
        }
        (ran, outcome.is_none())
    }

    /// A session's request has resolved.
    fn session_request_done(&self, binding: &Binding) {
        // The idle clock starts when the last request ends. Both are read
        // only by `expire_idle`: without an idle timeout, neither is kept.
        if self.shared.idle_timeout.is_some() {
            binding
                .last_used
                .store(self.shared.now_ns(), Ordering::Relaxed);
            binding.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Closes a session: its environment goes.
    fn close(&self, host: &mut WorkerVm, id: u64, lost: &mut Vec<Arc<Binding>>) {
        if let Some(env) = host.envs.remove(&id) {
            host.shrink_envs();
            if let Some(kept) = env.kept {
                kept.forget(&host.vm);
            }
            env.binding.uncount(&self.shared);
            // Whatever still waited (nothing can: a close comes after its
            // session's requests) resolves.
            for w in env.waiting {
                if let Waiting::Job(job) = w {
                    job.abandon(IsleError::SessionLost);
                }
            }
        }
        lost.retain(|b| b.id != id);
    }

    /// Polls the suspended requests that woke, and finishes what resolved.
    fn resume_woken(&self, host: &mut WorkerVm, lost: &mut Vec<Arc<Binding>>) {
        let mut polls = Vec::new();
        let mut resolved = Vec::new();
        host.vm.resume_woken(
            &mut |tag, ran| polls.push((tag, ran)),
            &mut |tag, outcome| resolved.push((tag, outcome)),
        );
        // Charged before the sessions resume: the time of a request's
        // later polls is its session's cost too.
        for (tag, ran) in polls {
            self.charge(host, tag, ran);
        }
        for (tag, outcome) in resolved {
            self.resolved(host, tag, outcome, lost);
        }
        self.count_suspended(host);
    }

    /// A suspended request (of the session `tag`, if not 0) ran a poll for
    /// `ran`: the worker's busy time, the session's run time and its cost
    /// in the fair queue.
    fn charge(&self, host: &WorkerVm, tag: u64, ran: Duration) {
        if tag == BROADCAST {
            return;
        }
        // ORDERING: Relaxed: statistics.
        self.shared.counters[self.index]
            .busy_ns
            .fetch_add(ran.as_nanos() as u64, Ordering::Relaxed);
        if tag == 0 {
            return;
        }
        if let Some(env) = host.envs.get(&tag) {
            env.binding.counters.ran(ran);
        }
        if let Some(fair) = self.fair() {
            fair.charge(tag, ran);
        }
    }

    /// Stops every suspended request (the pool is aborting).
    fn close_suspended(&self, host: &mut WorkerVm, lost: &mut Vec<Arc<Binding>>) {
        self.settle(host, lost, Vm::close_suspended);
    }

    /// Runs `step` over the VM's suspended requests (stopping them), then
    /// finishes each that resolved.
    fn settle(
        &self,
        host: &mut WorkerVm,
        lost: &mut Vec<Arc<Binding>>,
        step: fn(&Vm, &mut dyn FnMut(u64, Outcome)),
    ) {
        let mut resolved = Vec::new();
        step(&host.vm, &mut |tag, outcome| resolved.push((tag, outcome)));
        for (tag, outcome) in resolved {
            self.resolved(host, tag, outcome, lost);
        }
        self.count_suspended(host);
    }

    /// A suspended request resolved: count it, and if it was a session's,
    /// run what waited behind it.
    fn resolved(
        &self,
        host: &mut WorkerVm,
        tag: u64,
        outcome: Outcome,
        lost: &mut Vec<Arc<Binding>>,
    ) {
        if tag == BROADCAST || !self.is_current() {
            // Replaced while it was stuck: what it had suspended was
            // counted at the hand-over (`pool/wedge.rs`).
            return;
        }
        self.shared.counters[self.index].record(outcome, Duration::ZERO);
        host.served.set(host.served.get() + 1);
        if tag == 0 {
            return;
        }
        // The session's next items take turns again (`fifo_sessions`: they
        // wait below, in `env.waiting`).
        if let Some(fair) = self.fair() {
            fair.resume(tag);
        }
        let Some(env) = host.envs.get_mut(&tag) else {
            return;
        };
        env.busy = false;
        let binding = env.binding.clone();
        binding.counters.resolved(outcome);
        self.session_request_done(&binding);
        // What waited behind it, in order, until one suspends.
        loop {
            let Some(env) = host.envs.get_mut(&tag) else {
                return;
            };
            if env.busy {
                return;
            }
            match env.waiting.pop_front() {
                None => return,
                Some(Waiting::Close) => {
                    self.close(host, tag, lost);
                    return;
                }
                Some(Waiting::Job(job)) => {
                    // Aborting, `run_job` resolves it `Shutdown` unrun, and
                    // counts it (pool and session) like any other.
                    self.run_session(host, &binding, job);
                }
            }
        }
    }

    fn count_suspended(&self, host: &WorkerVm) {
        if !self.is_current() {
            // Replaced: the slot's gauge is the fresh VM's.
            return;
        }
        self.shared.counters[self.index]
            .suspended
            .store(host.vm.suspended(), Ordering::Relaxed);
    }

    /// False once a replacement has taken this worker's slot.
    fn is_current(&self) -> bool {
        self.shared.life.is_current(self.index, self.generation)
    }

    /// Leaves the slot to its replacement: what waits in this thread's deque
    /// goes back to the global queue. The VM is dropped with the worker.
    fn retire(&self) {
        let shared = &*self.shared;
        // What it ran still counts in its slot's metrics.
        self.flush_latency();
        let mut moved = false;
        while let Some(job) = self.local.pop() {
            shared.injector.push(job);
            moved = true;
        }
        if moved {
            shared.sleep.wake_any();
            // The pool may have stopped (and drained) while this thread was
            // stuck.
            shared.life.after_push(|| shared.drain());
        }
    }

    /// Runs a job; its outcome is `None` if it suspended (it resolves
    /// through `resume_woken`, with `tag`). Returns how long it ran.
    fn run_job(
        &self,
        host: &WorkerVm,
        job: Job,
        session: Option<(&SessionEnv<'_>, crate::vm::scope::SessionTag)>,
        tag: u64,
    ) -> (Option<Outcome>, Duration) {
        let counters = &self.shared.counters[self.index];
        if self.shared.life.is_aborting() {
            job.abandon(IsleError::Shutdown);
            counters.record(Outcome::Cancelled, Duration::ZERO);
            return (Some(Outcome::Cancelled), Duration::ZERO);
        }
        counters.running.store(true, Ordering::Relaxed);
        let key = || host.envs.get(&tag).map(|env| &env.binding.key);
        let timing = Timing::start(&job, None, Some(self.index), key);
        let outcome = host.vm.run(job, session, tag);
        let busy = timing.finish(outcome, &mut self.pending.borrow_mut(), &counters.latency);
        // Back from a request during which this worker was replaced: the
        // flag is its replacement's now.
        if self.is_current() {
            counters.running.store(false, Ordering::Relaxed);
        }
        match outcome {
            Some(outcome) => {
                counters.record(outcome, busy);
                host.served.set(host.served.get() + 1);
            }
            None => {
                counters
                    .busy_ns
                    .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
                self.count_suspended(host);
            }
        }
        (outcome, busy)
    }

    /// A request for a session whose state went with a recycled VM: it
    /// fails `SessionLost`, and the key is unbound, so the request after it
    /// starts a fresh session.
    fn tell_lost(&self, binding: &Arc<Binding>, job: Job) {
        // Unbind before answering: the caller's next request must bind
        // afresh, not queue behind the lost binding.
        self.shared.sessions.remove_if(binding, |_| true);
        binding.uncount(&self.shared);
        job.abandon(IsleError::SessionLost);
        self.shared.counters[self.index].record(Outcome::Failed, Duration::ZERO);
    }

    /// A future `vm`'s suspended requests wait on wakes this worker (also
    /// a VM it starts when it recycles).
    fn wake_on_futures(&self, vm: &Vm) {
        let (w, weak) = (self.index, Arc::downgrade(&self.shared));
        vm.on_wake(move || {
            if let Some(shared) = weak.upgrade() {
                shared.sleep.wake(w);
            }
        });
    }

    fn due_for_recycling(&self, host: &WorkerVm) -> bool {
        let shared = &*self.shared;
        shared.recycle_after.is_some_and(|n| host.served.get() >= n)
            || shared
                .recycle_above
                .is_some_and(|bytes| host.vm.lua().used_memory() > bytes)
    }

    /// Replaces the VM with a fresh one (`init` re-run). The sessions it
    /// held are marked lost: each learns it on its next request. If the new
    /// VM cannot start, the old one keeps serving and the failure is counted.
    fn recycle(&self, host: &mut WorkerVm, lost: &mut Vec<Arc<Binding>>) {
        let counters = &self.shared.counters[self.index];
        match (self.restart)() {
            Ok(vm) => {
                self.wake_on_futures(&vm);
                crate::handle::route::set_home(vm.lua(), &self.shared.home, Some(self.index));
                self.shared.life.serve_with(self.index, vm.interrupt());
                let old = std::mem::replace(host, WorkerVm::new(vm));
                self.show_version(host);
                for env in old.envs.into_values() {
                    env.binding.lost.store(true, Ordering::Release);
                    env.binding.uncount(&self.shared);
                    // Kept to expire if it is never told (a session told
                    // is unbound, and forgotten by the next sweep); with no
                    // idle timeout nothing expires, and keeping it would
                    // hold its key for the life of the pool.
                    if self.shared.idle_timeout.is_some() {
                        lost.push(env.binding);
                    }
                }
                counters.recycled.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counters.recycle_failures.fetch_add(1, Ordering::Relaxed);
                host.served.set(0);
            }
        }
    }

    /// Closes this VM's sessions (live or lost) that have been idle for
    /// `idle_timeout`.
    fn expire_idle(&self, host: &mut WorkerVm, lost: &mut Vec<Arc<Binding>>) {
        let shared = &*self.shared;
        let Some(idle) = shared.idle_timeout else {
            return;
        };
        let idle_ns = idle.as_nanos() as u64;
        let now = shared.now_ns();
        let is_idle = |b: &Binding| {
            b.pending.load(Ordering::Relaxed) == 0
                && now.saturating_sub(b.last_used.load(Ordering::Relaxed)) >= idle_ns
        };
        // Checked again under the shard lock: a request may be binding to
        // the session right now.
        let expire = |b: &Arc<Binding>| is_idle(b) && shared.sessions.remove_if(b, is_idle);
        // Sessions bound here since the last sweep: those with no
        // environment on this VM are swept with the lost ones (a session
        // opened by a reservation may never send a request).
        while let Some(b) = steal_one(|| shared.bound[self.index].steal()) {
            if !host.envs.contains_key(&b.id) {
                lost.push(b);
            }
        }
        let WorkerVm { vm, envs, .. } = host;
        envs.retain(|_, env| {
            if expire(&env.binding) {
                if let Some(kept) = env.kept.take() {
                    kept.forget(vm);
                }
                env.binding.uncount(shared);
                shared.sessions_expired.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
        host.shrink_envs();
        lost.retain(|b| {
            if host.envs.contains_key(&b.id) {
                return false; // opened here since: swept with the others
            }
            if expire(b) {
                b.uncount(shared);
                shared.sessions_expired.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                // Gone from the table already (told, or closed): forget it.
                shared.sessions.is_bound(b)
            }
        });
    }
}
