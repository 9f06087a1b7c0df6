//! Fair service of the sessions bound to one VM.
//!
//! Session work reaches a worker through its pinned queue, first come first
//! served. Served in that order, a tenant that queues 10,000 requests makes
//! every other tenant on the VM wait behind all of them. So the worker moves
//! what arrives into one queue per session (`Fair`), and serves the sessions
//! with queued work in turn, one request per turn, passing over those that
//! owe the others time (a deficit round robin whose cost is run time).
//!
//! - Every key with queued work is in the ring, once. The worker takes the
//!   key at the front; if the key owes no time, it runs the key's oldest
//!   request; else the key goes to the back.
//! - The key being served is out of the ring until its request ends; then,
//!   if it has more, it goes to the back, behind the keys whose first
//!   requests arrived meanwhile. So a quiet key waits for at most the
//!   running request and one request of each other key with work.
//! - Time is the cost: a request's run time is charged to its key, and a
//!   key is credited with the time the VM spent on other keys' requests
//!   while it waited. A key whose requests take 5 ms beside one whose
//!   requests take 5 µs runs once per thousand of the other's: both get
//!   the VM's time, not just its turns. When every key owes time, all are
//!   credited what the least indebted one owes. Credit is only ever time a
//!   key waited with work queued, and it buys no more than one request a
//!   turn.
//! - A key whose queue empties starts afresh next time: debt is not carried
//!   between busy periods.
//! - A key whose request is suspended (the `async` feature) leaves the ring
//!   until that request resolves; its later items wait in its queue, in
//!   order (counted as queued, but not as work the VM could take), then
//!   take turns like any others. A replacement for a wedged worker lets
//!   them go: the stuck VM's suspended requests were answered already.
//! - A broadcast runs after the session work queued before it (its
//!   contract): arrivals behind it stay in the pinned queue until it has run.
//!   A `LuaHandle`'s request for a value of this VM made by unkeyed work
//!   (`Pinned::Direct`) is served the same way.
//!
//! The state lives in `Shared` behind a lock only its worker takes on its
//! path (once to find work, once when a session's request ends), so the
//! fresh worker that replaces a wedged one takes it over as it is.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_deque::Injector;
use parking_lot::Mutex;

use super::session::{oversized, ById};
use super::shared::{steal_one, Pinned};

/// One worker's fair queue, and counts of what it holds (read without the
/// lock: by the worker when deciding whether to sleep, and by metrics).
#[derive(Default)]
pub(super) struct FairSlot {
    fair: Mutex<Fair>,
    /// What `next` could hand out (items not held behind a suspended
    /// request, and a broadcast).
    ready: AtomicUsize,
    /// Everything held.
    len: AtomicUsize,
}

impl FairSlot {
    /// Requests (and session closes, and a broadcast) held here, including
    /// those waiting behind a suspended request of their session.
    pub(super) fn len(&self) -> usize {
        // ORDERING: Relaxed: a hint for metrics; the queue itself is read
        // under the lock.
        self.len.load(Ordering::Relaxed)
    }

    /// What `next` could hand out now: the worker has work here.
    pub(super) fn ready(&self) -> usize {
        // ORDERING: Relaxed: an idle check, made again under the sleep
        // protocol; the queue itself is read under the lock.
        self.ready.load(Ordering::Relaxed)
    }

    /// Moves what waits in `intake` here, and takes the next thing to run,
    /// marking its key as being served by `generation` (the worker's).
    pub(super) fn next(&self, intake: &Injector<Pinned>, generation: u64) -> Option<Pinned> {
        if self.ready() == 0 && intake.is_empty() {
            return None;
        }
        self.with(|fair| fair.next(intake, generation))
    }

    /// The request (or close) of key `id` that `generation` took has ended
    /// after running for `ran`, or has `suspended` (the `async` feature):
    /// then the key's later items wait here until [`resume`](Self::resume).
    pub(super) fn done(&self, id: u64, generation: u64, ran: Duration, suspended: bool) {
        self.with(|fair| fair.done(id, generation, ran, suspended));
    }

