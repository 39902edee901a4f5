//! A real `tally-collector run` process forwarding to a slow `FakeStripe` that loses answers is
//! SIGKILLed while meter events are in flight (processed by Stripe, not yet answered), then
//! restarted on the same data directory: every unit arrives exactly once — Stripe's totals
//! equal ⌊ledger × scale⌋ per customer and event name, and no identifier is accepted twice.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use tally_collector::testkit::TestClient;
use tally_forward::stripe::test_server::{FakeStripe, RandomFaults};
use tally_protocol::frame::{AckOutcome, Frame};

/// Starts `tally-collector run` and returns it with its QUIC and HTTP addresses.
fn run(dir: &std::path::Path, stripe_url: &str) -> (Proc, SocketAddr, SocketAddr) {
    spawn_collector(
        Command::new(env!("CARGO_BIN_EXE_tally-collector"))
            .args(["run", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--stripe-base-url", stripe_url])
            .args(["--stripe-request-timeout", "1", "--stripe-rate", "500"])
            .env("STRIPE_API_KEY", "sk_test_kill_SECRETKEY"),
        "SECRETKEY",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_forwarding_then_restart_sends_everything_once() {
    let server = FakeStripe::start().await.unwrap();
    // Slow answers: requests are processed, then answered 600 ms later (or never).
    server.set_response_delay(Duration::from_millis(600));
    server.set_random_faults(RandomFaults {
        lose_answer_permille: 250,
        seed: 5,
        ..RandomFaults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let files = tally_collector::init(dir.path(), &[]).unwrap();
    let token = tally_collector::InitFiles::read_token(&files.admin_token).unwrap();
    let enroll = tally_collector::InitFiles::read_token(&files.enroll_token).unwrap();
    let ca = std::fs::read(&files.ca_pem).unwrap();

    let (proc1, quic, http_addr) = run(dir.path(), &server.url());
    put_stripe_meters(http_addr, &token).await;
    let (st, v) = http(
        http_addr,
        "PUT",
        "/v1/customers/acme",
        Some(&token),
        Some(r#"{"stripe_customer_id":"cus_acme"}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // Usage: 30 batches for 4 customers, quantities with up to 4 decimals.
    let k = key(77);
    let mut client = TestClient::connect(quic, &ca, &k, Some(&enroll))
        .await
        .unwrap();
    let customers = ["acme", "cus_b", "cus_c", "cus_d"];
    let mut rng = Rng(99);
    let mut ledger: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let now = now_ms();
    for seq in 1..=30u64 {
        let mut deltas = Vec::new();
        let mut used = HashSet::new();
        for _ in 0..3 {
            let c = customers[rng.below(4) as usize];
            let m = ["api_calls", "tokens"][rng.below(2) as usize];
            if !used.insert((c, m)) {
                continue;
            }
            let q = Decimal::new(1 + rng.below(30_000) as i64, 4);
            *ledger.entry((c.to_owned(), m.to_owned())).or_default() += q;
            deltas.push(delta(c, m, &[], now - 60_000 * rng.below(10) as i64, q, 1));
        }
        match send(&mut client, &seal(&k, 1, seq, deltas)).await {
            Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(client);
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((c, m), q) in &ledger {
        let scale = if m == "tokens" {
            Decimal::from(1000)
        } else {
            Decimal::ONE
        };
        let units: u64 = (*q * scale).floor().try_into().unwrap();
        let sc = if c == "acme" {
            "cus_acme".to_owned()
        } else {
            c.clone()
        };
        if units > 0 {
            *want.entry((sc, m.clone())).or_default() += units;
        }
    }

    // Kill while requests are in flight: Stripe has accepted some events, not all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.events().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let accepted_before = server.events().len();
    drop(proc1); // SIGKILL
    assert!(accepted_before > 0, "nothing was sent before the kill");
    assert_ne!(server.totals(), want, "everything arrived before the kill");

    // Restart on the same data dir: the rest arrives, nothing twice.
    server.set_response_delay(Duration::from_millis(20));
    server.set_random_faults(RandomFaults::default());
    let (proc2, _, http2) = run(dir.path(), &server.url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server.totals() != want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.totals(), want, "Stripe's totals after the restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.totals(), want, "nothing arrives twice later");
    let events = server.events();
    let ids: HashSet<_> = events.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(ids.len(), events.len(), "an identifier was accepted twice");
    // Everything is marked sent eventually; the ledger verifies.
    let mut pending = u64::MAX;
    for _ in 0..200 {
        let (_, v) = http(
            http2,
            "GET",
            "/v1/stripe/outbox?state=sent",
            Some(&token),
            None,
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        pending = v["stats"]["pending_rows"].as_u64().unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending, 0);
    // Requests in flight at the kill (or whose answers were lost) were resent, after their retry
    // backoff, under the same identifier: replayed from Stripe's idempotency cache (same key) or
    // refused as duplicates (a later attempt's key): the path that makes the restart exact was
    // exercised.
    assert!(
        server.duplicates_rejected() + server.idempotent_replays() >= 1,
        "nothing was resent after the restart"
    );
    let (_, v) = http(http2, "GET", "/v1/ledger/verify", Some(&token), None).await;
    assert!(v.contains("\"ok\":true"), "{v}");
    drop(proc2);
}
