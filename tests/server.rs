//! The example server (`examples/server`), run for real: on a loopback
//! port, hit by hyper's HTTP/1 client. 10,000 requests over 64 connections
//! are each answered once, by the right tenant's session; tenants cannot
//! read each other's keys; hostile handlers get an HTTP error and the
//! server keeps serving; `/reload` and `/metrics` work.
//!
//! Needs the `tokio` feature (`cargo test --features tokio --test server`).

mod common;

#[allow(dead_code)]
#[path = "../examples/server/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "../examples/server/kv.rs"]
mod kv;
#[allow(dead_code)]
#[path = "../examples/server/load.rs"]
mod load;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use app::{App, Config};
use common::within;
use hyper::{Method, StatusCode};
use load::Conn;
use mlua_isle::IsleError;
use tokio::net::TcpListener;

/// Starts the server on `127.0.0.1:0` in a runtime of its own, runs
/// `client` against it, then stops the server and its pool; all under the
/// watchdog.
fn with_server<F, Fut>(what: &'static str, config: Config, client: F)
where
    F: FnOnce(SocketAddr, Arc<App>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    within(what, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = {
            let _in_rt = rt.enter();
            App::new(&config).expect("the pool starts")
        };
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        let routes = app.clone();
        let server = rt.spawn(app::serve(listener, move |req| routes.clone().route(req)));
        rt.block_on(client(addr, app.clone()));
        server.abort();
        // Before the runtime goes: no request is left waiting on its timer.
        app.pool.shutdown().expect("the pool shuts down");
    });
}

async fn send(conn: &mut Conn, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    conn.send(method, path, body.to_string())
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn get(conn: &mut Conn, path: &str) -> (StatusCode, String) {
    send(conn, Method::GET, path, "").await
}

async fn install(conn: &mut Conn, tenant: &str, source: &str) {
    let (status, body) = send(conn, Method::POST, &format!("/t/{tenant}/handler"), source).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "installing {tenant}'s handler: {body}"
    );
}

const TENANTS: usize = 32;
const REQUESTS: usize = 10_000;
const CONNECTIONS: usize = 64;

/// The tenant of request `i`: spread so that each connection's requests go
/// to many tenants and each tenant's come from many connections.
fn tenant_of(i: usize) -> usize {
    (i.wrapping_mul(2_654_435_761) >> 7) % TENANTS
}

#[test]
fn ten_thousand_requests_over_64_connections_are_each_answered_once_by_their_tenant() {
    with_server(
        "10,000 requests",
        Config::default(),
        |addr, _app| async move {
            // Each tenant's handler names its tenant in its own source, and
            // counts its requests twice: in a session global and in the store
            // (two awaited kv calls).
            let mut conn = Conn::open(addr).await.unwrap();
            for t in 0..TENANTS {
                let source = format!(
                    r#"local me = "tenant{t}"
                function handle(req, kv)
                    count = (count or 0) + 1
                    local stored = (tonumber(kv.get("count")) or 0) + 1
                    kv.put("count", stored)
                    return me .. " " .. count .. " " .. stored .. " " .. req.query
                end"#
                );
                install(&mut conn, &format!("tenant{t}"), &source).await;
            }

            let replies = load::run(addr, CONNECTIONS, REQUESTS, |i| {
                format!("/t/tenant{}/echo?n={i}", tenant_of(i))
            })
            .await
            .expect("every request gets a response");

            assert_eq!(replies.len(), REQUESTS);
            let mut answered = vec![false; REQUESTS];
            let mut counts = vec![Vec::new(); TENANTS];
            for r in &replies {
                assert_eq!(r.status, StatusCode::OK, "request {}: {}", r.index, r.body);
                assert!(
                    !std::mem::replace(&mut answered[r.index], true),
                    "request {} answered twice",
                    r.index
                );
                let t = tenant_of(r.index);
                let fields: Vec<&str> = r.body.split(' ').collect();
                let [me, count, stored, query] = fields[..] else {
                    panic!("request {}: unexpected reply {:?}", r.index, r.body);
                };
                assert_eq!(
                    me,
                    format!("tenant{t}"),
                    "request {} ran in another tenant's session",
                    r.index
                );
                assert_eq!(
                    query,
                    format!("n={}", r.index),
                    "request {} got another's reply",
                    r.index
                );
                assert_eq!(
                    count, stored,
                    "request {}: the session and the store disagree",
                    r.index
                );
                counts[t].push(count.parse::<usize>().unwrap());
            }
            assert!(answered.iter().all(|&a| a), "a request was not answered");
            // Each tenant's requests ran one at a time, each exactly once: the
            // counts it saw are 1..=n, n being the requests sent to it.
            for (t, mut seen) in counts.into_iter().enumerate() {
                let sent = (0..REQUESTS).filter(|&i| tenant_of(i) == t).count();
                seen.sort_unstable();
                assert_eq!(seen, (1..=sent).collect::<Vec<_>>(), "tenant{t}'s counts");
            }
        },
    );
}

