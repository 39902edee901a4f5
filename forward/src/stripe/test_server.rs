//! A local Stripe-compatible server for tests (feature `test-server`).
//!
//! Follows Stripe's documented behaviour and the OpenAPI excerpt in
//! `forward/tests/data/billing-meters.openapi.json` for what Tally uses:
//! - `POST /v1/billing/meter_events` (form): unknown parameters rejected
//!   (`parameter_unknown`), required fields, identifier ≤ 100, value a positive integer,
//!   timestamp within 35 days back / 5 minutes ahead, unique identifiers (repeat → 400
//!   `invalid_request_error` "An event already exists with identifier …",
//!   `Stripe-Should-Retry: false`), `Idempotency-Key` replay of earlier 200/400 answers;
//! - `POST /v2/billing/meter_event_session` (JSON `{}`) → a token that expires (TTL
//!   controllable, [`FakeStripe::expire_sessions`]); `POST /v2/billing/meter_event_stream`
//!   (JSON, bearer token, 1–100 events, RFC 3339 timestamps, the whole request validated before
//!   any event is taken; duplicates are dropped silently as Stripe's asynchronous validation does);
//! - `GET /v1/billing/meters`, `GET /v1/billing/meters/{id}/event_summaries`;
//! - `GET /v1/entitlements/active_entitlements?customer=…` (one page) from what
//!   [`FakeStripe::set_active_entitlements`] set, which also builds the
//!   `entitlements.active_entitlement_summary.updated` event Stripe would send
//!   ([`FakeStripe::entitlement_summary_event`]).
//!
//! Test-only rules: every POST must carry `Idempotency-Key` and `Stripe-Version`; meters are
//! created on first use (`mtr_<event_name>`); [`FakeStripe::reject_customer`] makes v1 answer
//! 400 `resource_missing` for a customer. Faults ([`Fault`]) hit meter-event requests only:
//! 500, 429 with `Retry-After`, 409 `lock_timeout`, "answer lost after processing" (processed, then the connection is
//! dropped mid-response) and "dropped" (not processed). The server records totals per
//! (customer, event name), accepted identifiers, and the most concurrent v1 requests per
//! (customer, event name).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::time::{Clock, SystemClock, parse_rfc3339, rfc3339};

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 500 `api_error`, not processed.
    Status500,
    /// 429 `rate_limit` with `Retry-After`, not processed.
    RateLimited {
        /// `Retry-After` seconds.
        retry_after_s: u64,
    },
    /// 409 `lock_timeout`, not processed.
    LockTimeout,
    /// Processed, then the answer is lost (connection dropped mid-response).
    LoseAnswer,
    /// Connection dropped, not processed.
    Drop,
}

/// Random faults, in per-mille of meter-event requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RandomFaults {
    /// 500s.
    pub status_500_permille: u32,
    /// 429s.
    pub rate_limited_permille: u32,
    /// Lost answers after processing.
    pub lose_answer_permille: u32,
    /// Dropped before processing.
    pub drop_permille: u32,
    /// 409 `lock_timeout`.
    pub lock_timeout_permille: u32,
    /// `Retry-After` on 429s.
    pub retry_after_s: u64,
    /// RNG seed.
    pub seed: u64,
}

/// A request as received (for validation in tests).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// Headers, names lowercase.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: Bytes,
}

/// An accepted meter event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedEvent {
    /// `stripe_customer_id`.
    pub customer: String,
    /// Event name.
    pub event_name: String,
    /// Identifier.
    pub identifier: String,
    /// Unix seconds.
    pub timestamp_s: i64,
    /// Value.
    pub value: u64,
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    events: Vec<AcceptedEvent>,
    identifiers: HashSet<String>,
    totals: BTreeMap<Key, u64>,
    in_flight: HashMap<Key, usize>,
    max_in_flight: BTreeMap<Key, usize>,
    duplicates_rejected: u64,
    idempotent_replays: u64,
    duplicates_dropped_v2: u64,
    requests: Vec<RecordedRequest>,
    record_requests: bool,
    faults: VecDeque<Fault>,
    random: RandomFaults,
    rng: u64,
    sessions: HashMap<String, i64>,
    session_ttl_ms: i64,
    clock_offset_ms: i64,
    meters: BTreeMap<String, String>,
    rejected_customers: HashSet<String>,
    stream_rejected_customers: HashSet<String>,
    response_delay: Duration,
    idempotent: HashMap<String, (u16, String)>,
    counter: u64,
    faults_injected: u64,
    /// Active entitlements' lookup keys per Stripe customer.
    entitlements: BTreeMap<String, Vec<String>>,
}

