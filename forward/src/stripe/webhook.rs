//! Stripe webhooks: `Stripe-Signature` verification and an event handler idempotent by event id.
//!
//! Verification follows Stripe's scheme: the header carries `t=<unix seconds>` and one or more
//! `v1=<hex HMAC-SHA256>` entries (other schemes such as `v0` are ignored); the signed payload is
//! `"{t}.{body}"` keyed with the endpoint secret; any matching `v1` passes (secrets roll over);
//! comparison is constant-time (`hmac`'s `verify_slice`); `|now − t|` must be within the
//! tolerance (300 s by default).
//!
//! Handling: each event id is stored once ([`crate::stripe::outbox::OutboxStore::record_webhook`]);
//! a repeat is acknowledged and ignored. `v1.billing.meter.error_report_triggered` turns the
//! sample errors' identifiers into dead letters (Stripe only lists samples: the rest surface in
//! reconciliation); subscription and entitlement-summary events are stored for the entitlements
//! work; anything else is stored and ignored.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::secret::WebhookSecret;
use crate::stripe::outbox::{OutboxStore, StoreError, StripeError, WebhookRecord};

/// Stripe's default signature tolerance.
pub const DEFAULT_TOLERANCE_S: i64 = 300;

/// Why a webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The header has no `t=` or no `v1=`.
    #[error("malformed stripe-signature header")]
    MalformedHeader,
    /// `t` is outside the tolerance.
    #[error("timestamp outside the tolerance")]
    Expired,
    /// No `v1` signature matches.
    #[error("no matching v1 signature")]
    BadSignature,
    /// The body is not a Stripe event.
    #[error("body is not a stripe event: {0}")]
    BadBody(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Verifies a `Stripe-Signature` header against the raw body.
pub fn verify_webhook(
    header: &str,
    body: &[u8],
    secret: &WebhookSecret,
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), WebhookError> {
    let mut t: Option<i64> = None;
    let mut sigs: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => t = v.parse().ok(),
            // A v1 entry that is not hex can never match; skip it rather than fail the rest.
            "v1" => sigs.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let t = t.ok_or(WebhookError::MalformedHeader)?;
    if sigs.is_empty() {
        return Err(WebhookError::MalformedHeader);
    }
    if (now_s - t).abs() > tolerance_s {
        return Err(WebhookError::Expired);
    }
    for sig in sigs {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .map_err(|_| WebhookError::BadSignature)?;
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(WebhookError::BadSignature)
}

/// Computes a `Stripe-Signature` header (for tests and the fake server).
pub fn sign_webhook(body: &[u8], secret: &WebhookSecret, t: i64) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => return format!("t={t}"),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What handling did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Seen before; nothing done.
    Duplicate,
    /// Error report: this many of our groups became dead letters.
    DeadLettered(usize),
    /// Stored for later use (subscriptions, entitlement summaries).
    Stored,
    /// Stored, not used.
    Ignored,
}

/// Verifies and handles one webhook delivery: the body is processed only if the signature holds.
pub fn handle_webhook<S: OutboxStore + ?Sized>(
    store: &S,
    header: &str,
    body: &[u8],
    secret: &WebhookSecret,
    now_s: i64,
) -> Result<Handled, WebhookError> {
    verify_webhook(header, body, secret, now_s, DEFAULT_TOLERANCE_S)?;
    handle_event(store, body)
}

/// Handles a verified event body, idempotently by event id.
pub fn handle_event<S: OutboxStore + ?Sized>(
    store: &S,
    body: &[u8],
) -> Result<Handled, WebhookError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::BadBody(e.to_string()))?;
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| WebhookError::BadBody("no id".into()))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| WebhookError::BadBody("no type".into()))?;
    let created = match v.get("created") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => crate::time::parse_rfc3339(s).unwrap_or(0),
        _ => 0,
    };
    let record = WebhookRecord {
        id: id.to_owned(),
        event_type: kind.to_owned(),
        created,
        body: String::from_utf8_lossy(body).into_owned(),
    };
    if !store.record_webhook(record)? {
        return Ok(Handled::Duplicate);
    }
    if kind == "v1.billing.meter.error_report_triggered" {
        let mut n = 0;
        let types = v
            .pointer("/data/reason/error_types")
            .and_then(Value::as_array);
        for t in types.into_iter().flatten() {
            let code = t
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("meter_error");
            for s in t
                .get("sample_errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(identifier) = s.pointer("/request/identifier").and_then(Value::as_str)
                else {
                    continue;
                };
                let message = s
                    .get("error_message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let err = StripeError {
                    status: 0,
                    code: code.to_owned(),
                    message,
                };
                if store.mark_dead_by_identifier(identifier, err)? {
                    n += 1;
                }
            }
        }
        return Ok(Handled::DeadLettered(n));
    }
    if kind.starts_with("customer.subscription.") || kind.starts_with("entitlements.") {
        return Ok(Handled::Stored);
    }
    Ok(Handled::Ignored)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::stripe::outbox::{MemoryStore, NewGroup, NewOutboxRow, OutboxState};

    const NOW: i64 = 1_795_300_000;

    fn secret() -> WebhookSecret {
        WebhookSecret::new("whsec_test_secret")
    }

    #[test]
    fn valid_signature_passes() {
        let body = br#"{"id":"evt_1"}"#;
        let h = sign_webhook(body, &secret(), NOW);
        assert_eq!(verify_webhook(&h, body, &secret(), NOW + 10, 300), Ok(()));
    }

    #[test]
    fn wrong_secret_fails() {
        let body = br#"{"id":"evt_1"}"#;
        let h = sign_webhook(body, &WebhookSecret::new("whsec_other"), NOW);
        assert_eq!(
            verify_webhook(&h, body, &secret(), NOW, 300),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn expired_timestamp_fails() {
        let body = br#"{"id":"evt_1"}"#;
        let h = sign_webhook(body, &secret(), NOW - 301);
        assert_eq!(
            verify_webhook(&h, body, &secret(), NOW, 300),
            Err(WebhookError::Expired)
        );
        let h = sign_webhook(body, &secret(), NOW + 301);
        assert_eq!(
            verify_webhook(&h, body, &secret(), NOW, 300),
            Err(WebhookError::Expired)
        );
    }

    #[test]
    fn multiple_v1_entries_any_may_match() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign_webhook(body, &secret(), NOW);
        let good_sig = good.split(",v1=").nth(1).unwrap();
        let h = format!("t={NOW},v1={},v0=abc,v1={good_sig}", "00".repeat(32));
        assert_eq!(verify_webhook(&h, body, &secret(), NOW, 300), Ok(()));
        let bad = format!("t={NOW},v1={},v1=zz", "00".repeat(32));
        assert_eq!(
            verify_webhook(&bad, body, &secret(), NOW, 300),
            Err(WebhookError::BadSignature)
        );
        // a v0 signature alone is not accepted
        let v0 = format!("t={NOW},v0={good_sig}");
        assert_eq!(
            verify_webhook(&v0, body, &secret(), NOW, 300),
            Err(WebhookError::MalformedHeader)
        );
    }

    #[test]
    fn tampered_body_fails() {
        let body = br#"{"id":"evt_1","amount":1}"#;
        let h = sign_webhook(body, &secret(), NOW);
        let tampered = br#"{"id":"evt_1","amount":9}"#;
        assert_eq!(
            verify_webhook(&h, tampered, &secret(), NOW, 300),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_webhook("garbage", body, &secret(), NOW, 300),
            Err(WebhookError::MalformedHeader)
        );
    }

    #[test]
    fn error_report_dead_letters_idempotently() {
        let store = MemoryStore::with_namespace("w");
        let row = store
            .insert(NewOutboxRow {
                customer: "cus_a".into(),
                meter: "m".into(),
                stripe_event_name: "m".into(),
                timestamp_s: 60,
                value: 3,
            })
            .unwrap();
        let ident = crate::stripe::outbox::identifier_for("w", &[row], 0);
        store
            .create_groups(vec![NewGroup {
                identifier: ident.clone(),
                stripe_customer: "cus_a".into(),
                event_name: "m".into(),
                meter: "m".into(),
                timestamp_s: 60,
                value: 3,
                row_ids: vec![row],
            }])
            .unwrap();
        let body = serde_json::json!({
            "id": "evt_err_1", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
            "created": "2026-11-21T20:00:00.000Z",
            "data": {"reason": {"error_count": 2, "error_types": [{
                "code": "meter_event_no_customer_defined", "error_count": 2,
                "sample_errors": [
                    {"error_message": "Customer mapping key stripe_customer_id not found in payload.", "request": {"identifier": ident}},
                    {"error_message": "x", "request": {"identifier": "not-ours"}}
                ]}]}}
        })
        .to_string();
        let h = sign_webhook(body.as_bytes(), &secret(), NOW);
        assert_eq!(
            handle_webhook(&store, &h, body.as_bytes(), &secret(), NOW).unwrap(),
            Handled::DeadLettered(1)
        );
        assert_eq!(
            handle_webhook(&store, &h, body.as_bytes(), &secret(), NOW).unwrap(),
            Handled::Duplicate
        );
        let dead = store.list(OutboxState::Dead, 0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].error.as_ref().unwrap().code,
            "meter_event_no_customer_defined"
        );
        let sub = br#"{"id":"evt_sub","type":"customer.subscription.updated","created":1}"#;
        let h = sign_webhook(sub, &secret(), NOW);
        assert_eq!(
            handle_webhook(&store, &h, sub, &secret(), NOW).unwrap(),
            Handled::Stored
        );
        assert_eq!(store.webhooks().unwrap().len(), 2);
        // unsigned bodies are never processed
        assert!(handle_webhook(&store, "t=1,v1=00", sub, &secret(), NOW).is_err());
    }
}
