//! What the product does to the system in one run, chosen by the seed: which agent records,
//! for which customer, meter and dimensions, how much (exact decimals), through which call
//! (`record`, `record_event` with an id that is sometimes repeated, `record_durable`), and
//! adjustments posted through the collector (some retried with the same key).
//!
//! [`Op`] is the seam later features grow: entitlement checks and leases become new variants,
//! and the run and the auditor learn them one variant at a time.

use super::rng::Rng;
use rust_decimal::Decimal;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

/// Customers of the simulated product (`cus_…` names map to themselves in Stripe).
pub const CUSTOMERS: [&str; 4] = ["cus_ada", "cus_bob", "cus_cyd", "cus_dee"];

/// The meters: name, Stripe event name (none: not forwarded), Stripe unit scale as
/// (mantissa, scale) of a decimal.
pub const METERS: [(&str, Option<&str>, (i64, u32)); 3] = [
    ("calls", Some("calls"), (1, 0)),
    ("storage_gb", Some("storage_mb"), (1000, 0)),
    ("tokens", None, (1, 0)),
];

/// The catalog's definition of meter `i` of [`METERS`].
pub fn meter_def(i: usize) -> MeterDef {
    let (name, event, (m, s)) = METERS[i];
    MeterDef {
        name: MeterName::new(name).expect("a valid meter name"),
        aggregation: Aggregation::Sum,
        event_type: name.to_owned(),
        value_property: Some(String::from("$.value")),
        group_by: Default::default(),
        stripe_event_name: event.map(str::to_owned),
        stripe_unit_scale: Decimal::new(m, s),
    }
}

/// One unit of usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Who pays.
    pub customer: CustomerId,
    /// What was used.
    pub meter: MeterName,
    /// Dimensions (none or one `region`).
    pub dimensions: Dimensions,
    /// How much, never zero.
    pub quantity: Decimal,
}

/// One thing the product does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `record` on an agent: in memory until the next seal (lost in a crash before it).
    Record {
        /// Which agent.
        agent: usize,
        /// What.
        usage: Usage,
    },
    /// `record_event` with an idempotency id: durable, counted once per id and agent.
    RecordEvent {
        /// Which agent.
        agent: usize,
        /// The id (sometimes one used before: a retried request).
        id: String,
        /// What.
        usage: Usage,
    },
    /// `record_durable`: on the agent's disk when it returns.
    RecordDurable {
        /// Which agent.
        agent: usize,
        /// What.
        usage: Usage,
    },
    /// An adjustment through the collector's admin API, retried until answered.
    Adjust {
        /// Idempotency key (sometimes one used before, with the same fields).
        key: String,
        /// What (positive quantities: see decision 0072).
        usage: Usage,
    },
}

/// The seed's workload.
#[derive(Debug)]
pub struct Workload {
    rng: Rng,
    agents: usize,
    /// Ops per tick, in thousandths.
    rate_milli: u64,
    next_id: u64,
    /// Ids used per agent (a retry reuses one).
    ids: Vec<Vec<(String, Usage)>>,
    adjustments: Vec<(String, Usage)>,
}

impl Workload {
    /// The workload of `rng` over `agents` agents.
    pub fn new(mut rng: Rng, agents: usize) -> Self {
        let rate_milli = 200 + rng.below(1_800);
        Workload {
            rng,
            agents,
            rate_milli,
            next_id: 0,
            ids: vec![Vec::new(); agents],
            adjustments: Vec::new(),
        }
    }

    /// The ops of one tick.
    pub fn tick(&mut self) -> Vec<Op> {
        let mut n = self.rate_milli / 1000;
        if self.rng.below(1000) < self.rate_milli % 1000 {
            n += 1;
        }
        (0..n).map(|_| self.op()).collect()
    }

    fn usage(&mut self) -> Usage {
        let customer = CustomerId::new(*self.rng.pick(&CUSTOMERS)).expect("valid customer");
        let meter = MeterName::new(self.rng.pick(&METERS).0).expect("valid meter");
        let region = *self.rng.pick(&[None, Some("eu"), Some("us")]);
        let dimensions =
            Dimensions::from_strs(region.map(|r| ("region", r))).expect("valid dimensions");
        let scale = self.rng.below(4) as u32;
        let quantity = Decimal::new(self.rng.range(1, 50_000), scale);
        Usage {
            customer,
            meter,
            dimensions,
            quantity,
        }
    }

    fn op(&mut self) -> Op {
        let agent = self.rng.below(self.agents as u64) as usize;
        match self.rng.below(100) {
            0..40 => Op::Record {
                agent,
                usage: self.usage(),
            },
            40..70 => {
                if !self.ids[agent].is_empty() && self.rng.below(4) == 0 {
                    let (id, usage) = self.rng.pick(&self.ids[agent]).clone();
                    return Op::RecordEvent { agent, id, usage };
                }
                self.next_id += 1;
                let id = format!("evt-{}", self.next_id);
                let usage = self.usage();
                if self.ids[agent].len() < 256 {
                    self.ids[agent].push((id.clone(), usage.clone()));
                }
                Op::RecordEvent { agent, id, usage }
            }
            70..97 => Op::RecordDurable {
                agent,
                usage: self.usage(),
            },
            _ => {
                if !self.adjustments.is_empty() && self.rng.below(3) == 0 {
                    let (key, usage) = self.rng.pick(&self.adjustments).clone();
                    return Op::Adjust { key, usage };
                }
                self.next_id += 1;
                let key = format!("adj-{}", self.next_id);
                let usage = self.usage();
                if self.adjustments.len() < 256 {
                    self.adjustments.push((key.clone(), usage.clone()));
                }
                Op::Adjust { key, usage }
            }
        }
    }
}
