//! Retry classes, backoff and pacing, with no I/O.
//!
//! [`classify`] turns one HTTP exchange into what to do with the events it carried
//! (SPEC §6.4): delivered, retry (429 honouring `Retry-After`, 5xx, `lock_timeout`, network
//! errors; `Stripe-Should-Retry` overrides), session expired (v2), or dead letter with Stripe's
//! code and message. 401/403 (our key, not the events) are retried, never dead-lettered. [`Backoff`] is exponential with jitter; [`TokenBucket`] paces requests.
//! Everything takes `now` or a random number from the caller.

use std::time::Duration;

use serde::Deserialize;

use crate::stripe::outbox::StripeError;

/// One HTTP answer as the engine sees it (the transport fills it in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` in seconds, if present and numeric.
    pub retry_after_s: Option<u64>,
    /// `Stripe-Should-Retry`, if present.
    pub should_retry: Option<bool>,
    /// The response body.
    pub body: String,
}

/// What to do with the events of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stripe has them.
    Delivered,
    /// Try again later; `unknown` when Stripe may have processed the request.
    Retry {
        /// Minimum wait Stripe asked for.
        after: Option<Duration>,
        /// Whether the request may have been processed.
        unknown: bool,
        /// What Stripe said, if anything.
        error: Option<StripeError>,
    },
    /// v2: the session token expired; renew it and resend at once.
    SessionExpired,
    /// Permanent rejection.
    Dead(StripeError),
}

#[derive(Debug, Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorFields,
}

#[derive(Debug, Deserialize, Default)]
struct ErrorFields {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Stripe's `{"error":{…}}` as a [`StripeError`] (lenient: a missing body still yields one).
pub fn parse_error(status: u16, body: &str) -> StripeError {
    let parsed: ErrorBody = serde_json::from_str(body).unwrap_or_default();
    let e = parsed.error;
    StripeError {
        status,
        code: e
            .code
            .or(e.kind)
            .unwrap_or_else(|| format!("http_{status}")),
        message: e
            .message
            .unwrap_or_else(|| body.chars().take(500).collect()),
    }
}

/// The `type` field of a Stripe error body, if any.
pub fn error_type(body: &str) -> Option<String> {
    serde_json::from_str::<ErrorBody>(body).ok()?.error.kind
}

/// Classifies one answer. `identifier` is ours when the request carried exactly one event
/// (v1), so "already exists with identifier" for it means delivered.
pub fn classify(answer: &Answer, identifier: Option<&str>) -> Outcome {
    let s = answer.status;
    if (200..300).contains(&s) {
        return Outcome::Delivered;
    }
    let err = parse_error(s, &answer.body);
    if s == 400
        && let Some(id) = identifier
        && err.message.contains("already exists with identifier")
        && err.message.contains(id)
    {
        return Outcome::Delivered;
    }
    if s == 401 && error_type(&answer.body).as_deref() == Some("temporary_session_expired") {
        return Outcome::SessionExpired;
    }
    let retry_after = answer.retry_after_s.map(Duration::from_secs);
    if s == 401 || s == 403 {
        // Our key is wrong or lacks a permission: not the events' fault. Keep them and retry
        // (with backoff) until an operator fixes the key, rather than dead-lettering all usage.
        return Outcome::Retry {
            after: retry_after,
            unknown: false,
            error: Some(err),
        };
    }
    let transient = s == 429 || s >= 500 || err.code == "lock_timeout" || s == 409;
    match answer.should_retry {
        Some(true) => Outcome::Retry {
            after: retry_after,
            unknown: s >= 500,
            error: Some(err),
        },
        Some(false) if s < 500 => Outcome::Dead(err),
        // A 5xx may have been processed: never dead-letter it silently; keep it unknown.
        _ if transient => Outcome::Retry {
            after: retry_after,
            unknown: s >= 500,
            error: Some(err),
        },
        _ => Outcome::Dead(err),
    }
}

/// Exponential backoff with jitter: `min(cap, base × 2^attempt) × (0.5 + 0.5·u)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (0-based); `random` is any uniformly random u64.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(20));
        let full = exp.min(self.cap);
        let half = full / 2;
        let jitter_ms = if half.as_millis() == 0 {
            0
        } else {
            random % (u64::try_from(half.as_millis()).unwrap_or(u64::MAX) + 1)
        };
        half + Duration::from_millis(jitter_ms)
    }
}

