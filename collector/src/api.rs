//! The admin HTTP API (SPEC §6.6): JSON, decimals as strings, errors in Stripe's shape
//! (`{"error":{"type","code","message","param"}}`), `Authorization: Bearer <admin token>` on
//! every route except `/healthz` and `/openapi.json`.
//!
//! Owns the routes, their request parsing and their answers. Guarantees: a request that fails
//! to parse or validate is answered 400 and changes nothing; a missing or wrong token is 401
//! before anything is read; the token is compared in constant time and never logged.

use crate::ingest::now_ms;
use crate::ledger::{Account, Adjustment, Period, Transfer, TransferSource, VerifyReport};
use crate::registry::constant_time_eq;
use crate::server::Shared;
use crate::store::{AdjustOutcome, QuarantineRecord, StoreError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use tally_protocol::batch::AgentId;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::names::{CustomerId, DimensionKey, Dimensions, MeterName};
use tokio::sync::watch;
use utoipa::{OpenApi, ToSchema};

mod stripe_routes;

type St = State<Arc<Shared>>;

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(shared);
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin api stopped");
    }
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    let private = Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/customers/{customer}/usage", get(customer_usage))
        .route("/v1/meters", get(list_meters))
        .route("/v1/meters/{meter}", put(put_meter))
        .route("/v1/ledger/entries", get(entries))
        .route("/v1/ledger/verify", get(verify))
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{id}/revoke", post(revoke))
        .route("/v1/adjustments", post(adjust))
        .route("/v1/quarantine", get(quarantine))
        .route("/v1/customers/{customer}", put(stripe_routes::put_customer))
        .route("/v1/stripe/outbox", get(stripe_routes::list_outbox))
        .route(
            "/v1/stripe/outbox/{id}/retry",
            post(stripe_routes::retry_outbox),
        )
        .route("/v1/reconciliation", get(stripe_routes::reconciliation))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(private)
        .route("/healthz", get(healthz))
        .route("/v1/stripe/webhooks", post(stripe_routes::webhook))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error in Stripe's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<String>,
}

/// The body of an error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Stripe's error object.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `idempotency_error` or `api_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A stable code.
    pub code: String,
    /// Lowercase detail.
    pub message: String,
    /// The parameter at fault, if one is.
    pub param: Option<String>,
}

impl ApiError {
    fn invalid(code: &'static str, param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    fn missing(param: &str) -> Self {
        Self::invalid("parameter_missing", param, format!("{param} is required"))
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param: None,
        }
    }

    fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: "invalid_api_key",
            message: String::from("a valid admin token is required: Authorization: Bearer <token>"),
            param: None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error in admin api");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "api_error",
            code: "storage_error",
            message: String::from("the store failed; nothing was changed"),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                kind: self.kind.to_owned(),
                code: self.code.to_owned(),
                message: self.message,
                param: self.param,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

async fn auth(State(shared): St, headers: HeaderMap, req: Request, next: Next) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), shared.admin_token.as_bytes()) => {
            next.run(req).await
        }
        _ => ApiError::unauthorized().into_response(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        code: "method_not_allowed",
        message: String::from("this route does not take that method"),
        param: None,
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("resource_missing", "no such route")
}

