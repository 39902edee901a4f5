//! Stripe-compatible `POST /v1/billing/meter_events`: the form encoding Stripe's SDKs send
//! (`payload[stripe_customer_id]=…`, brackets as they are), answers in Stripe's shapes.

use crate::mapping::{IngestCatalog, MappedEvent};
use crate::quantity::parse_quantity;
use serde::Serialize;
use std::collections::BTreeMap;
use tally_protocol::names::{CustomerId, DimensionKey, DimensionValue, Dimensions};

/// Longest `identifier` Stripe accepts.
pub const MAX_IDENTIFIER_CHARS: usize = 100;
/// How far back a timestamp may be, as Stripe allows: 35 days.
pub const MAX_PAST_S: i64 = 35 * 24 * 3600;
/// How far ahead a timestamp may be, as Stripe allows: 5 minutes.
pub const MAX_FUTURE_S: i64 = 5 * 60;

/// An error in Stripe's shape: `{"error":{"type","code","message","param"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct StripeError {
    /// Always `invalid_request_error` here.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Stripe's error code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The parameter at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl StripeError {
    fn new(code: &'static str, param: Option<&str>, message: String) -> Self {
        StripeError {
            kind: "invalid_request_error",
            code,
            message,
            param: param.map(str::to_string),
        }
    }

    fn missing(param: &str) -> Self {
        Self::new(
            "parameter_missing",
            Some(param),
            format!("Missing required param: {param}."),
        )
    }

    fn invalid(param: &str, why: &str) -> Self {
        Self::new(
            "parameter_invalid_string",
            Some(param),
            format!("Invalid {param}: {why}"),
        )
    }

    /// The JSON body Stripe sends with this error.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }
}

/// Stripe's `billing.meter_event` object, as the API answers a create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterEventObject {
    /// `"billing.meter_event"`.
    pub object: &'static str,
    /// When we accepted it, Unix seconds.
    pub created: i64,
    /// The event name.
    pub event_name: String,
    /// The identifier given, or the one we made.
    pub identifier: String,
    /// Always false for the sidecar.
    pub livemode: bool,
    /// The payload as sent.
    pub payload: BTreeMap<String, String>,
    /// Event time, Unix seconds.
    pub timestamp: i64,
}

/// A parsed and mapped meter event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// What to record durably.
    pub event: MappedEvent,
    /// What to answer.
    pub object: MeterEventObject,
}

/// Decodes `application/x-www-form-urlencoded`, refusing invalid UTF-8 instead of replacing it.
fn decode_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    let decode = |s: &[u8]| -> Option<String> {
        let plus: Vec<u8> = s
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        percent_encoding::percent_decode(&plus)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    body.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |&b| b == b'=');
            let k = decode(it.next().unwrap_or_default())?;
            let v = decode(it.next().unwrap_or_default())?;
            Some((k, v))
        })
        .collect()
}

