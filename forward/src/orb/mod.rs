//! Orb: events with `external_customer_id`, a deterministic `idempotency_key` and the exact
//! decimal `value` as a JSON number in `properties` (wire facts in
//! `forward/tests/data/forwarding.md`).
//!
//! What is Orb's alone lives here: the event's wire form and the `validation_failed` part of an
//! accepted batch ([`write_event`], [`validation_failed`]); its limits ([`BATCH_MAX`],
//! [`DEFAULT_GRACE`]); late usage through a backfill (create, ingest with `backfill_id`, close,
//! wait for `reflected`: `backfill`, decision 0122); event search for reconciliation and for
//! groups that may have arrived before they went late ([`search`], [`compare_events`]); and its
//! local server (`fake`, feature `test-server`). What Orb shares with Metronome — cursor,
//! groups, store, runner — is [`crate::ledger_feed`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::ledger_feed::FwdGroup;
use crate::ledger_feed::reconcile::{FwdDiscrepancy, decimal_of};
use crate::ledger_feed::runner::DestClient;
use crate::ledger_feed::wire::{json_str, properties};

mod backfill;
#[cfg(feature = "test-server")]
pub(crate) mod fake;

/// Most events one ingest request carries.
pub const BATCH_MAX: usize = 500;

/// Orb's default grace period: usage older than this goes through a backfill.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(12 * 3600);

/// Writes one event of an ingest body (`ts`: RFC 3339).
pub fn write_event(out: &mut String, g: &FwdGroup, ts: &str) {
    out.push_str("{\"event_name\":");
    json_str(out, &g.event.event_name);
    out.push_str(",\"idempotency_key\":");
    json_str(out, &g.event.key);
    out.push_str(",\"external_customer_id\":");
    json_str(out, &g.event.dest_customer);
    let _ = write!(out, ",\"timestamp\":\"{ts}\",\"properties\":");
    properties(out, g, false);
    out.push('}');
}

#[derive(Debug, Deserialize, Default)]
struct OrbOk {
    #[serde(default)]
    validation_failed: Vec<OrbFailed>,
}

#[derive(Debug, Deserialize)]
struct OrbFailed {
    idempotency_key: String,
    #[serde(default)]
    validation_errors: Vec<serde_json::Value>,
}

/// The keys Orb refused in an accepted batch (`validation_failed`), with its reasons (bounded).
pub fn validation_failed(body: &str) -> BTreeMap<String, String> {
    let ok: OrbOk = serde_json::from_str(body).unwrap_or_default();
    let mut rejected = BTreeMap::new();
    for f in ok.validation_failed {
        let why = serde_json::Value::Array(f.validation_errors).to_string();
        rejected.insert(f.idempotency_key, why.chars().take(500).collect());
    }
    rejected
}

/// An event as Orb's search returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct OrbEvent {
    /// Orb's event id: our idempotency key.
    pub id: String,
    /// Properties.
    #[serde(default)]
    pub properties: serde_json::Value,
    /// Deprecated (amended away).
    #[serde(default)]
    pub deprecated: bool,
}

#[derive(Deserialize)]
struct OrbSearch {
    #[serde(default)]
    data: Vec<OrbEvent>,
}

/// `POST /v1/events/search` for `keys` (at most 500 a request); `None` when it failed.
pub async fn search(client: &DestClient, keys: &[String]) -> Option<Vec<OrbEvent>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(500) {
        let body = serde_json::json!({ "event_ids": chunk }).to_string();
        let r = client
            .call(reqwest::Method::POST, "/v1/events/search", Some(body), None)
            .await?;
        if !(200..300).contains(&r.status) {
            return None;
        }
        let s: OrbSearch = serde_json::from_str(&r.body).ok()?;
        out.extend(s.data);
    }
    Some(out)
}

/// Sampled Orb events against our delivered groups.
pub fn compare_events(sample: &[FwdGroup], found: &[OrbEvent]) -> Vec<FwdDiscrepancy> {
    let by_id: HashMap<&str, &OrbEvent> = found.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut out = Vec::new();
    for g in sample {
        let theirs = by_id
            .get(g.event.key.as_str())
            .filter(|e| !e.deprecated)
            .and_then(|e| e.properties.get("value").and_then(decimal_of))
            .unwrap_or(Decimal::ZERO);
        if theirs != g.event.value {
            out.push(FwdDiscrepancy {
                customer: g.event.dest_customer.clone(),
                what: g.event.key.clone(),
                day: 0,
                ledger: g.event.value,
                destination: theirs,
            });
        }
    }
    out
}
