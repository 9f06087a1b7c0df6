//! The server of `examples/server`: routes, tenants' Lua handlers and the
//! HTTP/1 accept loop (the key-value store they await is in `kv.rs`).
//!
//! `tests/server.rs` and `benches/server.rs` include this file and `kv.rs`
//! as they are (`#[path]`), so they test and measure the server the example
//! runs.
//!
//! Routes:
//! - `POST /t/{tenant}/handler`: the body is Lua source defining
//!   `function handle(req, kv) ... end`, run in the tenant's session;
//! - `DELETE /t/{tenant}/handler`: closes the tenant's session (its handler
//!   and globals go; its key-value entries stay);
//! - any other `/t/{tenant}/...`: runs the tenant's `handle(req, kv)` in its
//!   session (or the default handler if it has none) and answers with the
//!   string it returns;
//! - `GET /metrics`: the pool's counters, as text;
//! - `POST /reload`: the body is Lua source defining `handle`; it becomes
//!   the default handler of every tenant (an admin route: guard it in a real
//!   deployment).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mlua_isle::mlua::{self, BString, Function, IntoLua, Lua};
use mlua_isle::{IsleError, IslePool, PoolMetrics};
use tokio::net::TcpListener;

use crate::kv::{Kv, TenantKv};

/// What every tenant runs until it installs its own handler: a visit
/// counter kept in the key-value store, and an echo of the request.
pub const DEFAULT_HANDLER: &str = r#"
function handle(req, kv)
    local visits = (tonumber(kv.get("visits")) or 0) + 1
    kv.put("visits", visits)
    local query = req.query ~= "" and ("?" .. req.query) or ""
    return string.format("hello %s: visit %d, %s %s%s\n",
        req.tenant, visits, req.method, req.path, query)
end
"#;

/// Where a VM keeps the default handler (its Lua registry: no Lua code
/// running in the sandbox can reach it).
const DEFAULT_KEY: &str = "server.default_handler";

/// Request bodies (handler sources included) larger than this get 413.
const MAX_BODY: usize = 64 << 10;

/// The server's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Lua VMs in the pool.
    pub workers: usize,
    /// How long each `kv.get` / `kv.put` waits, as a remote store would.
    pub kv_delay: Duration,
    /// Time limit of every request, queue time included (then 504).
    pub timeout: Duration,
    /// Requests that may wait in the pool's queues (then 503).
    pub queue_capacity: usize,
    /// Memory each VM may use (a handler going past it gets 400).
    pub memory_limit: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            workers: 2,
            kv_delay: Duration::from_millis(1),
            timeout: Duration::from_secs(2),
            queue_capacity: 10_000,
            memory_limit: 256 << 20,
        }
    }
}

// ===== handlers =====

/// `init`: defines the global `handle`, which every session sees unless it
/// defines its own, and which calls this VM's current default handler (kept
/// where [`install_default`] puts it, so a reload reaches sessions, which
/// see only the globals `init` left); then makes `source` that handler.
fn init(lua: &Lua, source: &str) -> mlua::Result<()> {
    let current =
        lua.create_function(|lua, ()| lua.named_registry_value::<Function>(DEFAULT_KEY))?;
    let handle: Function = lua
        .load("local current = ...; return function(req, kv) return current()(req, kv) end")
        .set_name("default handler trampoline")
        .call(current)?;
    lua.globals().set("handle", handle)?;
    install_default(lua, source)
}

/// Compiles `source` (which must define `handle`) and makes it this VM's
/// default handler. Its globals are its own table reading through to the
/// VM's (shared by every tenant on the VM: the default handler is trusted
/// code).
fn install_default(lua: &Lua, source: &str) -> mlua::Result<()> {
    let env = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.set("__index", lua.globals())?;
    env.set_metatable(Some(meta))?;
    lua.load(source)
        .set_name("default handler")
        .set_environment(env.clone())
        .exec()?;
    let handle: Option<Function> = env.raw_get("handle")?;
    let handle = handle.ok_or_else(|| {
        mlua::Error::runtime("the default handler must define `function handle(req, kv)`")
    })?;
    lua.set_named_registry_value(DEFAULT_KEY, handle)
}

