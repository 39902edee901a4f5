//! All three destinations on one `tally-collector run` process: decimal usage from several
//! agents reaches Orb and Metronome with totals equal to the ledger to the last decimal place
//! and Stripe exactly as before (⌊ledger × scale⌋), under injected 500s, 429s and lost answers
//! at each server. Orb is down at first: Metronome is not held up. The collector is SIGKILLed
//! while Metronome requests are in flight and restarted on the same data directory: nothing is
//! sent twice. A batch older than Orb's 12 h grace period arrives through a backfill.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use tally_collector::testkit::TestClient;
use tally_forward::ledger_feed::Engine;
use tally_forward::ledger_feed::fake::{FakeDest, FakeFault, FakeFaults};
use tally_forward::stripe::test_server::{FakeStripe, RandomFaults};
use tally_protocol::frame::{AckOutcome, Frame};

const ORB_KEY: &str = "orb_test_SECRETORB";
const MET_KEY: &str = "met_SECRETMET";

fn run(
    dir: &std::path::Path,
    stripe: &str,
    orb: &str,
    met: &str,
) -> (Proc, SocketAddr, SocketAddr) {
    spawn_collector(
        Command::new(env!("CARGO_BIN_EXE_tally-collector"))
            .args(["run", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--stripe-base-url", stripe])
            .args(["--stripe-request-timeout", "1", "--stripe-rate", "500"])
            .args(["--orb-base-url", orb, "--metronome-base-url", met])
            .env("STRIPE_API_KEY", "sk_test_fwd_SECRETKEY")
            .env("ORB_API_KEY", ORB_KEY)
            .env("METRONOME_API_KEY", MET_KEY),
        "SECRET",
    )
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_destinations_exact_through_faults_a_kill_and_an_orb_outage() {
    let stripe = FakeStripe::start().await.unwrap();
    stripe.set_random_faults(RandomFaults {
        status_500_permille: 50,
        rate_limited_permille: 50,
        lose_answer_permille: 100,
        seed: 7,
        ..RandomFaults::default()
    });
    let orb = FakeDest::start(Engine::Orb, ORB_KEY).await.unwrap();
    let met = FakeDest::start(Engine::Metronome, MET_KEY).await.unwrap();
    orb.set_down(true);
    // Metronome is slow (requests in flight at the kill) and faulty.
    met.set_response_delay(Duration::from_millis(400));
    met.push_faults([
        FakeFault::LoseAnswer,
        FakeFault::Status500,
        FakeFault::RateLimited,
    ]);
    met.set_random_faults(FakeFaults {
        status_500_permille: 80,
        rate_limited_permille: 80,
        lose_answer_permille: 150,
        seed: 21,
    });
    let dir = tempfile::tempdir().unwrap();
    let files = tally_collector::init(dir.path(), &[]).unwrap();
    let token = tally_collector::InitFiles::read_token(&files.admin_token).unwrap();
    let enroll = tally_collector::InitFiles::read_token(&files.enroll_token).unwrap();
    let ca = std::fs::read(&files.ca_pem).unwrap();

    let (proc1, quic, http_addr) = run(dir.path(), &stripe.url(), &orb.url(), &met.url());
    put_stripe_meters(http_addr, &token).await;

    // Three agents; one late batch (13 h old: past Orb's grace period).
    // Enough customers and minutes that Metronome's groups (one per customer, meter and minute)
    // need more than one request of 100, so the kill always finds some of them unsent.
    let customers = [
        "cus_a", "cus_b", "cus_c", "cus_d", "cus_e", "cus_f", "cus_g", "cus_h",
    ];
    let mut rng = Rng(5);
    let mut ledger: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let now = now_ms();
    for agent in 0..3u8 {
        let k = key(40 + agent);
        let mut client = TestClient::connect(quic, &ca, &k, Some(&enroll))
            .await
            .unwrap();
        for seq in 1..=12u64 {
            let late = agent == 0 && seq == 12;
            let mut deltas = Vec::new();
            let mut used = HashSet::new();
            for _ in 0..4 {
                let c = customers[rng.below(8) as usize];
                let m = ["api_calls", "tokens"][rng.below(2) as usize];
                if !used.insert((c, m)) {
                    continue;
                }
                let q = Decimal::new(1 + rng.below(3_000_000) as i64, 6);
                *ledger.entry((c.to_owned(), m.to_owned())).or_default() += q;
                let at = if late {
                    now - 13 * 3_600_000
                } else {
                    now - 60_000 * rng.below(60) as i64
                };
                deltas.push(delta(c, m, &[], at, q, 1));
            }
            match send(&mut client, &seal(&k, 1, seq, deltas)).await {
                Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut stripe_want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((c, m), q) in &ledger {
        let scale = if m == "tokens" {
            Decimal::from(1000)
        } else {
            Decimal::ONE
        };
        let units: u64 = (*q * scale).floor().try_into().unwrap();
        if units > 0 {
            stripe_want.insert((c.clone(), m.clone()), units);
        }
    }

    // SIGKILL while Metronome requests are in flight: some accepted, not all.
    until("metronome got something", 30, || !met.events().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(proc1);
    assert_ne!(met.totals(), ledger, "everything arrived before the kill");

    // Restart; Orb is still down, and Metronome completes regardless.
    met.set_response_delay(Duration::from_millis(20));
    let (proc2, _, http2) = run(dir.path(), &stripe.url(), &orb.url(), &met.url());
    until("metronome exact while orb is down", 60, || {
        met.totals() == ledger
    })
    .await;
    assert!(orb.events().is_empty(), "orb was down");
    // Orb comes back: everything arrives, the late batch through a backfill.
    orb.push_faults([
        FakeFault::LoseAnswer,
        FakeFault::Status500,
        FakeFault::RateLimited,
    ]);
    orb.set_down(false);
    until("orb exact", 60, || orb.totals() == ledger).await;
    let late: Vec<_> = orb
        .events()
        .into_iter()
        .filter(|e| e.timestamp_s * 1000 < now - 12 * 3_600_000)
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|e| e.backfill.is_some()),
        "{late:?}"
    );
    assert!(orb.backfills().iter().all(|b| b.1 == "reflected"));
    // Stripe: exact as before.
    until("stripe exact", 60, || stripe.totals() == stripe_want).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(met.totals(), ledger, "nothing arrives twice later");
    assert_eq!(orb.totals(), ledger);
    assert_eq!(stripe.totals(), stripe_want);
    assert_eq!(met.duplicates().1, 0, "a metronome key carried two values");
    assert_eq!(orb.duplicates().1, 0, "an orb key carried two values");
    // The request in flight at the kill was processed and its answer lost: the restarted
    // collector resends it under the same keys once its recorded lease (request timeout + 1 s)
    // has run out, and the fake counts each as a resend of an accepted key, never a new value.
    until("the killed request resent under its keys", 60, || {
        met.duplicates().0 > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(met.totals(), ledger, "the resend counted nothing twice");
    assert_eq!(met.duplicates().1, 0, "a metronome key carried two values");
    let ids: HashSet<_> = stripe
        .events()
        .iter()
        .map(|e| e.identifier.clone())
        .collect();
    assert_eq!(
        ids.len(),
        stripe.events().len(),
        "a Stripe identifier was accepted twice"
    );

    // The API: listings and reconciliation per destination.
    for d in ["orb", "metronome"] {
        let mut open = u64::MAX;
        for _ in 0..100 {
            let (st, v) = http(
                http2,
                "GET",
                &format!("/v1/outbox?destination={d}&state=sent&limit=5"),
                Some(&token),
                None,
            )
            .await;
            assert_eq!(st, 200, "{v}");
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            open = v["stats"]["open"].as_u64().unwrap() + v["stats"]["backfill"].as_u64().unwrap();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(open, 0, "{d}: everything marked sent");
        let (st, v) = http(
            http2,
            "GET",
            &format!("/v1/reconciliation?destination={d}"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["discrepancies"].as_array().unwrap().len(), 0, "{d}: {v}");
        assert!(v["compared"].as_u64().unwrap() > 0, "{d}: {v}");
    }
    let (st, _) = http(
        http2,
        "GET",
        "/v1/outbox?destination=paypal",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(st, 400);
    let (_, m) = http(http2, "GET", "/metrics", Some(&token), None).await;
    assert!(
        m.contains("tally_forward_events_sent_total{destination=\"metronome\"}"),
        "{m}"
    );
    let (_, v) = http(http2, "GET", "/v1/ledger/verify", Some(&token), None).await;
    assert!(v.contains("\"ok\":true"), "{v}");
    drop(proc2);
}