    /// The suspended request of key `id` ran a later poll for `ran`: the
    /// key's cost, as a request's first run is.
    pub(super) fn charge(&self, id: u64, ran: Duration) {
        self.with(|fair| {
            let ran = u64::try_from(ran.as_nanos()).unwrap_or(u64::MAX);
            fair.clock = fair.clock.saturating_add(ran);
            if let Some(q) = fair.keys.get_mut(&id) {
                q.deficit = q
                    .deficit
                    .saturating_sub(i64::try_from(ran).unwrap_or(i64::MAX));
                q.seen = fair.clock;
            }
        });
    }

    /// The suspended request of key `id` has resolved: its later items take
    /// turns again.
    pub(super) fn resume(&self, id: u64) {
        self.with(|fair| fair.resume(id));
    }

    /// A fresh worker takes the slot over from a wedged one: the key that
    /// one was serving is served again (its request was answered already),
    /// and so are keys whose suspended requests the stuck VM held (they
    /// were answered when it was replaced).
    pub(super) fn take_over(&self) {
        self.with(|fair| {
            if let Some((id, generation)) = fair.in_service {
                fair.done(id, generation, Duration::ZERO, false);
            }
            let busy: Vec<u64> = fair
                .keys
                .iter()
                .filter(|(_, q)| q.busy)
                .map(|(&id, _)| id)
                .collect();
            for id in busy {
                fair.resume(id);
            }
        });
    }

    /// Everything held, for a pool that has stopped.
    pub(super) fn take_all(&self) -> Vec<Pinned> {
        self.with(|fair| {
            let mut all: Vec<Pinned> = fair.barrier.take().into_iter().collect();
            for (_, q) in fair.keys.drain() {
                all.extend(q.items.first);
                all.extend(q.items.rest);
            }
            fair.ring.clear();
            fair.in_service = None;
            fair.returning = None;
            fair.len = 0;
            fair.held = 0;
            all
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Fair) -> R) -> R {
        let mut fair = self.fair.lock();
        let r = f(&mut fair);
        let barrier = usize::from(fair.barrier.is_some());
        // ORDERING: Relaxed: see `len` and `ready`.
        self.len.store(fair.len + barrier, Ordering::Relaxed);
        self.ready
            .store(fair.len - fair.held + barrier, Ordering::Relaxed);
        r
    }
}

#[derive(Default)]
struct Fair {
    /// Each key with queued work, being served, or with a request
    /// suspended (`busy`), by binding id.
    keys: ById<KeyQueue>,
    /// The keys with queued work that are not being served, in turn order.
    ring: VecDeque<u64>,
    /// The key whose request runs, and the worker generation running it.
    in_service: Option<(u64, u64)>,
    /// The key served last, with more work: back into the ring after what
    /// arrived while it ran.
    returning: Option<u64>,
    /// A broadcast (or a handle's request, `Pinned::Direct`) waiting for
    /// the session work queued before it.
    barrier: Option<Pinned>,
    /// Items in the keys' queues.
    len: usize,
    /// Of those, items of keys whose request is suspended (`busy`).
    held: usize,
    /// Nanoseconds of session requests run from this queue, ever.
    clock: u64,
}

struct KeyQueue {
    items: Items,
    /// Nanoseconds of VM time owed to (positive) or by (negative) the key.
    deficit: i64,
    /// `clock` when the key was last considered or charged.
    seen: u64,
    /// A request of the key is suspended (the `async` feature): the key is
    /// out of the ring, its items wait, in order, until it resolves.
    busy: bool,
}

/// A key's queued items, oldest first. The oldest is kept inline: with
/// many keys each sending a request at a time, most keys hold one item, and
/// a queue of its own would cost each request an allocation (callgrind: a
/// tenth of a tiny session request's time on the VM thread, with 1,000
/// keys and 256 requests in flight).
#[derive(Default)]
struct Items {
    /// `None` only if `rest` is empty too.
    first: Option<Pinned>,
    rest: VecDeque<Pinned>,
}

impl Items {
    fn one(item: Pinned) -> Items {
        Items {
            first: Some(item),
            rest: VecDeque::new(),
        }
    }

