//! The contracts, with suspended requests (the `async` feature): a request
//! awaiting a pending future lets its VM serve others; every stop (cancel,
//! time limits, dropping the task, shutdown, dropping the front) resolves
//! it exactly once and drops its future; panics, tokens, session order,
//! limits and the sandbox hold across awaits.
//!
//! The futures are controlled by the test through a [`Hub`]: the async Lua
//! function `park(key)` reports "parked" and waits until the test releases
//! that key; a drop guard inside its future reports when the future is
//! dropped unreleased. Nothing here is synchronised by sleeping or by time.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::front::{each_kind, Kind};
use common::{eventually, within, Rng, PATIENCE};
use crossbeam_channel::{Receiver, Sender};
use futures::channel::oneshot;
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{current_token, Isle, IsleError, IslePool, Session, Task};
use parking_lot::Mutex;

// ---------------------------------------------------------------------------
// The hub: futures the test releases, and what they report.
// ---------------------------------------------------------------------------

/// The VM side: installs the Lua functions, makes the futures.
#[derive(Clone)]
struct Hub {
    gates: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
    parked: Sender<String>,
    dropped: Sender<String>,
    notes: Sender<String>,
    /// Futures made by `park` and not dropped yet.
    live: Arc<AtomicUsize>,
    /// More for `install` to do (a test's own functions).
    extra: Option<Arc<Init>>,
}

type Init = dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync;

/// The test side.
struct Ctl {
    hub: Hub,
    parked: Receiver<String>,
    dropped: Receiver<String>,
    notes: Receiver<String>,
    seen_parked: Mutex<HashSet<String>>,
    seen_dropped: Mutex<HashSet<String>>,
}

fn hub() -> (Ctl, Hub) {
    let (parked_tx, parked) = crossbeam_channel::unbounded();
    let (dropped_tx, dropped) = crossbeam_channel::unbounded();
    let (notes_tx, notes) = crossbeam_channel::unbounded();
    let hub = Hub {
        gates: Arc::default(),
        parked: parked_tx,
        dropped: dropped_tx,
        notes: notes_tx,
        live: Arc::default(),
        extra: None,
    };
    let ctl = Ctl {
        hub: hub.clone(),
        parked,
        dropped,
        notes,
        seen_parked: Mutex::default(),
        seen_dropped: Mutex::default(),
    };
    (ctl, hub)
}

/// Inside a `park` future: reports its drop unless it was released.
struct Guard {
    key: String,
    released: bool,
    hub: Hub,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.hub.live.fetch_sub(1, Ordering::SeqCst);
        if !self.released {
            let _ = self.hub.dropped.send(self.key.clone());
        }
    }
}

impl Hub {
    /// Waits until the test releases `key`; reports "parked" first.
    fn park(&self, key: String) -> impl Future<Output = mlua::Result<()>> + 'static {
        let hub = self.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            hub.live.fetch_add(1, Ordering::SeqCst);
            let mut guard = Guard {
                key: key.clone(),
                released: false,
                hub: hub.clone(),
            };
            hub.gates.lock().insert(key.clone(), tx);
            let _ = hub.parked.send(key);
            let released = rx.await;
            guard.released = true;
            released.map_err(|_| mlua::Error::runtime("the gate was dropped"))
        }
    }

    /// This hub, whose `install` also runs `f`.
    fn with_init(&self, f: impl Fn(&Lua) -> mlua::Result<()> + Send + Sync + 'static) -> Hub {
        Hub {
            extra: Some(Arc::new(f)),
            ..self.clone()
        }
    }

    /// The Lua functions: `park(key)` (async), `note(text)`, `boom(text)`
    /// (async, panics), `yield_once()` (async, pending once); then the
    /// extra init, if any.
    fn install(&self, lua: &Lua) -> mlua::Result<()> {
        if let Some(extra) = &self.extra {
            extra(lua)?;
        }
        let g = lua.globals();
        let hub = self.clone();
        g.set(
            "park",
            lua.create_async_function(move |_, key: String| hub.park(key))?,
        )?;
        let hub = self.clone();
        g.set(
            "note",
            lua.create_function(move |_, text: String| {
                let _ = hub.notes.send(text);
                Ok(())
            })?,
        )?;
        // A Rust `__close` handler (Lua ones of a stopped request are
        // interrupted at once, as while a running request unwinds): sets
        // `closed` to the variable's value and notes its `name` field.
        let hub = self.clone();
        g.set(
            "record",
            lua.create_function(move |lua, v: mlua::Table| {
                let _ = hub.notes.send(v.get::<String>("name")?);
                lua.globals().set("closed", v)
            })?,
        )?;
        g.set(
            "boom",
            lua.create_async_function(|_, text: String| async move {
                if !text.is_empty() {
                    panic!("{text}");
                }
                Ok(())
            })?,
        )?;
        common::set_yield_once(lua, "yield_once")
    }
}

impl Ctl {
    fn wait_in(&self, rx: &Receiver<String>, seen: &Mutex<HashSet<String>>, key: &str, what: &str) {
        let mut seen = seen.lock();
        while !seen.remove(key) {
            match rx.recv_timeout(PATIENCE) {
                Ok(k) => {
                    seen.insert(k);
                }
                Err(_) => panic!("timed out waiting for {key:?} to be {what}"),
            }
        }
    }

    /// Waits until the request awaiting `key` is suspended on it.
    fn wait_parked(&self, key: &str) {
        self.wait_in(&self.parked, &self.seen_parked, key, "parked");
    }

    /// Waits until the future awaiting `key` was dropped unreleased.
    fn wait_dropped(&self, key: &str) {
        self.wait_in(&self.dropped, &self.seen_dropped, key, "dropped");
    }

    /// Lets the future awaiting `key` finish (from this thread: no
    /// runtime).
    fn release(&self, key: &str) {
        let gate = self.hub.gates.lock().remove(key);
        let gate = gate.unwrap_or_else(|| panic!("nothing parked on {key:?}"));
        let _ = gate.send(());
    }

