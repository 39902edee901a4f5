//! Local Orb and Metronome servers for tests, following the wire facts strictly: paths, bearer
//! keys, body shapes, batch limits (Orb 500, Metronome 100), time windows (Orb's grace period
//! and 5 minutes ahead; Metronome's 34 days back and 24 hours ahead), dedup by
//! `idempotency_key` / `transaction_id`, Orb backfills (create with `Idempotency-Key`, ingest with
//! `backfill_id`, close, `reflected` after a delay), Orb event search, Metronome `/v1/usage`.
//! Faults: 500s, 429s with `Retry-After`, answers lost after processing, and "down" (503 for
//! everything). Values are summed as exact decimals: JSON numbers are read from their text.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::Destination;
use crate::time::{parse_rfc3339, rfc3339};

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeFault {
    /// 500 before processing.
    Status500,
    /// 429 with `Retry-After: 1` before processing.
    RateLimited,
    /// Processed, then the connection drops before the answer.
    LoseAnswer,
}

/// Random faults, per mille of ingest requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeFaults {
    /// 500s.
    pub status_500_permille: u32,
    /// 429s.
    pub rate_limited_permille: u32,
    /// Answers lost after processing.
    pub lose_answer_permille: u32,
    /// Seed.
    pub seed: u64,
}

/// An accepted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeEvent {
    /// Key / transaction id.
    pub key: String,
    /// Customer (Orb external id / Metronome customer id).
    pub customer: String,
    /// Event name / type.
    pub event_name: String,
    /// Unix seconds.
    pub timestamp_s: i64,
    /// Exact value.
    pub value: Decimal,
    /// Other properties.
    pub properties: BTreeMap<String, String>,
    /// Orb: the backfill it came in.
    pub backfill: Option<String>,
}

#[derive(Debug, Clone)]
struct Backfill {
    id: String,
    start_s: i64,
    end_s: i64,
    /// `pending`, `closing` (reflected at `reflect_at_ms`), `reflected`.
    status: &'static str,
    reflect_at_ms: i64,
    idem: Option<(String, String)>,
}

#[derive(Debug, Default)]
struct Inner {
    key: String,
    down: bool,
    faults: VecDeque<FakeFault>,
    random: FakeFaults,
    rng: u64,
    /// Accepted events by key.
    events: HashMap<String, FakeEvent>,
    /// Every ingest request that reached processing: (event count, backfill).
    requests: Vec<(usize, Option<String>)>,
    /// Events resent under a key already accepted (harmless, counted for tests).
    duplicates: u64,
    /// The same key seen with a different value (would be a bug in the sender).
    conflicting: u64,
    backfills: Vec<Backfill>,
    grace_s: i64,
    reflect_delay_ms: i64,
    /// Ingest answers wait this long after processing (a slow server: requests in flight).
    response_delay: Duration,
    now_offset_ms: i64,
}

/// A local Orb or Metronome.
pub struct FakeDest {
    /// Which API it speaks.
    pub kind: Destination,
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms(g: &Inner) -> i64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    t + g.now_offset_ms
}

impl FakeDest {
    /// Starts a server of `kind` on a loopback port, accepting bearer `key`.
    pub async fn start(kind: Destination, key: &str) -> std::io::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            rng: 0x9E37_79B9_7F4A_7C15,
            grace_s: 12 * 3600,
            reflect_delay_ms: 300,
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .fallback(move |st, req| handle(kind, st, req))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            kind,
            addr,
            inner,
            task,
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Down: every request answers 503 (a transient failure) until set back.
    pub fn set_down(&self, down: bool) {
        lock(&self.inner).down = down;
    }

    /// Queues faults for the next ingest requests.
    pub fn push_faults(&self, f: impl IntoIterator<Item = FakeFault>) {
        lock(&self.inner).faults.extend(f);
    }

    /// Random faults on ingest.
    pub fn set_random_faults(&self, f: FakeFaults) {
        let mut g = lock(&self.inner);
        g.rng = f.seed | 1;
        g.random = f;
    }

    /// Ingest answers come this long after processing.
    pub fn set_response_delay(&self, d: Duration) {
        lock(&self.inner).response_delay = d;
    }

    /// Orb's grace period (default 12 h).
    pub fn set_grace(&self, grace: Duration) {
        lock(&self.inner).grace_s = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    }

