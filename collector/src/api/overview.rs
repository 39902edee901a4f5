//! `GET /v1/overview`: the figures of the console's Overview page in one answer, for people and
//! for scripts (a status board, an alert).
//!
//! Rates need two readings of a counter: [`Sampler`] keeps a bounded ring of readings taken by
//! the requests themselves (at most one per [`SAMPLE_EVERY_MS`]; the first is the collector's
//! start) and answers the rate between the last two, so answers between two readings agree
//! with each other (decision 0076). It is a plain struct driven by the caller's `now_ms`.

use super::errors::*;
use super::state::{St, blocking};
use axum::extract::State;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use utoipa::ToSchema;

/// Least time between two readings.
pub const SAMPLE_EVERY_MS: i64 = 5_000;
/// Readings kept.
pub const SAMPLES_MAX: usize = 16;
/// Quarantined batches counted exactly; past this the answer says `quarantined_more`.
pub const QUARANTINE_COUNT_MAX: usize = 1_000;
/// An agent last seen longer ago than this, with no live connection, is offline.
pub const OFFLINE_AFTER_MS: i64 = 60_000;

/// One reading of the counters behind the rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// When, ms.
    pub at_ms: i64,
    /// Deltas posted so far.
    pub deltas: u64,
    /// Σ metering lag observed so far, ms (rounded down).
    pub lag_sum_ms: u64,
    /// Metering-lag observations so far.
    pub lag_count: u64,
}

/// Rates between the last two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    /// Deltas per second, `None` before two readings.
    pub deltas_per_s: Option<Decimal>,
    /// Mean metering lag of the deltas committed in the interval, seconds; `None` if none were.
    pub metering_lag_s: Option<Decimal>,
    /// The interval, ms.
    pub window_ms: i64,
}

/// A bounded ring of readings (see the module doc).
///
/// ```
/// use tally_collector::api::overview::{Reading, Sampler};
/// let mut s = Sampler::default();
/// s.offer(Reading { at_ms: 0, deltas: 0, lag_sum_ms: 0, lag_count: 0 });
/// let r = s.offer(Reading { at_ms: 10_000, deltas: 50, lag_sum_ms: 3_000, lag_count: 10 });
/// assert_eq!(r.deltas_per_s.unwrap().to_string(), "5.00");
/// assert_eq!(r.metering_lag_s.unwrap().to_string(), "0.300");
/// ```
#[derive(Debug, Default)]
pub struct Sampler {
    ring: VecDeque<Reading>,
}

impl Sampler {
    /// Keeps `now` if the last reading is old enough (or counters went back: a new registry),
    /// and answers the rates between the last two readings kept.
    pub fn offer(&mut self, now: Reading) -> Rates {
        let keep = match self.ring.back() {
            None => true,
            Some(last) => {
                now.at_ms - last.at_ms >= SAMPLE_EVERY_MS
                    || now.deltas < last.deltas
                    || now.lag_count < last.lag_count
            }
        };
        if keep {
            if self.ring.back().is_some_and(|l| now.deltas < l.deltas) {
                self.ring.clear();
            }
            if self.ring.len() == SAMPLES_MAX {
                self.ring.pop_front();
            }
            self.ring.push_back(now);
        }
        let n = self.ring.len();
        match n {
            0 => Rates::default(),
            // Only the first reading so far: the rate up to now (moves until a second is kept).
            1 => Self::between(self.ring[0], now),
            _ => Self::between(self.ring[n - 2], self.ring[n - 1]),
        }
    }

    fn between(a: Reading, b: Reading) -> Rates {
        let window_ms = b.at_ms - a.at_ms;
        if window_ms <= 0 {
            return Rates::default();
        }
        let d = Decimal::from(b.deltas.saturating_sub(a.deltas));
        let deltas_per_s = (d * Decimal::from(1000) / Decimal::from(window_ms)).round_dp(2);
        let count = b.lag_count.saturating_sub(a.lag_count);
        let metering_lag_s = (count > 0).then(|| {
            let sum = Decimal::from(b.lag_sum_ms.saturating_sub(a.lag_sum_ms));
            (sum / Decimal::from(count) / Decimal::from(1000)).round_dp(3)
        });
        Rates {
            deltas_per_s: Some(two_places(deltas_per_s)),
            metering_lag_s: metering_lag_s.map(three_places),
            window_ms,
        }
    }
}

