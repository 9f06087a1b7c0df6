//! Helpers shared by the integration tests: Lua callbacks the test controls
//! through channels (so a test knows "now" without sleeping), and thread
//! checks through `/proc`.
//!
//! Each test binary uses only some of them.
#![allow(dead_code)]

pub mod front;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mlua_isle::mlua::{self, Lua};

/// How long a test waits for something that should happen promptly before
/// it declares a hang. Generous: only a broken crate gets near it.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The test's side of a blocking Rust callback: it learns when the callback
/// has started, and decides when it may return.
pub struct Gate {
    started: Receiver<()>,
    release: Sender<()>,
}

/// The VM's side of a [`Gate`]: `block()` reports "started", then blocks
/// until the test releases it once.
#[derive(Clone)]
pub struct GateFn {
    started: Sender<()>,
    release: Receiver<()>,
}

pub fn gate() -> (Gate, GateFn) {
    let (started_tx, started_rx) = crossbeam_channel::unbounded();
    let (release_tx, release_rx) = crossbeam_channel::unbounded();
    (
        Gate {
            started: started_rx,
            release: release_tx,
        },
        GateFn {
            started: started_tx,
            release: release_rx,
        },
    )
}

impl Gate {
    /// Blocks until the callback has started (panics after [`PATIENCE`]).
    pub fn wait_started(&self) {
        self.started
            .recv_timeout(PATIENCE)
            .expect("the blocking callback never started");
    }

    /// Lets one blocked call return.
    pub fn release(&self) {
        self.release.send(()).expect("the callback side is gone");
    }
}

impl GateFn {
    /// Reports "started", then blocks until released. Call it from an
    /// `exec` closure, or register it as a Lua function with [`register`].
    pub fn block(&self) {
        let _ = self.started.send(());
        let _ = self.release.recv();
    }

    /// Registers `block()` as the global Lua function `name`.
    pub fn register(self, lua: &Lua, name: &str) -> mlua::Result<()> {
        let f = lua.create_function(move |_, ()| {
            self.block();
            Ok(())
        })?;
        lua.globals().set(name, f)
    }
}

/// Holds `pool`'s VM (any free one) with an unkeyed request until the gate
/// is released; returns once the request runs.
pub fn hold_pool(pool: &mlua_isle::IslePool) -> (Gate, mlua_isle::Task<()>) {
    let (g, block) = gate();
    let held = pool.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    g.wait_started();
    (g, held)
}

/// Holds the VM of `session` with a request of that session until the gate
/// is released; returns once the request runs.
pub fn hold_session(session: &mlua_isle::Session) -> (Gate, mlua_isle::Task<()>) {
    let (g, block) = gate();
    let held = session.spawn_exec(move |_, _| {
        block.block();
        Ok(())
    });
    g.wait_started();
    (g, held)
}

/// Registers the Lua function `name()`, which sends one message on `tx`, so
/// Lua code can say "I am running now".
pub fn register_signal(lua: &Lua, name: &str, tx: Sender<()>) -> mlua::Result<()> {
    let f = lua.create_function(move |_, ()| {
        let _ = tx.send(());
        Ok(())
    })?;
    lua.globals().set(name, f)
}

/// A flag the test raises and Lua reads through the global function
/// `name()`: Lua code can wait for it in a pure-Lua loop (which the hook can
/// interrupt), unlike a blocking Rust callback.
#[derive(Clone, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn register(&self, lua: &Lua, name: &str) -> mlua::Result<()> {
        let flag = self.0.clone();
        let f = lua.create_function(move |_, ()| Ok(flag.load(Ordering::SeqCst)))?;
        lua.globals().set(name, f)
    }
}

/// A script for stop tests: reports `started()`, spins until `released()`
/// says true, then runs a loop before its side effect, `finished = true`.
///
/// A stop requested before the release lands by the end of that loop at the
/// latest, on every backend, though not always at the very next
/// instruction: armed on demand, the hook is set by a signal that reaches
/// the VM thread microseconds after the stop; Luau's interrupt runs only at
/// calls, returns and loop back-edges (and the spin loop ends without one
/// once `released()` says true); a ticking hook runs every `hook_interval`
/// instructions. Ten million iterations take tens of milliseconds, so
/// `finished` is set only if the stop was missed.
pub const UNTIL_RELEASED: &str =
    "started(); while not released() do end; for _ = 1, 1e7 do end; finished = true";

/// An isle for [`UNTIL_RELEASED`]: its `started()` sends on the returned
/// channel, and its `released()` reads the returned flag.
pub fn releasable_isle() -> (mlua_isle::Isle, Flag, Receiver<()>) {
    let flag = Flag::default();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let lua_flag = flag.clone();
    let isle = mlua_isle::Isle::spawn(move |lua| {
        lua_flag.register(lua, "released")?;
        register_signal(lua, "started", started_tx)
    })
    .expect("the isle starts");
    (isle, flag, started)
}

/// A front of `kind` for [`UNTIL_RELEASED`], like [`releasable_isle`].
pub fn releasable_front(kind: front::Kind) -> (front::Front, Flag, Receiver<()>) {
    let flag = Flag::default();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let lua_flag = flag.clone();
    let front = front::fronts()
        .init(move |lua| {
            lua_flag.register(lua, "released")?;
            register_signal(lua, "started", started_tx.clone())
        })
        .build(kind);
    (front, flag, started)
}

