//! Prometheus handles for the forwarder, registered once into the caller's registry.
//!
//! Names (SPEC §7): `tally_stripe_requests_total{status}`, `tally_stripe_outbox_pending`,
//! `tally_stripe_outbox_unmapped`, `tally_stripe_dead_letters`,
//! `tally_stripe_forward_lag_seconds`, `tally_stripe_reconciliation_discrepancies`.
//! The hot path is one atomic operation on a kept handle.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set of `tally_stripe_requests`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code, or `network`.
    pub status: String,
}

/// The forwarder's metric handles (cheap to clone: all handles are shared).
#[derive(Debug, Clone, Default)]
pub struct StripeMetrics {
    /// Requests to Stripe by status.
    pub requests: Family<StatusLabel, Counter>,
    /// Outbox rows not yet delivered (including unknown outcome, excluding dead letters).
    pub outbox_pending: Gauge,
    /// Rows waiting for a customer mapping.
    pub outbox_unmapped: Gauge,
    /// Dead-letter rows.
    pub dead_letters: Gauge,
    /// Now minus the bucket time of the oldest undelivered row, seconds.
    pub forward_lag_seconds: Gauge,
    /// Discrepancies found by the last reconciliation.
    pub reconciliation_discrepancies: Gauge,
    /// Orb and Metronome (`tally_forward_…`, labelled by destination).
    pub forward: crate::forward::runner::ForwardMetrics,
}

impl StripeMetrics {
    /// Creates the handles and registers them under `tally_stripe_…`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            forward: crate::forward::runner::ForwardMetrics::register(registry),
            ..Self::default()
        };
        let r = registry.sub_registry_with_prefix("tally_stripe");
        r.register(
            "requests",
            "Requests to Stripe by HTTP status",
            m.requests.clone(),
        );
        r.register(
            "outbox_pending",
            "Outbox rows not yet delivered",
            m.outbox_pending.clone(),
        );
        r.register(
            "outbox_unmapped",
            "Outbox rows waiting for a customer mapping",
            m.outbox_unmapped.clone(),
        );
        r.register(
            "dead_letters",
            "Outbox rows in the dead-letter list",
            m.dead_letters.clone(),
        );
        r.register(
            "forward_lag_seconds",
            "Age of the oldest undelivered outbox row's bucket",
            m.forward_lag_seconds.clone(),
        );
        r.register(
            "reconciliation_discrepancies",
            "Ledger vs Stripe discrepancies found by the last reconciliation",
            m.reconciliation_discrepancies.clone(),
        );
        m
    }

    /// Counts one request by status (`None` = network failure).
    pub fn request(&self, status: Option<u16>) {
        let status = status.map_or_else(|| "network".to_owned(), |s| s.to_string());
        self.requests.get_or_create(&StatusLabel { status }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let mut reg = Registry::default();
        let m = StripeMetrics::register(&mut reg);
        m.request(Some(200));
        m.request(None);
        m.outbox_pending.set(3);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).ok();
        assert!(
            out.contains("tally_stripe_requests_total{status=\"200\"} 1"),
            "{out}"
        );
        assert!(out.contains("tally_stripe_outbox_pending 3"), "{out}");
    }
}
