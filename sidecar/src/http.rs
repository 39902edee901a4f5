//! The sidecar's HTTP surface (SPEC §4): OpenMeter- and Stripe-compatible ingest, entitlements
//! (checks, consume, reserve / commit / release), flush, health and metrics. A thin axum shell over [`SidecarBackend`]; a 2xx from an ingest endpoint means
//! the events are on the agent's disk.

use crate::cloudevents::{self, Mode};
use crate::mapping::{IngestCatalog, MappedEvent};
use crate::stripe_form::{self, StripeError};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rust_decimal::Decimal;
use std::sync::Arc;
use std::time::Duration;
use tally_protocol::names::{CustomerId, MeterName};

/// Default largest request body: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Why the backend could not take events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The disk budget is spent and the overflow policy is `reject`.
    #[error("the agent's disk budget is full")]
    OverBudget,
    /// The catalog is not known yet.
    #[error("the meter catalog is not known yet")]
    NotReady,
    /// An event the agent refuses whatever its state (e.g. its time is outside the window):
    /// none of the request's events were recorded.
    #[error("{0}")]
    Invalid(String),
    /// The collector revoked this agent: no new events are taken (they could never be
    /// delivered).
    #[error(
        "the collector revoked this agent: new events are refused; enrol a new agent key with a new enrolment token"
    )]
    Revoked,
    /// Anything else: the events were not recorded.
    #[error("{0}")]
    Unavailable(String),
}

/// What the HTTP layer needs from the agent.
pub trait SidecarBackend: Send + Sync + 'static {
    /// The compiled catalog, once the collector has sent one.
    fn catalog(&self) -> Option<Arc<IngestCatalog>>;
    /// Records all events durably (one group commit), or none of them.
    fn record_durable(
        &self,
        events: Vec<MappedEvent>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Seals and waits for acknowledgement.
    fn flush(&self, timeout: Duration) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Prometheus text.
    fn render_metrics(&self) -> String;
    /// Whether the store is open and the catalog known.
    fn ready(&self) -> bool;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// The agent's `status()` as JSON.
    fn status_json(&self) -> serde_json::Value;
    /// The agent's quarantined batches as JSON (`crate::backend::quarantine_json`).
    fn quarantine_json(&self) -> Result<serde_json::Value, BackendError>;
    /// What the agent knows of `customer` (waiting a bounded time for a new customer).
    fn entitlements(&self, customer: CustomerId) -> impl Future<Output = EntitlementsView> + Send;
    /// Whether `customer` has `feature` (waiting a bounded time for a new customer).
    fn feature(
        &self,
        customer: CustomerId,
        feature: String,
    ) -> impl Future<Output = FeatureAnswer> + Send;
    /// The limit of `customer` on `meter` (waiting a bounded time for a new customer).
    fn limit(
        &self,
        customer: CustomerId,
        meter: MeterName,
    ) -> impl Future<Output = LimitAnswer> + Send;
    /// Records `quantity` durably only if the customer's limit allows it.
    fn consume(
        &self,
        customer: CustomerId,
        meter: MeterName,
        quantity: Decimal,
    ) -> impl Future<Output = Result<Consumed, BackendError>> + Send;
    /// Holds `quantity` until a commit or a release (or its expiry).
    fn reserve(
        &self,
        customer: CustomerId,
        meter: MeterName,
        quantity: Decimal,
    ) -> impl Future<Output = Result<Reserved, BackendError>> + Send;
    /// Records `quantity` durably against a reservation; `None` when the id is unknown or
    /// expired.
    fn commit(
        &self,
        id: String,
        quantity: Decimal,
    ) -> impl Future<Output = Result<Option<Consumed>, BackendError>> + Send;
    /// Gives a reservation's hold back; false when the id is unknown or expired.
    fn release(&self, id: &str) -> bool;
}

