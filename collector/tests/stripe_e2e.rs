//! Stripe forwarding end to end (SPEC §6.4): batches over real QUIC into a real in-process
//! collector whose forwarder talks to `tally_forward::stripe::test_server::FakeStripe` over real sockets,
//! with injected 500s, 429s with Retry-After and answers lost after processing.
//!
//! Proves, for v1 and v2: Stripe's totals per (Stripe customer, event name) end equal to
//! ⌊ledger total × stripe_unit_scale⌋ exactly (decimal quantities, scales 1 and 1000 so
//! remainders carry), no identifier is accepted twice, and (v1) at most one request is in flight
//! per customer and meter; customers are mapped through `PUT /v1/customers/{c}` (one mapped
//! only after its usage arrived, one `cus_…` key mapping to itself). Also: unmapped usage waits
//! visibly and flows after the mapping; a dead letter shows Stripe's code and message and an
//! operator retry after fixing the mapping delivers it once; webhooks are verified, idempotent
//! by event id, and an error report turns our event into a dead letter.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tally_collector::CollectorConfig;
use tally_collector::forwarding::stripe::StripeSettings;
use tally_forward::retry::Backoff;
use tally_forward::stripe::test_server::{FakeStripe, Fault, RandomFaults};
use tally_forward::stripe::{Api, ApiKey, ForwarderConfig, WebhookSecret};
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, MeterName};

const WHSEC: &str = "whsec_test_secret";

fn settings(api: Api, server: &FakeStripe) -> StripeSettings {
    StripeSettings {
        forwarder: ForwarderConfig {
            api,
            api_key: Some(ApiKey::new("sk_test_tally_e2e")),
            base_url: server.url(),
            meter_events_url: server.url(),
            rate_per_s: Some(2000),
            max_in_flight: 16,
            poll_interval: Duration::from_millis(25),
            request_timeout: Duration::from_secs(2),
            backoff: Backoff {
                base: Duration::from_millis(10),
                cap: Duration::from_millis(200),
            },
            ..ForwarderConfig::default()
        },
        webhook_secret: Some(WebhookSecret::new(WHSEC)),
        reconcile_interval: Some(Duration::from_millis(300)),
    }
}

async fn start_stripe(api: Api, server: &FakeStripe) -> Env {
    let s = settings(api, server);
    start_with(move |c: &mut CollectorConfig| c.stripe = s).await
}

/// `api_calls` (scale 1) and `tokens` (scale 1000), both forwarded.
async fn put_meters(env: &Env) {
    for (m, scale) in [("api_calls", "1"), ("tokens", "1000")] {
        let body = format!(
            r#"{{"aggregation":"sum","event_type":"{m}","value_property":"$.value","stripe_event_name":"{m}","stripe_unit_scale":"{scale}"}}"#
        );
        let (st, v) = env
            .admin("PUT", &format!("/v1/meters/{m}"), Some(&body))
            .await;
        assert_eq!(st, 200, "{v}");
    }
}

async fn map(env: &Env, customer: &str, stripe: &str) {
    // Plans are enforced: the plan must exist first.
    let (st, v) = env.admin("PUT", "/v1/plans/pro", Some("{}")).await;
    assert_eq!(st, 200, "{v}");
    let body = format!(r#"{{"stripe_customer_id":"{stripe}","plan":"pro"}}"#);
    let (st, v) = env
        .admin("PUT", &format!("/v1/customers/{customer}"), Some(&body))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stripe_customer_id"], stripe);
}

fn scale(meter: &str) -> Decimal {
    if meter == "tokens" {
        Decimal::from(1000)
    } else {
        Decimal::ONE
    }
}

/// Σ ledger usage (every period) per (customer, meter), read from the store.
fn ledger_totals(env: &Env, customers: &[&str]) -> BTreeMap<(String, String), Decimal> {
    let mut out = BTreeMap::new();
    for c in customers {
        for m in ["api_calls", "tokens"] {
            let accts = env
                .handle
                .shared()
                .store
                .usage_accounts(
                    &CustomerId::new(*c).unwrap(),
                    Some(&MeterName::new(m).unwrap()),
                    None,
                )
                .unwrap();
            let q: Decimal = accts.iter().map(|a| a.balance()).sum();
            if !q.is_zero() {
                out.insert(((*c).to_owned(), m.to_owned()), q);
            }
        }
    }
    out
}

/// What Stripe must hold: ⌊ledger × scale⌋ per (Stripe customer, event name), zeros left out.
fn expected(
    ledger: &BTreeMap<(String, String), Decimal>,
    mapping: &BTreeMap<&str, &str>,
) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for ((c, m), q) in ledger {
        let units: u64 = (*q * scale(m)).floor().try_into().unwrap();
        if units > 0 {
            let sc = mapping.get(c.as_str()).copied().unwrap_or(c.as_str());
            *out.entry((sc.to_owned(), m.clone())).or_default() += units;
        }
    }
    out
}