    /// Every accepted event that counts (Orb: backfilled ones once reflected).
    pub fn events(&self) -> Vec<FakeEvent> {
        let g = lock(&self.inner);
        let reflected: Vec<&str> = g
            .backfills
            .iter()
            .filter(|b| b.status == "reflected")
            .map(|b| b.id.as_str())
            .collect();
        let mut v: Vec<FakeEvent> = g
            .events
            .values()
            .filter(|e| e.backfill.as_deref().is_none_or(|b| reflected.contains(&b)))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Σ value per (customer, event name) of [`FakeDest::events`].
    pub fn totals(&self) -> BTreeMap<(String, String), Decimal> {
        let mut t = BTreeMap::new();
        for e in self.events() {
            *t.entry((e.customer, e.event_name)).or_insert(Decimal::ZERO) += e.value;
        }
        t.retain(|_, v: &mut Decimal| !v.is_zero());
        t
    }

    /// Ingest requests processed: (events, backfill id).
    pub fn requests(&self) -> Vec<(usize, Option<String>)> {
        lock(&self.inner).requests.clone()
    }

    /// (resends of accepted keys, keys seen with two different values).
    pub fn duplicates(&self) -> (u64, u64) {
        let g = lock(&self.inner);
        (g.duplicates, g.conflicting)
    }

    /// Backfills created: (id, status, start, end).
    pub fn backfills(&self) -> Vec<(String, String, i64, i64)> {
        let mut g = lock(&self.inner);
        let now = now_ms(&g);
        reflect(&mut g, now);
        g.backfills
            .iter()
            .map(|b| (b.id.clone(), b.status.to_owned(), b.start_s, b.end_s))
            .collect()
    }
}

fn reflect(g: &mut Inner, now: i64) {
    for b in &mut g.backfills {
        if b.status == "closing" && now >= b.reflect_at_ms {
            b.status = "reflected";
        }
    }
}

/// Wraps every bare JSON number in quotes, so decimals are read from their exact text.
fn numbers_as_strings(body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 16);
    let mut in_str = false;
    let mut escaped = false;
    let mut num = false;
    for c in body.chars() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        let numeric = c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E');
        if num && !numeric {
            out.push('"');
            num = false;
        }
        if !num && (c.is_ascii_digit() || c == '-') {
            out.push_str("\"#");
            num = true;
        }
        if c == '"' {
            in_str = true;
        }
        out.push(c);
    }
    if num {
        out.push('"');
    }
    out
}

fn json_response(status: u16, v: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_default()
}

fn lost() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("answer lost"))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn error(kind: Destination, status: u16, msg: &str, validation: Option<Value>) -> Response {
    match kind {
        Destination::Orb => {
            let mut v = json!({"status": status, "title": "error", "type": "https://docs.withorb.com/reference/error-responses", "detail": msg});
            if let Some(ve) = validation {
                v["validation_errors"] = ve;
            }
            let mut r = json_response(status, &v);
            if status >= 500 {
                r.headers_mut().insert(
                    "transient-error",
                    axum::http::HeaderValue::from_static("true"),
                );
            }
            r
        }
        Destination::Metronome => json_response(status, &json!({ "message": msg })),
    }
}

fn draw(g: &mut Inner) -> Option<FakeFault> {
    if let Some(f) = g.faults.pop_front() {
        return Some(f);
    }
    let r = g.random;
    let total = r.status_500_permille + r.rate_limited_permille + r.lose_answer_permille;
    if total == 0 {
        return None;
    }
    let mut x = g.rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    g.rng = x;
    let roll = u32::try_from(x % 1000).unwrap_or(0);
    if roll < r.status_500_permille {
        Some(FakeFault::Status500)
    } else if roll < r.status_500_permille + r.rate_limited_permille {
        Some(FakeFault::RateLimited)
    } else if roll < total {
        Some(FakeFault::LoseAnswer)
    } else {
        None
    }
}

fn decimal_text(v: &Value) -> Option<Decimal> {
    let s = v.as_str()?;
    s.strip_prefix('#').unwrap_or(s).parse().ok()
}

