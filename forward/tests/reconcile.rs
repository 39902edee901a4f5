//! Reconciliation end to end: after forwarding, Stripe's daily event summaries equal the
//! outbox's daily totals; an event Stripe has that we never sent shows up as a discrepancy.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rust_decimal::Decimal;
use tally_forward::stripe::client::{MeterEvent, StripeClient};
use tally_forward::stripe::reconcile::{day_totals, fetch_day_totals, reconcile};
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::stripe::{Api, ApiKey, MemoryStore};
use tally_forward::time::day_start;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_match_the_ledger_and_foreign_events_are_flagged() {
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    let mut rng = Rng(77);
    workload(&store, &mut rng, 200, 3);
    let fwd =
        tally_forward::stripe::spawn(config(Api::V2, &server), store.clone(), None, None).unwrap();
    assert!(wait_until(Duration::from_secs(20), || all_sent(&store)).await);
    fwd.shutdown().await;

    let groups = store.groups().unwrap();
    let ledger = day_totals(groups.iter().map(|g| {
        (
            g.event.stripe_customer.as_str(),
            g.event.event_name.as_str(),
            g.event.timestamp_s,
            g.event.value,
        )
    }));
    let client = StripeClient::new(
        &server.url(),
        &server.url(),
        ApiKey::new("sk_test_r"),
        "2026-10-28.endive",
        Duration::from_secs(5),
    )
    .unwrap();
    let first = day_start(now_s()) - 86_400;
    let end = day_start(now_s()) + 86_400;
    let fetch = |client: StripeClient, server_meters: Vec<(String, String)>| async move {
        let mut stripe = BTreeMap::new();
        for c in 0..3 {
            for (event, meter) in &server_meters {
                let days = fetch_day_totals(&client, meter, &format!("cus_{c}"), event, first, end)
                    .await
                    .unwrap();
                stripe.extend(days.into_iter().filter(|(_, v)| !v.is_zero()));
            }
        }
        stripe
    };
    let meters: Vec<(String, String)> = EVENTS
        .iter()
        .map(|e| (e.to_string(), server.meter_id(e)))
        .collect();
    let stripe = fetch(client.clone(), meters.clone()).await;
    assert!(!stripe.is_empty());
    assert_eq!(
        reconcile(&ledger, &stripe),
        vec![],
        "exact after forwarding"
    );

    // Someone else sends 5 units for cus_1 with an identifier we never used.
    let a = client
        .create_meter_event(
            &MeterEvent {
                event_name: "api_calls".into(),
                identifier: "foreign-1".into(),
                timestamp_s: now_s() - 60,
                stripe_customer: "cus_1".into(),
                value: 5,
            },
            "foreign-key-1",
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let stripe = fetch(client, meters).await;
    let d = reconcile(&ledger, &stripe);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].difference, Decimal::from(5));
    assert_eq!(d[0].key.stripe_customer, "cus_1");
}
