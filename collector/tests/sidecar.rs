//! The sidecar end to end: Stripe's meter-event wire format exactly as Stripe's SDKs send it
//! (form body, unencoded brackets, `Idempotency-Key`, `Stripe-Version`) and OpenMeter's
//! CloudEvents batches, through a real sidecar (HTTP on loopback) and a real agent (QUIC) into
//! the collector's ledger. Retries with the same ids count once; every total is exact.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tally_agent::Agent;
use tally_collector::core::ledger::Period;
use tally_sidecar::backend::AgentBackend;
use tally_sidecar::http::{HttpConfig, router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}Host: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// A `POST /v1/billing/meter_events` as stripe-python 16 sends it.
async fn stripe_sdk_post(addr: SocketAddr, idempotency_key: &str, body: &str) -> (u16, String) {
    let head = format!(
        "POST /v1/billing/meter_events HTTP/1.1\r\nAuthorization: Bearer sk_test_sidecar\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nStripe-Version: 2026-10-28.endive\r\n\
         Idempotency-Key: {idempotency_key}\r\nUser-Agent: Stripe/v1 PythonBindings/16.1.0\r\n\
         Accept: */*\r\n"
    );
    raw(addr, &head, body.as_bytes()).await
}

async fn cloudevents_post(addr: SocketAddr, body: &str) -> (u16, String) {
    let head = "POST /api/v1/events HTTP/1.1\r\nContent-Type: application/cloudevents-batch+json\r\n\
                User-Agent: openmeter-node/1.0\r\n";
    raw(addr, head, body.as_bytes()).await
}

