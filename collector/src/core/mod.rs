//! The sans-IO rules: plain values and functions, no sockets, clocks, files or threads.
//!
//! - [`dedup`]: which batches of an `(agent, epoch)` are done.
//! - [`entitlements`]: plans, overrides, grants, periods, snapshots and the lease book.
//! - [`ingest`]: the order of ingest steps over a narrow read/write trait.
//! - [`ledger`]: accounts, transfers, posting rules, verification.
//! - [`registry`]: who may connect (enrolment, revocation).
//! - [`session`]: the collector's side of an agent session, as a state machine.

pub mod dedup;
pub mod entitlements;
pub mod ingest;
pub mod ledger;
pub mod registry;
pub mod session;
