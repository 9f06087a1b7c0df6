//! A pool worker: one VM thread taking work from its queues, stealing when
//! idle, sleeping when there is nothing anywhere.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_deque::Worker as Deque;
use crossbeam_utils::sync::Parker;
use mlua::{Function, Table};

use super::session::Binding;
use super::shared::{Found, Pinned, Shared};
use crate::request::{Job, Outcome};
use crate::spin::spin_until;
use crate::vm::Vm;
use crate::IsleError;

/// One session's environment on this VM.
struct Env {
    binding: Arc<Binding>,
    table: Table,
}

pub(crate) struct Worker {
    pub(crate) index: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) local: Deque<Job>,
    pub(crate) parker: Parker,
}

impl Worker {
    /// The worker loop; returns when the pool shuts down and nothing is
    /// left for this worker.
    pub(crate) fn run(self, vm: Vm) {
        let shared = &*self.shared;
        let w = self.index;
        let mut envs: HashMap<u64, Env> = HashMap::new();
        let make_env = env_factory(&vm);
        let sweep_every = shared
            .idle_timeout
            .map(|d| (d / 4).clamp(Duration::from_millis(1), Duration::from_secs(1)));
        let mut next_sweep = Instant::now();
        let mut pinned_first = false;
        loop {
            // Busy: take work.
            pinned_first = !pinned_first;
            if let Some(found) = shared.find(w, &self.local, pinned_first) {
                match found {
                    Found::Unkeyed(job) => {
                        shared.took();
                        self.run_job(&vm, job, None);
                    }
                    Found::Pinned(Pinned::Session(binding, job)) => {
                        shared.took();
                        let env = match envs.get(&binding.id) {
                            Some(env) => Ok(env.table.clone()),
                            None => new_env(&make_env).inspect(|t| {
                                let binding = binding.clone();
                                envs.insert(
                                    binding.id,
                                    Env {
                                        binding,
                                        table: t.clone(),
                                    },
                                );
                            }),
                        };
                        match env {
                            Ok(table) => self.run_job(&vm, job, Some(&table)),
                            Err(e) => job.abandon(e),
                        }
                        // The idle clock starts when the last request ends.
                        binding.last_used.store(shared.now_ns(), Ordering::Relaxed);
                        binding.pending.fetch_sub(1, Ordering::Relaxed);
                    }
                    Found::Pinned(Pinned::Broadcast(job)) => {
                        if shared.abort.load(Ordering::Acquire) {
                            job.abandon(IsleError::Shutdown);
                        } else {
                            vm.run(job, None);
                        }
                    }
                    Found::Pinned(Pinned::Close(id)) => {
                        if envs.remove(&id).is_some() {
                            shared.counters[w].sessions.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                continue;
            }

            // Idle.
            let stopping = || shared.closed.load(Ordering::Acquire);
            if stopping() && !shared.has_work(w, &self.local) {
                break;
            }
            if spin_until(|| stopping() || shared.has_work(w, &self.local)) {
                continue;
            }
            if let Some(every) = sweep_every {
                if Instant::now() >= next_sweep {
                    self.expire_idle(&mut envs);
                    next_sweep = Instant::now() + every;
                }
            }
            let timeout = sweep_every.filter(|_| !envs.is_empty());
            shared.sleep.sleep(w, &self.parker, timeout, || {
                stopping() || shared.has_work(w, &self.local)
            });
        }
    }

    fn run_job(&self, vm: &Vm, job: Job, env: Option<&Table>) {
        let counters = &self.shared.counters[self.index];
        if self.shared.abort.load(Ordering::Acquire) {
            job.abandon(IsleError::Shutdown);
            counters.record(Outcome::Cancelled, Duration::ZERO);
            return;
        }
        counters.running.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let outcome = vm.run(job, env);
        let busy = start.elapsed();
        counters.running.store(false, Ordering::Relaxed);
        counters.record(outcome, busy);
    }

    /// Closes this VM's sessions that have been idle for `idle_timeout`.
    fn expire_idle(&self, envs: &mut HashMap<u64, Env>) {
        let shared = &*self.shared;
        let Some(idle) = shared.idle_timeout else {
            return;
        };
        let idle_ns = idle.as_nanos() as u64;
        let now = shared.now_ns();
        let is_idle = |b: &Binding| {
            b.pending.load(Ordering::Relaxed) == 0
                && now.saturating_sub(b.last_used.load(Ordering::Relaxed)) >= idle_ns
        };
        envs.retain(|_, env| {
            // Checked again under the shard lock: a request may be binding
            // to this session right now.
            if is_idle(&env.binding) && shared.sessions.remove_if(&env.binding, is_idle) {
                shared.counters[self.index]
                    .sessions
                    .fetch_sub(1, Ordering::Relaxed);
                shared.sessions_expired.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
    }
}

/// Builds, once per VM, the Lua function that makes session environments.
///
/// A session's environment is an empty table (what the session writes)
/// whose metatable reads through a small per-session table to the shared
/// globals. The per-session table makes `_G` name the environment itself
/// (so `_G.x = v` stays in the session) and gives the session a `load`
/// whose chunks run in the environment unless given another one. The
/// metatable is hidden (`__metatable = false`), so `getmetatable(_G)` does
/// not lead to the shared globals.
fn env_factory(vm: &Vm) -> mlua::Result<Function> {
    let globals = vm.lua().globals();
    let load: Function = globals.get("load")?;
    vm.lua()
        .load(
            r#"
            local globals, load = ...
            local shared = { __index = globals }
            return function()
                local env = {}
                local own = setmetatable({ _G = env }, shared)
                own.load = function(chunk, name, mode, ...)
                    if select('#', ...) == 0 then
                        return load(chunk, name, mode, env)
                    end
                    return load(chunk, name, mode, ...)
                end
                return setmetatable(env, { __index = own, __metatable = false })
            end
            "#,
        )
        .set_name("=mlua-isle session")
        .call((globals, load))
}

/// A fresh session environment.
fn new_env(make: &mlua::Result<Function>) -> Result<Table, IsleError> {
    make.as_ref()
        .map_err(Clone::clone)
        .and_then(|f| f.call::<Table>(()))
        .map_err(|e| IsleError::from_lua(&e))
}
