//! Every request the forwarder (and the reconciliation fetch) sends validates against Stripe's
//! published description, `forward/tests/data/billing-meters.openapi.json` (its README says where it
//! comes from and how to refresh it): path and method exist,
//! content type, required fields present, no unknown fields where `additionalProperties` is
//! false, types and limits (identifier ≤ 100 characters, ≤ 100 events a stream request), the
//! headers Stripe's SDKs send, and v1 bodies in the SDK's bracket style.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tally_forward::stripe::client::StripeClient;
use tally_forward::stripe::outbox::{MemoryStore, OutboxStore};
use tally_forward::stripe::test_server::{FakeStripe, Fault, RandomFaults, RecordedRequest};
use tally_forward::stripe::{Api, ApiKey, ForwarderConfig};
use tally_forward::time::{OffsetClock, day_start, parse_rfc3339};

fn spec() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/billing-meters.openapi.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the Stripe OpenAPI excerpt is required for this test: cannot read {}: {e}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            &spec["components"]["schemas"][name]
        }
        None => schema,
    }
}

fn find_path<'a>(spec: &'a Value, path: &str) -> Option<(&'a str, &'a Value)> {
    let paths = spec["paths"].as_object()?;
    paths.iter().find_map(|(template, item)| {
        let t: Vec<&str> = template.split('/').collect();
        let p: Vec<&str> = path.split('/').collect();
        let ok = t.len() == p.len()
            && t.iter()
                .zip(&p)
                .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b);
        ok.then_some((template.as_str(), item))
    })
}

/// Validates a JSON value against a schema; pushes problems.
fn check_json(spec: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                return errs.push(format!("{at}: expected object"));
            };
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    errs.push(format!("{at}: missing required {r}"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => check_json(spec, ps, val, &format!("{at}.{k}"), errs),
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(false)) => errs.push(format!("{at}: unknown field {k}")),
                        Some(s @ Value::Object(_)) => {
                            check_json(spec, s, val, &format!("{at}.{k}"), errs)
                        }
                        // Undeclared: Stripe rejects unknown parameters, so do we.
                        _ => errs.push(format!("{at}: undeclared field {k}")),
                    },
                }
            }
        }
        Some("array") => {
            let Some(a) = v.as_array() else {
                return errs.push(format!("{at}: expected array"));
            };
            for (i, x) in a.iter().enumerate() {
                check_json(spec, &schema["items"], x, &format!("{at}[{i}]"), errs);
            }
        }
        Some("string") => {
            let Some(s) = v.as_str() else {
                return errs.push(format!("{at}: expected string"));
            };
            if let Some(m) = schema.get("maxLength").and_then(Value::as_u64)
                && s.chars().count() as u64 > m
            {
                errs.push(format!("{at}: longer than {m}"));
            }
            if schema.get("format").and_then(Value::as_str) == Some("date-time")
                && parse_rfc3339(s).is_none()
            {
                errs.push(format!("{at}: not RFC 3339"));
            }
        }
        Some("integer") if !v.is_i64() => errs.push(format!("{at}: expected integer")),
        _ => {}
    }
}

/// Checks one form value against a property schema.
fn check_form_value(schema: &Value, v: &str, at: &str, errs: &mut Vec<String>) {
    match schema.get("type").and_then(Value::as_str) {
        Some("integer") if v.parse::<i64>().is_err() => {
            errs.push(format!("{at}: expected integer"))
        }
        Some("string") => {
            if let Some(m) = schema.get("maxLength").and_then(Value::as_u64)
                && v.chars().count() as u64 > m
            {
                errs.push(format!("{at}: longer than {m}"));
            }
        }
        _ => {}
    }
}

fn header<'a>(r: &'a RecordedRequest, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(String::as_str)
}