    /// Waits for the note `text` from Lua.
    fn wait_note(&self, text: &str) {
        let got = self
            .notes
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("timed out waiting for the note {text:?}"));
        assert_eq!(got, text);
    }

    fn no_note(&self) {
        assert_eq!(self.notes.try_recv().ok(), None, "an unexpected note");
    }

    fn no_drop(&self) {
        assert_eq!(self.dropped.try_recv().ok(), None, "a future was dropped");
    }

    fn live(&self) -> usize {
        self.hub.live.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// Fronts with any builder option.
// ---------------------------------------------------------------------------

/// An isle, a one-worker pool, or a session on a one-worker pool.
#[derive(Clone)]
enum F {
    Isle(Isle),
    Pool(IslePool),
    Session(IslePool, Session),
}

/// `front!(kind, hub, .option(args)...)`: a fresh front whose VM has the
/// hub's functions, with the builder options given (Isle and pool alike).
macro_rules! front {
    ($kind:expr, $hub:expr $(, .$opt:ident($($arg:expr),*))* $(,)?) => {{
        let hub: Hub = $hub.clone();
        match $kind {
            Kind::Isle => F::Isle(
                Isle::builder()
                    $(.$opt($($arg),*))*
                    .init(move |lua| hub.install(lua))
                    .build()
                    .expect("the isle starts"),
            ),
            kind => {
                let pool = IslePool::builder()
                    .workers(1)
                    $(.$opt($($arg),*))*
                    .init(move |lua| hub.install(lua))
                    .build()
                    .expect("the pool starts");
                if kind == Kind::Pool {
                    F::Pool(pool)
                } else {
                    let session = pool.session("tenant");
                    F::Session(pool, session)
                }
            }
        }
    }};
}

impl F {
    #[allow(dead_code)] // used by tests compiled for some backends only
    fn kind(&self) -> Kind {
        match self {
            F::Isle(_) => Kind::Isle,
            F::Pool(_) => Kind::Pool,
            F::Session(..) => Kind::Session,
        }
    }

    fn pool(&self) -> Option<&IslePool> {
        match self {
            F::Isle(_) => None,
            F::Pool(p) | F::Session(p, _) => Some(p),
        }
    }

    fn spawn_eval<T: mlua::FromLuaMulti + Send + 'static>(&self, code: &str) -> Task<T> {
        match self {
            F::Isle(i) => i.spawn_eval(code),
            F::Pool(p) => p.spawn_eval(code),
            F::Session(_, s) => s.spawn_eval(code),
        }
    }

    fn eval<T: mlua::FromLuaMulti + Send + 'static>(&self, code: &str) -> Result<T, IsleError> {
        let task = self.spawn_eval(code);
        within("a request resolves", move || task.wait())
    }

    /// Like `spawn_eval`, but on a session front the request goes to a
    /// session of its own (key `i`), so that session requests can be in
    /// flight at once.
    fn spawn_eval_keyed<T: mlua::FromLuaMulti + Send + 'static>(
        &self,
        i: usize,
        code: &str,
    ) -> Task<T> {
        match self {
            F::Session(p, _) => p.session(format!("k{i}")).spawn_eval(code),
            _ => self.spawn_eval(code),
        }
    }

    /// `spawn_exec_async`; a session's closure is not shown its env.
    fn spawn_exec_async<T, G, Fut>(&self, f: G) -> Task<T>
    where
        T: Send + 'static,
        G: FnOnce(Lua) -> Fut + Send + 'static,
        Fut: Future<Output = mlua::Result<T>> + 'static,
    {
        match self {
            F::Isle(i) => i.spawn_exec_async(f),
            F::Pool(p) => p.spawn_exec_async(f),
            F::Session(_, s) => s.spawn_exec_async(move |lua, _env| f(lua)),
        }
    }

    fn shutdown(&self) -> Result<(), IsleError> {
        match self {
            F::Isle(i) => i.shutdown(),
            F::Pool(p) | F::Session(p, _) => p.shutdown(),
        }
    }

    fn shutdown_timeout(&self, d: Duration) -> Result<(), IsleError> {
        match self {
            F::Isle(i) => i.shutdown_timeout(d),
            F::Pool(p) | F::Session(p, _) => p.shutdown_timeout(d),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            F::Isle(i) => i.is_shutdown(),
            F::Pool(p) | F::Session(p, _) => p.is_shutdown(),
        }
    }

    /// Requests suspended on the pool's VM (`None` for an isle).
    fn suspended(&self) -> Option<usize> {
        self.pool().map(|p| p.metrics().workers[0].suspended)
    }
}

/// Waits for `task` under the watchdog; then checks it gives nothing more.
fn resolve<T: Send + 'static>(task: Task<T>, what: &str) -> Result<T, IsleError> {
    let what = what.to_string();
    within(&what.clone(), move || {
        let mut task = task;
        let r = task
            .wait_timeout(PATIENCE)
            .unwrap_or_else(|| panic!("hung: {what}"));
        assert!(task.is_finished());
        assert!(task.try_result().is_none(), "{what}: resolved twice");
        r
    })
}

/// The VM still serves, and holds nothing suspended once quiet.
fn still_serves(front: &F) {
    assert_eq!(front.eval::<i64>("return 1 + 1"), Ok(2));
    if front.pool().is_some() {
        eventually("nothing left suspended", || front.suspended() == Some(0));
    }
}

// ---------------------------------------------------------------------------
// The VM serves others while requests are suspended.
// ---------------------------------------------------------------------------

#[test]
fn many_suspended_requests_are_in_flight_at_once_and_others_run_meanwhile() {
    const N: usize = 50;
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let tasks: Vec<Task<i64>> = (0..N)
            .map(|i| front.spawn_eval_keyed(i, &format!("park('p{i}'); return {i}")))
            .collect();
        // Every one is parked, none released: all N in flight at once on
        // one VM.
        for i in 0..N {
            ctl.wait_parked(&format!("p{i}"));
        }
        assert_eq!(ctl.live(), N);
        if front.pool().is_some() {
            eventually("metrics show them suspended", || {
                front.suspended() == Some(N)
            });
        }
        // A new request completes meanwhile, on the same (only) VM.
        assert_eq!(front.eval::<i64>("return 40 + 2"), Ok(42), "{kind:?}");
        // Released ones complete while the others stay suspended.
        let (even, odd): (Vec<_>, Vec<_>) =
            tasks.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        for (i, _) in &even {
            ctl.release(&format!("p{i}"));
        }
        for (i, t) in even {
            assert_eq!(resolve(t, "a released request"), Ok(i as i64), "{kind:?}");
        }
        for (_, t) in &odd {
            assert!(!t.is_finished(), "{kind:?}: finished without its release");
        }
        // And a suspended one of the rest can start another await.
        for (i, _) in &odd {
            ctl.release(&format!("p{i}"));
        }
        for (i, t) in odd {
            assert_eq!(resolve(t, "a released request"), Ok(i as i64), "{kind:?}");
        }
        ctl.no_drop();
        assert_eq!(ctl.live(), 0);
        still_serves(&front);
    });
}

#[test]
fn a_request_can_await_many_times_and_suspended_ones_interleave() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let a = front.spawn_eval_keyed::<String>(
            1,
            "local s = '' for i = 1, 3 do park('a' .. i); s = s .. 'a' .. i end return s",
        );
        let b = front.spawn_eval_keyed::<String>(
            2,
            "local s = '' for i = 1, 3 do park('b' .. i); s = s .. 'b' .. i end return s",
        );
        // Alternate: each step of one completes while the other waits.
        for i in 1..=3 {
            ctl.wait_parked(&format!("a{i}"));
            ctl.wait_parked(&format!("b{i}"));
            ctl.release(&format!("a{i}"));
            ctl.release(&format!("b{i}"));
        }
        assert_eq!(resolve(a, "a"), Ok("a1a2a3".into()), "{kind:?}");
        assert_eq!(resolve(b, "b"), Ok("b1b2b3".into()), "{kind:?}");
        // Async functions that suspend once, woken from the VM thread.
        assert_eq!(
            front.eval::<i64>("local n = 0 for i = 1, 100 do yield_once(); n = n + i end return n"),
            Ok(5050),
            "{kind:?}"
        );
        still_serves(&front);
    });
}

