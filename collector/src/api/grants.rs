//! `POST /v1/grants`: extra quantity of a meter for a customer, with a priority and effective
//! and expiry times; each grant is a ledger transfer, idempotent by its key.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::entitlements::{Grant, GrantRequest};
use crate::store::entitlements::GrantOutcome;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/grants`. Times are Unix seconds (Stripe's style).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// Positive decimal string.
    #[schema(value_type = String)]
    pub quantity: serde_json::Value,
    /// Lower is consumed first (default 0).
    #[serde(default)]
    pub priority: u32,
    /// From when it counts (default: now).
    pub effective_at: Option<i64>,
    /// When it stops counting (default: never).
    pub expires_at: Option<i64>,
    /// The idempotency key (printable ASCII, at most 255).
    pub idempotency_key: Option<String>,
}

/// A grant.
#[derive(Serialize, ToSchema)]
pub struct GrantAnswer {
    /// `grant_` + its ledger transfer id.
    pub id: String,
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// The quantity, a decimal string.
    pub quantity: String,
    /// Its priority.
    pub priority: u32,
    /// Unix seconds.
    pub effective_at: i64,
    /// Unix seconds, if it expires.
    pub expires_at: Option<i64>,
    /// The idempotency key.
    pub idempotency_key: String,
    /// Its ledger position.
    pub ledger_position: u64,
    /// Unix seconds.
    pub created: i64,
}

impl GrantAnswer {
    pub(crate) fn of(g: &Grant) -> Self {
        let r = &g.request;
        GrantAnswer {
            id: format!("grant_{:032x}", g.transfer_id),
            customer: r.customer.to_string(),
            meter: r.meter.to_string(),
            quantity: r.quantity.to_string(),
            priority: r.priority,
            effective_at: r.effective_at_ms.div_euclid(1000),
            expires_at: r.expires_at_ms.map(|e| e.div_euclid(1000)),
            idempotency_key: r.idempotency_key.clone(),
            ledger_position: g.position,
            created: g.created_at_ms.div_euclid(1000),
        }
    }
}

fn secs_to_ms(s: i64, param: &str) -> Result<i64, ApiError> {
    s.checked_mul(1000)
        .filter(|ms| *ms >= 0)
        .ok_or_else(|| ApiError::invalid("invalid_time", param, format!("{param} is out of range")))
}

#[utoipa::path(post, path = "/v1/grants", tag = "entitlements", request_body = GrantBody,
    responses((status = 200, body = GrantAnswer), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_grant(State(shared): St, body: Bytes) -> ApiResult<GrantAnswer> {
    let b: GrantBody = json_body(&body)?;
    let key = b
        .idempotency_key
        .clone()
        .ok_or_else(|| ApiError::missing("idempotency_key"))?;
    let effective_at_ms = match b.effective_at {
        Some(s) => secs_to_ms(s, "effective_at")?,
        None => shared.now_ms(),
    };
    let req = GrantRequest {
        customer: customer(&b.customer, "customer")?,
        meter: meter_name(&b.meter, "meter")?,
        quantity: decimal(&b.quantity, "quantity")?,
        priority: b.priority,
        effective_at_ms,
        expires_at_ms: b
            .expires_at
            .map(|s| secs_to_ms(s, "expires_at"))
            .transpose()?,
        idempotency_key: key,
    };
    req.check()
        .map_err(|e| ApiError::invalid("invalid_grant", "quantity", e.to_string()))?;
    let ent = shared.entitlements()?;
    let defaulted = b.effective_at.is_none();
    let outcome = blocking(&shared, move |_| {
        if defaulted {
            ent.grant_from_now(req)
        } else {
            ent.grant(&req)
        }
    })
    .await?;
    match outcome {
        GrantOutcome::Created(g) | GrantOutcome::Exists(g) => Ok(axum::Json(GrantAnswer::of(&g))),
        GrantOutcome::ExistsWithDifferent(field) => Err(ApiError {
            status: StatusCode::CONFLICT,
            kind: "idempotency_error",
            code: "idempotency_key_in_use",
            message: format!("idempotency_key was used for a grant with a different {field}"),
            param: Some(String::from("idempotency_key")),
        }),
        GrantOutcome::Rejected(r) => {
            let (code, param) = match r.code {
                tally_protocol::error::ErrorCode::UnknownMeter => ("unknown_meter", "meter"),
                _ => ("invalid_grant", "quantity"),
            };
            Err(ApiError::invalid(code, param, r.message))
        }
    }
}
