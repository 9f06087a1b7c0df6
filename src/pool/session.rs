//! Sessions: keys bound to one VM, each with its own global environment.
//!
//! The table of open sessions is sharded by key hash; each shard's lock is
//! held while a session request is bound and pushed onto its VM's queue, and
//! while a session is closed. So for one key, "bind, push" and "unbind, push
//! Close" happen in one order, and the VM sees a session's requests, then its
//! `Close`, in that order; a request after the close binds afresh.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use mlua::{Lua, Table};
use parking_lot::Mutex;

use super::key::SessionKey;
use super::metrics::{KeyCounters, SessionMetrics};
use super::shared::{Pinned, Shared};
use super::IslePool;
use crate::host::reserve::{reserve_methods, Permit};
use crate::host::submit::{request_methods, Owner, Submit};
use crate::request::{Admission, Room};
use crate::vm::Job;
use crate::{IsleError, Task};

/// One binding of a key to a VM. A key closed and used again gets a new
/// binding (new id, fresh environment).
///
/// One per open session, so kept small: 104 bytes.
pub(crate) struct Binding {
    /// Unique in the pool; names the environment on the worker.
    pub(crate) id: u64,
    pub(crate) key: SessionKey,
    /// The key's hash in this pool (see [`Probe`]).
    hash: u64,
    pub(crate) worker: usize,
    /// Requests queued or running; changed under the shard lock (up) and by
    /// the worker (down). Kept only with a `session_idle_timeout`.
    pub(super) pending: AtomicU32,
    /// When its last request ended, in `Shared::now_ns` units (kept only
    /// with a `session_idle_timeout`).
    pub(super) last_used: AtomicU64,
    /// Set when the VM holding this session's state was recycled.
    pub(super) lost: AtomicBool,
    /// Counted in its worker's `sessions` (from binding until it is closed,
    /// expires or is lost, whichever comes first: see [`uncount`](Self::uncount)).
    counted: AtomicBool,
    /// Its requests and their run time (`SessionMetrics`).
    pub(super) counters: KeyCounters,
    /// Its own bound on queued requests (`session_queue_capacity`).
    pub(super) room: Option<Arc<Room>>,
}

impl Binding {
    /// Takes the session out of its worker's count of open sessions, once
    /// however many of its ends meet (closed, expired, lost with its VM to
    /// recycling, then to a wedge): each path calls this.
    pub(super) fn uncount(&self, shared: &Shared) {
        // ORDERING: AcqRel: the swap alone decides which caller subtracts;
        // the count itself is a statistic (Relaxed).
        if self.counted.swap(false, Ordering::AcqRel) {
            shared.counters[self.worker]
                .sessions
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A map by binding id (environments, fair queues).
pub(super) type ById<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Tables keep the room a burst of keys grew them to. Past this many
/// slots, one that a burst left three-quarters empty gives half of its
/// room back (amortised: it then has to empty again by half).
pub(super) const KEEP_SLOTS: usize = 1024;

/// True if a table of `len` entries and room for `capacity` should shrink
/// (to twice its length: see [`KEEP_SLOTS`]).
pub(super) fn oversized(len: usize, capacity: usize) -> bool {
    capacity > KEEP_SLOTS && len < capacity / 4
}

/// Binding ids are a counter: spread them over the table's bits with one
/// multiplication (the table uses the top bits as well as the low ones).
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A binding in its shard, found by its key (which it holds: the shard
/// does not store it again).
struct ByKey(Arc<Binding>);

/// What a shard finds a binding by: a key with its hash in this pool.
///
/// The hash (SipHash with the pool's random seed, so keys a tenant picks
/// cannot be made to collide) is computed once: when a [`Session`] handle
/// is made, or a binding. A request then costs its shard no hashing: the
/// shards' tables use the stored hash as it is.
trait Probe {
    fn hash(&self) -> u64;
    fn key(&self) -> &SessionKey;
}

impl Hash for dyn Probe + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(Probe::hash(self));
    }
}

impl PartialEq for dyn Probe + '_ {
    fn eq(&self, other: &Self) -> bool {
        Probe::hash(self) == Probe::hash(other) && self.key() == other.key()
    }
}

impl Eq for dyn Probe + '_ {}

impl Probe for Binding {
    fn hash(&self) -> u64 {
        self.hash
    }
    fn key(&self) -> &SessionKey {
        &self.key
    }
}

impl<'a> Borrow<dyn Probe + 'a> for ByKey {
    fn borrow(&self) -> &(dyn Probe + 'a) {
        &*self.0
    }
}

// As `dyn Probe`'s, which `Borrow` requires.
impl Hash for ByKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

/// A key and its hash in one pool: what a [`Session`] handle holds.
#[derive(Clone)]
pub(super) struct HashedKey {
    hash: u64,
    key: SessionKey,
}

impl Probe for HashedKey {
    fn hash(&self) -> u64 {
        self.hash
    }
    fn key(&self) -> &SessionKey {
        &self.key
    }
}

/// Hashes already mixed (SipHash): `IdHasher` only multiplies them.
type Prehashed = BuildHasherDefault<IdHasher>;

type Shard = Mutex<HashSet<ByKey, Prehashed>>;

/// The open sessions, sharded by key.
pub(super) struct Sessions {
    shards: Box<[CachePadded<Shard>]>,
    hasher: RandomState,
    next_id: AtomicU64,
    /// The rooms of sessions gone from the table (closed, expired, told
    /// lost) while still in use: callers may wait in them (for a permit of
    /// the old session to be dropped), and shutdown refuses those too.
    orphans: Mutex<Orphans>,
}

#[derive(Default)]
struct Orphans {
    rooms: Vec<Arc<Room>>,
    /// Shutdown closed the rooms: one orphaned later is closed at once.
    closed: bool,
}

impl Sessions {
    pub(super) fn new(workers: usize) -> Sessions {
        let shards = (workers * 8).next_power_of_two().max(16);
        Sessions {
            shards: (0..shards)
                .map(|_| CachePadded::new(Mutex::new(HashSet::default())))
                .collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
            orphans: Mutex::new(Orphans::default()),
        }
    }

