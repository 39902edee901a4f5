//! What the entitlement calls answer: every answer names the rule that decided it.

use rust_decimal::Decimal;
use tally_protocol::entitlements::{Enforcement, Source};

/// The rule that decided an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecidedBy {
    /// The customer's plan (a feature in or out of it, a limit it includes).
    Plan,
    /// A credit grant (the customer is drawing on granted quantity beyond the plan's).
    Grant,
    /// A per-customer override.
    Override,
    /// An active Stripe entitlement.
    Stripe,
    /// This agent's lease on a hard limit (its slice of the remaining quantity).
    Lease,
    /// No snapshot of this customer yet: the offline policy.
    NoSnapshot,
    /// The snapshot is older than the configured age: the offline policy.
    StaleSnapshot,
}

impl DecidedBy {
    /// The stable name used on HTTP and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Plan => "plan",
            DecidedBy::Grant => "grant",
            DecidedBy::Override => "override",
            DecidedBy::Stripe => "stripe",
            DecidedBy::Lease => "lease",
            DecidedBy::NoSnapshot => "no_snapshot",
            DecidedBy::StaleSnapshot => "stale_snapshot",
        }
    }

    pub(crate) fn from_source(s: Source) -> Self {
        Self::from(s)
    }

    /// Every value, in a fixed order (metric labels).
    pub const ALL: [DecidedBy; 7] = [
        DecidedBy::Plan,
        DecidedBy::Grant,
        DecidedBy::Override,
        DecidedBy::Stripe,
        DecidedBy::Lease,
        DecidedBy::NoSnapshot,
        DecidedBy::StaleSnapshot,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl From<Source> for DecidedBy {
    fn from(s: Source) -> Self {
        match s {
            Source::Plan => DecidedBy::Plan,
            Source::Override => DecidedBy::Override,
            Source::Stripe => DecidedBy::Stripe,
        }
    }
}

impl std::fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of `check(customer, feature)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the customer has the feature.
    pub allowed: bool,
    /// What decided.
    pub decided_by: DecidedBy,
    /// True when the answer comes from a stale snapshot or no snapshot.
    pub stale: bool,
}

/// The answer of `limit(customer, meter)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The limit of the period (`included + granted`); `None` when the meter has none.
    pub limit: Option<Decimal>,
    /// Used in the period as far as this agent knows (the snapshot's, plus what it consumed
    /// since).
    pub used: Decimal,
    /// `limit − used`, at least zero; `None` without a limit.
    pub remaining: Option<Decimal>,
    /// Hard or soft; `None` without a limit.
    pub enforcement: Option<Enforcement>,
    /// True when the snapshot is stale or missing.
    pub stale: bool,
    /// What decides consumption now.
    pub decided_by: DecidedBy,
    /// What this agent may still consume under its lease (hard limits).
    pub leased_available: Option<Decimal>,
}

/// The answer of `try_consume` (and of a reservation's commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumed {
    /// Whether the usage was allowed and recorded.
    pub allowed: bool,
    /// What was recorded (a commit may record less than asked: a hard limit caps it).
    pub recorded: Decimal,
    /// What remains after it, as far as this agent knows; `None` without a limit.
    pub remaining: Option<Decimal>,
    /// What decided.
    pub decided_by: DecidedBy,
}

/// Why an entitlement call that records usage failed (a denial is not an error: it is
/// `Consumed { allowed: false, .. }`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumeError {
    /// The usage could not be recorded (invalid names, shut down, over budget, store).
    #[error(transparent)]
    Record(#[from] crate::error::RecordError),
    /// A reservation was refused (only `reserve` answers a denial as an error: it has no
    /// reservation to return).
    #[error("denied by {decided_by}")]
    Denied {
        /// What decided.
        decided_by: DecidedBy,
        /// What remains, as far as this agent knows.
        remaining: Option<Decimal>,
        /// Whether an answer of the collector was pending (a wait may help).
        pending: bool,
    },
}

/// What a soft limit or an absent limit reports as its decider.
pub(crate) fn limit_decider(
    source: Source,
    included: Decimal,
    used: Decimal,
    granted: Decimal,
) -> DecidedBy {
    match source {
        Source::Plan if granted > Decimal::ZERO && used >= included => DecidedBy::Grant,
        s => DecidedBy::from_source(s),
    }
}
