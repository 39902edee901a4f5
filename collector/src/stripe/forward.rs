//! Orb and Metronome in the collector (SPEC §6.4b): settings, the ledger as their outbox, and
//! the running destinations. The engine is `tally_stripe::forward`.
//!
//! Owns [`ForwardSettings`] (what `--orb-*` / `--metronome-*` flags, `ORB_API_KEY`,
//! `METRONOME_API_KEY` and the config file set), [`StoreLedger`] (usage transfers of the
//! collector's store as signed ledger items with their dimensions) and [`ForwardRuntime`].
//!
//! Guarantees: keys live only in redacting [`ApiKey`]s and are never logged; the destinations'
//! state (cursors, groups, backfills) is next to the ledger it reads — `forward.redb` in the
//! data directory with the embedded store, the `fwd_*` tables with `--ledger-url` (shared by
//! every collector on the database, each destination claimed by one at a time, decision
//! 0125); each destination runs on its own task. On PostgreSQL the ledger is read only up to
//! its first missing position, so a cursor never passes a position not yet committed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tally_protocol::names::{CustomerId, MeterName};
use tally_stripe::ApiKey;
use tally_stripe::forward::reconcile::FwdReport;
use tally_stripe::forward::runner::{ForwardMetrics, LedgerSource};
use tally_stripe::forward::store::ForwardStore;
use tally_stripe::forward::{
    Destination, DestinationConfig, DestinationHandle, FwdState, LedgerItem, RedbForwardStore,
    Routes, spawn_destination,
};

use crate::store::{DestNames, NameKind};

use crate::store::postgres::PgStore;
use crate::store::postgres::forward::PgForwardStore;
use tally_stripe::time::SharedClock;

use crate::core::ledger::{AccountKey, TransferSource, source_account_id};
use crate::store::Store;

/// Which destinations are on, and how.
#[derive(Debug, Clone, Default)]
pub struct ForwardSettings {
    /// Orb, when `ORB_API_KEY` or `--orb-api-key-file` is set.
    pub orb: Option<DestinationConfig>,
    /// Metronome, when `METRONOME_API_KEY` or `--metronome-api-key-file` is set.
    pub metronome: Option<DestinationConfig>,
}

impl ForwardSettings {
    /// True when no destination is configured.
    pub fn is_empty(&self) -> bool {
        self.orb.is_none() && self.metronome.is_none()
    }
}

/// `var` if set and non-empty, else the key file, else `None` (the destination is off).
pub fn key_from_env_or_file(var: &str, path: Option<&Path>) -> std::io::Result<Option<ApiKey>> {
    if let Ok(v) = std::env::var(var)
        && !v.trim().is_empty()
    {
        return Ok(Some(ApiKey::new(v)));
    }
    path.map(ApiKey::from_file).transpose()
}

/// The collector's ledger as the destinations' outbox: usage transfers (batch rows and
/// adjustments; grants are not usage) as signed items — a `last` meter going down or a negative
/// adjustment is negative — with the usage account's dimensions.
pub struct StoreLedger {
    store: Arc<dyn Store>,
    /// Read only the run of consecutive positions after the cursor (PostgreSQL, decision 0125).
    contiguous: bool,
    /// Usage account id → dimensions, per (customer, meter) loaded on a miss; bounded.
    dims: Mutex<HashMap<u128, BTreeMap<String, String>>>,
}

/// Most usage accounts whose dimensions are remembered.
const DIMS_CACHE_MAX: usize = 100_000;

impl StoreLedger {
    /// Reads `store`'s ledger.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            contiguous: false,
            dims: Mutex::new(HashMap::new()),
        }
    }

    /// Reads a PostgreSQL ledger, whose positions are gapless once committed (each writer takes
    /// the next one under the ledger lock): a missing position is a transaction not yet
    /// committed, so the read stops before it and the cursor never passes it (decision 0125).
    pub fn gapless(store: Arc<dyn Store>) -> Self {
        Self {
            contiguous: true,
            ..Self::new(store)
        }
    }

    fn dimensions(
        &self,
        account: u128,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut cache = self.dims.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = cache.get(&account) {
            return Ok(d.clone());
        }
        if cache.len() >= DIMS_CACHE_MAX {
            cache.clear();
        }
        let accounts = self
            .store
            .usage_accounts(customer, Some(meter), None)
            .map_err(|e| e.to_string())?;
        for a in accounts {
            if let AccountKey::Usage { dimensions, .. } = &a.key {
                let d: BTreeMap<String, String> = dimensions
                    .pairs()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
                    .collect();
                cache.insert(a.key.id(), d);
            }
        }
        Ok(cache.get(&account).cloned().unwrap_or_default())
    }
}

