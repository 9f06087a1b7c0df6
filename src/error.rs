//! The crate's error type.
//!
//! `mlua::Error` is tied to the VM thread (it can hold Lua values and is not
//! `Send` without mlua's `send` feature), so every failure is turned into an
//! owned, `Send + Sync` [`IsleError`] on the VM thread before it crosses back.

use std::any::Any;
use std::fmt;

use crate::ErrorValue;

/// Why a request failed.
///
/// Every request resolves exactly once, with its value or with one of these.
/// The messages say what happened; the variant docs say what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IsleError {
    /// The Lua code (or the conversion of its result) raised an error. The
    /// VM is still usable.
    #[error("{0}")]
    Lua(LuaError),

    /// The request was cancelled (by [`Task::cancel`](crate::Task::cancel),
    /// a [`CancelToken`](crate::CancelToken), or by dropping its `Task`)
    /// before it could finish.
    #[error("request cancelled before it finished")]
    Cancelled,

    /// The request's time limit passed before it finished (time spent queued
    /// counts).
    #[error("request timed out: its time limit passed before it finished")]
    Timeout,

    /// The isle or pool shut down before the request could finish: it was
    /// submitted after shutdown began, was still queued when the owner
    /// stopped, or was interrupted by an abortive shutdown. Submit to a live
    /// one.
    #[error("the Lua VM shut down before the request could finish")]
    Shutdown,

    /// Rust code running for the request (an `exec` closure, an init closure
    /// or a Rust function called from Lua) panicked. The payload's message is
    /// kept. The VM keeps serving other requests.
    #[error("panic in Rust code run on the Lua thread: {0}")]
    Panic(String),

    /// The init closure failed, so the VM was not started.
    #[error("Lua VM initialisation failed: {0}")]
    Init(String),

    /// The queue is full (see `queue_capacity` on either builder), or, from
    /// `reserve_timeout`, stayed full until its deadline. Retry later, wait
    /// for room (`reserve_timeout`, `reserve`), or raise the capacity.
    #[error("request queue is full; retry later, wait for room with reserve_timeout/reserve, or raise queue_capacity")]
    QueueFull,

    /// `call` (or `map`) named a function that does not exist: a name on
    /// its path is `nil`. Holds the path up to and including that name (the
    /// whole name for a plain global: `"add"`; `"string.nope"`; `"obj"` for
    /// `"obj:get"` when `obj` itself is `nil`).
    #[error("no Lua function at `{0}`: it is nil (call takes a global function, a path `a.b.c`, or a method `obj:name`)")]
    NotFound(String),

    /// A blocking call was made from the VM's own thread (for example from an
    /// `exec` closure), or from an isle's VM thread on an isle that is itself
    /// blocked, directly or through other isles, on this one; waiting there
    /// would deadlock. Use the `&Lua` you were given, or a `spawn_*` method
    /// and let the task run later.
    #[error("blocking call would deadlock (made from the Lua VM's own thread, or from an isle the awaited isle is blocked on); use the `&Lua` in hand or spawn_* instead")]
    Reentrant,

    /// The request needed more memory than the VM may use (its
    /// `memory_limit`, or what the system would give). The VM collects its
    /// garbage and stays usable.
    #[error("Lua memory limit exceeded: {0}")]
    MemoryLimit(String),

    /// The request executed more Lua instructions than its budget allows.
    #[error("Lua instruction budget exhausted")]
    InstructionLimit,

    /// The session's VM was replaced, and the state the session kept in it is
    /// gone. Re-create the state and carry on.
    #[error("the session's Lua VM was recycled; its state is gone")]
    SessionLost,

    /// The Lua value a [`LuaHandle`](crate::LuaHandle) refers to is gone:
    /// the VM holding it was recycled or replaced, or (a session's handle)
    /// its session was closed, expired or lost. The message says which.
    /// Make the value again.
    #[error("{0}")]
    HandleLost(String),

    /// A VM did not let go of a stopped request within its grace period
    /// (see `stop_grace`): it is stuck in Rust or C code. Returned by
    /// `shutdown_timeout` (the stuck thread was detached, not joined); the
    /// message names the thread. Make long Rust callbacks poll
    /// [`current_token`](crate::current_token).
    #[error("a Lua VM did not stop in time: {0}")]
    Wedged(String),
}

impl IsleError {
    /// Returns the Lua error, if this is one.
    pub fn as_lua(&self) -> Option<&LuaError> {
        match self {
            IsleError::Lua(e) => Some(e),
            _ => None,
        }
    }