/// What the agent knows of one customer.
#[derive(Debug, Clone, Default)]
pub struct EntitlementsView {
    /// Version of the snapshot, if one was ever received.
    pub snapshot_version: Option<u64>,
    /// Age of the snapshot in ms.
    pub snapshot_age_ms: Option<i64>,
    /// Whether a snapshot listed the customer.
    pub known: bool,
    /// True when answers come from a stale snapshot or none.
    pub stale: bool,
    /// The offline rule that decides when not current (`no_snapshot`, `stale_snapshot`).
    pub decided_by: Option<&'static str>,
    /// The plan.
    pub plan: Option<String>,
    /// Features the customer has, with what granted each.
    pub features: Vec<(String, &'static str)>,
    /// Limits by meter.
    pub limits: Vec<(String, LimitAnswer)>,
}

/// Whether a customer has a feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureAnswer {
    /// Allowed.
    pub allowed: bool,
    /// What decided (`plan`, `override`, `stripe`, `no_snapshot`, `stale_snapshot`).
    pub decided_by: &'static str,
    /// From a stale snapshot or none.
    pub stale: bool,
}

/// A customer's limit on a meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitAnswer {
    /// Whether one more unit would be allowed now, as far as this agent knows.
    pub allowed: bool,
    /// What decides.
    pub decided_by: &'static str,
    /// The limit; `None` without one.
    pub limit: Option<Decimal>,
    /// Used as far as this agent knows.
    pub used: Decimal,
    /// Remaining; `None` without a limit.
    pub remaining: Option<Decimal>,
    /// `hard` or `soft`.
    pub enforcement: Option<&'static str>,
    /// From a stale snapshot or none.
    pub stale: bool,
}

/// The outcome of a consume or a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Whether the usage was allowed (and recorded); a commit capped by a hard limit is not.
    pub allowed: bool,
    /// What was recorded.
    pub recorded: Decimal,
    /// What remains after it, when a limit is known.
    pub remaining: Option<Decimal>,
    /// What decided.
    pub decided_by: &'static str,
}

/// The outcome of a reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Held under this id until `expires_at_ms`.
    Held {
        /// The reservation's id.
        id: String,
        /// When it is released unless committed.
        expires_at_ms: i64,
        /// What decided.
        decided_by: &'static str,
        /// Remaining, as far as this agent knows.
        remaining: Option<Decimal>,
    },
    /// Refused.
    Denied {
        /// What decided.
        decided_by: &'static str,
        /// Remaining, as far as this agent knows.
        remaining: Option<Decimal>,
    },
}

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Bearer token required on every endpoint but health checks, when set.
    pub token: Option<String>,
    /// Largest accepted body.
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

struct Ctx<B> {
    backend: B,
    config: HttpConfig,
}

/// The router.
pub fn router<B: SidecarBackend>(backend: B, config: HttpConfig) -> Router {
    let ctx = Arc::new(Ctx { backend, config });
    let guarded = Router::new()
        .route("/api/v1/events", post(openmeter_ingest::<B>))
        .route(STRIPE_METER_EVENTS, post(stripe_ingest::<B>))
        .route("/v1/flush", post(flush::<B>))
        .route("/v1/entitlements/{customer}", get(entitlements::<B>))
        .route(
            "/v1/entitlements/{customer}/{item}",
            get(entitlement_item::<B>),
        )
        .route(
            "/v1/entitlements/{customer}/{meter}/consume",
            post(consume::<B>),
        )
        .route(
            "/v1/entitlements/{customer}/{meter}/reservations",
            post(reserve::<B>),
        )
        .route("/v1/reservations/{id}/commit", post(commit::<B>))
        .route("/v1/reservations/{id}", axum::routing::delete(release::<B>))
        .route("/metrics", get(metrics::<B>))
        .route("/v1/status", get(status::<B>))
        .route("/v1/quarantine", get(quarantine::<B>))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            require_token::<B>,
        ));
    Router::new()
        .merge(guarded)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<B>))
        .with_state(ctx)
}

const STRIPE_METER_EVENTS: &str = "/v1/billing/meter_events";

/// Refuses a request without the configured bearer token, in the error shape its API uses.
async fn require_token<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if authorized(&ctx, req.headers()) {
        return next.run(req).await;
    }
    if req.uri().path() == STRIPE_METER_EVENTS {
        let e = StripeError {
            kind: "invalid_request_error",
            code: "api_key_invalid",
            message: String::from("Invalid API Key provided."),
            param: None,
        };
        return stripe_error(StatusCode::UNAUTHORIZED, &e);
    }
    problem(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
}

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn stripe_error(status: StatusCode, e: &StripeError) -> Response {
    (status, axum::Json(e.body())).into_response()
}