    fn push_back(&mut self, item: Pinned) {
        if self.first.is_none() {
            self.first = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    fn pop_front(&mut self) -> Option<Pinned> {
        let item = self.first.take()?;
        self.first = self.rest.pop_front();
        Some(item)
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }
}

impl Fair {
    fn next(&mut self, intake: &Injector<Pinned>, generation: u64) -> Option<Pinned> {
        if self.keys.is_empty() && self.in_service.is_none() && self.barrier.is_none() {
            // Nothing held, and most often one item waiting: it is served
            // at once, without a queue of its own.
            let item = steal_one(|| intake.steal())?;
            match item {
                b @ (Pinned::Broadcast(_) | Pinned::Direct(_)) => return Some(b),
                _ if intake.is_empty() => {
                    self.in_service = Some((key_of(&item), generation));
                    return Some(item);
                }
                _ => self.push(item),
            }
        }
        self.fill(intake);
        if let Some(id) = self.returning.take() {
            self.ring.push_back(id);
        }
        self.pop(generation)
    }

    /// Takes everything from `intake`, up to a broadcast. Looks before it
    /// steals: a steal from an empty queue costs a `SeqCst` fence. An item
    /// pushed meanwhile is taken by the next call (its push woke this
    /// worker, or will).
    fn fill(&mut self, intake: &Injector<Pinned>) {
        while self.barrier.is_none() && !intake.is_empty() {
            match steal_one(|| intake.steal()) {
                None => return,
                Some(b @ (Pinned::Broadcast(_) | Pinned::Direct(_))) => self.barrier = Some(b),
                Some(item) => self.push(item),
            }
        }
    }

    fn push(&mut self, item: Pinned) {
        let id = key_of(&item);
        self.len += 1;
        let vacant = match self.keys.entry(id) {
            Entry::Occupied(q) => {
                // Queued already: in the ring, being served, returning, or
                // held behind its suspended request.
                let q = q.into_mut();
                q.items.push_back(item);
                self.held += usize::from(q.busy);
                return;
            }
            Entry::Vacant(vacant) => vacant,
        };
        vacant.insert(KeyQueue {
            items: Items::one(item),
            deficit: 0,
            seen: self.clock,
            busy: false,
        });
        // The key being served (taken by the shortcut in `next`, with no
        // queue) joins the ring when it is done, not before.
        if self.in_service.map(|(key, _)| key) != Some(id) {
            self.ring.push_back(id);
        }
    }

    /// The next key's oldest item (see the module docs), or the broadcast
    /// once nothing queued before it is left.
    fn pop(&mut self, generation: u64) -> Option<Pinned> {
        if self.in_service.is_some() || self.returning.is_some() {
            // Not yet told the last one is done (its worker always says so
            // before it looks for more work; `next` re-rings a returning
            // key before it pops).
            return None;
        }
        let mut passed = 0;
        while let Some(&id) = self.ring.front() {
            let q = self
                .keys
                .get_mut(&id)
                .expect("a key in the ring has a queue");
            let others = i64::try_from(self.clock - q.seen).unwrap_or(i64::MAX);
            q.deficit = q.deficit.saturating_add(others);
            q.seen = self.clock;
            if q.deficit >= 0 {
                self.ring.pop_front();
                let item = q.items.pop_front().expect("a key in the ring has work");
                self.len -= 1;
                self.in_service = Some((id, generation));
                return Some(item);
            }
            self.ring.rotate_left(1);
            passed += 1;
            if passed >= self.ring.len() {
                // A whole turn and nobody may run: give every key what the
                // least indebted one lacks, so it runs next.
                let lift = self
                    .ring
                    .iter()
                    .map(|id| -self.keys[id].deficit)
                    .min()
                    .unwrap_or(0)
                    .max(0);
                for id in &self.ring {
                    if let Some(q) = self.keys.get_mut(id) {
                        q.deficit += lift;
                    }
                }
                passed = 0;
            }
        }
        // Items held behind a suspended request are not waited for (nor is
        // the request): they run when it resolves.
        if self.len == self.held {
            self.barrier.take()
        } else {
            None
        }
    }

    fn done(&mut self, id: u64, generation: u64, ran: Duration, suspended: bool) {
        if self.in_service != Some((id, generation)) {
            return;
        }
        self.in_service = None;
        let ran = u64::try_from(ran.as_nanos()).unwrap_or(u64::MAX);
        self.clock = self.clock.saturating_add(ran);
        if suspended {
            // Kept out of the ring, with or without items, until `resume`.
            let seen = self.clock;
            let q = self.keys.entry(id).or_insert_with(|| KeyQueue {
                items: Items::default(),
                deficit: 0,
                seen,
                busy: false,
            });
            q.busy = true;
            self.held += q.items.len();
            q.deficit = q
                .deficit
                .saturating_sub(i64::try_from(ran).unwrap_or(i64::MAX));
            q.seen = self.clock;
            return;
        }
        let Entry::Occupied(entry) = self.keys.entry(id) else {
            return;
        };
        if entry.get().items.is_empty() {
            entry.remove();
            if oversized(self.keys.len(), self.keys.capacity()) {
                // A burst of many keys is over (or mostly): give its
                // memory back.
                self.keys.shrink_to(self.keys.len() * 2);
                self.ring.shrink_to(self.ring.len() * 2);
            }
        } else {
            let q = entry.into_mut();
            q.deficit = q
                .deficit
                .saturating_sub(i64::try_from(ran).unwrap_or(i64::MAX));
            q.seen = self.clock;
            self.returning = Some(id);
        }
    }
}

impl Fair {
    fn resume(&mut self, id: u64) {
        let Some(q) = self.keys.get_mut(&id) else {
            return;
        };
        if !q.busy {
            return;
        }
        q.busy = false;
        self.held -= q.items.len();
        if q.items.is_empty() {
            self.keys.remove(&id);
        } else {
            self.ring.push_back(id);
        }
    }
}

/// The session an item belongs to.
fn key_of(item: &Pinned) -> u64 {
    match item {
        Pinned::Session(binding, _) => binding.id,
        Pinned::Close(id) => *id,
        Pinned::Broadcast(_) | Pinned::Direct(_) => {
            unreachable!("a broadcast is a barrier, not a key's")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves everything queued in `slot`, each item of key `k` running
    /// for `cost(k)`, and returns the keys in the order served.
    fn serve(
        slot: &FairSlot,
        intake: &Injector<Pinned>,
        cost: impl Fn(u64) -> Duration,
    ) -> Vec<u64> {
        let mut order = Vec::new();
        while let Some(item) = slot.next(intake, 7) {
            let Pinned::Close(id) = item else {
                panic!("only closes are queued here");
            };
            order.push(id);
            slot.done(id, 7, cost(id), false);
        }
        assert_eq!(slot.len(), 0);
        order
    }

    fn queue(intake: &Injector<Pinned>, key: u64, n: usize) {
        for _ in 0..n {
            intake.push(Pinned::Close(key));
        }
    }

    /// A burst of 100,000 keys, served while one key always has work (so
    /// the table never empties): the table gives its room back.
    #[test]
    fn a_burst_of_keys_gives_its_room_back_while_one_key_stays_busy() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 2);
        for k in 2..100_002 {
            queue(&intake, k, 1);
        }
        let Some(Pinned::Close(1)) = slot.next(&intake, 7) else {
            panic!("key 1 first");
        };
        let peak = slot.fair.lock().keys.capacity();
        slot.done(1, 7, Duration::from_micros(1), false);
        // Every burst key is served; key 1 always has an item waiting.
        for _ in 0..100_000 {
            let Some(Pinned::Close(k)) = slot.next(&intake, 7) else {
                panic!("an item");
            };
            slot.done(k, 7, Duration::from_micros(1), false);
            if k == 1 {
                queue(&intake, 1, 1);
            }
        }
        let fair = slot.fair.lock();
        assert!(fair.keys.len() <= 2, "{} keys", fair.keys.len());
        assert!(
            fair.keys.capacity() <= KEEP_SLOTS_FOR_TESTS,
            "room for {} keys kept of {peak}",
            fair.keys.capacity()
        );
    }

    /// Room kept after the burst: a few times what a table that never grew keeps.
    const KEEP_SLOTS_FOR_TESTS: usize = 4 * crate::pool::session::KEEP_SLOTS;

    #[test]
    fn equal_costs_take_plain_turns() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 4);
        queue(&intake, 2, 2);
        queue(&intake, 3, 1);
        let order = serve(&slot, &intake, |_| Duration::from_micros(10));
        assert_eq!(order, [1, 2, 3, 1, 2, 1, 1]);
    }