    /// True if the request was stopped rather than failing on its own:
    /// [`Cancelled`](IsleError::Cancelled), [`Timeout`](IsleError::Timeout),
    /// [`Shutdown`](IsleError::Shutdown) or
    /// [`InstructionLimit`](IsleError::InstructionLimit). These are the
    /// stops a [`CancelToken`](crate::CancelToken) reports with
    /// [`is_cancelled`](crate::CancelToken::is_cancelled), which a Rust
    /// callback polls to give up early.
    pub fn is_cancellation(&self) -> bool {
        matches!(
            self,
            IsleError::Cancelled
                | IsleError::Timeout
                | IsleError::Shutdown
                | IsleError::InstructionLimit
        )
    }
}

/// What kind of Lua failure an [`IsleError::Lua`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LuaErrorKind {
    /// The source did not compile.
    Syntax,
    /// The code raised an error while running (`error(...)`, a bad operation
    /// on a value, an error returned by a Rust callback, ...).
    Runtime,
    /// The result (or an argument) could not be converted between Lua and
    /// Rust.
    Conversion,
    /// Anything else reported by mlua.
    Other,
}

/// A Lua error, owned and readable without the VM.
///
/// The message keeps Lua's position prefix (`chunk:line:`); the traceback,
/// when Lua produced one, is kept apart; so is the value the script raised,
/// when it was not a string ([`value`](Self::value)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaError {
    kind: LuaErrorKind,
    message: String,
    traceback: Option<String>,
    value: Option<Box<ErrorValue>>,
}

impl LuaError {
    /// What kind of failure this is.
    pub fn kind(&self) -> LuaErrorKind {
        self.kind
    }

    /// The error message, starting with its position (`eval:3: boom`) when
    /// Lua knew one.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The Lua stack traceback at the point of the error, if any.
    pub fn traceback(&self) -> Option<&str> {
        self.traceback.as_deref()
    }

    /// The value the request raised (`error(value)`; from Lua 5.3 on,
    /// `assert(false, value)` too), read on the VM: see [`ErrorValue`].
    /// Kept however the error travelled out of the request: from `eval` or
    /// `call`, through Lua or Rust functions, coroutines, `pcall` and
    /// `error(e)` again.
    ///
    /// `None` when the raised value was a string (the message is all there
    /// is; on Lua 5.1, LuaJIT and Luau a number too, which `error` turns
    /// into a string), when the error was not raised by a script (a syntax
    /// error, a conversion, a Rust function's error), or when the value's
    /// `__tostring` failed or gave a different text than when the error
    /// was raised. Errors of `init` and of a pool's `reload` keep none.
    /// A value raised by a `__gc` finalizer is never kept on Lua 5.4 and
    /// 5.5; on Lua 5.1 and LuaJIT, outside the sandbox (which lets scripts
    /// set no finalizer), one that raises while another request runs can
    /// be kept as that request's.
    ///
    /// Raising a plain table (one without `__tostring` or `__name`) also
    /// makes the [`message`](Self::message) readable: its scalar fields,
    /// `{code = 42, msg = "no"}`, instead of Lua's `table: 0x…`.
    pub fn value(&self) -> Option<&ErrorValue> {
        self.value.as_deref()
    }
}

impl LuaError {
    /// A Lua error of `kind` with `message` and nothing else.
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    pub(crate) fn new(kind: LuaErrorKind, message: String) -> LuaError {
        LuaError {
            kind,
            message,
            traceback: None,
            value: None,
        }
    }

    /// Keeps `value`, the raised value this error's message was made of;
    /// for a plain table, `message` becomes `prefix` followed by its
    /// fields (for anything else, mlua's message is the value's text).
    pub(crate) fn set_value(&mut self, prefix: &str, value: ErrorValue) {
        if value.plain_table {
            self.message = format!("{prefix}{}", value.render());
        }
        self.value = Some(Box::new(value));
    }

    pub(crate) fn with_kind(mut self, kind: LuaErrorKind) -> LuaError {
        self.kind = kind;
        self
    }
}

impl fmt::Display for LuaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            LuaErrorKind::Syntax => "Lua syntax error",
            LuaErrorKind::Runtime => "Lua runtime error",
            LuaErrorKind::Conversion => "Lua conversion error",
            LuaErrorKind::Other => "Lua error",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl std::error::Error for LuaError {}

/// Whether `message` is Lua's memory error, after any number of positions
/// (`chunk:line: `) put in front of it.
fn is_memory_message(message: &str) -> bool {
    let mut m = message;
    while let Some(rest) = strip_position(m) {
        m = rest;
    }
    m == crate::sandbox::room::MEMORY_ERROR
}

/// `m` without the position (`chunk:line: `) it starts with, if it does.
fn strip_position(m: &str) -> Option<&str> {
    m.match_indices(": ").find_map(|(at, _)| {
        let (chunk, line) = m[..at].rsplit_once(':')?;
        let is_line = !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit());
        (is_line && !chunk.is_empty() && !chunk.contains('\n')).then(|| &m[at + 2..])
    })
}

