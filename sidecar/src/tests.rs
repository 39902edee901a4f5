//! Unit tests of the sidecar's wire formats.
#![allow(clippy::unwrap_used, dead_code)]
use crate::cloudevents::{self, EventError, IngestError, Mode};
use crate::mapping::IngestCatalog;
use crate::stripe_form;
use rust_decimal::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Catalog;

pub fn sample_catalog() -> IngestCatalog {
    let meters = tally_protocol::catalog::sample_meters().unwrap();
    let catalog = Catalog {
        version: 1,
        meters: BoundedVec::new(meters).unwrap(),
    };
    IngestCatalog::compile(&catalog).unwrap()
}

const NOW_MS: i64 = 1_763_700_000_000;

#[test]
fn structured_event_maps_exactly() {
    let body = br#"{"specversion":"1.0","type":"llm_tokens","id":"e1","source":"svc","subject":"acme",
        "time":"2025-11-21T04:40:00.250Z","data":{"tokens":"0.1000000000000000055511151231","model":"gpt-4o"}}"#;
    let ev = cloudevents::parse(body, Mode::Structured, &sample_catalog(), NOW_MS).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].quantity.to_string(), "0.1000000000000000055511151231");
    assert_eq!(ev[0].dimensions.pairs()[0].1.as_str(), "gpt-4o");
    assert_eq!(ev[0].timestamp_ms, 1_763_700_000_250);
    assert_eq!(ev[0].id.as_deref(), Some("ce:3:svce1:tokens"));
}

#[test]
fn numbers_never_go_through_floats() {
    // More digits than a decimal holds: refused, never rounded.
    let body = br#"{"specversion":"1.0","type":"api_call","id":"e1","source":"s","subject":"acme","data":{"count":0.1000000000000000055511151231257827}}"#;
    assert!(cloudevents::parse(body, Mode::Json, &sample_catalog(), NOW_MS).is_err());
    let body = br#"{"specversion":"1.0","type":"api_call","id":"e1","source":"s","subject":"acme","data":{"count":0.1}}"#;
    let ev = cloudevents::parse(body, Mode::Json, &sample_catalog(), NOW_MS).unwrap();
    assert_eq!(ev[0].quantity.to_string(), "0.1");
    assert_eq!(ev[0].timestamp_ms, NOW_MS);
}

#[test]
fn a_batch_is_refused_whole() {
    let body = br#"[{"specversion":"1.0","type":"api_call","id":"1","source":"s","subject":"a","data":{"count":1}},
                   {"specversion":"1.0","type":"api_call","id":"2","source":"s","subject":"a","data":{"count":-1}}]"#;
    let err = cloudevents::parse(body, Mode::Batch, &sample_catalog(), NOW_MS).unwrap_err();
    assert!(matches!(err, IngestError::Event { index: 1, .. }), "{err}");
    let body = br#"[{"specversion":"1.0","type":"nope","id":"1","source":"s","subject":"a"}]"#;
    let err = cloudevents::parse(body, Mode::Json, &sample_catalog(), NOW_MS).unwrap_err();
    assert!(matches!(
        err,
        IngestError::Event {
            index: 0,
            reason: EventError::UnknownType(_)
        }
    ));
    assert_eq!(
        cloudevents::parse(b"[]", Mode::Batch, &sample_catalog(), NOW_MS),
        Err(IngestError::Empty)
    );
    assert!(matches!(
        cloudevents::parse(b"{", Mode::Structured, &sample_catalog(), NOW_MS),
        Err(IngestError::Malformed { .. })
    ));
    let body = br#"{"specversion":"1.0","type":"api_call","id":"1","source":"s","subject":"a\u0001","data":{"count":1}}"#;
    assert!(matches!(
        cloudevents::parse(body, Mode::Structured, &sample_catalog(), NOW_MS),
        Err(IngestError::Event {
            reason: EventError::Subject(_),
            ..
        })
    ));
}

#[test]
fn stripe_form_as_sdks_send_it() {
    let body = b"event_name=tokens&identifier=req_123&timestamp=1763700000&payload[stripe_customer_id]=cus_ABC&payload[value]=25&payload[model]=gpt-4o";
    let a = stripe_form::parse(
        body,
        &sample_catalog(),
        1_763_700_100,
        Some("idem-1"),
        || "x".into(),
    )
    .unwrap();
    assert_eq!(a.event.customer.as_str(), "cus_ABC");
    assert_eq!(a.event.quantity, Decimal::from(25));
    assert_eq!(a.event.id.as_deref(), Some("stripe:req_123"));
    assert_eq!(a.event.dimensions.pairs().len(), 1);
    assert_eq!(a.object.identifier, "req_123");
    // Percent-encoded brackets decode to the same thing.
    let body = b"event_name=api_calls&payload%5Bstripe_customer_id%5D=acme&payload%5Bvalue%5D=1.5";
    let a = stripe_form::parse(
        body,
        &sample_catalog(),
        1_763_700_100,
        Some("idem-2"),
        || "gen".into(),
    )
    .unwrap();
    assert_eq!(a.event.id.as_deref(), Some("stripe-idem:idem-2"));
    assert_eq!(a.object.identifier, "gen");
}

#[test]
fn stripe_errors_name_the_param() {
    let cat = sample_catalog();
    let p = |b: &[u8]| stripe_form::parse(b, &cat, 1_763_700_100, None, || "x".into()).unwrap_err();
    assert_eq!(p(b"payload[value]=1").param.as_deref(), Some("event_name"));
    assert_eq!(
        p(b"event_name=nope&payload[stripe_customer_id]=a&payload[value]=1").code,
        "resource_missing"
    );
    assert_eq!(
        p(b"event_name=tokens&payload[value]=1").param.as_deref(),
        Some("payload[stripe_customer_id]")
    );
    assert_eq!(
        p(b"event_name=tokens&payload[stripe_customer_id]=a")
            .param
            .as_deref(),
        Some("payload[value]")
    );
    assert_eq!(
        p(b"event_name=tokens&payload[stripe_customer_id]=a&payload[value]=-1")
            .param
            .as_deref(),
        Some("payload[value]")
    );
    assert_eq!(
        p(b"event_name=tokens&payload[stripe_customer_id]=a&payload[value]=abc")
            .param
            .as_deref(),
        Some("payload[value]")
    );
    let e = p(b"event_name=tokens&payload[stripe_customer_id]=a&payload[value]=1&foo=bar");
    assert_eq!(
        (e.code, e.param.as_deref()),
        ("parameter_unknown", Some("foo"))
    );
    assert_eq!(
        p(b"event_name=tokens&payload[stripe_customer_id]=a&payload[value]=1&timestamp=1")
            .param
            .as_deref(),
        Some("timestamp")
    );
    assert_eq!(
        p(b"event_name=tokens&payload[stripe_customer_id]=a&payload[value]=1&identifier=")
            .param
            .as_deref(),
        Some("identifier")
    );
    assert_eq!(
        p(b"event_name=tokens&payload[stripe_customer_id]=a&payload[value]=1&payload[model]=%FF")
            .code,
        "parameter_invalid_string"
    );
}
