//! Entitlement snapshots the collector pushes to agents (versioned), and the lease messages that
//! keep hard limits from overshooting across agents.
//!
//! # Snapshots
//! The collector pushes, on connect and within 1 s of any change, the entitlements of exactly the
//! customers an agent has seen: those in its batches and those it asked for with an
//! [`EntitlementsRequest`]. `version` only grows; an agent ignores a frame older than what it has.
//!
//! # Leases (hard limits)
//! One lease per (agent, customer, meter, period). The collector keeps, per lease, `granted`
//! (the lease's running total) and `shipped` (usage of that customer and meter committed from that
//! agent's batches since the lease began); the lease's outstanding part is
//! `max(0, granted − shipped)`. It grants only while
//! `used + Σ outstanding ≤ limit` still holds after the grant, so the invariant holds at every
//! instant whatever order batches and requests arrive in.
//!
//! The agent counts every unit of that customer and meter it records while the lease is open
//! (`consumed`), allows usage while `consumed + qty ≤ granted`, and asks for more
//! ([`LeaseRequest`], sized by its recent rate) before it runs out. A lease ends with a
//! [`LeaseRelease`]: the agent stops consuming under it, seals what it recorded, and names the last
//! sealed `seq` of its `epoch`; the collector keeps the outstanding part until that agent's batches
//! through `through_seq` are committed, then frees it. That is what makes a release exact: every
//! unit consumed is either counted in `used` or still held by the lease. An agent releases at
//! expiry, at a period's end, and, after a restart, every lease its disk remembers (it cannot know
//! what it consumed and lost from memory, so it does not resume them). An agent that never comes
//! back loses its lease at `expires_at_ms` plus the collector's grace; usage that arrives after
//! that is booked (usage is never dropped) and reported as overshoot.

use crate::bounded::BoundedVec;
use crate::names::{CustomerId, FeatureName, MeterName, PlanName};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Most customers in one snapshot frame; larger snapshots are sent in several frames.
pub const MAX_CUSTOMERS_PER_PUSH: usize = 10_000;
/// Most features or limits per customer.
pub const MAX_ITEMS_PER_CUSTOMER: usize = 256;
/// Most customers one [`EntitlementsRequest`] asks for.
pub const MAX_CUSTOMERS_PER_REQUEST: usize = 1_024;

/// Whether a limit denies usage past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Usage past the limit is refused.
    Hard,
    /// Usage past the limit is allowed and reported.
    Soft,
}

/// What gave a customer a feature or set a limit; every decision names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The customer's plan.
    Plan,
    /// A per-customer override.
    Override,
    /// An active Stripe entitlement (feature `lookup_key`).
    Stripe,
}

/// A feature the customer has. Features not listed are denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// The feature.
    pub name: FeatureName,
    /// What granted it.
    pub source: Source,
}

/// One metered limit of a customer in the current period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterLimit {
    /// The meter.
    pub meter: MeterName,
    /// Included in the plan or override for the period.
    #[serde(with = "crate::wire_decimal")]
    pub included: Decimal,
    /// Active grants, not yet consumed, at `built_at_ms`.
    #[serde(with = "crate::wire_decimal")]
    pub granted: Decimal,
    /// `included + granted`.
    #[serde(with = "crate::wire_decimal")]
    pub limit: Decimal,
    /// Used so far in the period, as the ledger knows it.
    #[serde(with = "crate::wire_decimal")]
    pub used: Decimal,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Plan or override.
    pub source: Source,
    /// The period this limit counts, ms since the Unix epoch: `[start, end)`.
    pub period_start_ms: i64,
    /// End of the period (exclusive).
    pub period_end_ms: i64,
}

/// What one customer may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerEntitlements {
    /// The customer.
    pub customer: CustomerId,
    /// The customer's plan, if any.
    pub plan: Option<PlanName>,
    /// Features the customer has.
    pub features: BoundedVec<Feature, MAX_ITEMS_PER_CUSTOMER>,
    /// Metered limits. A meter not listed has no limit.
    pub limits: BoundedVec<MeterLimit, MAX_ITEMS_PER_CUSTOMER>,
}

/// A versioned snapshot, or one part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EntitlementsSnapshot {
    /// Increases with every change.
    pub version: u64,
    /// When the collector built it, ms since the Unix epoch.
    pub built_at_ms: i64,
    /// True when this frame replaces everything the agent has; false when it updates the
    /// customers it lists.
    pub full: bool,
    /// The customers.
    pub customers: BoundedVec<CustomerEntitlements, MAX_CUSTOMERS_PER_PUSH>,
}

/// An agent asks for the snapshot of customers it has no entitlements for yet; the collector
/// answers with an `Entitlements` frame (`full: false`) listing each of them, known or not (an
/// unknown customer comes back with no plan, no features and no limits), and keeps pushing their
/// changes to this agent from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntitlementsRequest {
    /// The customers.
    pub customers: BoundedVec<CustomerId, MAX_CUSTOMERS_PER_REQUEST>,
}

/// An agent asks for (more of) a customer's remaining hard-limited quantity in a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Echoed in the grant.
    pub request_id: u64,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// The period the agent believes is current (`period_start_ms` of its snapshot's limit).
    pub period_start_ms: i64,
    /// How much more the agent would like, on top of what it holds.
    #[serde(with = "crate::wire_decimal")]
    pub quantity: Decimal,
}

/// The collector's answer to a [`LeaseRequest`]: the lease's new running total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The request this answers.
    pub request_id: u64,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// The lease, stable for this agent, customer, meter and period.
    pub lease_id: u64,
    /// The period the lease counts in; differs from the request's when the period rolled over.
    pub period_start_ms: i64,
    /// Everything granted on this lease so far (the agent may consume up to this, counted from
    /// the lease's start); it never decreases.
    #[serde(with = "crate::wire_decimal")]
    pub granted_total: Decimal,
    /// What this answer added; zero when nothing remains.
    #[serde(with = "crate::wire_decimal")]
    pub added: Decimal,
    /// When the agent must stop consuming under this lease and release it, ms since the Unix
    /// epoch. Every grant extends it.
    pub expires_at_ms: i64,
}

/// An agent ends a lease: it consumes nothing more under it, and everything it consumed is in
/// its batches of `epoch` up to and including `through_seq` (or was lost before it was sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRelease {
    /// The lease.
    pub lease_id: u64,
    /// The agent's epoch the `through_seq` belongs to.
    pub epoch: u64,
    /// The last batch that can hold usage consumed under the lease; 0 when none was sealed.
    pub through_seq: u64,
}
