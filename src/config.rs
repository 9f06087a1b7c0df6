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
