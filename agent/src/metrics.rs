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
//! | `tally_agent_quarantined_batches` | gauge | batches in the local quarantine (never sent) |
//! | `tally_agent_backlog_bytes` | gauge | their bytes on disk, plus the durable log's |
//! | `tally_agent_oldest_unacked_age_seconds` | gauge | age of the oldest unacknowledged batch |
//! | `tally_agent_ship_rtt_seconds` | histogram | batch sent → acknowledged |
//! | `tally_agent_entitlements_snapshot_age_seconds` | gauge | age of the entitlement snapshot (-1: none) |
//! | `tally_agent_connected` | gauge | 1 while a collector connection is up |
//! | `tally_agent_entitlement_denials_total{decided_by}` | counter | refused consumptions, by what decided |
//! | `tally_agent_lease_requests_total` | counter | lease requests sent to the collector |
//! | `tally_agent_lease_grants_total` | counter | lease grants applied |
//! | `tally_agent_soft_limit_overshoot` | gauge | quantity consumed past soft limits (total) |
//! | `tally_agent_entitlement_messages_dropped_total` | counter | requests dropped by a full outbox |

use crate::aggregate::Counts;
use crate::entitlements::DecidedBy;
use crate::entitlements::table::Stats;
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
    pub(crate) quarantined_batches: Gauge,
    pub(crate) backlog_bytes: Gauge,
    pub(crate) oldest_unacked_age: Gauge<f64, AtomicU64>,
    pub(crate) ship_rtt: Histogram,
    pub(crate) entitlements_age: Gauge<f64, AtomicU64>,
    pub(crate) connected: Gauge,
    reported: Mutex<Counts>,
    denials: Family<Label, Counter>,
    lease_requests: Counter,
    lease_grants: Counter,
    overshoot: Gauge<f64, AtomicU64>,
    outbox_dropped: Counter,
    reported_ent: Mutex<[u64; 10]>,
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
            quarantined_batches: Gauge::default(),
            backlog_bytes: Gauge::default(),
            oldest_unacked_age: Gauge::default(),
            ship_rtt: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            entitlements_age: Gauge::default(),
            connected: Gauge::default(),
            reported: Mutex::new(Counts::default()),
            registry: Registry::default(),
            denials: Family::default(),
            lease_requests: Counter::default(),
            lease_grants: Counter::default(),
            overshoot: Gauge::default(),
            outbox_dropped: Counter::default(),
            reported_ent: Mutex::new([0; 10]),
        };
        registry.register(
            "tally_agent_entitlement_denials",
            "Consumptions refused, by what decided",
            m.denials.clone(),
        );
        registry.register(
            "tally_agent_lease_requests",
            "Lease requests sent to the collector",
            m.lease_requests.clone(),
        );
        registry.register(
            "tally_agent_lease_grants",
            "Lease grants applied",
            m.lease_grants.clone(),
        );
        registry.register(
            "tally_agent_soft_limit_overshoot",
            "Quantity consumed past soft limits since start",
            m.overshoot.clone(),
        );
        registry.register(
            "tally_agent_entitlement_messages_dropped",
            "Requests for the collector dropped because the outbox was full",
            m.outbox_dropped.clone(),
        );
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
            "tally_agent_quarantined_batches",
            "Batches in the local quarantine: kept on disk, never sent",
            m.quarantined_batches.clone(),
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

    /// Folds the entitlement table's counts into the metrics.
    pub(crate) fn fold_entitlements(&self, stats: &Stats) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut now = [0u64; 10];
        for (i, d) in stats.denials.iter().enumerate() {
            now[i] = d.load(Relaxed);
        }
        now[7] = stats.lease_requests.load(Relaxed);
        now[8] = stats.lease_grants.load(Relaxed);
        now[9] = stats.outbox_dropped.load(Relaxed);
        let mut last = self.reported_ent.lock().unwrap_or_else(|e| e.into_inner());
        for (i, by) in DecidedBy::ALL.iter().enumerate() {
            let d = now[i].saturating_sub(last[i]);
            if d > 0 {
                self.denials
                    .get_or_create(&[("decided_by", by.as_str())])
                    .inc_by(d);
            }
        }
        self.lease_requests.inc_by(now[7].saturating_sub(last[7]));
        self.lease_grants.inc_by(now[8].saturating_sub(last[8]));
        self.outbox_dropped.inc_by(now[9].saturating_sub(last[9]));
        *last = now;
        let over = stats.overshoot();
        self.overshoot
            .set(rust_decimal::prelude::ToPrimitive::to_f64(&over).unwrap_or(f64::MAX));
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
