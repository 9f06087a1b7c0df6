//! Options shared by every VM an isle or pool starts.

use std::time::Duration;

use crate::IsleError;

/// An init closure that can run again: on every VM an isle or pool starts
/// (a pool's workers, recycled VMs, replacements of wedged ones).
pub(crate) type VmInit = dyn Fn(&mlua::Lua) -> mlua::Result<()> + Send + Sync;

/// Default instructions between two cancel checks.
pub(super) const DEFAULT_HOOK_INTERVAL: u32 = 1000;

/// Default time a VM gets to let go of a stopped request before it counts
/// as wedged.
pub(super) const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(1);

/// Default number of compiled `eval` chunks each VM keeps.
pub(super) const DEFAULT_CHUNK_CACHE: usize = 64;

/// Default longest source the sandbox's `load` compiles.
pub(super) const DEFAULT_MAX_SOURCE: usize = 64 << 10;

/// Default VM thread stack where std's 2 MiB is too small: Lua 5.1-5.3
/// allow 200 nested C calls, whose frames (`string.gsub` keeps an 8 KiB
/// buffer on the C stack in 5.3) overflow 2 MiB before Lua reports "C stack
/// overflow", killing the process; 8 MiB is what `lua.c` gets as a main
/// thread. LuaJIT counts no C calls: its nesting is bounded by the stack
/// left (`vm/cstack.rs`), so the size must be known: std's 2 MiB, explicitly.
const DEFAULT_STACK_SIZE: Option<usize> =
    if cfg!(any(feature = "lua51", feature = "lua52", feature = "lua53")) {
        Some(8 << 20)
    } else if cfg!(feature = "luajit") {
        Some(STD_STACK_SIZE)
    } else {
        None
    };

/// The stack std gives a thread spawned without a size (unless
/// `RUST_MIN_STACK` says otherwise).
pub(super) const STD_STACK_SIZE: usize = 2 << 20;

/// Per-VM settings, filled in by the builders.
#[derive(Debug, Clone)]
pub(crate) struct VmConfig {
    /// Base name of the threads (`name`, `name-deadline`, ...).
    pub(crate) name: String,
    pub(crate) stack_size: Option<usize>,
    pub(crate) hook_interval: u32,
    pub(crate) default_timeout: Option<Duration>,
    /// Bytes the VM may allocate in all.
    pub(crate) memory_limit: Option<usize>,
    /// Lua instructions one request may execute.
    pub(crate) max_instructions: Option<u64>,
    /// Keep the count hook installed all the time (see `permanent_hook`).
    pub(crate) permanent_hook: bool,
    /// Whether `load` and friends accept precompiled (binary) chunks.
    pub(crate) binary_chunks: bool,
    /// Apply `sandbox/mod.rs` after `init`.
    pub(crate) sandbox: bool,
    /// Compiled `eval` chunks kept per VM (0: none).
    pub(crate) chunk_cache: usize,
    /// How long a VM may take to let go of a stopped request.
    pub(crate) stop_grace: Duration,
    /// Longest source the sandbox's `load` compiles, in bytes.
    pub(crate) max_source: usize,
    /// Where Lua's `print` writes.
    pub(crate) print: crate::sandbox::print::Print,
    /// The standard libraries each VM opens.
    pub(crate) std_libs: mlua::StdLib,
    /// Open them with mlua's unsafe constructor (`unsafe_std_libs`).
    pub(crate) unsafe_libs: bool,
    /// Requests one VM may hold suspended (the `async` feature).
    pub(crate) max_suspended: usize,
    /// Install the Lua global `task` (the `async` feature).
    pub(crate) task_library: bool,
    /// The tokio runtime VM threads enter (the `tokio` feature).
    #[cfg(feature = "tokio")]
    pub(crate) tokio: Option<tokio::runtime::Handle>,
}

