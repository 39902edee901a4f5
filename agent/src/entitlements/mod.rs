//! Entitlements on the agent's side (SPEC §3): answers from memory to "may this customer do
//! this, now?", and the local accounting that keeps hard limits exact across agents.
//!
//! - [`cache`]: the merged snapshots as the store keeps them.
//! - [`policy`]: what decides without a current snapshot (deny, allow, allow up to a quantity).
//! - [`fast`]: the lock-free view of a meter that `try_consume` takes from with one
//!   compare-and-swap (a lease's pool, a soft limit's local count).
//! - [`meter`]: the sans-IO accounting of one (customer, meter): leases, reservations, soft
//!   overshoot, the offline allowance, refill requests sized by the recent rate.
//! - [`table`]: the concurrent index the calls answer from (striped, no lock shared with the
//!   collector session, no allocation once a customer and meter are known).
//! - [`decision`]: the answers, each naming what decided it.
//! - `api`: `Agent::check`, `limit`, `try_consume`, `reserve` and their waiting variants.
//!
//! The lease rules are those of `tally_protocol::entitlements` (module doc): the agent consumes
//! a hard-limited meter only under a lease, asks for more before it runs out, and releases a
//! lease at expiry, at the period's end, at shutdown, and after a restart for every lease its
//! disk remembers, naming the last sealed seq after sealing what it consumed.

mod api;
pub mod cache;
pub mod decision;
pub mod fast;
pub mod meter;
pub mod policy;
pub mod table;

pub use api::Reservation;
pub use cache::EntitlementsCache;
pub use decision::{ConsumeError, Consumed, DecidedBy, Decision, Limit};
pub use policy::{EntitlementsConfig, OfflinePolicy};

#[cfg(test)]
mod tests;
