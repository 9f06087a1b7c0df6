//! A least-recently-used map of compiled chunks: a slab of entries linked
//! from the most to the least recently used, indexed by a hash computed once
//! by the caller.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use mlua::{Function, Table};

use crate::Chunk;

/// One cached chunk.
pub(super) struct Entry {
    /// Hash of `(env_id, name, source)`.
    pub(super) hash: u64,
    /// Identity of the environment (its table's address; 0 for the
    /// globals).
    pub(super) env_id: usize,
    /// Holds the environment, so that its address is not reused by another
    /// table while this entry exists. (The function holds it too, as
    /// `_ENV`; this does not depend on that.)
    pub(super) _env: Option<Table>,
    /// The source and its name (shared with the caller's `Chunk`).
    pub(super) chunk: Chunk,
    pub(super) function: Function,
}

impl Entry {
    /// Bytes the entry counts against the cache's bound.
    fn bytes(&self) -> usize {
        self.chunk.source().len() + self.chunk.lua_name().len()
    }
}

/// No slot.
const NIL: usize = usize::MAX;

/// Entries in a slab, linked from the most to the least recently used, and
/// indexed by their hash. Two sources with the same hash are never both
/// kept: the newer replaces the older (with 64-bit hashes, that is for
/// correctness only).
pub(super) struct Lru {
    index: HashMap<u64, usize, BuildHasherDefault<Prehashed>>,
    slots: Vec<Node>,
    /// Most recently used slot, or `NIL`.
    newest: usize,
    /// Least recently used slot, or `NIL`.
    oldest: usize,
    /// Total bytes of the entries' sources and names.
    bytes: usize,
}

struct Node {
    entry: Entry,
    /// Neighbours towards `newest` and `oldest` (`NIL` at the ends).
    newer: usize,
    older: usize,
}

impl Default for Lru {
    fn default() -> Self {
        Lru {
            index: HashMap::default(),
            slots: Vec::new(),
            newest: NIL,
            oldest: NIL,
            bytes: 0,
        }
    }
}

impl Lru {
    /// The function cached for exactly `(env_id, chunk)`, now the most
    /// recently used.
    pub(super) fn get(&mut self, hash: u64, env_id: usize, chunk: &Chunk) -> Option<Function> {
        let i = *self.index.get(&hash)?;
        let entry = &self.slots[i].entry;
        if entry.env_id != env_id
            || !(std::sync::Arc::ptr_eq(entry.chunk.shared_source(), chunk.shared_source())
                || entry.chunk.source() == chunk.source())
            || entry.chunk.given_name() != chunk.given_name()
        {
            return None;
        }
        let function = entry.function.clone();
        self.unlink(i);
        self.push_newest(i);
        Some(function)
    }

    /// Adds `entry` as the most recently used, then evicts the least
    /// recently used ones until both bounds hold.
    pub(super) fn insert(&mut self, entry: Entry, max_entries: usize, max_bytes: usize) {
        if let Some(&i) = self.index.get(&entry.hash) {
            self.remove(i);
        }
        let i = self.slots.len();
        self.index.insert(entry.hash, i);
        self.bytes += entry.bytes();
        self.slots.push(Node {
            entry,
            newer: NIL,
            older: NIL,
        });
        self.push_newest(i);
        while self.slots.len() > max_entries || self.bytes > max_bytes {
            self.remove(self.oldest);
        }
    }

    /// Removes every entry `doomed` says so of.
    pub(super) fn remove_where(&mut self, doomed: impl Fn(&Entry) -> bool) {
        // From the back: `remove` moves the last slot into the hole, and
        // every slot behind `i` has been looked at already.
        for i in (0..self.slots.len()).rev() {
            if doomed(&self.slots[i].entry) {
                self.remove(i);
            }
        }
    }

    /// Removes slot `i`; the last slot moves into its place.
    fn remove(&mut self, i: usize) {
        self.unlink(i);
        let slot = self.slots.swap_remove(i);
        self.index.remove(&slot.entry.hash);
        self.bytes -= slot.entry.bytes();
        if i < self.slots.len() {
            // The slot that was last is now at `i`: point its neighbours
            // and its index entry there.
            let (newer, older, hash) = {
                let moved = &self.slots[i];
                (moved.newer, moved.older, moved.entry.hash)
            };
            match newer {
                NIL => self.newest = i,
                n => self.slots[n].older = i,
            }
            match older {
                NIL => self.oldest = i,
                o => self.slots[o].newer = i,
            }
            self.index.insert(hash, i);
        }
    }

    /// Takes slot `i` out of the recency list.
    fn unlink(&mut self, i: usize) {
        let Node { newer, older, .. } = self.slots[i];
        match newer {
            NIL => self.newest = older,
            n => self.slots[n].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o].newer = newer,
        }
    }

    /// Puts slot `i` (unlinked) at the most recently used end.
    fn push_newest(&mut self, i: usize) {
        self.slots[i].newer = NIL;
        self.slots[i].older = self.newest;
        match self.newest {
            NIL => self.oldest = i,
            n => self.slots[n].newer = i,
        }
        self.newest = i;
    }
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Walks newest → oldest: every slot once, links and index agreeing.
    #[cfg(test)]
    pub(super) fn assert_consistent(&self) {
        let (mut seen, mut i, mut newer) = (0, self.newest, NIL);
        while i != NIL {
            assert_eq!(self.slots[i].newer, newer);
            assert_eq!(self.index[&self.slots[i].entry.hash], i);
            seen += 1;
            newer = i;
            i = self.slots[i].older;
        }
        assert_eq!(self.oldest, newer);
        assert_eq!(seen, self.slots.len());
        assert_eq!(seen, self.index.len());
        assert_eq!(
            self.bytes,
            self.slots.iter().map(|s| s.entry.bytes()).sum::<usize>()
        );
    }
}

/// The index's keys are hashes already: use them as they are.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
