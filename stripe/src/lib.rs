//! Tally's Stripe forwarding core: ledger usage → Stripe Billing meter events, exactly once.
//!
//! - [`units`]: Decimal usage → whole Stripe units with the remainder carried (called by the
//!   collector inside its ledger transaction).
//! - [`outbox`]: outbox rows, event groups, the [`outbox::OutboxStore`] trait and an in-memory
//!   store.
//! - [`plan`]: aggregation of rows into meter events with deterministic identifiers.
//! - [`retry`]: retry classes, backoff, token bucket (no I/O).
//! - [`client`]: the HTTP shell (reqwest + rustls/ring).
//! - [`forwarder`]: the tokio engine (v1 and v2).
//! - [`webhook`]: `Stripe-Signature` verification and the idempotent event handler.
//! - [`reconcile`]: ledger totals vs Stripe event summaries.
//! - [`metrics`]: Prometheus handles.
//! - `test_server` (feature `test-server`): a local Stripe-compatible server with faults.

pub mod client;
pub mod forwarder;
pub mod metrics;
pub mod outbox;
pub mod plan;
pub mod reconcile;
pub mod retry;
pub mod secret;
#[cfg(feature = "test-server")]
pub mod test_server;
pub mod time;
pub mod units;
pub mod webhook;

/// Most events in one v2 stream request (Stripe's limit).
pub const STREAM_EVENTS_MAX: usize = 100;

pub use forwarder::{Api, ForwarderConfig, ForwarderHandle, ForwarderStatus, spawn};
pub use outbox::{MemoryStore, NewOutboxRow, OutboxRow, OutboxStore};
pub use secret::{ApiKey, WebhookSecret};
pub use units::{UnitStep, carry_units};
