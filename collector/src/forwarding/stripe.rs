//! Stripe in the collector (SPEC §6.4): configuration, starting the forwarder, and what only
//! Stripe has — the webhook secret, the client the entitlements fetch shares, reconciliation
//! against event summaries. The engine is `tally_forward::stripe`.
//!
//! Owns [`StripeSettings`] (what `--stripe-*` flags, `STRIPE_API_KEY` and the config file set)
//! and [`StripeSide`]. The collector's [`Store`] is a [`tally_forward::stripe::OutboxStore`], so
//! the forwarder runs on it directly; once started it is one of [`super::Forwarding`]'s
//! destinations like the others.
//!
//! Guarantees: the API key and webhook secret live only in `tally_forward`'s redacting types and
//! are never logged; without a key the forwarder runs in the crate's log-only mode (it logs what
//! it would send and marks nothing).

use crate::store::Store;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tally_forward::metrics::StripeMetrics;
use tally_forward::stripe::client::{MeterIds, StripeClient};
use tally_forward::stripe::forwarder::ForwarderError;
use tally_forward::stripe::outbox::StoreError as OutboxError;
use tally_forward::stripe::reconcile::{DayKey, Discrepancy};
use tally_forward::stripe::{ApiKey, ForwarderConfig, ForwarderHandle, WebhookSecret};
use tally_forward::time::SharedClock;

/// Stripe settings of a collector.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// The forwarder's configuration: API (`v1`/`v2`), key (`None` = log-only), base URLs,
    /// `Stripe-Version`, pacing and retry tuning.
    pub forwarder: ForwarderConfig,
    /// The webhook endpoint's signing secret; without it `POST /v1/stripe/webhooks` answers 400.
    pub webhook_secret: Option<WebhookSecret>,
    /// How often the reconciliation job runs (`None`: never; `GET /v1/reconciliation` still
    /// works).
    pub reconcile_interval: Option<Duration>,
}

impl Default for StripeSettings {
    fn default() -> Self {
        Self {
            forwarder: ForwarderConfig::default(),
            webhook_secret: None,
            reconcile_interval: Some(Duration::from_secs(600)),
        }
    }
}

impl StripeSettings {
    /// Settings from the command line's values: `api_key` from `STRIPE_API_KEY` or the key file
    /// (see [`ApiKey::from_env_or_file`]); a base URL without a meter-events URL uses the base
    /// URL for both (a local Stripe-compatible server serves both).
    pub fn from_parts(
        api: tally_forward::stripe::Api,
        api_key: Option<ApiKey>,
        base_url: Option<String>,
        meter_events_url: Option<String>,
        stripe_version: Option<String>,
        webhook_secret: Option<WebhookSecret>,
    ) -> Self {
        let mut f = ForwarderConfig {
            api,
            api_key,
            ..ForwarderConfig::default()
        };
        if let Some(b) = base_url {
            let b = b.trim_end_matches('/').to_owned();
            f.meter_events_url = b.clone();
            f.base_url = b;
        }
        if let Some(m) = meter_events_url {
            f.meter_events_url = m.trim_end_matches('/').to_owned();
        }
        if let Some(v) = stripe_version {
            f.stripe_version = v;
        }
        Self {
            forwarder: f,
            webhook_secret,
            ..Self::default()
        }
    }
}

/// The result of one reconciliation run (`GET /v1/reconciliation`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReconciliationReport {
    /// When it ran, Unix seconds.
    pub ran_at: i64,
    /// First UTC day compared (Unix seconds).
    pub from_day: i64,
    /// End of the compared range (exclusive; the current day is left out unless asked for).
    pub to_day: i64,
    /// (Stripe customer, event name, day) keys compared.
    pub compared: usize,
    /// Differences: `difference = stripe − ledger` in Stripe units.
    #[schema(value_type = Vec<Object>)]
    pub discrepancies: Vec<Discrepancy>,
    /// Customers or meters that could not be compared (no mapping, no Stripe meter, errors).
    pub skipped: Vec<String>,
    /// `log_only` when no API key is configured (nothing compared), else `ok`.
    pub mode: String,
}

/// Why reconciliation could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The blocking store task failed.
    #[error("reconciliation task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What only Stripe has in a running collector: its client, meter ids, webhook secret, metrics
/// and the last reconciliation.
pub struct StripeSide {
    /// The forwarder's metrics (registered in the collector's registry).
    pub metrics: StripeMetrics,
    /// The webhook signing secret.
    pub webhook_secret: Option<WebhookSecret>,
    client: Option<StripeClient>,
    meter_ids: MeterIds,
    clock: SharedClock,
    last: Mutex<Option<ReconciliationReport>>,
}