    #[test]
    fn a_key_with_long_requests_gets_time_not_turns() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 3);
        queue(&intake, 2, 3_000);
        let cost = |k| match k {
            1 => Duration::from_millis(5),
            _ => Duration::from_micros(5),
        };
        let order = serve(&slot, &intake, cost);
        let long: Vec<usize> = (0..order.len()).filter(|&i| order[i] == 1).collect();
        // 5 ms of the short key's requests between the long key's.
        assert_eq!(long[0], 0);
        assert_eq!(long[1] - long[0] - 1, 1_000, "{long:?}");
        assert_eq!(long[2] - long[1] - 1, 1_000, "{long:?}");
    }

    #[test]
    fn a_key_owing_time_is_passed_over_until_the_others_have_had_it() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 3);
        queue(&intake, 2, 3);
        queue(&intake, 3, 1);
        let cost = |k| Duration::from_millis(if k == 1 { 2 } else { 1 });
        // 1 runs 2 ms; 2 and 3 run 1 ms each and are even with it; 1 runs
        // again, and 2 twice for its 2 ms. Alone with debts, each still runs.
        let order = serve(&slot, &intake, cost);
        assert_eq!(order, [1, 2, 3, 1, 2, 2, 1]);
    }

    #[test]
    fn a_key_arriving_while_another_runs_goes_first() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 3);
        let Some(Pinned::Close(1)) = slot.next(&intake, 7) else {
            panic!("key 1 first");
        };
        queue(&intake, 2, 1);
        slot.done(1, 7, Duration::from_micros(1), false);
        let order = serve(&slot, &intake, |_| Duration::from_micros(1));
        assert_eq!(order, [2, 1, 1]);
    }

    #[test]
    fn a_lone_request_taken_at_once_still_lets_later_arrivals_first() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        // One item, nothing held: the shortcut.
        queue(&intake, 1, 1);
        assert!(matches!(slot.next(&intake, 7), Some(Pinned::Close(1))));
        assert_eq!(slot.len(), 0);
        // While it runs, more of key 1 and one of key 2.
        queue(&intake, 1, 2);
        queue(&intake, 2, 1);
        assert!(slot.next(&intake, 7).is_none(), "key 1 is still running");
        slot.done(1, 7, Duration::from_micros(1), false);
        let order = serve(&slot, &intake, |_| Duration::from_micros(1));
        assert_eq!(order, [2, 1, 1]);
    }

    #[test]
    fn a_suspended_key_holds_its_items_back_until_it_resumes() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 1);
        assert!(matches!(slot.next(&intake, 7), Some(Pinned::Close(1))));
        // Key 1's request suspends; more of it, and key 2, arrive.
        slot.done(1, 7, Duration::from_micros(1), true);
        queue(&intake, 1, 2);
        queue(&intake, 2, 1);
        assert!(matches!(slot.next(&intake, 7), Some(Pinned::Close(2))));
        slot.done(2, 7, Duration::from_micros(1), false);
        // Key 1's two are held: counted, but nothing to hand out.
        assert!(slot.next(&intake, 7).is_none());
        assert_eq!((slot.len(), slot.ready()), (2, 0));
        slot.resume(1);
        assert_eq!(slot.ready(), 2);
        assert_eq!(serve(&slot, &intake, |_| Duration::from_micros(1)), [1, 1]);
    }

    #[test]
    fn a_replacement_releases_keys_suspended_on_the_stuck_vm() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 1);
        assert!(slot.next(&intake, 7).is_some());
        slot.done(1, 7, Duration::ZERO, true);
        queue(&intake, 1, 1);
        assert!(slot.next(&intake, 7).is_none());
        slot.take_over();
        assert_eq!(serve(&slot, &intake, |_| Duration::ZERO), [1]);
    }

    #[test]
    fn a_replacement_worker_takes_over_the_key_in_service() {
        let (slot, intake) = (FairSlot::default(), Injector::new());
        queue(&intake, 1, 2);
        assert!(slot.next(&intake, 7).is_some());
        // Generation 7 is stuck in key 1's request; nothing else is handed
        // out until it is done or replaced.
        assert!(slot.next(&intake, 8).is_none());
        slot.take_over();
        // The stuck one's late report changes nothing.
        slot.done(1, 7, Duration::ZERO, false);
        assert!(matches!(slot.next(&intake, 8), Some(Pinned::Close(1))));
        slot.done(1, 8, Duration::ZERO, false);
        assert!(slot.next(&intake, 8).is_none());
        assert_eq!(slot.len(), 0);
    }
}