/// Runs a store call off the async workers (writes fsync).
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let shared = shared.clone();
    match tokio::task::spawn_blocking(move || f(&shared)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => Err(ApiError::from(StoreError::Backend(String::from(
            "task failed",
        )))),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers

fn query(raw: Option<String>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)
            .ok_or_else(|| ApiError::invalid("invalid_query", k, "bad percent-encoding"))?;
        let v = percent_decode(v)
            .ok_or_else(|| ApiError::invalid("invalid_query", &k, "bad percent-encoding"))?;
        out.insert(k, v);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn customer(s: &str, param: &str) -> Result<CustomerId, ApiError> {
    CustomerId::new(s).map_err(|e| ApiError::invalid("invalid_customer", param, e.to_string()))
}

fn meter_name(s: &str, param: &str) -> Result<MeterName, ApiError> {
    MeterName::new(s).map_err(|e| ApiError::invalid("invalid_meter", param, e.to_string()))
}

fn period(s: Option<&String>) -> Result<Option<Period>, ApiError> {
    s.map(|p| {
        Period::parse(p)
            .ok_or_else(|| ApiError::invalid("invalid_period", "period", "period must be YYYY-MM"))
    })
    .transpose()
}

fn number(q: &HashMap<String, String>, name: &str, default: u64) -> Result<u64, ApiError> {
    q.get(name).map_or(Ok(default), |v| {
        v.parse().map_err(|_| {
            ApiError::invalid(
                "invalid_integer",
                name,
                format!("{name} must be a non-negative integer"),
            )
        })
    })
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.contains("field"))
            .unwrap_or("body")
            .to_owned();
        ApiError::invalid(
            "invalid_json",
            &param,
            format!("invalid request body: {msg}"),
        )
    })
}