fn validate(spec: &Value, r: &RecordedRequest) -> Vec<String> {
    let mut errs = Vec::new();
    let Some((template, item)) = find_path(spec, &r.path) else {
        return vec![format!("{} {}: no such path in the spec", r.method, r.path)];
    };
    let Some(op) = item.get(r.method.to_lowercase()) else {
        return vec![format!("{} {template}: method not in the spec", r.method)];
    };
    let at = format!("{} {template}", r.method);
    match header(r, "authorization") {
        Some(a) if a.starts_with("Bearer ") && a.len() > 7 => {}
        _ => errs.push(format!("{at}: no bearer authorization")),
    }
    if header(r, "stripe-version").is_none() {
        errs.push(format!("{at}: no Stripe-Version"));
    }
    if r.method == "POST" {
        if header(r, "idempotency-key").is_none_or(str::is_empty) {
            errs.push(format!("{at}: POST without Idempotency-Key"));
        }
        let ct = header(r, "content-type").unwrap_or("");
        let content = op.pointer("/requestBody/content");
        match content {
            None => {
                // The session endpoint declares no body; Stripe's SDK sends `{}` as JSON.
                if ct != "application/json" || r.body.as_ref() != b"{}" {
                    errs.push(format!(
                        "{at}: expected an empty JSON object body, got {ct} {:?}",
                        r.body
                    ));
                }
            }
            Some(content) => {
                let Some(media) = content.get(ct) else {
                    errs.push(format!("{at}: content type {ct} not in the spec"));
                    return errs;
                };
                let schema = resolve(spec, &media["schema"]);
                if ct == "application/x-www-form-urlencoded" {
                    let raw = String::from_utf8_lossy(&r.body);
                    if raw.contains("%5B") || raw.contains("%5D") {
                        errs.push(format!("{at}: brackets percent-encoded"));
                    }
                    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
                    let props = schema["properties"].as_object().unwrap();
                    for (k, v) in form_urlencoded::parse(&r.body) {
                        let (top, sub) = match k.split_once('[') {
                            Some((t, rest)) => {
                                (t.to_owned(), Some(rest.trim_end_matches(']').to_owned()))
                            }
                            None => (k.to_string(), None),
                        };
                        seen.insert(top.clone(), ());
                        let Some(ps) = props.get(&top) else {
                            errs.push(format!("{at}: unknown field {top}"));
                            continue;
                        };
                        match (sub, ps.get("type").and_then(Value::as_str)) {
                            (Some(s), Some("object")) => {
                                let ap = &ps["additionalProperties"];
                                if ap == &Value::Bool(false)
                                    && ps.pointer(&format!("/properties/{s}")).is_none()
                                {
                                    errs.push(format!("{at}: unknown field {top}[{s}]"));
                                }
                                check_form_value(ap, &v, &format!("{at} {top}[{s}]"), &mut errs);
                                if content[ct]["encoding"][top.as_str()]["style"].as_str()
                                    != Some("deepObject")
                                {
                                    errs.push(format!("{at}: {top} is not a deepObject"));
                                }
                            }
                            (Some(_), _) => errs.push(format!("{at}: {top} is not an object")),
                            (None, _) => {
                                check_form_value(ps, &v, &format!("{at} {top}"), &mut errs)
                            }
                        }
                    }
                    for req in schema["required"].as_array().into_iter().flatten() {
                        if !seen.contains_key(req.as_str().unwrap()) {
                            errs.push(format!("{at}: missing required {req}"));
                        }
                    }
                    if schema.get("additionalProperties") != Some(&Value::Bool(false)) {
                        errs.push(format!("{at}: spec allows unknown fields (unexpected)"));
                    }
                } else {
                    let body: Value = match serde_json::from_slice(&r.body) {
                        Ok(b) => b,
                        Err(e) => {
                            errs.push(format!("{at}: body is not JSON: {e}"));
                            return errs;
                        }
                    };
                    check_json(spec, schema, &body, &at, &mut errs);
                    if template == "/v2/billing/meter_event_stream" {
                        let events = body["events"].as_array().map_or(0, Vec::len);
                        if events == 0 || events > 100 {
                            errs.push(format!("{at}: {events} events (1–100 allowed)"));
                        }
                        for e in body["events"].as_array().into_iter().flatten() {
                            if e["identifier"].as_str().is_none_or(|i| i.len() > 100) {
                                errs.push(format!("{at}: identifier missing or > 100 characters"));
                            }
                            if e["payload"]["value"]
                                .as_str()
                                .and_then(|v| v.parse::<u64>().ok())
                                .is_none_or(|v| v == 0)
                            {
                                errs.push(format!(
                                    "{at}: value not a positive whole number string"
                                ));
                            }
                        }
                    }
                }
            }
        }
        if template == "/v1/billing/meter_events" {
            let pairs: BTreeMap<String, String> =
                form_urlencoded::parse(&r.body).into_owned().collect();
            if pairs.get("identifier").is_none_or(|i| i.is_empty()) {
                errs.push(format!("{at}: no identifier"));
            }
            if pairs
                .get("payload[value]")
                .and_then(|v| v.parse::<u64>().ok())
                .is_none_or(|v| v == 0)
            {
                errs.push(format!("{at}: value not a positive whole number"));
            }
        }
    } else {
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let mut seen = Vec::new();
        for (k, v) in form_urlencoded::parse(r.query.as_bytes()) {
            let p = params
                .iter()
                .find(|p| p["in"] == "query" && p["name"] == k.as_ref());
            match p {
                None => errs.push(format!("{at}: unknown query parameter {k}")),
                Some(p) => {
                    check_form_value(&p["schema"], &v, &format!("{at} ?{k}"), &mut errs);
                    if let Some(en) = p.pointer("/schema/enum").and_then(Value::as_array)
                        && !en.iter().any(|x| x == v.as_ref())
                    {
                        errs.push(format!("{at}: {k}={v} not in enum"));
                    }
                }
            }
            seen.push(k.to_string());
        }
        for p in &params {
            if p["in"] == "query"
                && p["required"] == true
                && !seen.iter().any(|s| p["name"] == s.as_str())
            {
                errs.push(format!(
                    "{at}: missing required query parameter {}",
                    p["name"]
                ));
            }
        }
    }
    errs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_validates_against_the_openapi_excerpt() {
    let spec = spec();
    let server = FakeStripe::start().await.unwrap();
    server.meter_id("api_calls");
    server.meter_id("tokens");
    server.set_random_faults(RandomFaults {
        status_500_permille: 50,
        rate_limited_permille: 50,
        lose_answer_permille: 100,
        drop_permille: 0,
        lock_timeout_permille: 0,
        retry_after_s: 0,
        seed: 5,
    });
    for api in [Api::V1, Api::V2] {
        let store = Arc::new(MemoryStore::new());
        let mut rng = Rng(11);
        // Many rows per bucket so v2 requests fill up to 100 events.
        workload(&store, &mut rng, 600, 40);
        let fwd =
            tally_forward::stripe::spawn(config(api, &server), store.clone(), None, None).unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || all_sent(&store)).await,
            "{api:?} did not finish"
        );
        fwd.shutdown().await;
    }
    // The unknown-outcome check (GET /v1/billing/meters, event summaries) …
    server.set_random_faults(RandomFaults::default());
    server.push_faults([Fault::LoseAnswer]);
    let store = Arc::new(MemoryStore::new());
    // A customer of its own: the summary for its minute holds only this event.
    let ts = now_s() - 300;
    store
        .insert(tally_forward::stripe::NewOutboxRow {
            customer: "cus_unknown_check".into(),
            meter: "api_calls".into(),
            stripe_event_name: "api_calls".into(),
            timestamp_s: ts - ts.rem_euclid(60),
            value: 3,
        })
        .unwrap();
    let clock = OffsetClock::new();
    let cfg = ForwarderConfig {
        backoff: tally_forward::retry::Backoff {
            base: Duration::from_secs(600),
            cap: Duration::from_secs(600),
        },
        meter_ids: Default::default(),
        ..config(Api::V1, &server)
    };
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, Some(Arc::new(clock.clone())))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || store
            .stats()
            .unwrap()
            .unknown_rows
            == 1)
        .await
    );
    clock.advance_ms(24 * 3600 * 1000);
    fwd.notify();
    assert!(wait_until(Duration::from_secs(10), || all_sent(&store)).await);
    fwd.shutdown().await;
    // … and reconciliation's daily summaries.
    let client = StripeClient::new(
        &server.url(),
        &server.url(),
        ApiKey::new("sk_test_x"),
        "2026-10-28.endive",
        Duration::from_secs(5),
    )
    .unwrap();
    let today = day_start(now_s());
    let days = tally_forward::stripe::reconcile::fetch_day_totals(
        &client,
        &server.meter_id("api_calls"),
        "cus_0",
        "api_calls",
        today - 86_400,
        today + 86_400,
    )
    .await
    .unwrap();
    assert_eq!(days.len(), 2);

    let requests = server.requests();
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    for r in &requests {
        *by_path
            .entry(format!(
                "{} {}",
                r.method,
                r.path.split('/').take(4).collect::<Vec<_>>().join("/")
            ))
            .or_default() += 1;
        errors.extend(validate(&spec, r));
    }
    assert!(
        errors.is_empty(),
        "{} problems, first: {:#?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    for p in [
        "POST /v1/billing/meter_events",
        "POST /v2/billing/meter_event_session",
        "POST /v2/billing/meter_event_stream",
        "GET /v1/billing/meters",
    ] {
        assert!(
            by_path.get(p).is_some_and(|n| *n > 0),
            "{p} never exercised: {by_path:?}"
        );
    }
    assert!(
        requests
            .iter()
            .any(|r| r.path.ends_with("/event_summaries"))
    );
    assert!(
        requests.iter().any(|r| r.path.ends_with("/event_summaries")
            && r.query.contains("value_grouping_window=day"))
    );
    let max_stream = requests
        .iter()
        .filter(|r| r.path == "/v2/billing/meter_event_stream")
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["events"]
                .as_array()
                .unwrap()
                .len()
        })
        .max()
        .unwrap();
    assert_eq!(
        max_stream, 100,
        "streams fill up to the limit and no further"
    );
}

