//! The HTTP shell: Stripe requests built exactly as Stripe's SDKs send them, and answers read
//! into [`Answer`]s for [`crate::retry::classify`].
//!
//! Owns: the `reqwest` client (rustls with the **ring** provider, no aws-lc-rs), base URLs, the
//! pinned `Stripe-Version`, `Authorization: Bearer`, `Idempotency-Key` on every POST, v1
//! form encoding (`payload[value]=…`, brackets not percent-encoded) and v2 JSON. The API key is
//! only ever placed in the header; it is never logged. A response whose body cannot be read
//! (connection dropped after processing) is a [`TransportError`], i.e. an unknown outcome.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::Answer;
use crate::secret::ApiKey;
use crate::time::rfc3339;

/// The Stripe API version this crate's requests are written for.
pub const DEFAULT_STRIPE_VERSION: &str = "2026-10-28.endive";

/// A network-level failure: the outcome of the request is unknown.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connect, send, timeout, or reading the answer failed.
    #[error("network: {0}")]
    Network(String),
    /// The client could not be built.
    #[error("client setup: {0}")]
    Setup(String),
}

/// One meter event as both APIs carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    /// Stripe `event_name`.
    pub event_name: String,
    /// Our deterministic identifier.
    pub identifier: String,
    /// Unix seconds.
    pub timestamp_s: i64,
    /// `cus_…`.
    pub stripe_customer: String,
    /// Positive whole units.
    pub value: u64,
}

/// Percent-encodes a form value (spaces as `+`), as `application/x-www-form-urlencoded` does.
fn enc(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// The v1 form body, field order and bracket style as Stripe's SDKs send it.
pub fn v1_form_body(e: &MeterEvent) -> String {
    format!(
        "event_name={}&identifier={}&timestamp={}&payload[stripe_customer_id]={}&payload[value]={}",
        enc(&e.event_name),
        enc(&e.identifier),
        e.timestamp_s,
        enc(&e.stripe_customer),
        e.value
    )
}

#[derive(Serialize)]
struct V2Payload<'a> {
    stripe_customer_id: &'a str,
    value: String,
}

#[derive(Serialize)]
struct V2Event<'a> {
    event_name: &'a str,
    identifier: &'a str,
    payload: V2Payload<'a>,
    timestamp: String,
}

#[derive(Serialize)]
struct V2Stream<'a> {
    events: Vec<V2Event<'a>>,
}

/// The v2 stream JSON body.
pub fn v2_stream_body(events: &[MeterEvent]) -> String {
    let body = V2Stream {
        events: events
            .iter()
            .map(|e| V2Event {
                event_name: &e.event_name,
                identifier: &e.identifier,
                payload: V2Payload {
                    stripe_customer_id: &e.stripe_customer,
                    value: e.value.to_string(),
                },
                timestamp: rfc3339(e.timestamp_s),
            })
            .collect(),
    };
    serde_json::to_string(&body).unwrap_or_else(|_| "{\"events\":[]}".into())
}

/// A v2 meter event session.
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    /// Token for the stream endpoint (never logged).
    pub authentication_token: String,
    /// RFC 3339 expiry.
    pub expires_at: String,
}

/// A billing meter as listed by `GET /v1/billing/meters`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Meter {
    /// `mtr_…`.
    pub id: String,
    /// The meter's event name.
    pub event_name: String,
}

/// One event summary.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSummary {
    /// Inclusive start, Unix seconds.
    pub start_time: i64,
    /// Exclusive end, Unix seconds.
    pub end_time: i64,
    /// Aggregated value (Stripe sends a JSON number; read exactly as a decimal).
    pub aggregated_value: rust_decimal::Decimal,
}

/// The Stripe client.
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base_url: String,
    meter_events_url: String,
    key: ApiKey,
    stripe_version: String,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("base_url", &self.base_url)
            .field("meter_events_url", &self.meter_events_url)
            .field("key", &self.key)
            .field("stripe_version", &self.stripe_version)
            .finish()
    }
}

