//! Entry points shared by the fuzz targets in `fuzz/` and the test that replays their corpora
//! (`tests/fuzz_corpus.rs`), so the corpora run on every `cargo test` and cannot rot.
//!
//! Each takes any bytes as a request body and checks what must hold of whatever the parser
//! accepts; a panic (or a failed check) is a finding.

use crate::cloudevents::{self, Mode};
use crate::mapping::IngestCatalog;
use crate::stripe_form;
use rust_decimal::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Catalog;

/// The time the fuzzed requests arrive at, ms since the Unix epoch.
pub const NOW_MS: i64 = 1_763_700_000_000;

/// The quickstart's catalog (SPEC §8), compiled for ingest: the one the fuzzed bodies map
/// through.
pub fn catalog() -> IngestCatalog {
    let meters = tally_protocol::catalog::sample_meters().unwrap_or_default();
    let catalog = Catalog {
        version: 1,
        meters: BoundedVec::new(meters).unwrap_or_default(),
    };
    IngestCatalog::compile(&catalog).unwrap_or_else(|e| panic!("the sample catalog: {e}"))
}

/// A CloudEvents body in each of the three content modes: whatever is accepted names a known
/// meter, a non-negative exact quantity and a dedup id, and a structured body is accepted
/// exactly as the same event alone in a batch.
pub fn cloudevents(catalog: &IngestCatalog, data: &[u8]) {
    for mode in [Mode::Structured, Mode::Batch, Mode::Json] {
        let Ok(events) = cloudevents::parse(data, mode, catalog, NOW_MS) else {
            continue;
        };
        assert!(!events.is_empty(), "accepted nothing");
        for e in &events {
            assert!(catalog.has_meter(e.meter.as_str()), "meter {}", e.meter);
            assert!(e.quantity >= Decimal::ZERO, "quantity {}", e.quantity);
            assert!(
                e.id.as_deref().is_some_and(|id| id.starts_with("ce:")),
                "id {:?}",
                e.id
            );
        }
        if mode == Mode::Structured {
            let mut batch = b"[".to_vec();
            batch.extend_from_slice(data);
            batch.push(b']');
            assert_eq!(
                cloudevents::parse(&batch, Mode::Batch, catalog, NOW_MS).ok(),
                Some(events),
                "an event alone in a batch maps as it does on its own"
            );
        }
    }
}

/// A Stripe meter-event form body: whatever is accepted names a known meter, a time inside
/// Stripe's window, an identifier of 1 to 100 characters, and dedups by that identifier.
pub fn stripe_form(catalog: &IngestCatalog, data: &[u8]) {
    let now_s = NOW_MS / 1000;
    let Ok(a) = stripe_form::parse(data, catalog, now_s, None, || String::from("fresh")) else {
        return;
    };
    assert!(catalog.has_meter(a.event.meter.as_str()));
    let t = a.object.timestamp;
    assert!(
        (now_s - stripe_form::MAX_PAST_S..=now_s + stripe_form::MAX_FUTURE_S).contains(&t),
        "timestamp {t}"
    );
    assert_eq!(a.event.timestamp_ms, t * 1000);
    let n = a.object.identifier.chars().count();
    assert!((1..=stripe_form::MAX_IDENTIFIER_CHARS).contains(&n));
    assert_eq!(
        a.event.id.as_deref(),
        Some(format!("stripe:{}", a.object.identifier).as_str())
    );
}
