//! Entitlements over a real in-process collector: the admin API (plans, customers, grants,
//! entitlements), pushes to a connected agent session, leases, and time-driven changes on a
//! `ManualClock`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Env, delta, key, seal, send, start_with};
use rust_decimal::Decimal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_agent::Agent;
use tally_collector::tally_clock::ManualClock;
use tally_collector::testkit::TestClient;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Aggregation;
use tally_protocol::entitlements::{
    CustomerEntitlements, Enforcement, EntitlementsRequest, LeaseRelease, LeaseRequest,
};
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, MeterName};

/// 2025-12-02T00:00:00Z.
const T0: i64 = 1_764_633_600_000;
/// 2026-01-01T00:00:00Z.
const JAN1: i64 = 1_767_225_600_000;

async fn env_at(now_ms: i64) -> (Env, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(now_ms));
    let c = clock.clone();
    let env = start_with(move |cfg| cfg.clock = c).await;
    env.put_meter("api_calls", Aggregation::Sum);
    (env, clock)
}

async fn ok(env: &Env, method: &str, path: &str, body: &str) -> serde_json::Value {
    let (st, v) = env.admin(method, path, Some(body)).await;
    assert_eq!(st, 200, "{method} {path}: {v}");
    v
}

async fn pro_customer(env: &Env) {
    ok(
        env,
        "PUT",
        "/v1/plans/pro",
        r#"{"features":["gpt4"],"limits":{"api_calls":{"included":"100","enforcement":"hard","reset":"calendar"}}}"#,
    )
    .await;
    ok(env, "PUT", "/v1/customers/acme", r#"{"plan":"pro"}"#).await;
}

/// Reads frames until an `Entitlements` frame lists `customer` and `pred` holds, within `wait`.
async fn pushed(
    client: &mut TestClient,
    customer: &str,
    wait: Duration,
    pred: impl Fn(&CustomerEntitlements) -> bool,
) -> CustomerEntitlements {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = tokio::time::timeout(left, client.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching push for {customer} within {wait:?}"))
            .unwrap();
        if let Frame::Entitlements(s) = f
            && let Some(c) = s.customers.iter().find(|c| c.customer.as_str() == customer)
            && pred(c)
        {
            return c.clone();
        }
    }
}

fn ask(customers: &[&str]) -> Frame {
    Frame::EntitlementsRequest(EntitlementsRequest {
        customers: BoundedVec::new(
            customers
                .iter()
                .map(|c| CustomerId::new(*c).unwrap())
                .collect(),
        )
        .unwrap(),
    })
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[tokio::test]
async fn plans_customers_grants_and_entitlements_over_the_api() {
    let (env, _clock) = env_at(T0).await;
    // An unknown plan is refused and changes nothing.
    let (st, v) = env
        .admin("PUT", "/v1/customers/acme", Some(r#"{"plan":"pro"}"#))
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "unknown_plan");
    let (st, _) = env.admin("GET", "/v1/plans/pro", None).await;
    assert_eq!(st, 404);
    let (st, v) = env
        .admin(
            "PUT",
            "/v1/plans/pro",
            Some(r#"{"limits":{"api_calls":{"included":"-1","enforcement":"hard"}}}"#),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    pro_customer(&env).await;
    let v = ok(&env, "GET", "/v1/plans/pro", "").await;
    assert_eq!(v["features"][0], "gpt4");
    assert_eq!(v["limits"]["api_calls"]["included"], "100");

    // Overrides: a feature added, the limit replaced.
    ok(
        &env,
        "PUT",
        "/v1/customers/acme",
        r#"{"overrides":{"add_features":["beta"],"limits":{"api_calls":{"included":"50","enforcement":"hard"}}}}"#,
    )
    .await;
    let grant = r#"{"customer":"acme","meter":"api_calls","quantity":"25","priority":1,"idempotency_key":"g-1"}"#;
    let g1 = ok(&env, "POST", "/v1/grants", grant).await;
    let g2 = ok(&env, "POST", "/v1/grants", grant).await;
    assert_eq!(g1["id"], g2["id"], "a repeated key returns the same grant");
    let (st, v) = env
        .admin(
            "POST",
            "/v1/grants",
            Some(&grant.replace("\"25\"", "\"26\"")),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["error"]["type"], "idempotency_error");
    let (st, v) = env
        .admin(
            "POST",
            "/v1/grants",
            Some(r#"{"customer":"acme","meter":"nope","quantity":"1","idempotency_key":"g-2"}"#),
        )
        .await;
    assert_eq!(st, 400, "{v}");

    // Usage through an agent, then the numbers.
    let k = key(7);
    let mut client = env.client(&k).await;
    let b = seal(
        &k,
        1,
        1,
        vec![delta("acme", "api_calls", &[], T0, d("60"), 3)],
    );
    assert!(
        matches!(send(&mut client, &b).await, Frame::Ack(a) if a.outcome == AckOutcome::Committed)
    );
    let v = ok(&env, "GET", "/v1/entitlements/acme", "").await;
    assert_eq!(v["plan"], "pro");
    assert_eq!(v["features"]["gpt4"]["source"], "plan");
    assert_eq!(v["features"]["beta"]["source"], "override");
    let m = &v["meters"]["api_calls"];
    assert_eq!(m["included"], "50");
    assert_eq!(m["granted"], "25");
    assert_eq!(m["used"], "60");
    assert_eq!(m["remaining"], "15");
    assert_eq!(m["source"], "override");
    assert_eq!(m["enforcement"], "hard");
    assert_eq!(m["allowed"], true);
    assert_eq!(m["period"]["start"], 1_764_547_200); // 2025-12-01

    // The grant is a ledger transfer traced to its record.
    env.assert_verified();
    let v = ok(&env, "GET", "/v1/ledger/entries?customer=acme", "").await;
    let text = v.to_string();
    assert!(text.contains("\"grant\""), "{text}");
    let (_, doc) = env.http("GET", "/openapi.json", None, None).await;
    for p in [
        "/v1/plans/{plan}",
        "/v1/grants",
        "/v1/entitlements/{customer}",
    ] {
        assert!(doc.contains(p), "{p} missing from openapi");
    }
    env.handle.shutdown().await;
}

#[tokio::test]
async fn a_grant_reaches_a_connected_agent_within_a_second() {
    let (env, _clock) = env_at(T0).await;
    pro_customer(&env).await;
    let k = key(8);
    let mut client = env.client(&k).await;
    client.send(&ask(&["acme", "unknown"])).await.unwrap();
    let c = pushed(&mut client, "acme", Duration::from_secs(2), |_| true).await;
    assert_eq!(c.plan.as_ref().map(|p| p.as_str()), Some("pro"));
    assert_eq!(c.features[0].name.as_str(), "gpt4");
    assert_eq!(c.limits[0].limit, d("100"));
    let start = Instant::now();
    ok(
        &env,
        "POST",
        "/v1/grants",
        r#"{"customer":"acme","meter":"api_calls","quantity":"40","idempotency_key":"push-1"}"#,
    )
    .await;
    let c = pushed(&mut client, "acme", Duration::from_secs(1), |c| {
        c.limits.first().is_some_and(|l| l.limit == d("140"))
    })
    .await;
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(c.limits[0].granted, d("40"));
    // A plan edit reaches it too.
    ok(
        &env,
        "PUT",
        "/v1/plans/pro",
        r#"{"features":["gpt4","sso"]}"#,
    )
    .await;
    pushed(&mut client, "acme", Duration::from_secs(1), |c| {
        c.features.len() == 2 && c.limits.is_empty()
    })
    .await;
    // The agent reconnects: what it was tracking is pushed on connect, without asking.
    drop(client);
    let mut again = env.client(&k).await;
    pushed(&mut again, "acme", Duration::from_secs(2), |c| {
        c.features.len() == 2
    })
    .await;
    env.handle.shutdown().await;
}

#[tokio::test]
async fn leases_are_granted_from_what_remains_and_freed_after_release() {
    let (env, clock) = env_at(T0).await;
    pro_customer(&env).await;
    let (k1, k2) = (key(9), key(10));
    let mut a1 = env.client(&k1).await;
    let mut a2 = env.client(&k2).await;
    let lease = |id: u64, q: &str| {
        Frame::LeaseRequest(LeaseRequest {
            request_id: id,
            customer: CustomerId::new("acme").unwrap(),
            meter: MeterName::new("api_calls").unwrap(),
            period_start_ms: 1_764_547_200_000,
            quantity: d(q),
        })
    };
    a1.send(&lease(1, "80")).await.unwrap();
    let Frame::LeaseGrant(g1) = a1.next_reply().await.unwrap() else {
        panic!("no grant")
    };
    assert_eq!((g1.request_id, g1.added), (1, d("80")));
    // The other agent gets at most half of the 20 left.
    a2.send(&lease(2, "50")).await.unwrap();
    let Frame::LeaseGrant(g2) = a2.next_reply().await.unwrap() else {
        panic!("no grant")
    };
    assert_eq!(g2.added, d("10"));
    let v = ok(&env, "GET", "/v1/entitlements/acme", "").await;
    assert_eq!(v["meters"]["api_calls"]["leased"], "90");
    assert_eq!(v["meters"]["api_calls"]["remaining"], "10");
    // Agent 1 used 30 under its lease, shipped it, and released through that batch.
    let b = seal(
        &k1,
        1,
        1,
        vec![delta("acme", "api_calls", &[], T0, d("30"), 1)],
    );
    assert!(matches!(send(&mut a1, &b).await, Frame::Ack(_)));
    a1.send(&Frame::LeaseRelease(LeaseRelease {
        lease_id: g1.lease_id,
        epoch: 1,
        through_seq: 1,
    }))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v = ok(&env, "GET", "/v1/entitlements/acme", "").await;
        let m = &v["meters"]["api_calls"];
        if m["leased"] == "10" {
            assert_eq!(m["used"], "30");
            assert_eq!(m["remaining"], "60");
            break;
        }
        assert!(Instant::now() < deadline, "release not settled: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = env.handle.shared().metrics.encode();
    assert!(
        text.contains("tally_collector_entitlements_lease_grants_total 2"),
        "{text}"
    );
    drop((a1, a2));
    // Leases survive a collector restart (kept in the store).
    env.handle.shutdown().await;
    let mut cfg = tally_collector::CollectorConfig::ephemeral(env.dir.path());
    cfg.clock = clock;
    let handle = tally_collector::Collector::start(cfg).await.unwrap();
    let token = handle.admin_token().to_owned();
    let (st, text) = common::http(
        handle.http_addr(),
        "GET",
        "/v1/entitlements/acme",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(st, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["meters"]["api_calls"]["leased"], "10", "{v}");
    handle.shutdown().await;
}

#[tokio::test]
async fn anchor_day_periods_count_usage_from_the_anchor() {
    let (env, _clock) = env_at(T0).await;
    ok(
        &env,
        "PUT",
        "/v1/plans/team",
        r#"{"limits":{"api_calls":{"included":"100","enforcement":"soft","reset":"anchor"}}}"#,
    )
    .await;
    ok(
        &env,
        "PUT",
        "/v1/customers/acme",
        r#"{"plan":"team","anchor_day":15}"#,
    )
    .await;
    let k = key(13);
    let mut client = env.client(&k).await;
    // 2025-11-20 (in the period) and 2025-11-10 (before it).
    let in_period = T0 - 12 * 86_400_000;
    let before = T0 - 22 * 86_400_000;
    let b = seal(
        &k,
        1,
        1,
        vec![
            delta("acme", "api_calls", &[], in_period, d("30"), 1),
            delta("acme", "api_calls", &[], before, d("5"), 1),
        ],
    );
    assert!(matches!(send(&mut client, &b).await, Frame::Ack(_)));
    let v = ok(&env, "GET", "/v1/entitlements/acme", "").await;
    let m = &v["meters"]["api_calls"];
    assert_eq!(m["used"], "30", "{m}");
    assert_eq!(m["period"]["start"], 1_763_164_800); // 2025-11-15
    assert_eq!(m["period"]["end"], 1_765_756_800); // 2025-12-15
    assert_eq!(m["enforcement"], "soft");
    let (st, v) = env
        .admin("PUT", "/v1/customers/acme", Some(r#"{"anchor_day":32}"#))
        .await;
    assert_eq!(st, 400, "{v}");
    env.handle.shutdown().await;
}

#[tokio::test]
async fn grant_expiry_and_period_roll_over_on_a_manual_clock() {
    let (env, clock) = env_at(JAN1 - 3_600_000).await;
    pro_customer(&env).await;
    let k = key(11);
    let mut client = env.client(&k).await;
    let b = seal(
        &k,
        1,
        1,
        vec![delta(
            "acme",
            "api_calls",
            &[],
            JAN1 - 3_600_000,
            d("70"),
            1,
        )],
    );
    assert!(matches!(send(&mut client, &b).await, Frame::Ack(_)));
    let expires = (JAN1 - 1_800_000) / 1000;
    let body = format!(
        r#"{{"customer":"acme","meter":"api_calls","quantity":"50","expires_at":{expires},"idempotency_key":"exp-1"}}"#
    );
    ok(&env, "POST", "/v1/grants", &body).await;
    client.send(&ask(&["acme"])).await.unwrap();
    pushed(&mut client, "acme", Duration::from_secs(2), |c| {
        c.limits[0].limit == d("150")
    })
    .await;

    // The grant expires: only what usage consumed of it (0: 70 < 100 included) still counts.
    clock.advance_ms(1_800_000);
    let c = pushed(&mut client, "acme", Duration::from_secs(2), |c| {
        c.limits[0].limit == d("100")
    })
    .await;
    assert_eq!(c.limits[0].used, d("70"));
    let v = ok(&env, "GET", "/v1/entitlements/acme", "").await;
    assert_eq!(v["meters"]["api_calls"]["granted"], "0");

    // The period rolls over: usage starts again from zero, pushed without any write.
    clock.advance_ms(1_800_000);
    let c = pushed(&mut client, "acme", Duration::from_secs(2), |c| {
        c.limits[0].period_start_ms == JAN1
    })
    .await;
    assert_eq!(c.limits[0].used, Decimal::ZERO);
    assert_eq!(c.limits[0].period_end_ms, 1_769_904_000_000); // 2026-02-01
    env.handle.shutdown().await;
}

async fn post_webhook(env: &Env, sig: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(env.handle.http_addr())
        .await
        .unwrap();
    let req = format!(
        "POST /v1/stripe/webhooks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nStripe-Signature: {sig}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

#[tokio::test]
async fn a_stripe_entitlement_webhook_grants_its_feature_and_a_refresh_fetches_them() {
    use tally_forward::stripe::test_server::FakeStripe;
    use tally_forward::stripe::{ApiKey, ForwarderConfig, WebhookSecret};
    let server = FakeStripe::start().await.unwrap();
    let settings = tally_collector::forwarding::stripe::StripeSettings {
        forwarder: ForwarderConfig {
            api_key: Some(ApiKey::new("sk_test_tally_ent")),
            base_url: server.url(),
            meter_events_url: server.url(),
            ..ForwarderConfig::default()
        },
        webhook_secret: Some(WebhookSecret::new("whsec_ent")),
        reconcile_interval: None,
    };
    let env = start_with(move |c| c.stripe = settings).await;
    ok(
        &env,
        "PUT",
        "/v1/customers/acme",
        r#"{"stripe_customer_id":"cus_acme"}"#,
    )
    .await;
    let k = key(12);
    let mut client = env.client(&k).await;
    client.send(&ask(&["acme"])).await.unwrap();
    pushed(&mut client, "acme", Duration::from_secs(2), |c| {
        c.features.is_empty()
    })
    .await;

    server.set_active_entitlements("cus_acme", &["gpt4"]);
    let body = server.entitlement_summary_event("evt_ent_1", "cus_acme");
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let bad = tally_forward::stripe::webhook::sign_webhook(
        body.as_bytes(),
        &WebhookSecret::new("whsec_x"),
        t,
    );
    assert_eq!(
        post_webhook(&env, &bad, &body).await.0,
        400,
        "a bad signature changes nothing"
    );
    let sig = tally_forward::stripe::webhook::sign_webhook(
        body.as_bytes(),
        &WebhookSecret::new("whsec_ent"),
        t,
    );
    let (st, text) = post_webhook(&env, &sig, &body).await;
    assert_eq!(st, 200, "{text}");
    let c = pushed(&mut client, "acme", Duration::from_secs(1), |c| {
        !c.features.is_empty()
    })
    .await;
    assert_eq!(c.features[0].name.as_str(), "gpt4");
    assert_eq!(
        c.features[0].source,
        tally_protocol::entitlements::Source::Stripe
    );
    let v = ok(&env, "GET", "/v1/entitlements/acme", "").await;
    assert_eq!(v["features"]["gpt4"]["source"], "stripe");

    // On demand: the active entitlements fetched from Stripe.
    server.set_active_entitlements("cus_acme", &["gpt4", "sso"]);
    let v = ok(
        &env,
        "POST",
        "/v1/customers/acme/stripe-entitlements/refresh",
        "",
    )
    .await;
    assert_eq!(v["features"], serde_json::json!(["gpt4", "sso"]));
    pushed(&mut client, "acme", Duration::from_secs(1), |c| {
        c.features.len() == 2
    })
    .await;

    // A customer newly mapped to a Stripe customer gets its active entitlements at once,
    // without a webhook or a refresh.
    server.set_active_entitlements("cus_beta", &["sso"]);
    ok(
        &env,
        "PUT",
        "/v1/customers/beta",
        r#"{"stripe_customer_id":"cus_beta"}"#,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = ok(&env, "GET", "/v1/entitlements/beta", "").await;
        if v["features"]["sso"]["source"] == "stripe" {
            break;
        }
        assert!(Instant::now() < deadline, "not fetched: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.handle.shutdown().await;
}

/// A real agent (`tally-agent`) and the collector on one `ManualClock`, over QUIC on loopback:
/// the agent's answers follow a grant's expiry and the period's roll-over, pushed by the
/// collector with no write, and in the new period the agent consumes exactly the plan's
/// included quantity again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_grant_expiry_and_period_roll_over_on_a_manual_clock() {
    let (env, clock) = env_at(JAN1 - 3_600_000).await;
    pro_customer(&env).await;
    let expires = (JAN1 - 1_800_000) / 1000;
    let body = format!(
        r#"{{"customer":"acme","meter":"api_calls","quantity":"50","expires_at":{expires},"idempotency_key":"exp-agent"}}"#
    );
    ok(&env, "POST", "/v1/grants", &body).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .data_dir(dir.path())
        .collector(env.handle.quic_addr().to_string())
        .ca_pem(env.ca_pem.clone())
        .enroll_token(env.handle.enroll_token())
        .clock(clock.clone())
        .flush_interval(Duration::from_millis(50))
        .entitlements_wait(Duration::from_secs(5))
        .start()
        .await
        .unwrap();

    // The plan's 100 and the grant's 50.
    let l = agent.limit_wait("acme", "api_calls").await;
    assert_eq!(l.limit, Some(d("150")), "{l:?}");
    let c = agent
        .try_consume_wait("acme", "api_calls", d("70"))
        .await
        .unwrap();
    assert!(c.allowed, "{c:?}");

    // The grant expires: the agent's limit drops to the plan's within a bound.
    clock.advance_ms(1_800_000);
    let l = eventually(|| {
        let l = agent.limit("acme", "api_calls");
        (l.limit == Some(d("100"))).then_some(l)
    })
    .await;
    assert_eq!(l.enforcement, Some(Enforcement::Hard));

    // The period rolls over: usage restarts from zero at the agent.
    clock.set_ms(JAN1 + 1_000);
    let l = eventually(|| {
        let l = agent.limit("acme", "api_calls");
        (l.used.is_zero() && l.remaining == Some(d("100"))).then_some(l)
    })
    .await;
    assert_eq!(l.limit, Some(d("100")));
    // Demand past the limit: exactly the plan's 100 are allowed in the new period.
    let mut allowed = 0;
    for _ in 0..130 {
        let c = agent
            .try_consume_wait("acme", "api_calls", Decimal::ONE)
            .await
            .unwrap();
        if c.allowed {
            allowed += 1;
        } else {
            assert_eq!(c.decided_by, tally_agent::DecidedBy::Lease);
            // A grant that added nothing (e.g. a batch committed to the ledger but not yet
            // reported to the lease book) backs the agent off for 200 ms of its clock, which
            // only moves when the test moves it.
            clock.advance_ms(250);
        }
    }
    assert_eq!(allowed, 100);
    let _ = agent.shutdown(Duration::from_secs(2)).await;
    env.handle.shutdown().await;
}

/// Polls `f` every 20 ms for up to 10 s (the collector pushes within 1 s; the bound is for a
/// loaded machine).
async fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
