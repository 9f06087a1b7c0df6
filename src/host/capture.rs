//! Capturing what a request prints: `capture_print()` on every front-end
//! gives a [`PrintCapture`], whose request methods are the front's, each
//! resolving with a [`Printed`]: the result and the lines the request
//! printed.
//!
//! The work of a captured request is the front's own (`submit.rs`),
//! wrapped by [`captured`]: it makes the request's capture current on the
//! VM thread when it starts (`vm/job.rs` makes it current again around
//! every later poll), and turns the work's result into a `Printed`.
//! `sandbox/print.rs` says where a line goes.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
#[cfg(feature = "async")]
use std::{
    future::Future,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
};

use mlua::Lua;

use super::submit::{self, Submit, Work};
use crate::sandbox::print::{Capture, Ended};
use crate::vm::Run;
use crate::{IsleError, Task};

/// How many bytes of printed lines a captured request keeps unless
/// [`PrintCapture::limit`] says otherwise.
const DEFAULT_LIMIT: usize = 64 << 10;

/// What a captured request gave: its result, and the lines it printed
/// before that result (also before its error).
///
/// Given by the request methods of a [`PrintCapture`] when the request ran
/// to its end; see there for which errors are `result` and which are
/// returned instead of a `Printed`.
#[derive(Debug, Clone, PartialEq)]
pub struct Printed<T> {
    /// What the request gave: its value, or its error ([`IsleError::Lua`]
    /// for a Lua error or a failed conversion, [`IsleError::MemoryLimit`],
    /// [`IsleError::Panic`] for a panic of its closure or of a Rust
    /// function it called, [`IsleError::NotFound`], ...).
    pub result: Result<T, IsleError>,
    /// One entry per `print` call, as `print` would have written it
    /// (`tostring` of each argument, tab separated), without the newline;
    /// bytes that are not UTF-8 are replaced by U+FFFD.
    pub lines: Vec<String>,
    /// True if lines were left out: the first line that did not fit in the
    /// [limit](PrintCapture::limit) and every line after it.
    pub truncated: bool,
}

impl<T> Printed<T> {
    /// The result alone, the lines dropped.
    ///
    /// # Errors
    /// The request's error, if it failed.
    pub fn into_result(self) -> Result<T, IsleError> {
        self.result
    }
}

/// Runs requests on an [`Isle`](crate::Isle), an
/// [`IslePool`](crate::IslePool) or a [`Session`](crate::Session)
/// (`F`), capturing what each prints. Made by their `capture_print()`.
///
/// Its request methods are the front's (`eval`, `call`, `exec` and their
/// `spawn_*` forms), taking the same arguments, and resolve with a
/// [`Printed`]: the lines that request's `print` calls wrote, in order,
/// beside its result. Those lines go nowhere else: neither to the
/// [`print_to`](crate::IsleBuilder::print_to) sink nor to stdout.
/// Requests made directly on the front print as before.
///
/// ```
/// use mlua_isle::Isle;
///
/// let isle = Isle::spawn(|_| Ok(()))?;
/// let out = isle
///     .capture_print()
///     .eval::<i64>("print('adding', 40, 2) return 40 + 2")?;
/// assert_eq!(out.lines, ["adding\t40\t2"]);
/// assert_eq!(out.result, Ok(42));
///
/// // A Lua error is the request's result, with the lines printed before it.
/// let out = isle.capture_print().eval::<()>("print('step 1') error('no step 2')")?;
/// assert_eq!(out.lines, ["step 1"]);
/// assert!(out.result.is_err());
/// # Ok::<(), mlua_isle::IsleError>(())
/// ```
///
/// # Which lines
///
/// A line belongs to the request that is running when `print` is called,
/// however it is called (`local p = print`, `pcall(print, ..)`, as the
/// replacement function of `string.gsub`, from a `__tostring` called by
/// another `print`, from a coroutine): a function that holds `print`,
/// kept by one request and called by a later one, prints the later one's
/// lines. With the `async` feature, requests suspended on one VM each get
/// their own lines, and the lines of the `task.spawn` children of a request
/// are its own. `init`, reloads, [`broadcast`](crate::IslePool::broadcast)
/// and requests made without `capture_print` are never captured.
///
/// Finalizers (`__gc`) run when the collector decides, in whatever runs
/// then: their lines belong to the request that was running (captured or
/// not), or, between requests, go where uncaptured lines go. The
/// [sandbox](crate::IsleBuilder::sandbox) lets Lua code set no `__gc`, so
/// there only the host's own finalizers can print into a request.
///
/// What is captured is what the crate's `print` writes: a `print` that
/// `init` puts in its place is captured only as far as it calls the one
/// it replaced.
///
/// A script can only stop its own lines from being captured: by replacing
/// `print` where it reads it (in a session, its own environment; unkeyed
/// work shares the VM's globals, so there it replaces `print` for all
/// unkeyed work, as with any global). In the sandbox, sessions read `print`
/// as `init` left it, whatever other sessions or unkeyed work do.
///
/// # Errors and limits
///
/// The methods return an error instead of a [`Printed`] when the request
/// did not run to its end: [`Cancelled`](IsleError::Cancelled),
/// [`Timeout`](IsleError::Timeout), [`Shutdown`](IsleError::Shutdown),
/// [`InstructionLimit`](IsleError::InstructionLimit),
/// [`QueueFull`](IsleError::QueueFull),
/// [`Reentrant`](IsleError::Reentrant),
/// [`SessionLost`](IsleError::SessionLost): what it printed is dropped.
/// Anything else the request ends with is its [`Printed::result`]. A
/// failed `result` counts as a failed request in the metrics.
///
/// The lines are kept in Rust memory, outside the VM's
/// [`memory_limit`](crate::IsleBuilder::memory_limit): a request keeps
/// whole lines as long as their bytes (each plus one, for its newline)
/// fit in the [limit](Self::limit), then none, and says so
/// ([`Printed::truncated`]). A line that does not fit is never copied.
#[must_use = "a PrintCapture does nothing until one of its request methods is called"]
pub struct PrintCapture<'a, F> {
    front: &'a F,
    limit: usize,
}

