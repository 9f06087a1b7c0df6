//! `Isle`: one Lua VM on its own thread.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mlua::Lua;

use crate::handle::route::{home_cell, set_home, Home, HomeCell, Place};
use crate::host::reserve::{reserve_methods, Permit};
use crate::host::submit::{request_methods, take_room, Owner, Submit};
use crate::host::{Host, Lifecycle, Queues, Spawn, Starting};
use crate::metrics::{IsleCounters, IsleMetrics, Pending, Timing};
use crate::request::spin::spin_until;
use crate::request::{Admission, Cancel, Room};
use crate::vm::config::{at_least_one, vm_options, VmConfig, VmInit};
use crate::vm::{Job, Vm};
use crate::{IsleError, Task};

/// One Lua VM confined to a dedicated thread, reachable from any thread.
///
/// `Isle` is a cheap handle (`Clone + Send + Sync`). Requests run one at a
/// time on the VM thread, in the order they were submitted. Blocking methods
/// (`eval`, `call`, `exec`) wait for their result; `spawn_*` methods return a
/// [`Task`] at once.
///
/// Shutdown: [`shutdown`](Self::shutdown) finishes the queued work and joins
/// the thread. Dropping the last handle without it stops the running request
/// and resolves the queued ones with [`IsleError::Shutdown`], then joins
/// (waiting at most [`stop_grace`](IsleBuilder::stop_grace) for a VM stuck
/// in Rust or C code, which is then detached).
///
/// A VM that does not let go of a stopped request within the grace period
/// is replaced by a fresh one, which takes over the queue; see
/// [`IsleBuilder::stop_grace`].
#[derive(Clone)]
pub struct Isle {
    inner: Arc<Inner>,
}

/// A re-runnable init closure.
/// State shared by every handle of one isle.
struct Inner {
    /// Its one VM thread (slot 0), owner id, timer and default time limit.
    host: Host,
    /// The VM thread's queue, and its receiving end for a replacement VM.
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    /// The room `queue_capacity` gives (`None`: unbounded).
    room: Option<Arc<Room>>,
    /// For replacement VMs.
    config: VmConfig,
    init: Option<Arc<VmInit>>,
    /// VMs replaced because they were wedged.
    wedged: AtomicU64,
    /// Kept by the VM thread (and its replacements).
    counters: Arc<IsleCounters>,
    /// This isle, for the `LuaHandle`s its VMs make.
    home: HomeCell,
}

enum Msg {
    Job(Job),
    Shutdown,
}

/// Configures and starts an [`Isle`]. Created by [`Isle::builder`].
#[derive(Clone, Default)]
pub struct IsleBuilder {
    config: VmConfig,
    init: Option<Arc<VmInit>>,
    queue_capacity: Option<usize>,
}

impl IsleBuilder {
    vm_options!();

    /// At most `n` requests may wait in the isle's queue (a request stops
    /// counting once it starts, or resolves while queued). A request
    /// beyond that resolves [`IsleError::QueueFull`] at once, and the
    /// caller never blocks. To wait for room instead, take it first with
    /// [`Isle::reserve_timeout`] or [`Isle::reserve`]. Default: unbounded;
    /// at least 1.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = Some(n);
        self
    }

    /// Sets an init closure that can run again: on the first VM and on
    /// every VM that replaces a wedged one (see
    /// [`stop_grace`](Self::stop_grace)). Start the isle with
    /// [`build`](Self::build). Default: nothing.
    pub fn init<F>(mut self, init: F) -> Self
    where
        F: Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static,
    {
        self.init = Some(Arc::new(init));
        self
    }

    /// Starts the isle with the init closure set by [`init`](Self::init)
    /// (if any); see [`spawn`](Self::spawn).
    ///
    /// # Errors
    /// As for [`spawn`](Self::spawn).
    pub fn build(self) -> Result<Isle, IsleError> {
        self.spawn(|_| Ok(()))
    }

    /// Starts the VM thread and runs `init` on it before any request (after
    /// the closure set by [`init`](Self::init), if any).
    ///
    /// Blocks until `init` has returned. `init` cannot be cancelled. It runs
    /// once: a VM that replaces a wedged one (see
    /// [`stop_grace`](Self::stop_grace)) runs only the re-runnable closure
    /// of [`init`](Self::init), so an isle whose state matters after such a
    /// replacement should be built with `init(..).build()`.
    ///
    /// The VM's hook belongs to the isle: `init` and `exec` closures must not
    /// replace or remove it (`Lua::set_hook`, `set_global_hook`,
    /// `remove_hook`, `set_thread_event_callback`; on Luau, `set_interrupt`
    /// and `remove_interrupt`), or running requests can no longer be
    /// stopped.
    ///
    /// # Errors
    /// [`IsleError::Init`] if `init` returns an error, [`IsleError::Panic`]
    /// if it panics, [`IsleError::Init`] if the thread cannot be spawned, or
    /// for a zero given to an option that counts something
    /// (`hook_interval`, `max_instructions`, `memory_limit`,
    /// `queue_capacity`), naming it. In
    /// every case the thread is gone when this returns.
    pub fn spawn<F>(self, init: F) -> Result<Isle, IsleError>
    where
        F: FnOnce(&Lua) -> mlua::Result<()> + Send + 'static,
    {
        let mut config = self.config;
        config.check()?;
        at_least_one("queue_capacity", self.queue_capacity.map(|n| n as u64))?;
        config.resolve();
        let owner = Owner::new(&config);
        let id = owner.id;
        let life = Lifecycle::new(1);
        let (tx, rx) = crossbeam_channel::unbounded();
        let first = {
            let again = self.init.clone();
            move |lua: &Lua| {
                if let Some(again) = again {
                    again(lua)?;
                }
                init(lua)
            }
        };
        let counters = Arc::new(IsleCounters::default());
        let home = home_cell();
        let thread = start(id, &config, &life, (&rx, &counters, &home), 0, None, first)?.ready()?;
        let inner = Arc::new(Inner {
            host: Host::new(owner, life, vec![thread]),
            tx,
            rx,
            room: self.queue_capacity.map(Room::new),
            config,
            init: self.init,
            wedged: AtomicU64::new(0),
            counters,
            home,
        });
        let home: Weak<dyn Home> = Arc::downgrade(&inner) as Weak<Inner>;
        let _ = inner.home.set(home);
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        inner.host.owner.timer.on_overdue(Arc::new(move |req| {
            if let Some(inner) = weak.upgrade() {
                inner.replace_if_running(req);
            }
        }));
        Ok(Isle { inner })
    }
}

