//! Reconciliation per destination, where its API allows it (SPEC §6.4b):
//!
//! - Metronome: `POST /v1/usage` by day (`window_size: "DAY"`) against the ledger's delivered
//!   groups summed per (customer, billable metric, day). Our meter's `event_type` is taken as
//!   the billable metric id unless configured otherwise.
//! - Orb: there is no per-customer raw usage endpoint, so a sample of delivered keys is looked
//!   up with `POST /v1/events/search`; a key missing, deprecated or with another `value` is a
//!   discrepancy.
//!
//! The comparison itself is pure ([`compare_days`], [`compare_events`]).

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::runner::DestClient;
use super::{Destination, FwdGroup};
use crate::time::{day_start, parse_rfc3339, rfc3339};

/// One difference: `difference = destination − ledger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwdDiscrepancy {
    /// The destination's customer.
    pub customer: String,
    /// Event name / billable metric, or the event key (Orb sample).
    pub what: String,
    /// UTC day (Unix seconds), 0 for a sampled event.
    pub day: i64,
    /// What the ledger delivered.
    #[serde(with = "rust_decimal::serde::str")]
    pub ledger: Decimal,
    /// What the destination reports.
    #[serde(with = "rust_decimal::serde::str")]
    pub destination: Decimal,
}

/// One reconciliation run (`GET /v1/reconciliation?destination=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwdReport {
    /// `orb` or `metronome`.
    pub destination: String,
    /// Unix seconds.
    pub ran_at: i64,
    /// Keys (days or sampled events) compared.
    pub compared: usize,
    /// Differences.
    pub discrepancies: Vec<FwdDiscrepancy>,
    /// What could not be compared, and why.
    pub skipped: Vec<String>,
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
pub async fn orb_search(client: &DestClient, keys: &[String]) -> Option<Vec<OrbEvent>> {
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

fn decimal_of(v: &serde_json::Value) -> Option<Decimal> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        // serde_json's own number text (the fake keeps it exact for the digits we send).
        serde_json::Value::Number(n) => n.to_string().parse().ok(),
        _ => None,
    }
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

/// Day totals (customer, metric, day) compared; both sides absent means equal.
pub fn compare_days(
    ledger: &BTreeMap<(String, String, i64), Decimal>,
    theirs: &BTreeMap<(String, String, i64), Decimal>,
) -> Vec<FwdDiscrepancy> {
    let mut keys: Vec<&(String, String, i64)> = ledger.keys().chain(theirs.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let l = ledger.get(k).copied().unwrap_or_default();
            let t = theirs.get(k).copied().unwrap_or_default();
            (l != t).then(|| FwdDiscrepancy {
                customer: k.0.clone(),
                what: k.1.clone(),
                day: k.2,
                ledger: l,
                destination: t,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct UsagePage {
    #[serde(default)]
    data: Vec<UsageRow>,
    #[serde(default)]
    next_page: Option<String>,
}

#[derive(Deserialize)]
struct UsageRow {
    customer_id: String,
    billable_metric_id: String,
    start_timestamp: String,
    #[serde(default)]
    value: Option<serde_json::Value>,
}

/// Metronome's day totals over `[from_s, to_s)` (`POST /v1/usage`, all pages, at most 100).
pub async fn metronome_usage(
    client: &DestClient,
    from_s: i64,
    to_s: i64,
) -> Result<BTreeMap<(String, String, i64), Decimal>, String> {
    let mut out = BTreeMap::new();
    let mut page: Option<String> = None;
    for _ in 0..100 {
        let body = serde_json::json!({
            "starting_on": rfc3339(from_s),
            "ending_before": rfc3339(to_s),
            "window_size": "DAY",
        });
        let path = match &page {
            Some(p) => format!("/v1/usage?next_page={p}"),
            None => String::from("/v1/usage"),
        };
        let r = client
            .call(reqwest::Method::POST, &path, Some(body.to_string()), None)
            .await
            .ok_or_else(|| String::from("metronome usage: no answer"))?;
        if !(200..300).contains(&r.status) {
            return Err(super::wire::error_text(r.status, &r.body));
        }
        let p: UsagePage = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
        for row in p.data {
            let day = parse_rfc3339(&row.start_timestamp).map_or(0, day_start);
            let v = row.value.as_ref().and_then(decimal_of).unwrap_or_default();
            if !v.is_zero() {
                *out.entry((row.customer_id, row.billable_metric_id, day))
                    .or_insert(Decimal::ZERO) += v;
            }
        }
        match p.next_page {
            Some(n) if !n.is_empty() => page = Some(n),
            _ => return Ok(out),
        }
    }
    Ok(out)
}

/// Delivered groups summed per (destination customer, event name, day) within `[from_s, to_s)`.
pub fn ledger_days(
    delivered: &[FwdGroup],
    from_s: i64,
    to_s: i64,
) -> BTreeMap<(String, String, i64), Decimal> {
    let mut out = BTreeMap::new();
    for g in delivered {
        let t = g.event.timestamp_s;
        if t < from_s || t >= to_s {
            continue;
        }
        *out.entry((
            g.event.dest_customer.clone(),
            g.event.event_name.clone(),
            day_start(t),
        ))
        .or_insert(Decimal::ZERO) += g.event.value;
    }
    out.retain(|_, v: &mut Decimal| !v.is_zero());
    out
}

/// Runs reconciliation for `dest` over the delivered groups (all of them for Metronome's
/// window of `days`; the last `sample` for Orb).
pub async fn run(
    dest: Destination,
    client: &DestClient,
    delivered: &[FwdGroup],
    now_s: i64,
    days: i64,
) -> FwdReport {
    let mut report = FwdReport {
        destination: dest.as_str().to_owned(),
        ran_at: now_s,
        compared: 0,
        discrepancies: Vec::new(),
        skipped: Vec::new(),
    };
    match dest {
        Destination::Metronome => {
            let to = day_start(now_s) + 86_400;
            let from = to - days.max(1) * 86_400;
            let ledger = ledger_days(delivered, from, to);
            match metronome_usage(client, from, to).await {
                Ok(theirs) => {
                    report.compared = ledger.len().max(theirs.len());
                    report.discrepancies = compare_days(&ledger, &theirs);
                }
                Err(e) => report.skipped.push(e),
            }
        }
        Destination::Orb => {
            let keys: Vec<String> = delivered.iter().map(|g| g.event.key.clone()).collect();
            match orb_search(client, &keys).await {
                Some(found) => {
                    report.compared = delivered.len();
                    report.discrepancies = compare_events(delivered, &found);
                }
                None => report.skipped.push(String::from("orb event search failed")),
            }
        }
    }
    report
}