fn two_places(mut d: Decimal) -> Decimal {
    d.rescale(2);
    d
}

fn three_places(mut d: Decimal) -> Decimal {
    d.rescale(3);
    d
}

/// The shared sampler of one API.
#[derive(Debug)]
pub struct SharedSampler(Mutex<Sampler>);

impl SharedSampler {
    /// A sampler whose first reading is the collector's start (every counter at zero), so the
    /// first answer already has a rate: the one since the start.
    pub fn started_at(now_ms: i64) -> Self {
        let mut s = Sampler::default();
        s.offer(Reading {
            at_ms: now_ms,
            deltas: 0,
            lag_sum_ms: 0,
            lag_count: 0,
        });
        SharedSampler(Mutex::new(s))
    }

    fn offer(&self, r: Reading) -> Rates {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .offer(r)
    }
}

/// Agents as the collector sees them.
#[derive(Serialize, ToSchema)]
pub struct AgentsFigure {
    /// Agents with a live connection.
    pub connected: u64,
    /// Agents neither connected nor revoked.
    pub offline: u64,
    /// Offline agents whose batches arrived with a hole (seqs missing below the highest
    /// durable one): they have a backlog to resend.
    pub offline_with_backlog: u64,
    /// Σ missing seqs of offline agents (batches the collector knows are still to come).
    pub offline_backlog_batches: u64,
    /// Revoked agents.
    pub revoked: u64,
}

/// The Stripe outbox.
#[derive(Serialize, ToSchema)]
pub struct OutboxFigure {
    /// Rows not yet delivered (unknown outcome included, dead letters not).
    pub pending: u64,
    /// Rows waiting for a customer mapping (as of the forwarder's last pass).
    pub unmapped: u64,
    /// Dead letters.
    pub dead: u64,
    /// Rows whose outcome is being checked.
    pub unknown: u64,
}

/// `GET /v1/overview`.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    /// When these figures were read, ms.
    pub at_ms: i64,
    /// Deltas posted since the collector started.
    pub deltas_total: u64,
    /// Deltas posted per second between the last two readings (readings are at least 5 s
    /// apart; the first is the collector's start).
    #[schema(value_type = Option<String>)]
    pub deltas_per_s: Option<Decimal>,
    /// Mean time from a delta's last event to its commit over the same interval, seconds.
    #[schema(value_type = Option<String>)]
    pub metering_lag_s: Option<Decimal>,
    /// The interval the two figures above cover, ms (0 before two readings).
    pub window_ms: i64,
    /// Now minus the bucket time of the oldest undelivered outbox row, seconds (0: none).
    pub stripe_forward_lag_s: i64,
    /// Agents.
    pub agents: AgentsFigure,
    /// The outbox.
    pub outbox: OutboxFigure,
    /// Discrepancies in the last reconciliation (`null`: none has run yet).
    pub reconciliation_discrepancies: Option<u64>,
    /// Quarantined batches (counted up to 1,000).
    pub quarantined: u64,
    /// True when there are more than `quarantined`.
    pub quarantined_more: bool,
}

#[utoipa::path(get, path = "/v1/overview", tag = "overview",
    responses((status = 200, body = Overview), (status = 401, body = ErrorBody)))]