/// Starts the VM thread that serves `rx` as `generation` of the isle's one
/// slot. Given `go`, it waits for it before serving (see `Spawn::go`).
fn start(
    id: u64,
    config: &VmConfig,
    life: &Arc<Lifecycle>,
    (rx, counters, home): (&Receiver<Msg>, &Arc<IsleCounters>, &HomeCell),
    generation: u64,
    go: Option<Receiver<()>>,
    init: impl FnOnce(&Lua) -> mlua::Result<()> + Send + 'static,
) -> Result<Starting, IsleError> {
    let (vm_config, abort) = (config.clone(), life.abort_flag());
    let (serving, rx, counters) = (life.clone(), rx.clone(), counters.clone());
    let home = home.clone();
    let cap = config.max_suspended;
    Spawn {
        slot: 0,
        generation,
        start: move || {
            let vm = Vm::start(id, &vm_config, abort, init)?;
            crate::request::owner::serves_alone();
            Ok(vm)
        },
        go,
    }
    .spawn(life, config, "", move |vm, _| {
        set_home(vm.lua(), &home, None);
        // A suspended request's wake-up (the `async` feature) comes on a
        // channel of its own: the request queue must still disconnect
        // when the isle's last handle goes. Without `async` nothing wakes
        // (and no channel is kept per isle).
        #[cfg(feature = "async")]
        let wake = {
            let (woke, wake) = crossbeam_channel::bounded(1);
            vm.on_wake(move || {
                let _ = woke.try_send(());
            });
            wake
        };
        #[cfg(not(feature = "async"))]
        let wake = crossbeam_channel::never();
        serve(&vm, (&rx, &wake), (&serving, &counters), generation, cap);
    })
}