#[test]
fn the_validator_catches_bad_requests() {
    let spec = spec();
    let mk = |method: &str, path: &str, ct: &str, body: &str| RecordedRequest {
        method: method.into(),
        path: path.into(),
        query: String::new(),
        headers: BTreeMap::from([
            ("authorization".into(), "Bearer sk_test_x".into()),
            ("stripe-version".into(), "v".into()),
            ("idempotency-key".into(), "k".into()),
            ("content-type".into(), ct.into()),
        ]),
        body: body.to_owned().into(),
    };
    let form = "application/x-www-form-urlencoded";
    let ok = mk(
        "POST",
        "/v1/billing/meter_events",
        form,
        "event_name=a&identifier=x&timestamp=1&payload[stripe_customer_id]=cus_1&payload[value]=3",
    );
    assert!(
        validate(&spec, &ok).is_empty(),
        "{:?}",
        validate(&spec, &ok)
    );
    for bad in [
        "event_name=a&identifier=x&payload[stripe_customer_id]=cus_1&payload[value]=3&extra=1",
        "identifier=x&payload[stripe_customer_id]=cus_1&payload[value]=3",
        "event_name=a&identifier=x&timestamp=soon&payload[stripe_customer_id]=cus_1&payload[value]=3",
        "event_name=a&identifier=x&payload%5Bstripe_customer_id%5D=cus_1&payload[value]=3",
        "event_name=a&payload[stripe_customer_id]=cus_1&payload[value]=0",
    ] {
        assert!(
            !validate(&spec, &mk("POST", "/v1/billing/meter_events", form, bad)).is_empty(),
            "{bad}"
        );
    }
    let long = format!(
        "event_name=a&identifier={}&payload[stripe_customer_id]=cus_1&payload[value]=3",
        "x".repeat(101)
    );
    assert!(!validate(&spec, &mk("POST", "/v1/billing/meter_events", form, &long)).is_empty());
    let json = "application/json";
    let ev = r#"{"event_name":"a","identifier":"i","payload":{"stripe_customer_id":"cus_1","value":"1"},"timestamp":"2026-11-21T00:00:00Z"}"#;
    let ok = mk(
        "POST",
        "/v2/billing/meter_event_stream",
        json,
        &format!(r#"{{"events":[{ev}]}}"#),
    );
    assert!(
        validate(&spec, &ok).is_empty(),
        "{:?}",
        validate(&spec, &ok)
    );
    let many = vec![ev; 101].join(",");
    assert!(
        !validate(
            &spec,
            &mk(
                "POST",
                "/v2/billing/meter_event_stream",
                json,
                &format!(r#"{{"events":[{many}]}}"#)
            )
        )
        .is_empty()
    );
    let unknown = ev.replace(r#""event_name":"a""#, r#""event_name":"a","extra":1"#);
    assert!(
        !validate(
            &spec,
            &mk(
                "POST",
                "/v2/billing/meter_event_stream",
                json,
                &format!(r#"{{"events":[{unknown}]}}"#)
            )
        )
        .is_empty()
    );
    let epoch = ev.replace(r#""2026-11-21T00:00:00Z""#, "1795300000");
    assert!(
        !validate(
            &spec,
            &mk(
                "POST",
                "/v2/billing/meter_event_stream",
                json,
                &format!(r#"{{"events":[{epoch}]}}"#)
            )
        )
        .is_empty()
    );
    assert!(
        !validate(&spec, &mk("POST", "/v1/billing/meter_events", json, "{}")).is_empty(),
        "JSON to a form endpoint"
    );
    assert!(!validate(&spec, &mk("POST", "/v1/nope", form, "")).is_empty());
}
