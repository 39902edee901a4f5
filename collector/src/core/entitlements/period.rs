//! The period a limit counts in: the calendar month (UTC) holding `now_ms`, or the month-long
//! period starting on the customer's anchor day (a day past the month's end counts as its last
//! day, so an anchor of 31 resets on 30 April and 28 or 29 February).

use tally_clock::calendar::{civil_from_ms, days_from_civil};

const DAY_MS: i64 = 86_400_000;

/// `[start, end)` in ms since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeriodRange {
    /// First ms of the period.
    pub start_ms: i64,
    /// First ms after it.
    pub end_ms: i64,
}

impl PeriodRange {
    /// True when `ms` is in the period.
    pub fn contains(&self, ms: i64) -> bool {
        self.start_ms <= ms && ms < self.end_ms
    }
}

fn days_in_month(y: i64, m: i64) -> i64 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1)
}

fn add_months(y: i64, m: i64, k: i64) -> (i64, i64) {
    let idx = y * 12 + (m - 1) + k;
    (idx.div_euclid(12), idx.rem_euclid(12) + 1)
}

/// Start of the anchored day in month `(y, m)`, ms.
fn anchored(y: i64, m: i64, anchor_day: u8) -> i64 {
    let d = i64::from(anchor_day.clamp(1, 31)).min(days_in_month(y, m));
    days_from_civil(y, m, d).saturating_mul(DAY_MS)
}

/// The calendar month (UTC) holding `now_ms`.
pub fn calendar_month(now_ms: i64) -> PeriodRange {
    anchored_period(now_ms, 1)
}

/// The period holding `now_ms` that starts on `anchor_day` (1–31) of a month.
pub fn anchored_period(now_ms: i64, anchor_day: u8) -> PeriodRange {
    let (y, m, _) = civil_from_ms(now_ms);
    let this = anchored(y, m, anchor_day);
    let (sy, sm) = if now_ms >= this {
        (y, m)
    } else {
        add_months(y, m, -1)
    };
    let (ey, em) = add_months(sy, sm, 1);
    PeriodRange {
        start_ms: anchored(sy, sm, anchor_day),
        end_ms: anchored(ey, em, anchor_day),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(y: i64, m: i64, d: i64) -> i64 {
        days_from_civil(y, m, d) * DAY_MS
    }

    #[test]
    fn calendar_months_and_anchor_days() {
        let p = calendar_month(ms(2026, 12, 2) + 5);
        assert_eq!((p.start_ms, p.end_ms), (ms(2026, 12, 1), ms(2027, 1, 1)));
        let p = anchored_period(ms(2026, 12, 2), 15);
        assert_eq!((p.start_ms, p.end_ms), (ms(2026, 11, 15), ms(2026, 12, 15)));
        let p = anchored_period(ms(2026, 12, 15), 15);
        assert_eq!((p.start_ms, p.end_ms), (ms(2026, 12, 15), ms(2027, 1, 15)));
        // An anchor of 31 falls on the month's last day.
        let p = anchored_period(ms(2027, 3, 1), 31);
        assert_eq!((p.start_ms, p.end_ms), (ms(2027, 2, 28), ms(2027, 3, 31)));
    }

    proptest! {
        #[test]
        fn every_instant_is_in_its_period_and_periods_tile(now in 0i64..4_000_000_000_000, day in 1u8..=31) {
            let p = anchored_period(now, day);
            prop_assert!(p.contains(now));
            let next = anchored_period(p.end_ms, day);
            prop_assert_eq!(next.start_ms, p.end_ms);
            let prev = anchored_period(p.start_ms - 1, day);
            prop_assert_eq!(prev.end_ms, p.start_ms);
        }
    }
}