/// A decimal given as a JSON string (never as a number: floats are not exact).
fn decimal(v: &serde_json::Value, param: &str) -> Result<Decimal, ApiError> {
    match v {
        serde_json::Value::String(s) => Decimal::from_str(s.trim()).map_err(|_| {
            ApiError::invalid(
                "invalid_decimal",
                param,
                format!("{param} must be a decimal string like \"12.5\""),
            )
        }),
        serde_json::Value::Null => Err(ApiError::missing(param)),
        _ => Err(ApiError::invalid(
            "invalid_decimal",
            param,
            format!("{param} must be a string (decimals are exact strings, not JSON numbers)"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Usage

/// A customer's usage of a meter in a period.
#[derive(Serialize, ToSchema)]
pub struct Usage {
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// `YYYY-MM`.
    pub period: String,
    /// The usage, as a decimal string.
    #[schema(value_type = String)]
    pub quantity: Decimal,
    /// Events counted.
    pub events: u64,
}

fn sum_usage(accounts: &[Account]) -> (Decimal, u64) {
    accounts.iter().fold((Decimal::ZERO, 0), |(q, e), a| {
        (q + a.balance(), e + a.events)
    })
}

#[utoipa::path(get, path = "/v1/usage", tag = "usage",
    params(("customer" = String, Query), ("meter" = String, Query), ("period" = Option<String>, Query, description = "YYYY-MM; default the current month (UTC)")),
    responses((status = 200, body = Usage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn usage(State(shared): St, RawQuery(raw): RawQuery) -> ApiResult<Usage> {
    let q = query(raw)?;
    let c = customer(
        q.get("customer")
            .ok_or_else(|| ApiError::missing("customer"))?,
        "customer",
    )?;
    let m = meter_name(
        q.get("meter").ok_or_else(|| ApiError::missing("meter"))?,
        "meter",
    )?;
    let p = period(q.get("period"))?.unwrap_or_else(|| Period::of_ms(now_ms()));
    let (c2, m2) = (c.clone(), m.clone());
    let accounts = blocking(&shared, move |s| {
        s.store.usage_accounts(&c2, Some(&m2), Some(p))
    })
    .await?;
    let (quantity, events) = sum_usage(&accounts);
    Ok(axum::Json(Usage {
        customer: c.to_string(),
        meter: m.to_string(),
        period: p.to_string(),
        quantity,
        events,
    }))
}

/// A customer's usage of every meter and period.
#[derive(Serialize, ToSchema)]
pub struct CustomerUsage {
    /// The customer.
    pub customer: String,
    /// One entry per meter and period.
    pub data: Vec<Usage>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/usage", tag = "usage",
    params(("customer" = String, Path), ("period" = Option<String>, Query)),
    responses((status = 200, body = CustomerUsage), (status = 400, body = ErrorBody)))]
async fn customer_usage(
    State(shared): St,
    Path(c): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<CustomerUsage> {
    let q = query(raw)?;
    let c = customer(&c, "customer")?;
    let p = period(q.get("period"))?;
    let c2 = c.clone();
    let accounts = blocking(&shared, move |s| s.store.usage_accounts(&c2, None, p)).await?;
    let mut by: BTreeMap<(String, String), Vec<Account>> = BTreeMap::new();
    for a in accounts {
        if let crate::ledger::AccountKey::Usage { meter, period, .. } = &a.key {
            by.entry((meter.to_string(), period.to_string()))
                .or_default()
                .push(a);
        }
    }
    let data = by
        .into_iter()
        .map(|((meter, period), accts)| {
            let (quantity, events) = sum_usage(&accts);
            Usage {
                customer: c.to_string(),
                meter,
                period,
                quantity,
                events,
            }
        })
        .collect();
    Ok(axum::Json(CustomerUsage {
        customer: c.to_string(),
        data,
    }))
}

// ---------------------------------------------------------------------------------------------
// Meters

/// A meter as the API shows and takes it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MeterBody {
    /// The meter's name (from the path on `PUT`).
    #[serde(default)]
    pub name: Option<String>,
    /// `sum`, `count` or `last`.
    pub aggregation: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// JSON path of the value (`$.count`); not for `count` meters.
    #[serde(default)]
    pub value_property: Option<String>,
    /// Dimension → JSON path.
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
    /// Stripe meter event name.
    #[serde(default)]
    pub stripe_event_name: Option<String>,
    /// Multiplier to Stripe's whole units, a decimal string; default `"1"`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub stripe_unit_scale: Option<serde_json::Value>,
}

impl MeterBody {
    fn of(def: &MeterDef) -> Self {
        MeterBody {
            name: Some(def.name.to_string()),
            aggregation: String::from(match def.aggregation {
                Aggregation::Sum => "sum",
                Aggregation::Count => "count",
                Aggregation::Last => "last",
            }),
            event_type: def.event_type.clone(),
            value_property: def.value_property.clone(),
            group_by: def
                .group_by
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            stripe_event_name: def.stripe_event_name.clone(),
            stripe_unit_scale: Some(serde_json::Value::String(def.stripe_unit_scale.to_string())),
        }
    }
}

/// The catalog.
#[derive(Serialize, ToSchema)]
pub struct Meters {
    /// Catalog version; increases with every change.
    pub version: u64,
    /// The meters.
    pub data: Vec<MeterBody>,
}

#[utoipa::path(get, path = "/v1/meters", tag = "meters", responses((status = 200, body = Meters)))]
async fn list_meters(State(shared): St) -> ApiResult<Meters> {
    let c = blocking(&shared, |s| s.store.catalog()).await?;
    Ok(axum::Json(Meters {
        version: c.version,
        data: c.meters.iter().map(MeterBody::of).collect(),
    }))
}

#[utoipa::path(put, path = "/v1/meters/{meter}", tag = "meters", params(("meter" = String, Path)),
    request_body = MeterBody, responses((status = 200, body = Meters), (status = 400, body = ErrorBody)))]
async fn put_meter(State(shared): St, Path(name): Path<String>, body: Bytes) -> ApiResult<Meters> {
    let name = meter_name(&name, "meter")?;
    let b: MeterBody = json_body(&body)?;
    if b.name.as_deref().is_some_and(|n| n != name.as_str()) {
        return Err(ApiError::invalid(
            "name_mismatch",
            "name",
            "name differs from the path",
        ));
    }
    let aggregation = match b.aggregation.as_str() {
        "sum" => Aggregation::Sum,
        "count" => Aggregation::Count,
        "last" => Aggregation::Last,
        _ => {
            return Err(ApiError::invalid(
                "invalid_aggregation",
                "aggregation",
                "aggregation must be sum, count or last",
            ));
        }
    };
    let mut group_by = Vec::new();
    for (k, v) in b.group_by {
        let k = DimensionKey::new(k)
            .map_err(|e| ApiError::invalid("invalid_group_by", "group_by", e.to_string()))?;
        group_by.push((k, v));
    }
    let group_by = BoundedVec::new(group_by)
        .map_err(|e| ApiError::invalid("invalid_group_by", "group_by", e.to_string()))?;
    let scale = match &b.stripe_unit_scale {
        None => Decimal::ONE,
        Some(v) => decimal(v, "stripe_unit_scale")?,
    };
    let def = MeterDef {
        name,
        aggregation,
        event_type: b.event_type,
        value_property: b.value_property,
        group_by,
        stripe_event_name: b.stripe_event_name,
        stripe_unit_scale: scale,
    };
    def.validate()
        .map_err(|e| ApiError::invalid("invalid_meter_definition", "meter", e.to_string()))?;
    let c = blocking(&shared, move |s| s.put_meter(&def)).await?;
    Ok(axum::Json(Meters {
        version: c.version,
        data: c.meters.iter().map(MeterBody::of).collect(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Ledger

/// One ledger transfer.
#[derive(Serialize, ToSchema)]
pub struct Entry {
    /// Position in the ledger (use as `after` to page).
    pub position: u64,
    /// The transfer id, 32 hex digits.
    pub id: String,
    /// Debited account id.
    pub debit_account: String,
    /// Credited account id.
    pub credit_account: String,
    /// The unit (meter).
    pub unit: String,
    /// The amount, a decimal string.
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Events carried.
    pub events: u64,
    /// The customer.
    pub customer: String,
    /// When the usage happened, ms.
    pub event_at_ms: i64,
    /// When it was posted, ms.
    pub posted_at_ms: i64,
    /// `batch_row` or `adjustment`, with its fields.
    #[schema(value_type = Object)]
    pub source: serde_json::Value,
}

impl Entry {
    fn of(position: u64, t: &Transfer) -> Self {
        let source = match &t.source {
            TransferSource::BatchRow {
                agent,
                epoch,
                seq,
                row,
            } => serde_json::json!({
                "type": "batch_row", "agent": agent.to_string(), "epoch": epoch, "seq": seq, "row": row,
            }),
            TransferSource::Adjustment {
                idempotency_key,
                reason,
            } => serde_json::json!({
                "type": "adjustment", "idempotency_key": idempotency_key, "reason": reason,
            }),
        };
        Entry {
            position,
            id: format!("{:032x}", t.id),
            debit_account: format!("{:032x}", t.debit),
            credit_account: format!("{:032x}", t.credit),
            unit: t.unit.to_string(),
            amount: t.amount,
            events: t.events,
            customer: t.customer.to_string(),
            event_at_ms: t.event_at_ms,
            posted_at_ms: t.posted_at_ms,
            source,
        }
    }
}

/// A page of ledger entries.
#[derive(Serialize, ToSchema)]
pub struct Entries {
    /// The entries.
    pub data: Vec<Entry>,
    /// True when more may follow.
    pub has_more: bool,
    /// Pass as `after` for the next page.
    pub next_after: Option<u64>,
}

const MAX_PAGE: u64 = 1000;

#[utoipa::path(get, path = "/v1/ledger/entries", tag = "ledger",
    params(("customer" = Option<String>, Query), ("after" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, body = Entries), (status = 400, body = ErrorBody)))]
async fn entries(State(shared): St, RawQuery(raw): RawQuery) -> ApiResult<Entries> {
    let q = query(raw)?;
    let c = q
        .get("customer")
        .map(|c| customer(c, "customer"))
        .transpose()?;
    let after = number(&q, "after", 0)?;
    let limit = number(&q, "limit", 100)?;
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            "limit must be 1 to 1000",
        ));
    }
    let limit = limit as usize;
    let rows = blocking(&shared, move |s| s.store.entries(c.as_ref(), after, limit)).await?;
    let next_after = rows.last().map(|(p, _)| *p);
    Ok(axum::Json(Entries {
        has_more: rows.len() == limit,
        data: rows.iter().map(|(p, t)| Entry::of(*p, t)).collect(),
        next_after,
    }))
}

/// The ledger verification report.
#[derive(Serialize, ToSchema)]
pub struct VerifyBody {
    /// True when every invariant holds.
    pub ok: bool,
    /// Accounts checked.
    pub accounts: u64,
    /// Transfers checked.
    pub transfers: u64,
    /// Units checked.
    pub units: u64,
    /// Batches recorded.
    pub batches: u64,
    /// Violations found.
    pub violation_count: u64,
    /// The first violations.
    pub violations: Vec<String>,
}

impl From<VerifyReport> for VerifyBody {
    fn from(r: VerifyReport) -> Self {
        VerifyBody {
            ok: r.ok,
            accounts: r.accounts,
            transfers: r.transfers,
            units: r.units,
            batches: r.batches,
            violation_count: r.violation_count,
            violations: r.violations,
        }
    }
}

#[utoipa::path(get, path = "/v1/ledger/verify", tag = "ledger", responses((status = 200, body = VerifyBody)))]
async fn verify(State(shared): St) -> ApiResult<VerifyBody> {
    let r = blocking(&shared, |s| s.verify()).await?;
    Ok(axum::Json(r.into()))
}

// ---------------------------------------------------------------------------------------------
// Agents

/// One agent.
#[derive(Serialize, ToSchema)]
pub struct AgentBody {
    /// The agent id, 32 hex digits.
    pub id: String,
    /// Its public key, hex.
    pub public_key: String,
    /// When it enrolled, ms.
    pub registered_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// Last handshake or ack, ms.
    pub last_seen_ms: i64,
    /// Milliseconds since it was last seen.
    pub lag_ms: i64,
    /// Its latest epoch.
    pub epoch: Option<u64>,
    /// In that epoch, every seq up to this one is durable (the watermark).
    pub acked_seq: Option<u64>,
    /// The highest durable seq in that epoch.
    pub highest_seq: Option<u64>,
    /// Durable seqs above the watermark (a hole below them is still missing).
    pub pending_above_watermark: Option<u64>,
}

/// Every agent.
#[derive(Serialize, ToSchema)]
pub struct Agents {
    /// The agents.
    pub data: Vec<AgentBody>,
}

#[utoipa::path(get, path = "/v1/agents", tag = "agents", responses((status = 200, body = Agents)))]
async fn agents(State(shared): St) -> ApiResult<Agents> {
    let (agents, epochs) =
        blocking(&shared, |s| Ok((s.store.agents()?, s.store.epochs()?))).await?;
    let now = now_ms();
    let data = agents
        .into_iter()
        .map(|a| {
            let live = shared.live_info(a.id);
            let latest = epochs
                .iter()
                .filter(|e| e.agent == a.id)
                .max_by_key(|e| e.epoch);
            let last_seen_ms = live.last_seen_ms.max(a.last_seen_ms);
            AgentBody {
                id: a.id.to_string(),
                public_key: hex::encode(a.public_key),
                registered_at_ms: a.registered_at_ms,
                revoked_at_ms: a.revoked_at_ms,
                last_seen_ms,
                lag_ms: now.saturating_sub(last_seen_ms),
                epoch: latest.map(|e| e.epoch),
                acked_seq: latest.map(|e| e.dedup.watermark),
                highest_seq: latest.map(|e| e.dedup.highest()),
                pending_above_watermark: latest.map(|e| e.dedup.above.len() as u64),
            }
        })
        .collect();
    Ok(axum::Json(Agents { data }))
}

/// The answer to a revocation.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    /// The agent id.
    pub id: String,
    /// Always true.
    pub revoked: bool,
}

#[utoipa::path(post, path = "/v1/agents/{id}/revoke", tag = "agents", params(("id" = String, Path, description = "32 hex digits")),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn revoke(State(shared): St, Path(id): Path<String>) -> ApiResult<Revoked> {
    let agent = AgentId::from_hex(&id).ok_or_else(|| {
        ApiError::invalid("invalid_agent_id", "id", "an agent id is 32 hex digits")
    })?;
    if !blocking(&shared, move |s| s.revoke(agent)).await? {
        return Err(ApiError::not_found(
            "resource_missing",
            format!("no agent {id}"),
        ));
    }
    tracing::info!(agent = %agent, "agent revoked");
    Ok(axum::Json(Revoked {
        id: agent.to_string(),
        revoked: true,
    }))
}

// ---------------------------------------------------------------------------------------------
// Adjustments

/// An adjustment request.
#[derive(Deserialize, ToSchema)]
pub struct AdjustmentRequest {
    /// The customer.
    pub customer: Option<String>,
    /// The meter.
    pub meter: Option<String>,
    /// Signed decimal string: added to the usage (negative reduces it).
    #[schema(value_type = String)]
    pub quantity: Option<serde_json::Value>,
    /// Why (kept with the transfer).
    pub reason: Option<String>,
    /// Makes retries safe: the same key with the same fields answers the same adjustment.
    pub idempotency_key: Option<String>,
    /// `YYYY-MM`; default the current month (UTC).
    pub period: Option<String>,
    /// Dimension set to adjust; default none.
    #[serde(default)]
    pub dimensions: BTreeMap<String, String>,
}

/// A posted adjustment.
#[derive(Serialize, ToSchema)]
pub struct AdjustmentBody {
    /// The transfer id, 32 hex digits.
    pub id: String,
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// The period.
    pub period: String,
    /// The signed quantity.
    #[schema(value_type = String)]
    pub quantity: Decimal,
    /// Why.
    pub reason: String,
    /// The idempotency key.
    pub idempotency_key: String,
    /// False when this answers a retry of an adjustment posted earlier.
    pub created: bool,
}

const MAX_REASON_BYTES: usize = 1024;
const MAX_KEY_BYTES: usize = 255;

#[utoipa::path(post, path = "/v1/adjustments", tag = "ledger", request_body = AdjustmentRequest,
    responses((status = 200, body = AdjustmentBody), (status = 400, body = ErrorBody)))]
