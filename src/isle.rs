//! `Isle`: one Lua VM on its own thread.

use std::fmt;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mlua::Lua;
use parking_lot::Mutex;

use crate::host::submit::{request_methods, Owner, Submit};
use crate::interrupt::Interrupt;
use crate::request::owner::{next_owner_id, on_owner_thread};
use crate::request::spin::spin_until;
use crate::request::timer::Timer;
use crate::request::Cancel;
use crate::vm::config::{vm_options, VmConfig};
use crate::vm::Job;
use crate::vm::Vm;
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
type Init = dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync;

/// State shared by every handle of one isle.
struct Inner {
    /// Owner id, deadline thread and default time limit of its requests.
    owner: Owner,
    /// The VM thread's queue, and its receiving end for a replacement VM.
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    /// Set by shutdown: new requests resolve `Shutdown` without queueing.
    closed: AtomicBool,
    /// Set once shutdown has joined (or detached) the VM thread: the queue
    /// has no server any more, and whoever finds a job in it resolves it.
    stopped: AtomicBool,
    /// Set to abort (last handle dropped, or `shutdown_timeout` expired):
    /// the hook stops the running request and the VM thread resolves queued
    /// ones without running them.
    abort: Arc<AtomicBool>,
    /// The VM thread serving the queue now.
    vm: Mutex<VmThread>,
    /// Bumped when a wedged VM is replaced: a VM thread whose generation is
    /// no longer current exits as soon as it gets back, taking no more work.
    generation: Arc<AtomicU64>,
    /// For replacement VMs.
    config: VmConfig,
    init: Option<Arc<Init>>,
    /// VMs replaced because they were wedged.
    wedged: AtomicU64,
    /// Disconnected when a VM is found wedged during shutdown, which then
    /// stops waiting for it.
    wedge: (Mutex<Option<Sender<()>>>, Receiver<()>),
}

/// One VM thread of the isle.
struct VmThread {
    /// The VM's interrupt state, to stop a running Rust callback's token and
    /// to tell whether it still runs a stopped request.
    interrupt: Arc<Interrupt>,
    /// Receives once when the thread ends.
    exited: Receiver<()>,
    /// Taken by whoever joins (or detaches) it.
    thread: Option<JoinHandle<()>>,
}

enum Msg {
    Job(Job),
    Shutdown,
}

/// Configures and starts an [`Isle`]. Created by [`Isle::builder`].
#[derive(Clone, Default)]
pub struct IsleBuilder {
    config: VmConfig,
    init: Option<Arc<Init>>,
}

