//! [`SidecarBackend`] over a running [`Agent`]: durable recording, the compiled catalog (rebuilt
//! when its version changes), and entitlement answers from the agent's decision table (waiting
//! up to the agent's bound for a customer seen for the first time). Reservations live in a
//! bounded map with an expiry; an expired or released one gives its hold back.

use crate::http::{
    BackendError, Consumed, EntitlementsView, FeatureAnswer, LimitAnswer, Reserved, SidecarBackend,
};
use crate::mapping::{IngestCatalog, MappedEvent};
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tally_agent::{
    Agent, ConnectionState, ConsumeError, DecidedBy, Event, FlushError, OfflinePolicy, RecordError,
    Reservation,
};
use tally_protocol::entitlements::Enforcement;
use tally_protocol::names::{CustomerId, MeterName};

/// Reservations held at most; past it a reserve answers 429.
pub const MAX_RESERVATIONS: usize = 100_000;
/// Default time a reservation is held without a commit.
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(300);

/// The sidecar's view of an agent.
pub struct AgentBackend {
    agent: Agent,
    catalog: Mutex<Option<Arc<IngestCatalog>>>,
    reservations: Arc<Reservations>,
    reservation_ttl_ms: i64,
}

impl AgentBackend {
    /// Wraps a started agent.
    pub fn new(agent: Agent) -> Self {
        Self::with_reservation_ttl(agent, DEFAULT_RESERVATION_TTL)
    }