impl<'a, F> PrintCapture<'a, F> {
    pub(crate) fn new(front: &'a F) -> Self {
        PrintCapture {
            front,
            limit: DEFAULT_LIMIT,
        }
    }

    /// Keeps at most `bytes` of lines per request (default 64 KiB), each
    /// line counting its bytes plus one.
    pub fn limit(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
    }

    /// What the request methods' bodies call: `work`, captured.
    fn spawn<T, W>(&self, work: W) -> Task<Printed<T>>
    where
        F: Submit,
        T: Send + 'static,
        W: Work<T>,
    {
        self.front.spawn(captured(self.limit, work))
    }

    /// `spawn` + `wait`, refusing at once on the VM's own thread.
    fn run<T, W>(&self, work: W) -> Result<Printed<T>, IsleError>
    where
        F: Submit,
        T: Send + 'static,
        W: Work<T>,
    {
        self.front.run(captured(self.limit, work))
    }
}

impl<F: fmt::Debug> fmt::Debug for PrintCapture<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrintCapture")
            .field("target", self.front)
            .field("limit", &self.limit)
            .finish()
    }
}

/// `work`, its prints captured (at most `limit` bytes of lines).
pub(crate) fn captured<T>(limit: usize, work: impl Work<T>) -> impl Work<Printed<T>>
where
    T: Send + 'static,
{
    move |ctx| {
        let prepared = crate::sandbox::print::prepare(ctx.lua);
        let capture = Capture::begin(limit);
        if let Err(e) = prepared {
            let e = crate::interrupt::request_error(ctx.lua, &e);
            return Run::Done(printed(ctx.lua, &capture, Err(e)));
        }
        match catch_unwind(AssertUnwindSafe(|| work(ctx))) {
            Ok(Run::Done(result)) => Run::Done(printed(ctx.lua, &capture, result)),
            Err(payload) => Run::Done(printed(ctx.lua, &capture, Err(panicked(payload)))),
            #[cfg(feature = "async")]
            Ok(Run::Wait(future)) => Run::Wait(Box::pin(Captured {
                future,
                capture,
                lua: ctx.lua.clone(),
            })),
        }
    }
}

/// A panic of the request's own code, as its result.
fn panicked(payload: Box<dyn std::any::Any + Send>) -> IsleError {
    let e = IsleError::from_panic(&*payload);
    // A payload whose drop panics: that one is leaked, not dropped.
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
    e
}

