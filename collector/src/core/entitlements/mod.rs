//! Entitlements, sans-IO (SPEC §6.3): plans, per-customer overrides, grants, periods, the
//! snapshot of what a customer may do at `now_ms`, and the lease book that keeps hard limits from
//! overshooting across agents.
//!
//! - [`model`]: plans, limits, overrides, grants and the customer's settings, with their checks.
//! - [`period`]: the period a limit counts in (calendar month or the customer's anchor day).
//! - [`build`]: a customer's entitlements at `now_ms`, and grant consumption order.
//! - [`stripe`]: Stripe Entitlements events and lookup keys as features.
//! - [`lease`]: the lease book, the pure state machine of the protocol's lease rules
//!   (`tally_protocol::entitlements`).
//!
//! Nothing here reads a clock or a store: callers pass `now_ms`, `used` and the records.

pub mod build;
pub mod lease;
pub mod model;
pub mod period;
pub mod stripe;

pub use build::{CustomerView, MeterView, build_customer};
pub use lease::{LeaseBook, LeaseBookLimits, LeaseCounters, LimitInput};
pub use model::{
    CustomerSettings, Grant, GrantRequest, LimitDef, ModelError, Overrides, Plan, Reset,
};