/// Splits `"msg\nstack traceback:\n..."` into its two halves.
fn split_traceback(text: &str) -> (String, Option<String>) {
    match text.find("\nstack traceback:") {
        Some(at) => (
            text[..at].to_string(),
            Some(text[at + 1..].trim_end().to_string()),
        ),
        None => (text.to_string(), None),
    }
}

impl IsleError {
    /// Converts an mlua error on the VM thread. Panics that mlua carried
    /// through Lua frames are not errors: they unwind and are caught by the
    /// worker (see `vm/mod.rs`).
    pub(crate) fn from_lua(err: &mlua::Error) -> IsleError {
        let lua = |kind, text: &str| {
            let (message, traceback) = split_traceback(text);
            IsleError::Lua(LuaError {
                kind,
                message,
                traceback,
                value: None,
            })
        };
        match err {
            mlua::Error::SyntaxError { message, .. } => lua(LuaErrorKind::Syntax, message),
            // Lua 5.3's buffers raise this runtime error when the allocator
            // refuses (mlua's refuses only past the memory limit).
            #[cfg(feature = "lua53")]
            mlua::Error::RuntimeError(m)
                if m.contains("not enough memory for buffer allocation") =>
            {
                IsleError::MemoryLimit(split_traceback(m).0)
            }
            // Lua's memory error, re-raised by a function that put a
            // position in front (`error(e)`, `coroutine.wrap` before 5.4).
            mlua::Error::RuntimeError(m) if is_memory_message(&split_traceback(m).0) => {
                IsleError::MemoryLimit(split_traceback(m).0)
            }
            mlua::Error::RuntimeError(m) => lua(LuaErrorKind::Runtime, m),
            mlua::Error::MemoryError(m) => IsleError::MemoryLimit(m.clone()),
            mlua::Error::FromLuaConversionError { .. } | mlua::Error::BadArgument { .. } => {
                lua(LuaErrorKind::Conversion, &err.to_string())
            }
            // mlua's serde conversions (the `serde` feature, `Serde<T>`).
            #[cfg(feature = "serde")]
            mlua::Error::SerializeError(m) | mlua::Error::DeserializeError(m) => {
                lua(LuaErrorKind::Conversion, m)
            }
            mlua::Error::CallbackError { traceback, cause } => {
                // A Rust callback failed; report its root cause with the Lua
                // traceback taken where it was raised.
                let mut root = IsleError::from_lua(cause);
                if let IsleError::Lua(e) = &mut root {
                    if e.traceback.is_none() && !traceback.is_empty() {
                        e.traceback = Some(traceback.clone());
                    }
                }
                root
            }
            mlua::Error::WithContext { context, cause } => match IsleError::from_lua(cause) {
                IsleError::Lua(mut e) => {
                    e.message = format!("{context}: {}", e.message);
                    IsleError::Lua(e)
                }
                other => other,
            },
            mlua::Error::ExternalError(e) => {
                if let Some(isle) = e.downcast_ref::<IsleError>() {
                    return isle.clone();
                }
                lua(LuaErrorKind::Runtime, &e.to_string())
            }
            other => lua(LuaErrorKind::Other, &other.to_string()),
        }
    }

    /// Converts a caught panic payload.
    pub(crate) fn from_panic(payload: &(dyn Any + Send)) -> IsleError {
        IsleError::Panic(panic_message(payload))
    }
}

/// The message of a panic payload (`panic!("...")` gives a `&str` or a
/// `String`; anything else is opaque).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic payload is not a string".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceback_is_split_from_the_message() {
        let (m, t) = split_traceback("eval:1: boom\nstack traceback:\n\t[C]: in ?");
        assert_eq!(m, "eval:1: boom");
        assert_eq!(t.as_deref(), Some("stack traceback:\n\t[C]: in ?"));
        assert_eq!(split_traceback("plain").1, None);
    }

    #[test]
    fn memory_errors_are_recognised_behind_positions() {
        assert!(is_memory_message("not enough memory"));
        assert!(is_memory_message("eval:1: not enough memory"));
        assert!(is_memory_message(
            "[string \"a:b\"]:3: eval:12: not enough memory"
        ));
        assert!(!is_memory_message("eval:1: app: not enough memory"));
        assert!(!is_memory_message("eval: not enough memory"));
        assert!(!is_memory_message("not enough memory!"));
    }

    #[test]
    fn isle_errors_are_send_sync_static() {
        fn check<E: std::error::Error + Send + Sync + 'static>() {}
        check::<IsleError>();
        check::<LuaError>();
        fn value<V: Send + Sync + Clone + Eq + fmt::Debug + 'static>() {}
        value::<crate::ErrorValue>();
    }
}