/// The VM thread's loop: run jobs in order until told to stop, or until a
/// replacement has taken over (the slot's generation moved past `mine`).
///
/// With the `async` feature, requests waiting for a future are suspended:
/// the VM polls those that woke between jobs, holds at most `cap` of them
/// (jobs received at the cap wait in `backlog`, in order), and on
/// `Shutdown` serves the suspended ones to the end before it exits.
fn serve(
    vm: &Vm,
    (rx, wake): (&Receiver<Msg>, &Receiver<()>),
    (life, counters): (&Lifecycle, &IsleCounters),
    mine: u64,
    cap: usize,
) {
    let mut backlog: VecDeque<Job> = VecDeque::new();
    let mut closing = false;
    // No spin before the first request: a caller spawning isles in a loop
    // would share its cores with each new one spinning (50 µs of CPU per
    // isle); the first request may wait for a wake-up instead.
    let mut idle_spin = false;
    // When the last run ended, while the VM has done nothing else since: a
    // request taken then starts then (see `run`).
    let mut ran_until = None;
    // Requests run, not yet in `counters`: handed over in batches, and
    // before the thread sleeps or ends.
    let mut pending = Pending::default();
    while life.is_current(0, mine) {
        let resolved = &mut |_, outcome| counters.resolved(outcome);
        if vm.has_woken() {
            vm.resume_woken(&mut |_, _| {}, resolved);
            ran_until = None;
        }
        while vm.suspended() < cap {
            let Some(job) = backlog.pop_front() else {
                break;
            };
            ran_until = run(vm, (life, counters), job, &mut pending, ran_until);
        }
        if vm.suspended() > 0 && life.is_aborting() {
            vm.close_suspended(resolved);
            ran_until = None;
        }
        if closing && vm.suspended() == 0 && backlog.is_empty() {
            break;
        }
        // Busy: take the next request at once. Idle: spin briefly (a caller
        // in a loop sends its next request within microseconds), then park.
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(_) => {
                ran_until = None;
                if idle_spin && spin_until(|| !rx.is_empty() || vm.has_woken()) && rx.is_empty() {
                    continue;
                }
                pending.flush(counters);
                #[cfg(not(feature = "async"))]
                let _ = wake;
                #[cfg(not(feature = "async"))]
                let msg = rx.recv();
                #[cfg(feature = "async")]
                let msg = crossbeam_channel::select! {
                    recv(rx) -> msg => msg,
                    recv(wake) -> _ => continue,
                };
                match msg {
                    Ok(msg) => msg,
                    Err(_) => break,
                }
            }
        };
        idle_spin = true;
        match msg {
            Msg::Job(job) if vm.suspended() >= cap || !backlog.is_empty() => backlog.push_back(job),
            Msg::Job(job) => ran_until = run(vm, (life, counters), job, &mut pending, ran_until),
            Msg::Shutdown if vm.suspended() == 0 && backlog.is_empty() => break,
            Msg::Shutdown => closing = true,
        }
    }
    pending.flush(counters);
    // Jobs that raced past shutdown are resolved by whoever drains the
    // queue (see `host`); those held back here resolve now.
    for job in backlog {
        job.abandon(IsleError::Shutdown);
        counters.discarded();
    }
}

/// Runs `job` and returns when it ended. `ran_until`: the VM went straight
/// from the run that ended then to this one, so that is when this one
/// starts: a busy VM reads the clock once per request, not twice (a
/// request's run time then includes taking it from the queue).
fn run(
    vm: &Vm,
    (life, counters): (&Lifecycle, &IsleCounters),
    job: Job,
    pending: &mut Pending,
    ran_until: Option<Instant>,
) -> Option<Instant> {
    if life.is_aborting() {
        job.abandon(IsleError::Shutdown);
        counters.discarded();
        return None;
    }
    let timing = Timing::start(&job, ran_until, None, || None::<&str>);
    let start = timing.started();
    let outcome = vm.run(job, None, 0);
    Some(start + timing.finish(outcome, pending, counters))
}

impl Isle {
    /// Starts an isle with default options; see [`IsleBuilder::spawn`].
    ///
    /// ```
    /// use mlua_isle::Isle;
    ///
    /// let isle = Isle::spawn(|lua| lua.globals().set("greeting", "hello"))?;
    /// let s: String = isle.eval("greeting .. ', world'")?;
    /// assert_eq!(s, "hello, world");
    /// # Ok::<(), mlua_isle::IsleError>(())
    /// ```
    ///
    /// # Errors
    /// As for [`IsleBuilder::spawn`].
    pub fn spawn<F>(init: F) -> Result<Isle, IsleError>
    where
        F: FnOnce(&Lua) -> mlua::Result<()> + Send + 'static,
    {
        IsleBuilder::default().spawn(init)
    }

    /// A builder to set options before starting.
    pub fn builder() -> IsleBuilder {
        IsleBuilder::default()
    }

    request_methods!(exec);

    reserve_methods!();

    /// Callers waiting for room in the queue now (see
    /// [`IsleBuilder::queue_capacity`] and [`reserve`](Self::reserve)).
    pub fn waiting_for_room(&self) -> usize {
        self.inner.room.as_ref().map_or(0, |r| r.waiting())
    }

    /// Stops accepting requests, lets the queued ones finish, and joins the
    /// VM thread. Blocks until then. Calling it again (or from another
    /// handle) waits for the same shutdown and returns `Ok`.
    ///
    /// # Errors
    /// [`IsleError::Reentrant`] when called from the VM's own thread (it
    /// cannot join itself); [`IsleError::Panic`] if the VM thread died from
    /// a panic outside any request.
    pub fn shutdown(&self) -> Result<(), IsleError> {
        self.inner.host.stop(None, &*self.inner)
    }

