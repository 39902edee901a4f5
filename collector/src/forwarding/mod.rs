//! Forwarding in the collector (SPEC §6.4, §6.4b): every configured destination — Stripe, Orb,
//! Metronome — started on the collector's store and kept in one list of
//! [`tally_forward::Destination`]s, which the ingest path wakes after a ledger commit, the API
//! wakes after a mapping change and lists and retries through, and shutdown stops.
//!
//! - [`stripe`]: Stripe's settings and what only Stripe has (webhook secret, client,
//!   reconciliation against event summaries).
//! - [`ledger_feed`]: Orb's and Metronome's settings, the ledger as their outbox, their shared
//!   store and reconciliation.
//!
//! Guarantees: each destination runs on its own task with its own rows, pacing, retries and
//! dead letters, so one failing never holds up another; [`Forwarding::shutdown`] lets the
//! requests in flight of each finish and runs before the store is closed.

pub mod ledger_feed;
pub mod stripe;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tally_forward::ledger_feed::reconcile::FwdReport;
use tally_forward::ledger_feed::runner::DestinationStatus;
use tally_forward::ledger_feed::store::ForwardStore;
use tally_forward::ledger_feed::{Engine, FeedHandle};
use tally_forward::metrics::StripeMetrics;
use tally_forward::stripe::ForwarderStatus;
use tally_forward::time::SharedClock;
use tally_forward::{Destination, DestinationKind, Status};

use crate::store::Store;
use crate::store::postgres::PgStore;

/// Why forwarding could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    /// The Stripe forwarder could not start.
    #[error(transparent)]
    Stripe(#[from] tally_forward::stripe::forwarder::ForwarderError),
    /// Orb or Metronome could not start.
    #[error(transparent)]
    Feed(#[from] ledger_feed::ForwardStartError),
}

/// The running destinations of a collector.
pub struct Forwarding {
    /// Stripe first, then Orb and Metronome when configured.
    destinations: Vec<Arc<dyn Destination>>,
    /// What only Stripe has.
    pub stripe: stripe::StripeSide,
    /// What Orb and Metronome share, when either is on.
    feeds: Option<ledger_feed::Feeds>,
    clock: SharedClock,
    /// Background tasks (the commit relay, the reconciliation job, the PostgreSQL change
    /// follower): a fixed few, kept by the server at start.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Forwarding {
    /// Starts Stripe's forwarder on `store` (log-only without a key) and each of Orb and
    /// Metronome that has a key, on the ledger of `store` with their state in `pg` when the
    /// ledger is in PostgreSQL, else in `data_dir/forward.redb`; all on the collector's clock.
    /// Call on a tokio runtime.
    pub fn start(
        stripe_settings: &stripe::StripeSettings,
        feed_settings: &ledger_feed::ForwardSettings,
        data_dir: &Path,
        store: Arc<dyn Store>,
        pg: Option<Arc<PgStore>>,
        metrics: StripeMetrics,
        clock: SharedClock,
    ) -> Result<Arc<Self>, ForwardingError> {
        let feed_metrics = metrics.forward.clone();
        let (side, handle) =
            stripe::StripeSide::start(stripe_settings, store.clone(), metrics, clock.clone())?;
        let mut destinations: Vec<Arc<dyn Destination>> = vec![Arc::new(handle)];
        let feeds = match ledger_feed::Feeds::start(
            feed_settings,
            data_dir,
            store,
            pg,
            feed_metrics,
            clock.clone(),
        )? {
            Some((feeds, handles)) => {
                destinations.extend(
                    handles
                        .into_iter()
                        .map(|h| Arc::new(h) as Arc<dyn Destination>),
                );
                Some(feeds)
            }
            None => None,
        };
        Ok(Arc::new(Self {
            destinations,
            stripe: side,
            feeds,
            clock,
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Every running destination.
    pub fn destinations(&self) -> &[Arc<dyn Destination>] {
        &self.destinations
    }

    /// The running destination `kind`, if it is on.
    pub fn get(&self, kind: DestinationKind) -> Option<&Arc<dyn Destination>> {
        self.destinations.iter().find(|d| d.kind() == kind)
    }

    /// Wakes every destination (after a ledger commit or a mapping change).
    pub fn notify(&self) {
        for d in &self.destinations {
            d.notify();
        }
    }

    /// Stripe's forwarder status (unmapped rows per customer, requests, last error).
    pub fn stripe_status(&self) -> ForwarderStatus {
        match self.get(DestinationKind::Stripe).map(|d| d.status()) {
            Some(Status::Stripe(s)) => s,
            _ => ForwarderStatus::default(),
        }
    }

    /// Orb's and Metronome's store, when either is on.
    pub fn feed_store(&self) -> Option<Arc<dyn ForwardStore>> {
        self.feeds.as_ref().map(|f| f.store.clone())
    }

    /// Reconciles Orb or Metronome (`GET /v1/reconciliation?destination=`), with its status;
    /// `None` when it is off.
    pub async fn reconcile_feed(
        &self,
        engine: Engine,
        days: i64,
    ) -> Option<(FwdReport, DestinationStatus)> {
        let feeds = self.feeds.as_ref()?;
        let h = self
            .get(engine.into())?
            .as_any()
            .downcast_ref::<FeedHandle>()?;
        let report = feeds.reconcile(h, days).await?;
        Some((report, h.status()))
    }

    /// Keeps a background task (the commit relay, the reconciliation job) to stop at shutdown.
    pub fn keep_task(&self, t: tokio::task::JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(t);
    }

    /// Now, on the collector's clock (Unix ms).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Stops the background tasks, then each destination after its requests in flight are
    /// answered.
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for t in &tasks {
            t.abort();
        }
        // Awaited so that nothing they hold (the store) outlives the shutdown.
        for t in tasks {
            let _ = t.await;
        }
        for d in &self.destinations {
            d.shutdown().await;
        }
    }
}
