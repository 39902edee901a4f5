//! Starting and stopping a whole collector in-process: store, committer, QUIC and HTTP.
//!
//! Owns [`Collector::start`] and [`CollectorHandle`]: it builds each piece of state once and
//! hands each shell the narrow handles it needs (the QUIC server an ingest handle, the registry
//! and catalog subscriptions; the admin API what it reads and writes, [`crate::api::ApiState`]).
//!
//! Guarantees: [`CollectorHandle::shutdown`] stops accepting batches, lets every connection
//! flush the acks of batches already received, commits everything queued, and only then
//! returns; the HTTP server stops gracefully.

use crate::api::ApiState;
use crate::catalog::Catalogs;
use crate::config::CollectorConfig;
use crate::init::{InitError, InitFiles};
use crate::metrics::Metrics;
use crate::net::quic::{QuicServer, SessionLimits};
use crate::net::registry::Registry;
use crate::store::entitlements::EntitlementStore;
use crate::store::postgres::PgStore;
use crate::store::postgres::listen::PgChange;
use crate::store::redb::RedbStore;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// Why a collector did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory is incomplete or unreadable (run `tally-collector init`).
    #[error("data directory: {0} (run `tally-collector init` first)")]
    Files(#[from] InitError),
    /// The store did not open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// TLS or QUIC setup failed.
    #[error(transparent)]
    Tls(#[from] tally_net::tls::TlsError),
    /// A listener could not bind.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A thread could not start.
    #[error("thread: {0}")]
    Thread(std::io::Error),
    /// The Stripe forwarder could not start.
    #[error("stripe forwarder: {0}")]
    Stripe(#[from] tally_forward::stripe::forwarder::ForwarderError),
    /// Orb or Metronome forwarding could not start.
    #[error(transparent)]
    Forward(#[from] crate::forwarding::ledger_feed::ForwardStartError),
}

/// A running collector.
pub struct CollectorHandle {
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    files: InitFiles,
    shared: Arc<ApiState>,
    shutdown_tx: watch::Sender<bool>,
    quic_task: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
    committer: std::thread::JoinHandle<()>,
    export_task: Option<tokio::task::JoinHandle<()>>,
    ticker: tokio::task::JoinHandle<()>,
}

/// Starts collectors.
pub struct Collector;

impl Collector {
    /// Opens the store in `config.data_dir` and starts the committer, QUIC and HTTP. The data
    /// directory must have been made by [`crate::init::init`].
    pub async fn start(config: CollectorConfig) -> Result<CollectorHandle, StartError> {
        let files = InitFiles::at(&config.data_dir);
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| InitError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let admin_token = InitFiles::read_token(&files.admin_token)?;
        let enroll_token = InitFiles::read_token(&files.enroll_token)?;
        let server_config = tally_net::tls::server_config(
            &read(&files.collector_pem)?,
            &read(&files.collector_key)?,
        )?;
        let mut pg_changes = None;
        let mut pg_store = None;
        let (store, ent_store): (Arc<dyn Store>, Arc<dyn EntitlementStore>) =
            match &config.ledger_url {
                Some(url) => {
                    let pg = Arc::new(PgStore::open_with_listen(
                        url,
                        config.ledger_listen_url.as_deref(),
                    )?);
                    pg_changes = Some(pg.changes());
                    pg_store = Some(pg.clone());
                    (pg.clone(), pg)
                }
                None => {
                    let redb = Arc::new(RedbStore::open(&files.store)?);
                    (redb.clone(), redb)
                }
            };
        let metrics = Arc::new(Metrics::new());
        let entitlements = Arc::new(crate::entitlements::Entitlements::open(
            ent_store,
            store.clone(),
            config.clock.clone(),
            config.leases,
            metrics.entitlements.clone(),
        )?);
        // The forwarder, reconciliation and the webhook check read the collector's one clock.
        let forwarding = crate::forwarding::Forwarding::start(
            &config.stripe,
            &config.forward,
            &config.data_dir,
            store.clone(),
            pg_store,
            metrics.stripe.clone(),
            config.clock.clone(),
        )
        .map_err(|e| match e {
            crate::forwarding::ForwardingError::Stripe(e) => StartError::Stripe(e),
            crate::forwarding::ForwardingError::Feed(e) => StartError::Forward(e),
        })?;
        let outbox_wake = Arc::new(tokio::sync::Notify::new());
        let (ingest, committer) = crate::ingest::spawn_with_wake(
            store.clone(),
            metrics.clone(),
            config.group,
            Some(outbox_wake.clone()),
            config.clock.clone(),
        )
        .map_err(StartError::Thread)?;
        {
            let s = forwarding.clone();
            forwarding.keep_task(tokio::spawn(async move {
                loop {
                    outbox_wake.notified().await;
                    s.notify();
                }
            }));
        }
        if let Some(every) = config.stripe.reconcile_interval
            && forwarding.stripe.sends()
        {
            let (s, st) = (forwarding.clone(), store.clone());
            forwarding.keep_task(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match s.stripe.reconcile(&st, 7, false).await {
                        Ok(r) => tracing::info!(
                            discrepancies = r.discrepancies.len(),
                            "stripe reconciliation"
                        ),
                        Err(e) => tracing::warn!(error = %e, "stripe reconciliation failed"),
                    }
                }
            }));
        }
        let catalogs = Arc::new(Catalogs::open(store.clone())?);
        let catalogs_for_pg = catalogs.clone();
        let registry = Arc::new(Registry::new(
            store.clone(),
            enroll_token,
            config.clock.clone(),
        )?);
        let registry_for_pg = registry.clone();
        let endpoint =
            quinn::Endpoint::server(server_config, config.quic_addr).map_err(|source| {
                StartError::Bind {
                    addr: config.quic_addr,
                    source,
                }
            })?;
        let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: config.quic_addr,
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.http_addr,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.http_addr,
            source,
        })?;
        let quic = QuicServer {
            limits: SessionLimits::from(&config),
            ingest: ingest.into(),
            registry: registry.clone(),
            catalog: catalogs.subscribe(),
            entitlements: entitlements.clone(),
            metrics: metrics.clone(),
            clock: config.clock.clone(),
        };
        let shared = Arc::new(ApiState::new(
            store,
            metrics,
            forwarding,
            registry,
            catalogs,
            admin_token,
            config.clock.clone(),
        ));
        let _ = shared.entitlements.set(entitlements.clone());
        if let Some(changes) = pg_changes {
            shared.forwarding.keep_task(tokio::spawn(follow_pg_changes(
                changes,
                catalogs_for_pg,
                registry_for_pg,
                entitlements.clone(),
            )));
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        // Lease reclaims and time-driven changes (grant expiry, period roll-over).
        let ticker = entitlements.spawn_ticker(shutdown_rx.clone());
        let quic_task = tokio::spawn(crate::net::quic::serve(
            endpoint,
            Arc::new(quic),
            shutdown_rx.clone(),
        ));
        let export_task = if let Some(job) = &config.export {
            let runner =
                crate::export::ExportRunner::new(shared.store.clone(), job.options.clone());
            let _ = shared.export.set(runner.clone());
            Some(crate::export::spawn(
                runner,
                job.interval,
                shutdown_rx.clone(),
            ))
        } else {
            None
        };
        let http_task = tokio::spawn(crate::api::serve(listener, shared.clone(), shutdown_rx));
        tracing::info!(%quic_addr, %http_addr, "collector started");
        Ok(CollectorHandle {
            quic_addr,
            http_addr,
            files,
            shared,
            shutdown_tx,
            quic_task,
            http_task,
            committer,
            export_task,
            ticker,
        })
    }
}

