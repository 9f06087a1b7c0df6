//! One VM's side of a reload: running the function with an undo record,
//! rolling it back, and the version of the code the VM runs.
//!
//! The undo record is the global table's entries the function changed,
//! added or removed (compared raw, key by key), with the values they had;
//! in the sandbox, also the entries of the copy sessions read. It lives in
//! the registry (a Lua table: Lua values outlive nothing they should not),
//! the version in the VM's app data.
//!
//! Restoring uses raw table writes only: no Lua code runs, so neither a
//! hook nor a stopped request can interrupt it half-way.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

use mlua::{Lua, Table, Value};

use super::ReloadFn;

/// Where the undo record of the reload in flight lives.
const UNDO: &str = "mlua-isle reload undo";

/// The reloads this VM has run.
#[derive(Clone, Copy, Default)]
struct Applied {
    /// The version of its code: the last reload run (0: none).
    version: u64,
    /// The reload whose undo record it holds (in flight: not committed).
    undo: Option<u64>,
}

fn applied(lua: &Lua) -> Applied {
    lua.app_data_ref::<Applied>()
        .map_or_else(Applied::default, |a| *a)
}

fn set_applied(lua: &Lua, a: Applied) {
    lua.set_app_data(a);
}

/// The version of the code this VM runs.
pub(in crate::pool) fn version(lua: &Lua) -> u64 {
    applied(lua).version
}

/// At a VM's start (after `init` and the sandbox): every committed reload,
/// in order, then the one in flight (`pending`), which keeps its undo
/// record as on a live VM. Any failure is a failure to start.
pub(in crate::pool) fn replay(
    lua: &Lua,
    done: &[Arc<ReloadFn>],
    pending: Option<&Arc<ReloadFn>>,
) -> mlua::Result<()> {
    for (i, f) in done.iter().enumerate() {
        let v = i as u64 + 1;
        apply(lua, v, &**f)?;
        commit(lua, v);
    }
    if let Some(f) = pending {
        apply(lua, done.len() as u64 + 1, &**f)?;
    }
    Ok(())
}

/// Runs reload `version` (`f`) on this VM, unless the VM runs it already
/// (it started while the reload was in flight). On success the VM is on
/// `version` and holds the undo record; on failure (an error, a panic) the
/// globals are put back as they were and the error (the panic) passes on.
pub(in crate::pool) fn apply(lua: &Lua, version: u64, f: &ReloadFn) -> mlua::Result<()> {
    let was = applied(lua);
    if was.version >= version {
        return Ok(());
    }
    let globals = lua.globals();
    let before = copy(lua, &globals)?;
    match catch_unwind(AssertUnwindSafe(|| f(lua))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            restore_changed(&globals, &before);
            return Err(e);
        }
        Err(panic) => {
            restore_changed(&globals, &before);
            resume_unwind(panic);
        }
    }
    // The undo record: each changed key, its value before, and in the
    // sandbox its value in the copy sessions read.
    let record = changed(&globals, &before).and_then(|keys| {
        let base = crate::sandbox::session_globals(lua)?;
        let record = lua.create_table_with_capacity(keys.len(), 0)?;
        for k in &keys {
            let entry = lua.create_table_with_capacity(3, 0)?;
            entry.raw_set(1, k.clone())?;
            entry.raw_set(2, before.raw_get::<Value>(k.clone())?)?;
            if let Some(base) = &base {
                entry.raw_set(3, base.raw_get::<Value>(k.clone())?)?;
            }
            record.raw_push(entry)?;
        }
        lua.set_named_registry_value(UNDO, &record)?;
        Ok((keys, record))
    });
    let (keys, record) = match record {
        Ok(r) => r,
        Err(e) => {
            restore_changed(&globals, &before);
            return Err(e);
        }
    };
    // In the sandbox: tables become views, and sessions see the globals.
    // Lua code: a stop may interrupt it, and then the record undoes it.
    let adopted = crate::sandbox::adopt(lua).and_then(|adopt| match adopt {
        Some(adopt) => keys.iter().try_for_each(|k| adopt.call::<()>(k.clone())),
        None => Ok(()),
    });
    if let Err(e) = adopted {
        restore(lua, &record);
        forget(lua);
        return Err(e);
    }
    set_applied(
        lua,
        Applied {
            version,
            undo: Some(version),
        },
    );
    Ok(())
}

/// Reload `version` failed somewhere: if this VM ran it, its globals go
/// back to what they were before, and the VM to the version before.
pub(in crate::pool) fn rollback(lua: &Lua, version: u64) {
    let a = applied(lua);
    if a.undo != Some(version) || a.version != version {
        return;
    }
    if let Ok(Some(record)) = lua.named_registry_value::<Option<Table>>(UNDO) {
        restore(lua, &record);
    }
    forget(lua);
    set_applied(
        lua,
        Applied {
            version: version - 1,
            undo: None,
        },
    );
}

/// Reload `version` is committed everywhere: its undo record goes.
pub(in crate::pool) fn commit(lua: &Lua, version: u64) {
    let a = applied(lua);
    if a.undo == Some(version) {
        forget(lua);
        set_applied(
            lua,
            Applied {
                version: a.version,
                undo: None,
            },
        );
    }
}

fn forget(lua: &Lua) {
    let _ = lua.set_named_registry_value(UNDO, Value::Nil);
}

/// A raw copy of `t`.
fn copy(lua: &Lua, t: &Table) -> mlua::Result<Table> {
    let out = lua.create_table()?;
    t.for_each(|k: Value, v: Value| out.raw_set(k, v))?;
    Ok(out)
}

/// The keys whose raw values differ between `now` and `before`.
fn changed(now: &Table, before: &Table) -> mlua::Result<Vec<Value>> {
    let mut keys = Vec::new();
    now.for_each(|k: Value, v: Value| {
        if before.raw_get::<Value>(k.clone())? != v {
            keys.push(k);
        }
        Ok(())
    })?;
    before.for_each(|k: Value, _: Value| {
        if now.raw_get::<Value>(k.clone())? == Value::Nil {
            keys.push(k);
        }
        Ok(())
    })?;
    Ok(keys)
}

/// Puts `globals` back as `before` has it, where they differ. Best effort:
/// a write that fails (no memory left) leaves that entry as it is.
fn restore_changed(globals: &Table, before: &Table) {
    if let Ok(keys) = changed(globals, before) {
        for k in keys {
            if let Ok(v) = before.raw_get::<Value>(k.clone()) {
                let _ = globals.raw_set(k, v);
            }
        }
    }
}

/// Applies an undo record: the globals (and in the sandbox, the copy
/// sessions read) get back the values it holds. Best effort, as above.
fn restore(lua: &Lua, record: &Table) {
    let globals = lua.globals();
    let base = crate::sandbox::session_globals(lua).ok().flatten();
    let _ = record.for_each(|_: Value, entry: Table| {
        let k: Value = entry.raw_get(1)?;
        let _ = globals.raw_set(k.clone(), entry.raw_get::<Value>(2)?);
        if let Some(base) = &base {
            let _ = base.raw_set(k, entry.raw_get::<Value>(3)?);
        }
        Ok(())
    });
}