    /// `key` with its hash in this pool.
    pub(super) fn hashed(&self, key: SessionKey) -> HashedKey {
        HashedKey {
            hash: self.hasher.hash_one(&key),
            key,
        }
    }

    /// The shard of `key`: picked by the top bits of its hash (the shard's
    /// table starts from the low ones).
    fn shard(&self, key: &dyn Probe) -> &Shard {
        let bits = self.shards.len().trailing_zeros();
        let i = key.hash().checked_shr(64 - bits).unwrap_or(0) as usize;
        &self.shards[i]
    }

    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True while `binding` is its key's current binding.
    pub(super) fn is_bound(&self, binding: &Arc<Binding>) -> bool {
        let probe: &dyn Probe = &**binding;
        self.shard(probe)
            .lock()
            .get(probe)
            .is_some_and(|b| Arc::ptr_eq(&b.0, binding))
    }

    /// The counters of `key`'s session, if it is open.
    pub(super) fn metrics(&self, key: &HashedKey) -> Option<SessionMetrics> {
        let shard = self.shard(key).lock();
        let ByKey(b) = shard.get(key as &dyn Probe)?;
        let mut m = b.counters.snapshot(b.worker);
        m.waiting_for_room = b.room.as_ref().map_or(0, |r| r.waiting());
        Some(m)
    }

    /// Refuses every caller waiting for room in a session's own queue (the
    /// pool shuts down).
    pub(super) fn close_rooms(&self) {
        for shard in self.shards.iter() {
            for ByKey(b) in shard.lock().iter() {
                if let Some(room) = &b.room {
                    room.close();
                }
            }
        }
        let mut orphans = self.orphans.lock();
        orphans.closed = true;
        for room in orphans.rooms.drain(..) {
            room.close();
        }
    }

    /// `binding` left the table: if its room is in use (held by a permit
    /// or a queued request, or waited for), callers may wait in it until
    /// that room is given back, so it is kept for shutdown to close (rooms
    /// no longer in use are dropped meanwhile).
    fn orphan(&self, binding: &Binding) {
        let Some(room) = &binding.room else {
            return;
        };
        if !room.in_use() {
            return;
        }
        let mut orphans = self.orphans.lock();
        if orphans.closed {
            room.close();
            return;
        }
        orphans.rooms.retain(|r| r.in_use());
        orphans.rooms.push(room.clone());
    }