/// One HTTP request, as a tenant's handler sees it (`req`).
struct LuaRequest {
    tenant: Arc<str>,
    method: String,
    /// The path after `/t/{tenant}` (at least `/`).
    path: String,
    /// The query string, without `?` (`""` if none).
    query: String,
    body: Bytes,
}

impl IntoLua for LuaRequest {
    fn into_lua(self, lua: &Lua) -> mlua::Result<mlua::Value> {
        let req = lua.create_table()?;
        req.set("tenant", &*self.tenant)?;
        req.set("method", self.method)?;
        req.set("path", self.path)?;
        req.set("query", self.query)?;
        req.set("body", lua.create_string(&self.body)?)?;
        Ok(mlua::Value::Table(req))
    }
}

// ===== the app =====

/// The server's state: the pool of Lua VMs and the store.
pub struct App {
    /// The Lua VMs; each tenant is a session.
    pub pool: IslePool,
    kv: Arc<Kv>,
}

impl App {
    /// Starts the pool (sandboxed, with a time limit per request). Call it
    /// inside a tokio runtime: the store's delays use that runtime's timer.
    ///
    /// # Errors
    /// As for [`IslePoolBuilder::build`](mlua_isle::IslePoolBuilder::build).
    pub fn new(config: &Config) -> Result<Arc<App>, IsleError> {
        let pool = IslePool::builder()
            .name("lua")
            .workers(config.workers)
            .sandbox(true)
            .default_timeout(config.timeout)
            .queue_capacity(config.queue_capacity)
            .memory_limit(config.memory_limit)
            .init(|lua| init(lua, DEFAULT_HANDLER))
            .build()?;
        Ok(Arc::new(App {
            pool,
            kv: Arc::new(Kv::new(config.kv_delay)),
        }))
    }

    /// Answers one HTTP request.
    pub async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body too large: at most {MAX_BODY} bytes\n"),
                )
            }
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("request body not read: {e}\n"),
                )
            }
        };
        let path = parts.uri.path();
        let query = parts.uri.query().unwrap_or("");
        match (&parts.method, path) {
            (&Method::GET, "/metrics") => {
                text(StatusCode::OK, render_metrics(&self.pool.metrics()))
            }
            (&Method::POST, "/reload") => match source(body) {
                Ok(src) => self.reload_route(src).await,
                Err(resp) => resp,
            },
            (_, "/reload") | (_, "/metrics") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET /metrics and POST /reload\n".into(),
            ),
            _ => match path.strip_prefix("/t/").map(split_tenant) {
                Some(Ok((tenant, rest))) => {
                    let req = LuaRequest {
                        tenant: tenant.into(),
                        method: parts.method.to_string(),
                        path: rest.to_string(),
                        query: query.to_string(),
                        body,
                    };
                    self.tenant_route(req).await
                }
                Some(Err(resp)) => resp,
                None => text(
                    StatusCode::NOT_FOUND,
                    "no such route: try /t/{tenant}/..., GET /metrics, POST /reload\n".into(),
                ),
            },
        }
    }

    async fn tenant_route(&self, req: LuaRequest) -> Response<Full<Bytes>> {
        let session = self.pool.session(&*req.tenant);
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/handler") => {
                let src = match source(req.body) {
                    Ok(src) => src,
                    Err(resp) => return resp,
                };
                match session.spawn_eval::<()>(src).await {
                    Ok(()) => text(
                        StatusCode::OK,
                        format!("handler installed for tenant {}\n", req.tenant),
                    ),
                    Err(e) => error_response(&e),
                }
            }
            ("DELETE", "/handler") => {
                session.close();
                text(
                    StatusCode::OK,
                    format!("tenant {}: session closed, default handler\n", req.tenant),
                )
            }
            _ => {
                // A session call of `handle` (an `exec_async` closure
                // awaiting `Function::call_async` would be stopped by the
                // time limit just the same).
                let kv = TenantKv {
                    kv: self.kv.clone(),
                    tenant: req.tenant.clone(),
                };
                match session.spawn_call::<BString>("handle", (req, kv)).await {
                    Ok(body) => reply(StatusCode::OK, Vec::from(body).into()),
                    Err(e) => error_response(&e),
                }
            }
        }
    }

    /// `POST /reload`, off the runtime's threads (it blocks).
    async fn reload_route(self: Arc<Self>, source: String) -> Response<Full<Bytes>> {
        let done = tokio::task::spawn_blocking(move || self.reload(source))
            .await
            .expect("the reload does not panic");
        match done {
            Ok(version) => text(
                StatusCode::OK,
                format!("default handler reloaded: version {version}\n"),
            ),
            Err(e) => error_response(&e),
        }
    }

    /// Makes `source` every tenant's default handler, on every VM now and
    /// in VMs started later (`pool.reload`). Blocks. Returns the new
    /// version; if any VM refuses `source`, the error, and every VM keeps
    /// the old handler.
    fn reload(&self, source: String) -> Result<u64, IsleError> {
        self.pool.reload(move |lua| install_default(lua, &source))
    }
}