/// A property value: number (`#`-marked), boolean or string; never nested.
fn flat_property(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.strip_prefix('#').unwrap_or(s).to_owned()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

async fn handle(
    kind: Destination,
    State(inner): State<Arc<Mutex<Inner>>>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 8 << 20).await else {
        return error(kind, 413, "body too large", None);
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut after = (false, Duration::ZERO);
    let resp = route(kind, &inner, &parts, &text, &mut after);
    let (lose, delay) = after;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if lose {
        return lost();
    }
    resp
}

/// Answers one request; sets `after` to (lose the answer, delay it) for ingest faults.
fn route(
    kind: Destination,
    inner: &Mutex<Inner>,
    parts: &axum::http::request::Parts,
    text: &str,
    after: &mut (bool, Duration),
) -> Response {
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let text = text.to_owned();
    let mut g = lock(inner);
    if g.down {
        return error(kind, 503, "service unavailable", None);
    }
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if auth != Some(g.key.as_str()) {
        return error(kind, 401, "unauthorized", None);
    }
    let now = now_ms(&g);
    reflect(&mut g, now);
    let method = parts.method.as_str().to_owned();
    match (kind, method.as_str(), path.as_str()) {
        (_, "POST", "/v1/ingest") => {
            let fault = draw(&mut g);
            match fault {
                Some(FakeFault::Status500) => return error(kind, 500, "internal error", None),
                Some(FakeFault::RateLimited) => {
                    let mut r = error(kind, 429, "too many requests", None);
                    r.headers_mut()
                        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
                    return r;
                }
                _ => {}
            }
            let resp = match kind {
                Destination::Orb => orb_ingest(&mut g, &text, &query, now),
                Destination::Metronome => metronome_ingest(&mut g, &text, now),
            };
            *after = (fault == Some(FakeFault::LoseAnswer), g.response_delay);
            resp
        }
        (Destination::Orb, "POST", "/v1/events/backfills") => {
            orb_create_backfill(&mut g, &text, &parts.headers)
        }
        (Destination::Orb, "POST", "/v1/events/search") => orb_search(&g, &text),
        (Destination::Orb, m, p) if p.starts_with("/v1/events/backfills/") => {
            let rest = &p["/v1/events/backfills/".len()..];
            let (id, close) = match rest.strip_suffix("/close") {
                Some(id) => (id, true),
                None => (rest, false),
            };
            let delay = g.reflect_delay_ms;
            let Some(b) = g.backfills.iter_mut().find(|b| b.id == id) else {
                return error(kind, 404, "no such backfill", None);
            };
            if close {
                if m != "POST" {
                    return error(kind, 405, "method", None);
                }
                if b.status == "pending" {
                    b.status = "closing";
                    b.reflect_at_ms = now + delay;
                }
            }
            let status = if b.status == "closing" {
                "pending"
            } else {
                b.status
            };
            json_response(
                200,
                &json!({"id": b.id, "status": status,
                "timeframe_start": rfc3339(b.start_s), "timeframe_end": rfc3339(b.end_s)}),
            )
        }
        (Destination::Metronome, "POST", "/v1/usage") => metronome_usage(&g, &text),
        _ => error(kind, 404, "not found", None),
    }
}

fn accept(g: &mut Inner, e: FakeEvent) {
    match g.events.get(&e.key) {
        Some(old) => {
            g.duplicates += 1;
            if old.value != e.value || old.customer != e.customer {
                g.conflicting += 1;
            }
        }
        None => {
            g.events.insert(e.key.clone(), e);
        }
    }
}

fn orb_ingest(g: &mut Inner, text: &str, query: &str, now: i64) -> Response {
    let kind = Destination::Orb;
    let Ok(v) = serde_json::from_str::<Value>(&numbers_as_strings(text)) else {
        return error(kind, 400, "malformed json", None);
    };
    let Some(events) = v.get("events").and_then(Value::as_array) else {
        return error(kind, 400, "events: required array", None);
    };
    if events.len() > 500 {
        return error(kind, 400, "at most 500 events per request", None);
    }
    let backfill_id = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("backfill_id="))
        .map(str::to_owned);
    let window = match &backfill_id {
        Some(id) => match g.backfills.iter().find(|b| &b.id == id) {
            Some(b) if b.status == "pending" => Some((b.start_s, b.end_s)),
            _ => return error(kind, 400, "backfill is not pending", None),
        },
        None => None,
    };
    let mut seen: HashMap<String, &Value> = HashMap::new();
    for e in events {
        if let Some(k) = e.get("idempotency_key").and_then(Value::as_str)
            && let Some(prev) = seen.insert(k.to_owned(), e)
            && prev != e
        {
            return error(
                kind,
                400,
                "two events with one idempotency_key and different bodies",
                None,
            );
        }
    }
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for e in events {
        let key = e
            .get("idempotency_key")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        match orb_event(e, g.grace_s, window, now) {
            Ok(mut fe) => {
                fe.backfill = backfill_id.clone();
                ok.push(fe);
            }
            Err(why) => failed.push(json!({"idempotency_key": key, "validation_errors": [why]})),
        }
    }
    g.requests.push((events.len(), backfill_id));
    // Unconfirmed in the wire facts whether valid events of a refused request are ingested:
    // this server ingests them (the harder case for a sender: its resend meets dedup).
    for e in ok {
        accept(g, e);
    }
    if failed.is_empty() {
        json_response(200, &json!({"validation_failed": []}))
    } else {
        error(
            kind,
            400,
            "some events failed validation",
            Some(Value::Array(failed)),
        )
    }
}