/// Parses a form body. `idempotency_key` is the request's `Idempotency-Key` header, the dedup
/// key when no `identifier` is given (Stripe's SDKs send one on every POST and reuse it on
/// retries); `fresh_id` names an event that has neither.
pub fn parse(
    body: &[u8],
    catalog: &IngestCatalog,
    now_s: i64,
    idempotency_key: Option<&str>,
    fresh_id: impl FnOnce() -> String,
) -> Result<Accepted, StripeError> {
    let pairs = decode_form(body).ok_or_else(|| {
        StripeError::new(
            "parameter_invalid_string",
            None,
            String::from("Invalid form body: expected application/x-www-form-urlencoded UTF-8."),
        )
    })?;
    let mut event_name = None;
    let mut identifier = None;
    let mut timestamp = None;
    let mut payload = BTreeMap::new();
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "event_name" => &mut event_name,
            "identifier" => &mut identifier,
            "timestamp" => &mut timestamp,
            _ => match k.strip_prefix("payload[").and_then(|r| r.strip_suffix(']')) {
                Some(inner) if !inner.is_empty() && !inner.contains(['[', ']']) => {
                    payload.insert(inner.to_string(), v);
                    continue;
                }
                _ => {
                    return Err(StripeError::new(
                        "parameter_unknown",
                        Some(&k),
                        format!("Received unknown parameter: {k}"),
                    ));
                }
            },
        };
        *slot = Some(v);
    }
    let event_name = event_name
        .filter(|s| !s.is_empty())
        .ok_or_else(|| StripeError::missing("event_name"))?;
    let meter = catalog.for_stripe_event(&event_name).ok_or_else(|| {
        StripeError::new(
            "resource_missing",
            Some("event_name"),
            format!("No active meter was found with event_name {event_name:?}."),
        )
    })?;
    let customer_key = payload
        .get("stripe_customer_id")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| StripeError::missing("payload[stripe_customer_id]"))?;
    let customer = CustomerId::new(customer_key.as_str())
        .map_err(|e| StripeError::invalid("payload[stripe_customer_id]", &e.to_string()))?;
    let quantity = match (payload.get("value"), meter.aggregation) {
        (Some(v), _) => {
            parse_quantity(v).map_err(|e| StripeError::invalid("payload[value]", &e.to_string()))?
        }
        (None, tally_protocol::catalog::Aggregation::Count) => rust_decimal::Decimal::ONE,
        (None, _) => return Err(StripeError::missing("payload[value]")),
    };
    let timestamp_s = match timestamp {
        None => now_s,
        Some(t) => t
            .parse::<i64>()
            .map_err(|_| StripeError::invalid("timestamp", "must be an integer Unix timestamp"))?,
    };
    if timestamp_s < now_s - MAX_PAST_S || timestamp_s > now_s + MAX_FUTURE_S {
        return Err(StripeError::new(
            "timestamp_out_of_range",
            Some("timestamp"),
            String::from(
                "Timestamp must be within the past 35 calendar days and no more than 5 minutes in the future.",
            ),
        ));
    }
    if let Some(id) = &identifier
        && (id.is_empty() || id.chars().count() > MAX_IDENTIFIER_CHARS)
    {
        return Err(StripeError::invalid(
            "identifier",
            "must be 1 to 100 characters",
        ));
    }
    // Payload keys named like the meter's dimensions become dimensions; Stripe itself ignores
    // payload keys it has no use for, and so do we.
    let mut dims = Vec::new();
    for (k, v) in &payload {
        if k == "stripe_customer_id" || k == "value" || !meter.has_dimension(k) {
            continue;
        }
        let key = DimensionKey::new(k.as_str())
            .map_err(|e| StripeError::invalid(&format!("payload[{k}]"), &e.to_string()))?;
        let val = DimensionValue::new(v.as_str())
            .map_err(|e| StripeError::invalid(&format!("payload[{k}]"), &e.to_string()))?;
        dims.push((key, val));
    }
    let dimensions =
        Dimensions::new(dims).map_err(|e| StripeError::invalid("payload", &e.to_string()))?;
    let (dedup_id, shown_id) = match (&identifier, idempotency_key) {
        (Some(id), _) => (format!("stripe:{id}"), id.clone()),
        (None, Some(key)) if !key.is_empty() && key.len() <= 255 => {
            let id = fresh_id();
            (format!("stripe-idem:{key}"), id)
        }
        _ => {
            let id = fresh_id();
            (format!("stripe:{id}"), id)
        }
    };
    Ok(Accepted {
        event: MappedEvent {
            customer,
            meter: meter.name.clone(),
            dimensions,
            quantity,
            timestamp_ms: timestamp_s.saturating_mul(1000),
            id: Some(dedup_id),
        },
        object: MeterEventObject {
            object: "billing.meter_event",
            created: now_s,
            event_name,
            identifier: shown_id,
            livemode: false,
            payload,
            timestamp: timestamp_s,
        },
    })
}
