//! The sans-IO rules: plain values and functions, no sockets, clocks, files or threads.
//!
//! - [`dedup`]: which batches of an `(agent, epoch)` are done.
//! - [`ingest`]: the order of ingest steps over a narrow read/write trait.
//! - [`ledger`]: accounts, transfers, posting rules, verification.
//! - [`registry`]: who may connect (enrolment, revocation).

pub mod dedup;
pub mod ingest;
pub mod ledger;
pub mod registry;