    /// Marks every session bound to worker `w` lost (its VM was replaced
    /// while wedged) and returns them.
    pub(super) fn mark_lost(&self, w: usize) -> Vec<Arc<Binding>> {
        let mut lost = Vec::new();
        for shard in self.shards.iter() {
            for ByKey(b) in shard.lock().iter().filter(|b| b.0.worker == w) {
                b.lost.store(true, Ordering::Release);
                lost.push(b.clone());
            }
        }
        lost
    }

    /// Removes `key`'s binding if it is `binding` and `still(binding)`
    /// holds, under the shard lock. Returns whether it was removed.
    pub(super) fn remove_if(
        &self,
        binding: &Arc<Binding>,
        still: impl FnOnce(&Binding) -> bool,
    ) -> bool {
        let probe: &dyn Probe = &**binding;
        let mut shard = self.shard(probe).lock();
        match shard.get(probe) {
            Some(ByKey(b)) if Arc::ptr_eq(b, binding) && still(b) => {
                shard.remove(probe);
                let len = shard.len();
                if oversized(len, shard.capacity()) {
                    shard.shrink_to(len * 2);
                }
                drop(shard);
                self.orphan(binding);
                true
            }
            _ => false,
        }
    }
}

/// `key`'s binding, made on first use (bound to the least loaded VM), and
/// whether this call made it.
// A binding's hash and equality are its key's, which never changes; its
// atomics are not part of either.
#[allow(clippy::mutable_key_type)]
fn bind(
    shared: &Shared,
    shard: &mut HashSet<ByKey, Prehashed>,
    key: &HashedKey,
) -> (Arc<Binding>, bool) {
    if let Some(ByKey(b)) = shard.get(key as &dyn Probe) {
        return (b.clone(), false);
    }
    let b = Arc::new(Binding {
        // ORDERING: Relaxed: a unique number; nothing is published by it.
        id: shared.sessions.next_id.fetch_add(1, Ordering::Relaxed),
        key: key.key.clone(),
        hash: key.hash,
        worker: least_loaded(shared),
        pending: AtomicU32::new(0),
        // Idle from now: a session opened by a reservation and never used
        // expires one idle timeout after it opened.
        last_used: AtomicU64::new(if shared.idle_timeout.is_some() {
            shared.now_ns()
        } else {
            0
        }),
        lost: AtomicBool::new(false),
        counted: AtomicBool::new(true),
        counters: KeyCounters::default(),
        room: shared.session_capacity.map(Room::new),
    });
    // ORDERING: Relaxed: a count for metrics and `least_loaded`'s guess.
    shared.counters[b.worker]
        .sessions
        .fetch_add(1, Ordering::Relaxed);
    shard.insert(ByKey(b.clone()));
    if shared.idle_timeout.is_some() {
        // Its worker sweeps it for expiry (`Worker::expire_idle`).
        shared.bound[b.worker].push(b.clone());
    }
    (b, true)
}

/// The room of `key`'s own queue (`session_queue_capacity`), binding the
/// key if it is not bound; `None` without that option.
fn key_room(shared: &Shared, key: &HashedKey) -> Option<Arc<Room>> {
    shared.session_capacity?;
    let (binding, new) = {
        let mut shard = shared.sessions.shard(key).lock();
        bind(shared, &mut shard, key)
    };
    if new && shared.idle_timeout.is_some() {
        // A worker asleep with nothing to sweep sweeps again: this new
        // session may never send it a request.
        shared.sleep.wake(binding.worker);
    }
    binding.room.clone()
}

/// Submits `job` for `key`: binds the key on first use (to the least loaded
/// VM) and queues the job on that VM.
fn enqueue(shared: &Shared, key: &HashedKey, job: Job) {
    let worker = {
        let mut shard = shared.sessions.shard(key).lock();
        let (binding, _) = bind(shared, &mut shard, key);
        // Counted only for idle expiry: a session with requests pending is
        // not idle (no stamp here: its idle clock starts when the last of
        // them ends). Without an idle timeout, neither side touches the
        // count: a line shared by the caller and the VM thread, written by
        // both on every request.
        if shared.idle_timeout.is_some() {
            // ORDERING: Relaxed: read under this lock, or as a hint.
            binding.pending.fetch_add(1, Ordering::Relaxed);
        }
        let w = binding.worker;
        shared.pinned[w].push(Pinned::Session(binding, job));
        w
    };
    shared.sleep.wake(worker);
}

/// Queues a `LuaHandle`'s request for a value `binding`'s session holds:
/// as a request of that session, unless the session is gone (its VM
/// recycled or replaced, or the session closed), which resolves it
/// `HandleLost` at once. A session closed after this check is found out by
/// the request itself (its key binds afresh: another session); one whose
/// VM is recycled after it resolves `SessionLost`, as the session's next
/// request would.
pub(super) fn send(pool: IslePool, binding: &Arc<Binding>, job: Job) {
    let shared = pool.shared();
    let key = &binding.key;
    // ORDERING: Acquire, as the worker reads it (`session_job`).
    let gone = if binding.lost.load(Ordering::Acquire) {
        format!("the Lua VM holding this value (of session `{key}`) was recycled or replaced")
    } else if !shared.sessions.is_bound(binding) {
        format!("the session `{key}` holding this value was closed (or expired)")
    } else {
        let key = HashedKey {
            hash: binding.hash,
            key: key.clone(),
        };
        return Session { pool, key }.enqueue(job, None);
    };
    job.abandon(IsleError::HandleLost(format!(
        "{gone}; its value is gone: make the value again"
    )));
}

/// The VM with the least work: queued + running requests + bound sessions.
fn least_loaded(shared: &Shared) -> usize {
    (0..shared.workers())
        .min_by_key(|&w| {
            let c = &shared.counters[w];
            shared.queued_on(w)
                + usize::from(c.running.load(Ordering::Relaxed))
                + c.sessions.load(Ordering::Relaxed)
        })
        .unwrap_or(0)
}

/// Closes `key`'s session if open: its VM drops the environment after the
/// session's already-queued requests. Returns whether it was open.
pub(super) fn close(shared: &Shared, key: &HashedKey) -> bool {
    let binding = {
        let mut shard = shared.sessions.shard(key).lock();
        let Some(ByKey(binding)) = shard.take(key as &dyn Probe) else {
            return false;
        };
        let len = shard.len();
        if oversized(len, shard.capacity()) {
            shard.shrink_to(len * 2);
        }
        binding.uncount(shared);
        shared.counters[binding.worker]
            .closes_queued
            .fetch_add(1, Ordering::Relaxed);
        shared.pinned[binding.worker].push(Pinned::Close(binding.id));
        binding
    };
    shared.sessions.orphan(&binding);
    shared.sleep.wake(binding.worker);
    true
}

/// A handle to one session of an [`IslePool`]: every request made through
/// it runs on the VM the key is bound to, one at a time, in the order
/// submitted, in the session's own global environment.
///
/// Cheap to clone; `Send + Sync`. Handles for the same key (from any number
/// of `pool.session(key)` calls) share the session.
///
/// Globals written by session code land in the session's environment
/// (also through `_G`, `rawset(_G, ...)` and `load`), so other sessions and
/// unkeyed work do not see them; reads fall back to the shared globals that
/// `init` set up. Functions defined by `init` keep seeing the shared
/// globals, not the session's.
///
/// This keeps cooperating tenants apart. Against hostile code it holds only
/// with the pool's `sandbox(true)`: without it, session code can modify the
/// shared library tables (`string`, ...) and reach the shared globals
/// through `package.loaded`. See SECURITY.md.
#[derive(Clone)]
pub struct Session {
    pool: IslePool,
    key: HashedKey,
}

impl Session {
    pub(super) fn new(pool: IslePool, key: SessionKey) -> Session {
        let key = pool.shared().sessions.hashed(key);
        Session { pool, key }
    }

