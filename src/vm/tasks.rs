//! The Lua `task` library (`task_library(true)`, the `async` feature):
//! `task.sleep(seconds)`, and `task.spawn(f, ...)`, whose handle has
//! `:join()` and `:cancel()`.
//!
//! A child runs `f(...)` as a coroutine of its own (as requests do:
//! `vm/coroutine.rs`) and belongs to the request that spawned it: the
//! request's job polls its children whenever it polls the request, with the
//! request's token current and its waker, so the children share its stop
//! machinery; when the request resolves, however it resolves, its running
//! children are dropped (cancelled). A child that failed and was never
//! joined fails its request when the request ends: errors are never lost.
//!
//! `task.spawn` is a plain Rust function called from the request's Lua
//! code: it leaves the child in a thread-local list, which the request's
//! job adopts as soon as that poll returns (`Children::adopt`).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mlua::{Function, Lua, MultiValue, UserData, UserDataMethods};
use parking_lot::Mutex;

type ChildFuture = Pin<Box<dyn Future<Output = mlua::Result<MultiValue>>>>;

thread_local! {
    /// Children spawned by the request being polled on this thread, until
    /// its job adopts them.
    static SPAWNED: RefCell<Vec<Child>> = const { RefCell::new(Vec::new()) };
}

/// Installs the global `task`.
pub(crate) fn install(lua: &Lua) -> mlua::Result<()> {
    let task = lua.create_table()?;
    task.set(
        "sleep",
        lua.create_async_function(|_, seconds: f64| async move {
            if seconds.is_nan() || seconds < 0.0 {
                return Err(mlua::Error::runtime(
                    "task.sleep: seconds must be a number >= 0",
                ));
            }
            let duration = Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX);
            super::clock::sleep(duration).await;
            Ok(())
        })?,
    )?;
    task.set(
        "spawn",
        lua.create_function(|lua, (f, args): (Function, MultiValue)| {
            // A child's thread may be new, and end before its first tick
            // (`interrupt/alarm/threads.rs`).
            crate::interrupt::thread_made(lua)?;
            // `Arc`, not `Rc`: with mlua's `send` feature (which another
            // crate may turn on), userdata must be `Send`, and the values
            // held then are.
            #[allow(clippy::arc_with_non_send_sync)]
            let cell = Arc::new(Cell {
                state: Mutex::new(State::Running),
                joiner: Mutex::new(None),
            });
            // A request coroutine like its parent's (`vm/coroutine.rs`), so
            // a stop drops its future and closes it the same way.
            let coroutines = super::coroutine::Coroutines::current()
                .ok_or_else(|| mlua::Error::runtime("task.spawn: not on a VM of mlua-isle"))?;
            let future: ChildFuture = Box::pin(coroutines.call::<MultiValue>(&f, args)?);
            SPAWNED.with(|s| {
                s.borrow_mut().push(Child {
                    cell: cell.clone(),
                    future: Some(future),
                })
            });
            Ok(Handle(cell))
        })?,
    )?;
    lua.globals().set("task", task)
}

enum State {
    Running,
    Done(mlua::Result<MultiValue>),
    Joined,
    Cancelled,
}

/// What a child and its handle share.
struct Cell {
    state: Mutex<State>,
    /// The `join` waiting for the child.
    joiner: Mutex<Option<Waker>>,
}

impl Cell {
    fn end(&self, state: State) {
        *self.state.lock() = state;
        if let Some(w) = self.joiner.lock().take() {
            w.wake();
        }
    }
}

/// A child task, kept by its request's job.
struct Child {
    cell: Arc<Cell>,
    /// `None` once it has ended.
    future: Option<ChildFuture>,
}

/// The handle `task.spawn` returns.
struct Handle(Arc<Cell>);

impl UserData for Handle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method("join", |_, this, ()| Join(this.0.clone()));
        methods.add_method("cancel", |_, this, ()| {
            let mut state = this.0.state.lock();
            if matches!(*state, State::Running) {
                *state = State::Cancelled;
            }
            Ok(())
        });
    }
}

/// `handle:join()`: the child's results, or its error raised.
struct Join(Arc<Cell>);

impl Future for Join {
    type Output = mlua::Result<MultiValue>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.0.state.lock();
        match std::mem::replace(&mut *state, State::Joined) {
            State::Done(result) => Poll::Ready(result),
            State::Running => {
                *state = State::Running;
                *self.0.joiner.lock() = Some(cx.waker().clone());
                Poll::Pending
            }
            State::Joined => Poll::Ready(Err(mlua::Error::runtime(
                "task: this task was joined already",
            ))),
            State::Cancelled => {
                *state = State::Cancelled;
                Poll::Ready(Err(mlua::Error::runtime("task: this task was cancelled")))
            }
        }
    }
}