/// Waits for a message on `rx`, failing the test after [`PATIENCE`].
pub fn expect_msg<T>(rx: &Receiver<T>, what: &str) -> T {
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

/// Polls `cond`, with a short backoff, until it holds; false if it still
/// does not after [`PATIENCE`]. Only for state no channel can report (a
/// thread leaving `/proc`, a counter a worker bumps after answering): a hang
/// detector, never a measure of time.
pub fn poll_until(mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + PATIENCE;
    let mut pause = Duration::from_micros(50);
    while !cond() {
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
    true
}

/// Polls `cond` until it holds (see [`poll_until`]); fails the test with
/// `what` if it does not within [`PATIENCE`].
pub fn eventually(what: &str, cond: impl FnMut() -> bool) {
    assert!(poll_until(cond), "never happened: {what}");
}

/// Runs `f` on a helper thread and returns its value, failing the test
/// (instead of hanging it) if `f` has not returned after [`PATIENCE`].
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(v) => v,
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => panic!("hung: {what}"),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            panic!("failed (see the panic above): {what}")
        }
    }
}

/// Names of this process's threads, from `/proc/self/task/*/comm` (Linux
/// keeps the first 15 bytes of a thread name).
pub fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task (Linux only)");
    for task in tasks.flatten() {
        // A thread can exit between read_dir and read: skip it.
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            names.push(comm.trim_end_matches('\n').to_string());
        }
    }
    names
}

/// True if a thread of this process is named exactly `name`.
pub fn thread_alive(name: &str) -> bool {
    assert!(name.len() <= 15, "Linux truncates thread names to 15 bytes");
    thread_names().iter().any(|n| n == name)
}

/// True once a thread is named `name`, false if none is after
/// [`PATIENCE`]. A new thread names itself after it starts, so a thread
/// that was just spawned may not carry its name yet.
pub fn thread_appears(name: &str) -> bool {
    poll_until(|| thread_alive(name))
}

/// True once no thread is named `name`, false if one still is after
/// [`PATIENCE`].
///
/// A joined thread can stay listed in `/proc` for a moment after `join`
/// returns (the kernel reaps it just after waking the joiner), and no channel
/// can report that, so this polls.
pub fn thread_gone(name: &str) -> bool {
    poll_until(|| !thread_alive(name))
}

/// The scheduler state (`R` running, `S` sleeping, ...) of the thread named
/// exactly `name`, from `/proc/self/task/*/stat`; `None` if there is none.
pub fn thread_state(name: &str) -> Option<char> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task (Linux only)");
    tasks.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim_end_matches('\n') != name {
            return None;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // `pid (comm) state ...`: the comm may hold spaces and parentheses.
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .next()?
            .chars()
            .next()
    })
}

/// True once every thread named in `names` is asleep in the kernel (state
/// `S`), as an idle pool worker is once it has parked; false if they are
/// not all asleep at once within [`PATIENCE`].
pub fn threads_asleep(names: &[String]) -> bool {
    poll_until(|| names.iter().all(|n| thread_state(n) == Some('S')))
}

/// The index `k` of the current pool worker thread, named `NAME-k`.
pub fn worker_index() -> usize {
    let name = std::thread::current()
        .name()
        .unwrap_or_default()
        .to_string();
    name.rsplit('-')
        .next()
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("not a pool worker thread: {name:?}"))
}

/// xorshift64*: a small deterministic RNG (no dependency needed).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Registers `wait_for_cancel()`: a Rust callback that sends one message on
/// `started`, then polls its request's token and gives up (with an error)
/// once it says stop, as the docs tell blocking callbacks to do.
pub fn register_wait_for_cancel(lua: &Lua, started: Sender<()>) -> mlua::Result<()> {
    let wait = lua.create_function(move |lua, ()| {
        let token = mlua_isle::current_token(lua).expect("called from a request");
        let _ = started.send(());
        while !token.is_cancelled() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Err::<(), _>(mlua::Error::runtime("gave up: cancelled"))
    })?;
    lua.globals().set("wait_for_cancel", wait)
}

/// Runs `body` in a child process that runs only the test `name` of this
/// binary: for tests that may kill the process (the child's stderr then
/// fails this test instead of the whole run dying), or whose VM may spin
/// forever in C code (a detached thread would take a core from every later
/// test). A child that has not finished after three times [`PATIENCE`] is
/// killed, and the test fails.
pub fn in_child(name: &str, body: impl FnOnce()) {
    const CHILD: &str = "MLUA_ISLE_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        body();
        return;
    }
    // The test's full name (`module::name` in a binary of modules): the
    // test harness names the thread running a test after it.
    let current = std::thread::current();
    let name = current
        .name()
        .filter(|full| full.ends_with(name))
        .unwrap_or(name);
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--include-ignored", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(3 * PATIENCE) else {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        panic!("hung: the child process running `{name}` was killed");
    };
    let out = out.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the child process running `{name}` failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the child process did not run `{name}`:\n{stdout}\n{stderr}"
    );
}

/// A future that is pending once (waking itself), then ready: a request
/// awaiting it suspends once, the VM serves others, then polls it again.
pub fn yield_once() -> YieldOnce {
    YieldOnce(false)
}

/// Sets the global `name` to an async function that awaits [`yield_once`]:
/// a request that calls it suspends once, then goes on.
#[cfg(feature = "async")]
pub fn set_yield_once(lua: &Lua, name: &str) -> mlua::Result<()> {
    let f = lua.create_async_function(|_, ()| async {
        yield_once().await;
        Ok(())
    })?;
    lua.globals().set(name, f)
}

/// See [`yield_once`].
pub struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}
