//! Helpers shared by the integration tests: an in-process collector in a temporary directory,
//! batch builders, a seeded generator, a tiny HTTP/1.1 client, and the `tally-collector` binary
//! as a child process.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use rust_decimal::Decimal;
use std::time::Duration;
use tally_collector::testkit::TestClient;
use tally_collector::{Collector, CollectorConfig, CollectorHandle};
use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::frame::Frame;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub handle: CollectorHandle,
    pub ca_pem: Vec<u8>,
}

pub async fn start() -> Env {
    start_with(|_| {}).await
}

/// An in-process collector whose configuration `f` adjusts (e.g. Stripe settings).
pub async fn start_with(f: impl FnOnce(&mut CollectorConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    tally_collector::init(dir.path(), &[]).unwrap();
    let mut config = CollectorConfig::ephemeral(dir.path());
    f(&mut config);
    let handle = Collector::start(config).await.unwrap();
    let ca_pem = std::fs::read(&handle.files().ca_pem).unwrap();
    Env {
        dir,
        handle,
        ca_pem,
    }
}

impl Env {
    pub async fn client(&self, key: &SigningKey) -> TestClient {
        TestClient::connect(
            self.handle.quic_addr(),
            &self.ca_pem,
            key,
            Some(self.handle.enroll_token()),
        )
        .await
        .unwrap()
    }

    pub fn put_meter(&self, name: &str, aggregation: Aggregation) {
        self.handle
            .shared()
            .put_meter(&meter(name, aggregation))
            .unwrap();
    }

    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        http(self.handle.http_addr(), method, path, token, body).await
    }

    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let token = self.handle.admin_token().to_owned();
        let (status, text) = self.http(method, path, Some(&token), body).await;
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, v)
    }

    pub fn assert_verified(&self) {
        let r = self.handle.shared().verify().unwrap();
        assert!(r.ok, "ledger verify failed: {r:?}");
    }
}

pub fn meter(name: &str, aggregation: Aggregation) -> MeterDef {
    MeterDef {
        name: MeterName::new(name).unwrap(),
        aggregation,
        event_type: name.to_owned(),
        value_property: (aggregation != Aggregation::Count).then(|| String::from("$.value")),
        group_by: BoundedVec::default(),
        stripe_event_name: None,
        stripe_unit_scale: Decimal::ONE,
    }
}

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn agent_id(key: &SigningKey) -> AgentId {
    AgentId::from_public_key(&key.verifying_key())
}

/// A delta of `count` events summing to `sum`, at `at_ms`.
pub fn delta(
    customer: &str,
    meter: &str,
    dims: &[(&str, &str)],
    at_ms: i64,
    sum: Decimal,
    count: u64,
) -> Delta {
    let mut d = Delta::single(
        CustomerId::new(customer).unwrap(),
        MeterName::new(meter).unwrap(),
        Dimensions::from_strs(dims.iter().copied()).unwrap(),
        at_ms,
        sum,
    );
    d.count = count;
    d
}

/// Signs a batch sealed just after its last event, as an agent seals.
pub fn seal(key: &SigningKey, epoch: u64, seq: u64, deltas: Vec<Delta>) -> SignedBatch {
    let sealed = deltas
        .iter()
        .map(|d| d.last_at_ms)
        .max()
        .unwrap_or(1_763_000_000_000);
    let body = BatchBody::new(agent_id(key), epoch, seq, sealed, deltas).unwrap();
    SignedBatch::seal(&body, key).unwrap()
}

/// Sends a batch and returns the next reply (ack or error).
pub async fn send(client: &mut TestClient, batch: &SignedBatch) -> Frame {
    client.send(&Frame::Batch(batch.clone())).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.next_reply())
        .await
        .unwrap()
        .unwrap()
}

/// xorshift64*: a seeded generator, so a failing workload can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A child process, killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The QUIC and HTTP addresses `tally-collector run` prints on its first line of stdout:
/// "collector: quic 127.0.0.1:p admin http://127.0.0.1:q (token in …)".
pub fn ready_addrs(
    stdout: std::process::ChildStdout,
) -> (std::net::SocketAddr, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let quic = words[2].parse().unwrap_or_else(|_| panic!("{line}"));
    let http = words[4]
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    (quic, http)
}

/// Starts `cmd` (`tally-collector run` with a test's own flags and variables), failing the test
/// if `secret` ever shows in its log, and returns it with the QUIC and HTTP addresses it prints.
pub fn spawn_collector(
    cmd: &mut std::process::Command,
    secret: &'static str,
) -> (Proc, std::net::SocketAddr, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            assert!(!line.contains(secret), "a secret reached the log: {line}");
        }
    });
    let (quic, http) = ready_addrs(stdout);
    (Proc(child), quic, http)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Defines `api_calls` (1 Stripe unit a unit) and `tokens` (1,000 Stripe units a unit), both
/// summed from `$.value` and forwarded to Stripe, through the admin API at `addr`.
pub async fn put_stripe_meters(addr: std::net::SocketAddr, token: &str) {
    for (m, scale) in [("api_calls", "1"), ("tokens", "1000")] {
        let body = format!(
            r#"{{"aggregation":"sum","event_type":"{m}","value_property":"$.value","stripe_event_name":"{m}","stripe_unit_scale":"{scale}"}}"#
        );
        let (st, v) = http(
            addr,
            "PUT",
            &format!("/v1/meters/{m}"),
            Some(token),
            Some(&body),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
}
