//! `GET /v1/usage/series`: a customer's usage of a meter in hour or day buckets, summed from
//! the ledger's transfers by when the usage happened (`event_at_ms`), so the buckets of a
//! range add up to what `GET /v1/usage` answers for it.
//!
//! The bucketing is a plain function ([`Buckets`]); the route pages through the customer's
//! transfers. The transfers table is ordered by position, not customer, so a read scans at
//! most [`MAX_SCANNED`] transfers and says `truncated` past that (decision 0077).

use super::errors::*;
use super::state::{St, blocking};
use crate::core::ledger::{Transfer, source_account_id};
use axum::extract::{RawQuery, State};
use rust_decimal::Decimal;
use serde::Serialize;
use tally_protocol::names::MeterName;
use utoipa::ToSchema;

/// Most buckets one answer holds.
pub const MAX_BUCKETS: i64 = 2_000;
/// Most transfers one answer reads.
pub const MAX_SCANNED: usize = 2_000_000;
/// Transfers read per store call.
const PAGE: usize = 10_000;

/// Bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// 3,600,000 ms.
    Hour,
    /// 86,400,000 ms (UTC days).
    Day,
}

impl Granularity {
    /// The width in ms.
    pub fn ms(self) -> i64 {
        match self {
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

/// The signed change a transfer makes to its customer's usage: `+amount` when the meter's
/// source account is debited (usage credited), `-amount` otherwise (a negative adjustment).
pub fn signed_amount(t: &Transfer) -> Decimal {
    if t.debit == source_account_id(&t.unit) {
        t.amount
    } else {
        -t.amount
    }
}

/// Sums transfers of one meter into fixed buckets over `[from_ms, to_ms)`.
///
/// ```
/// use tally_collector::api::series::{Buckets, Granularity};
/// let b = Buckets::new(0, 2 * 3_600_000, Granularity::Hour).unwrap();
/// assert_eq!(b.points().len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct Buckets {
    from_ms: i64,
    step_ms: i64,
    points: Vec<Point>,
}

/// One bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Point {
    /// Start of the bucket, ms since the Unix epoch (UTC).
    pub start_ms: i64,
    /// Usage in the bucket, a decimal string (an adjustment counts when it was posted).
    #[schema(value_type = String)]
    pub quantity: Decimal,
    /// Events counted (adjustments carry none).
    pub events: u64,
}

impl Buckets {
    /// Buckets aligned to the granularity; `None` when the range is empty, reversed or wider
    /// than [`MAX_BUCKETS`].
    pub fn new(from_ms: i64, to_ms: i64, g: Granularity) -> Option<Buckets> {
        if to_ms <= from_ms {
            return None;
        }
        let step_ms = g.ms();
        let from_ms = from_ms.div_euclid(step_ms) * step_ms;
        let n = to_ms.checked_sub(from_ms)?.checked_add(step_ms - 1)? / step_ms;
        if !(1..=MAX_BUCKETS).contains(&n) {
            return None;
        }
        let points = (0..n)
            .map(|i| Point {
                start_ms: from_ms + i * step_ms,
                quantity: Decimal::ZERO,
                events: 0,
            })
            .collect();
        Some(Buckets {
            from_ms,
            step_ms,
            points,
        })
    }

    /// Adds a transfer of the series' meter (others are the caller's to filter); one outside
    /// the range is left out.
    pub fn add(&mut self, t: &Transfer) {
        let Some(off) = t.event_at_ms.checked_sub(self.from_ms) else {
            return;
        };
        if off < 0 {
            return;
        }
        if let Some(p) = usize::try_from(off / self.step_ms)
            .ok()
            .and_then(|i| self.points.get_mut(i))
        {
            let q = signed_amount(t);
            p.quantity += q;
            if q > Decimal::ZERO {
                p.events += t.events;
            } else {
                p.events = p.events.saturating_sub(t.events);
            }
        }
    }

    /// The buckets, oldest first.
    pub fn points(&self) -> &[Point] {
        &self.points
    }
}

/// `GET /v1/usage/series`.
#[derive(Serialize, ToSchema)]
pub struct Series {
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// `hour` or `day`.
    pub granularity: String,
    /// Start of the first bucket, ms.
    pub from_ms: i64,
    /// End of the range (exclusive), ms.
    pub to_ms: i64,
    /// The buckets, oldest first, empty ones included.
    pub data: Vec<Point>,
    /// Σ quantity over the buckets, a decimal string.
    #[schema(value_type = String)]
    pub total: Decimal,
    /// True when the read stopped at its scan limit (older buckets may be short).
    pub truncated: bool,
}

fn ms_param(
    q: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<i64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::invalid(
                    "invalid_time",
                    name,
                    format!("{name} is milliseconds since the Unix epoch"),
                )
            })
        })
        .transpose()
}

