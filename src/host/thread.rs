//! Starting a VM thread: the VM is created on the thread that will own it,
//! reports back, and serves until its owner's lifecycle says stop.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;

use super::lifecycle::Lifecycle;
use crate::vm::config::VmConfig;
use crate::vm::Vm;
use crate::IsleError;

/// One VM thread, as its owner keeps it.
pub(crate) struct VmThread {
    pub(super) slot: usize,
    pub(super) generation: u64,
    pub(super) handle: JoinHandle<()>,
}

impl VmThread {
    pub(crate) fn id(&self) -> (usize, u64) {
        (self.slot, self.generation)
    }

    /// Waits for the thread to end (it must be on its way out).
    pub(crate) fn join(self) {
        let _ = self.handle.join();
    }

    pub(super) fn name(&self) -> String {
        self.handle.thread().name().unwrap_or("?").to_string()
    }
}

/// A VM thread whose VM is starting (running `init`).
pub(crate) struct Starting {
    thread: VmThread,
    ready: Receiver<Result<(), IsleError>>,
}

impl Starting {
    /// Blocks until the VM has started. If it could not, the thread has
    /// ended (it is joined) and the error says why.
    pub(crate) fn ready(self) -> Result<VmThread, IsleError> {
        let started = self
            .ready
            .recv()
            .unwrap_or_else(|_| Err(IsleError::Init("the VM thread died during init".into())));
        match started {
            Ok(()) => Ok(self.thread),
            Err(e) => {
                let _ = self.thread.handle.join();
                Err(e)
            }
        }
    }

    /// Joins the thread, whatever it does (for a start-up that failed
    /// elsewhere: the owner has closed and aborted, so it serves nothing).
    pub(crate) fn join(self) {
        let _ = self.thread.handle.join();
    }
}

/// What a VM thread runs: its slot, and the closures that make and serve
/// its VM.
pub(crate) struct Spawn<G, S> {
    pub(crate) slot: usize,
    pub(crate) generation: u64,
    /// Creates the VM (running `init`) on the new thread.
    pub(crate) start: S,
    /// Given, the thread waits after starting its VM until its owner sends
    /// the go-ahead (a replacement waits to be handed the slot); a dropped
    /// sender means "never mind", and the thread exits.
    pub(crate) go: Option<Receiver<G>>,
}

impl<G, S> Spawn<G, S>
where
    G: Send + 'static,
    S: FnOnce() -> Result<Vm, IsleError> + Send + 'static,
{
    /// Spawns the thread (named after `config`, plus `suffix`; inside its
    /// tokio runtime, if any: `VmConfig::in_runtime`): it starts its VM, reports (see
    /// [`Starting::ready`]), waits for `go` if given, records the VM in
    /// `life` for its slot, and then calls `serve` with what `go` carried.
    /// `life` learns when the thread ends, however it ends.
    pub(crate) fn spawn(
        self,
        life: &Arc<Lifecycle>,
        config: &VmConfig,
        suffix: &str,
        serve: impl FnOnce(Vm, Option<G>) + Send + 'static,
    ) -> Result<Starting, IsleError> {
        let builder = config.thread(suffix);
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        let (slot, generation) = (self.slot, self.generation);
        // One box is all the thread's closure holds: std moves that closure
        // through several frames on the new thread, and every byte of it
        // each time lies above everything the VM thread then does, whose
        // touched stack pages are resident memory (see `ThreadRun::run`).
        let run = Box::new(ThreadRun {
            spawn: self,
            life: life.clone(),
            config: config.clone(),
            ready_tx,
            serve,
        });
        let handle = builder
            .spawn(move || run.run())
            .map_err(|e| IsleError::Init(format!("cannot spawn the VM thread: {e}")))?;
        Ok(Starting {
            thread: VmThread {
                slot,
                generation,
                handle,
            },
            ready,
        })
    }
}

/// What a VM thread is started with (see [`Spawn::spawn`]).
struct ThreadRun<G, S, F> {
    spawn: Spawn<G, S>,
    life: Arc<Lifecycle>,
    config: VmConfig,
    ready_tx: crossbeam_channel::Sender<Result<(), IsleError>>,
    serve: F,
}

impl<G, S, F> ThreadRun<G, S, F>
where
    S: FnOnce() -> Result<Vm, IsleError>,
    F: FnOnce(Vm, Option<G>),
{
    /// Out of its box, whose memory goes back at once (`run` lasts as long
    /// as the thread).
    #[allow(clippy::boxed_local)] // taking the box apart is the point
    fn unbox(self: Box<Self>) -> Self {
        *self
    }

    /// The VM thread's whole life.
    fn run(self: Box<Self>) {
        let ThreadRun {
            spawn,
            life,
            config,
            ready_tx,
            serve,
        } = self.unbox();
        let Spawn {
            slot,
            generation,
            start,
            go,
        } = spawn;
        config.in_runtime(move || {
            let _exit = ExitSignal(life.clone(), (slot, generation));
            let vm = match start_vm(start) {
                Ok(vm) => vm,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            drop(ready_tx); // its channel goes when the owner has read it
            let carried = match go.map(|go| go.recv()) {
                None => None,
                Some(Ok(g)) => Some(g),
                Some(Err(_)) => return,
            };
            life.serve_with(slot, vm.interrupt());
            serve_vm(serve, vm, carried);
        })
    }
}

// Starting and serving are frames of their own, never inlined into
// `ThreadRun::run`: Lua's deepest C calls of a VM's start (`Lua::new`,
// loading a chunk) then run ~2.5 KiB nearer the stack top, and the thread
// touches the 12 KiB of stack a thread running only `Lua::new` touches,
// not 16 (a page is resident memory, per VM).
#[inline(never)]
fn start_vm<S: FnOnce() -> Result<Vm, IsleError>>(start: S) -> Result<Vm, IsleError> {
    start()
}

#[inline(never)]
fn serve_vm<G, F: FnOnce(Vm, Option<G>)>(serve: F, vm: Vm, carried: Option<G>) {
    serve(vm, carried)
}

/// Tells the lifecycle that a VM thread has ended, however it ends.
struct ExitSignal(Arc<Lifecycle>, (usize, u64));

impl Drop for ExitSignal {
    fn drop(&mut self) {
        self.0.ended(self.1);
    }
}
