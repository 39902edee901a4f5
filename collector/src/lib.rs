//! The Tally collector: verified, exactly-once ingest into a double-entry ledger.
//!
//! Sans-IO core (plain functions and values; no sockets, clocks or files):
//! - [`dedup`]: which batches of an `(agent, epoch)` are done.
//! - [`ledger`]: accounts, transfers, posting rules, verification.
//! - [`registry`]: who may connect (enrolment, revocation).
//!
//! Shells:
//! - [`store`] (the storage trait) and [`redb_store`] (the embedded implementation).
//! - [`stripe_store`] (the Stripe outbox in the embedded store) and [`stripe`] (the forwarder's
//!   lifecycle, configuration and reconciliation; SPEC §6.4).
//! - [`ingest`]: the group committer between connections and the store.
//! - [`quic`]: the QUIC server (handshake, batches, acks, pushes).
//! - [`api`]: the admin HTTP API.
//! - [`metrics`]: Prometheus metrics.
//! - [`mod@init`], [`config`], [`server`], [`dev`]: files on disk, configuration, starting it
//!   all, and the one-process quickstart.
//! - [`testkit`]: a bare protocol client for tests and benchmarks.
//!
//! Starting a collector in-process (ports 0 pick free ones):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/tmp/tally");
//! let files = tally_collector::init(dir, &[])?; // CA, certificate, tokens; never overwrites
//! let handle = tally_collector::Collector::start(tally_collector::CollectorConfig::ephemeral(dir)).await?;
//! println!("quic {} http {} ca {}", handle.quic_addr(), handle.http_addr(), files.ca_pem.display());
//! let _token = handle.admin_token(); // a secret: never log it
//! handle.shutdown().await; // acks flushed, queue committed
//! # Ok(()) }
//! ```

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
pub mod stripe;
pub mod stripe_store;
pub mod testkit;

pub use init::{InitFiles, init};
pub use server::{Collector, CollectorConfig, CollectorHandle};
