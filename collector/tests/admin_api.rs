//! The admin API over real HTTP on loopback: authentication, Stripe-shaped errors, meters and
//! the catalog push, usage readback after QUIC ingest, adjustments, ledger, agents, quarantine.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::time::Duration;
use tally_protocol::frame::{AckOutcome, Frame};

fn assert_stripe_error(v: &Value, kind: &str, code: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_and_errors_are_stripe_shaped() {
    let env = start().await;
    for path in [
        "/v1/meters",
        "/v1/usage?customer=a&meter=b",
        "/v1/ledger/verify",
        "/metrics",
        "/v1/agents",
    ] {
        let (status, body) = env.http("GET", path, None, None).await;
        assert_eq!(status, 401, "{path}");
        assert_stripe_error(
            &serde_json::from_str(&body).unwrap(),
            "authentication_error",
            "invalid_api_key",
        );
        let (status, _) = env.http("GET", path, Some("wrong"), None).await;
        assert_eq!(status, 401, "{path}");
    }
    assert_eq!(env.http("GET", "/healthz", None, None).await.0, 200);
    let (status, doc) = env.http("GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"]["/v1/adjustments"].is_object());
    assert!(doc["paths"]["/v1/usage"].is_object());

    let (s, v) = env.admin("GET", "/v1/usage?meter=api_calls", None).await;
    assert_eq!(s, 400);
    assert_stripe_error(&v, "invalid_request_error", "parameter_missing");
    assert_eq!(v["error"]["param"], "customer");
    let (s, v) = env
        .admin("GET", "/v1/usage?customer=acme&meter=Bad%20Meter", None)
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "meter");
    let (s, v) = env
        .admin(
            "GET",
            "/v1/usage?customer=acme&meter=api_calls&period=2025-13",
            None,
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["code"], "invalid_period");
    let (s, v) = env
        .admin("PUT", "/v1/meters/api_calls", Some("{not json"))
        .await;
    assert_eq!(s, 400);
    assert_stripe_error(&v, "invalid_request_error", "invalid_json");
    let (s, v) = env
        .admin(
            "PUT",
            "/v1/meters/api_calls",
            Some(r#"{"aggregation":"median","event_type":"x"}"#),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "aggregation");
    let (s, v) = env
        .admin(
            "PUT",
            "/v1/meters/api_calls",
            Some(r#"{"aggregation":"sum","event_type":"x"}"#),
        )
        .await;
    assert_eq!(s, 400, "a sum meter needs a value_property");
    assert_eq!(v["error"]["code"], "invalid_meter_definition");
    // Nothing was changed by any of those.
    let (_, meters) = env.admin("GET", "/v1/meters", None).await;
    assert_eq!(meters["version"], 0);
    assert_eq!(env.admin("GET", "/v1/nope", None).await.0, 404);
    let (s, v) = env.admin("DELETE", "/v1/meters", None).await;
    assert_eq!(s, 405);
    assert_stripe_error(&v, "invalid_request_error", "method_not_allowed");
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_usage_adjustments_ledger_agents() {
    let env = start().await;
    let k = key(7);
    let mut c = env.client(&k).await;
    // The initial (empty) catalog arrives on connect.
    let Frame::Catalog(cat) = c.recv().await.unwrap() else {
        panic!("catalog first")
    };
    assert_eq!(cat.version, 0);
    let meter = json!({"aggregation":"sum","event_type":"api_call","value_property":"$.count",
        "group_by":{"model":"$.model"},"stripe_event_name":"api_calls","stripe_unit_scale":"1"});
    let (s, v) = env
        .admin("PUT", "/v1/meters/api_calls", Some(&meter.to_string()))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["data"][0]["stripe_unit_scale"], "1");
    // ... and the change is pushed to the connected agent.
    let pushed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Frame::Catalog(c) = c.recv().await.unwrap()
                && c.version == 1
            {
                return c;
            }
        }
    })
    .await
    .unwrap();
    assert!(pushed.meter("api_calls").is_some());

    let at = 1_763_000_000_000; // 2025-11-13
    let b = seal(
        &k,
        1,
        1,
        vec![
            delta(
                "acme",
                "api_calls",
                &[("model", "a")],
                at,
                Decimal::new(15, 1),
                2,
            ),
            delta(
                "acme",
                "api_calls",
                &[("model", "b")],
                at,
                Decimal::new(25, 1),
                3,
            ),
            delta("globex", "api_calls", &[], at, Decimal::new(1, 3), 1),
        ],
    );
    assert!(matches!(send(&mut c, &b).await, Frame::Ack(a) if a.outcome == AckOutcome::Committed));

    let (s, v) = env
        .admin(
            "GET",
            "/v1/usage?customer=acme&meter=api_calls&period=2025-11",
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"customer":"acme","meter":"api_calls","period":"2025-11","quantity":"4.0","events":5})
    );
    let (_, v) = env.admin("GET", "/v1/customers/globex/usage", None).await;
    assert_eq!(v["data"][0]["quantity"], "0.001");

    // Adjustments: created, retried, conflicting, and refused below zero.
    let adj = json!({"customer":"acme","meter":"api_calls","quantity":"-1.5","reason":"refund outage",
        "idempotency_key":"adj-1","period":"2025-11","dimensions":{"model":"a"}});
    let (s, v) = env
        .admin("POST", "/v1/adjustments", Some(&adj.to_string()))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["created"], true);
    let (s, v2) = env
        .admin("POST", "/v1/adjustments", Some(&adj.to_string()))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v2["created"], false);
    assert_eq!(v2["id"], v["id"]);
    let mut other = adj.clone();
    other["quantity"] = json!("-1.4");
    let (s, v) = env
        .admin("POST", "/v1/adjustments", Some(&other.to_string()))
        .await;
    assert_eq!(s, 400);
    assert_stripe_error(&v, "idempotency_error", "idempotency_key_in_use");
    let mut too_much = adj.clone();
    too_much["idempotency_key"] = json!("adj-2");
    too_much["quantity"] = json!("-100");
    let (s, v) = env
        .admin("POST", "/v1/adjustments", Some(&too_much.to_string()))
        .await;
    assert_eq!(s, 400, "{v}");
    let mut float = adj.clone();
    float["idempotency_key"] = json!("adj-3");
    float["quantity"] = json!(1.5);
    let (s, v) = env
        .admin("POST", "/v1/adjustments", Some(&float.to_string()))
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "quantity");
    let (s, v) = env.admin("POST", "/v1/adjustments", Some(r#"{"customer":"acme","meter":"nope","quantity":"1","reason":"x","idempotency_key":"k"}"#)).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["code"], "unknown_meter");
    let (_, v) = env
        .admin(
            "GET",
            "/v1/usage?customer=acme&meter=api_calls&period=2025-11",
            None,
        )
        .await;
    assert_eq!(v["quantity"], "2.5");

    let (_, v) = env
        .admin("GET", "/v1/ledger/entries?customer=acme", None)
        .await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[2]["source"]["type"], "adjustment");
    assert_eq!(data[2]["amount"], "1.5");
    let (_, v) = env
        .admin("GET", "/v1/ledger/entries?after=1&limit=1", None)
        .await;
    assert_eq!(v["data"][0]["position"], 2);
    assert_eq!(v["has_more"], true);
    let (s, v) = env.admin("GET", "/v1/ledger/entries?limit=0", None).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("limit")));
    let (s, v) = env.admin("GET", "/v1/ledger/verify", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["transfers"], 4);

    let (_, v) = env.admin("GET", "/v1/agents", None).await;
    let a = &v["data"][0];
    assert_eq!(a["id"], agent_id(&k).to_string());
    assert_eq!(a["epoch"], 1);
    assert_eq!(a["acked_seq"], 1);
    let (s, _) = env.admin("POST", "/v1/agents/zz/revoke", None).await;
    assert_eq!(s, 400);
    let (s, _) = env
        .admin(
            "POST",
            &format!("/v1/agents/{}/revoke", "00".repeat(16)),
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, v) = env
        .admin("POST", &format!("/v1/agents/{}/revoke", agent_id(&k)), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["revoked"], true);
    let (_, v) = env.admin("GET", "/v1/agents", None).await;
    assert!(v["data"][0]["revoked_at_ms"].is_i64());

    let (status, text) = env
        .http("GET", "/metrics", Some(env.handle.admin_token()), None)
        .await;
    assert_eq!(status, 200);
    assert!(text.contains("tally_collector_deltas_total 3"), "{text}");
    assert!(
        text.contains("tally_collector_adjustments_total 1"),
        "{text}"
    );
    assert!(
        text.contains("tally_collector_commit_latency_seconds_bucket"),
        "{text}"
    );
    env.assert_verified();
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_is_visible() {
    let env = start().await;
    let k = key(8);
    let mut c = env.client(&k).await;
    let b = seal(
        &k,
        1,
        1,
        vec![delta(
            "acme",
            "ghost",
            &[],
            1_763_000_000_000,
            Decimal::ONE,
            1,
        )],
    );
    assert!(
        matches!(send(&mut c, &b).await, Frame::Ack(a) if matches!(a.outcome, AckOutcome::Quarantined { .. }))
    );
    let (_, v) = env.admin("GET", "/v1/quarantine", None).await;
    assert_eq!(v["data"][0]["code"], "unknown_meter");
    assert_eq!(v["data"][0]["seq"], 1);
    assert_eq!(v["data"][0]["body_hex"], hex::encode(&*b.body));
    env.handle.shutdown().await;
}
