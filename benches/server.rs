//! The example server (`examples/server`) under load: requests/s and
//! p50/p99 latency seen by hyper's client over 64 keep-alive connections,
//! spread over 256 tenants, each request running the default Lua handler
//! (a `kv.get` and a `kv.put`, awaited). Baseline, in the same run: the
//! same hyper server and store with the handler written in Rust (no Lua, no
//! pool, no sessions, so no per-tenant ordering either).
//!
//! Once with an instant store (the server's own cost), once with a 1 ms
//! store delay per operation (requests spend most of their time suspended).
//!
//! Run: `cargo bench --features tokio --bench server`

#[allow(dead_code)]
#[path = "../examples/server/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "../examples/server/kv.rs"]
mod kv;
#[allow(dead_code)]
#[path = "../examples/server/load.rs"]
mod load;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use app::{App, Config};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use kv::Kv;
use tokio::net::TcpListener;

const CONNECTIONS: usize = 64;
const TENANTS: usize = 256;

fn path(i: usize) -> String {
    format!(
        "/t/t{}/bench?n={i}",
        (i.wrapping_mul(2_654_435_761) >> 7) % TENANTS
    )
}

/// The baseline's handler: the default Lua handler's work, in Rust.
async fn plain_route(kv: Arc<Kv>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some((tenant, rest)) = req
        .uri()
        .path()
        .strip_prefix("/t/")
        .and_then(|p| p.split_once('/'))
    else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"no such route\n")));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    };
    let visits = kv
        .get(tenant, "visits")
        .await
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    kv.put(tenant, "visits".into(), visits.to_string()).await;
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    Response::new(Full::new(Bytes::from(format!(
        "hello {tenant}: visit {visits}, {} /{rest}{query}\n",
        req.method()
    ))))
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// `total` requests over [`CONNECTIONS`] connections, after a warm-up.
async fn measure(addr: SocketAddr, total: usize) -> Figures {
    load::run(addr, CONNECTIONS, total / 10, path)
        .await
        .unwrap();
    let start = Instant::now();
    let replies = load::run(addr, CONNECTIONS, total, path).await.unwrap();
    let elapsed = start.elapsed();
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let mut latencies: Vec<Duration> = replies.iter().map(|r| r.latency).collect();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figures {
        per_sec: total as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn report(what: &str, f: &Figures) {
    println!(
        "  {what:<22} {:>8.0} requests/s   p50 {:>8.2?}   p99 {:>8.2?}",
        f.per_sec, f.p50, f.p99
    );
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn main() {
    // `cargo test --benches` runs benches once as tests: nothing to do.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "server: {CONNECTIONS} connections, {TENANTS} tenants, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (delay, total) in [(Duration::ZERO, 20_000), (Duration::from_millis(1), 10_000)] {
        println!("kv delay {delay:?}, {total} requests:");
        let config = Config {
            kv_delay: delay,
            ..Config::default()
        };
        let lua = rt.block_on(async {
            let app = App::new(&config).unwrap();
            let (l, addr) = listener().await;
            let routes = app.clone();
            let server = tokio::spawn(app::serve(l, move |req| routes.clone().route(req)));
            let f = measure(addr, total).await;
            server.abort();
            (f, app)
        });
        let (lua, app) = lua;
        app.pool.shutdown().unwrap();

        let plain = rt.block_on(async {
            let kv = Arc::new(Kv::new(delay));
            let (l, addr) = listener().await;
            let server = tokio::spawn(app::serve(l, move |req| plain_route(kv.clone(), req)));
            let f = measure(addr, total).await;
            server.abort();
            f
        });
        report(&format!("Lua ({} VMs)", config.workers), &lua);
        report("plain Rust (baseline)", &plain);
        println!(
            "  ratio: {:.2}x the baseline's requests/s, p99 {:.2}x",
            lua.per_sec / plain.per_sec,
            lua.p99.as_secs_f64() / plain.p99.as_secs_f64()
        );
    }
}