/// The work's `result` with its lines; an error of a stopped request
/// stays the request's error (the stop's reason replaces it).
fn printed<T>(
    lua: &Lua,
    capture: &Capture,
    result: Result<T, IsleError>,
) -> Result<Printed<T>, IsleError> {
    let ended = match result {
        Ok(_) => Ended::Completed,
        Err(
            e @ (IsleError::Cancelled
            | IsleError::Timeout
            | IsleError::Shutdown
            | IsleError::InstructionLimit),
        ) => return Err(e),
        Err(e) if stopped(lua) => return Err(e),
        Err(IsleError::MemoryLimit(_)) => Ended::OutOfMemory,
        Err(_) => Ended::Failed,
    };
    let (lines, truncated) = capture.finish(ended);
    Ok(Printed {
        result,
        lines,
        truncated,
    })
}

/// True if the running request was told to stop: its error is the stop
/// (or a callback giving up because of it).
fn stopped(lua: &Lua) -> bool {
    crate::interrupt::current_token(lua).is_some_and(|t| t.is_cancelled())
}

/// The future of a captured request that suspended.
#[cfg(feature = "async")]
struct Captured<Fut> {
    future: Fut,
    capture: Rc<Capture>,
    lua: Lua,
}

#[cfg(feature = "async")]
impl<T, Fut> Future for Captured<Fut>
where
    Fut: Future<Output = Result<T, IsleError>> + Unpin,
{
    type Output = Result<Printed<T>, IsleError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.future).poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => result,
            Err(payload) => Err(panicked(payload)),
        };
        Poll::Ready(printed(&this.lua, &this.capture, result))
    }
}

// ===== The request methods =====

/// The request methods of a `PrintCapture`, as the front's (see
/// `request_methods!`): `plain` gives `eval`, `eval_with` and `call` and their `spawn_*`
/// forms; `exec` adds `exec` and its forms taking `&Lua`. Each is a line:
/// the front's work, handed to `run` or `spawn`, which capture it.
macro_rules! capture_methods {
    (plain) => {
        /// Evaluates a Lua chunk as the front's `eval` does, capturing its
        /// prints. Blocks until it has run.
        ///
        /// # Errors
        /// When the request did not run to its end (see [`PrintCapture`]);
        /// its own errors are in [`Printed::result`].
        pub fn eval<T>(&self, chunk: impl Into<crate::Chunk>) -> Result<Printed<T>, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            self.run(submit::eval(chunk.into(), ()))
        }

        /// Like [`eval`](Self::eval), but returns at once with a [`Task`].
        pub fn spawn_eval<T>(&self, chunk: impl Into<crate::Chunk>) -> Task<Printed<T>>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            self.spawn(submit::eval(chunk.into(), ()))
        }

        /// Evaluates a Lua chunk with `args` (seen as `...`), as the
        /// front's `eval_with` does, capturing its prints. Blocks until it
        /// has run.
        ///
        /// # Errors
        /// As for [`eval`](Self::eval).
        pub fn eval_with<T>(
            &self,
            chunk: impl Into<crate::Chunk>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Result<Printed<T>, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            self.run(submit::eval(chunk.into(), args))
        }

        /// Like [`eval_with`](Self::eval_with), but returns at once with a
        /// [`Task`].
        pub fn spawn_eval_with<T>(
            &self,
            chunk: impl Into<crate::Chunk>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Task<Printed<T>>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            self.spawn(submit::eval(chunk.into(), args))
        }

        /// Calls what `path` names (a global, `a.b.c`, `obj:method`) as
        /// the front's `call` does, capturing its prints. Blocks until it has run.
        ///
        /// # Errors
        /// As for [`eval`](Self::eval).
        pub fn call<T>(
            &self,
            path: impl Into<String>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Result<Printed<T>, IsleError>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            self.run(submit::call(path.into(), args))
        }

        /// Like [`call`](Self::call), but returns at once with a [`Task`].
        pub fn spawn_call<T>(
            &self,
            path: impl Into<String>,
            args: impl mlua::IntoLuaMulti + Send + 'static,
        ) -> Task<Printed<T>>
        where
            T: mlua::FromLuaMulti + Send + 'static,
        {
            self.spawn(submit::call(path.into(), args))
        }
    };
    (exec) => {
        capture_methods!(plain);

        /// Runs `f` with the VM as the front's `exec` does, capturing what
        /// the Lua code it runs prints. Blocks until it has run.
        ///
        /// # Errors
        /// As for [`eval`](Self::eval).
        pub fn exec<T, G>(&self, f: G) -> Result<Printed<T>, IsleError>
        where
            T: Send + 'static,
            G: FnOnce(&mlua::Lua) -> mlua::Result<T> + Send + 'static,
        {
            self.run(submit::exec(f))
        }

        /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
        pub fn spawn_exec<T, G>(&self, f: G) -> Task<Printed<T>>
        where
            T: Send + 'static,
            G: FnOnce(&mlua::Lua) -> mlua::Result<T> + Send + 'static,
        {
            self.spawn(submit::exec(f))
        }

        /// Like the front's `spawn_exec_async` (the `async` feature),
        /// capturing what its Lua code prints, while suspended too.
        #[cfg(feature = "async")]
        pub fn spawn_exec_async<T, G, Fut>(&self, f: G) -> Task<Printed<T>>
        where
            T: Send + 'static,
            G: FnOnce(mlua::Lua) -> Fut + Send + 'static,
            Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
        {
            self.spawn(submit::exec_async(f))
        }
    };
}