/// Installs ring as the process-wide rustls provider (idempotent; an existing one is kept).
pub fn install_ring_provider() {
    // Err means a provider is already installed, which is what we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl StripeClient {
    /// Builds a client. `timeout` bounds each request; a timeout is an unknown outcome.
    pub fn new(
        base_url: &str,
        meter_events_url: &str,
        key: ApiKey,
        stripe_version: &str,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        install_ring_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(64)
            .user_agent(concat!("tally-stripe/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TransportError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            meter_events_url: meter_events_url.trim_end_matches('/').to_owned(),
            key,
            stripe_version: stripe_version.to_owned(),
        })
    }

    async fn finish(
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Answer, TransportError> {
        let resp = resp.map_err(|e| TransportError::Network(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after_s = header("retry-after").and_then(|v| v.trim().parse().ok());
        let should_retry = header("stripe-should-retry").map(|v| v.trim() == "true");
        // Reading the body is part of the exchange: a dropped connection here is unknown.
        let body = resp
            .text()
            .await
            .map_err(|e| TransportError::Network(e.without_url().to_string()))?;
        Ok(Answer {
            status,
            retry_after_s,
            should_retry,
            body,
        })
    }

    /// `POST /v1/billing/meter_events`.
    pub async fn create_meter_event(
        &self,
        event: &MeterEvent,
        idempotency_key: &str,
    ) -> Result<Answer, TransportError> {
        let r = self
            .http
            .post(format!("{}/v1/billing/meter_events", self.base_url))
            .bearer_auth(self.key.expose())
            .header("Stripe-Version", &self.stripe_version)
            .header("Idempotency-Key", idempotency_key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(v1_form_body(event))
            .send()
            .await;
        Self::finish(r).await
    }

    /// `POST /v2/billing/meter_event_session` → the session, or the error answer.
    pub async fn create_session(
        &self,
        idempotency_key: &str,
    ) -> Result<Result<Session, Answer>, TransportError> {
        let r = self
            .http
            .post(format!("{}/v2/billing/meter_event_session", self.base_url))
            .bearer_auth(self.key.expose())
            .header("Stripe-Version", &self.stripe_version)
            .header("Idempotency-Key", idempotency_key)
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await;
        let a = Self::finish(r).await?;
        if a.status == 200 {
            match serde_json::from_str::<Session>(&a.body) {
                Ok(s) => Ok(Ok(s)),
                Err(e) => Err(TransportError::Network(format!("bad session body: {e}"))),
            }
        } else {
            Ok(Err(a))
        }
    }

    /// `POST /v2/billing/meter_event_stream` (≤ 100 events) on the meter-events host.
    pub async fn send_stream(
        &self,
        token: &str,
        events: &[MeterEvent],
        idempotency_key: &str,
    ) -> Result<Answer, TransportError> {
        debug_assert!(!events.is_empty() && events.len() <= crate::stripe::STREAM_EVENTS_MAX);
        let r = self
            .http
            .post(format!(
                "{}/v2/billing/meter_event_stream",
                self.meter_events_url
            ))
            .bearer_auth(token)
            .header("Stripe-Version", &self.stripe_version)
            .header("Idempotency-Key", idempotency_key)
            .header("Content-Type", "application/json")
            .body(v2_stream_body(events))
            .send()
            .await;
        Self::finish(r).await
    }

    async fn get(&self, path_and_query: &str) -> Result<Answer, TransportError> {
        let r = self
            .http
            .get(format!("{}{}", self.base_url, path_and_query))
            .bearer_auth(self.key.expose())
            .header("Stripe-Version", &self.stripe_version)
            .send()
            .await;
        Self::finish(r).await
    }

    /// `GET /v1/entitlements/active_entitlements?customer=…`: the `lookup_key` of every active
    /// entitlement of a Stripe customer (all pages, at most 10 of 100).
    pub async fn active_entitlements(
        &self,
        stripe_customer: &str,
    ) -> Result<Result<Vec<String>, Answer>, TransportError> {
        #[derive(Deserialize)]
        struct Item {
            id: String,
            lookup_key: String,
        }
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Item>,
            has_more: bool,
        }
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..10 {
            let mut q = format!(
                "/v1/entitlements/active_entitlements?customer={}&limit=100",
                enc(stripe_customer)
            );
            if let Some(a) = &after {
                q.push_str(&format!("&starting_after={}", enc(a)));
            }
            let a = self.get(&q).await?;
            if a.status != 200 {
                return Ok(Err(a));
            }
            let page: Page = serde_json::from_str(&a.body).map_err(|e| {
                TransportError::Network(format!("bad active entitlements body: {e}"))
            })?;
            after = page.data.last().map(|m| m.id.clone());
            out.extend(page.data.into_iter().map(|i| i.lookup_key));
            if !page.has_more || after.is_none() {
                break;
            }
        }
        Ok(Ok(out))
    }

    /// `GET /v1/billing/meters` (all pages, at most 100 of 100 meters).
    pub async fn list_meters(&self) -> Result<Result<Vec<Meter>, Answer>, TransportError> {
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Meter>,
            has_more: bool,
        }
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..100 {
            let q = match &after {
                Some(a) => format!("/v1/billing/meters?limit=100&starting_after={}", enc(a)),
                None => "/v1/billing/meters?limit=100".to_owned(),
            };
            let a = self.get(&q).await?;
            if a.status != 200 {
                return Ok(Err(a));
            }
            let page: Page = serde_json::from_str(&a.body)
                .map_err(|e| TransportError::Network(format!("bad meters body: {e}")))?;
            after = page.data.last().map(|m| m.id.clone());
            out.extend(page.data);
            if !page.has_more || after.is_none() {
                break;
            }
        }
        Ok(Ok(out))
    }

    /// `GET /v1/billing/meters/{id}/event_summaries` for one customer over `[start, end)`,
    /// grouped by `window` (`"day"`, `"hour"`, or `None` for one summary); all pages, at most
    /// 1000 of 100 summaries.
    pub async fn event_summaries(
        &self,
        meter_id: &str,
        stripe_customer: &str,
        start_s: i64,
        end_s: i64,
        window: Option<&str>,
    ) -> Result<Result<Vec<EventSummary>, Answer>, TransportError> {
        #[derive(Deserialize)]
        struct Raw {
            id: String,
            start_time: i64,
            end_time: i64,
            aggregated_value: serde_json::Number,
        }
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Raw>,
            has_more: bool,
        }
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..1000 {
            let mut q = format!(
                "/v1/billing/meters/{}/event_summaries?customer={}&start_time={start_s}&end_time={end_s}&limit=100",
                enc(meter_id),
                enc(stripe_customer)
            );
            if let Some(w) = window {
                q.push_str(&format!("&value_grouping_window={w}"));
            }
            if let Some(a) = &after {
                q.push_str(&format!("&starting_after={}", enc(a)));
            }
            let a = self.get(&q).await?;
            if a.status != 200 {
                return Ok(Err(a));
            }
            let page: Page = serde_json::from_str(&a.body)
                .map_err(|e| TransportError::Network(format!("bad summaries body: {e}")))?;
            after = page.data.last().map(|s| s.id.clone());
            for s in page.data {
                let text = s.aggregated_value.to_string();
                let v = text
                    .parse::<rust_decimal::Decimal>()
                    .or_else(|_| rust_decimal::Decimal::from_scientific(&text))
                    .map_err(|e| {
                        TransportError::Network(format!("bad aggregated_value {text}: {e}"))
                    })?;
                out.push(EventSummary {
                    start_time: s.start_time,
                    end_time: s.end_time,
                    aggregated_value: v,
                });
            }
            if !page.has_more || after.is_none() {
                break;
            }
        }
        Ok(Ok(out))
    }
}

/// Most Stripe meter ids [`MeterIds`] keeps (an account has far fewer meters; at the limit, new
/// ones are looked up again each time they are needed).
pub const METER_IDS_MAX: usize = 10_000;

/// Why a meter id could not be found.
#[derive(Debug, thiserror::Error)]
pub enum MeterIdError {
    /// `GET /v1/billing/meters` answered with this status.
    #[error("list meters: http {0}")]
    ListMeters(u16),
    /// No Stripe meter has the event name.
    #[error("no stripe meter for event {0}")]
    NoMeter(String),
    /// The request failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Stripe meter ids (`mtr_…`) by event name: configured ones, the rest looked up with
/// `GET /v1/billing/meters` when first needed. At most [`METER_IDS_MAX`] are kept.
#[derive(Debug, Default)]
pub struct MeterIds {
    ids: tokio::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl MeterIds {
    /// A cache holding `known` (configured ids; beyond the limit they are dropped).
    pub fn new(known: std::collections::HashMap<String, String>) -> Self {
        Self {
            ids: tokio::sync::Mutex::new(known.into_iter().take(METER_IDS_MAX).collect()),
        }
    }

    /// The meter id for `event_name`.
    pub async fn get(
        &self,
        client: &StripeClient,
        event_name: &str,
    ) -> Result<String, MeterIdError> {
        let mut ids = self.ids.lock().await;
        if let Some(id) = ids.get(event_name) {
            return Ok(id.clone());
        }
        let meters = client
            .list_meters()
            .await?
            .map_err(|a| MeterIdError::ListMeters(a.status))?;
        let mut hit = None;
        for m in meters {
            if m.event_name == event_name {
                hit = Some(m.id.clone());
            }
            if ids.len() < METER_IDS_MAX {
                ids.entry(m.event_name).or_insert(m.id);
            }
        }
        ids.get(event_name)
            .cloned()
            .or(hit)
            .ok_or_else(|| MeterIdError::NoMeter(event_name.to_owned()))
    }

    /// How many ids are kept.
    pub async fn len(&self) -> usize {
        self.ids.lock().await.len()
    }

    /// Whether none are kept.
    pub async fn is_empty(&self) -> bool {
        self.ids.lock().await.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_body_keeps_brackets_and_encodes_values() {
        let e = MeterEvent {
            event_name: "api calls".into(),
            identifier: "tly-a-1-1-r0-00".into(),
            timestamp_s: 1_795_300_000,
            stripe_customer: "cus_A&B".into(),
            value: 42,
        };
        assert_eq!(
            v1_form_body(&e),
            "event_name=api+calls&identifier=tly-a-1-1-r0-00&timestamp=1795300000&payload[stripe_customer_id]=cus_A%26B&payload[value]=42"
        );
        let v2 = v2_stream_body(std::slice::from_ref(&e));
        assert!(v2.contains(r#""timestamp":"2026-11-21T22:26:40Z""#), "{v2}");
        assert!(v2.contains(r#""value":"42""#), "{v2}");
    }

    #[test]
    fn client_debug_redacts_key() {
        let c = StripeClient::new(
            "http://127.0.0.1:1",
            "http://127.0.0.1:1",
            ApiKey::new("sk_test_SECRET"),
            DEFAULT_STRIPE_VERSION,
            Duration::from_secs(1),
        );
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert!(!format!("{c:?}").contains("SECRET"));
    }
}