pub(super) async fn overview(State(shared): St) -> ApiResult<Overview> {
    let now = shared.now_ms();
    let m = &shared.metrics;
    let (lag_sum_ms, lag_count) =
        histogram_totals(&m.encode(), "tally_collector_metering_lag_seconds").unwrap_or((0, 0));
    let rates = shared.overview.offer(Reading {
        at_ms: now,
        deltas: m.deltas.get(),
        lag_sum_ms,
        lag_count,
    });
    let (agents, epochs, stats, quarantined) = blocking(&shared, |s| {
        let q = s.store.quarantined(0, QUARANTINE_COUNT_MAX + 1)?.len();
        let stats = s.store.stats()?;
        Ok((s.store.agents()?, s.store.epochs()?, stats, q))
    })
    .await?;
    let mut fig = AgentsFigure {
        connected: 0,
        offline: 0,
        offline_with_backlog: 0,
        offline_backlog_batches: 0,
        revoked: 0,
    };
    for a in &agents {
        if a.revoked_at_ms.is_some() {
            fig.revoked += 1;
        } else if shared.registry.live_connections(a.id) > 0 {
            fig.connected += 1;
        } else {
            fig.offline += 1;
            let missing = epochs
                .iter()
                .filter(|e| e.agent == a.id)
                .max_by_key(|e| e.epoch)
                .map_or(0, |e| missing_seqs(&e.dedup));
            if missing > 0 {
                fig.offline_with_backlog += 1;
                fig.offline_backlog_batches += missing;
            }
        }
    }
    let status = shared.forwarding.stripe_status();
    Ok(axum::Json(Overview {
        at_ms: now,
        deltas_total: m.deltas.get(),
        deltas_per_s: rates.deltas_per_s,
        metering_lag_s: rates.metering_lag_s,
        window_ms: rates.window_ms,
        stripe_forward_lag_s: stats
            .oldest_pending_timestamp_s
            .map_or(0, |t| (now / 1000 - t).max(0)),
        agents: fig,
        outbox: OutboxFigure {
            pending: stats.pending_rows,
            unmapped: status.unmapped.values().sum(),
            dead: stats.dead_rows,
            unknown: stats.unknown_rows,
        },
        reconciliation_discrepancies: shared
            .forwarding
            .stripe
            .last_reconciliation()
            .map(|r| r.discrepancies.len() as u64),
        quarantined: quarantined.min(QUARANTINE_COUNT_MAX) as u64,
        quarantined_more: quarantined > QUARANTINE_COUNT_MAX,
    }))
}

/// A histogram's `_sum` (as ms, rounded down) and `_count` from the Prometheus text exposition:
/// the same figures `/metrics` shows (the client library reads them back only in its tests).
pub fn histogram_totals(text: &str, name: &str) -> Option<(u64, u64)> {
    let value = |suffix: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(suffix)?;
            let v = rest.strip_prefix(' ')?.split(' ').next()?;
            Some(v.to_owned())
        })
    };
    let sum = value("_sum")?;
    let sum = Decimal::from_str_exact(&sum)
        .or_else(|_| Decimal::from_scientific(&sum))
        .ok()?;
    let count: u64 = value("_count")?.parse().ok()?;
    let ms = (sum.max(Decimal::ZERO) * Decimal::from(1000)).trunc();
    Some((u64::try_from(ms).unwrap_or(u64::MAX), count))
}

/// Seqs below the highest durable one that are not durable yet (holes above the watermark).
pub fn missing_seqs(d: &crate::core::dedup::DedupState) -> u64 {
    d.missing()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(at_ms: i64, deltas: u64) -> Reading {
        Reading {
            at_ms,
            deltas,
            lag_sum_ms: 0,
            lag_count: 0,
        }
    }

    #[test]
    fn histogram_totals_read_the_exposition() {
        let text = "# HELP x_seconds lag\nx_seconds_sum 1.5\nx_seconds_count 3\nx_seconds_bucket{le=\"0.1\"} 0\n";
        assert_eq!(histogram_totals(text, "x_seconds"), Some((1500, 3)));
        assert_eq!(histogram_totals(text, "y_seconds"), None);
        assert_eq!(
            histogram_totals("x_seconds_sum 1e-3\nx_seconds_count 1\n", "x_seconds"),
            Some((1, 1))
        );
        assert_eq!(
            histogram_totals("x_seconds_sum NaN\nx_seconds_count 1\n", "x_seconds"),
            None
        );
    }

    #[test]
    fn rates_are_between_kept_readings_and_stable_in_between() {
        let mut s = Sampler::default();
        assert_eq!(s.offer(r(0, 0)).deltas_per_s, None);
        let first = s.offer(r(1_000, 10));
        assert_eq!(
            first.deltas_per_s.unwrap().to_string(),
            "10.00",
            "since the first"
        );
        assert_eq!(s.ring.len(), 1, "too soon: not kept");
        let a = s.offer(r(5_000, 100));
        assert_eq!(a.deltas_per_s.unwrap().to_string(), "20.00");
        assert_eq!(a.metering_lag_s, None);
        // Between readings the answer does not move.
        assert_eq!(s.offer(r(6_000, 200)), a);
        // The ring is bounded.
        for i in 0..100 {
            s.offer(r(10_000 + i * 5_000, 200 + i as u64));
        }
        assert_eq!(s.ring.len(), SAMPLES_MAX);
        // A counter that went back (a new registry) starts over.
        assert_eq!(s.offer(r(1_000_000, 0)).window_ms, 0);
    }
}
