//! Entitlements through real `tally-agent` processes and the collector stand-in (which grants
//! leases by the protocol's rule `used + Σ outstanding ≤ limit` and frees a released lease once
//! the batches it names are committed):
//! - the endpoints: features, limits, consume (200 / 402), reservations (create, commit capped
//!   by the limit, release, unknown ids);
//! - a hard limit of N consumed concurrently through two sidecars, one of them killed with
//!   SIGKILL and restarted meanwhile: at most N allowed, at least 0.99 N, and the ledger holds
//!   exactly what was allowed.
#![allow(clippy::unwrap_used)]

mod process;
use process::{Sidecar, call, free_port, run_command, wait_ready};

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use common::{Faults, StandIn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally_protocol::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, Catalog, MeterDef};
use tally_protocol::entitlements::{
    CustomerEntitlements, Enforcement, Feature, MeterLimit, Source,
};
use tally_protocol::names::{CustomerId, FeatureName, MeterName};

fn catalog() -> Catalog {
    Catalog {
        version: 1,
        meters: BoundedVec::new(vec![MeterDef {
            name: MeterName::new("api_calls").unwrap(),
            aggregation: Aggregation::Sum,
            event_type: "api_call".into(),
            value_property: Some("$.count".into()),
            group_by: BoundedVec::default(),
            stripe_event_name: None,
            stripe_unit_scale: Decimal::ONE,
        }])
        .unwrap(),
    }
}