#[test]
fn call_and_map_suspend_too() {
    let (_ctl, hub) = hub();
    let init = hub.clone();
    let pool = IslePool::builder()
        .workers(2)
        .init(move |lua| {
            init.install(lua)?;
            lua.load("function sq(n) yield_once() return n * n end")
                .exec()
        })
        .build()
        .unwrap();
    let squares = within("map", {
        let pool = pool.clone();
        move || pool.map::<i64, i64>("sq", 1..=40)
    });
    assert_eq!(squares, (1..=40).map(|n| Ok(n * n)).collect::<Vec<_>>());
    assert_eq!(resolve(pool.spawn_call::<i64>("sq", 7), "call"), Ok(49));
    assert_eq!(
        resolve(pool.session("s").spawn_call::<i64>("sq", 8), "call"),
        Ok(64)
    );
}

// ---------------------------------------------------------------------------
// Stops: each resolves exactly once, promptly, and drops the future.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Stop {
    Cancel,
    CancelToken,
    TaskTimeout,
    DefaultTimeout,
    DropTask,
}

#[test]
fn every_stop_resolves_a_suspended_request_once_and_drops_its_future() {
    for how in [
        Stop::Cancel,
        Stop::CancelToken,
        Stop::TaskTimeout,
        Stop::DefaultTimeout,
        Stop::DropTask,
    ] {
        each_kind(|kind| {
            eprintln!("    stop: {how:?}");
            let (ctl, hub) = hub();
            // With a default time limit every request has it: no bystanders.
            let bystanders = !matches!(how, Stop::DefaultTimeout);
            let front = match how {
                Stop::DefaultTimeout => {
                    front!(kind, hub, .default_timeout(Duration::from_millis(30)))
                }
                _ => front!(kind, hub),
            };
            // Another suspended request (another session on the session
            // front), which must not be disturbed.
            let other = bystanders.then(|| {
                let t = front.spawn_eval_keyed::<i64>(7, "park('other'); return 7");
                ctl.wait_parked("other");
                t
            });
            let victim = front.spawn_eval::<i64>("park('victim'); return 1");
            ctl.wait_parked("victim");
            // Behind the victim: on a session, it waits for it.
            let behind = bystanders.then(|| front.spawn_eval::<i64>("return 2"));
            let (victim, want) = match how {
                Stop::Cancel => {
                    victim.cancel();
                    (Some(victim), IsleError::Cancelled)
                }
                Stop::CancelToken => {
                    let token = victim.cancel_token().clone();
                    std::thread::spawn(move || token.cancel()).join().unwrap();
                    (Some(victim), IsleError::Cancelled)
                }
                Stop::TaskTimeout => (
                    Some(victim.timeout(Duration::from_millis(30))),
                    IsleError::Timeout,
                ),
                Stop::DefaultTimeout => (Some(victim), IsleError::Timeout),
                Stop::DropTask => {
                    drop(victim);
                    (None, IsleError::Cancelled)
                }
            };
            if let Some(victim) = victim {
                assert_eq!(resolve(victim, "stopped"), Err(want), "{kind:?} {how:?}");
            }
            ctl.wait_dropped("victim");
            if let Some(behind) = behind {
                assert_eq!(
                    resolve(behind, "the request behind"),
                    Ok(2),
                    "{kind:?} {how:?}"
                );
            }
            if let Some(other) = other {
                ctl.release("other");
                assert_eq!(
                    resolve(other, "the other request"),
                    Ok(7),
                    "{kind:?} {how:?}"
                );
            }
            ctl.no_drop();
            assert_eq!(ctl.live(), 0);
            still_serves(&front);
        });
    }
}

#[test]
fn a_cancel_after_completion_changes_nothing() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let mut t = front.spawn_eval::<i64>("park('c'); return 5");
        ctl.wait_parked("c");
        ctl.release("c");
        let token = t.cancel_token().clone();
        let r = within("resolves", move || {
            let r = t.wait_timeout(PATIENCE);
            (r, t)
        });
        let (r, t) = r;
        assert_eq!(r, Some(Ok(5)), "{kind:?}");
        token.cancel();
        t.cancel();
        assert!(t.is_finished());
        ctl.no_drop();
        still_serves(&front);
    });
}

#[test]
fn graceful_shutdown_waits_for_suspended_requests() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let a = front.spawn_eval::<i64>("park('a'); return 1");
        ctl.wait_parked("a");
        // On a session, waits behind `a`; elsewhere, runs at once.
        let b = front.spawn_eval::<i64>("return 2");
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let f = front.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(f.shutdown());
        });
        eventually("shutdown began", || front.is_closed());
        // New work is refused...
        assert_eq!(front.eval::<i64>("return 3"), Err(IsleError::Shutdown));
        // ... but `a` is not stopped, and shutdown waits for it.
        assert!(
            !a.is_finished(),
            "{kind:?}: shutdown resolved a suspended request"
        );
        assert!(
            done_rx.try_recv().is_err(),
            "{kind:?}: shutdown did not wait"
        );
        ctl.release("a");
        assert_eq!(resolve(a, "a"), Ok(1), "{kind:?}");
        assert_eq!(resolve(b, "b"), Ok(2), "{kind:?}");
        assert_eq!(
            done_rx.recv_timeout(PATIENCE).expect("shutdown returns"),
            Ok(()),
            "{kind:?}"
        );
        ctl.no_drop();
        assert_eq!(ctl.live(), 0);
    });
}

#[test]
fn shutdown_timeout_stops_suspended_requests() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let a = front.spawn_eval::<i64>("park('a'); return 1");
        ctl.wait_parked("a");
        let b = front.spawn_eval::<i64>("return 2");
        let c = front.spawn_eval_keyed::<i64>(9, "park('c'); return 3");
        ctl.wait_parked("c");
        let f = front.clone();
        let r = within("shutdown_timeout returns", move || {
            f.shutdown_timeout(Duration::from_millis(30))
        });
        assert_eq!(r, Ok(()), "{kind:?}");
        for (t, what) in [(a, "a"), (c, "c")] {
            let r = resolve(t, what);
            assert!(
                matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
                "{kind:?} {what}: {r:?}"
            );
        }
        let r = resolve(b, "b");
        match kind {
            // Waited behind `a`: never ran.
            Kind::Session => assert_eq!(r, Err(IsleError::Shutdown), "{kind:?}"),
            _ => assert_eq!(r, Ok(2), "{kind:?}"),
        }
        ctl.wait_dropped("a");
        ctl.wait_dropped("c");
        assert_eq!(ctl.live(), 0);
        assert_eq!(front.eval::<i64>("return 1"), Err(IsleError::Shutdown));
    });
}

#[test]
fn dropping_the_front_stops_suspended_requests() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let a = front.spawn_eval::<i64>("park('a'); return 1");
        ctl.wait_parked("a");
        let b = front.spawn_eval_keyed::<i64>(3, "park('b'); return 1");
        ctl.wait_parked("b");
        within("dropping the front returns", move || drop(front));
        for (t, what) in [(a, "a"), (b, "b")] {
            let r = resolve(t, what);
            assert!(
                matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
                "{kind:?} {what}: {r:?}"
            );
        }
        ctl.wait_dropped("a");
        ctl.wait_dropped("b");
        assert_eq!(ctl.live(), 0);
    });
}