    /// Wraps a started agent; reservations not committed within `ttl` are released.
    pub fn with_reservation_ttl(agent: Agent, ttl: Duration) -> Self {
        AgentBackend {
            agent,
            catalog: Mutex::new(None),
            reservations: Arc::new(Mutex::new(HashMap::new())),
            reservation_ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Releases expired reservations; returns how many.
    pub fn sweep(&self) -> usize {
        sweep(&self.agent, &self.reservations)
    }

    /// A sweeper to call every second from a task of its own (the router owns the backend).
    pub fn sweeper(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let agent = self.agent.clone();
        let map = self.reservations.clone();
        move || sweep(&agent, &map)
    }

    fn limit_answer(&self, customer: &str, meter: &str) -> LimitAnswer {
        let l = self.agent.limit(customer, meter);
        let by_policy = matches!(
            l.decided_by,
            DecidedBy::NoSnapshot | DecidedBy::StaleSnapshot
        );
        let allowed = if by_policy {
            self.agent.offline_policy(meter) != OfflinePolicy::Deny
        } else {
            match l.enforcement {
                Some(Enforcement::Hard) => l.remaining.is_some_and(|r| r > Decimal::ZERO),
                _ => true,
            }
        };
        LimitAnswer {
            allowed,
            decided_by: l.decided_by.as_str(),
            limit: l.limit,
            used: l.used,
            remaining: l.remaining,
            enforcement: l.enforcement.map(|e| match e {
                Enforcement::Hard => "hard",
                Enforcement::Soft => "soft",
            }),
            stale: l.stale,
        }
    }
}

type Reservations = Mutex<HashMap<String, (Reservation, i64)>>;

fn sweep(agent: &Agent, map: &Reservations) -> usize {
    let now = agent.clock().now_ms();
    let expired: Vec<Reservation> = {
        let mut m = map.lock().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<String> = m
            .iter()
            .filter(|(_, (_, exp))| *exp <= now)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| m.remove(id))
            .map(|(r, _)| r)
            .collect()
    };
    // Dropped outside the map's lock: each drop takes its meter's lock.
    expired.len()
}

fn fresh_id() -> String {
    let mut b = [0u8; 12];
    // Ids need only be unique among live reservations; the OS RNG failing leaves zeros, and a
    // clash is refused by the map insert below.
    let _ = getrandom::getrandom(&mut b);
    format!("rsv_{}", hex::encode(b))
}

fn consume_error(e: ConsumeError) -> BackendError {
    match e {
        ConsumeError::Record(e) => backend_error(e),
        other => BackendError::Unavailable(other.to_string()),
    }
}

fn consumed(c: tally_agent::Consumed) -> Consumed {
    Consumed {
        allowed: c.allowed,
        recorded: c.recorded,
        remaining: c.remaining,
        decided_by: c.decided_by.as_str(),
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
        RecordError::Revoked => BackendError::Revoked,
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

    fn quarantine_json(&self) -> Result<serde_json::Value, BackendError> {
        self.agent
            .quarantined()
            .map(|q| quarantine_json(&q))
            .map_err(|e| BackendError::Unavailable(e.to_string()))
    }

    async fn entitlements(&self, customer: CustomerId) -> EntitlementsView {
        let v = self.agent.describe_wait(customer.as_str()).await;
        let cache = self.agent.status();
        let version = self.agent.entitlements_version();
        EntitlementsView {
            snapshot_version: version,
            snapshot_age_ms: cache
                .entitlements_age
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            known: v.known,
            stale: v.stale,
            decided_by: v.decided_by.map(DecidedBy::as_str),
            plan: v.plan.map(|p| p.to_string()),
            features: v
                .features
                .iter()
                .map(|f| (f.name.to_string(), DecidedBy::from(f.source).as_str()))
                .collect(),
            limits: v
                .meters
                .iter()
                .map(|m| {
                    (
                        m.to_string(),
                        self.limit_answer(customer.as_str(), m.as_str()),
                    )
                })
                .collect(),
        }
    }

    async fn feature(&self, customer: CustomerId, feature: String) -> FeatureAnswer {
        let d = self.agent.check_wait(customer.as_str(), &feature).await;
        FeatureAnswer {
            allowed: d.allowed,
            decided_by: d.decided_by.as_str(),
            stale: d.stale,
        }
    }

    async fn limit(&self, customer: CustomerId, meter: MeterName) -> LimitAnswer {
        self.agent
            .limit_wait(customer.as_str(), meter.as_str())
            .await;
        self.limit_answer(customer.as_str(), meter.as_str())
    }

    async fn consume(
        &self,
        customer: CustomerId,
        meter: MeterName,
        quantity: Decimal,
    ) -> Result<Consumed, BackendError> {
        // On a task of its own: a client that goes away does not cancel a durable record half
        // way (the lease it consumes under stays open until the record ends).
        let agent = self.agent.clone();
        tokio::spawn(async move {
            agent
                .try_consume_durable(customer.as_str(), meter.as_str(), quantity)
                .await
        })
        .await
        .map_err(|e| BackendError::Unavailable(e.to_string()))?
        .map(consumed)
        .map_err(consume_error)
    }

    async fn reserve(
        &self,
        customer: CustomerId,
        meter: MeterName,
        quantity: Decimal,
    ) -> Result<Reserved, BackendError> {
        self.sweep();
        if self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            >= MAX_RESERVATIONS
        {
            return Err(BackendError::OverBudget);
        }
        let r = match self
            .agent
            .reserve_wait(customer.as_str(), meter.as_str(), quantity)
            .await
        {
            Ok(r) => r,
            Err(ConsumeError::Denied {
                decided_by,
                remaining,
                ..
            }) => {
                return Ok(Reserved::Denied {
                    decided_by: decided_by.as_str(),
                    remaining,
                });
            }
            Err(e) => return Err(consume_error(e)),
        };
        let decided_by = r.decided_by().as_str();
        let remaining = self
            .agent
            .limit(customer.as_str(), meter.as_str())
            .remaining;
        let expires_at_ms = self
            .agent
            .clock()
            .now_ms()
            .saturating_add(self.reservation_ttl_ms);
        let id = fresh_id();
        let mut m = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if m.len() >= MAX_RESERVATIONS || m.contains_key(&id) {
            return Err(BackendError::OverBudget);
        }
        m.insert(id.clone(), (r, expires_at_ms));
        Ok(Reserved::Held {
            id,
            expires_at_ms,
            decided_by,
            remaining,
        })
    }

    async fn commit(
        &self,
        id: String,
        quantity: Decimal,
    ) -> Result<Option<Consumed>, BackendError> {
        let now = self.agent.clock().now_ms();
        let r = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let Some((r, expires)) = r else {
            return Ok(None);
        };
        if expires <= now {
            return Ok(None);
        }
        tokio::spawn(async move { r.commit_durable(quantity).await })
            .await
            .map_err(|e| BackendError::Unavailable(e.to_string()))?
            .map(|c| Some(consumed(c)))
            .map_err(consume_error)
    }

    fn release(&self, id: &str) -> bool {
        let now = self.agent.clock().now_ms();
        let r = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        r.is_some_and(|(_, exp)| exp > now)
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
        "revoked": s.revoked,
        "quarantined_batches": s.quarantined_batches,
        "disk_error": s.disk_error,
    })
}

/// The quarantine as `GET /v1/quarantine` and `tally-agent quarantine` export it: per batch its
/// place, why it was taken out of shipping, its deltas decoded (not verified: the key that
/// signed it is gone) with exact decimal strings, and the signed body and signature in hex, so
/// whoever holds the old public key can check them.
pub fn quarantine_json(q: &[(u64, tally_agent::store::QuarantinedBatch)]) -> serde_json::Value {
    let batches: Vec<serde_json::Value> = q
        .iter()
        .map(|(seq, b)| {
            let body = b.stored.batch.decode_unverified();
            let deltas: Vec<serde_json::Value> = body.as_ref().map_or_else(
                |_| Vec::new(),
                |body| {
                    body.deltas
                        .iter()
                        .map(|d| {
                            let dims: serde_json::Map<String, serde_json::Value> = d
                                .dimensions
                                .pairs()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_string().into()))
                                .collect();
                            serde_json::json!({
                                "customer": d.customer.to_string(),
                                "meter": d.meter.to_string(),
                                "dimensions": dims,
                                "bucket_start_ms": d.bucket_start_ms,
                                "sum": d.sum.to_string(),
                                "count": d.count,
                                "last": d.last.to_string(),
                                "first_at_ms": d.first_at_ms,
                                "last_at_ms": d.last_at_ms,
                            })
                        })
                        .collect()
                },
            );
            serde_json::json!({
                "seq": seq,
                "reason": b.reason,
                "quarantined_at_ms": b.at_ms,
                "sealed_at_ms": b.stored.sealed_at_ms,
                "agent_id": body.as_ref().ok().map(|b| b.agent_id.to_string()),
                "epoch": body.as_ref().ok().map(|b| b.epoch),
                "body_decodes": body.is_ok(),
                "deltas": deltas,
                "body_hex": hex::encode(&*b.stored.batch.body),
                "signature_hex": hex::encode(b.stored.batch.signature.0),
            })
        })
        .collect();
    serde_json::json!({ "object": "list", "data": batches })
}
