//! The sidecar binary killed with SIGKILL while a client sends CloudEvents: the client retries
//! every request that got no answer, with the same ids, against the restarted sidecar, and every
//! id is counted exactly once at the collector (SPEC §4: a 2xx means durable; retries are safe).
#![allow(clippy::unwrap_used)]

mod process;
use process::{Sidecar, free_port, run_command};

// The agent's collector stand-in, one copy for both crates' tests.
#[path = "../../agent/tests/common/mod.rs"]
mod common;

use common::{Faults, StandIn};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tally_protocol::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, Catalog, MeterDef};
use tally_protocol::names::MeterName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn catalog() -> Catalog {
    Catalog {
        version: 1,
        meters: BoundedVec::new(vec![MeterDef {
            name: MeterName::new("api_calls").unwrap(),
            aggregation: Aggregation::Sum,
            event_type: "api_call".into(),
            value_property: Some("$.count".into()),
            group_by: BoundedVec::default(),
            stripe_event_name: Some("api_calls".into()),
            stripe_unit_scale: Decimal::ONE,
        }])
        .unwrap(),
    }
}

fn spawn_sidecar(
    dir: &std::path::Path,
    collector: &str,
    ca: &std::path::Path,
    http: SocketAddr,
) -> Sidecar {
    Sidecar::spawn(&mut run_command(dir, collector, ca, http))
}

/// One HTTP/1.1 request; `None` when the connection failed or closed before a full answer.
async fn post(addr: SocketAddr, path: &str, ct: &str, body: &[u8]) -> Option<u16> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(body).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .ok()
        .flatten()
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.ok()?;
            Some(out.starts_with(b"HTTP/1.1 200"))
        }
        .await;
        if ok == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Request `r`: three events with ids `r-0..r-2`, quantities `r.01`, `1`, `0.5`.
fn request(r: u64) -> (Vec<u8>, Decimal) {
    let qs = [
        Decimal::new(r as i64 * 100 + 1, 2),
        Decimal::ONE,
        Decimal::new(5, 1),
    ];
    let events: Vec<String> = qs
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                r#"{{"specversion":"1.0","type":"api_call","id":"{r}-{i}","source":"kill-test","subject":"cust-{}","data":{{"count":"{q}"}}}}"#,
                r % 7
            )
        })
        .collect();
    (
        format!("[{}]", events.join(",")).into_bytes(),
        qs.iter().sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_ingest_counts_every_id_once() {
    let standin = StandIn::start_with(Faults::default(), Some(catalog()), None, 8).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &standin.ca_pem).unwrap();
    let data = dir.path().join("agent");
    let http = free_port();
    let mut child = spawn_sidecar(&data, &standin.address(), &ca, http);
    wait_ready(http).await;

    const REQUESTS: u64 = 400;
    const KILL_AFTER: u64 = 150;
    let ct = "application/cloudevents-batch+json";
    let mut expected = Decimal::ZERO;
    let mut unanswered = Vec::new();
    // Four concurrent clients; the parent kills the sidecar once enough requests were answered.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Option<u16>)>();
    for c in 0..4 {
        let tx = tx.clone();
        tokio::spawn(async move {
            for r in (c..REQUESTS).step_by(4) {
                let (body, _) = request(r);
                let status = post(http, "/api/v1/events", ct, &body).await;
                if tx.send((r, status)).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut answered = 0;
    let mut killed = false;
    while let Some((r, status)) = rx.recv().await {
        expected += request(r).1;
        match status {
            Some(204) => answered += 1,
            Some(other) => panic!("request {r} answered {other}"),
            None => unanswered.push(r),
        }
        if !killed && answered >= KILL_AFTER {
            child.kill9();
            killed = true;
        }
    }
    assert!(
        killed && !unanswered.is_empty(),
        "the kill must interrupt some requests"
    );

    // Restart on the same data dir; retry what got no answer, and resend a few answered ones as a
    // client whose answer was lost would.
    let mut child = spawn_sidecar(&data, &standin.address(), &ca, http);
    wait_ready(http).await;
    for r in unanswered.iter().copied().chain(0..20) {
        let (body, _) = request(r);
        assert_eq!(
            post(http, "/api/v1/events", ct, &body).await,
            Some(204),
            "retry of {r}"
        );
    }
    assert_eq!(
        post(http, "/v1/flush", "application/json", b"").await,
        Some(200)
    );
    let total = |s: &common::Seen| s.totals.values().map(|(sum, _)| *sum).sum::<Decimal>();
    let deadline = Instant::now() + Duration::from_secs(20);
    while total(&standin.seen.lock().unwrap()) != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = standin.seen.lock().unwrap();
    assert_eq!(total(&seen), expected, "every id counted exactly once");
    let events: u64 = seen.totals.values().map(|(_, n)| n).sum();
    assert_eq!(events, REQUESTS * 3);
    drop(seen);
    child.kill9();
}
