//! Outbox rows are written in the ledger transaction (SPEC §6.4): posted usage of a meter with a
//! Stripe event name makes rows worth ⌊Σ quantity × scale⌋ with the remainder carried;
//! duplicates, quarantined batches and meters without an event name write nothing; positive
//! adjustments flow like usage, negative ones write nothing and are netted out of later usage
//! (docs/decisions/0022); `ledger verify` checks Σ outbox units against the carry.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::str::FromStr;
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::{AckOutcome, Frame};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Σ outbox units per (customer, event name).
fn outbox(env: &Env) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (c, e, _, v) in env.handle.shared().store.outbox_items().unwrap() {
        *out.entry((c, e)).or_default() += v;
    }
    out
}

fn units(env: &Env, c: &str, e: &str) -> u64 {
    outbox(env)
        .get(&(c.to_owned(), e.to_owned()))
        .copied()
        .unwrap_or(0)
}

async fn ack(
    client: &mut tally_collector::testkit::TestClient,
    b: &tally_protocol::batch::SignedBatch,
) -> AckOutcome {
    match send(client, b).await {
        Frame::Ack(a) => a.outcome,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_follow_the_ledger_exactly() {
    // Log-only forwarder (no key): rows are written and grouped, nothing is sent.
    let env = start().await;
    for (m, scale) in [("api_calls", "1"), ("tokens", "1000")] {
        let body = format!(
            r#"{{"aggregation":"sum","event_type":"{m}","value_property":"$.value","stripe_event_name":"{m}_ev","stripe_unit_scale":"{scale}"}}"#
        );
        let (st, v) = env
            .admin("PUT", &format!("/v1/meters/{m}"), Some(&body))
            .await;
        assert_eq!(st, 200, "{v}");
    }
    env.put_meter("internal", Aggregation::Sum); // no stripe_event_name
    let k = key(41);
    let mut c = env.client(&k).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    // 0.4 + 0.4 + 0.4 api_calls → 1 unit (1.2), tokens 0.0015 × 1000 twice → 1 then 2 units.
    let b1 = seal(
        &k,
        1,
        1,
        vec![
            delta("acme", "api_calls", &[], now, d("0.4"), 1),
            delta("acme", "tokens", &[], now, d("0.0015"), 1),
            delta("acme", "internal", &[], now, d("7"), 1),
        ],
    );
    assert_eq!(ack(&mut c, &b1).await, AckOutcome::Committed);
    assert_eq!(units(&env, "acme", "api_calls_ev"), 0, "0.4 is carried");
    assert_eq!(units(&env, "acme", "tokens_ev"), 1);
    // The same batch again: a duplicate writes nothing.
    assert_eq!(ack(&mut c, &b1).await, AckOutcome::Duplicate);
    assert_eq!(units(&env, "acme", "tokens_ev"), 1);
    let b2 = seal(
        &k,
        1,
        2,
        vec![
            delta("acme", "api_calls", &[], now, d("0.4"), 1),
            delta("acme", "tokens", &[], now, d("0.0015"), 1),
        ],
    );
    assert_eq!(ack(&mut c, &b2).await, AckOutcome::Committed);
    let b3 = seal(
        &k,
        1,
        3,
        vec![delta("acme", "api_calls", &[], now, d("0.4"), 1)],
    );
    assert_eq!(ack(&mut c, &b3).await, AckOutcome::Committed);
    assert_eq!(units(&env, "acme", "api_calls_ev"), 1, "⌊1.2⌋");
    assert_eq!(units(&env, "acme", "tokens_ev"), 3, "⌊3.0⌋");
    // A quarantined batch (unknown meter) writes nothing.
    let bad = seal(
        &k,
        1,
        4,
        vec![
            delta("acme", "api_calls", &[], now, d("5"), 1),
            delta("acme", "nope", &[], now, d("1"), 1),
        ],
    );
    assert!(matches!(
        ack(&mut c, &bad).await,
        AckOutcome::Quarantined { .. }
    ));
    assert_eq!(units(&env, "acme", "api_calls_ev"), 1);
    // No outbox rows for a meter without a Stripe event name.
    assert!(outbox(&env).keys().all(|(_, e)| e.ends_with("_ev")));

    // Positive adjustment flows like usage: 1.2 + 2.9 = 4.1 → 4 units.
    let adj = |q: &str, key: &str| {
        format!(
            r#"{{"customer":"acme","meter":"api_calls","quantity":"{q}","reason":"test","idempotency_key":"{key}"}}"#
        )
    };
    let (st, v) = env
        .admin("POST", "/v1/adjustments", Some(&adj("2.9", "a1")))
        .await;
    assert!(st == 200 || st == 201, "{v}");
    assert_eq!(units(&env, "acme", "api_calls_ev"), 4);
    // Replayed adjustment: nothing more.
    env.admin("POST", "/v1/adjustments", Some(&adj("2.9", "a1")))
        .await;
    assert_eq!(units(&env, "acme", "api_calls_ev"), 4);
    // Negative adjustment: cannot be sent; net 4.1 − 3 = 1.1, nothing written.
    let (st, v) = env
        .admin("POST", "/v1/adjustments", Some(&adj("-3", "a2")))
        .await;
    assert!(st == 200 || st == 201, "{v}");
    assert_eq!(units(&env, "acme", "api_calls_ev"), 4);
    // Later usage nets it out first: net 1.1 + 3.5 = 4.6 → still ≤ 4 sent; + 0.5 → 5.1 → 5.
    let b5 = seal(
        &k,
        1,
        5,
        vec![delta("acme", "api_calls", &[], now, d("3.5"), 1)],
    );
    assert_eq!(ack(&mut c, &b5).await, AckOutcome::Committed);
    assert_eq!(units(&env, "acme", "api_calls_ev"), 4);
    let b6 = seal(
        &k,
        1,
        6,
        vec![delta("acme", "api_calls", &[], now, d("0.5"), 1)],
    );
    assert_eq!(ack(&mut c, &b6).await, AckOutcome::Committed);
    assert_eq!(units(&env, "acme", "api_calls_ev"), 5);
    // Ledger total 1.2 + 2.9 − 3 + 4.0 = 5.1 → ⌊5.1⌋ = 5 = Σ outbox.
    env.assert_verified();
    // Log-only: rows are listed as pending, nothing is dead.
    let (_, v) = env
        .admin("GET", "/v1/stripe/outbox?state=pending", None)
        .await;
    assert_eq!(v["mode"], "log_only");
    assert!(v["unmapped"].is_object());
    let (_, v) = env
        .admin("GET", "/v1/stripe/outbox?state=bogus", None)
        .await;
    assert_eq!(v["error"]["param"], "state", "{v}");
    env.handle.shutdown().await;
}
