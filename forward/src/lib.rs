//! Tally's forwarding: ledger usage → billing engines, each exactly once and independently of
//! the others (SPEC §6.4, §6.4b).
//!
//! One module per destination, one interface for all of them (decision 0107):
//!
//! - [`Destination`]: what every running destination offers the collector — notify after a
//!   ledger commit or a mapping change, status, its outbox listing, an operator retry of a dead
//!   letter, shutdown. The collector keeps one list of them; one failing never holds up another
//!   (each runs on its own task with its own rows, pacing, retries and dead letters).
//! - [`stripe`]: Stripe Billing meter events (v1/v2) from the Stripe outbox the collector writes
//!   in its ledger transaction — units with a carried remainder, groups, the sans-IO dispatch
//!   machine and its forwarder, webhooks, reconciliation, a local Stripe-compatible server.
//! - [`ledger_feed`]: what the decimal destinations share — they read the ledger itself as their
//!   outbox, each with its own cursor, groups, store, runner and reconciliation.
//! - [`orb`], [`metronome`]: each decimal destination's wire format, limits, specifics (Orb's
//!   backfills and event search, Metronome's usage by day) and its local server for tests.
//! - Shared: [`retry`] (backoff, token bucket, Stripe's answer classes), [`secret`] (redacted
//!   keys), [`time`] (the one clock, RFC 3339), [`metrics`] (every destination's Prometheus
//!   handles).
//!
//! Feature `test-server`: the local Stripe, Orb and Metronome servers and the store conformance
//! checks, for this crate's tests and the collector's.

pub mod destination;
pub mod ledger_feed;
pub mod metrics;
pub mod metronome;
pub mod orb;
pub mod retry;
pub mod secret;
pub mod stripe;
pub mod time;

pub use destination::{Destination, DestinationError, DestinationKind, Listing, Retried, Status};
pub use secret::{ApiKey, WebhookSecret};
