//! `POST /v1/adjustments`: operator corrections, idempotent by key.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::ledger::{Adjustment, Period, Transfer};
use crate::store::AdjustOutcome;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tally_protocol::names::Dimensions;
use utoipa::ToSchema;

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

pub(crate) const MAX_REASON_BYTES: usize = 1024;
pub(crate) const MAX_KEY_BYTES: usize = 255;

#[utoipa::path(post, path = "/v1/adjustments", tag = "ledger", request_body = AdjustmentRequest,
    responses((status = 200, body = AdjustmentBody), (status = 400, body = ErrorBody)))]
pub(super) async fn adjust(State(shared): St, body: Bytes) -> ApiResult<AdjustmentBody> {
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
    let p = period(r.period.as_ref())?.unwrap_or_else(|| Period::of_ms(shared.now_ms()));
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
