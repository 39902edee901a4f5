//! A sans-IO model of Stripe's v1 meter events as the forwarder sees them: an event is counted
//! once per `identifier` (a second one answers 400 "An event already exists with identifier …",
//! which the forwarder takes as delivered), requests take a latency, and the fault schedule
//! makes some answer 500 or 429 without processing, and some get processed and then answer 500
//! or lose the answer. Answers go back to the forwarder incarnation that asked; one that died
//! meanwhile never hears.

use super::faults::StripeRates;
use super::rng::Rng;
use std::collections::BTreeMap;
use tally_forward::retry::Answer;
use tally_forward::stripe::client::MeterEvent;
use tally_forward::stripe::dispatch::JobId;

/// Most requests in flight.
pub const MAX_REQUESTS: usize = 10_000;

#[derive(Debug)]
struct InFlight {
    incarnation: u64,
    job: JobId,
    event: MeterEvent,
}

/// An answer for the forwarder (`None`: it timed out).
#[derive(Debug)]
pub struct Reply {
    /// The forwarder incarnation that sent the request.
    pub incarnation: u64,
    /// Its job.
    pub job: JobId,
    /// What came back.
    pub answer: Option<Answer>,
}

/// Counts for the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct StripeStats {
    /// Requests received.
    pub requests: u64,
    /// Answered 500 or 429 without processing.
    pub refused: u64,
    /// Processed, then answered 500 or not at all.
    pub processed_unknown: u64,
    /// Identifiers sent again after they were counted.
    pub duplicates: u64,
}

/// Stripe.
#[derive(Debug)]
pub struct Stripe {
    rng: Rng,
    /// Fault rates in force.
    pub rates: StripeRates,
    /// The forwarder's request timeout, ms (a lost answer is a timeout).
    pub timeout_ms: i64,
    requests: BTreeMap<(i64, u64), InFlight>,
    replies: BTreeMap<(i64, u64), Reply>,
    order: u64,
    /// Counted events by identifier.
    pub events: BTreeMap<String, MeterEvent>,
    /// Counts.
    pub stats: StripeStats,
}

fn answer(status: u16, retry_after_s: Option<u64>, body: String) -> Answer {
    Answer {
        status,
        retry_after_s,
        should_retry: None,
        body,
    }
}

impl Stripe {
    /// Stripe drawing from `rng`.
    pub fn new(rng: Rng, rates: StripeRates, timeout_ms: i64) -> Self {
        Stripe {
            rng,
            rates,
            timeout_ms,
            requests: BTreeMap::new(),
            replies: BTreeMap::new(),
            order: 0,
            events: BTreeMap::new(),
            stats: StripeStats::default(),
        }
    }

    /// A v1 request arrives (after a latency).
    pub fn send(&mut self, incarnation: u64, job: JobId, event: MeterEvent, now_ms: i64) {
        self.order += 1;
        if self.requests.len() >= MAX_REQUESTS {
            self.replies.insert(
                (now_ms + self.timeout_ms, self.order),
                Reply {
                    incarnation,
                    job,
                    answer: None,
                },
            );
            return;
        }
        let at = now_ms + self.rng.range(5, 150);
        self.requests.insert(
            (at, self.order),
            InFlight {
                incarnation,
                job,
                event,
            },
        );
    }

    /// Processes the requests due and returns the answers due, in order.
    pub fn step(&mut self, now_ms: i64) -> Vec<Reply> {
        while let Some((&key, _)) = self.requests.iter().next() {
            if key.0 > now_ms {
                break;
            }
            let r = self.requests.remove(&key).expect("just seen");
            self.stats.requests += 1;
            let (at, ans) = self.process(r.event, now_ms);
            self.order += 1;
            self.replies.insert(
                (at, self.order),
                Reply {
                    incarnation: r.incarnation,
                    job: r.job,
                    answer: ans,
                },
            );
        }
        let mut out = Vec::new();
        while let Some((&key, _)) = self.replies.iter().next() {
            if key.0 > now_ms {
                break;
            }
            out.push(self.replies.remove(&key).expect("just seen"));
        }
        out
    }

    fn process(&mut self, event: MeterEvent, now_ms: i64) -> (i64, Option<Answer>) {
        let back = now_ms + self.rng.range(5, 150);
        let err = |code: &str| {
            format!(r#"{{"error":{{"type":"api_error","code":"{code}","message":"{code}"}}}}"#)
        };
        if self.rng.chance_ppm(self.rates.error_ppm) {
            self.stats.refused += 1;
            return (back, Some(answer(500, None, err("api_error"))));
        }
        if self.rng.chance_ppm(self.rates.throttle_ppm) {
            self.stats.refused += 1;
            return (back, Some(answer(429, Some(1), err("rate_limit"))));
        }
        let ok = if self.events.contains_key(&event.identifier) {
            self.stats.duplicates += 1;
            answer(
                400,
                None,
                format!(
                    r#"{{"error":{{"type":"invalid_request_error","message":"An event already exists with identifier {}."}}}}"#,
                    event.identifier
                ),
            )
        } else {
            self.events.insert(event.identifier.clone(), event);
            answer(200, None, String::from("{}"))
        };
        if self.rng.chance_ppm(self.rates.lost_after_ppm) {
            self.stats.processed_unknown += 1;
            return (now_ms + self.timeout_ms, None);
        }
        if self.rng.chance_ppm(self.rates.error_after_ppm) {
            self.stats.processed_unknown += 1;
            return (back, Some(answer(500, None, err("api_error"))));
        }
        (back, Some(ok))
    }

    /// Whether anything is in flight.
    pub fn idle(&self) -> bool {
        self.requests.is_empty() && self.replies.is_empty()
    }

    /// Σ value per (Stripe customer, event name).
    pub fn totals(&self) -> BTreeMap<(String, String), u64> {
        let mut t = BTreeMap::new();
        for e in self.events.values() {
            *t.entry((e.stripe_customer.clone(), e.event_name.clone()))
                .or_insert(0) += e.value;
        }
        t
    }
}