#[utoipa::path(get, path = "/v1/usage/series", tag = "usage",
    params(("customer" = String, Query), ("meter" = String, Query),
           ("granularity" = Option<String>, Query, description = "hour (default) or day"),
           ("from" = Option<i64>, Query, description = "ms since the Unix epoch, rounded down to the bucket; default 48 hours or 31 days before `to`"),
           ("to" = Option<i64>, Query, description = "ms since the Unix epoch, exclusive; default now")),
    responses((status = 200, body = Series), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn series(State(shared): St, RawQuery(raw): RawQuery) -> ApiResult<Series> {
    let q = query(raw)?;
    let c = customer(
        q.get("customer")
            .ok_or_else(|| ApiError::missing("customer"))?,
        "customer",
    )?;
    let m = meter_name(
        q.get("meter").ok_or_else(|| ApiError::missing("meter"))?,
        "meter",
    )?;
    let g = match q.get("granularity").map(String::as_str) {
        None | Some("hour") => Granularity::Hour,
        Some("day") => Granularity::Day,
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_granularity",
                "granularity",
                "granularity must be hour or day",
            ));
        }
    };
    let to_ms = ms_param(&q, "to")?.unwrap_or_else(|| shared.now_ms() + 1);
    let default_n = if g == Granularity::Hour { 48 } else { 31 };
    let from_ms = ms_param(&q, "from")?.unwrap_or(to_ms.saturating_sub(default_n * g.ms()));
    let buckets = Buckets::new(from_ms, to_ms, g).ok_or_else(|| {
        ApiError::invalid(
            "invalid_range",
            "from",
            format!("from must be before to, at most {MAX_BUCKETS} buckets apart"),
        )
    })?;
    let (c2, m2) = (c.clone(), m.clone());
    let (buckets, truncated) = blocking(&shared, move |s| Ok(scan(s, &c2, &m2, buckets))).await??;
    let total = buckets.points().iter().map(|p| p.quantity).sum();
    Ok(axum::Json(Series {
        customer: c.to_string(),
        meter: m.to_string(),
        granularity: g.name().to_owned(),
        from_ms: buckets.from_ms,
        to_ms,
        data: buckets.points,
        total,
        truncated,
    }))
}

fn scan(
    s: &super::ApiState,
    c: &tally_protocol::names::CustomerId,
    m: &MeterName,
    mut buckets: Buckets,
) -> Result<(Buckets, bool), ApiError> {
    let mut after = 0;
    let mut scanned = 0;
    loop {
        let rows = s
            .store
            .entries(Some(c), after, PAGE)
            .map_err(ApiError::from)?;
        for (_, t) in &rows {
            if t.unit == *m {
                buckets.add(t);
            }
        }
        scanned += rows.len();
        match rows.last() {
            Some((p, _)) if rows.len() == PAGE => after = *p,
            _ => return Ok((buckets, false)),
        }
        if scanned >= MAX_SCANNED {
            return Ok((buckets, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ledger::TransferSource;
    use proptest::prelude::*;
    use tally_protocol::batch::AgentId;
    use tally_protocol::names::CustomerId;

    fn transfer(at_ms: i64, amount: i64, up: bool) -> Transfer {
        let unit = MeterName::new("api_calls").unwrap();
        let src = source_account_id(&unit);
        Transfer {
            id: 1,
            debit: if up { src } else { 7 },
            credit: if up { 7 } else { src },
            unit,
            amount: Decimal::from(amount),
            events: 1,
            customer: CustomerId::new("acme").unwrap(),
            event_at_ms: at_ms,
            posted_at_ms: at_ms,
            source: TransferSource::BatchRow {
                agent: AgentId([1; 16]),
                epoch: 1,
                seq: 1,
                row: 0,
            },
        }
    }

    #[test]
    fn ranges_are_bounded_and_aligned() {
        assert!(Buckets::new(10, 5, Granularity::Hour).is_none());
        assert!(Buckets::new(0, 0, Granularity::Hour).is_none());
        assert!(Buckets::new(0, (MAX_BUCKETS + 1) * 3_600_000, Granularity::Hour).is_none());
        let b = Buckets::new(3_600_001, 3 * 3_600_000, Granularity::Hour).unwrap();
        assert_eq!(b.points()[0].start_ms, 3_600_000);
        assert_eq!(b.points().len(), 2);
    }

    proptest! {
        /// Σ buckets = Σ signed amounts of the transfers inside the range (a model sum).
        #[test]
        fn buckets_sum_to_the_ledger(
            ts in proptest::collection::vec((0i64..10 * 86_400_000, 1i64..1000, any::<bool>()), 0..200),
            from in 0i64..5 * 86_400_000,
            day in any::<bool>(),
        ) {
            let g = if day { Granularity::Day } else { Granularity::Hour };
            let to = from + 5 * 86_400_000;
            let mut b = Buckets::new(from, to, g).unwrap();
            let lo = from.div_euclid(g.ms()) * g.ms();
            let mut want = Decimal::ZERO;
            for (at, amount, up) in &ts {
                let t = transfer(*at, *amount, *up);
                b.add(&t);
                if *at >= lo && *at < lo + b.points().len() as i64 * g.ms() {
                    want += signed_amount(&t);
                }
            }
            let got: Decimal = b.points().iter().map(|p| p.quantity).sum();
            prop_assert_eq!(got, want);
        }
    }
}
