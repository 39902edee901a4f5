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
use axum::response::Response;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::Engine;

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
pub(crate) struct Backfill {
    pub(crate) id: String,
    pub(crate) start_s: i64,
    pub(crate) end_s: i64,
    /// `pending`, `closing` (reflected at `reflect_at_ms`), `reflected`.
    pub(crate) status: &'static str,
    pub(crate) reflect_at_ms: i64,
    pub(crate) idem: Option<(String, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) key: String,
    pub(crate) down: bool,
    pub(crate) faults: VecDeque<FakeFault>,
    pub(crate) random: FakeFaults,
    pub(crate) rng: u64,
    /// Accepted events by key.
    pub(crate) events: HashMap<String, FakeEvent>,
    /// Every ingest request that reached processing: (event count, backfill).
    pub(crate) requests: Vec<(usize, Option<String>)>,
    /// Events resent under a key already accepted (harmless, counted for tests).
    pub(crate) duplicates: u64,
    /// The same key seen with a different value (would be a bug in the sender).
    pub(crate) conflicting: u64,
    pub(crate) backfills: Vec<Backfill>,
    pub(crate) grace_s: i64,
    pub(crate) reflect_delay_ms: i64,
    /// Ingest answers wait this long after processing (a slow server: requests in flight).
    pub(crate) response_delay: Duration,
    pub(crate) now_offset_ms: i64,
}

/// A local Orb or Metronome.
pub struct FakeDest {
    /// Which API it speaks.
    pub kind: Engine,
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn now_ms(g: &Inner) -> i64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    t + g.now_offset_ms
}

impl FakeDest {
    /// Starts a server of `kind` on a loopback port, accepting bearer `key`.
    pub async fn start(kind: Engine, key: &str) -> std::io::Result<Self> {
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

pub(crate) fn reflect(g: &mut Inner, now: i64) {
    for b in &mut g.backfills {
        if b.status == "closing" && now >= b.reflect_at_ms {
            b.status = "reflected";
        }
    }
}

/// Wraps every bare JSON number in quotes, so decimals are read from their exact text.
pub(crate) fn numbers_as_strings(body: &str) -> String {
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

pub(crate) fn json_response(status: u16, v: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_default()
}

pub(crate) fn lost() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("answer lost"))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

pub(crate) fn error(kind: Engine, status: u16, msg: &str, validation: Option<Value>) -> Response {
    match kind {
        Engine::Orb => {
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
        Engine::Metronome => json_response(status, &json!({ "message": msg })),
    }
}

pub(crate) fn draw(g: &mut Inner) -> Option<FakeFault> {
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

pub(crate) fn decimal_text(v: &Value) -> Option<Decimal> {
    let s = v.as_str()?;
    s.strip_prefix('#').unwrap_or(s).parse().ok()
}

/// A property value: number (`#`-marked), boolean or string; never nested.
pub(crate) fn flat_property(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.strip_prefix('#').unwrap_or(s).to_owned()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

async fn handle(kind: Engine, State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
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
    kind: Engine,
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
                Engine::Orb => crate::orb::fake::ingest(&mut g, &text, &query, now),
                Engine::Metronome => crate::metronome::fake::ingest(&mut g, &text, now),
            };
            *after = (fault == Some(FakeFault::LoseAnswer), g.response_delay);
            resp
        }
        (Engine::Orb, "POST", "/v1/events/backfills") => {
            crate::orb::fake::create_backfill(&mut g, &text, &parts.headers)
        }
        (Engine::Orb, "POST", "/v1/events/search") => crate::orb::fake::search(&g, &text),
        (Engine::Orb, m, p) if p.starts_with("/v1/events/backfills/") => {
            crate::orb::fake::backfill(&mut g, m, p, now)
        }
        (Engine::Metronome, "POST", "/v1/usage") => crate::metronome::fake::usage(&g, &text),
        _ => error(kind, 404, "not found", None),
    }
}

pub(crate) fn accept(g: &mut Inner, e: FakeEvent) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_marked_strings() {
        let s = numbers_as_strings(r##"{"a":-1.25e3,"b":"x\"1","c":[0.1,true]}"##);
        assert_eq!(s, r##"{"a":"#-1.25e3","b":"x\"1","c":["#0.1",true]}"##);
    }
}