/// Default for `max_suspended`.
pub(crate) const DEFAULT_MAX_SUSPENDED: usize = 10_000;

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "mlua-isle".to_string(),
            stack_size: None,
            hook_interval: DEFAULT_HOOK_INTERVAL,
            default_timeout: None,
            memory_limit: None,
            max_instructions: None,
            permanent_hook: false,
            binary_chunks: false,
            sandbox: false,
            chunk_cache: DEFAULT_CHUNK_CACHE,
            stop_grace: DEFAULT_STOP_GRACE,
            max_source: DEFAULT_MAX_SOURCE,
            print: crate::sandbox::print::Print::Default,
            std_libs: mlua::StdLib::ALL_SAFE,
            unsafe_libs: false,
            max_suspended: DEFAULT_MAX_SUSPENDED,
            task_library: false,
            #[cfg(feature = "tokio")]
            tokio: None,
        }
    }
}

/// Refuses a zero given to an option that counts something which must be
/// there (workers, instructions, requests, bytes): `build` and `spawn` fail
/// with [`IsleError::Init`] naming it, rather than quietly reading it as
/// one or as "no limit".
pub(crate) fn at_least_one(option: &str, value: Option<u64>) -> Result<(), IsleError> {
    match value {
        Some(0) => Err(IsleError::Init(format!(
            "`{option}(0)`: it must be at least 1 (leave the option out for the default)"
        ))),
        _ => Ok(()),
    }
}

impl VmConfig {
    /// Refuses options that cannot be honoured (see [`at_least_one`]).
    pub(crate) fn check(&self) -> Result<(), IsleError> {
        at_least_one("hook_interval", Some(u64::from(self.hook_interval)))?;
        at_least_one("max_instructions", self.max_instructions)?;
        at_least_one("memory_limit", self.memory_limit.map(|b| b as u64))?;
        at_least_one("max_suspended", Some(self.max_suspended as u64))?;
        #[cfg(not(feature = "async"))]
        if self.task_library {
            return Err(IsleError::Init(
                "`task_library(true)` needs the crate's `async` feature".into(),
            ));
        }
        Ok(())
    }

    /// Settles what the VM threads need from where the builder runs: with
    /// the `tokio` feature and no `tokio_handle`, the runtime the builder
    /// runs in, if any.
    pub(crate) fn resolve(&mut self) {
        #[cfg(feature = "tokio")]
        if self.tokio.is_none() {
            self.tokio = tokio::runtime::Handle::try_current().ok();
        }
    }

    /// Runs `f` (a VM thread's whole life) inside the tokio runtime, if
    /// one was given or found (the `tokio` feature), so that async
    /// functions needing tokio's context work on the VM.
    pub(crate) fn in_runtime<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "tokio")]
        if let Some(handle) = &self.tokio {
            let _entered = handle.enter();
            return f();
        }
        f()
    }

    /// What the interrupt hook needs of these options.
    pub(crate) fn hook(&self) -> crate::interrupt::HookOptions {
        crate::interrupt::HookOptions {
            interval: self.hook_interval,
            budget: self.max_instructions,
            permanent: self.permanent_hook,
            binary_chunks: self.binary_chunks,
        }
    }

    /// The stack size VM threads are spawned with (`None`: std's default).
    pub(super) fn vm_stack_size(&self) -> Option<usize> {
        self.stack_size.or(DEFAULT_STACK_SIZE)
    }

    /// A thread builder named `name` (plus `suffix`) with the stack size set.
    pub(crate) fn thread(&self, suffix: &str) -> std::thread::Builder {
        let b = std::thread::Builder::new().name(format!("{}{suffix}", self.name));
        match self.vm_stack_size() {
            Some(size) => b.stack_size(size),
            None => b,
        }
    }
}