/// A running fake Stripe on `127.0.0.1`.
pub struct FakeStripe {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeStripe {
    /// A forwarder configuration for tests against this server: a test key, both base URLs
    /// here, fast polling and short backoff so fault runs converge in seconds.
    pub fn forwarder_config(&self, api: crate::stripe::Api) -> crate::stripe::ForwarderConfig {
        crate::stripe::ForwarderConfig {
            api,
            api_key: Some(crate::secret::ApiKey::new("sk_test_tally_fake_key")),
            base_url: self.url(),
            meter_events_url: self.url(),
            rate_per_s: Some(2000),
            max_in_flight: 16,
            poll_interval: Duration::from_millis(20),
            request_timeout: Duration::from_secs(2),
            backoff: crate::retry::Backoff {
                base: Duration::from_millis(10),
                cap: Duration::from_millis(200),
            },
            ..crate::stripe::ForwarderConfig::default()
        }
    }

    /// The exactness runs' fault plan: every kind of fault once (a lost answer, a 500, a 429
    /// with `Retry-After`, a dropped connection, `lock_timeout`), then each at random, seeded.
    pub fn inject_fault_mix(&self, seed: u64) {
        self.set_response_delay(Duration::from_millis(2));
        self.set_random_faults(RandomFaults {
            status_500_permille: 100,
            rate_limited_permille: 60,
            lose_answer_permille: 100,
            drop_permille: 50,
            lock_timeout_permille: 30,
            retry_after_s: 1,
            seed,
        });
        self.push_faults([
            Fault::LoseAnswer,
            Fault::Status500,
            Fault::RateLimited { retry_after_s: 1 },
            Fault::Drop,
            Fault::LockTimeout,
        ]);
    }

