//! Orb's side of the local decimal server ([`crate::ledger_feed::fake::FakeDest`]): ingest
//! (window by the grace period, or a backfill's timeframe), backfills and event search.

use std::collections::{BTreeMap, HashMap};

use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use crate::ledger_feed::Engine;
use crate::ledger_feed::fake::{
    Backfill, FakeEvent, Inner, accept, decimal_text, error, flat_property, json_response,
    numbers_as_strings,
};
use crate::time::{parse_rfc3339, rfc3339};

/// `POST /v1/ingest` (with `?backfill_id=` into a backfill).
pub(crate) fn ingest(g: &mut Inner, text: &str, query: &str, now: i64) -> Response {
    let kind = Engine::Orb;
    let Ok(v) = serde_json::from_str::<Value>(&numbers_as_strings(text)) else {
        return error(kind, 400, "malformed json", None);
    };
    let Some(events) = v.get("events").and_then(Value::as_array) else {
        return error(kind, 400, "events: required array", None);
    };
    if events.len() > 500 {
        return error(kind, 400, "at most 500 events per request", None);
    }
    let backfill_id = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("backfill_id="))
        .map(str::to_owned);
    let window = match &backfill_id {
        Some(id) => match g.backfills.iter().find(|b| &b.id == id) {
            Some(b) if b.status == "pending" => Some((b.start_s, b.end_s)),
            _ => return error(kind, 400, "backfill is not pending", None),
        },
        None => None,
    };
    let mut seen: HashMap<String, &Value> = HashMap::new();
    for e in events {
        if let Some(k) = e.get("idempotency_key").and_then(Value::as_str)
            && let Some(prev) = seen.insert(k.to_owned(), e)
            && prev != e
        {
            return error(
                kind,
                400,
                "two events with one idempotency_key and different bodies",
                None,
            );
        }
    }
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for e in events {
        let key = e
            .get("idempotency_key")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        match event(e, g.grace_s, window, now) {
            Ok(mut fe) => {
                fe.backfill = backfill_id.clone();
                ok.push(fe);
            }
            Err(why) => failed.push(json!({"idempotency_key": key, "validation_errors": [why]})),
        }
    }
    g.requests.push((events.len(), backfill_id));
    // Unconfirmed in the wire facts whether valid events of a refused request are ingested:
    // this server ingests them (the harder case for a sender: its resend meets dedup).
    for e in ok {
        accept(g, e);
    }
    if failed.is_empty() {
        json_response(200, &json!({"validation_failed": []}))
    } else {
        error(
            kind,
            400,
            "some events failed validation",
            Some(Value::Array(failed)),
        )
    }
}

fn event(
    e: &Value,
    grace_s: i64,
    window: Option<(i64, i64)>,
    now_ms: i64,
) -> Result<FakeEvent, String> {
    let o = e.as_object().ok_or("event must be an object")?;
    let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    let name = s("event_name").ok_or("event_name required")?;
    let key = s("idempotency_key").ok_or("idempotency_key required")?;
    let ts = s("timestamp").ok_or("timestamp required")?;
    let ts = parse_rfc3339(&ts).ok_or("timestamp must be ISO 8601")?;
    let customer = match (s("customer_id"), s("external_customer_id")) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("exactly one of customer_id, external_customer_id".into());
        }
        (Some(c), None) | (None, Some(c)) => c,
    };
    let props = o
        .get("properties")
        .and_then(Value::as_object)
        .ok_or("properties required")?;
    let mut properties = BTreeMap::new();
    let mut value = None;
    for (k, v) in props {
        let flat = flat_property(v).ok_or_else(|| format!("property {k} must be flat"))?;
        if k == "value" {
            value = decimal_text(v);
        } else {
            properties.insert(k.clone(), flat);
        }
    }
    let now_s = now_ms / 1000;
    match window {
        Some((start, end)) => {
            if ts < start || ts >= end {
                return Err("timestamp outside the backfill's timeframe".into());
            }
        }
        None => {
            if ts < now_s - grace_s {
                return Err("timestamp older than the grace period".into());
            }
        }
    }
    if ts > now_s + 300 {
        return Err("timestamp more than 5 minutes ahead".into());
    }
    Ok(FakeEvent {
        key,
        customer,
        event_name: name,
        timestamp_s: ts,
        value: value.unwrap_or_default(),
        properties,
        backfill: None,
    })
}