impl LedgerSource for StoreLedger {
    fn read(&self, after: u64, limit: usize) -> Result<(Vec<LedgerItem>, u64), String> {
        let mut entries = self
            .store
            .entries(None, after, limit)
            .map_err(|e| e.to_string())?;
        if self.contiguous {
            let run = entries
                .iter()
                .zip(after + 1..)
                .take_while(|((p, _), want)| p == want)
                .count();
            if run < entries.len() {
                tracing::debug!(
                    missing = after + 1 + run as u64,
                    "ledger position not committed yet; forwarding reads up to it"
                );
                entries.truncate(run);
            }
        }
        let scanned = entries.last().map_or(after, |(p, _)| *p);
        let mut out = Vec::with_capacity(entries.len());
        for (position, t) in entries {
            if matches!(t.source, TransferSource::Grant { .. }) || t.amount.is_zero() {
                continue;
            }
            let adjustments = AccountKey::Adjustments {
                meter: t.unit.clone(),
            }
            .id();
            // Usage comes from the source (or adjustments) account; the other way is a reduction.
            let positive = t.debit == source_account_id(&t.unit) || t.debit == adjustments;
            let usage_account = if positive { t.credit } else { t.debit };
            let dimensions = self.dimensions(usage_account, &t.customer, &t.unit)?;
            out.push(LedgerItem {
                position,
                customer: t.customer.as_str().to_owned(),
                meter: t.unit.as_str().to_owned(),
                amount: if positive { t.amount } else { -t.amount },
                timestamp_s: t.event_at_ms.div_euclid(1000),
                dimensions,
            });
        }
        Ok((out, scanned))
    }

    fn routes(
        &self,
        dest: Destination,
        items: &[LedgerItem],
        base: &Routes,
    ) -> Result<Routes, String> {
        let pick = |n: DestNames| match dest {
            Destination::Orb => n.orb,
            Destination::Metronome => n.metronome,
        };
        let mut meters: Vec<String> = items.iter().map(|i| i.meter.clone()).collect();
        meters.sort_unstable();
        meters.dedup();
        let mut customers: Vec<String> = items.iter().map(|i| i.customer.clone()).collect();
        customers.sort_unstable();
        customers.dedup();
        let meter_names = self
            .store
            .dest_names(NameKind::Meter, &meters)
            .map_err(|e| e.to_string())?;
        let customer_names = self
            .store
            .dest_names(NameKind::Customer, &customers)
            .map_err(|e| e.to_string())?;
        let mut out = base.clone();
        if meter_names.iter().any(|(_, n)| pick(n.clone()).is_some()) {
            // With no configured list every meter goes under its own name; a name set through
            // the API adds to (or replaces in) that mapping.
            let mut m = base
                .meters
                .clone()
                .unwrap_or_else(|| meters.iter().map(|x| (x.clone(), x.clone())).collect());
            for (k, n) in meter_names {
                if let Some(v) = pick(n) {
                    m.insert(k, v);
                }
            }
            out.meters = Some(m);
        }
        for (k, n) in customer_names {
            if let Some(v) = pick(n) {
                out.customers.insert(k, v);
            }
        }
        Ok(out)
    }
}

