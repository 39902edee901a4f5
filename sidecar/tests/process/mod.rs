//! The `tally-agent` sidecar as a child process, shared by the process-level tests: a free
//! loopback port, the `run` command with the flags every test passes, and a handle that kills
//! the process (SIGKILL) when dropped, so a failing test leaves nothing behind.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running sidecar, killed when dropped.
pub struct Sidecar(pub Child);

impl Sidecar {
    /// Starts `cmd` (from [`run_command`], with a test's own flags added).
    pub fn spawn(cmd: &mut Command) -> Sidecar {
        Sidecar(cmd.spawn().unwrap())
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(&mut self) {
        self.0.kill().unwrap(); // SIGKILL on Unix
        self.0.wait().unwrap();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tally-agent run` on `dir`, one collector, its CA, HTTP on `http`, a 20 ms flush interval;
/// logs at `TEST_SIDECAR_LOG` (default `warn`) to the test's stderr.
pub fn run_command(dir: &Path, collector: &str, ca: &Path, http: SocketAddr) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally-agent"));
    cmd.args(["run", "--data-dir"])
        .arg(dir)
        .args(["--collector", collector, "--ca"])
        .arg(ca)
        .args(["--http", &http.to_string(), "--flush-interval-ms", "20"])
        .env(
            "RUST_LOG",
            std::env::var("TEST_SIDECAR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// One HTTP/1.1 request: status and body; `None` when the connection failed or closed early.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(body.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8(out).ok()?;
        let status = text.get(9..12)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .ok()
        .flatten()
}

pub async fn json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, text) = call(addr, method, path, token, body).await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

pub async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((200, _)) = call(addr, "GET", "/readyz", None, "").await {
            return;
        }
        assert!(Instant::now() < deadline, "sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