    /// The session's key.
    pub fn key(&self) -> &SessionKey {
        &self.key.key
    }

    request_methods!();

    reserve_methods!();

    /// Runs `f` on the session's VM with the session's environment table
    /// (its globals). Blocks until it has run.
    ///
    /// # Errors
    /// As for [`IslePool::exec`].
    pub fn exec<T, F>(&self, f: F) -> Result<T, IsleError>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Table) -> mlua::Result<T> + Send + 'static,
    {
        self.run(crate::host::submit::exec_env(f))
    }

    /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
    pub fn spawn_exec<T, F>(&self, f: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Table) -> mlua::Result<T> + Send + 'static,
    {
        self.spawn(crate::host::submit::exec_env(f))
    }

    /// Runs the async closure `f` on the session's VM with the session's
    /// environment table, and returns at once with a [`Task`] (the `async`
    /// feature; see [`IslePool::spawn_exec_async`]). While its future is
    /// pending, the session's later requests wait; the VM serves others.
    #[cfg(feature = "async")]
    pub fn spawn_exec_async<T, F, Fut>(&self, f: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(Lua, Table) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
    {
        self.spawn(crate::host::submit::exec_env_async(f))
    }

    /// This session's counters (see [`IslePool::session_metrics`]); `None`
    /// while it is not open.
    pub fn metrics(&self) -> Option<SessionMetrics> {
        self.pool.shared().sessions.metrics(&self.key)
    }

    /// Closes the session (see [`IslePool::close_session`]). Returns whether
    /// it was open.
    pub fn close(&self) -> bool {
        close(self.pool.shared(), &self.key)
    }
}

impl Submit for Session {
    fn owner(&self) -> &Owner {
        self.pool.owner()
    }