fn authorized<B>(ctx: &Ctx<B>, headers: &HeaderMap) -> bool {
    let Some(token) = &ctx.config.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time in the token's bytes, so a timing probe learns nothing but its length.
    bool::from(subtle::ConstantTimeEq::ct_eq(
        given.as_bytes(),
        token.as_bytes(),
    ))
}

/// Reads the body up to the limit; `Err(())` when it is larger.
async fn body_bytes(req: Request, limit: usize) -> Result<Bytes, ()> {
    let too_big = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit);
    if too_big {
        return Err(());
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ())
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn backend_status(e: &BackendError) -> StatusCode {
    match e {
        BackendError::OverBudget => StatusCode::TOO_MANY_REQUESTS,
        BackendError::Invalid(_) => StatusCode::BAD_REQUEST,
        BackendError::NotReady | BackendError::Revoked | BackendError::Unavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

async fn openmeter_ingest<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    req: Request,
) -> Response {
    let Some(mode) = Mode::from_content_type(content_type(req.headers())) else {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "use application/cloudevents+json, application/cloudevents-batch+json or application/json",
        );
    };
    let limit = ctx.config.max_body_bytes;
    let Ok(body) = body_bytes(req, limit).await else {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {limit} bytes"),
        );
    };
    let Some(catalog) = ctx.backend.catalog() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the meter catalog is not known yet; retry shortly",
        );
    };
    let events = match cloudevents::parse(&body, mode, &catalog, ctx.backend.now_ms()) {
        Ok(events) => events,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ctx.backend.record_durable(events).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => problem(backend_status(&e), e.to_string()),
    }
}

async fn stripe_ingest<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    req: Request,
) -> Response {
    let ct = content_type(req.headers())
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ct != "application/x-www-form-urlencoded" {
        let e = StripeError {
            kind: "invalid_request_error",
            code: "invalid_content_type",
            message: String::from("Requests must be application/x-www-form-urlencoded."),
            param: None,
        };
        return stripe_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &e);
    }
    let idem = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let limit = ctx.config.max_body_bytes;
    let Ok(body) = body_bytes(req, limit).await else {
        let e = StripeError {
            kind: "invalid_request_error",
            code: "request_too_large",
            message: format!("Request body is larger than {limit} bytes."),
            param: None,
        };
        return stripe_error(StatusCode::PAYLOAD_TOO_LARGE, &e);
    };
    let Some(catalog) = ctx.backend.catalog() else {
        let e = StripeError {
            kind: "api_error",
            code: "catalog_unavailable",
            message: String::from("The meter catalog is not known yet; retry shortly."),
            param: None,
        };
        return stripe_error(StatusCode::SERVICE_UNAVAILABLE, &e);
    };
    let now_s = ctx.backend.now_ms().div_euclid(1000);
    let accepted =
        match stripe_form::parse(&body, &catalog, now_s, idem.as_deref(), fresh_identifier) {
            Ok(a) => a,
            Err(e) => return stripe_error(StatusCode::BAD_REQUEST, &e),
        };
    match ctx.backend.record_durable(vec![accepted.event]).await {
        Ok(()) => axum::Json(accepted.object).into_response(),
        Err(e) => {
            let se = StripeError {
                kind: "api_error",
                code: "agent_unavailable",
                message: e.to_string(),
                param: None,
            };
            stripe_error(backend_status(&e), &se)
        }
    }
}

fn fresh_identifier() -> String {
    let mut b = [0u8; 12];
    // An identifier only names the event in our answer; if the OS RNG fails we still answer.
    let _ = getrandom::getrandom(&mut b);
    format!("tly_{}", hex::encode(b))
}

