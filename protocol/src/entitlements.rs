//! Entitlement snapshots the collector pushes to agents (versioned), and the lease messages that
//! keep hard limits from overshooting across agents.

use crate::bounded::BoundedVec;
use crate::names::{CustomerId, MeterName};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Most customers in one snapshot frame; larger snapshots are sent in several frames.
pub const MAX_CUSTOMERS_PER_PUSH: usize = 10_000;
/// Most features or limits per customer.
pub const MAX_ITEMS_PER_CUSTOMER: usize = 256;
/// Longest feature name, in bytes.
pub const MAX_FEATURE_BYTES: usize = 128;

/// Whether a limit denies usage past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Usage past the limit is refused.
    Hard,
    /// Usage past the limit is allowed and reported.
    Soft,
}

/// One metered limit of a customer in the current period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterLimit {
    /// The meter.
    pub meter: MeterName,
    /// Included plus active grants.
    #[serde(with = "crate::wire_decimal")]
    pub limit: Decimal,
    /// Used so far in the period, as the ledger knows it.
    #[serde(with = "crate::wire_decimal")]
    pub used: Decimal,
    /// Hard or soft.
    pub enforcement: Enforcement,
}

/// What one customer may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerEntitlements {
    /// The customer.
    pub customer: CustomerId,
    /// Features the customer has.
    pub features: BoundedVec<String, MAX_ITEMS_PER_CUSTOMER>,
    /// Metered limits.
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

/// An agent asks for part of a customer's remaining hard-limited quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Echoed in the grant.
    pub request_id: u64,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// How much the agent would like.
    #[serde(with = "crate::wire_decimal")]
    pub quantity: Decimal,
}

/// The collector's answer to a [`LeaseRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The request this answers.
    pub request_id: u64,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// How much the agent may use; zero when nothing remains.
    #[serde(with = "crate::wire_decimal")]
    pub granted: Decimal,
    /// When the lease lapses, ms since the Unix epoch.
    pub expires_at_ms: i64,
}
