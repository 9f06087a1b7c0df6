//! A load client for the server: many HTTP/1 keep-alive connections, each
//! sending its share of the requests one after another, with hyper's client.
//! Used by `tests/server.rs` and `benches/server.rs` (not by the example).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One keep-alive connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Opens a connection to `addr`.
    pub async fn open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> io::Result<(StatusCode, String)> {
        self.sender.ready().await.map_err(io::Error::other)?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .body(Full::new(body.into()))
            .map_err(io::Error::other)?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(io::Error::other)?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        let body = String::from_utf8(body.into()).map_err(io::Error::other)?;
        Ok((status, body))
    }
}

/// One request's outcome.
#[derive(Debug)]
pub struct Reply {
    /// Which request (`0..total`).
    pub index: usize,
    pub status: StatusCode,
    pub body: String,
    /// From sending the request to having read the whole response.
    pub latency: Duration,
}

/// Sends `total` requests over `connections` connections at once
/// (connection `c` sends requests `c`, `c + connections`, ... one after
/// another); request `i` is `request(i)`, a `GET` of that path. Returns
/// every reply, in no particular order.
///
/// # Errors
/// The first connection or transport error.
pub async fn run(
    addr: SocketAddr,
    connections: usize,
    total: usize,
    request: impl Fn(usize) -> String + Send + Sync + 'static,
) -> io::Result<Vec<Reply>> {
    let request = Arc::new(request);
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut replies = Vec::new();
            for index in (c..total).step_by(connections) {
                let path = request(index);
                let start = Instant::now();
                let (status, body) = conn.send(Method::GET, &path, Bytes::new()).await?;
                replies.push(Reply {
                    index,
                    status,
                    body,
                    latency: start.elapsed(),
                });
            }
            Ok::<_, io::Error>(replies)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.map_err(io::Error::other)??);
    }
    Ok(all)
}