/// `POST /v1/events/backfills`.
pub(crate) fn create_backfill(g: &mut Inner, text: &str, h: &HeaderMap) -> Response {
    let kind = Engine::Orb;
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return error(kind, 400, "malformed json", None);
    };
    let t = |k: &str| v.get(k).and_then(Value::as_str).and_then(parse_rfc3339);
    let (Some(start), Some(end)) = (t("timeframe_start"), t("timeframe_end")) else {
        return error(
            kind,
            400,
            "timeframe_start and timeframe_end required",
            None,
        );
    };
    if end <= start || end - start > 31 * 86_400 {
        return error(kind, 400, "a backfill spans at most 31 days", None);
    }
    let idem = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(k) = &idem {
        if k.len() > 64 {
            return error(kind, 400, "Idempotency-Key longer than 64 characters", None);
        }
        if let Some(b) = g
            .backfills
            .iter()
            .find(|b| b.idem.as_ref().is_some_and(|(ik, _)| ik == k))
        {
            if b.idem.as_ref().is_some_and(|(_, body)| body == text) {
                let status = if b.status == "closing" {
                    "pending"
                } else {
                    b.status
                };
                return json_response(200, &json!({"id": b.id, "status": status}));
            }
            return error(
                kind,
                409,
                "Idempotency-Key reused with different parameters",
                None,
            );
        }
    }
    if g.backfills
        .iter()
        .any(|b| b.status != "reflected" && b.start_s < end && start < b.end_s)
    {
        return error(kind, 409, "overlaps a pending backfill", None);
    }
    let id = format!("bf_{}", g.backfills.len() + 1);
    g.backfills.push(Backfill {
        id: id.clone(),
        start_s: start,
        end_s: end,
        status: "pending",
        reflect_at_ms: 0,
        idem: idem.map(|k| (k, text.to_owned())),
    });
    json_response(201, &json!({"id": id, "status": "pending"}))
}

/// `POST /v1/events/search`.
pub(crate) fn search(g: &Inner, text: &str) -> Response {
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    let Some(ids) = v.get("event_ids").and_then(Value::as_array) else {
        return error(Engine::Orb, 400, "event_ids required", None);
    };
    let data: Vec<Value> = ids
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|id| g.events.get(id))
        .map(|e| {
            let mut props = serde_json::Map::new();
            props.insert("value".into(), Value::String(e.value.to_string()));
            for (k, v) in &e.properties {
                props.insert(k.clone(), Value::String(v.clone()));
            }
            json!({"id": e.key, "customer_id": null, "external_customer_id": e.customer,
                   "event_name": e.event_name, "timestamp": rfc3339(e.timestamp_s),
                   "properties": props, "deprecated": false})
        })
        .collect();
    json_response(200, &json!({ "data": data }))
}

/// `GET /v1/events/backfills/{id}` and `POST …/{id}/close`.
pub(crate) fn backfill(g: &mut Inner, m: &str, p: &str, now: i64) -> Response {
    let rest = &p["/v1/events/backfills/".len()..];
    let (id, close) = match rest.strip_suffix("/close") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    let delay = g.reflect_delay_ms;
    let Some(b) = g.backfills.iter_mut().find(|b| b.id == id) else {
        return error(Engine::Orb, 404, "no such backfill", None);
    };
    if close {
        if m != "POST" {
            return error(Engine::Orb, 405, "method", None);
        }
        if b.status == "pending" {
            b.status = "closing";
            b.reflect_at_ms = now + delay;
        }
    }
    let status = if b.status == "closing" {
        "pending"
    } else {
        b.status
    };
    json_response(
        200,
        &json!({"id": b.id, "status": status,
        "timeframe_start": rfc3339(b.start_s), "timeframe_end": rfc3339(b.end_s)}),
    )
}