    /// Like [`shutdown`](Self::shutdown), but after `limit` it interrupts
    /// the running request and resolves whatever is still queued with
    /// [`IsleError::Shutdown`], then joins. Blocks for `limit` plus the
    /// VM's [`stop_grace`](IsleBuilder::stop_grace) at most: a VM still
    /// inside Rust or C code by then is detached, not joined. A limit too
    /// large to represent (such as `Duration::MAX`) waits as `shutdown`
    /// does.
    ///
    /// # Errors
    /// As for [`shutdown`](Self::shutdown); [`IsleError::Wedged`] naming
    /// the VM thread that did not stop in time (it was detached).
    pub fn shutdown_timeout(&self, limit: Duration) -> Result<(), IsleError> {
        self.inner
            .host
            .stop(Instant::now().checked_add(limit), &*self.inner)
    }

    /// How many times this isle replaced a wedged VM (see
    /// [`IsleBuilder::stop_grace`]).
    pub fn wedged(&self) -> u64 {
        self.inner.wedged.load(Ordering::Relaxed)
    }

    /// True once [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutdown(&self) -> bool {
        self.inner.host.life.is_closed()
    }

    /// The isle's counters and latency histograms (see [`IsleMetrics`] for
    /// what they count and when they add up). Takes the metrics' lock for
    /// the time of a copy, as the VM thread does once per batch of
    /// requests.
    ///
    /// ```
    /// let isle = mlua_isle::Isle::spawn(|_| Ok(()))?;
    /// isle.eval::<()>("x = 1")?;
    /// let m = isle.metrics();
    /// println!("{} done, run time p99 {:?}", m.completed, m.run_time.p99());
    /// # Ok::<(), mlua_isle::IsleError>(())
    /// ```
    pub fn metrics(&self) -> IsleMetrics {
        self.inner.counters.snapshot()
    }
}

impl Submit for Isle {
    fn owner(&self) -> &Owner {
        &self.inner.host.owner
    }

    fn room(&self) -> Option<&Arc<Room>> {
        self.inner.room.as_ref()
    }

    fn is_closed(&self) -> bool {
        self.is_shutdown()
    }

    fn enqueue(&self, job: Job, admission: Option<Admission>) {
        if self.inner.host.life.is_closed() {
            job.abandon(IsleError::Shutdown);
            return;
        }
        match take_room(self, admission) {
            None => return job.abandon(IsleError::QueueFull),
            Some(a) if !a.is_empty() => job.admit(a),
            Some(_) => {}
        }
        if let Err(e) = self.inner.tx.send(Msg::Job(job)) {
            if let Msg::Job(job) = e.into_inner() {
                job.abandon(IsleError::Shutdown);
            }
        } else {
            self.inner.host.life.after_push(|| self.inner.drain());
        }
    }
}

impl Home for Inner {
    fn owner(&self) -> &Owner {
        &self.host.owner
    }

    fn send(self: Arc<Self>, job: Job, _: &Place) {
        Isle { inner: self }.enqueue(job, None);
    }
}

impl Queues for Inner {
    /// The VM thread finishes what is queued before this message (or, once
    /// aborting, resolves it `Shutdown`) and exits.
    fn wake_all(&self) {
        // Callers waiting for room resolve `Shutdown`.
        if let Some(room) = &self.room {
            room.close();
        }
        let _ = self.tx.send(Msg::Shutdown);
    }

    fn drain(&self) {
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Job(job) = msg {
                job.abandon(IsleError::Shutdown);
            }
        }
    }
}

impl Inner {
    /// The timer's wedge check: if the VM still runs `req` (stopped one
    /// grace period ago), a fresh VM takes over the queue and the stuck
    /// thread is detached. If the fresh VM cannot start, the stuck one
    /// stays in charge.
    fn replace_if_running(&self, req: &Arc<dyn Cancel>) {
        self.host.replace_if_running(
            req,
            |_, next| {
                let init = self.init.clone();
                let (go_tx, go_rx) = crossbeam_channel::bounded(1);
                let fresh = start(
                    self.host.owner.id,
                    &self.config,
                    &self.host.life,
                    (&self.rx, &self.counters, &self.home),
                    next,
                    Some(go_rx),
                    move |lua| init.map_or(Ok(()), |init| init(lua)),
                )
                .and_then(Starting::ready)
                .ok()?;
                Some((fresh, go_tx))
            },
            |_, go| {
                self.wedged.fetch_add(1, Ordering::Relaxed);
                let _ = go.send(());
            },
        );
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.host.stop_now(self);
    }
}

impl fmt::Debug for Isle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Isle")
            .field("id", &self.inner.host.owner.id)
            .field("queued", &self.inner.tx.len())
            .field("shutdown", &self.is_shutdown())
            .field("wedged", &self.wedged())
            .finish()
    }
}

/// A permit of an isle: its request runs on the isle's VM, after the
/// requests queued before the permit is used.
impl Permit<Isle> {
    request_methods!(@exec [self] self);
}

impl fmt::Debug for IsleBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IsleBuilder")
            .field("config", &self.config)
            .field("init", &self.init.is_some())
            .field("queue_capacity", &self.queue_capacity)
            .finish()
    }
}