/// The quickstart's meters on `env`, a real agent enrolled over QUIC, and a sidecar serving it
/// on a loopback port.
async fn agent_with_sidecar(env: &Env) -> (Agent, SocketAddr, tempfile::TempDir) {
    for m in tally_collector::catalog::sample_meters().unwrap() {
        env.handle.shared().put_meter(&m).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::builder()
        .data_dir(dir.path())
        .collector(env.handle.quic_addr().to_string())
        .ca_pem(env.ca_pem.clone())
        .enroll_token(env.handle.enroll_token())
        .flush_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.catalog().is_none_or(|c| c.meters.len() < 2) {
        assert!(Instant::now() < deadline, "catalog never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(AgentBackend::new(agent.clone()), HttpConfig::default());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (agent, addr, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_sdk_and_openmeter_batches_reach_the_ledger_exactly() {
    let env = start().await;
    let (agent, addr, _dir) = agent_with_sidecar(&env).await;

    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ts = now_s - 60;
    let period = Period::of_ms(ts * 1000).to_string();
    let mut rng = Rng(0x005e_ed0f_51de);
    let mut model: HashMap<(String, &str), Decimal> = HashMap::new();

    // Stripe: 300 meter events with identifiers; every 5th is retried with the same identifier
    // and Idempotency-Key (an SDK retry after a lost answer) and must count once.
    for i in 0..300u64 {
        let customer = format!("cus_{:04}", rng.below(25));
        let meter = if rng.below(2) == 0 {
            "api_calls"
        } else {
            "tokens"
        };
        let value = rng.below(10_000) + 1;
        let body = format!(
            "event_name={meter}&identifier=evt-{i}&timestamp={ts}&payload[stripe_customer_id]={customer}&payload[value]={value}"
        );
        let tries = if i % 5 == 0 { 2 } else { 1 };
        for _ in 0..tries {
            let (status, text) = stripe_sdk_post(addr, &format!("idem-{i}"), &body).await;
            assert_eq!(status, 200, "{text}");
            let obj: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(obj["object"], "billing.meter_event");
            assert_eq!(obj["identifier"], format!("evt-{i}"));
            assert_eq!(obj["payload"]["value"], value.to_string());
        }
        *model.entry((customer, meter)).or_default() += Decimal::from(value);
    }

    // OpenMeter: 60 batches of 5 CloudEvents with decimal values and a `model` dimension;
    // every 4th batch is sent twice.
    for b in 0..60u64 {
        let mut events = Vec::new();
        for e in 0..5u64 {
            let customer = format!("cus_{:04}", rng.below(25));
            let tokens = Decimal::new(rng.below(1_000_000) as i64, rng.below(4) as u32);
            let model_name = ["gpt-4o", "claude", "llama"][rng.below(3) as usize];
            events.push(format!(
                r#"{{"specversion":"1.0","type":"llm_tokens","id":"b{b}-e{e}","source":"sidecar-test","subject":"{customer}","time":"{}","data":{{"tokens":"{tokens}","model":"{model_name}"}}}}"#,
                time_rfc3339(ts)
            ));
            *model.entry((customer, "tokens")).or_default() += tokens;
        }
        let body = format!("[{}]", events.join(","));
        for _ in 0..if b % 4 == 0 { 2 } else { 1 } {
            let (status, text) = cloudevents_post(addr, &body).await;
            assert_eq!(status, 204, "{text}");
        }
    }

    // A refused batch records nothing: the last event has a negative value.
    let bad = r#"[{"specversion":"1.0","type":"api_call","id":"x1","source":"s","subject":"cus_0001","data":{"count":5}},{"specversion":"1.0","type":"api_call","id":"x2","source":"s","subject":"cus_0001","data":{"count":-1}}]"#;
    assert_eq!(cloudevents_post(addr, bad).await.0, 400);
    // So is one dated outside Stripe's window (year 1, year 9999, 36 days back, 10 min ahead):
    // 400 with the reason, and nothing of the batch reaches the ledger (the model checks it).
    for t in [
        "0001-01-01T00:00:00Z".to_string(),
        "9999-12-31T23:59:59Z".to_string(),
        time_rfc3339(now_s - 36 * 86_400),
        time_rfc3339(now_s + 600),
    ] {
        let body = format!(
            r#"[{{"specversion":"1.0","type":"api_call","id":"ok-{t}","source":"s","subject":"cus_0001","time":"{}","data":{{"count":5}}}},{{"specversion":"1.0","type":"api_call","id":"t-{t}","source":"s","subject":"cus_0001","time":"{t}","data":{{"count":7}}}}]"#,
            time_rfc3339(ts)
        );
        let (status, text) = cloudevents_post(addr, &body).await;
        assert_eq!(status, 400, "{t}: {text}");
        assert!(text.contains("event time"), "{text}");
    }

    let (status, _) = raw(addr, "POST /v1/flush HTTP/1.1\r\n", b"").await;
    assert_eq!(status, 200);
    for ((customer, meter), want) in &model {
        let (status, v) = env
            .admin(
                "GET",
                &format!("/v1/usage?customer={customer}&meter={meter}&period={period}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["quantity"].as_str().unwrap().parse::<Decimal>().unwrap(),
            *want,
            "{customer} {meter}"
        );
    }
    env.assert_verified();
    agent.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn time_rfc3339(s: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(s)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// `tally-collector dev` serves the sidecar: a CloudEvent posted to it lands in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_sidecar() {
    use tally_collector::dev::{self, DevOptions};
    let dir = tempfile::tempdir().unwrap();
    let opts = DevOptions::ephemeral(dir.path().join("tally-dev"));
    let d = dev::start(&opts).await.unwrap();
    let sidecar = d.sidecar_addr().expect("the sidecar is served");
    let deadline = Instant::now() + Duration::from_secs(10);
    while raw(sidecar, "GET /readyz HTTP/1.1\r\n", b"").await.0 != 200 {
        assert!(Instant::now() < deadline, "sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = r#"{"specversion":"1.0","type":"api_call","id":"evt-1","source":"quickstart","subject":"acme","data":{"count":3}}"#;
    let head = "POST /api/v1/events HTTP/1.1\r\nContent-Type: application/cloudevents+json\r\n";
    assert_eq!(raw(sidecar, head, event.as_bytes()).await.0, 204);
    assert_eq!(raw(sidecar, head, event.as_bytes()).await.0, 204); // a retry counts once
    assert_eq!(
        raw(sidecar, "POST /v1/flush HTTP/1.1\r\n", b"").await.0,
        200
    );
    let token = d.collector.admin_token().to_owned();
    let (status, body) = http(
        d.collector.http_addr(),
        "GET",
        "/v1/usage?customer=acme&meter=api_calls",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["quantity"], "3");
    d.shutdown().await;
}

/// A revoked agent stops promising delivery: once the collector refuses it as revoked, its
/// sidecar answers `/readyz` 503 with the reason and refuses new events with a clear 503 (both
/// wire formats), and nothing of them reaches the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_not_ready_and_refuses_new_events() {
    let env = start().await;
    let (agent, addr, _dir) = agent_with_sidecar(&env).await;
    let readyz = || raw(addr, "GET /readyz HTTP/1.1\r\n", b"");
    let event = |id: &str| {
        format!(
            r#"[{{"specversion":"1.0","type":"api_call","id":"{id}","source":"t","subject":"acme","data":{{"count":1}}}}]"#
        )
    };
    assert_eq!(readyz().await.0, 200);
    let (s, text) = cloudevents_post(addr, &event("before")).await;
    assert_eq!(s, 204, "{text}");

    let period = Period::of_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    let usage_path = format!("/v1/usage?customer=acme&meter=api_calls&period={period}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.admin("GET", &usage_path, None).await.1["quantity"] != "1" {
        assert!(
            Instant::now() < deadline,
            "the first event never reached the ledger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let id = agent.status().agent_id.to_string();
    let (s, v) = env
        .admin("POST", &format!("/v1/agents/{id}/revoke"), Some("{}"))
        .await;
    assert_eq!(s, 200, "{v}");
    // The collector closes its connection; the next handshake is refused as revoked.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.status().revoked {
        assert!(
            Instant::now() < deadline,
            "the agent never learnt it was revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, why) = readyz().await;
    assert_eq!(s, 503);
    assert!(why.contains("revoked"), "{why}");
    let (s, text) = cloudevents_post(addr, &event("after")).await;
    assert_eq!(s, 503, "{text}");
    assert!(text.contains("revoked"), "{text}");
    let (s, text) = stripe_sdk_post(
        addr,
        "idem-after",
        "event_name=api_calls&payload[stripe_customer_id]=acme&payload[value]=1",
    )
    .await;
    assert_eq!(s, 503, "{text}");
    let err: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{text}"
    );
    // What was accepted before the revocation is in the ledger; nothing after it.
    let (_, u) = env.admin("GET", &usage_path, None).await;
    assert_eq!(u["quantity"], "1", "{u}");
    agent.shutdown(Duration::from_secs(5)).await.unwrap();
    env.handle.shutdown().await;
}