/// The builder options every VM takes (`name`, `stack_size`,
/// `hook_interval`, `default_timeout`, `memory_limit`, `max_instructions`,
/// `permanent_hook`, `allow_binary_chunks`, `sandbox`, `chunk_cache`,
/// `std_libs`, `unsafe_std_libs`, ...), for
/// a builder with a `config: VmConfig` field.
macro_rules! vm_options {
    () => {
        /// Names the threads: an isle's VM thread is `NAME`, a pool's
        /// workers `NAME-0`, `NAME-1`, ...; the deadline thread, started on
        /// the first time limit, `NAME-deadline`; and a short-lived
        /// `NAME-wedge` while a wedged VM is being replaced (see
        /// [`stop_grace`](Self::stop_grace)). Default `mlua-isle`.
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.config.name = name.into();
            self
        }

        /// Stack size of each VM thread in bytes (default: std's; 8 MiB on
        /// Lua 5.1-5.3, whose C call limit needs more than 2 MiB; 2 MiB on
        /// LuaJIT, whatever `RUST_MIN_STACK` says, since nested C calls
        /// there are bounded by the stack left).
        pub fn stack_size(mut self, bytes: usize) -> Self {
            self.config.stack_size = Some(bytes);
            self
        }

        /// Lua instructions between two cancel checks (default 1000), where
        /// the hook ticks all the time (see [the crate
        /// docs](crate#stopping-running-lua)); with
        /// [`max_instructions`](Self::max_instructions), the budget is
        /// counted in steps of this size. Lower values react to a cancel
        /// sooner and cost a little more. Where the hook is armed on
        /// demand, this setting has no effect.
        pub fn hook_interval(mut self, instructions: u32) -> Self {
            self.config.hook_interval = instructions;
            self
        }

        /// A time limit for every request, counted from submission. A
        /// task's own [`Task::timeout`](crate::Task::timeout) can shorten
        /// it, never extend it. A limit too large to represent as an
        /// `Instant` (such as `Duration::MAX`) means no limit.
        pub fn default_timeout(mut self, limit: std::time::Duration) -> Self {
            self.config.default_timeout = Some(limit);
            self
        }

        /// How long a VM may take to let go of a request that was stopped
        /// (cancelled, timed out, shut down) while it ran; default 1 s.
        ///
        /// A stop answers the caller at once, whatever the VM is doing;
        /// the VM is interrupted and throws its late result away. Lua code
        /// lets go within microseconds, but a Rust callback that does not
        /// poll its token, or a long C function, holds the VM until it
        /// returns. A VM still inside the request after this grace period
        /// is *wedged*: it is replaced by a fresh one (`init` re-run) that
        /// takes over its queue, and its stuck thread is detached (it frees
        /// its VM if it ever returns). Sessions bound to a replaced pool VM
        /// answer their next request with
        /// [`IsleError::SessionLost`](crate::IsleError::SessionLost).
        /// `shutdown_timeout(d)` and dropping the last handle also wait at
        /// most this long past their own limit for a VM to stop.
        /// `Duration::MAX` means VMs are never replaced.
        pub fn stop_grace(mut self, grace: std::time::Duration) -> Self {
            self.config.stop_grace = grace;
            self
        }

        /// Caps the memory each VM may allocate, in bytes (everything it
        /// holds: globals, session state, the running request's data). A
        /// request that needs more fails with
        /// [`IsleError::MemoryLimit`](crate::IsleError::MemoryLimit) (unless
        /// its Lua code catches the error); the VM then collects its garbage
        /// and serves the next request. `init` runs under the limit too.
        ///
        /// Lua collects garbage on its own schedule, and some library
        /// functions (`string.rep`, `table.concat`, `string.format`, ...)
        /// build their result in buffers whose allocations do not trigger
        /// Lua's emergency collection: with garbage pending, such a call
        /// can fail near the limit where a collection would have made room.
        /// So that garbage left by earlier requests does not stand in the
        /// way, the VM runs a full collection at the end of a request
        /// whenever the memory in use has grown by more than a quarter of
        /// the room left above the live data (measured at the previous
        /// collection): each request starts with about three quarters of
        /// that room free. Garbage a request makes itself still counts
        /// against it; leave headroom above what one request needs. That
        /// collection is part of the request that grew the memory, before
        /// it resolves: its time counts in the request's, and a stop or
        /// time limit reaches it as it reaches any C function (a heap can
        /// be built to take minutes to collect; see
        /// [`stop_grace`](Self::stop_grace)).
        ///
        /// A request's results are converted to Rust within the limit too:
        /// conversions copy each reference to a string or table again (one
        /// string returned 200 times as a `Vec<String>` is 200 copies), so
        /// results are measured that way first, and refused with
        /// `MemoryLimit` past the limit (for `map`, each input's results on
        /// their own). Handles (`LuaHandle`) copy nothing and are not
        /// measured; what `exec` closures convert themselves is their own.
        pub fn memory_limit(mut self, bytes: usize) -> Self {
            self.config.memory_limit = Some(bytes);
            self
        }

        /// Keeps the interrupt hook ticking all the time (every
        /// [`hook_interval`](Self::hook_interval) instructions) instead of
        /// arming it only when a request must stop.
        ///
        /// Armed on demand (the default where it is supported; see [the
        /// crate docs](crate#stopping-running-lua)), Lua code runs at full
        /// speed, and a cancel takes as long as the operating system takes
        /// to deliver a signal to a running thread: a few microseconds on
        /// bare metal, tens of microseconds (and sometimes more) on virtual
        /// machines, where waking another CPU is slow. With the hook always
        /// on, a cancel is seen within `hook_interval` instructions without
        /// any signal, but pure-Lua code runs 2–3x slower. Choose it when
        /// cancel latency matters more than throughput. (On Luau, where a
        /// stopper arms the interrupt with no signal, it keeps the
        /// interrupt set, checking the stop reason at every call, return
        /// and loop back-edge: about 4x slower on function calls, with
        /// little latency to gain.)
        pub fn permanent_hook(mut self, on: bool) -> Self {
            self.config.permanent_hook = on;
            self
        }

        /// Caps the Lua instructions one request may execute (coroutines
        /// included), a deterministic alternative to a time limit. A request
        /// past it fails with
        /// [`IsleError::InstructionLimit`](crate::IsleError::InstructionLimit).
        /// Counted at hook ticks, every `min(hook_interval, n)` instructions
        /// of a coroutine: a request is never stopped before `n`, and may
        /// run up to one such interval past it. Lua starts each new
        /// coroutine's countdown afresh, so each one made
        /// (`coroutine.create`, `coroutine.wrap`, `task.spawn`) is charged
        /// one interval when it is made: what it may run before its first
        /// tick (so a budget of `n` makes at most `n / interval`
        /// coroutines; lower `hook_interval` for scripts that make many
        /// small ones). Rust code called from Lua does not count. Counting needs the hook to tick all the time, so a VM with
        /// a budget runs pure-Lua code 2–3x slower than one without (see
        /// the README's Performance section).
        ///
        /// On Lua 5.2–5.5 an allocation that the
        /// [`memory_limit`](Self::memory_limit) refuses counts too: Lua
        /// collects the whole heap before it gives up on one, so a script
        /// that keeps its heap at the limit would otherwise make every
        /// instruction cost a collection. Each refusal is charged one
        /// instruction per 8 bytes the VM holds, at the next tick. To count
        /// them the crate wraps the VM's allocator once `init` has run, and
        /// mlua then cannot find its memory settings: in such a VM,
        /// `Lua::set_memory_limit` fails with `MemoryControlNotAvailable`
        /// (set the limit with [`memory_limit`](Self::memory_limit) or in
        /// `init`), and `Lua::used_memory` asks Lua's collector (the same
        /// count).
        pub fn max_instructions(mut self, n: u64) -> Self {
            self.config.max_instructions = Some(n);
            self
        }

        /// Lets `load` (and `loadfile`, `dofile`) accept precompiled binary
        /// chunks. Off by default, and best left off: Lua does not verify
        /// bytecode, and a malformed or malicious binary chunk can crash the
        /// VM's thread or the whole process. `eval` always takes source
        /// text.
        pub fn allow_binary_chunks(mut self, allow: bool) -> Self {
            self.config.binary_chunks = allow;
            self
        }

        /// Restricts what Lua code may do, for scripts you did not write:
        /// no `io`, `debug`, `os.exit`/`execute`/`remove`/`rename`/`getenv`/
        /// `tmpname`, `loadfile`, `dofile`, no loading of modules, no
        /// `collectgarbage` options that stop or tune the collector, no
        /// `__gc` metamethods, the library tables (`string`, `table`, ...)
        /// and the tables `init` put in the globals read-only (request code
        /// gets deep read-only views of them; sessions read the globals as
        /// `init` left them), `print` writing nowhere unless
        /// [`print_to`](Self::print_to) says where, and `load` limited to
        /// [`max_load_size`](Self::max_load_size). Calling a removed function raises an error saying
        /// it is not available in the sandbox. Pattern matching
        /// (`string.find`, `match`, `gmatch`, `gsub`) uses a matcher that
        /// limits can stop, whose steps count against `max_instructions`.
        /// Applied after `init`, which may still use everything. Combine it with `memory_limit` and a
        /// time limit or `max_instructions`; see SECURITY.md for what it does
        /// not cover.
        ///
        /// A sandboxed VM's globals are emptied when the VM is dropped
        /// (shutdown, recycling, a replaced VM's thread exiting), before
        /// the state is closed: mlua runs a full collection as it drops a
        /// `Lua`, and what request code left there must not make that take
        /// longer than the heap's size does (a shuffled chain of weak-keyed
        /// entries takes a collection minutes). Finalizers that `init` set
        /// up and that still run then find the globals empty.
        pub fn sandbox(mut self, on: bool) -> Self {
            self.config.sandbox = on;
            self
        }

        /// In the sandbox, the longest source `load` (and `loadstring`)
        /// compiles, in bytes (default 64 KiB). Compiling is C work that no
        /// cancel or time limit can interrupt, and Lua's compiler takes time
        /// that grows faster than the source (a 250 KB chain of `or`s or
        /// `elseif`s takes seconds), so a longer source makes `load` return
        /// `nil` and a message saying so. A reader function counts the bytes
        /// it returns. No effect outside the sandbox, nor on `eval` (whose
        /// source the host hands over).
        pub fn max_load_size(mut self, bytes: usize) -> Self {
            self.config.max_source = bytes;
            self
        }

        /// Sends what Lua's `print` writes to `sink`, one call per `print`,
        /// with the line (without its newline; bytes that are not UTF-8
        /// replaced by U+FFFD) instead of the process's stdout. `print`
        /// formats as Lua's does (`tostring` of each argument, tab
        /// separated; `__tostring` and `__name` honoured, and their errors
        /// raised). Applies to `init` too. `sink` runs on the VM thread,
        /// inside the request: it must return promptly (hand the line to a
        /// channel, not to a pipe that may block). By default `print`
        /// writes to stdout, except in the [`sandbox`](Self::sandbox),
        /// where it writes nowhere (a script could otherwise block the VM
        /// on a full stdout pipe); see also
        /// [`discard_print`](Self::discard_print). The lines of a request
        /// made through `capture_print()` go to that request instead (see
        /// [`PrintCapture`](crate::PrintCapture)).
        pub fn print_to(mut self, sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
            self.config.print = crate::sandbox::print::Print::To(std::sync::Arc::new(sink));
            self
        }

        /// Makes Lua's `print` write nowhere (it still formats its
        /// arguments, so their `__tostring` errors are raised). The default
        /// in the [`sandbox`](Self::sandbox).
        pub fn discard_print(mut self) -> Self {
            self.config.print = crate::sandbox::print::Print::Discard;
            self
        }

        /// How many compiled `eval` chunks each VM keeps (default 64; 0
        /// turns the cache off). An `eval` of a source that VM compiled
        /// before, for the same environment (the globals, or the same
        /// session), reuses the compiled function and skips the compiler;
        /// each run still gets fresh locals, as with a fresh compile. Only
        /// the exact same source text matches. The least recently used
        /// chunk goes first; sources that mention `_ENV`, sources that fail
        /// to compile, and sources longer than a quarter of the byte bound
        /// are never kept.
        ///
        /// The cache holds compiled functions in the VM: their memory
        /// counts against [`memory_limit`](Self::memory_limit) (and a
        /// pool's `recycle_when_memory_above`). Besides the entry count,
        /// the cache keeps at most 1 MiB of source per VM, or an eighth of
        /// the memory limit if that is lower (compiled code takes memory of
        /// the same order), and a VM that runs out of memory empties it.
        /// Closing a session drops its cached chunks.
        pub fn chunk_cache(mut self, entries: usize) -> Self {
            self.config.chunk_cache = entries;
            self
        }

        /// Chooses the standard libraries each VM opens (default
        /// [`StdLib::ALL_SAFE`](mlua::StdLib::ALL_SAFE): every library but
        /// `debug` and LuaJIT's `ffi`), in mlua's safe mode, where Lua
        /// code cannot load C modules. A smaller set gives Lua code less
        /// to reach (e.g. `StdLib::MATH | StdLib::STRING`); the base
        /// library (`print`, `pcall`, `load`, ...) is always opened. Only
        /// safe libraries may be named here: a set with `StdLib::DEBUG` or
        /// `StdLib::FFI` makes the VM fail to start
        /// ([`IsleError::Init`](crate::IsleError::Init)); see
        /// [`unsafe_std_libs`](Self::unsafe_std_libs). Replaces an earlier
        /// `unsafe_std_libs`.
        ///
        /// With the [`sandbox`](Self::sandbox) on, the sandbox still removes
        /// what it removes from whatever was opened.
        pub fn std_libs(mut self, libs: mlua::StdLib) -> Self {
            self.config.std_libs = libs;
            self.config.unsafe_libs = false;
            self
        }

        /// **Unsafe:** opens any standard libraries, including `debug`
        /// (`StdLib::DEBUG`) and LuaJIT's `ffi` (`StdLib::FFI`), and lets
        /// `require` load C modules (mlua's unsafe mode,
        /// `Lua::unsafe_new_with`). For trusted code only, such as
        /// debuggers, profilers, or Lua's own test suite. Replaces an
        /// earlier `std_libs`.
        ///
        /// What becomes possible to Lua code, and why it is unsafe:
        /// - `debug` reaches everything mlua keeps for itself (the registry
        ///   with `debug.getregistry`, any metatable with
        ///   `debug.setmetatable`, upvalues of any function): a script can
        ///   break mlua's invariants and crash the process or corrupt
        ///   memory;
        /// - `debug.sethook` can replace the interrupt hook while it ticks
        ///   (with [`max_instructions`](Self::max_instructions) or
        ///   [`permanent_hook`](Self::permanent_hook)): such a script may
        ///   no longer be stopped by a cancel, a time limit or the budget
        ///   until the hook is armed again;
        /// - `ffi` and C modules run arbitrary native code.
        ///
        /// With the [`sandbox`](Self::sandbox) on, `debug`, `io`, `package`,
        /// `loadfile`, ... are removed after `init` as usual, so only
        /// `init` can use them (`ffi`, if opened, is not removed: do not
        /// open it for untrusted code).
        pub fn unsafe_std_libs(mut self, libs: mlua::StdLib) -> Self {
            self.config.std_libs = libs;
            self.config.unsafe_libs = true;
            self
        }

        /// How many requests one VM may hold suspended, waiting for a
        /// future (the `async` feature; default 10,000). At the cap the VM
        /// takes no new work until some of them finish; what waits for it
        /// stays queued (and counts against a pool's `queue_capacity`).
        /// Zero is refused.
        pub fn max_suspended(mut self, requests: usize) -> Self {
            self.config.max_suspended = requests;
            self
        }

        /// Installs the Lua global `task` (the `async` feature; default
        /// off): `task.sleep(seconds)`, and `task.spawn(f, ...)`, which runs
        /// `f(...)` beside the request and returns a handle with `:join()`
        /// (`f`'s results, or its error raised) and `:cancel()`. Children
        /// belong to the request that spawned them: they end with it, and
        /// the first error of a child nobody joined fails it. A failed
        /// child's error keeps at most 4 KiB of its message and of its
        /// traceback (a Rust copy, which no `memory_limit` counts). See
        /// [the crate docs](crate#async-lua-awaits-rust).
        pub fn task_library(mut self, on: bool) -> Self {
            self.config.task_library = on;
            self
        }

        /// The tokio runtime whose context the VM threads run in (the
        /// `tokio` feature), so that async functions that need it
        /// (`tokio::time::sleep`, tokio I/O) work in requests. Default: the
        /// runtime the builder is called from, if any.
        #[cfg(feature = "tokio")]
        pub fn tokio_handle(mut self, handle: tokio::runtime::Handle) -> Self {
            self.config.tokio = Some(handle);
            self
        }
    };
}
pub(crate) use vm_options;