/// `GET /metrics`: the pool's counters, one `name value` line each.
pub fn render_metrics(m: &PoolMetrics) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "requests_submitted {}", m.submitted);
    let _ = writeln!(out, "requests_rejected {}", m.rejected);
    let _ = writeln!(out, "requests_queued_unkeyed {}", m.unkeyed_queued);
    let _ = writeln!(out, "sessions_open {}", m.sessions_open);
    let _ = writeln!(out, "sessions_expired {}", m.sessions_expired);
    let _ = writeln!(out, "code_version {}", m.version);
    for (name, h) in [("queue_wait", &m.queue_wait), ("run_time", &m.run_time)] {
        let _ = writeln!(
            out,
            "{name} count {} p50_us {} p90_us {} p99_us {} p999_us {} max_us {}",
            h.count(),
            h.p50().as_micros(),
            h.p90().as_micros(),
            h.p99().as_micros(),
            h.p999().as_micros(),
            h.max().as_micros(),
        );
    }
    for (i, w) in m.workers.iter().enumerate() {
        let _ = writeln!(
            out,
            "vm{i} queued {} running {} suspended {} completed {} failed {} cancelled {} busy_ms {} sessions {}",
            w.queued,
            w.running,
            w.suspended,
            w.completed,
            w.failed,
            w.cancelled,
            w.busy.as_millis(),
            w.sessions,
        );
    }
    out
}

/// The HTTP status for a failed request: the tenant's fault (its Lua code
/// failed or went past a limit) is 400; a full queue, or a session whose
/// VM was replaced, 503 (retry); a time limit, 504.
pub fn status_for(e: &IsleError) -> StatusCode {
    match e {
        IsleError::Lua(_) | IsleError::MemoryLimit(_) | IsleError::InstructionLimit => {
            StatusCode::BAD_REQUEST
        }
        IsleError::QueueFull | IsleError::SessionLost => StatusCode::SERVICE_UNAVAILABLE,
        IsleError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(e: &IsleError) -> Response<Full<Bytes>> {
    text(status_for(e), format!("{e}\n"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, body.into())
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A request body that must be Lua source text.
fn source(body: Bytes) -> Result<String, Response<Full<Bytes>>> {
    String::from_utf8(body.into()).map_err(|_| {
        text(
            StatusCode::BAD_REQUEST,
            "the body must be UTF-8 Lua source\n".into(),
        )
    })
}

/// `{tenant}/rest` → the tenant's name and `/rest`. Names are 1 to 64
/// letters, digits, `-` or `_`.
fn split_tenant(after: &str) -> Result<(&str, &str), Response<Full<Bytes>>> {
    let (tenant, rest) = match after.find('/') {
        Some(i) => after.split_at(i),
        None => (after, "/"),
    };
    let valid = (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok((tenant, rest))
    } else {
        Err(text(
            StatusCode::BAD_REQUEST,
            "a tenant's name is 1 to 64 letters, digits, '-' or '_'\n".into(),
        ))
    }
}

// ===== the accept loop =====

/// Serves HTTP/1 on `listener` until the task is dropped: one tokio task
/// per connection, each request answered by `handler` (such as
/// `move |req| app.clone().route(req)`).
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors, a connection reset before accept:
            // this connection is lost, the server goes on.
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = handler(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            // An error here is the client's (it went away mid-request).
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