async fn flush<B: SidecarBackend>(State(ctx): State<Arc<Ctx<B>>>) -> Response {
    match ctx.backend.flush(Duration::from_secs(30)).await {
        Ok(()) => axum::Json(serde_json::json!({"flushed": true})).into_response(),
        Err(e) => problem(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
    }
}

async fn metrics<B: SidecarBackend>(State(ctx): State<Arc<Ctx<B>>>) -> Response {
    let mut r = Response::new(Body::from(ctx.backend.render_metrics()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

async fn status<B: SidecarBackend>(State(ctx): State<Arc<Ctx<B>>>) -> Response {
    axum::Json(ctx.backend.status_json()).into_response()
}

async fn quarantine<B: SidecarBackend>(State(ctx): State<Arc<Ctx<B>>>) -> Response {
    match ctx.backend.quarantine_json() {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Ready when the catalog is known, the agent is not revoked, its disk takes writes and the
/// backlog is under the disk budget: a balancer should send events elsewhere while any of these fails (each is
/// reported, and clears by itself once the cause is gone).
async fn readyz<B: SidecarBackend>(State(ctx): State<Arc<Ctx<B>>>) -> Response {
    let not_ready = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    if !ctx.backend.ready() {
        return not_ready("not ready: catalog unknown or store closed".into());
    }
    let status = ctx.backend.status_json();
    if status.get("revoked").and_then(|b| b.as_bool()) == Some(true) {
        return not_ready("not ready: the collector revoked this agent".into());
    }
    if let Some(e) = status.get("disk_error").and_then(|e| e.as_str()) {
        return not_ready(format!("not ready: the agent's disk is failing: {e}"));
    }
    if status.get("over_budget").and_then(|b| b.as_bool()) == Some(true) {
        return not_ready("not ready: the backlog is over the disk budget".into());
    }
    "ready".into_response()
}

fn dec(d: Option<Decimal>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| {
        serde_json::Value::from(d.to_string())
    })
}

fn limit_json(l: &LimitAnswer) -> serde_json::Value {
    serde_json::json!({
        "allowed": l.allowed,
        "decided_by": l.decided_by,
        "limit": dec(l.limit),
        "used": l.used.to_string(),
        "remaining": dec(l.remaining),
        "enforcement": l.enforcement,
        "stale": l.stale,
    })
}

fn snapshot_json(v: &EntitlementsView) -> serde_json::Value {
    match v.snapshot_version {
        Some(version) => serde_json::json!({
            "known": v.known, "version": version, "age_ms": v.snapshot_age_ms, "stale": v.stale,
        }),
        None => serde_json::json!({
            "known": false,
            "stale": true,
            "message": "no entitlement snapshot has been received from the collector yet",
        }),
    }
}

fn parse_customer(s: &str) -> Result<CustomerId, Box<Response>> {
    CustomerId::new(s)
        .map_err(|e| Box::new(problem(StatusCode::BAD_REQUEST, format!("customer: {e}"))))
}

async fn entitlements<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    Path(customer): Path<String>,
) -> Response {
    let customer = match parse_customer(&customer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let view = ctx.backend.entitlements(customer.clone()).await;
    let features: serde_json::Map<String, serde_json::Value> = view
        .features
        .iter()
        .map(|(f, by)| {
            (
                f.clone(),
                serde_json::json!({"allowed": true, "decided_by": by}),
            )
        })
        .collect();
    let limits: serde_json::Map<String, serde_json::Value> = view
        .limits
        .iter()
        .map(|(m, l)| (m.clone(), limit_json(l)))
        .collect();
    axum::Json(serde_json::json!({
        "customer": customer.as_str(),
        "plan": view.plan,
        "decided_by": view.decided_by,
        "stale": view.stale,
        "snapshot": snapshot_json(&view),
        "features": features,
        "limits": limits,
    }))
    .into_response()
}

async fn entitlement_item<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    Path((customer, item)): Path<(String, String)>,
) -> Response {
    let customer = match parse_customer(&customer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let is_meter = ctx.backend.catalog().is_some_and(|c| c.has_meter(&item));
    let mut body = match MeterName::new(item.as_str()) {
        Ok(meter) if is_meter => {
            let l = ctx.backend.limit(customer.clone(), meter).await;
            let mut b = limit_json(&l);
            b["meter"] = serde_json::Value::from(item);
            b
        }
        _ => {
            let f = ctx.backend.feature(customer.clone(), item.clone()).await;
            serde_json::json!({
                "feature": item,
                "allowed": f.allowed,
                "decided_by": f.decided_by,
                "stale": f.stale,
            })
        }
    };
    body["customer"] = serde_json::Value::from(customer.as_str());
    axum::Json(body).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantityBody {
    quantity: String,
}

/// Reads `{"quantity":"…"}` (JSON, within the body limit) into a non-negative decimal.
async fn quantity_body<B>(ctx: &Ctx<B>, req: Request) -> Result<Decimal, Box<Response>> {
    if Mode::from_content_type(content_type(req.headers())) != Some(Mode::Json) {
        return Err(Box::new(problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "use application/json",
        )));
    }
    let limit = ctx.config.max_body_bytes;
    let Ok(body) = body_bytes(req, limit).await else {
        return Err(Box::new(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {limit} bytes"),
        )));
    };
    match serde_json::from_slice::<QuantityBody>(&body) {
        Ok(b) => crate::quantity::parse_quantity(&b.quantity)
            .map_err(|e| Box::new(problem(StatusCode::BAD_REQUEST, format!("quantity: {e}")))),
        Err(e) => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!("body must be {{\"quantity\":\"…\"}}: {e}"),
        ))),
    }
}

/// The customer and a meter of the catalog from the path.
fn customer_meter<B: SidecarBackend>(
    ctx: &Ctx<B>,
    customer: &str,
    meter: String,
) -> Result<(CustomerId, MeterName), Box<Response>> {
    let customer = parse_customer(customer)?;
    let meter = MeterName::new(meter)
        .map_err(|e| Box::new(problem(StatusCode::BAD_REQUEST, format!("meter: {e}"))))?;
    if !ctx
        .backend
        .catalog()
        .is_some_and(|c| c.has_meter(meter.as_str()))
    {
        return Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!("unknown meter {meter}"),
        )));
    }
    Ok((customer, meter))
}