fn orb_event(
    e: &Value,
    grace_s: i64,
    window: Option<(i64, i64)>,
    now_ms: i64,
) -> Result<FakeEvent, String> {
    let o = e.as_object().ok_or("event must be an object")?;
    let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    let name = s("event_name").ok_or("event_name required")?;
    let key = s("idempotency_key").ok_or("idempotency_key required")?;
    let ts = s("timestamp").ok_or("timestamp required")?;
    let ts = parse_rfc3339(&ts).ok_or("timestamp must be ISO 8601")?;
    let customer = match (s("customer_id"), s("external_customer_id")) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("exactly one of customer_id, external_customer_id".into());
        }
        (Some(c), None) | (None, Some(c)) => c,
    };
    let props = o
        .get("properties")
        .and_then(Value::as_object)
        .ok_or("properties required")?;
    let mut properties = BTreeMap::new();
    let mut value = None;
    for (k, v) in props {
        let flat = flat_property(v).ok_or_else(|| format!("property {k} must be flat"))?;
        if k == "value" {
            value = decimal_text(v);
        } else {
            properties.insert(k.clone(), flat);
        }
    }
    let now_s = now_ms / 1000;
    match window {
        Some((start, end)) => {
            if ts < start || ts >= end {
                return Err("timestamp outside the backfill's timeframe".into());
            }
        }
        None => {
            if ts < now_s - grace_s {
                return Err("timestamp older than the grace period".into());
            }
        }
    }
    if ts > now_s + 300 {
        return Err("timestamp more than 5 minutes ahead".into());
    }
    Ok(FakeEvent {
        key,
        customer,
        event_name: name,
        timestamp_s: ts,
        value: value.unwrap_or_default(),
        properties,
        backfill: None,
    })
}

fn orb_create_backfill(g: &mut Inner, text: &str, h: &HeaderMap) -> Response {
    let kind = Destination::Orb;
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return error(kind, 400, "malformed json", None);
    };
    let t = |k: &str| v.get(k).and_then(Value::as_str).and_then(parse_rfc3339);
    let (Some(start), Some(end)) = (t("timeframe_start"), t("timeframe_end")) else {
        return error(
            kind,
            400,
            "timeframe_start and timeframe_end required",
            None,
        );
    };
    if end <= start || end - start > 31 * 86_400 {
        return error(kind, 400, "a backfill spans at most 31 days", None);
    }
    let idem = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(k) = &idem {
        if k.len() > 64 {
            return error(kind, 400, "Idempotency-Key longer than 64 characters", None);
        }
        if let Some(b) = g
            .backfills
            .iter()
            .find(|b| b.idem.as_ref().is_some_and(|(ik, _)| ik == k))
        {
            if b.idem.as_ref().is_some_and(|(_, body)| body == text) {
                let status = if b.status == "closing" {
                    "pending"
                } else {
                    b.status
                };
                return json_response(200, &json!({"id": b.id, "status": status}));
            }
            return error(
                kind,
                409,
                "Idempotency-Key reused with different parameters",
                None,
            );
        }
    }
    if g.backfills
        .iter()
        .any(|b| b.status != "reflected" && b.start_s < end && start < b.end_s)
    {
        return error(kind, 409, "overlaps a pending backfill", None);
    }
    let id = format!("bf_{}", g.backfills.len() + 1);
    g.backfills.push(Backfill {
        id: id.clone(),
        start_s: start,
        end_s: end,
        status: "pending",
        reflect_at_ms: 0,
        idem: idem.map(|k| (k, text.to_owned())),
    });
    json_response(201, &json!({"id": id, "status": "pending"}))
}