    /// Starts the server on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner {
            record_requests: true,
            session_ttl_ms: 15 * 60 * 1000,
            rng: 0x9E37_79B9_7F4A_7C15,
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner, task })
    }

    /// `http://127.0.0.1:port` (use as both base URL and meter-events URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Σ accepted values per (customer, event name).
    pub fn totals(&self) -> BTreeMap<(String, String), u64> {
        lock(&self.inner).totals.clone()
    }

    /// Accepted events in order.
    pub fn events(&self) -> Vec<AcceptedEvent> {
        lock(&self.inner).events.clone()
    }

    /// Most concurrent v1 requests seen per (customer, event name).
    pub fn max_in_flight(&self) -> BTreeMap<(String, String), usize> {
        lock(&self.inner).max_in_flight.clone()
    }

    /// v1 requests answered from the `Idempotency-Key` cache (a retry of a request that was
    /// processed).
    pub fn idempotent_replays(&self) -> u64 {
        lock(&self.inner).idempotent_replays
    }

    /// v1 requests refused because their identifier existed.
    pub fn duplicates_rejected(&self) -> u64 {
        lock(&self.inner).duplicates_rejected
    }

    /// v2 events dropped because their identifier existed.
    pub fn duplicates_dropped_v2(&self) -> u64 {
        lock(&self.inner).duplicates_dropped_v2
    }

    /// Faults injected so far.
    pub fn faults_injected(&self) -> u64 {
        lock(&self.inner).faults_injected
    }

    /// All requests received (while recording is on).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner).requests.clone()
    }

    /// Turns request recording on or off (benchmarks turn it off).
    pub fn set_record_requests(&self, on: bool) {
        lock(&self.inner).record_requests = on;
    }

    /// Queues faults for the next meter-event requests, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.inner).faults.extend(faults);
    }

    /// Random faults for every meter-event request after the queued ones.
    pub fn set_random_faults(&self, r: RandomFaults) {
        let mut g = lock(&self.inner);
        g.random = r;
        g.rng = r.seed | 1;
    }

    /// Lifetime of new v2 sessions.
    pub fn set_session_ttl(&self, ttl: Duration) {
        lock(&self.inner).session_ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    }

    /// Expires every session now.
    pub fn expire_sessions(&self) {
        for v in lock(&self.inner).sessions.values_mut() {
            *v = i64::MIN;
        }
    }

    /// Moves the server's clock.
    pub fn advance_clock(&self, ms: i64) {
        lock(&self.inner).clock_offset_ms += ms;
    }

    /// v1 answers 400 `resource_missing` for this customer from now on.
    pub fn reject_customer(&self, customer: &str) {
        lock(&self.inner)
            .rejected_customers
            .insert(customer.to_owned());
    }

    /// Accepts this customer again.
    pub fn accept_customer(&self, customer: &str) {
        lock(&self.inner).rejected_customers.remove(customer);
    }

    /// v2 streams containing an event for this customer are refused synchronously (400), as a
    /// malformed request would be (test hook to exercise the isolation of a bad event).
    pub fn reject_customer_in_streams(&self, customer: &str) {
        lock(&self.inner)
            .stream_rejected_customers
            .insert(customer.to_owned());
    }

    /// Identifiers of accepted events.
    pub fn accepted_identifiers(&self) -> HashSet<String> {
        lock(&self.inner).identifiers.clone()
    }

    /// Delay between processing a meter-event request and answering it.
    pub fn set_response_delay(&self, d: Duration) {
        lock(&self.inner).response_delay = d;
    }

    /// Sets a Stripe customer's active entitlements (their features' lookup keys).
    pub fn set_active_entitlements(&self, customer: &str, lookup_keys: &[&str]) {
        lock(&self.inner).entitlements.insert(
            customer.to_owned(),
            lookup_keys.iter().map(|k| (*k).to_owned()).collect(),
        );
    }

    /// The `entitlements.active_entitlement_summary.updated` event body Stripe sends for the
    /// customer's current active entitlements (sign it with [`crate::stripe::webhook::sign_webhook`]).
    pub fn entitlement_summary_event(&self, event_id: &str, customer: &str) -> String {
        let g = lock(&self.inner);
        let keys = g.entitlements.get(customer).cloned().unwrap_or_default();
        let data: Vec<Value> = keys
            .iter()
            .map(|k| active_entitlement(customer, k))
            .collect();
        json!({
            "id": event_id,
            "object": "event",
            "type": "entitlements.active_entitlement_summary.updated",
            "created": now_ms(&g) / 1000,
            "livemode": false,
            "data": {"object": {
                "object": "entitlements.active_entitlement_summary",
                "customer": customer,
                "livemode": false,
                "entitlements": {
                    "object": "list",
                    "data": data,
                    "has_more": false,
                    "url": format!("/v1/customer/{customer}/entitlements"),
                },
            }},
        })
        .to_string()
    }

    /// The meter id for an event name (created if new).
    pub fn meter_id(&self, event_name: &str) -> String {
        meter_for(&mut lock(&self.inner), event_name)
    }
}

fn meter_for(g: &mut Inner, event_name: &str) -> String {
    g.meters
        .entry(event_name.to_owned())
        .or_insert_with(|| format!("mtr_{event_name}"))
        .clone()
}

fn now_ms(g: &Inner) -> i64 {
    SystemClock.now_ms() + g.clock_offset_ms
}