/// Applies changes made through other collectors on the same PostgreSQL to this one's agents:
/// a newer catalog is published, entitlement changes are pushed, revoked agents are closed.
async fn follow_pg_changes(
    mut changes: tokio::sync::broadcast::Receiver<PgChange>,
    catalogs: Arc<Catalogs>,
    registry: Arc<Registry>,
    entitlements: Arc<crate::entitlements::Entitlements>,
) {
    use crate::entitlements::Change;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let change = match changes.recv().await {
            Ok(c) => c,
            Err(RecvError::Lagged(_)) => PgChange::Resync,
            Err(RecvError::Closed) => return,
        };
        let (c, r) = (catalogs.clone(), registry.clone());
        let e = entitlements.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            match change {
                PgChange::Catalog => c.refresh(),
                PgChange::Entitlements(None) => {
                    e.announce(Change::All);
                    Ok(())
                }
                PgChange::Entitlements(Some(customer)) => {
                    if let Ok(id) = tally_protocol::names::CustomerId::new(&customer) {
                        e.announce(Change::Customer(id));
                    }
                    Ok(())
                }
                PgChange::Revoked(hex_id) => {
                    let mut id = [0u8; 16];
                    if hex::decode_to_slice(&hex_id, &mut id).is_ok() {
                        r.close_if_revoked(tally_protocol::batch::AgentId(id))?;
                    }
                    Ok(())
                }
                PgChange::Resync => {
                    e.announce(Change::All);
                    c.refresh()
                }
            }
        })
        .await;
        if let Ok(Err(err)) = done {
            tracing::warn!(error = %err, "applying a change from another collector failed");
        }
    }
}

impl CollectorHandle {
    /// The QUIC address it listens on.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The admin HTTP address it listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The admin token (a secret: do not log it).
    pub fn admin_token(&self) -> &str {
        self.shared.admin_token()
    }

    /// The enrolment token (a secret: do not log it).
    pub fn enroll_token(&self) -> &str {
        self.shared.registry.enroll_token()
    }

    /// The files of its data directory.
    pub fn files(&self) -> &InitFiles {
        &self.files
    }

    /// What the admin API reads and writes (store, metrics, catalog, registry, Stripe), for
    /// tests and embedding.
    pub fn shared(&self) -> &Arc<ApiState> {
        &self.shared
    }

    /// Stops gracefully: no new batches, acks of received ones flushed, queue committed.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.quic_task.await;
        let _ = self.http_task.await;
        let _ = self.ticker.await;
        // An export run in progress finishes (its files and manifest are whole either way).
        if let Some(t) = self.export_task {
            let _ = t.await;
        }
        // Requests in flight (Stripe, Orb, Metronome) are answered and recorded before the
        // store closes.
        self.shared.forwarding.shutdown().await;
        // Every connection is gone; dropping the last sender lets the committer drain and end.
        let CollectorHandle {
            shared, committer, ..
        } = self;
        drop(shared);
        let _ = tokio::task::spawn_blocking(move || committer.join()).await;
        tracing::info!("collector stopped");
    }
}
