//! Operator paths: dead letters and retry from the API, unmapped customers, the 23-hour
//! unknown-outcome check, v2 session renewal, log-only mode, and the key kept out of logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tally_forward::retry::Backoff;
use tally_forward::stripe::outbox::{
    GroupState, MemoryStore, NewOutboxRow, OutboxState, OutboxStore,
};
use tally_forward::stripe::test_server::{FakeStripe, Fault};
use tally_forward::stripe::{Api, ForwarderConfig};
use tally_forward::time::OffsetClock;

fn row(customer: &str, value: u64) -> NewOutboxRow {
    let ts = now_s() - 120;
    NewOutboxRow {
        customer: customer.into(),
        meter: "api_calls".into(),
        stripe_event_name: "api_calls".into(),
        timestamp_s: ts - ts.rem_euclid(60),
        value,
    }
}

fn total(server: &FakeStripe, customer: &str) -> u64 {
    server
        .totals()
        .get(&(customer.to_owned(), "api_calls".to_owned()))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_then_retry_from_api_after_fixing_the_mapping() {
    let server = FakeStripe::start().await.unwrap();
    server.reject_customer("cus_wrong");
    let store = Arc::new(MemoryStore::new());
    store.set_stripe_customer("acme", "cus_wrong").unwrap();
    let a = store.insert(row("acme", 5)).unwrap();
    store.insert(row("acme", 7)).unwrap();
    let fwd =
        tally_forward::stripe::spawn(config(Api::V1, &server), store.clone(), None, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store.stats().unwrap().dead_rows
            == 2)
        .await
    );
    let dead = store.list(OutboxState::Dead, 0, 10).unwrap();
    let err = dead[0].error.clone().unwrap();
    assert_eq!((err.status, err.code.as_str()), (400, "resource_missing"));
    assert!(err.message.contains("No such customer"), "{}", err.message);
    assert_eq!(total(&server, "cus_wrong"), 0);
    // The operator fixes the mapping and retries (POST /v1/stripe/outbox/{id}/retry).
    store.set_stripe_customer("acme", "cus_right").unwrap();
    assert_eq!(store.requeue(a).unwrap().len(), 2);
    fwd.notify();
    assert!(
        wait_until(Duration::from_secs(10), || total(&server, "cus_right")
            == 12)
        .await
    );
    assert!(wait_until(Duration::from_secs(5), || all_sent(&store)).await);
    fwd.shutdown().await;
    assert_eq!(store.list(OutboxState::Sent, 0, 10).unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_customer_waits_then_flows_once_mapped() {
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    for v in [1, 2, 3] {
        store.insert(row("globex", v)).unwrap();
    }
    store.insert(row("cus_direct", 4)).unwrap();
    let fwd =
        tally_forward::stripe::spawn(config(Api::V1, &server), store.clone(), None, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || total(&server, "cus_direct")
            == 4)
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fwd.status().unmapped.get("globex"),
        Some(&3),
        "counted and visible"
    );
    assert_eq!(store.stats().unwrap().pending_rows, 3, "never dropped");
    assert_eq!(store.list(OutboxState::Pending, 0, 10).unwrap().len(), 3);
    store.set_stripe_customer("globex", "cus_globex").unwrap();
    fwd.notify();
    assert!(
        wait_until(Duration::from_secs(10), || total(&server, "cus_globex")
            == 6)
        .await
    );
    assert!(wait_until(Duration::from_secs(5), || fwd.status().unmapped.is_empty()).await);
    fwd.shutdown().await;
    assert!(all_sent(&store));
}

async fn unknown_outcome(
    fault: Fault,
) -> (
    FakeStripe,
    Arc<MemoryStore>,
    tally_forward::stripe::ForwarderStatus,
) {
    let server = FakeStripe::start().await.unwrap();
    server.push_faults([fault]);
    server.meter_id("api_calls"); // the meter exists in Stripe before any event
    let store = Arc::new(MemoryStore::new());
    store.insert(row("cus_u", 9)).unwrap();
    let clock = OffsetClock::new();
    let cfg = ForwarderConfig {
        // Retries land 5–10 minutes later on the forwarder's clock.
        backoff: Backoff {
            base: Duration::from_secs(600),
            cap: Duration::from_secs(3600),
        },
        ..config(Api::V1, &server)
    };
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, Some(Arc::new(clock.clone())))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store
            .groups()
            .unwrap()
            .first()
            .is_some_and(|g| g.state == GroupState::Unknown))
        .await
    );
    let before = server
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
        .count();
    assert_eq!(before, 1);
    clock.advance_ms(24 * 3600 * 1000);
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || all_sent(&store)).await);
    let status = fwd.status();
    fwd.shutdown().await;
    (server, store, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_after_23h_found_delivered_is_not_resent() {
    let (server, _store, status) = unknown_outcome(Fault::LoseAnswer).await;
    let sends = server
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
        .count();
    assert_eq!(sends, 1, "checked against event summaries, not resent");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/event_summaries"))
    );
    assert_eq!(status.resolved_by_check, 1);
    assert_eq!(total(&server, "cus_u"), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_after_23h_not_delivered_is_resent_once() {
    let (server, _store, status) = unknown_outcome(Fault::Drop).await;
    let sends = server
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
        .count();
    assert_eq!(sends, 2);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/event_summaries"))
    );
    assert_eq!(status.resolved_by_check, 0);
    assert_eq!(total(&server, "cus_u"), 9);
    assert_eq!(server.duplicates_rejected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_session_renewed_before_expiry_and_on_expired() {
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    let clock = OffsetClock::new();
    let fwd = tally_forward::stripe::spawn(
        config(Api::V2, &server),
        store.clone(),
        None,
        Some(Arc::new(clock.clone())),
    )
    .unwrap();
    let sessions = |s: &FakeStripe| {
        s.requests()
            .iter()
            .filter(|r| r.path == "/v2/billing/meter_event_session")
            .count()
    };
    store.insert(row("cus_s", 1)).unwrap();
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || total(&server, "cus_s") == 1).await);
    assert_eq!(sessions(&server), 1);
    // Within a minute of the 15-minute expiry (forwarder's clock): renewed before use.
    clock.advance_ms(14 * 60 * 1000 + 30_000);
    store.insert(row("cus_s", 2)).unwrap();
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || total(&server, "cus_s") == 3).await);
    assert_eq!(sessions(&server), 2);
    // Stripe expires the session early: 401 temporary_session_expired → renewed, resent.
    server.expire_sessions();
    store.insert(row("cus_s", 4)).unwrap();
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || total(&server, "cus_s") == 7).await);
    assert_eq!(sessions(&server), 3);
    fwd.shutdown().await;
    assert!(all_sent(&store));
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_only_without_key_sends_and_marks_nothing_and_key_never_logged() {
    let capture = Capture::default();
    let c2 = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || c2.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    store.insert(row("cus_log", 5)).unwrap();
    let cfg = ForwarderConfig {
        api_key: None,
        ..config(Api::V1, &server)
    };
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, None).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fwd.shutdown().await;
    assert!(server.requests().is_empty(), "log-only mode sends nothing");
    assert_eq!(
        store.stats().unwrap().sent_rows,
        0,
        "and marks nothing sent"
    );
    assert_eq!(store.stats().unwrap().pending_rows, 1);
    // With a key, through faults and errors: the key never reaches the logs.
    server.push_faults([Fault::Status500, Fault::LoseAnswer]);
    server.reject_customer("cus_bad");
    store.insert(row("cus_bad", 1)).unwrap();
    let fwd =
        tally_forward::stripe::spawn(config(Api::V1, &server), store.clone(), None, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store.stats().unwrap().dead_rows
            == 1
            && store.stats().unwrap().sent_rows == 1)
        .await
    );
    fwd.shutdown().await;
    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(logs.contains("would send meter event"), "{logs}");
    assert!(
        !logs.contains("sk_test_tally_fake_key"),
        "key leaked into logs"
    );
    assert!(!logs.contains("tally_fake_key"), "key leaked into logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_bad_event_is_isolated_and_async_errors_dead_letter_via_webhook() {
    use tally_forward::stripe::webhook::{Handled, handle_webhook, sign_webhook};
    let server = FakeStripe::start().await.unwrap();
    server.reject_customer_in_streams("cus_sync_bad");
    server.reject_customer("cus_async_bad");
    let store = Arc::new(MemoryStore::new());
    for c in [
        "cus_ok1",
        "cus_sync_bad",
        "cus_ok2",
        "cus_async_bad",
        "cus_ok3",
    ] {
        store.insert(row(c, 10)).unwrap();
    }
    let fwd =
        tally_forward::stripe::spawn(config(Api::V2, &server), store.clone(), None, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store
            .stats()
            .unwrap()
            .pending_rows
            == 0)
        .await
    );
    for c in ["cus_ok1", "cus_ok2", "cus_ok3"] {
        assert_eq!(
            total(&server, c),
            10,
            "{c}: good events delivered despite a bad neighbour"
        );
    }
    let dead = store.list(OutboxState::Dead, 0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].row.customer, "cus_sync_bad");
    assert_eq!(dead[0].error.as_ref().unwrap().code, "resource_missing");
    // The asynchronous rejection arrives as a signed webhook naming our identifier.
    let group = store
        .groups()
        .unwrap()
        .into_iter()
        .find(|g| g.event.stripe_customer == "cus_async_bad")
        .unwrap();
    assert_eq!(
        group.state,
        GroupState::Sent,
        "v2 accepted it; validation is asynchronous"
    );
    assert_eq!(total(&server, "cus_async_bad"), 0);
    let secret = tally_forward::WebhookSecret::new("whsec_t");
    let body = serde_json::json!({"id": "evt_1", "type": "v1.billing.meter.error_report_triggered", "data": {"reason": {"error_types": [
        {"code": "meter_event_customer_not_found", "sample_errors": [{"error_message": "No such customer", "request": {"identifier": group.event.identifier}}]}
    ]}}}).to_string();
    let header = sign_webhook(body.as_bytes(), &secret, now_s());
    assert_eq!(
        handle_webhook(store.as_ref(), &header, body.as_bytes(), &secret, now_s()).unwrap(),
        Handled::DeadLettered(1)
    );
    assert_eq!(store.stats().unwrap().dead_rows, 2);
    // Operator: Stripe now knows the customer; retry from the API → delivered (new identifier).
    server.accept_customer("cus_async_bad");
    store.requeue(group.event.row_ids[0]).unwrap();
    fwd.notify();
    assert!(
        wait_until(Duration::from_secs(10), || total(&server, "cus_async_bad")
            == 10)
        .await
    );
    fwd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_forwarder() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = tally_forward::metrics::StripeMetrics::register(&mut registry);
    let server = FakeStripe::start().await.unwrap();
    server.push_faults([Fault::Status500]);
    server.reject_customer("cus_dead");
    let store = Arc::new(MemoryStore::new());
    store.insert(row("cus_fine", 1)).unwrap();
    store.insert(row("cus_dead", 1)).unwrap();
    store.insert(row("nobody", 1)).unwrap();
    let fwd = tally_forward::stripe::spawn(
        config(Api::V1, &server),
        store.clone(),
        Some(metrics.clone()),
        None,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store.stats().unwrap().dead_rows
            == 1
            && store.stats().unwrap().sent_rows == 1)
        .await
    );
    fwd.shutdown().await; // refreshes the gauges on the way out
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for needle in [
        "tally_stripe_requests_total{status=\"500\"} 1",
        "tally_stripe_requests_total{status=\"200\"} 1",
        "tally_stripe_requests_total{status=\"400\"} 1",
        "tally_stripe_dead_letters 1",
        "tally_stripe_outbox_pending 1",
        "tally_stripe_outbox_unmapped 1",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    assert!(text.contains("tally_stripe_forward_lag_seconds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcomes_sharing_a_minute_are_resolved_together() {
    let server = FakeStripe::start().await.unwrap();
    server.meter_id("api_calls");
    server.push_faults([Fault::LoseAnswer, Fault::LoseAnswer]);
    let store = Arc::new(MemoryStore::new());
    let clock = OffsetClock::new();
    let cfg = ForwarderConfig {
        backoff: Backoff {
            base: Duration::from_secs(600),
            cap: Duration::from_secs(3600),
        },
        ..config(Api::V1, &server)
    };
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, Some(Arc::new(clock.clone())))
        .unwrap();
    let unknown = |n: usize| {
        store
            .groups()
            .unwrap()
            .iter()
            .filter(|g| g.state == GroupState::Unknown)
            .count()
            == n
    };
    store.insert(row("cus_w", 9)).unwrap();
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || unknown(1)).await);
    store.insert(row("cus_w", 5)).unwrap(); // same customer, meter and minute: a second group
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || unknown(2)).await);
    clock.advance_ms(24 * 3600 * 1000);
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || all_sent(&store)).await);
    let status = fwd.status();
    fwd.shutdown().await;
    let sends = server
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
        .count();
    assert_eq!(sends, 2, "neither was resent");
    assert_eq!(status.resolved_by_check, 2);
    assert_eq!(status.inconclusive_checks, 0);
    assert_eq!(total(&server, "cus_w"), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_paces_requests() {
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    for i in 0..40 {
        store.insert(row(&format!("cus_p{i}"), 1)).unwrap();
    }
    let cfg = ForwarderConfig {
        rate_per_s: None,
        ..config(Api::V1, &server)
    };
    assert_eq!(cfg.effective_rate(), 20, "sk_test_ keys default to 20/s");
    let start = std::time::Instant::now();
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, None).unwrap();
    assert!(wait_until(Duration::from_secs(10), || all_sent(&store)).await);
    let elapsed = start.elapsed();
    fwd.shutdown().await;
    // A full bucket of 20, then 20 more at 20/s.
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    let live = ForwarderConfig {
        api_key: Some(tally_forward::ApiKey::new("sk_live_x")),
        rate_per_s: None,
        ..ForwarderConfig::default()
    };
    assert_eq!(live.effective_rate(), 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_unmapped_rows_does_not_starve_newer_rows() {
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    for _ in 0..50 {
        store.insert(row("not_mapped_yet", 1)).unwrap();
    }
    store.insert(row("cus_late", 3)).unwrap();
    // Scan 10 rows a pass: the 51st row is only reached by resuming where the last pass ended.
    let cfg = ForwarderConfig {
        rows_per_pass: 10,
        ..config(Api::V1, &server)
    };
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, None).unwrap();
    assert!(wait_until(Duration::from_secs(10), || total(&server, "cus_late") == 3).await);
    assert!(
        wait_until(Duration::from_secs(5), || fwd
            .status()
            .unmapped
            .get("not_mapped_yet")
            == Some(&50))
        .await
    );
    fwd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_api_key_keeps_usage_pending_instead_of_dead() {
    let server = FakeStripe::start().await.unwrap();
    let store = Arc::new(MemoryStore::new());
    store.insert(row("cus_k", 2)).unwrap();
    for api in [Api::V1, Api::V2] {
        let cfg = ForwarderConfig {
            api_key: Some(tally_forward::ApiKey::new("pk_test_wrong")),
            ..config(api, &server)
        };
        let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, None).unwrap();
        assert!(wait_until(Duration::from_secs(5), || fwd.status().requests >= 2).await);
        fwd.shutdown().await;
        let s = store.stats().unwrap();
        assert_eq!((s.pending_rows, s.dead_rows), (1, 0), "{api:?}");
    }
    let fwd =
        tally_forward::stripe::spawn(config(Api::V1, &server), store.clone(), None, None).unwrap();
    assert!(wait_until(Duration::from_secs(10), || total(&server, "cus_k") == 2).await);
    fwd.shutdown().await;
}