impl StripeSide {
    /// Starts the forwarder on `store` (call on a tokio runtime) on the collector's clock: the
    /// forwarder, reconciliation and the webhook's timestamp check all read time from `clock`.
    pub fn start(
        settings: &StripeSettings,
        store: Arc<dyn Store>,
        metrics: StripeMetrics,
        clock: SharedClock,
    ) -> Result<(Self, ForwarderHandle<dyn Store>), ForwarderError> {
        tally_forward::stripe::client::install_ring_provider();
        let f = &settings.forwarder;
        let client = match &f.api_key {
            Some(k) => Some(
                StripeClient::new(
                    &f.base_url,
                    &f.meter_events_url,
                    k.clone(),
                    &f.stripe_version,
                    f.request_timeout,
                )
                .map_err(ForwarderError::Client)?,
            ),
            None => None,
        };
        let handle = tally_forward::stripe::spawn(
            f.clone(),
            store,
            Some(metrics.clone()),
            Some(clock.clone()),
        )?;
        let side = Self {
            metrics,
            webhook_secret: settings.webhook_secret.clone(),
            client,
            meter_ids: MeterIds::new(f.meter_ids.clone()),
            clock,
            last: Mutex::new(None),
        };
        Ok((side, handle))
    }

    /// The Stripe client, when an API key is configured.
    pub fn client(&self) -> Option<&StripeClient> {
        self.client.as_ref()
    }

    /// True when an API key is configured (otherwise log-only).
    pub fn sends(&self) -> bool {
        self.client.is_some()
    }

    /// The last reconciliation report.
    pub fn last_reconciliation(&self) -> Option<ReconciliationReport> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Compares what the ledger made due (Σ outbox units per Stripe customer, event name and UTC
    /// day) with Stripe's daily event summaries over the last `days` days, ending with today if
    /// `include_today` (summaries are eventually consistent, so today may differ briefly).
    /// Sets the discrepancy gauge and keeps the report.
    pub async fn reconcile(
        &self,
        store: &Arc<dyn Store>,
        days: i64,
        include_today: bool,
    ) -> Result<ReconciliationReport, ReconcileError> {
        let now_s = self.clock.now_ms() / 1000;
        let today = tally_forward::time::day_start(now_s);
        let to_day = if include_today { today + 86_400 } else { today };
        let from_day = to_day - days.max(1) * 86_400;
        let Some(client) = self.client.clone() else {
            let r = ReconciliationReport {
                ran_at: now_s,
                from_day,
                to_day,
                compared: 0,
                discrepancies: Vec::new(),
                skipped: Vec::new(),
                mode: String::from("log_only"),
            };
            return Ok(r);
        };
        let st = store.clone();
        let items = tokio::task::spawn_blocking(move || st.outbox_items()).await??;
        let mut skipped = Vec::new();
        let mut resolved: HashMap<String, Option<String>> = HashMap::new();
        let mut mapped = Vec::new();
        for (customer, event, ts, units) in items {
            if ts < from_day || ts >= to_day {
                continue;
            }
            let sc = match resolved.get(&customer) {
                Some(v) => v.clone(),
                None => {
                    let v =
                        tally_forward::stripe::outbox::resolve_customer(store.as_ref(), &customer)?;
                    resolved.insert(customer.clone(), v.clone());
                    if v.is_none() {
                        skipped.push(format!("customer {customer}: no stripe mapping"));
                    }
                    v
                }
            };
            if let Some(sc) = sc {
                mapped.push((sc, event, ts, units));
            }
        }
        let ledger: BTreeMap<DayKey, Decimal> = tally_forward::stripe::reconcile::day_totals(
            mapped
                .iter()
                .map(|(c, e, t, u)| (c.as_str(), e.as_str(), *t, *u)),
        );
        let mut pairs: Vec<(String, String)> = ledger
            .keys()
            .map(|k| (k.stripe_customer.clone(), k.event_name.clone()))
            .collect();
        pairs.dedup();
        let mut stripe: BTreeMap<DayKey, Decimal> = BTreeMap::new();
        let mut compared_pairs = std::collections::HashSet::new();
        for (sc, event) in pairs {
            let Ok(mid) = self.meter_ids.get(&client, &event).await else {
                skipped.push(format!("event {event}: no stripe meter"));
                continue;
            };
            match tally_forward::stripe::reconcile::fetch_day_totals(
                &client, &mid, &sc, &event, from_day, to_day,
            )
            .await
            {
                Ok(t) => {
                    stripe.extend(t);
                    compared_pairs.insert((sc, event));
                }
                Err(e) => skipped.push(format!("{sc}/{event}: {e}")),
            }
        }
        let ledger: BTreeMap<DayKey, Decimal> = ledger
            .into_iter()
            .filter(|(k, _)| {
                compared_pairs.contains(&(k.stripe_customer.clone(), k.event_name.clone()))
            })
            .collect();
        let discrepancies = tally_forward::stripe::reconcile::reconcile(&ledger, &stripe);
        self.metrics
            .reconciliation_discrepancies
            .set(i64::try_from(discrepancies.len()).unwrap_or(i64::MAX));
        let report = ReconciliationReport {
            ran_at: now_s,
            from_day,
            to_day,
            compared: ledger.len().max(stripe.len()),
            discrepancies,
            skipped,
            mode: String::from("ok"),
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(report.clone());
        Ok(report)
    }
}
