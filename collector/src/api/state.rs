//! The admin API's state: handles to what it reads and writes, each owned elsewhere.

use super::errors::ApiError;
use crate::catalog::Catalogs;
use crate::core::ledger::{Adjustment, VerifyReport};
use crate::forwarding::Forwarding;
use crate::metrics::Metrics;
use crate::net::registry::{LiveInfo, Registry};
use crate::store::{AdjustOutcome, Store, StoreError};
use axum::extract::State;
use std::sync::Arc;
use tally_clock::SharedClock;
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::{Catalog, MeterDef};

/// A handler's state.
pub(crate) type St = State<Arc<ApiState>>;

/// What the admin API reads and writes; each piece is owned elsewhere and shared by handle.
pub struct ApiState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Forwarding: every running destination, and what only Stripe has (webhooks,
    /// reconciliation).
    pub forwarding: Arc<Forwarding>,
    /// Enrolment, revocation, live connections.
    pub registry: Arc<Registry>,
    /// The catalog handle (writes push to connected agents).
    pub catalogs: Arc<Catalogs>,
    /// The analytics export, when `--export-dir` is set (`POST /v1/export` runs it now).
    pub export: std::sync::OnceLock<crate::export::ExportRunner>,
    /// Plans, grants, leases and their pushes (set once at start).
    pub entitlements: std::sync::OnceLock<Arc<crate::entitlements::Entitlements>>,
    /// Readings behind the overview's rates.
    pub(crate) overview: super::overview::SharedSampler,
    admin_token: String,
    clock: SharedClock,
}

impl ApiState {
    /// The API's state from its handles.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        forwarding: Arc<Forwarding>,
        registry: Arc<Registry>,
        catalogs: Arc<Catalogs>,
        admin_token: String,
        clock: SharedClock,
    ) -> Self {
        ApiState {
            store,
            metrics,
            forwarding,
            registry,
            catalogs,
            export: std::sync::OnceLock::new(),
            entitlements: std::sync::OnceLock::new(),
            overview: super::overview::SharedSampler::started_at(clock.now_ms()),
            admin_token,
            clock,
        }
    }

    /// The admin token (a secret: do not log it).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Adds or replaces a meter and pushes the new catalog to every connected agent.
    pub fn put_meter(&self, def: &MeterDef) -> Result<Catalog, StoreError> {
        self.catalogs.put_meter(def)
    }

    /// Revokes an agent and closes its live connections. `Ok(false)` if it is unknown.
    pub fn revoke(&self, agent: AgentId, revoke_token: bool) -> Result<bool, StoreError> {
        self.registry.revoke(agent, revoke_token)
    }

    /// Live facts about an agent.
    pub fn live_info(&self, agent: AgentId) -> LiveInfo {
        self.registry.live_info(agent)
    }

    /// Posts an adjustment.
    pub fn adjust(&self, adj: &Adjustment) -> Result<AdjustOutcome, StoreError> {
        let out = self.store.adjust(adj, self.clock.now_ms())?;
        if matches!(out, AdjustOutcome::Created(_)) {
            self.metrics.adjustments.inc();
        }
        Ok(out)
    }

    /// Verifies the ledger.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.store.verify()
    }

    /// The entitlements handle (set at start; an API built without it answers 500).
    pub fn entitlements(&self) -> Result<Arc<crate::entitlements::Entitlements>, ApiError> {
        self.entitlements.get().cloned().ok_or_else(|| {
            ApiError::from(StoreError::Invariant(String::from(
                "entitlements are not running",
            )))
        })
    }

    /// Wall time, ms.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

/// Runs a store call off the async workers (writes fsync).
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &Arc<ApiState>,
    f: impl FnOnce(&ApiState) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let shared = shared.clone();
    match tokio::task::spawn_blocking(move || f(&shared)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::task_failed(&e)),
    }
}
