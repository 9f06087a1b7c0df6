//! The key-value store the server's Lua handlers await, and the `kv` table
//! that binds a handler to its tenant's namespace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlua_isle::mlua::{self, IntoLua, Lua};

/// An in-memory key-value store, namespaced by tenant, with a simulated
/// delay on every operation (`tokio::time::sleep`).
pub struct Kv {
    delay: Duration,
    tenants: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl Kv {
    /// An empty store whose operations each wait `delay`.
    pub fn new(delay: Duration) -> Kv {
        Kv {
            delay,
            tenants: Mutex::default(),
        }
    }

    /// `tenant`'s value for `key`.
    pub async fn get(&self, tenant: &str, key: &str) -> Option<String> {
        self.pause().await;
        let tenants = self.tenants.lock().unwrap();
        tenants.get(tenant)?.get(key).cloned()
    }

    /// Sets `tenant`'s value for `key`.
    pub async fn put(&self, tenant: &str, key: String, value: String) {
        self.pause().await;
        let mut tenants = self.tenants.lock().unwrap();
        match tenants.get_mut(tenant) {
            Some(map) => map.insert(key, value),
            None => tenants
                .entry(tenant.to_string())
                .or_default()
                .insert(key, value),
        };
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

/// The `kv` a handler of `tenant` gets: a Lua table with `kv.get(key)` and
/// `kv.put(key, value)`, async Rust functions bound to `tenant`'s
/// namespace. The tenant comes from the URL through this value, never from
/// Lua, so no handler can name another tenant's keys. Made on the VM for
/// each request.
pub struct TenantKv {
    pub kv: Arc<Kv>,
    pub tenant: Arc<str>,
}

impl IntoLua for TenantKv {
    fn into_lua(self, lua: &Lua) -> mlua::Result<mlua::Value> {
        let table = lua.create_table()?;
        let (store, name) = (self.kv.clone(), self.tenant.clone());
        let get = lua.create_async_function(move |_, key: String| {
            let (store, name) = (store.clone(), name.clone());
            async move { Ok(store.get(&name, &key).await) }
        })?;
        let (store, name) = (self.kv, self.tenant);
        let put = lua.create_async_function(move |_, (key, value): (String, String)| {
            let (store, name) = (store.clone(), name.clone());
            async move {
                store.put(&name, key, value).await;
                Ok(())
            }
        })?;
        table.set("get", get)?;
        table.set("put", put)?;
        Ok(mlua::Value::Table(table))
    }
}
