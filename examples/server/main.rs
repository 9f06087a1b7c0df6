//! A multi-tenant HTTP server: each request runs its tenant's Lua handler
//! in that tenant's session, and the handler awaits an async Rust
//! key-value store (with a simulated 1 ms delay) while its VM serves
//! others. Tenants come from the path: `/t/{tenant}/...`. The routes are
//! listed in `app.rs`.
//!
//! Run: `cargo run --release --example server --features tokio [ADDR]`
//! (ADDR defaults to `127.0.0.1:3000`), then, for example:
//!
//! ```text
//! curl localhost:3000/t/alice/hello
//! curl localhost:3000/t/alice/handler --data-binary 'function handle(req, kv) return "hi " .. req.body end'
//! curl localhost:3000/t/alice/ -d world
//! curl localhost:3000/metrics
//! ```

mod app;
mod kv;

use std::error::Error;

use app::{App, Config};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let config = Config::default();
    let app = App::new(&config)?;
    let listener = TcpListener::bind(&addr).await?;
    println!(
        "serving on http://{} with {} Lua VMs (sandboxed, {:?} per request, kv delay {:?})",
        listener.local_addr()?,
        config.workers,
        config.timeout,
        config.kv_delay,
    );
    println!("try: curl {}/t/alice/hello", listener.local_addr()?);
    app::serve(listener, move |req| app.clone().route(req)).await;
    Ok(())
}
