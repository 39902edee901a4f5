//! Errors in Stripe's shape, the parsing helpers every route shares, and running store calls
//! off the async workers.

use crate::core::ledger::Period;
use crate::store::StoreError;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::str::FromStr;

use tally_protocol::names::{CustomerId, MeterName};
use utoipa::ToSchema;

/// An error in Stripe's shape.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
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
    /// A destination name field (`orb_event_name`, `metronome_customer_id`, …) of a `PUT`:
    /// absent keeps the stored one (`None`), `""` removes it (`Some(None)`), else 1 to 255 bytes
    /// without control characters.
    pub(crate) fn dest_name(
        v: Option<&String>,
        param: &str,
    ) -> Result<Option<Option<String>>, ApiError> {
        match v {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(Some(None)),
            Some(s) if s.len() <= 255 && !s.chars().any(char::is_control) => {
                Ok(Some(Some(s.clone())))
            }
            Some(_) => Err(ApiError::invalid(
                "invalid_destination_name",
                param,
                format!(
                    "{param} must be 1 to 255 bytes without control characters (\"\" removes it)"
                ),
            )),
        }
    }

    pub(crate) fn invalid(code: &'static str, param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    pub(crate) fn missing(param: &str) -> Self {
        Self::invalid("parameter_missing", param, format!("{param} is required"))
    }

    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param: None,
        }
    }

    pub(crate) fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: "invalid_api_key",
            message: String::from("a valid admin token is required: Authorization: Bearer <token>"),
            param: None,
        }
    }
}

impl ApiError {
    /// A failure of the collector itself (no store involved); nothing was changed.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "internal error in admin api");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "api_error",
            code: "internal_error",
            message,
            param: None,
        }
    }

    /// A store call's task panicked or was cancelled: answered as a store failure.
    pub(crate) fn task_failed(e: &tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "store task failed in admin api");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "api_error",
            code: "storage_error",
            message: String::from("the store failed; nothing was changed"),
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

pub(crate) type ApiResult<T> = Result<axum::Json<T>, ApiError>;

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        code: "method_not_allowed",
        message: String::from("this route does not take that method"),
        param: None,
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError::not_found("resource_missing", "no such route")
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers

pub(crate) fn query(raw: Option<String>) -> Result<HashMap<String, String>, ApiError> {
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

pub(crate) fn percent_decode(s: &str) -> Option<String> {
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

pub(crate) fn customer(s: &str, param: &str) -> Result<CustomerId, ApiError> {
    CustomerId::new(s).map_err(|e| ApiError::invalid("invalid_customer", param, e.to_string()))
}

pub(crate) fn meter_name(s: &str, param: &str) -> Result<MeterName, ApiError> {
    MeterName::new(s).map_err(|e| ApiError::invalid("invalid_meter", param, e.to_string()))
}

pub(crate) fn period(s: Option<&String>) -> Result<Option<Period>, ApiError> {
    s.map(|p| {
        Period::parse(p)
            .ok_or_else(|| ApiError::invalid("invalid_period", "period", "period must be YYYY-MM"))
    })
    .transpose()
}

pub(crate) fn number(
    q: &HashMap<String, String>,
    name: &str,
    default: u64,
) -> Result<u64, ApiError> {
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

pub(crate) fn json_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
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
pub(crate) fn decimal(v: &serde_json::Value, param: &str) -> Result<Decimal, ApiError> {
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

/// Most rows one page of a listing may ask for.
pub(crate) const MAX_PAGE: u64 = 1000;
