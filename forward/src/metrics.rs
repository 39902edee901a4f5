//! Prometheus handles of every destination, registered once into the caller's registry.
//!
//! Names (SPEC §7): Stripe's `tally_stripe_requests_total{status}`, `tally_stripe_outbox_pending`,
//! `tally_stripe_outbox_unmapped`, `tally_stripe_dead_letters`,
//! `tally_stripe_forward_lag_seconds`, `tally_stripe_reconciliation_discrepancies`; Orb's and
//! Metronome's `tally_forward_…{destination}` ([`ForwardMetrics`]).
//! The hot path is one atomic operation on a kept handle.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ledger_feed::Engine;

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
    pub forward: ForwardMetrics,
}

impl StripeMetrics {
    /// Creates the handles and registers them under `tally_stripe_…`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            forward: ForwardMetrics::register(registry),
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

/// Label set: destination.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestLabel {
    /// `orb` or `metronome`.
    pub destination: String,
}

/// Label set: destination and HTTP status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestStatusLabel {
    /// `orb` or `metronome`.
    pub destination: String,
    /// HTTP status or `network`.
    pub status: String,
}

/// Orb and Metronome metrics, labelled by destination (`tally_forward_…`).
#[derive(Debug, Clone, Default)]
pub struct ForwardMetrics {
    /// Requests by destination and status.
    pub requests: Family<DestStatusLabel, Counter>,
    /// Events delivered.
    pub events_sent: Family<DestLabel, Counter>,
    /// Open groups (pending or unknown).
    pub pending: Family<DestLabel, Gauge>,
    /// Groups waiting in an Orb backfill.
    pub backfill: Family<DestLabel, Gauge>,
    /// Dead letters.
    pub dead_letters: Family<DestLabel, Gauge>,
    /// Usage listed as out of the destination's window.
    pub out_of_window: Family<DestLabel, Gauge>,
    /// Now minus the oldest open group's time, seconds.
    pub lag_seconds: Family<DestLabel, Gauge>,
    /// Discrepancies found by the last reconciliation.
    pub reconciliation_discrepancies: Family<DestLabel, Gauge>,
}

impl ForwardMetrics {
    /// Creates and registers the handles under `tally_forward_…`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tally_forward");
        r.register(
            "requests",
            "Requests to Orb and Metronome by status",
            m.requests.clone(),
        );
        r.register(
            "events_sent",
            "Events delivered per destination",
            m.events_sent.clone(),
        );
        r.register("pending", "Events not yet delivered", m.pending.clone());
        r.register(
            "backfill",
            "Events waiting in an Orb backfill",
            m.backfill.clone(),
        );
        r.register(
            "dead_letters",
            "Events rejected permanently",
            m.dead_letters.clone(),
        );
        r.register(
            "out_of_window",
            "Usage older than the destination's window (listed, not sent)",
            m.out_of_window.clone(),
        );
        r.register(
            "lag_seconds",
            "Age of the oldest undelivered event",
            m.lag_seconds.clone(),
        );
        r.register(
            "reconciliation_discrepancies",
            "Ledger vs destination discrepancies found by the last reconciliation",
            m.reconciliation_discrepancies.clone(),
        );
        m
    }

    pub(crate) fn label(d: Engine) -> DestLabel {
        DestLabel {
            destination: d.as_str().to_owned(),
        }
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
