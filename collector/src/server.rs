//! Starting and stopping a whole collector in-process: store, committer, QUIC and HTTP.
//!
//! Owns [`CollectorConfig`], [`Collector::start`] and [`CollectorHandle`], and the state the
//! shells share ([`Shared`]).
//!
//! Guarantees: [`CollectorHandle::shutdown`] stops accepting batches, lets every connection
//! flush the acks of batches already received, commits everything queued, and only then
//! returns; the HTTP server stops gracefully.

use crate::core::ledger::{Adjustment, VerifyReport};
use crate::ingest::{GroupLimits, IngestRequest, now_ms};
use crate::init::{InitError, InitFiles};
use crate::metrics::Metrics;
use crate::store::redb::RedbStore;
use crate::store::{AdjustOutcome, Store, StoreError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::{Catalog, MeterDef};
use tally_protocol::frame::AckOutcome;
use tokio::sync::{mpsc, watch};

/// Everything a collector needs to start.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// The data directory (made by [`crate::init::init`]).
    pub data_dir: PathBuf,
    /// QUIC listen address (port 0 picks one).
    pub quic_addr: SocketAddr,
    /// Admin HTTP listen address (port 0 picks one).
    pub http_addr: SocketAddr,
    /// Unacknowledged batches an agent may have in flight per connection.
    pub max_in_flight: u32,
    /// Most concurrent QUIC connections.
    pub max_connections: usize,
    /// Time allowed from connection to `Welcome`.
    pub handshake_timeout: Duration,
    /// Group commit limits.
    pub group: GroupLimits,
    /// Stripe forwarding (log-only without an API key).
    pub stripe: crate::stripe::StripeSettings,
}

impl CollectorConfig {
    /// Defaults: QUIC on `127.0.0.1:7443`, HTTP on `127.0.0.1:7080`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        CollectorConfig {
            data_dir: data_dir.into(),
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 7443)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7080)),
            max_in_flight: 32,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            group: GroupLimits::default(),
            stripe: crate::stripe::StripeSettings::default(),
        }
    }

    /// Both listeners on `127.0.0.1` with ports chosen by the OS (for tests).
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        let mut c = Self::new(data_dir);
        c.quic_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c
    }
}

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
    Tls(#[from] crate::net::quic::TlsSetupError),
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
    Stripe(#[from] tally_stripe::forwarder::ForwarderError),
}

/// In-memory facts about an agent, for `GET /v1/agents`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveInfo {
    /// Last handshake or ack, ms.
    pub last_seen_ms: i64,
    /// Epoch of the last acked batch.
    pub epoch: u64,
    /// Seq of the last acked batch.
    pub last_acked_seq: u64,
    /// Time from sealing to ack of the last batch, ms.
    pub last_lag_ms: i64,
}

/// State shared by the QUIC and HTTP shells.
pub struct Shared {
    /// The configuration.
    pub config: CollectorConfig,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The enrolment token agents present on first contact.
    pub enroll_token: String,
    /// The admin API token.
    pub admin_token: String,
    /// The current catalog; connections push it when it changes.
    pub catalog_tx: watch::Sender<Arc<Catalog>>,
    /// The committer's queue.
    pub ingest: mpsc::Sender<IngestRequest>,
    /// Stripe forwarding: the forwarder, its metrics, webhooks and reconciliation.
    pub stripe: Arc<crate::stripe::StripeRuntime>,
    live: Mutex<HashMap<AgentId, Vec<quinn::Connection>>>,
    info: Mutex<HashMap<AgentId, LiveInfo>>,
}

impl Shared {
    /// Remembers a live connection of `agent` (so a revocation can close it).
    pub fn register_live(&self, agent: AgentId, conn: quinn::Connection) {
        if let Ok(mut live) = self.live.lock() {
            let v = live.entry(agent).or_default();
            v.retain(|c| c.close_reason().is_none());
            v.push(conn);
        }
    }

    /// Notes that `agent` was seen at `now`.
    pub fn touch(&self, agent: AgentId, now: i64) {
        if let Ok(mut info) = self.info.lock() {
            info.entry(agent).or_default().last_seen_ms = now;
        }
    }

    /// Notes an ack sent to `agent`.
    pub fn acked(&self, agent: AgentId, epoch: u64, seq: u64, _outcome: AckOutcome) {
        let now = now_ms();
        if let Ok(mut info) = self.info.lock() {
            let i = info.entry(agent).or_default();
            i.last_seen_ms = now;
            if (epoch, seq) >= (i.epoch, i.last_acked_seq) {
                i.epoch = epoch;
                i.last_acked_seq = seq;
            }
        }
    }

