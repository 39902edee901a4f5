//! The sidecar's HTTP surface over real sockets, against an in-memory backend: what is accepted
//! is recorded exactly; what is refused (401, 413, 415, 400) records nothing.
#![allow(clippy::unwrap_used)]

use rust_decimal::Decimal;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Catalog;
use tally_protocol::names::{CustomerId, MeterName};
use tally_sidecar::http::{
    BackendError, Consumed, EntitlementsView, FeatureAnswer, HttpConfig, LimitAnswer, Reserved,
    SidecarBackend, router,
};
use tally_sidecar::mapping::{IngestCatalog, MappedEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Default)]
struct Fake {
    recorded: Arc<Mutex<Vec<MappedEvent>>>,
    catalog: Option<Arc<IngestCatalog>>,
    status: Arc<Mutex<serde_json::Value>>,
}

impl SidecarBackend for Fake {
    fn catalog(&self) -> Option<Arc<IngestCatalog>> {
        self.catalog.clone()
    }
    async fn record_durable(&self, events: Vec<MappedEvent>) -> Result<(), BackendError> {
        self.recorded.lock().unwrap().extend(events);
        Ok(())
    }
    async fn flush(&self, _: Duration) -> Result<(), BackendError> {
        Ok(())
    }
    fn render_metrics(&self) -> String {
        String::from("# EOF\n")
    }
    fn ready(&self) -> bool {
        self.catalog.is_some()
    }
    fn now_ms(&self) -> i64 {
        1_763_700_000_000
    }
    fn status_json(&self) -> serde_json::Value {
        self.status.lock().unwrap().clone()
    }
    fn quarantine_json(&self) -> Result<serde_json::Value, BackendError> {
        Ok(serde_json::json!({"object": "list", "data": []}))
    }
    async fn entitlements(&self, _: CustomerId) -> EntitlementsView {
        EntitlementsView::default()
    }
    async fn feature(&self, _: CustomerId, _: String) -> FeatureAnswer {
        FeatureAnswer {
            allowed: false,
            decided_by: "no_snapshot",
            stale: true,
        }
    }
    async fn limit(&self, _: CustomerId, _: MeterName) -> LimitAnswer {
        LimitAnswer {
            allowed: true,
            decided_by: "plan",
            limit: None,
            used: Decimal::ZERO,
            remaining: None,
            enforcement: None,
            stale: false,
        }
    }
    async fn consume(
        &self,
        c: CustomerId,
        m: MeterName,
        q: Decimal,
    ) -> Result<Consumed, BackendError> {
        self.recorded.lock().unwrap().push(MappedEvent {
            customer: c,
            meter: m,
            dimensions: Default::default(),
            quantity: q,
            timestamp_ms: 0,
            id: None,
        });
        Ok(Consumed {
            allowed: true,
            recorded: q,
            remaining: None,
            decided_by: "plan",
        })
    }
    async fn reserve(
        &self,
        _: CustomerId,
        _: MeterName,
        _: Decimal,
    ) -> Result<Reserved, BackendError> {
        Ok(Reserved::Denied {
            decided_by: "no_snapshot",
            remaining: None,
        })
    }
    async fn commit(&self, _: String, _: Decimal) -> Result<Option<Consumed>, BackendError> {
        Ok(None)
    }
    fn release(&self, _: &str) -> bool {
        false
    }
}