/// A token bucket: `rate` tokens a second, up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: u32,
    burst: u32,
    /// Tokens × 1000 (milli-tokens), to stay in integers.
    milli_tokens: u64,
    last_ms: i64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u32, burst: u32, now_ms: i64) -> Self {
        let rate_per_s = rate_per_s.max(1);
        let burst = burst.max(1);
        Self {
            rate_per_s,
            burst,
            milli_tokens: u64::from(burst) * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes one token, or says how long to wait for it.
    pub fn try_take(&mut self, now_ms: i64) -> Result<(), Duration> {
        let elapsed = u64::try_from((now_ms - self.last_ms).max(0)).unwrap_or(0);
        self.last_ms = self.last_ms.max(now_ms);
        let cap = u64::from(self.burst) * 1000;
        self.milli_tokens = (self.milli_tokens + elapsed * u64::from(self.rate_per_s)).min(cap);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            Ok(())
        } else {
            let missing = 1000 - self.milli_tokens;
            Err(Duration::from_millis(
                missing.div_ceil(u64::from(self.rate_per_s)).max(1),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ans(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.into(),
            ..Answer::default()
        }
    }

    #[test]
    fn classes() {
        assert_eq!(classify(&ans(200, "{}"), None), Outcome::Delivered);
        let dup = r#"{"error":{"type":"invalid_request_error","message":"An event already exists with identifier tly-1."}}"#;
        assert_eq!(classify(&ans(400, dup), Some("tly-1")), Outcome::Delivered);
        assert!(matches!(
            classify(&ans(400, dup), Some("tly-2")),
            Outcome::Dead(_)
        ));
        let mut a = ans(429, r#"{"error":{"type":"rate_limit_error"}}"#);
        a.retry_after_s = Some(2);
        assert_eq!(
            classify(&a, None),
            Outcome::Retry {
                after: Some(Duration::from_secs(2)),
                unknown: false,
                error: Some(parse_error(429, &a.body))
            }
        );
        assert!(matches!(
            classify(&ans(500, ""), None),
            Outcome::Retry { unknown: true, .. }
        ));
        let lock =
            r#"{"error":{"type":"invalid_request_error","code":"lock_timeout","message":"x"}}"#;
        assert!(matches!(
            classify(&ans(400, lock), None),
            Outcome::Retry { .. }
        ));
        let missing = r#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such customer"}}"#;
        match classify(&ans(400, missing), None) {
            Outcome::Dead(e) => assert_eq!((e.code.as_str(), e.status), ("resource_missing", 400)),
            o => panic!("{o:?}"),
        }
        let exp = r#"{"error":{"type":"temporary_session_expired","code":"billing_meter_event_session_expired","message":"x"}}"#;
        assert_eq!(classify(&ans(401, exp), None), Outcome::SessionExpired);
        let mut forced = ans(400, missing);
        forced.should_retry = Some(true);
        assert!(matches!(classify(&forced, None), Outcome::Retry { .. }));
        let bad_key = r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided: sk_test_****"}}"#;
        assert!(matches!(
            classify(&ans(401, bad_key), None),
            Outcome::Retry { unknown: false, .. }
        ));
        assert!(matches!(
            classify(&ans(403, ""), None),
            Outcome::Retry { .. }
        ));
        let mut no = ans(429, "");
        no.should_retry = Some(false);
        assert!(matches!(classify(&no, None), Outcome::Dead(_)));
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert!(b.delay(0, 0) >= Duration::from_millis(50));
        assert!(b.delay(0, u64::MAX) <= Duration::from_millis(100));
        assert!(b.delay(30, u64::MAX) <= Duration::from_secs(1));
        assert!(b.delay(3, 0) >= Duration::from_millis(400));
    }

    #[test]
    fn bucket_paces() {
        let mut t = TokenBucket::new(10, 2, 0);
        assert!(t.try_take(0).is_ok());
        assert!(t.try_take(0).is_ok());
        let wait = t.try_take(0).err().unwrap_or_default();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(t.try_take(100).is_ok());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any answer classifies without panicking; 2xx is always delivered and a 5xx is never
        /// silently dropped into a dead letter unless Stripe said not to retry.
        #[test]
        fn classify_is_total(status in 100u16..600, body in ".{0,200}", retry in proptest::option::of(any::<bool>())) {
            let a = Answer { status, retry_after_s: None, should_retry: retry, body };
            let o = classify(&a, Some("tly-x"));
            if (200..300).contains(&status) {
                prop_assert_eq!(o, Outcome::Delivered);
            } else if status >= 500 && retry != Some(false) {
                let is_retry = matches!(o, Outcome::Retry { .. });
                prop_assert!(is_retry);
            }
        }
    }
}
