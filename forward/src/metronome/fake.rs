//! Metronome's side of the local decimal server ([`crate::ledger_feed::fake::FakeDest`]):
//! ingest (a bare array, 34 days back, 24 hours ahead) and usage by day.

use axum::response::Response;
use serde_json::{Value, json};

use crate::ledger_feed::Engine;
use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::ledger_feed::fake::{FakeEvent, Inner, accept, error, json_response};
use crate::time::{parse_rfc3339, rfc3339};

/// `POST /v1/ingest`: a bare array.
pub(crate) fn ingest(g: &mut Inner, text: &str, now: i64) -> Response {
    let kind = Engine::Metronome;
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return error(kind, 400, "malformed json", None);
    };
    let Some(events) = v.as_array() else {
        return error(kind, 400, "body must be an array of events", None);
    };
    if events.is_empty() || events.len() > 100 {
        return error(kind, 400, "between 1 and 100 events per request", None);
    }
    let now_s = now / 1000;
    let mut ok = Vec::new();
    for e in events {
        let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(tid), Some(customer), Some(et), Some(ts)) = (
            s("transaction_id"),
            s("customer_id"),
            s("event_type"),
            s("timestamp"),
        ) else {
            return error(
                kind,
                400,
                "transaction_id, customer_id, event_type, timestamp required",
                None,
            );
        };
        if tid.is_empty() || tid.len() > 128 {
            return error(kind, 400, "transaction_id must be 1-128 characters", None);
        }
        let Some(ts) = parse_rfc3339(&ts) else {
            return error(kind, 400, "timestamp must be RFC 3339", None);
        };
        if ts < now_s - 34 * 86_400 {
            return error(kind, 400, "timestamp older than 34 days", None);
        }
        if ts > now_s + 86_400 {
            return error(kind, 400, "timestamp more than 24 hours ahead", None);
        }
        let Some(props) = e.get("properties").and_then(Value::as_object) else {
            return error(kind, 400, "properties must be an object", None);
        };
        let mut properties = BTreeMap::new();
        let mut value = Decimal::ZERO;
        for (k, pv) in props {
            if k == "value" {
                let Some(d) = pv.as_str().and_then(|x| x.parse::<Decimal>().ok()) else {
                    return error(kind, 400, "value must be a decimal string", None);
                };
                value = d;
            } else if let Some(x) = pv.as_str() {
                properties.insert(k.clone(), x.to_owned());
            }
        }
        ok.push(FakeEvent {
            key: tid,
            customer,
            event_name: et,
            timestamp_s: ts,
            value,
            properties,
            backfill: None,
        });
    }
    g.requests.push((ok.len(), None));
    for e in ok {
        accept(g, e);
    }
    json_response(200, &json!({}))
}

/// `POST /v1/usage`, by day.
pub(crate) fn usage(g: &Inner, text: &str) -> Response {
    let kind = Engine::Metronome;
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    let t = |k: &str| v.get(k).and_then(Value::as_str).and_then(parse_rfc3339);
    let (Some(from), Some(to)) = (t("starting_on"), t("ending_before")) else {
        return error(kind, 400, "starting_on and ending_before required", None);
    };
    if v.get("window_size").and_then(Value::as_str) != Some("DAY") {
        return error(kind, 400, "window_size must be DAY here", None);
    }
    let mut sums: BTreeMap<(String, String, i64), Decimal> = BTreeMap::new();
    for e in g.events.values() {
        if e.timestamp_s >= from && e.timestamp_s < to {
            let day = crate::time::day_start(e.timestamp_s);
            *sums
                .entry((e.customer.clone(), e.event_name.clone(), day))
                .or_insert(Decimal::ZERO) += e.value;
        }
    }
    let data: Vec<Value> = sums
        .into_iter()
        .map(|((c, m, d), val)| {
            json!({"customer_id": c, "billable_metric_id": m,
                   "start_timestamp": rfc3339(d), "end_timestamp": rfc3339(d + 86_400),
                   "value": val.to_string()})
        })
        .collect();
    json_response(200, &json!({"data": data, "next_page": null}))
}
