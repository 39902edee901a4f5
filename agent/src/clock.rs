//! Wall-clock time in milliseconds since the Unix epoch.
//!
//! The hot path reads a *coarse* clock (`CLOCK_REALTIME_COARSE` on Linux: a vDSO read of the
//! kernel's last tick, a few nanoseconds, resolution of one scheduler tick, 1–4 ms). Event times
//! of `record()` are therefore accurate to a few milliseconds, which is far finer than the
//! one-minute buckets they are aggregated into. Everything else uses [`now_ms`].

use std::time::{SystemTime, UNIX_EPOCH};

/// The precise wall clock, ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The coarse wall clock used on the hot path, ms since the Unix epoch.
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
        return now_ms();
    }
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// The coarse wall clock used on the hot path, ms since the Unix epoch.
#[cfg(not(target_os = "linux"))]
pub fn coarse_now_ms() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_tracks_the_precise_clock() {
        for _ in 0..100 {
            let a = now_ms();
            let c = coarse_now_ms();
            let b = now_ms();
            // The coarse clock lags by at most a tick (allow a generous 50 ms).
            assert!(c <= b && c + 50 >= a, "{a} {c} {b}");
        }
    }
}