    fn room(&self) -> Option<&Arc<Room>> {
        self.pool.room()
    }

    fn first_room(&self) -> Option<Arc<Room>> {
        key_room(self.pool.shared(), &self.key)
    }

    fn waits_on_itself(&self) -> bool {
        crate::handle::route::current_session()
            .is_some_and(|b| b.key == self.key.key && self.pool.shared().sessions.is_bound(&b))
    }

    fn is_closed(&self) -> bool {
        self.pool.is_shutdown()
    }

    fn enqueue(&self, job: Job, admission: Option<Admission>) {
        let shared = self.pool.shared();
        // With a session queue capacity and no permit (a permit holds
        // both): room in the pool's queue, then in the session's own. In
        // that order so that a request refused by a full pool (or one shut
        // down) does not open its session.
        let admission = match admission {
            None if shared.session_capacity.is_some() => {
                if self.pool.is_shutdown() {
                    return self.pool.refuse(job);
                }
                let pool = match self.pool.room().map(|r| r.try_acquire()) {
                    None => Admission::none(),
                    Some(Some(a)) => a,
                    Some(None) => return self.pool.refuse(job),
                };
                // Refused here, the pool's room goes back with `pool`.
                let Some(key) = self.first_room().and_then(|r| r.try_acquire()) else {
                    return self.pool.refuse(job);
                };
                Some(key.and(pool))
            }
            // A permit holds room in its session's queue as it was bound
            // when the permit was taken. Closed since (its key bound
            // afresh), the request needs room in the fresh session's queue
            // instead: the stale room goes back.
            Some(held) if shared.session_capacity.is_some() => {
                let Some(current) = self.first_room() else {
                    return self.pool.refuse(job);
                };
                if held.holds(&current) {
                    Some(held)
                } else {
                    let held = held.keep_only(self.pool.room());
                    let Some(key) = current.try_acquire() else {
                        return self.pool.refuse(job);
                    };
                    Some(held.and(key))
                }
            }
            admission => admission,
        };
        if let Some(job) = self.pool.admit(job, admission) {
            enqueue(shared, &self.key, job);
            self.pool.after_push();
        }
    }
}

/// A permit of a session: its request runs in the session, in order with
/// the session's other requests (in the order submitted, which for a
/// permit's request is when the permit is used).
impl Permit<Session> {
    request_methods!(@plain [self] self);

    /// Runs `f` on the session's VM with the session's environment table,
    /// as [`Session::exec`]. Blocks until it has run.
    ///
    /// # Errors
    /// As for [`Session::exec`].
    pub fn exec<T, F>(self, f: F) -> Result<T, IsleError>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Table) -> mlua::Result<T> + Send + 'static,
    {
        self.run(crate::host::submit::exec_env(f))
    }

    /// Like [`exec`](Self::exec), but returns at once with a [`Task`].
    pub fn spawn_exec<T, F>(self, f: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(&Lua, &Table) -> mlua::Result<T> + Send + 'static,
    {
        self.spawn(crate::host::submit::exec_env(f))
    }

    /// As [`Session::spawn_exec_async`] (the `async` feature).
    #[cfg(feature = "async")]
    pub fn spawn_exec_async<T, F, Fut>(self, f: F) -> Task<T>
    where
        T: Send + 'static,
        F: FnOnce(Lua, Table) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = mlua::Result<T>> + 'static,
    {
        self.spawn(crate::host::submit::exec_env_async(f))
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("key", &self.key.key)
            .finish()
    }
}