#[test]
fn spawn_exec_async_futures_are_dropped_on_cancel() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let h = hub.clone();
        let t = front.spawn_exec_async(move |_lua| async move {
            h.park("x".into()).await?;
            Ok(1)
        });
        ctl.wait_parked("x");
        t.cancel();
        assert_eq!(
            resolve(t, "cancelled"),
            Err(IsleError::Cancelled),
            "{kind:?}"
        );
        ctl.wait_dropped("x");
        still_serves(&front);
    });
}

// ---------------------------------------------------------------------------
// `<close>` variables of a stopped suspended request (Lua 5.4, 5.5).
// ---------------------------------------------------------------------------

#[cfg(any(feature = "lua54", feature = "lua55"))]
#[test]
fn close_handlers_of_a_cancelled_suspended_request_run() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let t = front.spawn_eval::<()>(
            "local x <close> = setmetatable({ name = 'x' }, { __close = record })
             park('c')",
        );
        ctl.wait_parked("c");
        t.cancel();
        assert_eq!(
            resolve(t, "cancelled"),
            Err(IsleError::Cancelled),
            "{kind:?}"
        );
        ctl.wait_note("x");
        ctl.wait_dropped("c");
        assert_eq!(
            front.eval::<String>("return closed.name"),
            Ok("x".into()),
            "{kind:?}"
        );
        // Nested functions' handlers too, innermost first; and through a
        // time limit.
        let t = front
            .spawn_eval::<()>(
                "local a <close> = setmetatable({ name = 'outer' }, { __close = record })
                 local function inner()
                   local b <close> = setmetatable({ name = 'inner' }, { __close = record })
                   park('d')
                 end
                 inner()",
            )
            .timeout(Duration::from_millis(30));
        ctl.wait_parked("d");
        assert_eq!(resolve(t, "timed out"), Err(IsleError::Timeout), "{kind:?}");
        ctl.wait_note("inner");
        ctl.wait_note("outer");
        ctl.wait_dropped("d");
        still_serves(&front);
    });
}

#[cfg(any(feature = "lua54", feature = "lua55"))]
#[test]
fn a_close_handler_that_loops_forever_is_stopped() {
    // A child process: a handler that is not stopped spins a core forever.
    common::in_child("a_close_handler_that_loops_forever_is_stopped", || {
        each_kind(|kind| {
            let (ctl, hub) = hub();
            let front = front!(kind, hub);
            let other = front.spawn_eval_keyed::<i64>(5, "park('o'); return 5");
            ctl.wait_parked("o");
            // Closed in reverse order: the loop first, then `after`, which
            // runs only if the loop was stopped.
            const LOOPING: &str =
                "local a <close> = setmetatable({ name = 'after' }, { __close = record })
                 local x <close> = setmetatable({}, { __close = function() while true do end end })
                 park('KEY')";
            let t = front.spawn_eval::<()>(&LOOPING.replace("KEY", "c"));
            ctl.wait_parked("c");
            t.cancel();
            assert_eq!(
                resolve(t, "cancelled"),
                Err(IsleError::Cancelled),
                "{kind:?}"
            );
            ctl.wait_note("after");
            ctl.wait_dropped("c");
            // The VM serves again, and the other suspended request is
            // still there.
            still_serves_quick(&front);
            ctl.release("o");
            assert_eq!(resolve(other, "other"), Ok(5), "{kind:?}");
            // The same through shutdown_timeout.
            let t = front.spawn_eval::<()>(&LOOPING.replace("KEY", "s"));
            ctl.wait_parked("s");
            let f = front.clone();
            assert_eq!(
                within("shutdown_timeout", move || {
                    f.shutdown_timeout(Duration::from_millis(20))
                }),
                Ok(()),
                "{kind:?}"
            );
            let r = resolve(t, "stopped by shutdown");
            assert!(
                matches!(r, Err(IsleError::Shutdown | IsleError::Cancelled)),
                "{kind:?} {r:?}"
            );
            ctl.wait_note("after");
            ctl.wait_dropped("s");
        });
    });
}

#[cfg(any(feature = "lua54", feature = "lua55"))]
fn still_serves_quick(front: &F) {
    assert_eq!(front.eval::<i64>("return 1 + 1"), Ok(2));
}

// ---------------------------------------------------------------------------
// Panics.
// ---------------------------------------------------------------------------

#[test]
fn a_panic_in_an_async_function_is_reported_and_the_vm_keeps_serving() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let other = front.spawn_eval_keyed::<i64>(4, "park('o'); return 4");
        ctl.wait_parked("o");
        // At the first poll.
        let r = front.eval::<()>("boom('boom now')");
        assert!(
            matches!(&r, Err(IsleError::Panic(m)) if m.contains("boom now")),
            "{kind:?} {r:?}"
        );
        // After an await.
        let t = front.spawn_eval::<()>("park('p'); boom('boom later')");
        ctl.wait_parked("p");
        ctl.release("p");
        let r = resolve(t, "panics");
        assert!(
            matches!(&r, Err(IsleError::Panic(m)) if m.contains("boom later")),
            "{kind:?} {r:?}"
        );
        // In a spawn_exec_async future, after an await.
        let h = hub.clone();
        let t = front.spawn_exec_async(move |_| async move {
            h.park("q".into()).await?;
            if true {
                panic!("boom in exec");
            }
            Ok(())
        });
        ctl.wait_parked("q");
        ctl.release("q");
        let r = resolve(t, "panics");
        assert!(
            matches!(&r, Err(IsleError::Panic(m)) if m.contains("boom in exec")),
            "{kind:?} {r:?}"
        );
        // The other suspended request is unharmed.
        ctl.release("o");
        assert_eq!(resolve(other, "other"), Ok(4), "{kind:?}");
        still_serves(&front);
    });
}

// ---------------------------------------------------------------------------
// current_token inside async functions.
// ---------------------------------------------------------------------------

#[test]
fn current_token_in_an_async_function_is_the_calling_requests() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let (report_tx, report_rx) = crossbeam_channel::unbounded::<(String, bool, bool)>();
        let h = hub.clone();
        let front = front!(
            kind,
            hub.with_init(move |lua| {
                let h = h.clone();
                let report = report_tx.clone();
                let probe = lua.create_async_function(move |lua, name: String| {
                    let (h, report) = (h.clone(), report.clone());
                    async move {
                        let before = current_token(&lua).expect("a token before the await");
                        h.park(format!("{name}1")).await?;
                        let after = current_token(&lua).expect("a token after the await");
                        // Reports when this future is dropped or finishes.
                        struct Report(
                            String,
                            mlua_isle::CancelToken,
                            mlua_isle::CancelToken,
                            Sender<(String, bool, bool)>,
                        );
                        impl Drop for Report {
                            fn drop(&mut self) {
                                let _ = self.3.send((
                                    self.0.clone(),
                                    self.1.is_cancelled(),
                                    self.2.is_cancelled(),
                                ));
                            }
                        }
                        let _report = Report(name.clone(), before, after, report);
                        h.park(format!("{name}2")).await?;
                        Ok(current_token(&lua)
                            .expect("a token at the end")
                            .is_cancelled())
                    }
                })?;
                lua.globals().set("probe", probe)
            })
        );
        let a = front.spawn_eval_keyed::<bool>(1, "return probe('a')");
        let d = front.spawn_eval_keyed::<bool>(2, "return probe('d')");
        ctl.wait_parked("a1");
        ctl.wait_parked("d1");
        // Another request runs between: the token must not be its.
        assert_eq!(front.eval::<i64>("return 1"), Ok(1));
        ctl.release("a1");
        ctl.wait_parked("a2");
        ctl.release("d1");
        ctl.wait_parked("d2");
        a.cancel();
        assert_eq!(resolve(a, "a"), Err(IsleError::Cancelled), "{kind:?}");
        let (name, before, after) = report_rx.recv_timeout(PATIENCE).expect("a's report");
        assert_eq!(
            (name.as_str(), before, after),
            ("a", true, true),
            "{kind:?}"
        );
        // d's tokens are its own: not cancelled.
        ctl.release("d2");
        assert_eq!(resolve(d, "d"), Ok(false), "{kind:?}");
        let (name, before, after) = report_rx.recv_timeout(PATIENCE).expect("d's report");
        assert_eq!(
            (name.as_str(), before, after),
            ("d", false, false),
            "{kind:?}"
        );
    });
}