/// Sends `batches` random batches for `customers`; quantities with up to 4 decimals.
async fn workload(env: &Env, seed: u64, batches: u64, customers: &[&str]) {
    let key = key(u8::try_from(seed % 200).unwrap() + 1);
    let mut client = env.client(&key).await;
    let mut rng = Rng(seed | 1);
    let now = now_ms();
    for seq in 1..=batches {
        let mut deltas = Vec::new();
        let mut used = HashSet::new();
        for _ in 0..1 + rng.below(4) {
            let c = customers[rng.below(customers.len() as u64) as usize];
            let m = ["api_calls", "tokens"][rng.below(2) as usize];
            if !used.insert((c, m)) {
                continue;
            }
            // 0.0001 .. 5.0000: remainders below one unit must carry.
            let q = Decimal::new(1 + rng.below(50_000) as i64, 4);
            let at = now - 60_000 * rng.below(20) as i64;
            deltas.push(delta(c, m, &[], at, q, 1 + rng.below(3)));
        }
        let b = seal(&key, seed, seq, deltas);
        match send(&mut client, &b).await {
            Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}

fn assert_unique(server: &FakeStripe) {
    let events = server.events();
    let ids: HashSet<_> = events.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(ids.len(), events.len(), "an identifier was accepted twice");
}

async fn exact_end_to_end(api: Api, seed: u64) {
    let server = FakeStripe::start().await.unwrap();
    server.set_response_delay(Duration::from_millis(2));
    server.set_random_faults(RandomFaults {
        status_500_permille: 100,
        rate_limited_permille: 80,
        lose_answer_permille: 120,
        drop_permille: 0,
        lock_timeout_permille: 0,
        retry_after_s: 1,
        seed,
    });
    server.push_faults([
        Fault::LoseAnswer,
        Fault::Status500,
        Fault::RateLimited { retry_after_s: 1 },
        Fault::LoseAnswer,
    ]);
    let env = start_stripe(api, &server).await;
    put_meters(&env).await;
    let customers = ["acme", "globex", "cus_self", "initech"];
    let mapping = BTreeMap::from([
        ("acme", "cus_acme"),
        ("globex", "cus_globex"),
        ("initech", "cus_initech"),
    ]);
    map(&env, "acme", "cus_acme").await;
    map(&env, "globex", "cus_globex").await;
    // A cus_ key maps to itself, explicitly too.
    map(&env, "cus_self", "cus_self").await;
    workload(&env, seed, 40, &customers).await;
    // initech's usage waited for its mapping; it flows once mapped.
    map(&env, "initech", "cus_initech").await;
    workload(&env, seed + 1000, 20, &customers).await;

    let ledger = ledger_totals(&env, &customers);
    let want = expected(&ledger, &mapping);
    assert!(want.len() >= 6, "workload too small: {want:?}");
    let done = wait_for(Duration::from_secs(60), || server.totals() == want).await;
    let (_, outbox) = env
        .admin("GET", "/v1/stripe/outbox?state=pending", None)
        .await;
    assert!(
        done,
        "not converged: {:?} vs {want:?}; outbox {outbox}",
        server.totals()
    );
    // Nothing more arrives later (no late duplicates from lost answers).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.totals(), want);
    assert_unique(&server);
    assert!(server.faults_injected() >= 4);
    if api == Api::V1 {
        for (k, n) in server.max_in_flight() {
            assert!(n <= 1, "{k:?}: {n} requests in flight");
        }
    }
    let (_, dead) = env.admin("GET", "/v1/stripe/outbox?state=dead", None).await;
    assert_eq!(dead["data"].as_array().unwrap().len(), 0, "{dead}");
    let (_, metrics) = env
        .http("GET", "/metrics", Some(env.handle.admin_token()), None)
        .await;
    assert!(
        metrics.contains("tally_stripe_requests_total{status=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tally_stripe_outbox_pending"), "{metrics}");
    assert!(
        metrics.contains("tally_stripe_forward_lag_seconds"),
        "{metrics}"
    );
    // Reconciliation over today: Stripe's summaries equal what the ledger made due.
    let (st, rec) = env
        .admin("GET", "/v1/reconciliation?days=2&include_today=true", None)
        .await;
    assert_eq!(st, 200, "{rec}");
    assert_eq!(rec["discrepancies"].as_array().unwrap().len(), 0, "{rec}");
    assert!(rec["compared"].as_u64().unwrap() > 0, "{rec}");
    // The periodic reconciliation job runs too (it ends before the current day; the request
    // above included today).
    let periodic = wait_for(Duration::from_secs(5), || {
        env.handle
            .shared()
            .forwarding
            .stripe
            .last_reconciliation()
            .is_some_and(|r| r.to_day <= now_ms() / 1000 && r.mode == "ok")
    })
    .await;
    assert!(periodic, "the reconciliation job ran");
    // The ledger verifies, including Σ outbox units = the carried units per customer and meter.
    env.assert_verified();
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_end_to_end_exact_under_faults() {
    exact_end_to_end(Api::V1, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_end_to_end_exact_under_faults() {
    exact_end_to_end(Api::V2, 23).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_waits_dead_letter_retries_once_and_webhooks() {
    let server = FakeStripe::start().await.unwrap();
    let env = start_stripe(Api::V1, &server).await;
    put_meters(&env).await;
    // Unmapped: waits, visible in the listing and the metrics, never dropped.
    workload(&env, 5, 5, &["hooli"]).await;
    let ok = wait_for(Duration::from_secs(10), || {
        env.handle
            .shared()
            .forwarding
            .stripe_status()
            .unmapped
            .get("hooli")
            .is_some_and(|n| *n > 0)
    })
    .await;
    assert!(ok, "unmapped rows are counted");
    let (_, pending) = env
        .admin("GET", "/v1/stripe/outbox?state=pending", None)
        .await;
    assert!(!pending["data"].as_array().unwrap().is_empty(), "{pending}");
    assert!(
        pending["unmapped"]["hooli"].as_u64().unwrap() > 0,
        "{pending}"
    );
    let (_, metrics) = env
        .http("GET", "/metrics", Some(env.handle.admin_token()), None)
        .await;
    assert!(
        !metrics.contains("tally_stripe_outbox_unmapped 0"),
        "{metrics}"
    );
    assert!(server.totals().is_empty());

    // Mapped to a customer Stripe rejects: dead letter with Stripe's code and message.
    server.reject_customer("cus_wrong");
    map(&env, "hooli", "cus_wrong").await;
    let mut dead = serde_json::Value::Null;
    let ok = async {
        for _ in 0..400 {
            let (_, d) = env.admin("GET", "/v1/stripe/outbox?state=dead", None).await;
            let (_, p) = env
                .admin("GET", "/v1/stripe/outbox?state=pending", None)
                .await;
            if !d["data"].as_array().unwrap().is_empty() && p["data"].as_array().unwrap().is_empty()
            {
                dead = d;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
    .await;
    assert!(ok, "dead letters appear");
    let first = &dead["data"][0];
    assert_eq!(first["error"]["code"], "resource_missing", "{dead}");
    assert!(!first["error"]["message"].as_str().unwrap().is_empty());
    assert!(dead["stats"]["dead_rows"].as_u64().unwrap() > 0);
    // Retrying a row that is not dead is refused in Stripe's shape; unknown rows are 404.
    let (st, v) = env
        .admin("POST", "/v1/stripe/outbox/999999/retry", None)
        .await;
    assert_eq!(st, 404, "{v}");
    // Fix the mapping, retry every dead row: each arrives exactly once.
    map(&env, "hooli", "cus_hooli").await;
    let ledger = ledger_totals(&env, &["hooli"]);
    let want = expected(&ledger, &BTreeMap::from([("hooli", "cus_hooli")]));
    loop {
        let (_, d) = env.admin("GET", "/v1/stripe/outbox?state=dead", None).await;
        let Some(row) = d["data"].as_array().unwrap().first().cloned() else {
            break;
        };
        let id = row["row"]["id"].as_u64().unwrap();
        let (st, v) = env
            .admin("POST", &format!("/v1/stripe/outbox/{id}/retry"), None)
            .await;
        assert_eq!(st, 200, "{v}");
        assert!(v["requeued"].as_array().unwrap().contains(&id.into()));
        let (st, v) = env
            .admin("POST", &format!("/v1/stripe/outbox/{id}/retry"), None)
            .await;
        assert_eq!(st, 400, "a requeued row is not dead any more: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    assert!(wait_for(Duration::from_secs(20), || server.totals() == want).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.totals(), want);
    assert_unique(&server);

    // Webhooks: no token needed; bad signature → 400 in Stripe's shape.
    let ident = server.events()[0].identifier.clone();
    let body = serde_json::json!({
        "id": "evt_err_1",
        "object": "event",
        "type": "v1.billing.meter.error_report_triggered",
        "created": now_ms() / 1000,
        "data": {"reason": {"error_types": [{"code": "meter_event_customer_not_found",
            "error_count": 1,
            "sample_errors": [{"error_message": "customer missing",
                "request": {"identifier": ident}}]}]}}
    })
    .to_string();
    let post = |sig: String, body: String| {
        let addr = env.handle.http_addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "POST /v1/stripe/webhooks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nStripe-Signature: {sig}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf).into_owned();
            let status: u16 = text[9..12].parse().unwrap();
            let json = text
                .split_once("\r\n\r\n")
                .map(|x| x.1.to_owned())
                .unwrap_or_default();
            (status, json)
        }
    };
    let secret = WebhookSecret::new(WHSEC);
    let t = now_ms() / 1000;
    let bad = tally_forward::stripe::webhook::sign_webhook(
        body.as_bytes(),
        &WebhookSecret::new("whsec_other"),
        t,
    );
    let (st, v) = post(bad, body.clone()).await;
    assert_eq!(st, 400, "{v}");
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "signature_verification_failed");
    let good = tally_forward::stripe::webhook::sign_webhook(body.as_bytes(), &secret, t);
    let (st, v) = post(good.clone(), body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["dead_lettered"], 1, "{v}");
    assert_eq!(v["duplicate"], false);
    let (st, v) = post(good, body.clone()).await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["duplicate"], true, "idempotent by event id: {v}");
    let (_, d) = env.admin("GET", "/v1/stripe/outbox?state=dead", None).await;
    let rows = d["data"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["group"][1] == ident.as_str()
            && r["error"]["code"] == "meter_event_customer_not_found"),
        "{d}"
    );
    // A tampered body with the old signature is refused.
    let (st, _) = post(
        tally_forward::stripe::webhook::sign_webhook(b"{}", &secret, t),
        body.replace("evt_err_1", "evt_err_2"),
    )
    .await;
    assert_eq!(st, 400);
    // Documented in the OpenAPI document.
    let (_, doc) = env.http("GET", "/openapi.json", None, None).await;
    for p in [
        "/v1/customers/{customer}",
        "/v1/stripe/outbox",
        "/v1/stripe/outbox/{id}/retry",
        "/v1/stripe/webhooks",
        "/v1/reconciliation",
    ] {
        assert!(doc.contains(p), "{p} missing from /openapi.json");
    }
    env.handle.shutdown().await;
}
