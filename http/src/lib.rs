//! The HTTP servers' shell (the sidecar's and the admin API's): every connection and request is
//! bounded, so idle or slow clients cannot take a server's file descriptors or memory.
//!
//! - **Connection cap**: past [`HttpLimits::max_connections`] a new connection is answered
//!   `503` with `Retry-After` and closed at once, so the ones being served keep going.
//! - **Header-read and idle timeout**: a connection that does not send a complete request head
//!   within [`HttpLimits::header_read_timeout`] — its first or, after a response, its next — is
//!   closed (hyper's timer restarts it while a keep-alive connection waits).
//! - **Request timeout**: a handler that takes longer than [`HttpLimits::request_timeout`]
//!   (e.g. waiting on a full disk budget) is answered `503` with `Retry-After` instead of hanging.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
//! tally_http::serve(listener, app, tally_http::HttpLimits::default(), std::future::pending()).await
//! # }
//! ```

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The bounds of one server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections served at once; more are refused with 503.
    pub max_connections: usize,
    /// Time allowed for a complete request head, and for the next one on an idle connection.
    pub header_read_timeout: Duration,
    /// Time allowed for a handler to answer.
    pub request_timeout: Duration,
    /// Counters shared with the caller's metrics.
    pub stats: Arc<HttpStats>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: default_max_connections(),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            stats: Arc::default(),
        }
    }
}

impl HttpLimits {
    /// The defaults, each overridden by its variable when set: `TALLY_HTTP_MAX_CONNECTIONS`,
    /// `TALLY_HTTP_HEADER_TIMEOUT_MS`, `TALLY_HTTP_REQUEST_TIMEOUT_MS`. A value that does not
    /// parse is an error naming the variable.
    pub fn from_env() -> Result<Self, String> {
        fn var<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{name}={v:?} is not a whole number")),
                Err(_) => Ok(None),
            }
        }
        let mut l = HttpLimits::default();
        if let Some(n) = var::<usize>("TALLY_HTTP_MAX_CONNECTIONS")? {
            l.max_connections = n.max(1);
        }
        if let Some(ms) = var::<u64>("TALLY_HTTP_HEADER_TIMEOUT_MS")? {
            l.header_read_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = var::<u64>("TALLY_HTTP_REQUEST_TIMEOUT_MS")? {
            l.request_timeout = Duration::from_millis(ms.max(1));
        }
        Ok(l)
    }
}

/// The connection cap when none is configured: the process's open-file limit less a reserve for
/// stores, logs and QUIC, at most 16,384 (each idle connection holds a socket and a few KiB
/// until the header-read timeout closes it).
pub fn default_max_connections() -> usize {
    const RESERVE: usize = 256;
    open_file_limit()
        .map_or(1024, |n| n.saturating_sub(RESERVE))
        .clamp(64, 16_384)
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits` (Linux); `None` elsewhere.
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the server refused or cut short, for metrics.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections refused at the cap.
    pub refused: AtomicU64,
    /// Requests answered 503 at the request timeout.
    pub timed_out: AtomicU64,
}

const REFUSAL_BODY: &str = r#"{"error":{"type":"api_error","code":"too_many_connections","message":"The server is at its connection limit; retry shortly."}}"#;

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then lets the requests
/// in progress finish (at most the request timeout) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let app = with_request_timeout(app, limits.request_timeout, limits.stats.clone());
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors (or a connection reset before it was accepted):
                    // wait a little for some to close rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            limits.stats.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream));
            continue;
        };
        let stats = limits.stats.clone();
        stats.open.fetch_add(1, Ordering::Relaxed);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Timeouts and resets end connections; they are the client's business, not errors.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.request_timeout, graceful.shutdown()).await;
    Ok(())
}

/// Answers a connection over the cap with a short 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        REFUSAL_BODY.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(REFUSAL_BODY.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

fn with_request_timeout(app: Router, limit: Duration, stats: Arc<HttpStats>) -> Router {
    app.layer(axum::middleware::from_fn(
        move |req: Request<Body>, next: axum::middleware::Next| {
            let stats = stats.clone();
            async move {
                match tokio::time::timeout(limit, next.run(req)).await {
                    Ok(r) => r,
                    Err(_) => {
                        stats.timed_out.fetch_add(1, Ordering::Relaxed);
                        timed_out()
                    }
                }
            }
        },
    ))
}

fn timed_out() -> Response<Body> {
    let body = r#"{"error":{"type":"api_error","code":"request_timeout","message":"The request took too long and was stopped; it may have been recorded or not, so retry it with the same idempotency keys."}}"#;
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    async fn start(limits: HttpLimits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "late"
                }),
            );
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        addr
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    fn limits(max: usize, header: u64, request: u64) -> HttpLimits {
        HttpLimits {
            max_connections: max,
            header_read_timeout: Duration::from_millis(header),
            request_timeout: Duration::from_millis(request),
            stats: Arc::default(),
        }
    }

    #[tokio::test]
    async fn past_the_cap_connections_are_refused_until_idle_ones_time_out() {
        let l = limits(4, 300, 5_000);
        let stats = l.stats.clone();
        let addr = start(l).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = get(addr, "/").await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("retry-after: 1") || refused.contains("Retry-After: 1"));
        assert!(refused.contains("too_many_connections"));
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        // The idle ones are closed by the header-read timeout, and their places are free again.
        for s in &mut idle {
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("closed by the server")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(addr, "/").await.ends_with("ok"));
    }

    #[tokio::test]
    async fn a_keep_alive_connection_idle_after_a_response_is_closed() {
        let addr = start(limits(4, 300, 5_000)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed by the server")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn a_request_past_its_time_is_answered_503_with_retry_after() {
        let l = limits(4, 1_000, 200);
        let stats = l.stats.clone();
        let addr = start(l).await;
        let r = get(addr, "/slow").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.to_ascii_lowercase().contains("retry-after: 1"));
        assert!(r.contains("request_timeout"));
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_default_cap_follows_the_open_file_limit() {
        let n = default_max_connections();
        assert!((64..=16_384).contains(&n), "{n}");
        if let Some(limit) = open_file_limit() {
            assert!(n < limit, "a reserve is kept below the limit of {limit}");
        }
    }
}