#[test]
fn an_async_function_can_poll_its_token_and_give_up() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        // A future that checks the token each time it is polled, woken by
        // the test's "tick"s.
        let t = front.spawn_exec_async(|lua| async move {
            let token = current_token(&lua).expect("a token");
            let mut n = 0;
            loop {
                common::yield_once().await;
                n += 1;
                if token.is_cancelled() || n > 1_000_000_000 {
                    return Ok(n);
                }
                if n == 1 {
                    // Let the test see that it runs.
                    lua.globals()
                        .get::<mlua::Function>("note")?
                        .call::<()>("spinning")?;
                }
            }
        });
        ctl.wait_note("spinning");
        t.cancel();
        // The caller is told `Cancelled`, unless the future, seeing the
        // token, returned its value before the stopper resolved the
        // request: a value the work produced without being interrupted
        // stands, as for a request that is not suspended.
        match resolve(t, "cancelled") {
            Err(IsleError::Cancelled) => {}
            Ok(n) => assert!(n < 1_000_000_000, "{kind:?}: it never saw the token"),
            other => panic!("{kind:?}: {other:?}"),
        }
        still_serves(&front);
    });
}

// ---------------------------------------------------------------------------
// Sessions across awaits.
// ---------------------------------------------------------------------------

#[test]
fn a_session_runs_its_requests_in_order_across_awaits() {
    let (ctl, hub) = hub();
    let init = hub.clone();
    let pool = IslePool::builder()
        .workers(1)
        .init(move |lua| init.install(lua))
        .build()
        .unwrap();
    let s = pool.session("s");
    let first = s.spawn_eval::<i64>("x = 1; park('s1'); x = 2; return x");
    ctl.wait_parked("s1");
    let second = s.spawn_eval::<i64>("note('second'); return x");
    let third = s.spawn_eval::<i64>("x = x + 10; return x");
    // Another session and unkeyed work on the same (only) VM proceed,
    // suspended or not; submitted after `second`, so the VM has seen it.
    let o = pool.session("o");
    let other = o.spawn_eval::<i64>("x = 100; park('o1'); return x");
    ctl.wait_parked("o1");
    assert_eq!(
        resolve(pool.spawn_eval::<i64>("return 5"), "unkeyed"),
        Ok(5)
    );
    assert_eq!(
        resolve(pool.session("p").spawn_eval::<i64>("return 6"), "p"),
        Ok(6)
    );
    ctl.release("o1");
    assert_eq!(resolve(other, "other session"), Ok(100));
    // The session's later requests have not started.
    ctl.no_note();
    assert!(!second.is_finished() && !third.is_finished());
    ctl.release("s1");
    assert_eq!(resolve(first, "first"), Ok(2));
    ctl.wait_note("second");
    assert_eq!(resolve(second, "second"), Ok(2));
    assert_eq!(resolve(third, "third"), Ok(12));
    // Isolation held: the other session's x is its own.
    assert_eq!(resolve(o.spawn_eval::<i64>("return x"), "o"), Ok(100));
    assert_eq!(
        resolve(pool.spawn_eval::<Option<i64>>("return x"), "unkeyed"),
        Ok(None)
    );
}

#[test]
fn a_session_chain_of_suspending_requests_stays_in_order() {
    let (ctl, hub) = hub();
    let init = hub.clone();
    let pool = IslePool::builder()
        .workers(2)
        .init(move |lua| init.install(lua))
        .build()
        .unwrap();
    let s = pool.session(42);
    let tasks: Vec<Task<i64>> = (0..20)
        .map(|i| {
            s.spawn_eval(format!(
                "log = {i}; park('c{i}'); seen = (seen or '') .. '{i},'; return log"
            ))
        })
        .collect();
    for i in 0..20 {
        ctl.wait_parked(&format!("c{i}"));
        // The next has not started: only one parked at a time.
        assert!(
            ctl.parked.try_recv().is_err(),
            "two requests of a session ran at once"
        );
        ctl.release(&format!("c{i}"));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(resolve(t, "chain"), Ok(i as i64));
    }
    let seen: String = (0..20).map(|i| format!("{i},")).collect();
    assert_eq!(
        resolve(s.spawn_eval::<String>("return seen"), "seen"),
        Ok(seen)
    );
}

#[test]
fn a_cancelled_suspended_session_request_lets_the_next_run() {
    let (ctl, hub) = hub();
    let init = hub.clone();
    let pool = IslePool::builder()
        .workers(1)
        .init(move |lua| init.install(lua))
        .build()
        .unwrap();
    let s = pool.session("s");
    let first = s.spawn_eval::<()>("x = 1; park('s1'); x = 2");
    ctl.wait_parked("s1");
    let second = s.spawn_eval::<i64>("return x");
    first.cancel();
    assert_eq!(resolve(first, "first"), Err(IsleError::Cancelled));
    ctl.wait_dropped("s1");
    assert_eq!(resolve(second, "second"), Ok(1));
    // close_session while a request is suspended: it waits for it.
    let third = s.spawn_eval::<i64>("park('s3'); return x");
    ctl.wait_parked("s3");
    assert!(pool.close_session("s"));
    ctl.release("s3");
    assert_eq!(resolve(third, "third"), Ok(1));
    // A fresh session under the key.
    assert_eq!(
        resolve(s.spawn_eval::<Option<i64>>("return x"), "fresh"),
        Ok(None)
    );
}

// ---------------------------------------------------------------------------
// Exactly once under a storm.
// ---------------------------------------------------------------------------

enum Wake {
    Fire(oneshot::Sender<()>),
    Quit,
}

#[test]
fn storm_of_suspending_requests_and_random_cancels_resolves_each_exactly_once() {
    each_kind(|kind| storm(kind, 4, 120));
}

