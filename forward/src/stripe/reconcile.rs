//! Reconciliation: ledger totals against Stripe's meter event summaries, per customer, meter
//! and UTC day, in Stripe units.
//!
//! [`reconcile`] is pure: the collector supplies its ledger totals (Σ units written to the outbox
//! per day — i.e. ⌊ledger × scale⌋ increments, the amount Stripe should have) and the summaries
//! fetched with [`fetch_day_totals`]; the result backs `GET /v1/reconciliation` and the
//! `tally_stripe_reconciliation_discrepancies` gauge. Summaries are eventually consistent:
//! callers should leave out the current day, or expect transient differences for it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::stripe::client::{StripeClient, TransportError};

/// A total for one (Stripe customer, event name, day).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DayKey {
    /// Stripe customer id.
    pub stripe_customer: String,
    /// Stripe event name (the meter).
    pub event_name: String,
    /// Start of the UTC day, Unix seconds.
    pub day_start_s: i64,
}

/// A difference between what we sent and what Stripe has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discrepancy {
    /// Where.
    pub key: DayKey,
    /// Units per the ledger.
    pub ledger: Decimal,
    /// Units per Stripe.
    pub stripe: Decimal,
    /// `stripe − ledger` (negative: missing in Stripe; positive: counted twice or foreign).
    pub difference: Decimal,
}

/// Compares both sides; a key missing on one side counts as zero there.
pub fn reconcile(
    ledger: &BTreeMap<DayKey, Decimal>,
    stripe: &BTreeMap<DayKey, Decimal>,
) -> Vec<Discrepancy> {
    let mut keys: Vec<&DayKey> = ledger.keys().chain(stripe.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let l = ledger.get(k).copied().unwrap_or_default();
            let s = stripe.get(k).copied().unwrap_or_default();
            (l != s).then(|| Discrepancy {
                key: k.clone(),
                ledger: l,
                stripe: s,
                difference: s - l,
            })
        })
        .collect()
}

/// Sums (Stripe customer, event name, Unix-seconds timestamp, units) items into daily totals —
/// e.g. the collector's usage transfers converted to units, or delivered outbox groups.
pub fn day_totals<'a>(
    items: impl IntoIterator<Item = (&'a str, &'a str, i64, u64)>,
) -> BTreeMap<DayKey, Decimal> {
    let mut out: BTreeMap<DayKey, Decimal> = BTreeMap::new();
    for (customer, event_name, ts, units) in items {
        let key = DayKey {
            stripe_customer: customer.to_owned(),
            event_name: event_name.to_owned(),
            day_start_s: crate::time::day_start(ts),
        };
        *out.entry(key).or_default() += Decimal::from(units);
    }
    out
}

/// Fetches Stripe's daily totals for one customer and meter over whole UTC days
/// `[first_day_s, end_day_s)`.
pub async fn fetch_day_totals(
    client: &StripeClient,
    meter_id: &str,
    stripe_customer: &str,
    event_name: &str,
    first_day_s: i64,
    end_day_s: i64,
) -> Result<BTreeMap<DayKey, Decimal>, TransportError> {
    let s = client
        .event_summaries(
            meter_id,
            stripe_customer,
            first_day_s,
            end_day_s,
            Some("day"),
        )
        .await?
        .map_err(|a| TransportError::Network(format!("event summaries: http {}", a.status)))?;
    Ok(s.into_iter()
        .map(|x| {
            (
                DayKey {
                    stripe_customer: stripe_customer.to_owned(),
                    event_name: event_name.to_owned(),
                    day_start_s: x.start_time,
                },
                x.aggregated_value,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(c: &str, d: i64) -> DayKey {
        DayKey {
            stripe_customer: c.into(),
            event_name: "m".into(),
            day_start_s: d,
        }
    }

    #[test]
    fn finds_both_directions() {
        let ledger = BTreeMap::from([(k("a", 0), Decimal::from(5)), (k("b", 0), Decimal::from(2))]);
        let stripe = BTreeMap::from([(k("a", 0), Decimal::from(5)), (k("c", 0), Decimal::from(1))]);
        let d = reconcile(&ledger, &stripe);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].key, k("b", 0));
        assert_eq!(d[0].difference, Decimal::from(-2));
        assert_eq!(d[1].difference, Decimal::from(1));
    }
}