async fn adjust(State(shared): St, body: Bytes) -> ApiResult<AdjustmentBody> {
    let r: AdjustmentRequest = json_body(&body)?;
    let c = customer(
        r.customer
            .as_deref()
            .ok_or_else(|| ApiError::missing("customer"))?,
        "customer",
    )?;
    let m = meter_name(
        r.meter
            .as_deref()
            .ok_or_else(|| ApiError::missing("meter"))?,
        "meter",
    )?;
    let quantity = decimal(
        r.quantity.as_ref().unwrap_or(&serde_json::Value::Null),
        "quantity",
    )?;
    let reason = r.reason.ok_or_else(|| ApiError::missing("reason"))?;
    let key = r
        .idempotency_key
        .ok_or_else(|| ApiError::missing("idempotency_key"))?;
    if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::invalid(
            "invalid_reason",
            "reason",
            "reason must be 1 to 1024 bytes",
        ));
    }
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "invalid_idempotency_key",
            "idempotency_key",
            "idempotency_key must be 1 to 255 bytes without control characters",
        ));
    }
    if quantity.is_zero() {
        return Err(ApiError::invalid(
            "invalid_quantity",
            "quantity",
            "quantity must not be zero",
        ));
    }
    let p = period(r.period.as_ref())?.unwrap_or_else(|| Period::of_ms(now_ms()));
    let dimensions =
        Dimensions::from_strs(r.dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| ApiError::invalid("invalid_dimensions", "dimensions", e.to_string()))?;
    let adj = Adjustment {
        customer: c,
        meter: m,
        dimensions,
        period: p,
        quantity,
        reason,
        idempotency_key: key,
    };
    let a2 = adj.clone();
    let outcome = blocking(&shared, move |s| s.adjust(&a2)).await?;
    let answer = |t: &Transfer, created| AdjustmentBody {
        id: format!("{:032x}", t.id),
        customer: adj.customer.to_string(),
        meter: adj.meter.to_string(),
        period: adj.period.to_string(),
        quantity: adj.quantity,
        reason: adj.reason.clone(),
        idempotency_key: adj.idempotency_key.clone(),
        created,
    };
    match outcome {
        AdjustOutcome::Created(t) => Ok(axum::Json(answer(&t, true))),
        AdjustOutcome::Exists(t) => Ok(axum::Json(answer(&t, false))),
        AdjustOutcome::ExistsWithDifferent(field) => Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "idempotency_error",
            code: "idempotency_key_in_use",
            message: format!("idempotency_key was used for an adjustment with a different {field}"),
            param: Some(String::from("idempotency_key")),
        }),
        AdjustOutcome::Rejected(r) => {
            let (code, param) = match r.code {
                tally_protocol::error::ErrorCode::UnknownMeter => ("unknown_meter", "meter"),
                _ => ("invalid_quantity", "quantity"),
            };
            Err(ApiError::invalid(code, param, r.message))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quarantine, metrics, health, openapi

/// A quarantined batch.
#[derive(Serialize, ToSchema)]
pub struct QuarantineBody {
    /// Position in the quarantine.
    pub id: u64,
    /// The agent.
    pub agent: String,
    /// The epoch.
    pub epoch: u64,
    /// The seq.
    pub seq: u64,
    /// The reason's code (`unknown_meter`, `invalid_delta`, `overflow`).
    pub code: String,
    /// The delta at fault, if one is.
    pub row: Option<u32>,
    /// Detail.
    pub message: String,
    /// When it was received, ms.
    pub received_at_ms: i64,
    /// The signed batch body, hex (verifiable with the agent's key).
    pub body_hex: String,
    /// The signature, hex.
    pub signature_hex: String,
}

/// Quarantined batches.
#[derive(Serialize, ToSchema)]
pub struct Quarantine {
    /// The batches.
    pub data: Vec<QuarantineBody>,
}

#[utoipa::path(get, path = "/v1/quarantine", tag = "ledger",
    params(("after" = Option<u64>, Query), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = Quarantine)))]