fn orb_search(g: &Inner, text: &str) -> Response {
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    let Some(ids) = v.get("event_ids").and_then(Value::as_array) else {
        return error(Destination::Orb, 400, "event_ids required", None);
    };
    let data: Vec<Value> = ids
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|id| g.events.get(id))
        .map(|e| {
            let mut props = serde_json::Map::new();
            props.insert("value".into(), Value::String(e.value.to_string()));
            for (k, v) in &e.properties {
                props.insert(k.clone(), Value::String(v.clone()));
            }
            json!({"id": e.key, "customer_id": null, "external_customer_id": e.customer,
                   "event_name": e.event_name, "timestamp": rfc3339(e.timestamp_s),
                   "properties": props, "deprecated": false})
        })
        .collect();
    json_response(200, &json!({ "data": data }))
}

fn metronome_ingest(g: &mut Inner, text: &str, now: i64) -> Response {
    let kind = Destination::Metronome;
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return error(kind, 400, "malformed json", None);
    };
    let Some(events) = v.as_array() else {
        return error(kind, 400, "body must be an array of events", None);
    };
    if events.is_empty() || events.len() > 100 {
        return error(kind, 400, "between 1 and 100 events per request", None);
    }
    let now_s = now / 1000;
    let mut ok = Vec::new();
    for e in events {
        let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(tid), Some(customer), Some(et), Some(ts)) = (
            s("transaction_id"),
            s("customer_id"),
            s("event_type"),
            s("timestamp"),
        ) else {
            return error(
                kind,
                400,
                "transaction_id, customer_id, event_type, timestamp required",
                None,
            );
        };
        if tid.is_empty() || tid.len() > 128 {
            return error(kind, 400, "transaction_id must be 1-128 characters", None);
        }
        let Some(ts) = parse_rfc3339(&ts) else {
            return error(kind, 400, "timestamp must be RFC 3339", None);
        };
        if ts < now_s - 34 * 86_400 {
            return error(kind, 400, "timestamp older than 34 days", None);
        }
        if ts > now_s + 86_400 {
            return error(kind, 400, "timestamp more than 24 hours ahead", None);
        }
        let Some(props) = e.get("properties").and_then(Value::as_object) else {
            return error(kind, 400, "properties must be an object", None);
        };
        let mut properties = BTreeMap::new();
        let mut value = Decimal::ZERO;
        for (k, pv) in props {
            if k == "value" {
                let Some(d) = pv.as_str().and_then(|x| x.parse::<Decimal>().ok()) else {
                    return error(kind, 400, "value must be a decimal string", None);
                };
                value = d;
            } else if let Some(x) = pv.as_str() {
                properties.insert(k.clone(), x.to_owned());
            }
        }
        ok.push(FakeEvent {
            key: tid,
            customer,
            event_name: et,
            timestamp_s: ts,
            value,
            properties,
            backfill: None,
        });
    }
    g.requests.push((ok.len(), None));
    for e in ok {
        accept(g, e);
    }
    json_response(200, &json!({}))
}

fn metronome_usage(g: &Inner, text: &str) -> Response {
    let kind = Destination::Metronome;
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    let t = |k: &str| v.get(k).and_then(Value::as_str).and_then(parse_rfc3339);
    let (Some(from), Some(to)) = (t("starting_on"), t("ending_before")) else {
        return error(kind, 400, "starting_on and ending_before required", None);
    };
    if v.get("window_size").and_then(Value::as_str) != Some("DAY") {
        return error(kind, 400, "window_size must be DAY here", None);
    }
    let mut sums: BTreeMap<(String, String, i64), Decimal> = BTreeMap::new();
    for e in g.events.values() {
        if e.timestamp_s >= from && e.timestamp_s < to {
            let day = crate::time::day_start(e.timestamp_s);
            *sums
                .entry((e.customer.clone(), e.event_name.clone(), day))
                .or_insert(Decimal::ZERO) += e.value;
        }
    }
    let data: Vec<Value> = sums
        .into_iter()
        .map(|((c, m, d), val)| {
            json!({"customer_id": c, "billable_metric_id": m,
                   "start_timestamp": rfc3339(d), "end_timestamp": rfc3339(d + 86_400),
                   "value": val.to_string()})
        })
        .collect();
    json_response(200, &json!({"data": data, "next_page": null}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_marked_strings() {
        let s = numbers_as_strings(r##"{"a":-1.25e3,"b":"x\"1","c":[0.1,true]}"##);
        assert_eq!(s, r##"{"a":"#-1.25e3","b":"x\"1","c":["#0.1",true]}"##);
    }
}