fn plan(customer: &str, hard: i64) -> CustomerEntitlements {
    CustomerEntitlements {
        customer: CustomerId::new(customer).unwrap(),
        plan: None,
        features: BoundedVec::new(vec![Feature {
            name: FeatureName::new("gpt4").unwrap(),
            source: Source::Plan,
        }])
        .unwrap(),
        limits: BoundedVec::new(vec![MeterLimit {
            meter: MeterName::new("api_calls").unwrap(),
            included: Decimal::from(hard),
            granted: Decimal::ZERO,
            limit: Decimal::from(hard),
            used: Decimal::ZERO,
            enforcement: Enforcement::Hard,
            source: Source::Plan,
            period_start_ms: 0,
            period_end_ms: i64::MAX,
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
    Sidecar::spawn(run_command(dir, collector, ca, http).args([
        "--reservation-ttl-secs",
        "1",
        "--entitlements-wait-ms",
        "500",
    ]))
}

async fn json(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = call(addr, method, path, None, body).await.unwrap();
    let v = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, v)
}

async fn setup(limit: i64) -> (StandIn, tempfile::TempDir, std::path::PathBuf) {
    let standin = StandIn::start_with(Faults::default(), Some(catalog()), None, 8).await;
    {
        let mut s = standin.seen.lock().unwrap();
        s.customers.insert("acme".into(), plan("acme", limit));
        s.limits
            .insert(("acme".into(), "api_calls".into()), Decimal::from(limit));
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &standin.ca_pem).unwrap();
    (standin, dir, ca)
}

fn used(standin: &StandIn) -> Decimal {
    standin.seen.lock().unwrap().used("acme", "api_calls")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlement_endpoints_answer_from_the_agent() {
    let (standin, dir, ca) = setup(10).await;
    let http = free_port();
    let _sidecar = spawn_sidecar(&dir.path().join("a"), &standin.address(), &ca, http);
    wait_ready(http).await;

    // A customer seen for the first time: the answer waits for its snapshot.
    let (s, v) = json(http, "GET", "/v1/entitlements/acme/gpt4", "").await;
    assert_eq!(s, 200);
    assert_eq!(
        (v["allowed"].as_bool(), v["decided_by"].as_str()),
        (Some(true), Some("plan")),
        "{v}"
    );
    let (_, v) = json(http, "GET", "/v1/entitlements/acme/sora", "").await;
    assert_eq!(
        (v["allowed"].as_bool(), v["decided_by"].as_str()),
        (Some(false), Some("plan")),
        "{v}"
    );
    let (_, v) = json(http, "GET", "/v1/entitlements/acme", "").await;
    assert_eq!(v["features"]["gpt4"]["decided_by"], "plan", "{v}");
    assert_eq!(v["limits"]["api_calls"]["limit"], "10", "{v}");
    assert_eq!(v["limits"]["api_calls"]["enforcement"], "hard", "{v}");

    let consume = |q: &'static str| async move {
        json(
            http,
            "POST",
            "/v1/entitlements/acme/api_calls/consume",
            &format!(r#"{{"quantity":"{q}"}}"#),
        )
        .await
    };
    let (s, v) = consume("4").await;
    assert_eq!((s, v["allowed"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(v["decided_by"], "lease");
    // Reserve 3 of the 6 left, commit 5: capped to what the limit allows (6).
    let (s, v) = json(
        http,
        "POST",
        "/v1/entitlements/acme/api_calls/reservations",
        r#"{"quantity":"3"}"#,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // Another reservation cannot take what is held: 4 would exceed 6 − 3.
    let (s, _) = json(
        http,
        "POST",
        "/v1/entitlements/acme/api_calls/reservations",
        r#"{"quantity":"4"}"#,
    )
    .await;
    assert_eq!(s, 402);
    let (s, v) = json(
        http,
        "POST",
        &format!("/v1/reservations/{id}/commit"),
        r#"{"quantity":"5"}"#,
    )
    .await;
    assert_eq!(
        (s, v["recorded"].as_str(), v["allowed"].as_bool()),
        (200, Some("5"), Some(true)),
        "{v}"
    );
    let (s, _) = json(
        http,
        "POST",
        &format!("/v1/reservations/{id}/commit"),
        r#"{"quantity":"1"}"#,
    )
    .await;
    assert_eq!(s, 404, "a reservation commits once");
    // One left: a reservation of it, released, then gone.
    let (s, v) = json(
        http,
        "POST",
        "/v1/entitlements/acme/api_calls/reservations",
        r#"{"quantity":"1"}"#,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        json(http, "DELETE", &format!("/v1/reservations/{id}"), "")
            .await
            .0,
        204
    );
    assert_eq!(
        json(http, "DELETE", &format!("/v1/reservations/{id}"), "")
            .await
            .0,
        404
    );
    // An expiring reservation gives its hold back (ttl 1 s).
    let (s, _) = json(
        http,
        "POST",
        "/v1/entitlements/acme/api_calls/reservations",
        r#"{"quantity":"1"}"#,
    )
    .await;
    assert_eq!(s, 201);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (s, v) = consume("1").await;
    assert_eq!((s, v["allowed"].as_bool()), (200, Some(true)), "{v}");
    let (s, v) = consume("1").await;
    assert_eq!(
        (s, v["allowed"].as_bool(), v["decided_by"].as_str()),
        (402, Some(false), Some("lease")),
        "{v}"
    );
    // Bad input: 400, nothing recorded.
    assert_eq!(consume("-1").await.0, 400);
    assert_eq!(
        json(
            http,
            "POST",
            "/v1/entitlements/acme/nope/consume",
            r#"{"quantity":"1"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(json(http, "POST", "/v1/flush", "").await.0, 200);
    assert_eq!(used(&standin), Decimal::from(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_limit_holds_across_two_sidecars_through_a_sigkill() {
    const N: i64 = 300;
    let (standin, dir, ca) = setup(N).await;
    let https = [free_port(), free_port()];
    let dirs = [dir.path().join("a"), dir.path().join("b")];
    let mut a = spawn_sidecar(&dirs[0], &standin.address(), &ca, https[0]);
    let mut b = spawn_sidecar(&dirs[1], &standin.address(), &ca, https[1]);
    wait_ready(https[0]).await;
    wait_ready(https[1]).await;

    let allowed = Arc::new(AtomicU64::new(0));
    let unanswered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..6 {
        let http = https[c % 2];
        let allowed = allowed.clone();
        let unanswered = unanswered.clone();
        clients.push(tokio::spawn(async move {
            // Until denied steadily for 1.5 s (leases of the other agent or of a killed one
            // may come back meanwhile), or 30 s in all.
            let end = Instant::now() + Duration::from_secs(30);
            let mut denied_since: Option<Instant> = None;
            while Instant::now() < end {
                let r = call(
                    http,
                    "POST",
                    "/v1/entitlements/acme/api_calls/consume",
                    None,
                    r#"{"quantity":"1"}"#,
                )
                .await;
                match r.map(|(s, _)| s) {
                    Some(200) => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                        denied_since = None;
                    }
                    Some(402) => {
                        let since = *denied_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(1_500) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Some(other) => panic!("consume answered {other}"),
                    None => {
                        // Killed under us: the request may or may not have been recorded.
                        unanswered.fetch_add(1, Ordering::Relaxed);
                        denied_since = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    // Kill b with SIGKILL a third of the way through, restart it on the same data dir.
    while allowed.load(Ordering::Relaxed) < (N / 3) as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    b = spawn_sidecar(&dirs[1], &standin.address(), &ca, https[1]);
    for c in clients {
        c.await.unwrap();
    }
    for http in https {
        assert_eq!(json(http, "POST", "/v1/flush", "").await.0, 200);
    }
    let allowed = allowed.load(Ordering::Relaxed);
    let unanswered = unanswered.load(Ordering::Relaxed);
    let ledger = used(&standin);
    eprintln!("limit {N}: ledger {ledger}, answered 200 {allowed}, unanswered {unanswered}");
    let n = Decimal::from(N);
    // Never more than N; the ledger holds what was answered 200, plus at most the requests
    // the kill left unanswered (recorded durably before the answer was lost).
    assert!(ledger <= n, "ledger {ledger} > {N}");
    assert!(
        Decimal::from(allowed) <= ledger,
        "allowed {allowed} > ledger {ledger}"
    );
    assert!(
        ledger - Decimal::from(allowed) <= Decimal::from(unanswered),
        "ledger {ledger}, allowed {allowed}, unanswered {unanswered}"
    );
    assert!(
        ledger * Decimal::from(100) >= n * Decimal::from(99),
        "ledger {ledger} < 0.99 × {N}"
    );
    let s = standin.seen.lock().unwrap();
    assert!(s.used("acme", "api_calls") + s.outstanding("acme", "api_calls") <= n);
    assert!(
        !s.releases.is_empty(),
        "the restarted sidecar released its old lease"
    );
    drop(s);
    a.kill9();
    b.kill9();
}
