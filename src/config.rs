//! Options shared by every VM an isle or pool starts.

use std::time::Duration;

/// Default instructions between two cancel checks.
pub(crate) const DEFAULT_HOOK_INTERVAL: u32 = 1000;

/// Per-VM settings, filled in by the builders.
#[derive(Debug, Clone)]
pub(crate) struct VmConfig {
    /// Base name of the threads (`name`, `name-deadline`, ...).
    pub(crate) name: String,
    pub(crate) stack_size: Option<usize>,
    pub(crate) hook_interval: u32,
    pub(crate) default_timeout: Option<Duration>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "mlua-isle".to_string(),
            stack_size: None,
            hook_interval: DEFAULT_HOOK_INTERVAL,
            default_timeout: None,
        }
    }
}

impl VmConfig {
    /// A thread builder named `name` (plus `suffix`) with the stack size set.
    pub(crate) fn thread(&self, suffix: &str) -> std::thread::Builder {
        let b = std::thread::Builder::new().name(format!("{}{suffix}", self.name));
        match self.stack_size {
            Some(size) => b.stack_size(size),
            None => b,
        }
    }
}

/// The builder options every VM takes (`name`, `stack_size`,
/// `hook_interval`, `default_timeout`), for a builder with a `config:
/// VmConfig` field.
macro_rules! vm_options {
    () => {
        /// Names the threads: an isle's VM thread is `NAME`, a pool's
        /// workers `NAME-0`, `NAME-1`, ...; the deadline thread, started on
        /// the first time limit, `NAME-deadline`. Default `mlua-isle`.
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.config.name = name.into();
            self
        }

        /// Stack size of each VM thread in bytes (default: std's).
        pub fn stack_size(mut self, bytes: usize) -> Self {
            self.config.stack_size = Some(bytes);
            self
        }

        /// Lua instructions between two cancel checks (default 1000). Lower
        /// values react to a cancel sooner and cost a little more.
        pub fn hook_interval(mut self, instructions: u32) -> Self {
            self.config.hook_interval = instructions.max(1);
            self
        }

        /// A time limit for every request, counted from submission. A
        /// task's own [`Task::timeout`](crate::Task::timeout) can shorten
        /// it, never extend it.
        pub fn default_timeout(mut self, limit: std::time::Duration) -> Self {
            self.config.default_timeout = Some(limit);
            self
        }
    };
}
pub(crate) use vm_options;