#[test]
fn a_tenant_cannot_read_another_tenants_keys_or_globals() {
    with_server("kv isolation", Config::default(), |addr, _app| async move {
        let mut conn = Conn::open(addr).await.unwrap();
        let keeper = r#"
            function handle(req, kv)
                if req.method == "PUT" then
                    kv.put("secret", req.body)
                    note = req.body
                    return "stored"
                end
                return tostring(kv.get("secret")) .. " " .. tostring(note)
            end"#;
        install(&mut conn, "alice", keeper).await;
        install(&mut conn, "bob", keeper).await;
        // Every Lua-visible way to name alice's key or state.
        install(
            &mut conn,
            "mallory",
            r#"
            function handle(req, kv)
                return table.concat({
                    tostring(kv.get("secret")), tostring(kv.get("secret", "alice")),
                    tostring(kv.get("alice/secret")), tostring(kv.get("alice:secret")),
                    tostring(kv.get("../alice/secret")), tostring(note),
                    tostring(rawget(_G, "note")),
                }, " ")
            end"#,
        )
        .await;

        let put = send(&mut conn, Method::PUT, "/t/alice/", "alice's secret").await;
        assert_eq!(put, (StatusCode::OK, "stored".into()));
        assert_eq!(
            get(&mut conn, "/t/alice/").await,
            (StatusCode::OK, "alice's secret alice's secret".into())
        );
        assert_eq!(
            get(&mut conn, "/t/bob/").await,
            (StatusCode::OK, "nil nil".into())
        );
        assert_eq!(
            get(&mut conn, "/t/mallory/").await,
            (StatusCode::OK, ["nil"; 7].join(" "))
        );

        // The default handler's visit counter is per tenant too.
        let (_, one) = get(&mut conn, "/t/carol/a?x=1").await;
        let (_, two) = get(&mut conn, "/t/carol/b").await;
        let (_, other) = get(&mut conn, "/t/dave/").await;
        assert_eq!(one, "hello carol: visit 1, GET /a?x=1\n");
        assert_eq!(two, "hello carol: visit 2, GET /b\n");
        assert_eq!(other, "hello dave: visit 1, GET /\n");
    });
}