impl IsleBuilder {
    vm_options!();

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
    /// if it panics, [`IsleError::Init`] if the thread cannot be spawned. In
    /// every case the thread is gone when this returns.
    pub fn spawn<F>(self, init: F) -> Result<Isle, IsleError>
    where
        F: FnOnce(&Lua) -> mlua::Result<()> + Send + 'static,
    {
        let config = self.config;
        let id = next_owner_id();
        let abort = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
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
        let vm = start(id, &config, &abort, &rx, &generation, 0, None, first)?;
        let inner = Arc::new(Inner {
            owner: Owner {
                id,
                timer: Timer::new(config.name.clone(), id, config.stop_grace),
                default_timeout: config.default_timeout,
            },
            tx,
            rx,
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            abort,
            vm: Mutex::new(vm),
            generation,
            config,
            init: self.init,
            wedged: AtomicU64::new(0),
            wedge: {
                let (tx, rx) = crossbeam_channel::bounded(0);
                (Mutex::new(Some(tx)), rx)
            },
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        inner.owner.timer.on_overdue(Arc::new(move |req| {
            if let Some(inner) = weak.upgrade() {
                inner.replace_if_running(req);
            }
        }));
        Ok(Isle { inner })
    }
}

/// Starts a VM thread that serves `rx` while `generation` is `mine`; blocks
/// until `init` has run on it. Given `go`, the thread waits for it before
/// serving (a dropped `go`: it exits).
#[allow(clippy::too_many_arguments)]
fn start(
    id: u64,
    config: &VmConfig,
    abort: &Arc<AtomicBool>,
    rx: &Receiver<Msg>,
    generation: &Arc<AtomicU64>,
    mine: u64,
    go: Option<Receiver<()>>,
    init: impl FnOnce(&Lua) -> mlua::Result<()> + Send + 'static,
) -> Result<VmThread, IsleError> {
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let (exit_tx, exited) = crossbeam_channel::bounded(1);
    let thread = {
        let (config, abort, rx, generation) = (
            config.clone(),
            abort.clone(),
            rx.clone(),
            generation.clone(),
        );
        config
            .thread("")
            .spawn(move || {
                let _exit = ExitSignal(exit_tx);
                match Vm::start(id, &config, abort.clone(), init) {
                    Ok(vm) => {
                        crate::request::owner::serves_alone();
                        let _ = ready_tx.send(Ok(vm.interrupt()));
                        if go.is_some_and(|go| go.recv().is_err()) {
                            return;
                        }
                        serve(&vm, &rx, &abort, &generation, mine);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| IsleError::Init(format!("cannot spawn the VM thread: {e}")))?
    };
    let started = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(IsleError::Init("the VM thread died during init".into())));
    match started {
        Ok(interrupt) => Ok(VmThread {
            interrupt,
            exited,
            thread: Some(thread),
        }),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

/// The VM thread's loop: run jobs in order until told to stop, or until a
/// replacement has taken over (`generation` moved past `mine`).
fn serve(vm: &Vm, rx: &Receiver<Msg>, abort: &AtomicBool, generation: &AtomicU64, mine: u64) {
    // ORDERING: Acquire pairs with the Release bump in `replace_if_running`;
    // only a flag, read after each request.
    let current = || generation.load(Ordering::Acquire) == mine;
    while current() {
        // Busy: take the next request at once. Idle: spin briefly (a caller
        // in a loop sends its next request within microseconds), then park.
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(_) => {
                spin_until(|| !rx.is_empty());
                match rx.recv() {
                    Ok(msg) => msg,
                    Err(_) => break,
                }
            }
        };
        match msg {
            Msg::Job(job) if abort.load(Ordering::Acquire) => job.abandon(IsleError::Shutdown),
            Msg::Job(job) => {
                vm.run(job, None);
            }
            Msg::Shutdown => break,
        }
    }
    // Jobs that raced past shutdown are dropped with the receiver and
    // resolve `Shutdown` (see `request::Pending`'s Drop).
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

    /// Stops accepting requests, lets the queued ones finish, and joins the
    /// VM thread. Blocks until then. Calling it again (or from another
    /// handle) waits for the same shutdown and returns `Ok`.
    ///
    /// # Errors
    /// [`IsleError::Reentrant`] when called from the VM's own thread (it
    /// cannot join itself); [`IsleError::Panic`] if the VM thread died from
    /// a panic outside any request.
    pub fn shutdown(&self) -> Result<(), IsleError> {
        self.inner.stop(None)
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
        self.inner.stop(Instant::now().checked_add(limit))
    }

    /// How many times this isle replaced a wedged VM (see
    /// [`IsleBuilder::stop_grace`]).
    pub fn wedged(&self) -> u64 {
        self.inner.wedged.load(Ordering::Relaxed)
    }

    /// True once [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutdown(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl Submit for Isle {
    fn owner(&self) -> &Owner {
        &self.inner.owner
    }

    fn enqueue(&self, job: Job) {
        if self.inner.closed.load(Ordering::Acquire) {
            job.abandon(IsleError::Shutdown);
        } else if let Err(e) = self.inner.tx.send(Msg::Job(job)) {
            if let Msg::Job(job) = e.into_inner() {
                job.abandon(IsleError::Shutdown);
            }
        } else {
            // ORDERING: the fence orders our send before the load; it pairs
            // with the one in `finish`: either its drain sees our job, or we
            // see `stopped` and drain it ourselves.
            fence(Ordering::SeqCst);
            if self.inner.stopped.load(Ordering::SeqCst) {
                self.inner.drain();
            }
        }
    }
}

impl Inner {
    fn stop(&self, abort_at: Option<Instant>) -> Result<(), IsleError> {
        if on_owner_thread(self.owner.id) {
            return Err(IsleError::Reentrant);
        }
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Shutdown);
        // Wait, without the lock (another caller may be waiting too), until
        // the VM thread ends, `abort_at` passes, or the VM is found wedged.
        // Each is a disconnect or a timer, so every waiter sees it.
        let exited = self.vm.lock().exited.clone();
        let deadline = abort_at.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
        crossbeam_channel::select! {
            recv(exited) -> _ => {}
            recv(self.wedge.1) -> _ => {}
            recv(deadline) -> _ => {}
        }
        let mut vm = self.vm.lock();
        self.abort(&vm); // a no-op for a thread that has ended
        let result = self.join_within_grace(&mut vm);
        drop(vm);
        self.finish();
        result
    }

    /// After the VM thread is gone (or detached): resolve what is left in
    /// the queue, stop the deadline thread.
    fn finish(&self) {
        // ORDERING: pairs with the fence in `enqueue`.
        self.stopped.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.drain();
        self.owner.timer.shutdown();
    }

    /// Resolves every queued job `Shutdown`.
    fn drain(&self) {
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Job(job) = msg {
                job.abandon(IsleError::Shutdown);
            }
        }
    }

    /// Stops the running request and makes the VM thread resolve queued ones
    /// `Shutdown`.
    fn abort(&self, vm: &VmThread) {
        self.abort.store(true, Ordering::SeqCst);
        vm.interrupt.abort_running();
    }

    /// Joins the VM thread if it ends within the grace period, else detaches
    /// it and says so.
    fn join_within_grace(&self, vm: &mut VmThread) -> Result<(), IsleError> {
        let Some(handle) = vm.thread.take() else {
            return Ok(());
        };
        // The last handle can be dropped on the VM thread itself (inside an
        // `exec` closure that owned it); it exits on its own afterwards.
        if handle.thread().id() == std::thread::current().id() {
            return Ok(());
        }
        let grace = self.owner.timer.grace();
        let ended = match Instant::now().checked_add(grace) {
            Some(at) => !matches!(vm.exited.recv_deadline(at), Err(RecvTimeoutError::Timeout)),
            None => true, // no grace limit: wait as long as it takes
        };
        if ended {
            handle.join().map_err(|p| IsleError::from_panic(&*p))
        } else {
            Err(IsleError::Wedged(format!(
                "VM thread `{}` did not stop within {grace:?} after being interrupted \
                 (it is inside Rust or C code that does not return); it was detached \
                 and frees its VM if it ever gets back",
                handle.thread().name().unwrap_or("?")
            )))
        }
    }

    /// The timer's wedge check: if the VM still runs `req` (stopped one
    /// grace period ago), a fresh VM takes over the queue and the stuck
    /// thread is detached.
    fn replace_if_running(&self, req: &Arc<dyn Cancel>) {
        let mut vm = self.vm.lock();
        if !vm.interrupt.runs(req) {
            return; // let go in time
        }
        if self.closed.load(Ordering::Acquire) {
            // Shutting down: no replacement; a graceful shutdown waiting
            // for this VM stops waiting (disconnect wakes every waiter).
            self.wedge.0.lock().take();
            return;
        }
        // The stuck thread exits when it gets back; the new one serves from
        // now on. If the new VM cannot start, the old one stays in charge.
        let init = self.init.clone();
        let (go_tx, go_rx) = crossbeam_channel::bounded(1);
        let next = self.generation.load(Ordering::Relaxed) + 1;
        let started = start(
            self.owner.id,
            &self.config,
            &self.abort,
            &self.rx,
            &self.generation,
            next,
            Some(go_rx),
            move |lua| init.map_or(Ok(()), |init| init(lua)),
        );
        // If the fresh VM cannot start, the stuck one stays in charge.
        if let Ok(fresh) = started {
            self.wedged.fetch_add(1, Ordering::Relaxed);
            // ORDERING: Release pairs with `serve`'s Acquire check.
            self.generation.store(next, Ordering::Release);
            let _ = go_tx.send(());
            drop(std::mem::replace(&mut *vm, fresh)); // detaches the stuck thread
        }
    }
}

/// Signals `VmThread::exited` when the VM thread ends, however it ends.
struct ExitSignal(crossbeam_channel::Sender<()>);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Shutdown);
        let mut vm = self.vm.lock();
        self.abort(&vm);
        let _ = self.join_within_grace(&mut vm);
        drop(vm);
        self.finish();
    }
}

impl fmt::Debug for Isle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Isle")
            .field("id", &self.inner.owner.id)
            .field("queued", &self.inner.tx.len())
            .field("shutdown", &self.is_shutdown())
            .field("wedged", &self.wedged())
            .finish()
    }
}

impl fmt::Debug for IsleBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IsleBuilder")
            .field("config", &self.config)
            .field("init", &self.init.is_some())
            .finish()
    }
}
