//! The sidecar (SPEC §4): the `tally-agent` binary's HTTP surface for products not written in
//! Rust. OpenMeter's CloudEvents ingest and Stripe's meter-event endpoint, mapped through the
//! collector's catalog and recorded with [`Agent::record_durable`](tally_agent::Agent::record_durable),
//! so a 2xx means the events are on the agent's disk; entitlement answers from the agent's
//! cache; flush, metrics and health.
//!
//! - [`json_path`], [`quantity`]: reading CloudEvents `data` exactly (never through a float).
//! - [`mapping`]: the catalog compiled for ingest.
//! - [`cloudevents`], [`stripe_form`]: the two wire formats, as pure functions.
//! - [`fuzz`]: the fuzz targets' entry points.
//! - [`http`]: the axum shell over a [`http::SidecarBackend`].
//! - [`backend`]: that backend over a running [`Agent`](tally_agent::Agent).
//!
//! Its own crate, not a feature of `tally-agent`, so a product that links the agent library
//! compiles no HTTP server, CLI parser, config-file reader or log subscriber
//! (docs/decisions/0031-sidecar-crate.md).

pub mod backend;
pub mod cloudevents;
pub mod fuzz;
pub mod http;
pub mod json_path;
pub mod mapping;
pub mod quantity;
pub mod stripe_form;

#[cfg(test)]
mod tests;