fn json_response(status: u16, body: Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn stripe_error(
    status: u16,
    kind: &str,
    code: Option<&str>,
    message: &str,
    param: Option<&str>,
) -> Response {
    let mut e = json!({"type": kind, "message": message});
    if let Some(c) = code {
        e["code"] = json!(c);
    }
    if let Some(p) = param {
        e["param"] = json!(p);
    }
    json_response(status, json!({ "error": e }))
}

fn invalid(message: &str, code: &str, param: Option<&str>) -> Response {
    stripe_error(400, "invalid_request_error", Some(code), message, param)
}

/// A response whose body fails: the client sees the connection drop mid-answer.
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

fn draw_fault(g: &mut Inner) -> Option<Fault> {
    let f = g.faults.pop_front().or_else(|| {
        let r = g.random;
        let total = r.status_500_permille
            + r.rate_limited_permille
            + r.lose_answer_permille
            + r.drop_permille
            + r.lock_timeout_permille;
        if total == 0 {
            return None;
        }
        let mut x = g.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        g.rng = x;
        let roll = u32::try_from(x % 1000).unwrap_or(0);
        let mut edge = r.status_500_permille;
        if roll < edge {
            return Some(Fault::Status500);
        }
        edge += r.rate_limited_permille;
        if roll < edge {
            return Some(Fault::RateLimited {
                retry_after_s: r.retry_after_s,
            });
        }
        edge += r.lose_answer_permille;
        if roll < edge {
            return Some(Fault::LoseAnswer);
        }
        edge += r.drop_permille;
        if roll < edge {
            return Some(Fault::Drop);
        }
        edge += r.lock_timeout_permille;
        if roll < edge {
            return Some(Fault::LockTimeout);
        }
        None
    });
    if f.is_some() {
        g.faults_injected += 1;
    }
    f
}

fn fault_response(f: Fault) -> Option<Response> {
    match f {
        Fault::Status500 => Some(stripe_error(
            500,
            "api_error",
            None,
            "An unknown error occurred",
            None,
        )),
        Fault::RateLimited { retry_after_s } => {
            let mut r = stripe_error(
                429,
                "invalid_request_error",
                Some("rate_limit"),
                "Request rate limit exceeded.",
                None,
            );
            if let Ok(v) = retry_after_s.to_string().parse() {
                r.headers_mut().insert("retry-after", v);
            }
            Some(r)
        }
        Fault::LockTimeout => Some(stripe_error(
            409,
            "invalid_request_error",
            Some("lock_timeout"),
            "This object cannot be accessed right now because another API request or Stripe process is currently accessing it.",
            None,
        )),
        Fault::Drop => Some(lost()),
        Fault::LoseAnswer => None,
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn bearer(h: &HeaderMap) -> Option<String> {
    header(h, "authorization")?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

fn positive_int(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u64>().ok().filter(|x| *x > 0)
}

struct InFlight {
    inner: Arc<Mutex<Inner>>,
    key: Key,
}

impl InFlight {
    fn enter(inner: &Arc<Mutex<Inner>>, key: Key) -> Self {
        let mut g = lock(inner);
        let n = g.in_flight.entry(key.clone()).or_insert(0);
        *n += 1;
        let n = *n;
        let m = g.max_in_flight.entry(key.clone()).or_insert(0);
        *m = (*m).max(n);
        Self {
            inner: inner.clone(),
            key,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.inner).in_flight.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(_) => return invalid("body too large", "parameter_invalid", None),
    };
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    {
        let mut g = lock(&inner);
        if g.record_requests {
            let headers = parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            g.requests.push(RecordedRequest {
                method: parts.method.to_string(),
                path: path.clone(),
                query: query.clone(),
                headers,
                body: body.clone(),
            });
        }
    }
    let h = &parts.headers;
    match (&parts.method, path.as_str()) {
        (&Method::POST, "/v1/billing/meter_events") => v1_meter_event(&inner, h, &body).await,
        (&Method::POST, "/v2/billing/meter_event_session") => v2_session(&inner, h, &body),
        (&Method::POST, "/v2/billing/meter_event_stream") => v2_stream(&inner, h, &body).await,
        (&Method::GET, "/v1/billing/meters") => list_meters(&inner, h),
        (&Method::GET, "/v1/entitlements/active_entitlements") => {
            active_entitlements(&inner, h, &query)
        }
        (&Method::GET, p)
            if p.starts_with("/v1/billing/meters/") && p.ends_with("/event_summaries") =>
        {
            let id = p
                .trim_start_matches("/v1/billing/meters/")
                .trim_end_matches("/event_summaries")
                .to_owned();
            summaries(&inner, h, &id, &query)
        }
        _ => stripe_error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("Unrecognized request URL ({} {path}).", parts.method),
            None,
        ),
    }
}

fn active_entitlement(customer: &str, key: &str) -> Value {
    json!({
        "id": format!("ent_test_{customer}_{key}"),
        "object": "entitlements.active_entitlement",
        "feature": format!("feat_test_{key}"),
        "livemode": false,
        "lookup_key": key,
    })
}

fn active_entitlements(inner: &Arc<Mutex<Inner>>, h: &HeaderMap, query: &str) -> Response {
    if let Some(r) = check_secret_key(h) {
        return r;
    }
    let customer = query.split('&').find_map(|kv| kv.strip_prefix("customer="));
    let Some(customer) = customer.filter(|c| !c.is_empty()) else {
        return invalid(
            "Missing required param: customer.",
            "parameter_missing",
            Some("customer"),
        );
    };
    let keys = lock(inner)
        .entitlements
        .get(customer)
        .cloned()
        .unwrap_or_default();
    let data: Vec<Value> = keys
        .iter()
        .map(|k| active_entitlement(customer, k))
        .collect();
    json_response(
        200,
        json!({
            "object": "list",
            "data": data,
            "has_more": false,
            "url": "/v1/entitlements/active_entitlements",
        }),
    )
}

fn check_secret_key(h: &HeaderMap) -> Option<Response> {
    match bearer(h) {
        Some(k) if k.starts_with("sk_") || k.starts_with("rk_") => None,
        _ => Some(stripe_error(
            401,
            "invalid_request_error",
            None,
            "Invalid API Key provided",
            None,
        )),
    }
}

fn check_post_headers(h: &HeaderMap, content_type: &str) -> Option<Response> {
    if header(h, "content-type")
        .as_deref()
        .map(|c| c.split(';').next().unwrap_or("").trim())
        != Some(content_type)
    {
        return Some(invalid(
            &format!("expected content type {content_type}"),
            "parameter_invalid",
            None,
        ));
    }
    if header(h, "idempotency-key").is_none_or(|k| k.is_empty() || k.len() > 255) {
        return Some(invalid(
            "missing or invalid Idempotency-Key (test server rule)",
            "parameter_missing",
            None,
        ));
    }
    if header(h, "stripe-version").is_none() {
        return Some(invalid(
            "missing Stripe-Version (test server rule)",
            "parameter_missing",
            None,
        ));
    }
    None
}

fn check_timestamp(g: &Inner, ts: i64) -> bool {
    let now_s = now_ms(g) / 1000;
    ts >= now_s - 35 * 86_400 && ts <= now_s + 300
}

async fn v1_meter_event(inner: &Arc<Mutex<Inner>>, h: &HeaderMap, body: &Bytes) -> Response {
    if let Some(r) =
        check_secret_key(h).or_else(|| check_post_headers(h, "application/x-www-form-urlencoded"))
    {
        return r;
    }
    let idem = header(h, "idempotency-key").unwrap_or_default();
    let fault = {
        let mut g = lock(inner);
        if let Some((status, body)) = g.idempotent.get(&idem) {
            let mut r = json_response(*status, serde_json::from_str(body).unwrap_or(Value::Null));
            g.idempotent_replays += 1;
            r.headers_mut().insert(
                "idempotent-replayed",
                axum::http::HeaderValue::from_static("true"),
            );
            return r;
        }
        draw_fault(&mut g)
    };
    if let Some(r) = fault.and_then(fault_response) {
        return r;
    }
    let mut event_name = None;
    let mut identifier = None;
    let mut timestamp = None;
    let mut payload: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        if let Some(inner_key) = k.strip_prefix("payload[").and_then(|r| r.strip_suffix(']')) {
            payload.insert(inner_key.to_owned(), v.into_owned());
            continue;
        }
        match k.as_ref() {
            "event_name" => event_name = Some(v.into_owned()),
            "identifier" => identifier = Some(v.into_owned()),
            "timestamp" => match v.parse::<i64>() {
                Ok(t) => timestamp = Some(t),
                Err(_) => {
                    return invalid(
                        "Invalid integer: timestamp",
                        "parameter_invalid_integer",
                        Some("timestamp"),
                    );
                }
            },
            k if k == "expand[]" || (k.starts_with("expand[") && k.ends_with(']')) => {}
            other => {
                return invalid(
                    &format!("Received unknown parameter: {other}"),
                    "parameter_unknown",
                    Some(other),
                );
            }
        }
    }
    let Some(event_name) = event_name.filter(|e| !e.is_empty() && e.len() <= 100) else {
        return invalid(
            "Missing required param: event_name.",
            "parameter_missing",
            Some("event_name"),
        );
    };
    if payload.is_empty() {
        return invalid(
            "Missing required param: payload.",
            "parameter_missing",
            Some("payload"),
        );
    }
    if identifier
        .as_ref()
        .is_some_and(|i| i.len() > 100 || i.is_empty())
    {
        return invalid(
            "Invalid identifier: must be at most 100 characters",
            "parameter_invalid",
            Some("identifier"),
        );
    }
    let Some(customer) = payload.get("stripe_customer_id").cloned() else {
        return invalid(
            "Customer mapping key stripe_customer_id not found in payload.",
            "parameter_missing",
            Some("payload[stripe_customer_id]"),
        );
    };
    let Some(value) = payload.get("value").and_then(|v| positive_int(v)) else {
        return invalid(
            "Value must be a positive whole number (test server rule).",
            "parameter_invalid",
            Some("payload[value]"),
        );
    };
    let key = (customer.clone(), event_name.clone());
    let _guard = InFlight::enter(inner, key.clone());
    let (response, cache, delay) = {
        let mut g = lock(inner);
        let ts = timestamp.unwrap_or(now_ms(&g) / 1000);
        let identifier = identifier.unwrap_or_else(|| {
            g.counter += 1;
            format!("gen_{}", g.counter)
        });
        let r = if !check_timestamp(&g, ts) {
            (
                400,
                json!({"error":{"type":"invalid_request_error","code":"parameter_invalid","message":"Timestamp must be within the past 35 calendar days or up to 5 minutes in the future.","param":"timestamp"}}),
                false,
            )
        } else if g.rejected_customers.contains(&customer) {
            (
                400,
                json!({"error":{"type":"invalid_request_error","code":"resource_missing","message":format!("No such customer: '{customer}'"),"param":"payload[stripe_customer_id]"}}),
                false,
            )
        } else if g.identifiers.contains(&identifier) {
            g.duplicates_rejected += 1;
            (
                400,
                json!({"error":{"type":"invalid_request_error","message":format!("An event already exists with identifier {identifier}."),"param":"identifier"}}),
                true,
            )
        } else {
            meter_for(&mut g, &event_name);
            g.identifiers.insert(identifier.clone());
            *g.totals.entry(key.clone()).or_insert(0) += value;
            g.events.push(AcceptedEvent {
                customer,
                event_name: event_name.clone(),
                identifier: identifier.clone(),
                timestamp_s: ts,
                value,
            });
            let created = now_ms(&g) / 1000;
            (
                200,
                json!({"object":"billing.meter_event","created":created,"event_name":event_name,"identifier":identifier,"livemode":false,"payload":payload,"timestamp":ts}),
                false,
            )
        };
        g.idempotent.insert(idem, (r.0, r.1.to_string()));
        let dup = r.2;
        (r, dup, g.response_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fault == Some(Fault::LoseAnswer) {
        return lost();
    }
    let mut resp = json_response(response.0, response.1);
    if cache {
        resp.headers_mut().insert(
            "stripe-should-retry",
            axum::http::HeaderValue::from_static("false"),
        );
    }
    resp
}

#[allow(clippy::result_large_err)] // a test server; the Err is the answer itself
fn parse_json_object(body: &Bytes) -> Result<serde_json::Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(json_response(
            400,
            json!({"error":{"type":"invalid_request_error","code":"invalid_json","message":"Request body must be a JSON object."}}),
        )),
    }
}

fn v2_invalid(message: &str) -> Response {
    json_response(
        400,
        json!({"error":{"type":"invalid_request_error","code":"invalid_request","message":message}}),
    )
}

fn v2_session(inner: &Arc<Mutex<Inner>>, h: &HeaderMap, body: &Bytes) -> Response {
    if let Some(r) = check_secret_key(h).or_else(|| check_post_headers(h, "application/json")) {
        return r;
    }
    let obj = match parse_json_object(body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if let Some(k) = obj.keys().next() {
        return v2_invalid(&format!("Received unknown parameter: {k}"));
    }
    let mut g = lock(inner);
    g.counter += 1;
    let token = format!(
        "mes_tok_{:016x}{}",
        g.rng.wrapping_mul(g.counter),
        g.counter
    );
    let now = now_ms(&g);
    let expires = now.saturating_add(g.session_ttl_ms);
    g.sessions.insert(token.clone(), expires);
    json_response(
        200,
        json!({
            "id": format!("mes_{}", g.counter),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": rfc3339(now / 1000),
            "expires_at": rfc3339(expires / 1000),
            "livemode": false,
        }),
    )
}

fn validate_v2_event(e: &Value) -> Result<AcceptedEvent, String> {
    let Value::Object(m) = e else {
        return Err("event must be an object".into());
    };
    for k in m.keys() {
        if !matches!(
            k.as_str(),
            "event_name" | "identifier" | "payload" | "timestamp"
        ) {
            return Err(format!("Received unknown parameter: events[].{k}"));
        }
    }
    let event_name = m
        .get("event_name")
        .and_then(Value::as_str)
        .ok_or("event_name is required")?;
    if event_name.is_empty() || event_name.len() > 100 {
        return Err("invalid event_name".into());
    }
    let identifier = match m.get("identifier") {
        None => String::new(),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 100 => s.clone(),
        Some(_) => return Err("identifier must be a string of at most 100 characters".into()),
    };
    let Some(Value::Object(p)) = m.get("payload") else {
        return Err("payload is required".into());
    };
    if p.values().any(|v| !v.is_string()) {
        return Err("payload values must be strings".into());
    }
    let customer = p
        .get("stripe_customer_id")
        .and_then(Value::as_str)
        .ok_or("payload.stripe_customer_id is required")?;
    let value = p
        .get("value")
        .and_then(Value::as_str)
        .and_then(positive_int)
        .ok_or("payload.value must be a positive whole number")?;
    let timestamp_s = match m.get("timestamp") {
        None => 0,
        Some(Value::String(s)) => parse_rfc3339(s).ok_or("timestamp must be RFC 3339")?,
        Some(_) => return Err("timestamp must be an RFC 3339 string".into()),
    };
    Ok(AcceptedEvent {
        customer: customer.to_owned(),
        event_name: event_name.to_owned(),
        identifier,
        timestamp_s,
        value,
    })
}

async fn v2_stream(inner: &Arc<Mutex<Inner>>, h: &HeaderMap, body: &Bytes) -> Response {
    let Some(token) = bearer(h) else {
        return json_response(
            401,
            json!({"error":{"type":"invalid_request_error","code":"unauthorized","message":"Missing session token."}}),
        );
    };
    {
        let g = lock(inner);
        match g.sessions.get(&token) {
            None => {
                return json_response(
                    401,
                    json!({"error":{"type":"invalid_request_error","code":"unauthorized","message":"Invalid session token."}}),
                );
            }
            Some(exp) if *exp <= now_ms(&g) => {
                return json_response(
                    401,
                    json!({"error":{"type":"temporary_session_expired","code":"billing_meter_event_session_expired","message":"The meter event session has expired.","doc_url":"https://docs.stripe.com/api/v2/billing-meter"}}),
                );
            }
            Some(_) => {}
        }
    }
    if let Some(r) = check_post_headers(h, "application/json") {
        return r;
    }
    let obj = match parse_json_object(body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if let Some(k) = obj.keys().find(|k| k.as_str() != "events") {
        return v2_invalid(&format!("Received unknown parameter: {k}"));
    }
    let Some(Value::Array(events)) = obj.get("events") else {
        return v2_invalid("events is required");
    };
    if events.is_empty() || events.len() > crate::stripe::STREAM_EVENTS_MAX {
        return v2_invalid("events must hold 1 to 100 events");
    }
    let mut parsed = Vec::with_capacity(events.len());
    for e in events {
        match validate_v2_event(e) {
            Ok(p) => parsed.push(p),
            Err(m) => return v2_invalid(&m),
        }
    }
    let (fault, delay) = {
        let mut g = lock(inner);
        if let Some(bad) = parsed
            .iter()
            .find(|e| g.stream_rejected_customers.contains(&e.customer))
        {
            let message = format!("No such customer: '{}'", bad.customer);
            return json_response(
                400,
                json!({"error":{"type":"invalid_request_error","code":"resource_missing","message":message}}),
            );
        }
        (draw_fault(&mut g), g.response_delay)
    };
    if let Some(r) = fault.and_then(fault_response) {
        return r;
    }
    {
        let mut g = lock(inner);
        let now_s = now_ms(&g) / 1000;
        for mut e in parsed {
            if e.timestamp_s == 0 {
                e.timestamp_s = now_s;
            }
            if e.identifier.is_empty() {
                g.counter += 1;
                e.identifier = format!("gen_{}", g.counter);
            }
            // Asynchronous validation: duplicates, bad timestamps and rejected customers are
            // dropped (Stripe reports them through `v1.billing.meter.error_report_triggered`).
            if g.identifiers.contains(&e.identifier) {
                g.duplicates_dropped_v2 += 1;
                continue;
            }
            if !check_timestamp(&g, e.timestamp_s) || g.rejected_customers.contains(&e.customer) {
                continue;
            }
            meter_for(&mut g, &e.event_name);
            g.identifiers.insert(e.identifier.clone());
            *g.totals
                .entry((e.customer.clone(), e.event_name.clone()))
                .or_insert(0) += e.value;
            g.events.push(e);
        }
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fault == Some(Fault::LoseAnswer) {
        return lost();
    }
    json_response(200, json!({}))
}

fn list_meters(inner: &Arc<Mutex<Inner>>, h: &HeaderMap) -> Response {
    if let Some(r) = check_secret_key(h) {
        return r;
    }
    let g = lock(inner);
    let data: Vec<Value> = g
        .meters
        .iter()
        .map(|(name, id)| json!({"id": id, "object": "billing.meter", "event_name": name, "status": "active", "livemode": false}))
        .collect();
    json_response(
        200,
        json!({"object":"list","data":data,"has_more":false,"url":"/v1/billing/meters"}),
    )
}

fn summaries(inner: &Arc<Mutex<Inner>>, h: &HeaderMap, meter_id: &str, query: &str) -> Response {
    if let Some(r) = check_secret_key(h) {
        return r;
    }
    let mut customer = None;
    let mut start = None;
    let mut end = None;
    let mut window = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "customer" => customer = Some(v.into_owned()),
            "start_time" => start = v.parse::<i64>().ok(),
            "end_time" => end = v.parse::<i64>().ok(),
            "value_grouping_window" => match v.as_ref() {
                "day" => window = Some(86_400),
                "hour" => window = Some(3_600),
                _ => {
                    return invalid(
                        "Invalid value_grouping_window",
                        "parameter_invalid",
                        Some("value_grouping_window"),
                    );
                }
            },
            "limit" | "starting_after" | "ending_before" => {}
            other => {
                return invalid(
                    &format!("Received unknown parameter: {other}"),
                    "parameter_unknown",
                    Some(other),
                );
            }
        }
    }
    let (Some(customer), Some(start), Some(end)) = (customer, start, end) else {
        return invalid(
            "Missing required param: customer, start_time and end_time.",
            "parameter_missing",
            None,
        );
    };
    if start % 60 != 0 || end % 60 != 0 || end <= start {
        return invalid(
            "start_time and end_time must be aligned with minute boundaries",
            "parameter_invalid",
            None,
        );
    }
    let g = lock(inner);
    let Some(event_name) = g
        .meters
        .iter()
        .find(|(_, id)| id.as_str() == meter_id)
        .map(|(n, _)| n.clone())
    else {
        return stripe_error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such billing meter: '{meter_id}'"),
            Some("id"),
        );
    };
    let step = window.unwrap_or(end - start);
    if step != end - start && (start % step != 0 || end % step != 0) {
        return invalid(
            "start_time and end_time must align with the grouping window",
            "parameter_invalid",
            None,
        );
    }
    let mut data = Vec::new();
    let mut t = start;
    while t < end {
        let e = (t + step).min(end);
        let sum: u64 = g
            .events
            .iter()
            .filter(|x| {
                x.customer == customer
                    && x.event_name == event_name
                    && (t..e).contains(&x.timestamp_s)
            })
            .map(|x| x.value)
            .sum();
        data.push(json!({"id": format!("mtrusumm_{meter_id}_{t}"), "object": "billing.meter_event_summary", "aggregated_value": sum, "start_time": t, "end_time": e, "livemode": false, "meter": meter_id}));
        t = e;
    }
    json_response(
        200,
        json!({"object":"list","data":data,"has_more":false,"url":format!("/v1/billing/meters/{meter_id}/event_summaries")}),
    )
}