#[test]
fn hostile_handlers_get_http_errors_and_the_server_keeps_serving() {
    let config = Config {
        timeout: Duration::from_secs(1),
        ..Config::default()
    };
    with_server("hostile handlers", config, |addr, _app| async move {
        let mut conn = Conn::open(addr).await.unwrap();
        install(
            &mut conn,
            "mallory",
            "function handle() while true do end end",
        )
        .await;
        let (status, body) = get(&mut conn, "/t/mallory/").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(body.contains("timed out"), "{body}");

        // Others are served; mallory's VM and session survive the stop.
        let (status, body) = get(&mut conn, "/t/alice/").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "hello alice: visit 1, GET /\n")
        );
        assert_eq!(
            get(&mut conn, "/t/mallory/").await.0,
            StatusCode::GATEWAY_TIMEOUT
        );
        install(
            &mut conn,
            "mallory",
            "function handle() return 'reformed' end",
        )
        .await;
        assert_eq!(
            get(&mut conn, "/t/mallory/").await,
            (StatusCode::OK, "reformed".into())
        );

        // Lua errors are the tenant's: 400, with Lua's message.
        install(&mut conn, "erin", "function handle() error('boom') end").await;
        let (status, body) = get(&mut conn, "/t/erin/").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body.contains("Lua runtime error") && body.contains("boom"),
            "{body}"
        );
        let (status, body) = send(&mut conn, Method::POST, "/t/erin/handler", "function (").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("syntax error"), "{body}");
        install(
            &mut conn,
            "erin",
            "function handle() return io.open('/etc/passwd') end",
        )
        .await;
        let (status, body) = get(&mut conn, "/t/erin/").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("not available in the sandbox"), "{body}");
        install(&mut conn, "erin", "handle = 42").await;
        let (status, body) = get(&mut conn, "/t/erin/").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("not a function"), "{body}");
        // Closing the session brings the default handler back.
        assert_eq!(
            send(&mut conn, Method::DELETE, "/t/erin/handler", "")
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            get(&mut conn, "/t/erin/").await,
            (StatusCode::OK, "hello erin: visit 1, GET /\n".into())
        );

        // Bad requests never reach a VM.
        assert_eq!(get(&mut conn, "/t/a.b/").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(get(&mut conn, "/nowhere").await.0, StatusCode::NOT_FOUND);
        let big = "x".repeat(100 << 10);
        assert_eq!(
            send(&mut conn, Method::POST, "/t/erin/handler", &big)
                .await
                .0,
            StatusCode::PAYLOAD_TOO_LARGE
        );

        // Still serving, on a fresh connection too.
        let mut fresh = Conn::open(addr).await.unwrap();
        assert_eq!(get(&mut fresh, "/t/alice/").await.0, StatusCode::OK);
    });
}

#[test]
fn reload_replaces_every_tenants_default_handler_and_metrics_count_requests() {
    with_server(
        "reload and metrics",
        Config::default(),
        |addr, app| async move {
            let mut conn = Conn::open(addr).await.unwrap();
            install(&mut conn, "own", "function handle() return 'my own' end").await;
            assert_eq!(get(&mut conn, "/t/a/").await.1, "hello a: visit 1, GET /\n");

            let v2 = "function handle(req, kv) return 'v2 ' .. req.tenant end";
            let (status, body) = send(&mut conn, Method::POST, "/reload", v2).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body, "default handler reloaded: version 1\n");
            // Every tenant without its own handler, on every VM, runs v2.
            for t in ["a", "b", "c", "d", "e", "f"] {
                assert_eq!(
                    get(&mut conn, &format!("/t/{t}/")).await,
                    (StatusCode::OK, format!("v2 {t}"))
                );
            }
            assert_eq!(get(&mut conn, "/t/own/").await.1, "my own");

            // A bad reload changes nothing.
            for bad in ["function handle(", "x = 1"] {
                let (status, body) = send(&mut conn, Method::POST, "/reload", bad).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
            }
            assert_eq!(get(&mut conn, "/t/a/").await.1, "v2 a");
            assert_eq!(app.pool.metrics().version, 1);

            let (status, metrics) = get(&mut conn, "/metrics").await;
            assert_eq!(status, StatusCode::OK);
            let submitted: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("requests_submitted "))
                .unwrap_or_else(|| panic!("no requests_submitted in:\n{metrics}"))
                .parse()
                .unwrap();
            // One install and nine tenant requests so far.
            assert_eq!(submitted, 10, "{metrics}");
            for w in 0..app.pool.workers() {
                assert!(metrics.contains(&format!("vm{w} queued ")), "{metrics}");
            }
            // The histograms: every request that ran is in them (they may
            // lag the counters while a VM is busy; here all have run).
            let ran: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("run_time count "))
                .and_then(|l| l.split(' ').next())
                .unwrap_or_else(|| panic!("no run_time in:\n{metrics}"))
                .parse()
                .unwrap();
            assert!((1..=10).contains(&ran), "{metrics}");
            assert!(metrics.contains("queue_wait count "), "{metrics}");
        },
    );
}

#[test]
fn errors_map_to_http_statuses() {
    use app::status_for;
    assert_eq!(
        status_for(&IsleError::QueueFull),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        status_for(&IsleError::SessionLost),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(status_for(&IsleError::Timeout), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        status_for(&IsleError::InstructionLimit),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_for(&IsleError::MemoryLimit("x".into())),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_for(&IsleError::Shutdown),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        status_for(&IsleError::Panic("x".into())),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}
