//! Ingest over real QUIC on loopback: a known random workload with resends and duplicates ends
//! with exact ledger totals and a clean verification.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::HashMap;
use tally_collector::core::ledger::Period;
use tally_protocol::catalog::Aggregation;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{Ack, AckOutcome, Frame};
use tally_protocol::names::{CustomerId, MeterName};

fn ack(f: &Frame) -> (u64, u64, AckOutcome) {
    match f {
        Frame::Ack(Ack {
            epoch,
            seq,
            outcome,
        }) => (*epoch, *seq, *outcome),
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_with_resends_is_exact() {
    let env = start().await;
    let meters = ["api_calls", "tokens", "storage.gb", "requests-v2"];
    for m in meters {
        env.put_meter(m, Aggregation::Sum);
    }
    env.put_meter("events", Aggregation::Count);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Expected (customer, meter, period) -> (quantity, events).
    let mut model: HashMap<(String, String, String), (Decimal, u64)> = HashMap::new();
    let base_ms = 1_761_955_200_000; // 2025-11-01T00:00:00Z
    for agent in 0..3u8 {
        let key = key(10 + agent);
        let mut client = env.client(&key).await;
        let epoch = 100 + u64::from(agent);
        let mut sent = Vec::new();
        for seq in 1..=25u64 {
            let mut deltas = Vec::new();
            for _ in 0..(1 + rng.below(60)) {
                let customer = format!("cust-{}", rng.below(25));
                let all = ["api_calls", "tokens", "storage.gb", "requests-v2", "events"];
                let meter = all[rng.below(5) as usize];
                let dims: &[(&str, &str)] = match rng.below(3) {
                    0 => &[],
                    1 => &[("model", "small")],
                    _ => &[("model", "large"), ("region", "eu")],
                };
                // Spread over two months: Nov and Dec 2025.
                let at = base_ms + (rng.below(60 * 24 * 60) as i64) * 60_000;
                let sum = Decimal::new(rng.below(10_000_000) as i64, rng.below(5) as u32);
                let count = 1 + rng.below(50);
                let d = delta(&customer, meter, dims, at, sum, count);
                let qty = if meter == "events" {
                    Decimal::from(count)
                } else {
                    sum
                };
                let period = Period::of_ms(at).to_string();
                let e = model
                    .entry((customer, meter.to_owned(), period))
                    .or_default();
                e.0 += qty;
                e.1 += count;
                deltas.push(d);
            }
            let batch = seal(&key, epoch, seq, deltas);
            assert_eq!(
                ack(&send(&mut client, &batch).await),
                (epoch, seq, AckOutcome::Committed)
            );
            if rng.below(4) == 0 {
                // An immediate resend of the same batch.
                assert_eq!(
                    ack(&send(&mut client, &batch).await),
                    (epoch, seq, AckOutcome::Duplicate)
                );
            }
            sent.push(batch);
        }
        // Pipelined: several batches in flight, acks in order.
        for b in sent.iter().take(8) {
            client.send(&Frame::Batch(b.clone())).await.unwrap();
        }
        for seq in 1..=8 {
            assert_eq!(
                ack(&client.next_reply().await.unwrap()),
                (epoch, seq, AckOutcome::Duplicate)
            );
        }
        drop(client);
        // After a reconnect (no token: the key is registered now), resends are duplicates.
        let mut again = tally_collector::testkit::TestClient::connect(
            env.handle.quic_addr(),
            &env.ca_pem,
            &key,
            None,
        )
        .await
        .unwrap();
        for b in sent.iter().rev().take(5) {
            assert_eq!(ack(&send(&mut again, b).await).2, AckOutcome::Duplicate);
        }
    }
    let store = &env.handle.shared().store;
    for ((customer, meter, period), (qty, events)) in &model {
        let accts = store
            .usage_accounts(
                &CustomerId::new(customer.as_str()).unwrap(),
                Some(&MeterName::new(meter.as_str()).unwrap()),
                Some(Period::parse(period).unwrap()),
            )
            .unwrap();
        let total: Decimal = accts.iter().map(|a| a.balance()).sum();
        let total_events: u64 = accts.iter().map(|a| a.events).sum();
        assert_eq!(total, *qty, "{customer} {meter} {period}");
        assert_eq!(total_events, *events, "{customer} {meter} {period}");
    }
    env.assert_verified();
    let metrics = env.handle.shared().metrics.encode();
    assert!(
        metrics.contains("tally_collector_batches_total{result=\"committed\"} 75"),
        "{metrics}"
    );
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpostable_batches_are_quarantined_whole() {
    let env = start().await;
    env.put_meter("api_calls", Aggregation::Sum);
    let key = key(3);
    let mut c = env.client(&key).await;
    let good = delta("acme", "api_calls", &[], 1_763_000_000_000, Decimal::ONE, 1);
    let unknown = delta("acme", "nope", &[], 1_763_000_000_000, Decimal::ONE, 1);
    let mut invalid = good.clone();
    invalid.count = 0;
    let b1 = seal(&key, 1, 1, vec![good.clone(), unknown]);
    let b2 = seal(&key, 1, 2, vec![good.clone(), invalid]);
    let b3 = seal(&key, 1, 3, vec![good]);
    let q = |code| AckOutcome::Quarantined { code };
    assert_eq!(ack(&send(&mut c, &b1).await).2, q(ErrorCode::UnknownMeter));
    assert_eq!(ack(&send(&mut c, &b2).await).2, q(ErrorCode::InvalidDelta));
    assert_eq!(ack(&send(&mut c, &b3).await).2, AckOutcome::Committed);
    assert_eq!(ack(&send(&mut c, &b1).await).2, AckOutcome::Duplicate);
    let store = &env.handle.shared().store;
    let quarantined = store.quarantined(0, 100).unwrap();
    assert_eq!(quarantined.len(), 2);
    assert_eq!(quarantined[0].rejection.code, ErrorCode::UnknownMeter);
    assert_eq!(quarantined[0].rejection.row, Some(1));
    assert_eq!(quarantined[0].batch, b1);
    // Only the committed batch's delta is in the ledger.
    let accts = store
        .usage_accounts(&CustomerId::new("acme").unwrap(), None, None)
        .unwrap();
    assert_eq!(
        accts.iter().map(|a| a.balance()).sum::<Decimal>(),
        Decimal::ONE
    );
    env.assert_verified();
    env.handle.shutdown().await;
}

/// One clock: the collector reads wall time only from `CollectorConfig::clock`, so a manual
/// clock puts enrolment, acks and postings at virtual times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_reads_time_from_its_injected_clock() {
    use tally_collector::tally_clock::ManualClock;
    const T: i64 = 1_700_000_000_000;
    let clock = ManualClock::new(T);
    let c2 = clock.clone();
    let env = start_with(move |c| c.clock = std::sync::Arc::new(c2)).await;
    env.put_meter("api_calls", Aggregation::Sum);
    let k = key(77);
    let mut client = env.client(&k).await;
    let store = env.handle.shared().store.clone();
    let rec = store.agent(agent_id(&k)).unwrap().unwrap();
    assert_eq!(rec.registered_at_ms, T);
    clock.advance_ms(5_000);
    let b = seal(
        &k,
        1,
        1,
        vec![delta("acme", "api_calls", &[], T, Decimal::ONE, 1)],
    );
    assert_eq!(ack(&send(&mut client, &b).await).2, AckOutcome::Committed);
    let entries = store.entries(None, 0, 10).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.posted_at_ms, T + 5_000);
    assert_eq!(
        env.handle.shared().live_info(agent_id(&k)).last_seen_ms,
        T + 5_000
    );
    env.handle.shutdown().await;
}