/// The longest message (and traceback) a failed child's error keeps, in
/// bytes: it is a Rust copy, outside the VM's memory limit, kept as long as
/// the child's handle (Lua's collector does not see its size).
const KEPT: usize = 4096;

/// How many failed, unjoined children a request keeps (see `Children::poll`).
const FAILED_KEPT: usize = 16;

/// A failed child's error, its text cut to [`KEPT`] bytes.
// mlua's `CallbackError` holds its cause in an `Arc` (`Send` with mlua's
// `error-send` feature, which another crate may turn on).
#[allow(clippy::arc_with_non_send_sync)]
fn kept(e: mlua::Error) -> mlua::Error {
    let cut = |s: String| {
        if s.len() > KEPT {
            crate::error_value::cap(&s, KEPT, &mut false)
        } else {
            s
        }
    };
    match e {
        mlua::Error::RuntimeError(m) => mlua::Error::RuntimeError(cut(m)),
        mlua::Error::CallbackError { traceback, cause } => mlua::Error::CallbackError {
            traceback: cut(traceback),
            cause: Arc::new(kept((*cause).clone())),
        },
        e => e,
    }
}

/// The children of one request.
#[derive(Default)]
pub(crate) struct Children(Vec<Child>);

impl Children {
    /// Takes the children spawned during the poll that just returned.
    pub(crate) fn adopt(&mut self) {
        SPAWNED.with(|s| {
            let mut spawned = s.borrow_mut();
            if !spawned.is_empty() {
                self.0.append(&mut spawned);
            }
        });
    }

    /// Polls the running children once (the request's token current);
    /// drops those cancelled, and forgets those ended with nothing left to
    /// report. Children spawned meanwhile are adopted, and polled on the
    /// next pass (the request is woken for them): a child that spawns
    /// another as it runs cannot keep one poll going, or its finished
    /// children piling up, for ever.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) {
        let mut dropped = false;
        for child in &mut self.0 {
            if let Some(future) = child.future.as_mut() {
                if matches!(*child.cell.state.lock(), State::Cancelled) {
                    child.future = None;
                    dropped = true;
                    child.cell.end(State::Cancelled);
                } else if let Poll::Ready(result) = future.as_mut().poll(cx) {
                    child.future = None;
                    child.cell.end(State::Done(result.map_err(kept)));
                }
            }
        }
        // Failed children nobody joined yet are kept to fail the request
        // (`unjoined_error`), the first [`FAILED_KEPT`] of them: a relay of
        // failing children would keep one error per generation. (Past
        // those, an error is lost only if all of those are joined later.)
        let mut failed = 0;
        self.0.retain(|c| {
            if c.future.is_some() {
                return true;
            }
            let unjoined = matches!(*c.cell.state.lock(), State::Done(Err(_)));
            failed += usize::from(unjoined);
            unjoined && failed <= FAILED_KEPT
        });
        let before = self.0.len();
        self.adopt();
        if self.0.len() > before {
            cx.waker().wake_by_ref();
        }
        if dropped {
            // A cancelled child's coroutine is closed now, inside its
            // request (its scope, its stop): its `__close` handlers are the
            // request's, never run between requests.
            super::coroutine::close_terminated();
        }
    }

    /// The error of a child that failed and was never joined.
    pub(crate) fn unjoined_error(&self) -> Option<mlua::Error> {
        self.0.iter().find_map(|c| match &*c.cell.state.lock() {
            State::Done(Err(e)) => Some(e.clone()),
            _ => None,
        })
    }

    /// Drops every running child (its request has ended).
    pub(crate) fn cancel_all(&mut self) {
        for child in self.0.drain(..) {
            if child.future.is_some() {
                drop(child.future);
                let ended = matches!(*child.cell.state.lock(), State::Done(_) | State::Joined);
                if !ended {
                    child.cell.end(State::Cancelled);
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.cancel_all();
    }
}

/// Drops children spawned where no request will adopt them (by `__close`
/// handlers run as a request ends, or a poll whose request is not
/// tracked). True if there were any.
pub(crate) fn discard_spawned() -> bool {
    let spawned = SPAWNED.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let any = !spawned.is_empty();
    drop(Children(spawned));
    any
}
