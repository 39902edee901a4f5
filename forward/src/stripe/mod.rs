//! Stripe: ledger usage → Stripe Billing meter events, exactly once.
//!
//! - [`units`]: Decimal usage → whole Stripe units with the remainder carried
//!   ([`units::Carry::step`], reductions included; called by the collector inside its ledger
//!   transaction).
//! - [`group`]: event groups and their state machine ([`outbox::EventGroup::step`]), the one rule
//!   every store applies.
//! - [`outbox`]: outbox rows, the [`outbox::OutboxStore`] trait, the shared `create_groups`
//!   checks and the in-memory reference store.
//! - [`plan`]: aggregation of rows into meter events with deterministic identifiers.
//! - [`retry`]: retry classes, backoff, token bucket (no I/O).
//! - [`client`]: the HTTP shell (reqwest + rustls/ring) and the bounded meter-id cache.
//! - [`dispatch`]: the forwarder's decisions as a sans-IO state machine (v1 and v2).
//! - [`forwarder`]: the tokio shell around it.
//! - [`webhook`]: `Stripe-Signature` verification and the idempotent event handler.
//! - [`reconcile`]: ledger totals vs Stripe event summaries.
//! - [`crate::metrics::StripeMetrics`]: Prometheus handles (`tally_stripe_…`).
//! - `test_server` (feature `test-server`): a local Stripe-compatible server with faults.
//!
//! The running forwarder ([`ForwarderHandle`]) is a [`crate::Destination`] like the Orb and
//! Metronome feeds; what only Stripe has (webhooks, event summaries, the unit carry) stays here.
//!
//! # How the collector uses it
//!
//! 1. **In the ledger transaction**, for each usage transfer: keep a cumulative scaled quantity
//!    per (customer, meter) in the same store, call [`outbox::outbox_row_for_usage`] (or
//!    [`units::carry_units`]) and, if it returns a row, append it to the outbox table with the
//!    next row id. Zero-unit rows are never written; the remainder is carried.
//! 2. **Implement [`outbox::OutboxStore`]** on the collector's store (redb now, PostgreSQL later);
//!    [`outbox::MemoryStore`] is the reference implementation; every store applies the same
//!    rules ([`outbox::EventGroup::step`], [`outbox::check_new_groups`], [`units::Carry::step`]).
//! 3. **Start the forwarder**: [`spawn`]`(config, store, Some(metrics), None)` with a
//!    [`ForwarderConfig`] (`api_key` from [`ApiKey::from_env_or_file`], `base_url`,
//!    `meter_events_url`, `api` parsed from `--stripe-api`); call
//!    [`ForwarderHandle::notify`] after committing outbox rows or a mapping change, and
//!    [`ForwarderHandle::shutdown`] on Ctrl-C. Without a key it only logs.
//! 4. **HTTP API**: `GET /v1/stripe/outbox?state=` → [`outbox::OutboxStore::list`];
//!    `POST /v1/stripe/outbox/{id}/retry` → [`outbox::OutboxStore::requeue`] then `notify`;
//!    `PUT /v1/customers/{c}` with `stripe_customer_id` →
//!    [`outbox::OutboxStore::set_stripe_customer`] then `notify`; unmapped usage is visible in
//!    [`ForwarderHandle::status`]; `POST /v1/stripe/webhooks` → [`webhook::handle_webhook`] with
//!    the raw body and the `Stripe-Signature` header; `GET /v1/reconciliation` →
//!    [`reconcile::fetch_day_totals`] + [`reconcile::reconcile`].
//! 5. **Metrics**: [`crate::metrics::StripeMetrics::register`] into the collector's registry.
//! 6. **Tests**: enable feature `test-server` and point the forwarder at
//!    `test_server::FakeStripe::url()`.

pub mod client;
pub mod coalesce;
pub mod dispatch;
pub mod forwarder;
pub mod group;
pub mod outbox;
pub mod plan;
pub mod reconcile;
#[cfg(feature = "test-server")]
pub mod test_server;
pub mod units;
pub mod webhook;

/// Most events in one v2 stream request (Stripe's limit).
pub const STREAM_EVENTS_MAX: usize = 100;

pub use crate::secret::{ApiKey, WebhookSecret};
pub use forwarder::{Api, ForwarderConfig, ForwarderHandle, ForwarderStatus, spawn};
pub use outbox::{MemoryStore, NewOutboxRow, OutboxRow, OutboxStore};
pub use units::{UnitStep, carry_units};