fn storm(kind: Kind, submitters: usize, per: usize) {
    let (ctl, hub) = hub();
    let (wake_tx, wake_rx) = crossbeam_channel::unbounded::<Wake>();
    let live = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let (w, l, m) = (wake_tx.clone(), live.clone(), made.clone());
    let front = front!(
        kind,
        hub.with_init(move |lua| {
            let (w, l, m) = (w.clone(), l.clone(), m.clone());
            // nap(n): waits for a waker thread, then gives n.
            let nap = lua.create_async_function(move |_, n: i64| {
                let (w, l, m) = (w.clone(), l.clone(), m.clone());
                async move {
                    struct Live(Arc<AtomicUsize>);
                    impl Drop for Live {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    l.fetch_add(1, Ordering::SeqCst);
                    m.fetch_add(1, Ordering::SeqCst);
                    let _live = Live(l);
                    let (tx, rx) = oneshot::channel();
                    let _ = w.send(Wake::Fire(tx));
                    let _ = rx.await;
                    Ok(n)
                }
            })?;
            lua.globals().set("nap", nap)
        })
    );
    // Wakers: other threads, in random order-ish, with random delays made
    // of yields (no sleeps).
    let wakers: Vec<_> = (0..2)
        .map(|k| {
            let rx = wake_rx.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + k);
                let mut held = Vec::new();
                while let Ok(msg) = rx.recv() {
                    match msg {
                        Wake::Fire(tx) => held.push(tx),
                        Wake::Quit => break,
                    }
                    // Fire some of what we hold, not always in order.
                    while !held.is_empty() && !rng.next().is_multiple_of(3) {
                        let i = (rng.next() as usize) % held.len();
                        let tx = held.swap_remove(i);
                        for _ in 0..rng.next() % 20 {
                            std::thread::yield_now();
                        }
                        let _ = tx.send(());
                    }
                    if rx.is_empty() {
                        for tx in held.drain(..) {
                            let _ = tx.send(());
                        }
                    }
                }
                for tx in held {
                    let _ = tx.send(());
                }
            })
        })
        .collect();
    let (cancel_tx, cancel_rx) = crossbeam_channel::unbounded::<Option<mlua_isle::CancelToken>>();
    let canceller = std::thread::spawn(move || {
        let mut rng = Rng::new(7);
        let mut held = Vec::new();
        while let Ok(Some(token)) = cancel_rx.recv() {
            held.push(token);
            while !held.is_empty() && rng.next().is_multiple_of(2) {
                let i = (rng.next() as usize) % held.len();
                let token = held.swap_remove(i);
                for _ in 0..rng.next() % 50 {
                    std::thread::yield_now();
                }
                token.cancel();
            }
        }
        for t in held {
            t.cancel();
        }
    });
    let results = Arc::new(Mutex::new([0usize; 4])); // ok, cancelled, timeout, other
    let threads: Vec<_> = (0..submitters)
        .map(|s| {
            let (front, cancel_tx, results) = (front.clone(), cancel_tx.clone(), results.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(s as u64 + 1);
                let mut tasks = Vec::new();
                for i in 0..per {
                    let n = (s * per + i) as i64;
                    let code = match rng.next() % 3 {
                        0 => format!("return nap({n})"),
                        1 => format!("local a = nap({n}); local b = nap(0); return a + b"),
                        _ => format!("return {n}"),
                    };
                    let task: Task<i64> = if kind == Kind::Session {
                        front.spawn_eval_keyed((rng.next() % 8) as usize, &code)
                    } else {
                        front.spawn_eval(&code)
                    };
                    let task = match rng.next() % 6 {
                        0 => task.timeout(Duration::from_micros(rng.next() % 300)),
                        1 | 2 => {
                            let _ = cancel_tx.send(Some(task.cancel_token().clone()));
                            task
                        }
                        _ => task,
                    };
                    tasks.push((n, task));
                }
                for (n, mut task) in tasks {
                    let r = task.wait_timeout(PATIENCE).expect("a storm task hung");
                    assert!(task.try_result().is_none(), "resolved twice");
                    let mut res = results.lock();
                    match r {
                        Ok(v) => {
                            assert_eq!(v, n);
                            res[0] += 1;
                        }
                        Err(IsleError::Cancelled) => res[1] += 1,
                        Err(IsleError::Timeout) => res[2] += 1,
                        Err(e) => panic!("unexpected: {e:?}"),
                    }
                }
            })
        })
        .collect();
    within("the storm's submitters finish", move || {
        for t in threads {
            t.join().expect("a submitter failed");
        }
    });
    let _ = cancel_tx.send(None);
    within("the canceller finishes", move || canceller.join().unwrap());
    let res = *results.lock();
    eprintln!(
        "    storm {kind:?}: ok {}, cancelled {}, timeout {}",
        res[0], res[1], res[2]
    );
    assert_eq!(res.iter().sum::<usize>(), submitters * per);
    assert!(res[0] > 0);
    // Every future made was dropped: none leaked in a suspended slot.
    eventually("every nap future dropped", || {
        live.load(Ordering::SeqCst) == 0
    });
    assert!(made.load(Ordering::SeqCst) > 0);
    // Still works.
    assert_eq!(front.eval::<i64>("return nap(3) + 1"), Ok(4));
    still_serves(&front);
    drop(ctl);
    for _ in &wakers {
        let _ = wake_tx.send(Wake::Quit);
    }
    within("the wakers finish", move || {
        for w in wakers {
            w.join().unwrap();
        }
    });
}

// ---------------------------------------------------------------------------
// Wakers: plain threads (the hub), and tokio.
// ---------------------------------------------------------------------------

#[test]
fn a_plain_thread_wakes_a_suspended_request_without_any_runtime() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let t = front.spawn_eval::<String>("park('w'); return 'woken'");
        ctl.wait_parked("w");
        std::thread::scope(|s| {
            s.spawn(|| ctl.release("w"));
        });
        assert_eq!(resolve(t, "woken"), Ok("woken".into()), "{kind:?}");
    });
}

#[cfg(feature = "tokio")]
mod tokio_wakers {
    use super::*;

