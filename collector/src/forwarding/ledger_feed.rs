//! Orb and Metronome in the collector (SPEC §6.4b): settings, the ledger as their outbox, and
//! what they share while running. The engine is `tally_forward::ledger_feed` (with
//! `tally_forward::orb` and `tally_forward::metronome`).
//!
//! Owns [`ForwardSettings`] (what `--orb-*` / `--metronome-*` flags, `ORB_API_KEY`,
//! `METRONOME_API_KEY` and the config file set), [`StoreLedger`] (usage transfers of the
//! collector's store as signed ledger items with their dimensions) and [`Feeds`].
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

use tally_forward::ApiKey;
use tally_forward::ledger_feed::reconcile::FwdReport;
use tally_forward::ledger_feed::runner::{ForwardMetrics, LedgerSource};
use tally_forward::ledger_feed::store::ForwardStore;
use tally_forward::ledger_feed::{
    DestinationConfig, Engine, FeedHandle, FwdState, LedgerItem, RedbForwardStore, Routes,
    spawn_destination,
};
use tally_protocol::names::{CustomerId, MeterName};

use crate::store::{DestNames, NameKind};

use crate::store::postgres::PgStore;
use crate::store::postgres::forward::PgForwardStore;
use tally_forward::time::SharedClock;

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

    fn routes(&self, dest: Engine, items: &[LedgerItem], base: &Routes) -> Result<Routes, String> {
        let pick = |n: DestNames| match dest {
            Engine::Orb => n.orb,
            Engine::Metronome => n.metronome,
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
    Store(#[from] tally_forward::ledger_feed::store::FwdStoreError),
    /// A destination could not start.
    #[error("forward destination: {0}")]
    Start(#[from] tally_forward::ledger_feed::runner::StartError),
}

/// What Orb and Metronome share in a running collector: their store, metrics and the last
/// reconciliation of each. The running destinations themselves are [`FeedHandle`]s in
/// [`super::Forwarding`]'s list.
pub struct Feeds {
    /// Their store.
    pub store: Arc<dyn ForwardStore>,
    clock: SharedClock,
    metrics: ForwardMetrics,
    last: Mutex<BTreeMap<Engine, FwdReport>>,
}

impl Feeds {
    /// Opens the destinations' state — the `fwd_*` tables of `pg` when the ledger is there,
    /// else `data_dir/forward.redb` — and starts each configured destination. `None` when none
    /// is configured (nothing is opened).
    pub fn start(
        settings: &ForwardSettings,
        data_dir: &Path,
        store: Arc<dyn Store>,
        pg: Option<Arc<PgStore>>,
        metrics: ForwardMetrics,
        clock: SharedClock,
    ) -> Result<Option<(Self, Vec<FeedHandle>)>, ForwardStartError> {
        if settings.is_empty() {
            return Ok(None);
        }
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
        let feeds = Self {
            store: fstore,
            clock,
            metrics,
            last: Mutex::new(BTreeMap::new()),
        };
        Ok(Some((feeds, handles)))
    }

    /// Reconciles `h`'s destination over its delivered groups (Metronome: the last `days` days
    /// by day; Orb: the last 500 delivered keys through event search); sets the metric.
    /// `None` when its groups could not be read.
    pub async fn reconcile(&self, h: &FeedHandle, days: i64) -> Option<FwdReport> {
        let dest = h.destination;
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
        if dest == Engine::Orb {
            let keep = delivered.len().saturating_sub(500);
            delivered.drain(..keep);
        }
        let now_s = self.clock.now_ms() / 1000;
        let report =
            tally_forward::ledger_feed::reconcile::run(dest, &h.client, &delivered, now_s, days)
                .await;
        self.metrics
            .reconciliation_discrepancies
            .get_or_create(&tally_forward::metrics::DestLabel {
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
