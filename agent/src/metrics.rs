//! The agent's Prometheus metrics (SPEC §7), in a registry of its own.
//!
//! Owns the per-agent [`Registry`] and its kept handles. Hot-path counts are never a shared
//! atomic bumped per call: shards count in plain integers and `Metrics::render` adds the
//! difference since the last scrape to the counters. The library never starts an exporter;
//! binaries serve [`crate::Agent::render_metrics`].
//!
//! | name | type | meaning |
//! |------|------|---------|
//! | `tally_agent_records_total` | counter | calls that recorded usage |
//! | `tally_agent_record_errors_total{reason}` | counter | refused calls, by reason |
//! | `tally_agent_batches_sealed_total` | counter | batches sealed to disk |
//! | `tally_agent_batches_acked_total{outcome}` | counter | acknowledgements by outcome |
//! | `tally_agent_backlog_batches` | gauge | sealed batches not yet acknowledged |
//! | `tally_agent_backlog_bytes` | gauge | their bytes on disk, plus the durable log's |
//! | `tally_agent_oldest_unacked_age_seconds` | gauge | age of the oldest unacknowledged batch |
//! | `tally_agent_ship_rtt_seconds` | histogram | batch sent → acknowledged |
//! | `tally_agent_entitlements_snapshot_age_seconds` | gauge | age of the entitlement snapshot (-1: none) |
//! | `tally_agent_connected` | gauge | 1 while a collector connection is up |

use crate::aggregate::Counts;
use crate::error::RECORD_ERROR_REASONS;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

type Label = [(&'static str, &'static str); 1];

/// Kept metric handles of one agent.
pub(crate) struct Metrics {
    registry: Registry,
    records: Counter,
    record_errors: Family<Label, Counter>,
    pub(crate) batches_sealed: Counter,
    pub(crate) batches_acked: Family<Label, Counter>,
    pub(crate) backlog_batches: Gauge,
    pub(crate) backlog_bytes: Gauge,
    pub(crate) oldest_unacked_age: Gauge<f64, AtomicU64>,
    pub(crate) ship_rtt: Histogram,
    pub(crate) entitlements_age: Gauge<f64, AtomicU64>,
    pub(crate) connected: Gauge,
    reported: Mutex<Counts>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            records: Counter::default(),
            record_errors: Family::default(),
            batches_sealed: Counter::default(),
            batches_acked: Family::default(),
            backlog_batches: Gauge::default(),
            backlog_bytes: Gauge::default(),
            oldest_unacked_age: Gauge::default(),
            ship_rtt: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            entitlements_age: Gauge::default(),
            connected: Gauge::default(),
            reported: Mutex::new(Counts::default()),
            registry: Registry::default(),
        };
        registry.register(
            "tally_agent_records",
            "Calls that recorded usage",
            m.records.clone(),
        );
        registry.register(
            "tally_agent_record_errors",
            "Refused record calls, by reason",
            m.record_errors.clone(),
        );
        registry.register(
            "tally_agent_batches_sealed",
            "Batches sealed to the local store",
            m.batches_sealed.clone(),
        );
        registry.register(
            "tally_agent_batches_acked",
            "Batch acknowledgements, by outcome",
            m.batches_acked.clone(),
        );
        registry.register(
            "tally_agent_backlog_batches",
            "Sealed batches not yet acknowledged",
            m.backlog_batches.clone(),
        );
        registry.register(
            "tally_agent_backlog_bytes",
            "Bytes of unacknowledged batches and durable-log rows on disk",
            m.backlog_bytes.clone(),
        );
        registry.register(
            "tally_agent_oldest_unacked_age_seconds",
            "Age of the oldest unacknowledged batch",
            m.oldest_unacked_age.clone(),
        );
        registry.register(
            "tally_agent_ship_rtt_seconds",
            "Time from sending a batch to its acknowledgement",
            m.ship_rtt.clone(),
        );
        registry.register(
            "tally_agent_entitlements_snapshot_age_seconds",
            "Age of the entitlement snapshot, -1 when there is none",
            m.entitlements_age.clone(),
        );
        registry.register(
            "tally_agent_connected",
            "1 while a collector connection is up",
            m.connected.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Folds the shards' counts into the counters and renders the registry as Prometheus text.
    pub(crate) fn render(&self, counts: Counts) -> String {
        {
            let mut last = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            self.records
                .inc_by(counts.records.saturating_sub(last.records));
            let errors = counts.errors.iter().zip(last.errors);
            for ((now, before), reason) in errors.zip(RECORD_ERROR_REASONS) {
                let d = now.saturating_sub(before);
                if d > 0 {
                    self.record_errors
                        .get_or_create(&[("reason", reason)])
                        .inc_by(d);
                }
            }
            *last = counts;
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
