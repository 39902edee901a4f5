//! The one clock of Tally: every component that reads time (agent, collector, forwarder) asks a
//! [`Clock`] it was given, so a test runs the whole system on virtual time with a
//! [`ManualClock`], and production uses [`SystemClock`].
//!
//! Time is Unix time in milliseconds (`i64`), the unit of every timestamp on the wire and in the
//! ledger. Sans-IO state machines do not hold a clock at all: their shells read one and pass
//! `now_ms` in.
//!
//! ```
//! use tally_clock::{Clock, ManualClock};
//!
//! let clock = ManualClock::new(1_700_000_000_000);
//! let seen_by_a_component = clock.clone();
//! clock.advance_ms(1_500);
//! assert_eq!(seen_by_a_component.now_ms(), 1_700_000_001_500);
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of Unix time in milliseconds.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// A shared clock, as components keep it.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        system_now_ms()
    }
}

/// The system wall clock, ms since the Unix epoch (0 if the clock is before 1970). Shells that
/// were not given a clock use this through [`SystemClock`].
fn system_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A virtual clock: it moves only when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(now_ms)))
    }

    /// Moves this clock (and every clone) forward by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets this clock (and every clone) to `now_ms`.
    pub fn set_ms(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system clock plus an offset a test moves forward: real time passes, and a test can jump
/// over hours (the forwarder's 23-hour rule, session expiry) without sleeping.
#[derive(Debug, Clone, Default)]
pub struct OffsetClock(Arc<AtomicI64>);

impl OffsetClock {
    /// A clock equal to the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves this clock (and every clone) forward by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> i64 {
        system_now_ms() + self.0.load(Ordering::SeqCst)
    }
}

/// The coarse wall clock for hot paths, ms since the Unix epoch.
///
/// `CLOCK_REALTIME_COARSE` on Linux: a vDSO read of the kernel's last tick, a few nanoseconds,
/// with the resolution of one scheduler tick (1–4 ms) — far finer than the one-minute buckets
/// usage is aggregated into. Elsewhere the precise clock.
#[cfg(target_os = "linux")]
pub fn coarse_now_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that lives across the call; clock_gettime only
    // writes into it. CLOCK_REALTIME_COARSE exists on every Linux since 2.6.32. Exercised by
    // `tests::coarse_clock_tracks_the_precise_clock`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc != 0 {
        return system_now_ms();
    }
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// The coarse wall clock for hot paths, ms since the Unix epoch.
#[cfg(not(target_os = "linux"))]
pub fn coarse_now_ms() -> i64 {
    system_now_ms()
}

/// The proleptic Gregorian calendar in UTC, for the few places that name days and months (ledger
/// periods, export partitions, RFC 3339): Howard Hinnant's algorithms, exact for every `i64` day
/// a timestamp in ms can name.
pub mod calendar {
    /// `(year, month 1–12, day 1–31)` of the day `days` after 1970-01-01.
    pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        (if m <= 2 { y + 1 } else { y }, m, d)
    }

    /// Days from 1970-01-01 to `(year, month, day)`.
    pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// `(year, month, day)` of the UTC day holding `ms` (ms since the Unix epoch).
    pub fn civil_from_ms(ms: i64) -> (i64, i64, i64) {
        civil_from_days(ms.div_euclid(86_400_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_tracks_the_precise_clock() {
        for _ in 0..100 {
            let a = SystemClock.now_ms();
            let c = coarse_now_ms();
            let b = SystemClock.now_ms();
            // The coarse clock lags by at most a tick (allow a generous 50 ms).
            assert!(c <= b && c + 50 >= a, "{a} {c} {b}");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let c = ManualClock::new(10);
        let d = c.clone();
        assert_eq!(d.now_ms(), 10);
        c.advance_ms(5);
        assert_eq!(d.now_ms(), 15);
        d.set_ms(100);
        assert_eq!(c.now_ms(), 100);
    }

    #[test]
    fn the_calendar_round_trips_and_knows_leap_days() {
        use calendar::*;
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_ms(951_782_400_000), (2000, 2, 29));
        assert_eq!(civil_from_ms(1_796_256_000_000), (2026, 12, 3));
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn offset_clock_follows_the_system_clock() {
        let c = OffsetClock::new();
        let before = SystemClock.now_ms();
        c.advance_ms(3_600_000);
        let t = c.now_ms();
        assert!(t >= before + 3_600_000 && t <= SystemClock.now_ms() + 3_600_000);
    }
}
