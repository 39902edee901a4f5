//! The Tally collector: verified, exactly-once ingest into a double-entry ledger.
//!
//! The folders show the flow: batches come in over [`net`], the rules of [`mod@core`] decide what
//! they do, [`store`] keeps the result, [`api`] shows it to operators.
//!
//! - [`mod@core`]: the sans-IO rules (dedup, ledger, admission, the ingest order, the agent
//!   session machine): no sockets, clocks or files.
//! - [`net`]: the QUIC shell around [`core::session`] and the registry handle (enrolment,
//!   revocation, live connections).
//! - [`ingest`]: the group committer thread and its queue's handle.
//! - [`catalog`]: the catalog handle (its one writer; pushes changes to sessions).
//! - [`entitlements`]: the entitlements handle (plans, grants, the lease book; pushes changes).
//! - [`store`]: the storage trait, the redb backend ([`store::redb`], every table in
//!   [`store::redb::tables`], the Stripe outbox in [`store::redb::outbox`]) and the in-memory
//!   reference store ([`store::memory`]).
//! - [`api`]: the admin HTTP API, one file per resource.
//! - [`console`]: the web console on the admin address (pages and vendored assets).
//! - [`forwarding`]: every destination (Stripe, Orb, Metronome) behind one interface, their
//!   configuration, lifecycle and reconciliation (SPEC §6.4, §6.4b).
//! - [`metrics`]: Prometheus metrics.
//! - [`mod@init`], [`config`], [`start`], [`dev`]: files on disk, configuration, starting it
//!   all, and the one-process quickstart.
//! - [`testkit`]: a bare protocol client for tests and benchmarks.
//! - [`admin_client`]: the admin API client of the CLI's commands on a running collector.
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

pub mod admin_client;
pub mod api;
pub mod catalog;
pub mod config;
pub mod console;
pub mod core;
pub mod dev;
pub mod entitlements;
pub mod export;
pub mod forwarding;
pub mod ingest;
pub mod init;
pub mod metrics;
pub mod net;
pub mod start;
pub mod store;
pub mod testkit;

pub use config::CollectorConfig;
pub use init::{InitFiles, init};
pub use start::{Collector, CollectorHandle};
/// The clock crate [`CollectorConfig::clock`] takes (a `ManualClock` runs a collector on virtual
/// time).
pub use tally_clock;
