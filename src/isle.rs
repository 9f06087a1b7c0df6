//! `Isle`: one Lua VM on its own thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mlua::Lua;
use parking_lot::Mutex;

use crate::config::{vm_options, VmConfig};
use crate::hook::Interrupt;
use crate::request::Job;
use crate::spin::spin_until;
use crate::submit::{request_methods, Owner, Submit};
use crate::timer::Timer;
use crate::vm::{next_owner_id, on_owner_thread, Vm};
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
/// and resolves the queued ones with [`IsleError::Shutdown`], then joins.
#[derive(Clone)]
pub struct Isle {
    inner: Arc<Inner>,
}

/// State shared by every handle of one isle.
struct Inner {
    /// Owner id, deadline thread and default time limit of its requests.
    owner: Owner,
    /// The VM thread's queue.
    tx: Sender<Msg>,
    /// Set by shutdown: new requests resolve `Shutdown` without queueing.
    closed: AtomicBool,
    /// Set to abort (last handle dropped, or `shutdown_timeout` expired):
    /// the hook stops the running request and the VM thread resolves queued
    /// ones without running them.
    abort: Arc<AtomicBool>,
    /// The VM's interrupt state, to stop a running Rust callback's token.
    interrupt: Arc<Interrupt>,
    /// Receives once when the VM thread ends.
    exited: Receiver<()>,
    /// The VM thread; taken by whoever joins it.
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Msg {
    Job(Job),
    Shutdown,
}

/// Configures and starts an [`Isle`]. Created by [`Isle::builder`].
#[derive(Debug, Clone, Default)]
pub struct IsleBuilder {
    config: VmConfig,
}

impl IsleBuilder {
    vm_options!();

    /// Starts the VM thread and runs `init` on it before any request.
    ///
    /// Blocks until `init` has returned. `init` cannot be cancelled.
    ///
    /// The VM's hook belongs to the isle: `init` and `exec` closures must not
    /// replace or remove it (`Lua::set_hook`, `set_global_hook`,
    /// `remove_hook`; on Luau, `set_interrupt` and `remove_interrupt`), or
    /// running requests can no longer be stopped.
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
        let (tx, rx) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (exit_tx, exited) = crossbeam_channel::bounded(1);
        let thread = {
            let (config, abort) = (config.clone(), abort.clone());
            config
                .thread("")
                .spawn(move || {
                    let _exit = ExitSignal(exit_tx);
                    match Vm::start(id, &config, abort.clone(), init) {
                        Ok(vm) => {
                            let _ = ready_tx.send(Ok(vm.interrupt()));
                            serve(&vm, &rx, &abort);
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
        let interrupt = match started {
            Ok(interrupt) => interrupt,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(Isle {
            inner: Arc::new(Inner {
                owner: Owner {
                    id,
                    timer: Timer::new(config.name.clone()),
                    default_timeout: config.default_timeout,
                },
                tx,
                closed: AtomicBool::new(false),
                abort,
                interrupt,
                exited,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }
}

/// The VM thread's loop: run jobs in order until told to stop.
fn serve(vm: &Vm, rx: &Receiver<Msg>, abort: &AtomicBool) {
    loop {
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

    /// Like [`shutdown`](Self::shutdown), but after `grace` it interrupts
    /// the running request and resolves whatever is still queued with
    /// [`IsleError::Shutdown`], then joins. Blocks for about `grace` at most
    /// (plus the time for running Rust code to return; Lua code stops at
    /// its next hook tick).
    ///
    /// # Errors
    /// As for [`shutdown`](Self::shutdown).
    pub fn shutdown_timeout(&self, grace: Duration) -> Result<(), IsleError> {
        self.inner.stop(Some(Instant::now() + grace))
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
        if let Some(at) = abort_at {
            // Waited for without the join lock: another caller may hold it,
            // joining a VM stuck in a long request that only an abort ends.
            // The thread's exit signal disconnects once it has ended, so
            // every waiter learns it.
            if let Err(RecvTimeoutError::Timeout) = self.exited.recv_deadline(at) {
                self.abort();
            }
        }
        let mut thread = self.thread.lock();
        let Some(handle) = thread.take() else {
            return Ok(());
        };
        let joined = handle.join();
        self.owner.timer.shutdown();
        joined.map_err(|p| IsleError::from_panic(&*p))
    }

    /// Stops the running request and makes the VM thread resolve queued ones
    /// `Shutdown`.
    fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.interrupt.abort_running();
    }
}

/// Signals `Inner::exited` when the VM thread ends, however it ends.
struct ExitSignal(crossbeam_channel::Sender<()>);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        self.abort();
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(handle) = self.thread.get_mut().take() {
            // The last handle can be dropped on the VM thread itself (inside
            // an `exec` closure that owned it); that thread then exits on its
            // own once the closure returns.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
        self.owner.timer.shutdown();
    }
}

impl fmt::Debug for Isle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Isle")
            .field("id", &self.inner.owner.id)
            .field("queued", &self.inner.tx.len())
            .field("shutdown", &self.is_shutdown())
            .finish()
    }
}