/// Why forwarding could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardStartError {
    /// The destinations' store could not be opened.
    #[error("forward store: {0}")]
    Store(#[from] tally_stripe::forward::store::FwdStoreError),
    /// A destination could not start.
    #[error("forward destination: {0}")]
    Start(#[from] tally_stripe::forward::runner::StartError),
}

/// The running Orb and Metronome destinations.
pub struct ForwardRuntime {
    /// Their store.
    pub store: Arc<dyn ForwardStore>,
    handles: Vec<DestinationHandle>,
    clock: SharedClock,
    metrics: ForwardMetrics,
    last: Mutex<BTreeMap<Destination, FwdReport>>,
}

impl ForwardRuntime {
    /// Opens the destinations' state — the `fwd_*` tables of `pg` when the ledger is there,
    /// else `data_dir/forward.redb` — and starts each configured destination.
    pub fn start(
        settings: &ForwardSettings,
        data_dir: &Path,
        store: Arc<dyn Store>,
        pg: Option<Arc<PgStore>>,
        metrics: ForwardMetrics,
        clock: SharedClock,
    ) -> Result<Self, ForwardStartError> {
        let (fstore, ledger): (Arc<dyn ForwardStore>, Arc<dyn LedgerSource>) = match pg {
            Some(pg) => (
                Arc::new(PgForwardStore::new(pg)),
                Arc::new(StoreLedger::gapless(store)),
            ),
            None => (
                Arc::new(RedbForwardStore::open(&data_dir.join("forward.redb"))?),
                Arc::new(StoreLedger::new(store)),
            ),
        };
        let mut handles = Vec::new();
        for cfg in [&settings.orb, &settings.metronome].into_iter().flatten() {
            tracing::info!(
                destination = cfg.destination.as_str(),
                base_url = %cfg.base_url,
                "forwarding on"
            );
            handles.push(spawn_destination(
                cfg.clone(),
                fstore.clone(),
                ledger.clone(),
                metrics.clone(),
                Some(clock.clone()),
            )?);
        }
        Ok(Self {
            store: fstore,
            handles,
            clock,
            metrics,
            last: Mutex::new(BTreeMap::new()),
        })
    }

    /// The destinations that are on.
    pub fn destinations(&self) -> Vec<Destination> {
        self.handles.iter().map(|h| h.destination).collect()
    }

    /// A destination's counters and last error.
    pub fn status(
        &self,
        dest: Destination,
    ) -> Option<tally_stripe::forward::runner::DestinationStatus> {
        self.handles
            .iter()
            .find(|h| h.destination == dest)
            .map(DestinationHandle::status)
    }

    /// Wakes every destination (after a ledger commit).
    pub fn notify(&self) {
        for h in &self.handles {
            h.notify();
        }
    }

    /// Stops each destination after its request in flight.
    pub async fn shutdown(&self) {
        for h in &self.handles {
            h.shutdown().await;
        }
    }

    /// Operator retry of dead letter `id` of `dest` (`POST /v1/{orb,metronome}/outbox/{id}/retry`):
    /// back to open under the **same key**, so a copy the destination did take is deduplicated
    /// (one that was attempted goes back as `unknown`; an Orb one older than the grace period
    /// goes through a backfill after an event search). `Ok(None)`: no such group; `Err(group)`:
    /// it is not dead (nothing changed).
    pub fn requeue(
        &self,
        dest: Destination,
        id: u64,
    ) -> Result<
        Result<Option<tally_stripe::forward::FwdGroup>, tally_stripe::forward::FwdGroup>,
        String,
    > {
        let cur = match self.store.list(dest, None, id.saturating_sub(1), 1) {
            Ok(v) => v.into_iter().find(|g| g.id == id),
            Err(e) => return Err(e.to_string()),
        };
        let Some(cur) = cur else {
            return Ok(Ok(None));
        };
        if cur.state != FwdState::Dead {
            return Ok(Err(cur));
        }
        let after = self
            .store
            .apply(dest, &[id], tally_stripe::forward::FwdEvent::Requeue)
            .map_err(|e| e.to_string())?;
        self.notify();
        Ok(Ok(after.into_iter().next()))
    }

    /// The listing of `GET /v1/outbox?destination=…&state=…`.
    pub fn list(
        &self,
        dest: Destination,
        state: Option<FwdState>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<tally_stripe::forward::runner::OutboxView>, String> {
        let groups = self
            .store
            .list(dest, state, after, limit)
            .map_err(|e| e.to_string())?;
        Ok(groups.iter().map(Into::into).collect())
    }

    /// Reconciles `dest` over its delivered groups (Metronome: the last `days` days by day;
    /// Orb: the last 500 delivered keys through event search); sets the metric.
    pub async fn reconcile(&self, dest: Destination, days: i64) -> Option<FwdReport> {
        let h = self.handles.iter().find(|h| h.destination == dest)?;
        let mut delivered = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .store
                .list(dest, Some(FwdState::Sent), after, 10_000)
                .ok()?;
            let Some(last) = page.last() else { break };
            after = last.id;
            delivered.extend(page);
        }
        if dest == Destination::Orb {
            let keep = delivered.len().saturating_sub(500);
            delivered.drain(..keep);
        }
        let now_s = self.clock.now_ms() / 1000;
        let report =
            tally_stripe::forward::reconcile::run(dest, &h.client, &delivered, now_s, days).await;
        self.metrics
            .reconciliation_discrepancies
            .get_or_create(&tally_stripe::forward::runner::DestLabel {
                destination: dest.as_str().to_owned(),
            })
            .set(i64::try_from(report.discrepancies.len()).unwrap_or(i64::MAX));
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dest, report.clone());
        Some(report)
    }
}