fn consumed_response(c: &Consumed) -> Response {
    let status = if c.allowed {
        StatusCode::OK
    } else {
        StatusCode::PAYMENT_REQUIRED
    };
    let body = serde_json::json!({
        "allowed": c.allowed,
        "remaining": dec(c.remaining),
        "recorded": c.recorded.to_string(),
        "decided_by": c.decided_by,
    });
    (status, axum::Json(body)).into_response()
}

async fn consume<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    Path((customer, meter)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (customer, meter) = match customer_meter(&ctx, &customer, meter) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let quantity = match quantity_body(&ctx, req).await {
        Ok(q) => q,
        Err(r) => return *r,
    };
    match ctx.backend.consume(customer, meter, quantity).await {
        Ok(c) => consumed_response(&c),
        Err(e) => problem(backend_status(&e), e.to_string()),
    }
}

async fn reserve<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    Path((customer, meter)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (customer, meter) = match customer_meter(&ctx, &customer, meter) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let quantity = match quantity_body(&ctx, req).await {
        Ok(q) => q,
        Err(r) => return *r,
    };
    match ctx
        .backend
        .reserve(customer.clone(), meter.clone(), quantity)
        .await
    {
        Ok(Reserved::Held {
            id,
            expires_at_ms,
            decided_by,
            remaining,
        }) => (
            StatusCode::CREATED,
            axum::Json(serde_json::json!({
                "id": id,
                "allowed": true,
                "customer": customer.as_str(),
                "meter": meter.as_str(),
                "quantity": quantity.to_string(),
                "expires_at_ms": expires_at_ms,
                "decided_by": decided_by,
                "remaining": dec(remaining),
            })),
        )
            .into_response(),
        Ok(Reserved::Denied {
            decided_by,
            remaining,
        }) => (
            StatusCode::PAYMENT_REQUIRED,
            axum::Json(serde_json::json!({
                "allowed": false,
                "decided_by": decided_by,
                "remaining": dec(remaining),
            })),
        )
            .into_response(),
        Err(e) => problem(backend_status(&e), e.to_string()),
    }
}

async fn commit<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let quantity = match quantity_body(&ctx, req).await {
        Ok(q) => q,
        Err(r) => return *r,
    };
    match ctx.backend.commit(id, quantity).await {
        Ok(Some(c)) => {
            // A commit capped by a hard limit still recorded what it could: 200 either way.
            let body = serde_json::json!({
                "allowed": c.allowed,
                "remaining": dec(c.remaining),
                "recorded": c.recorded.to_string(),
                "decided_by": c.decided_by,
            });
            axum::Json(body).into_response()
        }
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "no such reservation (unknown or expired)",
        ),
        Err(e) => problem(backend_status(&e), e.to_string()),
    }
}

async fn release<B: SidecarBackend>(
    State(ctx): State<Arc<Ctx<B>>>,
    Path(id): Path<String>,
) -> Response {
    if ctx.backend.release(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem(
            StatusCode::NOT_FOUND,
            "no such reservation (unknown or expired)",
        )
    }
}