    fn tokio_init(lua: &Lua) -> mlua::Result<()> {
        let f = lua.create_async_function(|_, ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ms)
        })?;
        lua.globals().set("tsleep", f)
    }

    fn tokio_fronts(handle: Option<tokio::runtime::Handle>) -> Vec<F> {
        let mut fronts = Vec::new();
        for kind in common::front::KINDS {
            let front = match (kind, handle.clone()) {
                (Kind::Isle, None) => F::Isle(Isle::builder().init(tokio_init).build().unwrap()),
                (Kind::Isle, Some(h)) => F::Isle(
                    Isle::builder()
                        .tokio_handle(h)
                        .init(tokio_init)
                        .build()
                        .unwrap(),
                ),
                (kind, h) => {
                    let mut b = IslePool::builder().workers(1).init(tokio_init);
                    if let Some(h) = h {
                        b = b.tokio_handle(h);
                    }
                    let pool = b.build().unwrap();
                    if kind == Kind::Pool {
                        F::Pool(pool)
                    } else {
                        let s = pool.session("t");
                        F::Session(pool, s)
                    }
                }
            };
            fronts.push(front);
        }
        fronts
    }

    async fn sleep_many(front: &F) {
        // 20 timers at once on one VM, awaited from tokio.
        let tasks: Vec<Task<u64>> = (0..20)
            .map(|i| front.spawn_eval_keyed(i, "return tsleep(5)"))
            .collect();
        for t in tasks {
            assert_eq!(t.await, Ok(5), "{:?}", front.kind());
        }
        // A spawn_exec_async future using tokio directly.
        let t = front.spawn_exec_async(|_| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(9)
        });
        assert_eq!(t.await, Ok(9));
        // A timer that never fires, cancelled: its future is dropped.
        let t = front.spawn_eval::<u64>("return tsleep(3600 * 1000)");
        let token = t.cancel_token().clone();
        token.cancel();
        assert_eq!(t.await, Err(IsleError::Cancelled));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokio_sleep_in_the_runtime_the_builder_runs_in() {
        let fronts = tokio::task::block_in_place(|| tokio_fronts(None));
        for front in &fronts {
            tokio::time::timeout(PATIENCE, sleep_many(front))
                .await
                .expect("hung");
        }
        tokio::task::block_in_place(move || drop(fronts));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tokio_sleep_on_a_current_thread_runtime_awaiting_the_tasks() {
        // The timers are driven by this very thread while it awaits.
        let fronts = tokio_fronts(None);
        for front in &fronts {
            tokio::time::timeout(PATIENCE, sleep_many(front))
                .await
                .expect("hung");
        }
    }

    #[test]
    fn tokio_sleep_with_an_explicit_handle() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        for front in tokio_fronts(Some(rt.handle().clone())) {
            // Waited for by a plain thread: the runtime's own threads
            // drive the timers.
            let tasks: Vec<Task<u64>> = (0..20)
                .map(|i| front.spawn_eval_keyed(i, "return tsleep(5)"))
                .collect();
            for t in tasks {
                assert_eq!(resolve(t, "tsleep"), Ok(5), "{:?}", front.kind());
            }
            // Blocking waits and `.await` from a runtime mix.
            let t = front.spawn_eval::<u64>("return tsleep(2)");
            assert_eq!(rt.block_on(t), Ok(2));
            let t = front
                .spawn_eval::<u64>("return tsleep(3600 * 1000)")
                .timeout(Duration::from_millis(20));
            assert_eq!(resolve(t, "timeout"), Err(IsleError::Timeout));
            still_serves(&front);
        }
    }
}

// ---------------------------------------------------------------------------
// max_suspended.
// ---------------------------------------------------------------------------

#[test]
fn at_max_suspended_the_vm_takes_no_new_work() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub, .max_suspended(2));
        let a = front.spawn_eval_keyed::<i64>(1, "park('a'); return 1");
        let b = front.spawn_eval_keyed::<i64>(2, "park('b'); return 2");
        ctl.wait_parked("a");
        ctl.wait_parked("b");
        if front.pool().is_some() {
            eventually("two suspended", || front.suspended() == Some(2));
        }
        let c = front.spawn_eval_keyed::<i64>(3, "note('c'); return 3");
        if let Some(pool) = front.pool() {
            eventually("c is queued", || {
                let m = pool.metrics();
                m.unkeyed_queued + m.workers[0].queued == 1
            });
        }
        ctl.no_note();
        assert!(!c.is_finished(), "{kind:?}: ran beyond max_suspended");
        ctl.release("a");
        ctl.wait_note("c");
        assert_eq!(resolve(a, "a"), Ok(1), "{kind:?}");
        assert_eq!(resolve(c, "c"), Ok(3), "{kind:?}");
        if front.pool().is_some() {
            eventually("one suspended", || front.suspended() == Some(1));
        }
        ctl.release("b");
        assert_eq!(resolve(b, "b"), Ok(2), "{kind:?}");
        still_serves(&front);
    });
}

#[test]
fn at_max_suspended_a_cancel_makes_room() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub, .max_suspended(1));
        let a = front.spawn_eval_keyed::<i64>(1, "park('a'); return 1");
        ctl.wait_parked("a");
        let c = front.spawn_eval_keyed::<i64>(3, "note('c'); return 3");
        a.cancel();
        assert_eq!(resolve(a, "a"), Err(IsleError::Cancelled), "{kind:?}");
        ctl.wait_note("c");
        assert_eq!(resolve(c, "c"), Ok(3), "{kind:?}");
        ctl.wait_dropped("a");
        still_serves(&front);
    });
}

#[test]
fn metrics_count_suspended_requests_per_worker() {
    let (ctl, hub) = hub();
    let init = hub.clone();
    let pool = IslePool::builder()
        .workers(2)
        .init(move |lua| init.install(lua))
        .build()
        .unwrap();
    // Sessions are bound to the least loaded VM: spread over both.
    let tasks: Vec<Task<()>> = (0..6)
        .map(|i| pool.session(i).spawn_eval(format!("park('m{i}')")))
        .collect();
    for i in 0..6 {
        ctl.wait_parked(&format!("m{i}"));
    }
    eventually("six suspended in all", || {
        pool.metrics()
            .workers
            .iter()
            .map(|w| w.suspended)
            .sum::<usize>()
            == 6
    });
    for i in 0..6 {
        ctl.release(&format!("m{i}"));
    }
    for t in tasks {
        assert_eq!(resolve(t, "m"), Ok(()));
    }
    eventually("none suspended", || {
        pool.metrics().workers.iter().all(|w| w.suspended == 0)
    });
    let m = pool.metrics();
    assert!(
        m.workers.iter().map(|w| w.completed).sum::<u64>() >= 6,
        "{m:?}"
    );
}

// ---------------------------------------------------------------------------
// Limits and the sandbox across awaits.
// ---------------------------------------------------------------------------

#[test]
fn memory_limit_applies_after_an_await() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub, .memory_limit(16 << 20));
        let t = front
            .spawn_eval::<()>("park('m'); local s = string.rep('x', 64 * 1024 * 1024); return #s");
        ctl.wait_parked("m");
        ctl.release("m");
        let r = resolve(t, "out of memory");
        assert!(
            matches!(r, Err(IsleError::MemoryLimit(_))),
            "{kind:?} {r:?}"
        );
        still_serves(&front);
    });
}

#[cfg(not(feature = "luau"))]
#[test]
fn max_instructions_applies_after_an_await() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub, .max_instructions(200_000));
        let t = front.spawn_eval::<()>("park('i'); while true do end");
        ctl.wait_parked("i");
        ctl.release("i");
        let r = resolve(t, "over budget");
        assert!(
            matches!(r, Err(IsleError::InstructionLimit)),
            "{kind:?} {r:?}"
        );
        // The budget is per request, counted across its awaits: a request
        // spending well under its budget between each of many awaits (50
        // times ~20,000 instructions) runs out.
        let t = front.spawn_eval::<()>("for i = 1, 50 do for _ = 1, 10000 do end yield_once() end");
        let r = resolve(t, "over budget across awaits");
        assert!(
            matches!(r, Err(IsleError::InstructionLimit)),
            "{kind:?} {r:?}"
        );
        // A request within budget is fine, whatever ran before.
        assert_eq!(
            front.eval::<i64>("yield_once(); local n = 0 for i = 1, 100 do n = n + i end return n"),
            Ok(5050)
        );
        still_serves(&front);
    });
}