async fn quarantine(State(shared): St, RawQuery(raw): RawQuery) -> ApiResult<Quarantine> {
    let q = query(raw)?;
    let after = number(&q, "after", 0)?;
    let limit = number(&q, "limit", 100)?.clamp(1, MAX_PAGE) as usize;
    let rows = blocking(&shared, move |s| s.store.quarantined(after, limit)).await?;
    let data = rows
        .into_iter()
        .map(|r: QuarantineRecord| QuarantineBody {
            id: r.id,
            agent: r.agent.to_string(),
            epoch: r.epoch,
            seq: r.seq,
            code: r.rejection.code.name().to_owned(),
            row: r.rejection.row,
            message: r.rejection.message,
            received_at_ms: r.received_at_ms,
            body_hex: hex::encode(&*r.batch.body),
            signature_hex: hex::encode(r.batch.signature.0),
        })
        .collect();
    Ok(axum::Json(Quarantine { data }))
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text exposition")))]
async fn metrics(State(shared): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
        .into_response()
}

/// Liveness.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always true.
    pub ok: bool,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", security(), responses((status = 200, body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { ok: true })
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally collector admin API", description = "Usage, meters, ledger, agents, Stripe forwarding. Errors in Stripe's shape. Bearer admin token."),
    paths(usage, customer_usage, list_meters, put_meter, entries, verify, agents, revoke, adjust, quarantine, metrics, healthz,
        stripe_routes::put_customer, stripe_routes::list_outbox, stripe_routes::retry_outbox, stripe_routes::webhook, stripe_routes::reconciliation),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "admin_token",
            Vec::<String>::new(),
        )]);
    }
}

/// The OpenAPI document of this API.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(openapi_doc())
}
