//! The two ingest wire formats and what an answer means, with no I/O (wire facts in
//! `forward/tests/data/forwarding.md`).
//!
//! - Orb: `{"events":[{event_name, idempotency_key, timestamp, properties, external_customer_id}]}`;
//!   `value` is a JSON number written from the exact `Decimal` digits (no float on our side).
//! - Metronome: a bare array of `{transaction_id, customer_id, event_type, timestamp,
//!   properties}` with `value` as a decimal **string** (Metronome's advice for precision).
//!
//! Dimensions travel as string properties beside `value`; a dimension named `value` is sent as
//! `dim_value` so it can never overwrite the quantity.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::{Engine, FwdGroup};
use crate::time::rfc3339;

/// One HTTP answer (the transport fills it in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// `Retry-After` seconds.
    pub retry_after_s: Option<u64>,
    /// Body.
    pub body: String,
}

/// What one ingest request's answer means for its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireOutcome {
    /// All delivered, except the keys listed (Orb's `validation_failed`), which are rejected.
    Delivered {
        /// Key → the destination's reason.
        rejected: BTreeMap<String, String>,
    },
    /// Try again later under the same keys.
    Retry {
        /// The least wait the destination asked for.
        after: Option<Duration>,
        /// The destination may have processed the request.
        unknown: bool,
        /// What it said.
        error: String,
    },
    /// The request was refused for its content: with one event, that event is dead; with
    /// several, the runner resends each alone to find which (same keys: harmless).
    Rejected(String),
}

/// `s` as a JSON string.
pub(crate) fn json_str(out: &mut String, s: &str) {
    // serde_json escapes a &str correctly and cannot fail on it.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\"")));
}

/// `{"value": …, dimension: …}`: the value as a JSON number or, with `value_as_string`, a string.
pub(crate) fn properties(out: &mut String, g: &FwdGroup, value_as_string: bool) {
    out.push_str("{\"value\":");
    let v = g.event.value.normalize().to_string();
    if value_as_string {
        json_str(out, &v);
    } else {
        out.push_str(&v);
    }
    for (k, val) in &g.event.dimensions {
        out.push(',');
        if k == "value" {
            json_str(out, "dim_value");
        } else {
            json_str(out, k);
        }
        out.push(':');
        json_str(out, val);
    }
    out.push('}');
}

/// The request body for `groups` (at most [`Engine::batch_max`]).
pub fn body(dest: Engine, groups: &[&FwdGroup]) -> String {
    assert!(groups.len() <= dest.batch_max(), "batch limit");
    let mut out = String::with_capacity(256 * groups.len() + 16);
    match dest {
        Engine::Orb => out.push_str("{\"events\":["),
        Engine::Metronome => out.push('['),
    }
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let ts = rfc3339(g.event.timestamp_s);
        match dest {
            Engine::Orb => crate::orb::write_event(&mut out, g, &ts),
            Engine::Metronome => crate::metronome::write_event(&mut out, g, &ts),
        }
    }
    match dest {
        Engine::Orb => out.push_str("]}"),
        Engine::Metronome => out.push(']'),
    }
    out
}

/// The destination's own words for an error body (RFC 7807 `detail`/`title` for Orb,
/// `message` for Metronome), bounded.
pub fn error_text(status: u16, body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let pick = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let msg = pick("detail")
        .or_else(|| pick("message"))
        .or_else(|| pick("title"))
        .unwrap_or_else(|| body.chars().take(300).collect());
    let mut s = format!("http {status}: {msg}");
    if let Some(ve) = v.get("validation_errors") {
        let _ = write!(s, " {ve}");
    }
    s.chars().take(500).collect()
}

/// Classifies one ingest answer (`None`: lost — timeout, dropped connection, unreadable body).
pub fn classify(dest: Engine, reply: Option<&Reply>) -> WireOutcome {
    let Some(r) = reply else {
        return WireOutcome::Retry {
            after: None,
            unknown: true,
            error: String::from("answer lost"),
        };
    };
    let s = r.status;
    if (200..300).contains(&s) {
        let rejected = match dest {
            Engine::Orb => crate::orb::validation_failed(&r.body),
            Engine::Metronome => BTreeMap::new(),
        };
        return WireOutcome::Delivered { rejected };
    }
    let error = error_text(s, &r.body);
    let after = r.retry_after_s.map(Duration::from_secs);
    match s {
        // Our key or its rights, a rate limit, a conflict on a header: never the events' fault.
        401 | 403 | 408 | 409 | 429 => WireOutcome::Retry {
            after,
            unknown: false,
            error,
        },
        s if s >= 500 => WireOutcome::Retry {
            after,
            unknown: true,
            error,
        },
        // 400, 404, 413, 422: content the destination refused.
        _ => WireOutcome::Rejected(error),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ledger_feed::NewFwdGroup;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn g(v: &str) -> FwdGroup {
        FwdGroup::new(
            1,
            NewFwdGroup {
                key: "tly-k-1".into(),
                customer: "acme".into(),
                dest_customer: "acme\"x".into(),
                meter: "tokens".into(),
                event_name: "llm_tokens".into(),
                timestamp_s: 1_764_670_500,
                value: Decimal::from_str(v).unwrap(),
                dimensions: BTreeMap::from([
                    ("model".into(), "gpt".into()),
                    ("value".into(), "v".into()),
                ]),
                positions: vec![1],
            },
        )
    }

    #[test]
    fn bodies_carry_exact_decimals() {
        let a = g("0.100000000000000000000000001");
        let orb: serde_json::Value = serde_json::from_str(&body(Engine::Orb, &[&a])).unwrap();
        let e = &orb["events"][0];
        assert_eq!(e["external_customer_id"], "acme\"x");
        assert_eq!(e["properties"]["dim_value"], "v");
        let raw = body(Engine::Orb, &[&a]);
        assert!(
            raw.contains("\"value\":0.100000000000000000000000001"),
            "{raw}"
        );
        let m = body(Engine::Metronome, &[&a, &g("-2.50")]);
        let mv: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(
            mv[0]["properties"]["value"],
            "0.100000000000000000000000001"
        );
        assert_eq!(mv[1]["properties"]["value"], "-2.5");
        assert_eq!(mv[0]["timestamp"], "2025-12-02T10:15:00Z");
    }

    #[test]
    fn classification() {
        let r = |status, body: &str| Reply {
            status,
            retry_after_s: None,
            body: body.into(),
        };
        assert!(matches!(
            classify(Engine::Orb, None),
            WireOutcome::Retry { unknown: true, .. }
        ));
        let ok = classify(
            Engine::Orb,
            Some(&r(
                200,
                r#"{"validation_failed":[{"idempotency_key":"k","validation_errors":["bad"]}]}"#,
            )),
        );
        assert_eq!(
            ok,
            WireOutcome::Delivered {
                rejected: BTreeMap::from([("k".into(), "[\"bad\"]".into())])
            }
        );
        assert!(matches!(
            classify(Engine::Metronome, Some(&r(429, ""))),
            WireOutcome::Retry { unknown: false, .. }
        ));
        assert!(matches!(
            classify(Engine::Metronome, Some(&r(503, ""))),
            WireOutcome::Retry { unknown: true, .. }
        ));
        assert_eq!(
            classify(
                Engine::Metronome,
                Some(&r(400, r#"{"message":"bad customer"}"#))
            ),
            WireOutcome::Rejected("http 400: bad customer".into())
        );
    }
}