    /// Live facts about an agent.
    pub fn live_info(&self, agent: AgentId) -> LiveInfo {
        self.info
            .lock()
            .ok()
            .and_then(|i| i.get(&agent).cloned())
            .unwrap_or_default()
    }

    /// Adds or replaces a meter and pushes the new catalog to every connected agent.
    pub fn put_meter(&self, def: &MeterDef) -> Result<Catalog, StoreError> {
        let catalog = self.store.put_meter(def)?;
        if catalog.version != self.catalog_tx.borrow().version {
            self.catalog_tx.send_replace(Arc::new(catalog.clone()));
        }
        Ok(catalog)
    }

    /// Revokes an agent and closes its live connections. `Ok(false)` if it is unknown.
    pub fn revoke(&self, agent: AgentId) -> Result<bool, StoreError> {
        let Some(mut rec) = self.store.agent(agent)? else {
            return Ok(false);
        };
        if rec.revoked_at_ms.is_none() {
            rec.revoked_at_ms = Some(now_ms());
            self.store.put_agent(&rec)?;
        }
        if let Ok(mut live) = self.live.lock()
            && let Some(conns) = live.remove(&agent)
        {
            for c in conns {
                c.close(
                    quinn::VarInt::from_u32(u32::from(
                        tally_protocol::error::ErrorCode::RevokedAgent.number(),
                    )),
                    b"revoked",
                );
            }
        }
        Ok(true)
    }

    /// Posts an adjustment.
    pub fn adjust(&self, adj: &Adjustment) -> Result<AdjustOutcome, StoreError> {
        let out = self.store.adjust(adj, now_ms())?;
        if matches!(out, AdjustOutcome::Created(_)) {
            self.metrics.adjustments.inc();
        }
        Ok(out)
    }

    /// Verifies the ledger.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.store.verify()
    }
}

/// A running collector.
pub struct CollectorHandle {
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    files: InitFiles,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    quic_task: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
    committer: std::thread::JoinHandle<()>,
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
        let server_config = crate::net::quic::server_config(
            &read(&files.collector_pem)?,
            &read(&files.collector_key)?,
        )?;
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&files.store)?);
        let metrics = Arc::new(Metrics::new());
        let stripe = crate::stripe::StripeRuntime::start(
            &config.stripe,
            store.clone(),
            metrics.stripe.clone(),
        )?;
        let outbox_wake = Arc::new(tokio::sync::Notify::new());
        let (ingest, committer) = crate::ingest::spawn_with_wake(
            store.clone(),
            metrics.clone(),
            config.group,
            Some(outbox_wake.clone()),
        )
        .map_err(StartError::Thread)?;
        {
            let s = stripe.clone();
            stripe.keep_task(tokio::spawn(async move {
                loop {
                    outbox_wake.notified().await;
                    s.notify();
                }
            }));
        }
        if let Some(every) = config.stripe.reconcile_interval
            && stripe.sends()
        {
            let (s, st) = (stripe.clone(), store.clone());
            stripe.keep_task(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match s.reconcile(&st, 7, false).await {
                        Ok(r) => tracing::info!(
                            discrepancies = r.discrepancies.len(),
                            "stripe reconciliation"
                        ),
                        Err(e) => tracing::warn!(error = %e, "stripe reconciliation failed"),
                    }
                }
            }));
        }
        let catalog = store.catalog()?;
        let (catalog_tx, _) = watch::channel(Arc::new(catalog));
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
        let shared = Arc::new(Shared {
            config,
            store,
            metrics,
            enroll_token,
            admin_token,
            catalog_tx,
            ingest,
            stripe,
            live: Mutex::new(HashMap::new()),
            info: Mutex::new(HashMap::new()),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let quic_task = tokio::spawn(crate::net::quic::serve(
            endpoint,
            shared.clone(),
            shutdown_rx.clone(),
        ));
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
        })
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
        &self.shared.admin_token
    }

    /// The enrolment token (a secret: do not log it).
    pub fn enroll_token(&self) -> &str {
        &self.shared.enroll_token
    }

    /// The files of its data directory.
    pub fn files(&self) -> &InitFiles {
        &self.files
    }

    /// The shared state (store, metrics, catalog), for tests and embedding.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops gracefully: no new batches, acks of received ones flushed, queue committed.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.quic_task.await;
        let _ = self.http_task.await;
        // Requests to Stripe in flight are answered and recorded before the store closes.
        self.shared.stripe.shutdown().await;
        // Every connection is gone; dropping the last sender lets the committer drain and end.
        let CollectorHandle {
            shared, committer, ..
        } = self;
        drop(shared);
        let _ = tokio::task::spawn_blocking(move || committer.join()).await;
        tracing::info!("collector stopped");
    }
}
