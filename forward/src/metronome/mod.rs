//! Metronome: a bare array of events with a deterministic `transaction_id`, `customer_id` as an
//! ingest alias (or mapped) and the exact decimal `value` as a string in `properties` (wire
//! facts in `forward/tests/data/forwarding.md`).
//!
//! What is Metronome's alone lives here: the event's wire form ([`write_event`]); its limits
//! ([`BATCH_MAX`], [`WINDOW`]: older usage is listed `out_of_window` with the reason, decision
//! 0123); usage by day for reconciliation ([`usage`], [`compare_days`]); and its local server
//! (`fake`, feature `test-server`). What it shares with Orb is [`crate::ledger_feed`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::ledger_feed::FwdGroup;
use crate::ledger_feed::reconcile::{FwdDiscrepancy, decimal_of};
use crate::ledger_feed::runner::DestClient;
use crate::ledger_feed::wire::{json_str, properties};
use crate::time::{day_start, parse_rfc3339, rfc3339};

#[cfg(feature = "test-server")]
pub(crate) mod fake;

/// Most events one ingest request carries.
pub const BATCH_MAX: usize = 100;

/// How far back Metronome takes usage (34 days).
pub const WINDOW: Duration = Duration::from_secs(34 * 86_400);

/// Why usage at `timestamp_s` is listed `out_of_window` rather than sent (Metronome has no late
/// path, decision 0123).
pub fn out_of_window_reason(timestamp_s: i64, window: Duration) -> String {
    format!(
        "usage at {} is older than Metronome's {}-day window; not sent (fix by an invoice \
         adjustment in Metronome, then requeue or leave listed)",
        rfc3339(timestamp_s),
        window.as_secs() / 86_400
    )
}

/// Writes one event of an ingest body (`ts`: RFC 3339).
pub fn write_event(out: &mut String, g: &FwdGroup, ts: &str) {
    out.push_str("{\"transaction_id\":");
    json_str(out, &g.event.key);
    out.push_str(",\"customer_id\":");
    json_str(out, &g.event.dest_customer);
    out.push_str(",\"event_type\":");
    json_str(out, &g.event.event_name);
    let _ = write!(out, ",\"timestamp\":\"{ts}\",\"properties\":");
    properties(out, g, true);
    out.push('}');
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
pub async fn usage(
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
            return Err(crate::ledger_feed::wire::error_text(r.status, &r.body));
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