impl PrintCapture<'_, crate::Isle> {
    capture_methods!(exec);
}

impl PrintCapture<'_, crate::IslePool> {
    capture_methods!(exec);
}

impl PrintCapture<'_, crate::Session> {
    capture_methods!(plain);

    /// Runs `f` with the VM and the session's environment as
    /// [`Session::exec`](crate::Session::exec) does, capturing what the Lua
    /// code it runs prints. Blocks until it has run.
    ///
    /// # Errors
    /// As for [`eval`](Self::eval).
    pub fn exec<T, G>(&self, f: G) -> Result<Printed<T>, IsleError>
    where
        T: Send + 'static,
        G: FnOnce(&mlua::Lua, &mlua::Table) -> mlua::Result<T> + Send + 'static,
    {
        self.run(submit::exec_env(f))
    }

    /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
    pub fn spawn_exec<T, G>(&self, f: G) -> Task<Printed<T>>
    where
        T: Send + 'static,
        G: FnOnce(&mlua::Lua, &mlua::Table) -> mlua::Result<T> + Send + 'static,
    {
        self.spawn(submit::exec_env(f))
    }

    /// Like [`Session::spawn_exec_async`](crate::Session::spawn_exec_async)
    /// (the `async` feature), capturing what its Lua code prints, while
    /// suspended too.
    #[cfg(feature = "async")]
    pub fn spawn_exec_async<T, G, Fut>(&self, f: G) -> Task<Printed<T>>
    where
        T: Send + 'static,
        G: FnOnce(mlua::Lua, mlua::Table) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
    {
        self.spawn(submit::exec_env_async(f))
    }
}

// ===== capture_print() on the fronts =====

impl crate::Isle {
    /// Runs requests whose `print` calls are captured and returned with
    /// their results: see [`PrintCapture`].
    ///
    /// ```
    /// let isle = mlua_isle::Isle::spawn(|_| Ok(()))?;
    /// let out = isle.capture_print().eval::<()>("print('hello', nil)")?;
    /// assert_eq!(out.lines, ["hello\tnil"]);
    /// # Ok::<(), mlua_isle::IsleError>(())
    /// ```
    pub fn capture_print(&self) -> PrintCapture<'_, crate::Isle> {
        PrintCapture::new(self)
    }
}

impl crate::IslePool {
    /// Runs requests on any free VM whose `print` calls are captured and
    /// returned with their results: see [`PrintCapture`].
    pub fn capture_print(&self) -> PrintCapture<'_, crate::IslePool> {
        PrintCapture::new(self)
    }
}

impl crate::Session {
    /// Runs requests of this session whose `print` calls are captured and
    /// returned with their results: see [`PrintCapture`].
    ///
    /// ```
    /// let pool = mlua_isle::IslePool::builder().workers(1).sandbox(true).build()?;
    /// let tenant = pool.session("tenant-7");
    /// let out = tenant.capture_print().eval::<i64>("print('hi') return 7")?;
    /// assert_eq!((out.lines, out.result), (vec!["hi".to_string()], Ok(7)));
    /// # Ok::<(), mlua_isle::IsleError>(())
    /// ```
    pub fn capture_print(&self) -> PrintCapture<'_, crate::Session> {
        PrintCapture::new(self)
    }
}