#[test]
fn the_sandbox_applies_after_an_await() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub, .sandbox(true));
        let t = front.spawn_eval::<()>("park('s'); io.write('x')");
        ctl.wait_parked("s");
        ctl.release("s");
        match resolve(t, "sandboxed") {
            Err(IsleError::Lua(e)) => {
                assert!(e.message().contains("not available"), "{kind:?} {e}")
            }
            r => panic!("{kind:?}: {r:?}"),
        }
        let t = front.spawn_eval::<()>("park('t'); string.upper = nil");
        ctl.wait_parked("t");
        ctl.release("t");
        let r = resolve(t, "read-only");
        assert!(matches!(r, Err(IsleError::Lua(_))), "{kind:?} {r:?}");
        assert_eq!(
            front.eval::<String>("return string.upper('a')"),
            Ok("A".into())
        );
        still_serves(&front);
    });
}

// ---------------------------------------------------------------------------
// spawn_exec_async on every front; pcall across an await.
// ---------------------------------------------------------------------------

#[test]
fn spawn_exec_async_on_every_front() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        front.eval::<()>("greeting = 'hi'").unwrap();
        let h = hub.clone();
        let t = front.spawn_exec_async(move |lua| async move {
            h.park("e".into()).await?;
            // After the await: the VM's state, and Lua evaluated async.
            let greeting: String = lua.load("return greeting").eval()?;
            let n = lua.load("return 6 * 7").eval_async::<i64>().await?;
            Ok(format!("{greeting} {n}"))
        });
        ctl.wait_parked("e");
        ctl.release("e");
        let want = match kind {
            // A session's globals are its own: `eval` wrote there, and a
            // chunk loaded by the closure sees the VM's globals.
            Kind::Session => None,
            _ => Some("hi 42".to_string()),
        };
        match (resolve(t, "exec async"), want) {
            (Ok(got), Some(want)) => assert_eq!(got, want, "{kind:?}"),
            (Err(IsleError::Lua(_)), None) => {}
            (r, _) => panic!("{kind:?}: {r:?}"),
        }
        // Awaiting a Lua function that itself suspends.
        let t = front.spawn_exec_async(|lua| async move {
            let f: mlua::Function = lua
                .load("function(k) park(k) return 'done ' .. k end")
                .eval()?;
            f.call_async::<String>("lf").await
        });
        ctl.wait_parked("lf");
        ctl.release("lf");
        assert_eq!(resolve(t, "call_async"), Ok("done lf".into()), "{kind:?}");
        // An error from the future is a Lua error.
        let t = front.spawn_exec_async(|_| async { Err::<(), _>(mlua::Error::runtime("nope")) });
        assert!(
            matches!(resolve(t, "error"), Err(IsleError::Lua(e)) if e.message().contains("nope"))
        );
        still_serves(&front);
    });
}

#[test]
fn a_sessions_spawn_exec_async_sees_its_env() {
    let (ctl, hub) = hub();
    let init = hub.clone();
    let pool = IslePool::builder()
        .workers(1)
        .init(move |lua| {
            init.install(lua)?;
            lua.globals().set("shared", 1)
        })
        .build()
        .unwrap();
    let s = pool.session("env");
    resolve(s.spawn_eval::<()>("mine = 5"), "set").unwrap();
    let h = hub.clone();
    let t = s.spawn_exec_async(move |_lua, env| async move {
        let before: i64 = env.get("mine")?;
        h.park("env".into()).await?;
        let shared: i64 = env.get("shared")?;
        env.set("written", before + shared)?;
        Ok(before)
    });
    ctl.wait_parked("env");
    // The next request of the session waits behind it.
    let next = s.spawn_eval::<i64>("return written");
    // Other sessions and unkeyed work don't see it.
    assert_eq!(
        resolve(
            pool.session("x").spawn_eval::<Option<i64>>("return mine"),
            "x"
        ),
        Ok(None)
    );
    ctl.release("env");
    assert_eq!(resolve(t, "env"), Ok(5));
    assert_eq!(resolve(next, "next"), Ok(6));
    assert_eq!(
        resolve(pool.spawn_eval::<Option<i64>>("return written"), "unkeyed"),
        Ok(None)
    );
}

#[cfg(not(feature = "lua51"))]
#[test]
fn an_await_inside_pcall_suspends_and_resumes() {
    each_kind(|kind| {
        let (ctl, hub) = hub();
        let front = front!(kind, hub);
        let t = front.spawn_eval::<i64>(
            "local ok, v = pcall(function() park('q'); return 5 end) assert(ok, v) return v",
        );
        ctl.wait_parked("q");
        let meanwhile = front.spawn_eval_keyed::<i64>(9, "return 1");
        assert_eq!(resolve(meanwhile, "meanwhile"), Ok(1), "{kind:?}");
        ctl.release("q");
        assert_eq!(resolve(t, "pcall"), Ok(5), "{kind:?}");
        // A cancel is not swallowed by the pcall around the await.
        let t = front.spawn_eval::<i64>(
            "local ok = pcall(function() park('r') end) note('swallowed') return 1",
        );
        ctl.wait_parked("r");
        t.cancel();
        assert_eq!(
            resolve(t, "cancelled"),
            Err(IsleError::Cancelled),
            "{kind:?}"
        );
        ctl.wait_dropped("r");
        ctl.no_note();
        still_serves(&front);
    });
}

/// Lua 5.1's `pcall` is not yieldable: an async function that is pending
/// inside it fails the request (an error, not a hang), and the VM serves on.
#[cfg(feature = "lua51")]
#[test]
fn an_await_inside_pcall_on_lua51_fails_cleanly() {
    each_kind(|kind| {
        let (_ctl, hub) = hub();
        let front = front!(kind, hub);
        let r = front.eval::<bool>("local ok, e = pcall(yield_once) return ok");
        assert!(
            matches!(r, Ok(false) | Err(IsleError::Lua(_))),
            "{kind:?} {r:?}"
        );
        still_serves(&front);
    });
}

/// A session's request whose async code waits for room in its own
/// session's queue: the requests holding that room wait behind it, so the
/// wait would never end. It is refused `Reentrant` (as the blocking form
/// is), and the session's queued requests then run.
#[test]
fn a_session_request_waiting_for_room_in_its_own_session_is_refused() {
    within("reserve in its own session", || {
        let pool = mlua_isle::IslePool::builder()
            .workers(1)
            .session_queue_capacity(2)
            .build()
            .unwrap();
        let s = pool.session("tenant");
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let me = s.clone();
        let first = s.spawn_exec_async(move |_lua, _env| async move {
            let _ = go_rx.await;
            Ok(me.reserve().await.map(drop))
        });
        eventually("the first request suspended", || {
            pool.metrics().workers[0].suspended == 1
        });
        // The session's queue fills behind it.
        let second = s.spawn_eval::<i64>("return 2");
        let third = s.spawn_eval::<i64>("return 3");
        go_tx.send(()).unwrap();
        assert_eq!(first.wait(), Ok(Err(mlua_isle::IsleError::Reentrant)));
        assert_eq!((second.wait(), third.wait()), (Ok(2), Ok(3)));
        // With room free it takes it, as anywhere.
        let me = s.clone();
        let got = s
            .spawn_exec_async(move |_lua, _env| async move { Ok(me.reserve().await.is_ok()) })
            .wait();
        assert_eq!(got, Ok(true));
        pool.shutdown().unwrap();
    });
}
