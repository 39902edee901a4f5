//! Reconciliation per destination, where its API allows it (SPEC §6.4b):
//!
//! - Metronome: `POST /v1/usage` by day (`window_size: "DAY"`) against the ledger's delivered
//!   groups summed per (customer, billable metric, day). Our meter's `event_type` is taken as
//!   the billable metric id unless configured otherwise.
//! - Orb: there is no per-customer raw usage endpoint, so a sample of delivered keys is looked
//!   up with `POST /v1/events/search`; a key missing, deprecated or with another `value` is a
//!   discrepancy.
//!
//! The reading and comparing are each destination's ([`crate::orb::search`],
//! [`crate::orb::compare_events`], [`crate::metronome::usage`], [`crate::metronome::compare_days`],
//! all pure but the reads); this file holds the report and runs them.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::runner::DestClient;
use super::{Engine, FwdGroup};
use crate::time::day_start;

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

/// A JSON value's decimal: a string's text or a number's own digits.
pub(crate) fn decimal_of(v: &serde_json::Value) -> Option<Decimal> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        // serde_json's own number text (the fake keeps it exact for the digits we send).
        serde_json::Value::Number(n) => n.to_string().parse().ok(),
        _ => None,
    }
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
    dest: Engine,
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
        Engine::Metronome => {
            let to = day_start(now_s) + 86_400;
            let from = to - days.max(1) * 86_400;
            let ledger = ledger_days(delivered, from, to);
            match crate::metronome::usage(client, from, to).await {
                Ok(theirs) => {
                    report.compared = ledger.len().max(theirs.len());
                    report.discrepancies = crate::metronome::compare_days(&ledger, &theirs);
                }
                Err(e) => report.skipped.push(e),
            }
        }
        Engine::Orb => {
            let keys: Vec<String> = delivered.iter().map(|g| g.event.key.clone()).collect();
            match crate::orb::search(client, &keys).await {
                Some(found) => {
                    report.compared = delivered.len();
                    report.discrepancies = crate::orb::compare_events(delivered, &found);
                }
                None => report.skipped.push(String::from("orb event search failed")),
            }
        }
    }
    report
}
