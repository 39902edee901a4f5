//! [`SidecarBackend`] over a running [`Agent`]: durable recording, the compiled catalog (rebuilt
//! when its version changes), and entitlement answers from the agent's cached snapshot.

use crate::http::{BackendError, Consumed, EntitlementsView, SidecarBackend};
use crate::mapping::{IngestCatalog, MappedEvent};
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tally_agent::{Agent, ConnectionState, Event, FlushError, RecordError};
use tally_protocol::entitlements::Enforcement;
use tally_protocol::names::{CustomerId, MeterName};

/// The sidecar's view of an agent.
pub struct AgentBackend {
    agent: Agent,
    catalog: Mutex<Option<Arc<IngestCatalog>>>,
    /// Usage consumed through this sidecar since the snapshot of this version was built, so a
    /// burst of consumes cannot each see the same remaining quantity.
    consumed: Mutex<ConsumedSince>,
}

/// Quantities consumed per customer and meter since the snapshot of this version.
type ConsumedSince = (u64, HashMap<(CustomerId, MeterName), Decimal>);

impl AgentBackend {
    /// Wraps a started agent.
    pub fn new(agent: Agent) -> Self {
        AgentBackend {
            agent,
            catalog: Mutex::new(None),
            consumed: Mutex::new((0, HashMap::new())),
        }
    }
}

fn to_event(e: MappedEvent) -> Event {
    Event {
        customer: e.customer.into(),
        meter: e.meter.into(),
        quantity: e.quantity,
        timestamp_ms: Some(e.timestamp_ms),
        id: e.id,
        dimensions: e
            .dimensions
            .pairs()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn backend_error(e: RecordError) -> BackendError {
    match e {
        RecordError::OverBudget => BackendError::OverBudget,
        RecordError::UnknownMeter => BackendError::NotReady,
        e @ RecordError::EventTimeOutOfRange => BackendError::Invalid(e.to_string()),
        other => BackendError::Unavailable(other.to_string()),
    }
}

impl SidecarBackend for AgentBackend {
    fn catalog(&self) -> Option<Arc<IngestCatalog>> {
        let current = self.agent.catalog()?;
        let mut cached = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cached.as_ref().filter(|c| c.version == current.version) {
            return Some(c.clone());
        }
        match IngestCatalog::compile(&current) {
            Ok(c) => {
                let c = Arc::new(c);
                *cached = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "catalog has a path the sidecar cannot read");
                None
            }
        }
    }

    async fn record_durable(&self, events: Vec<MappedEvent>) -> Result<(), BackendError> {
        // One append of the whole request: it is durable whole or not at all.
        self.agent
            .record_durable_all(events.into_iter().map(to_event).collect())
            .await
            .map(|_| ())
            .map_err(backend_error)
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BackendError> {
        self.agent
            .flush(timeout)
            .await
            .map_err(|e: FlushError| BackendError::Unavailable(e.to_string()))
    }

    fn render_metrics(&self) -> String {
        self.agent.render_metrics()
    }

    fn ready(&self) -> bool {
        self.agent.catalog().is_some()
    }

    fn now_ms(&self) -> i64 {
        self.agent.clock().now_ms()
    }

    fn status_json(&self) -> serde_json::Value {
        status_json(&self.agent.status())
    }

    fn entitlements(&self, customer: &CustomerId) -> EntitlementsView {
        let status = self.agent.status();
        let Some(cache) = self.agent.entitlements() else {
            return EntitlementsView {
                stale: true,
                ..Default::default()
            };
        };
        EntitlementsView {
            snapshot_version: Some(cache.version),
            snapshot_age_ms: Some(self.now_ms().saturating_sub(cache.built_at_ms)),
            stale: !matches!(status.connection, ConnectionState::Connected { .. }),
            customer: cache
                .customers
                .iter()
                .find(|c| &c.customer == customer)
                .cloned(),
        }
    }

    async fn consume(
        &self,
        customer: CustomerId,
        meter: MeterName,
        quantity: Decimal,
    ) -> Result<Consumed, BackendError> {
        let cache = self.agent.entitlements();
        let limit = cache.as_ref().and_then(|c| {
            c.customers
                .iter()
                .find(|e| e.customer == customer)
                .and_then(|e| e.limits.iter().find(|l| l.meter == meter))
                .cloned()
        });
        let key = (customer.clone(), meter.clone());
        let remaining = {
            let mut consumed = self.consumed.lock().unwrap_or_else(PoisonError::into_inner);
            let version = cache.as_ref().map_or(0, |c| c.version);
            if consumed.0 != version {
                *consumed = (version, HashMap::new());
            }
            match &limit {
                None => None,
                Some(l) => {
                    let used = l.used + consumed.1.get(&key).copied().unwrap_or_default();
                    let remaining = (l.limit - used).max(Decimal::ZERO);
                    if l.enforcement == Enforcement::Hard && quantity > remaining {
                        return Ok(Consumed {
                            allowed: false,
                            remaining: Some(remaining),
                        });
                    }
                    *consumed.1.entry(key.clone()).or_default() += quantity;
                    Some((remaining - quantity).max(Decimal::ZERO))
                }
            }
        };
        let event = Event::new(customer.as_str(), meter.as_str(), quantity);
        if let Err(e) = self.agent.record_durable(event).await {
            if limit.is_some() {
                let mut consumed = self.consumed.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(v) = consumed.1.get_mut(&key) {
                    *v -= quantity;
                }
            }
            return Err(backend_error(e));
        }
        Ok(Consumed {
            allowed: true,
            remaining,
        })
    }
}

/// `Status` as the sidecar's `/v1/status` and `tally-agent status` show it.
pub fn status_json(s: &tally_agent::Status) -> serde_json::Value {
    let ms = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let connection = match &s.connection {
        ConnectionState::Idle => serde_json::json!({"state": "idle"}),
        ConnectionState::Connecting { collector } => {
            serde_json::json!({"state": "connecting", "collector": collector})
        }
        ConnectionState::Connected {
            collector,
            max_in_flight,
        } => serde_json::json!({
            "state": "connected", "collector": collector, "max_in_flight": max_in_flight,
        }),
        other => serde_json::json!({"state": "disconnected", "detail": format!("{other:?}")}),
    };
    serde_json::json!({
        "agent_id": s.agent_id.to_string(),
        "epoch": s.epoch,
        "backlog_batches": s.backlog_batches,
        "backlog_bytes": s.backlog_bytes,
        "durable_log_events": s.durable_log_events,
        "oldest_unacked_age_ms": ms(s.oldest_unacked_age),
        "last_sealed_seq": s.last_sealed_seq,
        "last_acked_seq": s.last_acked_seq,
        "connection": connection,
        "last_error": s.last_error,
        "entitlements_age_ms": ms(s.entitlements_age),
        "catalog_version": s.catalog_version,
        "over_budget": s.over_budget,
    })
}
