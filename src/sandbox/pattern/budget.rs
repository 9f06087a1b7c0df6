//! Counting the matcher's steps against the budget, and the result
//! buffer the library functions build into.

use super::*;

/// Counts one call's steps, polling every [`POLL_EVERY`].
pub(super) struct Budget<'a> {
    pub(super) lua: &'a Lua,
    pub(super) ctx: &'a PatternCtx,
    pub(super) steps: u32,
}

impl<'a> Budget<'a> {
    pub(super) fn new(lua: &'a Lua, ctx: &'a PatternCtx) -> Self {
        // ORDERING: Relaxed: only the VM's thread runs the matcher.
        let steps = ctx.pending.load(Ordering::Relaxed);
        Budget { lua, ctx, steps }
    }

    #[inline(always)]
    pub(super) fn tick(&mut self) -> Res<()> {
        self.steps += 1;
        if self.steps >= POLL_EVERY {
            return self.poll();
        }
        Ok(())
    }

    /// Counts one step per [`BYTES_PER_STEP`] bytes of `bytes`.
    #[inline(always)]
    pub(super) fn charge_bytes(&mut self, bytes: usize) -> Res<()> {
        if bytes >= BYTES_PER_STEP {
            let n = u32::try_from(bytes / BYTES_PER_STEP).unwrap_or(u32::MAX);
            self.steps = self.steps.saturating_add(n);
            if self.steps >= POLL_EVERY {
                return self.poll();
            }
        }
        Ok(())
    }

    /// `a == b` (of equal lengths), counting the bytes compared until the
    /// first difference (to within a chunk).
    pub(super) fn equal(&mut self, a: &[u8], b: &[u8]) -> Res<bool> {
        const CHUNK: usize = 8 * BYTES_PER_STEP;
        for (x, y) in a.chunks(CHUNK).zip(b.chunks(CHUNK)) {
            self.charge_bytes(x.len())?;
            if x != y {
                return Ok(false);
            }
        }
        Ok(true)
    }

    #[cold]
    #[inline(never)]
    pub(super) fn poll(&mut self) -> Res<()> {
        let n = std::mem::take(&mut self.steps);
        (self.ctx.poll)(self.lua, n).map_err(Fail::stop)
    }
}

impl Drop for Budget<'_> {
    fn drop(&mut self) {
        self.ctx.pending.store(self.steps, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// The result buffer

/// `gsub`'s result as it is built: Rust memory, so every growth is checked
/// against the VM's memory limit (as Lua's `luaL_Buffer`, allocated by the
/// VM, is), and every byte copied counts as matcher work, so that a huge
/// replacement is stoppable.
#[derive(Default)]
pub(super) struct Out {
    pub(super) bytes: Vec<u8>,
}

impl Out {
    #[inline]
    pub(super) fn push(&mut self, budget: &mut Budget<'_>, bytes: &[u8]) -> Res<()> {
        budget.charge_bytes(bytes.len())?;
        if self.bytes.capacity() - self.bytes.len() < bytes.len() {
            self.grow(budget.lua, bytes.len())?;
        }
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    /// Makes room for `more` bytes: doubles, or takes just what is needed
    /// when doubling would not fit under the memory limit.
    #[cold]
    #[inline(never)]
    pub(super) fn grow(&mut self, lua: &Lua, more: usize) -> Res<()> {
        let (len, cap) = (self.bytes.len(), self.bytes.capacity());
        let need = len.checked_add(more).ok_or_else(Fail::memory)?;
        let doubled = cap.saturating_mul(2).max(need).max(64);
        // The buffer held is the new one (a reallocation may briefly hold
        // both, as Lua's allocator does).
        let new_cap = [doubled, need]
            .into_iter()
            .find(|&c| room::fits(lua, c))
            .ok_or_else(Fail::memory)?;
        self.bytes
            .try_reserve_exact(new_cap - len)
            .map_err(|_| Fail::memory())
    }

    /// The result as a Lua string. Like `luaL_pushresult`, this needs the
    /// buffer and the string at once.
    pub(super) fn into_string(self, lua: &Lua) -> Res<LuaString> {
        let held = self.bytes.capacity();
        if !room::fits(lua, held.saturating_add(self.bytes.len())) {
            return Err(Fail::memory());
        }
        Ok(lua.create_string(&self.bytes)?)
    }
}
