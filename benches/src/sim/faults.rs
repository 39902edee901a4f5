//! The seed's fault schedule. Each class of fault is switched on for a seed with some
//! probability and then fires at a rate drawn for that seed, so some seeds are calm and some
//! are storms (as in TigerBeetle's VOPR): packet loss, duplication, reordering, delay and broken
//! connections; agent crashes at any step (between steps, and between a write and its fsync);
//! collector crashes, sometimes down for many flush intervals; an agent disk that fills up under
//! its overflow policy; Stripe 500s, 429s and answers lost after processing; one agent revoked.
//!
//! Faults stop at the end of the workload; the run then heals everything and drains.

use super::net::NetRates;
use super::rng::Rng;
use tally_agent::Overflow;

/// Stripe's misbehaviour, parts per million per request.
#[derive(Debug, Clone, Copy, Default)]
pub struct StripeRates {
    /// 500 without processing.
    pub error_ppm: u32,
    /// 429 with `Retry-After: 1`, without processing.
    pub throttle_ppm: u32,
    /// Processed, then the answer is lost (a timeout for the forwarder).
    pub lost_after_ppm: u32,
    /// Processed, then 500.
    pub error_after_ppm: u32,
}

/// The fault schedule of one seed.
#[derive(Debug, Clone)]
pub struct Faults {
    /// The network's rates while faults run.
    pub net: NetRates,
    /// An agent crashes at a tick, per agent (ppm).
    pub agent_crash_ppm: u32,
    /// An agent crashes at an fsync, before it completes (ppm).
    pub crash_at_sync_ppm: u32,
    /// A crashed agent restarts after this long, ms.
    pub agent_down_ms: (i64, i64),
    /// The collector crashes at a tick (ppm).
    pub collector_crash_ppm: u32,
    /// A crashed collector restarts after this long, ms.
    pub collector_down_ms: (i64, i64),
    /// An agent's disk fills up at a tick, per agent (ppm).
    pub disk_full_ppm: u32,
    /// A full disk stays full this long (unless acks make room), ms.
    pub disk_full_ms: (i64, i64),
    /// Each agent's overflow policy.
    pub overflow: Vec<Overflow>,
    /// Stripe's misbehaviour.
    pub stripe: StripeRates,
    /// The agent revoked, and when (ms after the start).
    pub revoke: Option<(usize, i64)>,
}

fn maybe(rng: &mut Rng, on_in_4: u64, ppm_max: u32) -> u32 {
    if rng.below(4) < on_in_4 {
        (rng.below(u64::from(ppm_max)) as u32).max(1)
    } else {
        0
    }
}

impl Faults {
    /// No faults at all (the drain phase, and a calm baseline).
    pub fn none(agents: usize) -> Self {
        Faults {
            net: NetRates::perfect(),
            agent_crash_ppm: 0,
            crash_at_sync_ppm: 0,
            agent_down_ms: (0, 0),
            collector_crash_ppm: 0,
            collector_down_ms: (0, 0),
            disk_full_ppm: 0,
            disk_full_ms: (0, 0),
            overflow: vec![Overflow::Block; agents],
            stripe: StripeRates::default(),
            revoke: None,
        }
    }

    /// The schedule of a seed for `agents` agents over `duration_ms`.
    pub fn draw(rng: &mut Rng, agents: usize, duration_ms: i64) -> Self {
        let net = NetRates {
            loss_ppm: maybe(rng, 3, 200_000),
            dup_ppm: maybe(rng, 2, 20_000),
            reorder_ppm: maybe(rng, 2, 20_000),
            break_ppm: maybe(rng, 2, 10_000),
            latency_ms: (1, rng.range(2, 80)),
            retransmit_ms: (100, 600),
            idle_timeout_ms: rng.range(500, 3_000),
        };
        let long_outage = rng.below(3) == 0;
        Faults {
            net,
            agent_crash_ppm: maybe(rng, 2, 1_000),
            crash_at_sync_ppm: maybe(rng, 2, 30_000),
            agent_down_ms: (10, rng.range(20, 5_000)),
            collector_crash_ppm: maybe(rng, 2, 1_000),
            collector_down_ms: if long_outage {
                (5_000, 20_000)
            } else {
                (10, 2_000)
            },
            disk_full_ppm: maybe(rng, 2, 2_000),
            disk_full_ms: (100, rng.range(200, 10_000)),
            overflow: (0..agents)
                .map(|_| {
                    if rng.below(2) == 0 {
                        Overflow::Block
                    } else {
                        Overflow::Reject
                    }
                })
                .collect(),
            stripe: StripeRates {
                error_ppm: maybe(rng, 2, 200_000),
                throttle_ppm: maybe(rng, 2, 200_000),
                lost_after_ppm: maybe(rng, 2, 200_000),
                error_after_ppm: maybe(rng, 2, 100_000),
            },
            revoke: (rng.below(4) == 0)
                .then(|| (rng.below(agents as u64) as usize, rng.range(0, duration_ms))),
        }
    }
}
