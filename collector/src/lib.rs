//! The Tally collector: verified, exactly-once ingest into a double-entry ledger.
//!
//! Sans-IO core (plain functions and values; no sockets, clocks or files):
//! - [`dedup`]: which batches of an `(agent, epoch)` are done.
//! - [`ledger`]: accounts, transfers, posting rules, verification.
//! - [`registry`]: who may connect (enrolment, revocation).
//!
//! Shells:
//! - [`store`] (the storage trait) and [`redb_store`] (the embedded implementation).
//! - [`ingest`]: the group committer between connections and the store.
//! - [`quic`]: the QUIC server (handshake, batches, acks, pushes).
//! - [`api`]: the admin HTTP API.
//! - [`metrics`]: Prometheus metrics.
//! - [`init`], [`config`], [`server`]: files on disk, configuration, and starting it all.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod catalog;
pub mod config;
pub mod dedup;
pub mod dev;
pub mod ingest;
pub mod init;
pub mod ledger;
pub mod metrics;
pub mod quic;
pub mod redb_store;
pub mod registry;
pub mod server;
pub mod store;
pub mod testkit;

pub use init::{InitFiles, init};
pub use server::{Collector, CollectorConfig, CollectorHandle};
