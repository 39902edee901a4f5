//! The collector's Prometheus metrics (SPEC §7), in a registry per collector instance so that
//! several collectors in one process (tests) keep separate counts.
//!
//! Owns [`Metrics`]. Handles are registered once; updating one is an atomic operation.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label with one value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The result or reason.
    pub result: String,
}

/// Every collector metric.
pub struct Metrics {
    registry: Registry,
    /// `tally_collector_batches_total{result}`: committed, duplicate, quarantined,
    /// bad_signature, malformed, refused.
    pub batches: Family<ResultLabel, Counter>,
    /// `tally_collector_deltas_total`: deltas posted to the ledger.
    pub deltas: Counter,
    /// `tally_collector_duplicates_total`: batches already committed earlier.
    pub duplicates: Counter,
    /// `tally_collector_signature_failures_total`.
    pub signature_failures: Counter,
    /// `tally_collector_handshakes_total{result}`: ok, enrolled, unknown_agent,
    /// invalid_enroll_token, revoked_agent, bad_proof, unexpected_frame, malformed, …
    pub handshakes: Family<ResultLabel, Counter>,
    /// `tally_collector_connections_total`: QUIC connections accepted.
    pub connections: Counter,
    /// `tally_collector_connections_active`.
    pub connections_active: Gauge,
    /// `tally_collector_connections_refused_total{result}`: QUIC connections refused before
    /// their handshake, by reason (`max_connections`, `handshake_rate`).
    pub connections_refused: Family<ResultLabel, Counter>,
    /// `tally_collector_commit_latency_seconds`: one store transaction (a group of batches).
    pub commit_latency: Histogram,
    /// `tally_collector_commit_group_batches`: batches per group commit.
    pub group_size: Histogram,
    /// `tally_collector_metering_lag_seconds`: a delta's last event → committed in the ledger.
    pub metering_lag: Histogram,
    /// `tally_collector_adjustments_total`.
    pub adjustments: Counter,
    /// The Stripe forwarder's metrics (`tally_stripe_…`: requests by status, outbox pending,
    /// unmapped, dead letters, forward lag, reconciliation discrepancies).
    pub stripe: tally_forward::metrics::StripeMetrics,
    /// Entitlement and lease metrics (`tally_collector_entitlements_…`).
    pub entitlements: crate::entitlements::EntitlementMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("tally_collector");
        let batches = Family::<ResultLabel, Counter>::default();
        registry.register("batches", "Batches received, by result", batches.clone());
        let deltas = Counter::default();
        registry.register("deltas", "Deltas posted to the ledger", deltas.clone());
        let duplicates = Counter::default();
        registry.register(
            "duplicates",
            "Batches already committed earlier",
            duplicates.clone(),
        );
        let signature_failures = Counter::default();
        registry.register(
            "signature_failures",
            "Batches whose signature did not verify",
            signature_failures.clone(),
        );
        let handshakes = Family::<ResultLabel, Counter>::default();
        registry.register("handshakes", "Handshakes, by result", handshakes.clone());
        let connections = Counter::default();
        registry.register(
            "connections",
            "QUIC connections accepted",
            connections.clone(),
        );
        let connections_active = Gauge::default();
        registry.register(
            "connections_active",
            "QUIC connections open",
            connections_active.clone(),
        );
        let connections_refused = Family::<ResultLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "QUIC connections refused before their handshake, by reason",
            connections_refused.clone(),
        );
        let commit_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 18));
        registry.register(
            "commit_latency_seconds",
            "Duration of one durable store transaction",
            commit_latency.clone(),
        );
        let group_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "commit_group_batches",
            "Batches per group commit",
            group_size.clone(),
        );
        let metering_lag = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        registry.register(
            "metering_lag_seconds",
            "Time from a delta's last event to its commit in the ledger",
            metering_lag.clone(),
        );
        let adjustments = Counter::default();
        registry.register("adjustments", "Adjustments posted", adjustments.clone());
        let stripe = tally_forward::metrics::StripeMetrics::register(&mut root);
        let entitlements = crate::entitlements::EntitlementMetrics::register(&mut root);
        Metrics {
            entitlements,
            registry: root,
            stripe,
            batches,
            deltas,
            duplicates,
            signature_failures,
            handshakes,
            connections,
            connections_active,
            connections_refused,
            commit_latency,
            group_size,
            metering_lag,
            adjustments,
        }
    }

    /// Counts a QUIC connection refused before its handshake.
    pub fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&ResultLabel {
                result: reason.to_string(),
            })
            .inc();
    }

    /// Counts a batch result.
    pub fn batch(&self, result: &str) {
        self.batches
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a handshake result.
    pub fn handshake(&self, result: &str) {
        self.handshakes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