async fn serve(fake: Fake, token: Option<&str>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(
        fake,
        HttpConfig {
            token: token.map(str::to_string),
            max_body_bytes: 64 * 1024,
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Sends raw HTTP/1.1 bytes, exactly as given, and returns status and body.
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Expected status, path, headers, body.
type Case<'a> = (u16, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>);

fn sample_catalog() -> IngestCatalog {
    let meters = tally_protocol::catalog::sample_meters().unwrap();
    let catalog = Catalog {
        version: 1,
        meters: BoundedVec::new(meters).unwrap(),
    };
    IngestCatalog::compile(&catalog).unwrap()
}

fn fake() -> Fake {
    Fake {
        catalog: Some(Arc::new(sample_catalog())),
        ..Default::default()
    }
}

#[tokio::test]
async fn openmeter_and_stripe_ingest_and_refusals() {
    let f = fake();
    let addr = serve(f.clone(), Some("secret")).await;
    let auth = ("Authorization", "Bearer secret");
    let ce = ("Content-Type", "application/cloudevents-batch+json");
    let batch = br#"[{"specversion":"1.0","type":"api_call","id":"1","source":"s","subject":"acme","data":{"count":"2.5"}},
                     {"specversion":"1.0","type":"llm_tokens","id":"2","source":"s","subject":"acme","data":{"tokens":100,"model":"gpt"}}]"#;
    assert_eq!(
        raw(addr, "POST", "/api/v1/events", &[auth, ce], batch)
            .await
            .0,
        204
    );
    assert_eq!(f.recorded.lock().unwrap().len(), 2);

    // Stripe's SDKs: form body with unencoded brackets.
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let body =
        b"event_name=tokens&identifier=abc&payload[stripe_customer_id]=cus_1&payload[value]=7";
    let (status, text) = raw(
        addr,
        "POST",
        "/v1/billing/meter_events",
        &[auth, form, ("Idempotency-Key", "k1")],
        body,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let obj: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(obj["object"], "billing.meter_event");
    assert_eq!(obj["identifier"], "abc");
    assert_eq!(obj["payload"]["value"], "7");
    assert_eq!(f.recorded.lock().unwrap().len(), 3);

    // Refusals record nothing.
    let cases: Vec<Case> = vec![
        (401, "/api/v1/events", vec![ce], batch.to_vec()),
        (401, "/api/v1/events", vec![("Authorization", "Bearer wrong"), ce], batch.to_vec()),
        (415, "/api/v1/events", vec![auth, ("Content-Type", "text/plain")], batch.to_vec()),
        (413, "/api/v1/events", vec![auth, ce], vec![b' '; 70 * 1024]),
        (400, "/api/v1/events", vec![auth, ce], b"[{".to_vec()),
        (400, "/api/v1/events", vec![auth, ce], br#"[{"specversion":"1.0","type":"api_call","id":"1","source":"s","subject":"a","data":{"count":1}},{"specversion":"1.0","type":"api_call","id":"2","source":"s","subject":"a","data":{"count":"x"}}]"#.to_vec()),
        (400, "/api/v1/events", vec![auth, ce], b"[\xff]".to_vec()),
        (401, "/v1/billing/meter_events", vec![form], body.to_vec()),
        (400, "/v1/billing/meter_events", vec![auth, form], b"event_name=tokens&payload[value]=1".to_vec()),
        (400, "/v1/billing/meter_events", vec![auth, form], b"event_name=nope&payload[stripe_customer_id]=a&payload[value]=1".to_vec()),
        (415, "/v1/billing/meter_events", vec![auth, ("Content-Type", "application/json")], b"{}".to_vec()),
    ];
    for (want, path, headers, body) in cases {
        let (status, text) = raw(addr, "POST", path, &headers, &body).await;
        assert_eq!(status, want, "{path} {text}");
        if path.starts_with("/v1/billing") {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["error"]["type"].is_string() && v["error"]["message"].is_string(),
                "{text}"
            );
        } else {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["status"], want, "{text}");
        }
    }
    assert_eq!(f.recorded.lock().unwrap().len(), 3);
    let (status, text) = raw(addr, "GET", "/v1/entitlements/acme", &[auth], b"").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["snapshot"]["known"], false, "{text}");
    let json = ("Content-Type", "application/json");
    let (status, text) = raw(
        addr,
        "POST",
        "/v1/entitlements/acme/api_calls/consume",
        &[auth, json],
        br#"{"quantity":"1"}"#,
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (
            200,
            r#"{"allowed":true,"decided_by":"plan","recorded":"1","remaining":null}"#
        )
    );
    assert_eq!(
        raw(
            addr,
            "POST",
            "/v1/entitlements/acme/nope/consume",
            &[auth, json],
            br#"{"quantity":"1"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        raw(
            addr,
            "POST",
            "/v1/entitlements/acme/api_calls/consume",
            &[auth, json],
            br#"{"quantity":"-1"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(f.recorded.lock().unwrap().len(), 4);
    assert_eq!(raw(addr, "GET", "/healthz", &[], b"").await.0, 200);
    assert_eq!(raw(addr, "GET", "/readyz", &[], b"").await.0, 200);
}

#[tokio::test]
async fn readyz_says_not_ready_while_the_disk_fails_or_the_budget_blocks() {
    let f = fake();
    let addr = serve(f.clone(), None).await;
    assert_eq!(raw(addr, "GET", "/readyz", &[], b"").await.0, 200);
    *f.status.lock().unwrap() =
        serde_json::json!({"disk_error": "no space left on device", "over_budget": false});
    let (s, body) = raw(addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(s, 503);
    assert!(body.contains("no space left on device"), "{body}");
    *f.status.lock().unwrap() = serde_json::json!({"disk_error": null, "over_budget": true});
    let (s, body) = raw(addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(s, 503);
    assert!(body.contains("disk budget"), "{body}");
    // Both clear by themselves once the cause is gone.
    *f.status.lock().unwrap() = serde_json::json!({"disk_error": null, "over_budget": false});
    assert_eq!(raw(addr, "GET", "/readyz", &[], b"").await.0, 200);
}
