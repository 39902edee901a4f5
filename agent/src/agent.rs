//! [`Agent`]: the handle products hold, and the threads and task behind it.
//!
//! Owns the wiring: the hot-path [`Aggregator`], the [`Store`], the sealer thread, the
//! group-commit thread of `record_durable`, the shipper task, the backlog accounting and the
//! disk-budget gate.
//!
//! Threads: the sealer and the durable-log writer are plain OS threads (their work is blocking
//! disk I/O); the shipper is a tokio task on the runtime that called [`AgentBuilder::start`].
//!
//! Disk budget (SPEC A3): the backlog is the bytes of unacknowledged sealed batches plus the
//! bytes of durable-log rows not yet sealed. At or above `disk_budget`, with
//! [`Overflow::Reject`] every recording call fails with [`RecordError::OverBudget`]; with
//! [`Overflow::Block`] `record()` keeps aggregating in memory, sealing of that memory pauses,
//! and `record_durable` waits until the backlog is below the budget again. The durable log is
//! still folded into batches over the budget (it is on disk already): otherwise a log that alone
//! exceeds the budget would never drain (decision 0100).

use crate::aggregate::{Aggregator, GATE_CLOSED, GATE_OPEN, GATE_OVER_BUDGET};
use crate::config::{Config, Overflow};
use crate::entitlements::EntitlementsCache;
use crate::entitlements::policy::{EntitlementsConfig, OfflinePolicy};
use crate::entitlements::table::{Outgoing, Table};
use crate::error::{FlushError, RecordError, SealError, ShutdownError, StartError, StoreError};
use crate::event::{Event, MAX_EVENT_ID_BYTES, Recorded};
use crate::metrics::Metrics;
use crate::sealer::{Carry, SealerCore, seal_once};
use crate::seglog::{FsDir, LogConfig, SegmentLog};
use crate::session::{SessionConfig, SessionEvent};
use crate::shipper::{self, SessionEvents, Shipper};
use crate::status::{ConnectionState, Status};
use crate::store::{BatchMeta, DiskFaults, LoggedEvent, QuarantinedBatch, Store};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tally_clock::{SharedClock, SystemClock, coarse_now_ms};
use tally_protocol::batch::{AgentId, Delta};
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{
    EntitlementsRequest, LeaseRelease, LeaseRequest, MAX_CUSTOMERS_PER_REQUEST,
};
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, Dimensions, MeterName};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Events waiting in memory (from `record_event` with an id) before a seal asks to run early.
const PENDING_SEAL_HINT: usize = 10_000;
/// Events waiting in memory at most; past it `record_event` with an id is refused.
const PENDING_MAX: usize = 1_000_000;
/// Threads running the durable log's `fdatasync`s: a group is written while earlier ones sync,
/// and syncs overlap (this disk completes ~2× more concurrent syncs than serial ones).
const SYNC_THREADS: usize = 3;
/// Requests folded into one durable-log commit at most.
const MAX_GROUP_COMMIT: usize = 16_384;
/// `seal()`/`flush()`/`shutdown()` requests waiting for the sealer thread at most; more callers
/// wait (asynchronously) for room.
pub const SEAL_QUEUE: usize = 64;
/// `record_durable` requests waiting for the durable-log writer at most; more callers wait
/// (asynchronously) for room, so memory stays bounded under any number of callers.
pub const DURABLE_QUEUE: usize = 4_096;
/// Durable-log rows read per page when the agent opens (to rebuild the accepted-id set).
const LOG_PAGE: usize = 10_000;
/// Frames for the collector (snapshot and lease requests, releases) waiting for the shipper at
/// most; the entitlement task waits for room.
pub const CONTROL_QUEUE: usize = 1_024;
/// How often leases are checked for expiry and the period's end.
const LEASE_TICK: Duration = Duration::from_millis(50);

/// Unacknowledged batches and unsealed log rows, as the budget and `status()` see them.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    pub(crate) batches: BTreeMap<u64, BatchMeta>,
    pub(crate) batch_bytes: u64,
    pub(crate) log_rows: u64,
    pub(crate) log_bytes: u64,
    pub(crate) last_sealed: u64,
    pub(crate) last_acked: Option<u64>,
}

/// A delta of `record_event` with its id and the time the id was accepted.
type PendingEvent = (Delta, Option<(String, i64)>);

/// State shared by the handle, the threads and the shipper.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) agg: Aggregator,
    pub(crate) store: Arc<Store>,
    /// The durable log of `record_durable` (`data_dir/log/`).
    pub(crate) log: Arc<SegmentLog>,
    pub(crate) key: ed25519_dalek::SigningKey,
    pub(crate) agent_id: AgentId,
    pub(crate) epoch: u64,
    /// Deltas of `record_event` calls with an id, and the id with its acceptance time.
    pending: Mutex<Vec<PendingEvent>>,
    /// Ids accepted but not yet in the store's dedup set.
    ids: Mutex<HashSet<String>>,
    pub(crate) backlog: Mutex<Backlog>,
    /// Bumped on every backlog change.
    pub(crate) changed: watch::Sender<u64>,
    /// The highest sealed seq, for the shipper.
    pub(crate) sealed: watch::Sender<u64>,
    pub(crate) conn: Mutex<ConnectionState>,
    /// Why the last connection attempt or connection failed.
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) entitlements: RwLock<Option<EntitlementsCache>>,
    /// The decision table the entitlement calls answer from.
    pub(crate) ent: Arc<Table>,
    /// Notified when a snapshot or a lease grant was applied (the waiting variants wait on it).
    pub(crate) ent_changed: Notify,
    /// Notified when the table queued a message for the collector.
    pub(crate) ent_outbox: Arc<Notify>,
    /// Leases the disk remembered at start: released once what they consumed is sealed.
    remembered_leases: Mutex<Vec<u64>>,
    /// Whether a clock was injected (then hot paths read it instead of the coarse clock).
    custom_clock: bool,
    pub(crate) metrics: Metrics,
    /// Wall time, except on the hot path (see [`tally_clock::coarse_now_ms`]).
    pub(crate) clock: SharedClock,
    over_budget: AtomicBool,
    /// The collector refused this agent as revoked (cleared by a later welcome).
    revoked: AtomicBool,
    /// Batches in the store's quarantine (signed by a replaced key, or refused): kept, not sent.
    quarantined: AtomicU64,
    /// The last durable-log or seal failure, until a later write succeeds (readiness).
    disk_error: Mutex<Option<String>>,
}

impl Shared {
    /// Notes a failed (`Some`) or successful (`None`) disk write for readiness.
    fn disk_result(&self, e: Option<String>) {
        let mut d = self
            .disk_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match (&*d, e) {
            (None, None) => {}
            (Some(_), None) => {
                tracing::info!("disk writes succeed again");
                *d = None;
            }
            (_, Some(e)) => *d = Some(e),
        }
    }

    /// Why the agent's disk is failing now, if it is.
    fn disk_failure(&self) -> Option<String> {
        self.disk_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .or_else(|| self.store.failure())
    }

    /// Now for the entitlement hot paths: the coarse clock, or the injected one in tests.
    pub(crate) fn hot_now_ms(&self) -> i64 {
        if self.custom_clock {
            self.clock.now_ms()
        } else {
            coarse_now_ms()
        }
    }

    fn update_backlog(&self, f: impl FnOnce(&mut Backlog)) {
        let (batches, bytes, oldest) = {
            let mut b = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut b);
            (
                b.batches.len() as u64,
                b.batch_bytes + b.log_bytes,
                b.batches.values().next().map(|m| m.sealed_at_ms),
            )
        };
        let over = bytes >= self.cfg.disk_budget;
        let was = self.over_budget.swap(over, Ordering::Relaxed);
        if over != was {
            tracing::warn!(bytes, budget = self.cfg.disk_budget, over, "disk budget");
        }
        if self.cfg.overflow == Overflow::Reject {
            self.agg
                .set_gate(if over { GATE_OVER_BUDGET } else { GATE_OPEN });
        }
        self.metrics
            .backlog_batches
            .set(i64::try_from(batches).unwrap_or(i64::MAX));
        self.metrics
            .backlog_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics.oldest_unacked_age.set(oldest.map_or(0.0, |t| {
            (self.clock.now_ms().saturating_sub(t)) as f64 / 1000.0
        }));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Records acknowledged batches as gone (after the store deleted them).
    pub(crate) fn on_acked(&self, seqs: &[u64], last_seq: u64) {
        self.update_backlog(|b| {
            for seq in seqs {
                if let Some(m) = b.batches.remove(seq) {
                    b.batch_bytes = b.batch_bytes.saturating_sub(m.bytes);
                }
            }
            b.last_acked = Some(b.last_acked.map_or(last_seq, |l| l.max(last_seq)));
        });
    }

    /// The shipper's parts: the store, the key, what is unacknowledged now, and this agent as
    /// the sink of the session's events.
    fn shipper(
        self: &Arc<Self>,
        client: quinn::ClientConfig,
        control: mpsc::Receiver<Frame>,
    ) -> Shipper {
        let unacked = self
            .backlog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .batches
            .keys()
            .copied()
            .collect();
        Shipper {
            cfg: SessionConfig {
                collectors: self.cfg.collectors.clone(),
                epoch: self.epoch,
                enroll_token: self.cfg.enroll_token.clone(),
                backoff_min: self.cfg.backoff_min,
                backoff_max: self.cfg.backoff_max,
                connect_timeout: self.cfg.connect_timeout,
            },
            failback: (self.cfg.collectors.len() > 1)
                .then_some(self.cfg.failback_interval)
                .filter(|d| !d.is_zero()),
            key: self.key.clone(),
            store: self.store.clone(),
            client,
            clock: self.clock.clone(),
            // Subscribed before `unacked` was read: a seal in between is reported again.
            sealed: self.sealed.subscribe(),
            unacked,
            entitlements: self
                .entitlements
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            events: self.clone(),
            control,
        }
    }

    fn set_conn(&self, s: ConnectionState) {
        self.metrics
            .connected
            .set(i64::from(matches!(s, ConnectionState::Connected { .. })));
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = s;
    }

    fn over_budget(&self) -> bool {
        self.over_budget.load(Ordering::Relaxed)
    }

    /// Runs one seal and books its result.
    fn seal(
        &self,
        core: &mut SealerCore,
        carry: &mut Carry,
        force: bool,
    ) -> Result<u64, SealError> {
        // Over the budget under `Block`, usage in memory stays in memory; the durable log is
        // folded all the same (it is on disk already; see `seal_once`).
        let memory = force || self.cfg.overflow != Overflow::Block || !self.over_budget();
        let pending = if memory {
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
        } else {
            Vec::new()
        };
        let sealed = seal_once(
            &self.agg,
            &self.store,
            &self.log,
            &self.key,
            core,
            carry,
            pending,
            memory,
            self.clock.now_ms(),
        );
        self.disk_result(sealed.as_ref().err().map(ToString::to_string));
        let sealed = sealed?;
        if !sealed.ids.is_empty() {
            let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
            for id in &sealed.ids {
                ids.remove(id);
            }
        }
        if !sealed.batches.is_empty() {
            self.metrics
                .batches_sealed
                .inc_by(sealed.batches.len() as u64);
            tracing::debug!(
                epoch = self.epoch,
                batches = sealed.batches.len(),
                first_seq = sealed.batches[0].seq,
                log_rows = sealed.log_rows,
                "sealed"
            );
        }
        let mut last = 0;
        self.update_backlog(|b| {
            for m in &sealed.batches {
                // Seqs are consecutive: the store refused anything else, so a gap is a bug.
                assert_eq!(
                    m.seq,
                    b.last_sealed + 1,
                    "sealed batch {} does not follow {}",
                    m.seq,
                    b.last_sealed
                );
                b.batch_bytes += m.bytes;
                b.batches.insert(m.seq, *m);
                b.last_sealed = b.last_sealed.max(m.seq);
            }
            b.log_rows = b.log_rows.saturating_sub(sealed.log_rows);
            b.log_bytes = b.log_bytes.saturating_sub(sealed.log_bytes);
            last = b.last_sealed;
        });
        if !sealed.batches.is_empty() {
            self.sealed.send_replace(last);
        }
        Ok(last)
    }
}

/// The agent owns the backlog, the catalog, the entitlement cache and the connection state; the
/// shipper reports what its session did, after the store writes committed.
impl SessionEvents for Shared {
    fn on_event(&self, event: SessionEvent) {
        match event {
            SessionEvent::Acked(acked) => {
                let Some(last) = acked.last().map(|a| a.seq) else {
                    return;
                };
                for a in &acked {
                    let outcome = match a.outcome {
                        AckOutcome::Committed => "committed",
                        AckOutcome::Duplicate => "duplicate",
                        AckOutcome::Quarantined { code } => {
                            tracing::warn!(seq = a.seq, %code, "batch quarantined by the collector");
                            "quarantined"
                        }
                    };
                    self.metrics
                        .batches_acked
                        .get_or_create(&[("outcome", outcome)])
                        .inc();
                    self.metrics.ship_rtt.observe(a.rtt_ms as f64 / 1000.0);
                    tracing::trace!(
                        epoch = self.epoch,
                        seq = a.seq,
                        outcome,
                        "batch acknowledged"
                    );
                }
                let seqs: Vec<u64> = acked.iter().map(|a| a.seq).collect();
                self.on_acked(&seqs, last);
            }
            SessionEvent::Catalog(c) => self.agg.set_catalog(c),
            SessionEvent::Entitlements { cache, update } => {
                self.ent
                    .apply(&update.customers, update.full, self.clock.now_ms());
                *self
                    .entitlements
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(cache);
                self.ent_changed.notify_waiters();
            }
            SessionEvent::LeaseGrant(g) => {
                tracing::debug!(customer = %g.customer, meter = %g.meter, lease = g.lease_id, granted_total = %g.granted_total, added = %g.added, "lease granted");
                self.ent.on_grant(&g, self.clock.now_ms());
                self.ent_changed.notify_waiters();
            }
            SessionEvent::Quarantined { seq, reason } => {
                let n = self.quarantined.fetch_add(1, Ordering::Relaxed) + 1;
                self.metrics
                    .quarantined_batches
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
                tracing::error!(
                    agent = %self.agent_id,
                    seq,
                    %reason,
                    quarantined = n,
                    "batch quarantined: kept on disk and not sent; export it with `tally-agent quarantine`"
                );
                self.update_backlog(|b| {
                    if let Some(m) = b.batches.remove(&seq) {
                        b.batch_bytes = b.batch_bytes.saturating_sub(m.bytes);
                    }
                });
            }
            SessionEvent::Revoked => {
                if !self.revoked.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        agent = %self.agent_id,
                        "the collector revoked this agent: new durable events are refused; enrol a new key"
                    );
                }
            }
            SessionEvent::State(s) => {
                if matches!(s, ConnectionState::Connected { .. }) {
                    self.revoked.store(false, Ordering::Relaxed);
                }
                self.ent.set_connected(
                    matches!(s, ConnectionState::Connected { .. }),
                    self.clock.now_ms(),
                );
                if let ConnectionState::Disconnected { last_error } = &s {
                    *self
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(last_error.clone());
                }
                self.set_conn(s);
            }
        }
    }
}

enum SealerCmd {
    Seal(oneshot::Sender<Result<u64, SealError>>),
    Stop(oneshot::Sender<Result<u64, SealError>>),
}

/// Events appended to the durable log together: all of them in one commit, or none.
struct DurableReq {
    events: Vec<LoggedEvent>,
    reply: oneshot::Sender<Result<Vec<Recorded>, RecordError>>,
}

/// Builds an [`Agent`]; see [`Agent::builder`].
#[derive(Clone, Default)]
pub struct AgentBuilder {
    cfg: Config,
    clock: Option<SharedClock>,
    faults: Option<DiskFaults>,
}

impl std::fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("cfg", &self.cfg)
            .field("clock", &self.clock.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl AgentBuilder {
    /// Directory of the agent key and the local store (required; created if missing).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cfg.data_dir = dir.into();
        self
    }

    /// Adds a collector address (`host:port`); repeat for failover, tried in order.
    pub fn collector(mut self, addr: impl Into<String>) -> Self {
        self.cfg.collectors.push(addr.into());
        self
    }

    /// With several collectors: how often the first is tried again while another serves, to
    /// move back to it (default 30 s; zero stays on the one that works).
    pub fn failback_interval(mut self, every: Duration) -> Self {
        self.cfg.failback_interval = every;
        self
    }

    /// Adds several collector addresses.
    pub fn collectors<S: Into<String>>(mut self, addrs: impl IntoIterator<Item = S>) -> Self {
        self.cfg
            .collectors
            .extend(addrs.into_iter().map(Into::into));
        self
    }

    /// PEM of the deployment CA; the collector's certificate must chain to it.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.cfg.ca_pem = Some(pem.into());
        self
    }

    /// Enrolment token, presented on every connect (the collector registers the key once).
    pub fn enroll_token(mut self, token: impl Into<String>) -> Self {
        self.cfg.enroll_token = Some(token.into());
        self
    }

    /// How often aggregates are sealed (default 250 ms; 1 ms to 1 hour).
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.cfg.flush_interval = d;
        self
    }

    /// Bytes of backlog kept on disk before the overflow policy applies (default 1 GiB).
    pub fn disk_budget(mut self, bytes: u64) -> Self {
        self.cfg.disk_budget = bytes;
        self
    }

    /// What happens over the disk budget (default [`Overflow::Block`]).
    pub fn overflow(mut self, o: Overflow) -> Self {
        self.cfg.overflow = o;
        self
    }

    /// How long event ids are remembered (default 35 days).
    pub fn dedup_window(mut self, d: Duration) -> Self {
        self.cfg.dedup_window = d;
        self
    }

    /// How far in the past and the future an event's own time may be (default 35 days and
    /// 5 minutes, Stripe's bounds): outside, `record_event` and `record_durable` refuse it.
    pub fn event_time_window(mut self, max_age: Duration, max_lead: Duration) -> Self {
        self.cfg.max_event_age = max_age;
        self.cfg.max_event_lead = max_lead;
        self
    }

    /// Reconnect delays: the first, and the largest (default 100 ms and 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.cfg.backoff_min = min;
        self.cfg.backoff_max = max.max(min);
        self
    }

    /// Time allowed for connecting and the handshake (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.cfg.connect_timeout = d;
        self
    }

    /// The wall clock for sealing, ids, ages and reconnect timers (default the system clock);
    /// a test passes a [`tally_clock::ManualClock`]. The `record()` hot path stamps usage with
    /// [`tally_clock::coarse_now_ms`] regardless. Reconnect backoffs and the handshake timeout
    /// run on this clock too: on a manual clock they fire only as the test advances it.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Routes every write and sync of the agent's files through `faults` (tests: a disk that
    /// fills up and frees again, without root or a real small file system).
    #[doc(hidden)]
    pub fn disk_faults(mut self, faults: DiskFaults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// All entitlement settings at once (stale age, offline policies, wait bound).
    pub fn entitlements(mut self, cfg: EntitlementsConfig) -> Self {
        self.cfg.entitlements = cfg;
        self
    }

    /// A snapshot not confirmed by a connected collector for this long is stale, and the
    /// offline policy decides (default 15 minutes).
    pub fn stale_after(mut self, d: Duration) -> Self {
        self.cfg.entitlements.stale_after = d;
        self
    }

    /// The offline policy of meters without one of their own, and of features (default deny).
    pub fn default_offline_policy(mut self, p: OfflinePolicy) -> Self {
        self.cfg.entitlements.default_policy = p;
        self
    }

    /// The offline policy of one meter.
    pub fn offline_policy(mut self, meter: MeterName, p: OfflinePolicy) -> Self {
        self.cfg.entitlements.meter_policy.insert(meter, p);
        self
    }

    /// How long the waiting variants (`check_wait`, `try_consume_wait`, …) wait for a new
    /// customer's snapshot or a first lease (default 100 ms).
    pub fn entitlements_wait(mut self, d: Duration) -> Self {
        self.cfg.entitlements.wait = d;
        self
    }

    /// Opens the store, loads or creates the key, and starts sealing and shipping. Must be
    /// called within a tokio runtime; the shipper runs on it.
    pub async fn start(self) -> Result<Agent, StartError> {
        let cfg = self.cfg;
        let custom_clock = self.clock.is_some();
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        if cfg.data_dir.as_os_str().is_empty() {
            return Err(StartError::Config("data_dir is required".into()));
        }
        if cfg.flush_interval < Duration::from_millis(1)
            || cfg.flush_interval > Duration::from_secs(3600)
        {
            return Err(StartError::Config(
                "flush_interval must be 1 ms to 1 hour".into(),
            ));
        }
        let client = match (&cfg.ca_pem, cfg.collectors.is_empty()) {
            (_, true) => None,
            (None, false) => return Err(StartError::Config("ca_pem is required".into())),
            (Some(pem), false) => Some(
                tally_net::tls::client_config(pem).map_err(|e| StartError::Ca(e.to_string()))?,
            ),
        };
        let c2 = cfg.clone();
        let faults = self.faults;
        let opened = tokio::task::spawn_blocking(move || open(c2, clock, custom_clock, faults))
            .await
            .map_err(|e| StartError::Config(e.to_string()))??;
        let sh = Arc::new(opened);
        let (stop_tx, stop_rx) = watch::channel(false);

        let core = SealerCore::new(sh.agent_id, sh.epoch, sh.store.next_seq()?);
        let (seal_tx, seal_rx) = mpsc::channel(SEAL_QUEUE);
        let sealer = {
            let sh = sh.clone();
            std::thread::Builder::new()
                .name("tally-sealer".into())
                .spawn(move || sealer_thread(sh, core, seal_rx))
                .map_err(StartError::Endpoint)?
        };
        sh.agg.set_sealer(sealer.thread().clone());
        let (durable_tx, durable_rx) = mpsc::channel(DURABLE_QUEUE);
        let writer = {
            let sh = sh.clone();
            std::thread::Builder::new()
                .name("tally-durable".into())
                .spawn(move || durable_thread(sh, durable_rx))
                .map_err(StartError::Endpoint)?
        };
        let mut threads = vec![sealer, writer];
        for i in 0..SYNC_THREADS {
            let log = sh.log.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tally-sync-{i}"))
                    .spawn(move || log.run_syncer())
                    .map_err(StartError::Endpoint)?,
            );
        }
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        let shipper = client.map(|client| {
            let span = tracing::info_span!("shipper", agent_id = %sh.agent_id);
            tokio::spawn(tracing::Instrument::instrument(
                shipper::run(sh.shipper(client, ctl_rx), stop_rx.clone()),
                span,
            ))
        });
        let ctl_tx = shipper.as_ref().map(|_| ctl_tx);
        let ent_task = ctl_tx.as_ref().map(|ctl| {
            let outbox = sh.ent_outbox.clone();
            sh.ent.set_waker(Box::new(move || outbox.notify_one()));
            tokio::spawn(entitlement_task(
                sh.clone(),
                seal_tx.downgrade(),
                ctl.clone(),
                stop_rx,
            ))
        });
        tracing::info!(agent_id = %sh.agent_id, epoch = sh.epoch, "agent started");
        Ok(Agent {
            h: Arc::new(Handle {
                sh,
                seal_tx,
                durable_tx,
                stop_tx,
                ctl_tx,
                shipper: Mutex::new(shipper),
                ent_task: Mutex::new(ent_task),
                threads: Mutex::new(threads),
            }),
        })
    }
}

fn open(
    cfg: Config,
    clock: SharedClock,
    custom_clock: bool,
    faults: Option<DiskFaults>,
) -> Result<Shared, StartError> {
    tally_storefile::private_dir(&cfg.data_dir).map_err(crate::error::StoreError::from)?;
    let key = crate::keys::load_or_create(&cfg.data_dir)?;
    let store = Store::open_with(
        &cfg.data_dir.join("agent.redb"),
        cfg.dedup_window,
        faults.clone(),
    )?;
    let agent_id = AgentId::from_public_key(&key.verifying_key());
    let agg = Aggregator::new();
    if let Some(c) = store.catalog()? {
        agg.set_catalog(c);
    }
    let entitlements = store.entitlements()?;
    let ent = Table::new(cfg.entitlements.clone());
    if let Some(c) = &entitlements {
        ent.load(c);
    }
    let remembered: Vec<u64> = store.leases()?.into_iter().map(|g| g.lease_id).collect();
    if !remembered.is_empty() {
        tracing::info!(
            leases = remembered.len(),
            "releasing the leases of the last run"
        );
    }
    let mut backlog = Backlog::default();
    for m in store.unacked()? {
        backlog.batch_bytes += m.bytes;
        backlog.batches.insert(m.seq, m);
    }
    backlog.last_sealed = store.next_seq()?.saturating_sub(1);
    let (rows, bytes) = store.log_size()?;
    backlog.log_rows = rows;
    backlog.log_bytes = bytes;
    // Ids of logged events are not in the dedup set until they are sealed. The legacy log is
    // read in pages; the set is bounded by the log, which the disk budget bounds.
    let mut ids = HashSet::new();
    let mut from = 0;
    loop {
        let page = store.read_log_from(from, LOG_PAGE)?;
        let n = page.len();
        let Some(last) = page.last().map(|(k, _)| *k) else {
            break;
        };
        ids.extend(page.into_iter().filter_map(|(_, e)| e.id));
        if n < LOG_PAGE {
            break;
        }
        from = last + 1;
    }
    let dir = FsDir::open(&cfg.data_dir.join("log"))
        .map_err(crate::error::StoreError::from)?
        .with_faults(faults);
    let mut bad = None;
    let mut events = 0u64;
    let (log, found) = SegmentLog::open(
        Arc::new(dir),
        LogConfig::default(),
        store.log_folded()?,
        |r| match postcard::from_bytes::<Vec<LoggedEvent>>(&r.payload) {
            Ok(evs) => {
                events += evs.len() as u64;
                ids.extend(evs.into_iter().filter_map(|e| e.id));
            }
            Err(e) => bad = Some(format!("record {}: {e}", r.lsn)),
        },
    )
    .map_err(crate::error::StoreError::from)?;
    if let Some(detail) = bad {
        return Err(crate::error::StoreError::Corrupt {
            table: "seglog",
            detail,
        }
        .into());
    }
    if found.cut_bytes > 0 {
        tracing::warn!(
            bytes = found.cut_bytes,
            "durable log: a torn or unacknowledged tail was cut"
        );
    }
    let rows = rows + events;
    backlog.log_rows = rows;
    backlog.log_bytes += found.bytes;
    if !backlog.batches.is_empty() || rows > 0 {
        tracing::info!(
            batches = backlog.batches.len(),
            log_rows = rows,
            "resuming with a backlog"
        );
    }
    let quarantined = store.quarantined()?.len() as u64;
    if quarantined > 0 {
        tracing::warn!(
            quarantined,
            "the store holds quarantined batches that will not be sent; export them with `tally-agent quarantine`"
        );
    }
    let sh = Shared {
        epoch: store.epoch(),
        cfg,
        agg,
        store: Arc::new(store),
        log: Arc::new(log),
        key,
        agent_id,
        pending: Mutex::new(Vec::new()),
        ids: Mutex::new(ids),
        backlog: Mutex::new(Backlog::default()),
        changed: watch::channel(0).0,
        sealed: watch::channel(backlog.last_sealed).0,
        conn: Mutex::new(ConnectionState::Idle),
        last_error: Mutex::new(None),
        entitlements: RwLock::new(entitlements),
        ent: Arc::new(ent),
        ent_changed: Notify::new(),
        ent_outbox: Arc::new(Notify::new()),
        remembered_leases: Mutex::new(remembered),
        custom_clock,
        metrics: Metrics::new(),
        clock,
        over_budget: AtomicBool::new(false),
        revoked: AtomicBool::new(false),
        quarantined: AtomicU64::new(quarantined),
        disk_error: Mutex::new(None),
    };
    sh.metrics
        .quarantined_batches
        .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
    sh.update_backlog(|b| *b = backlog);
    Ok(sh)
}

fn sealer_thread(sh: Arc<Shared>, mut core: SealerCore, mut rx: mpsc::Receiver<SealerCmd>) {
    let mut carry = Carry::default();
    let interval = sh.cfg.flush_interval;
    let mut next = Instant::now() + interval;
    loop {
        let now = Instant::now();
        // Queued requests are served back to back; callers waiting for room are not held up
        // by the interval.
        if now < next && rx.is_empty() {
            std::thread::park_timeout(next - now);
        }
        let cmd = rx.try_recv();
        let due = Instant::now() >= next || sh.agg.take_seal_hint();
        match cmd {
            Ok(SealerCmd::Seal(reply)) => {
                let _ = reply.send(sh.seal(&mut core, &mut carry, true));
            }
            Ok(SealerCmd::Stop(reply)) => {
                let _ = reply.send(sh.seal(&mut core, &mut carry, true));
                return;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                if let Err(e) = sh.seal(&mut core, &mut carry, true) {
                    tracing::error!(error = %e, "final seal failed");
                }
                return;
            }
            Err(mpsc::error::TryRecvError::Empty) if due => {
                if let Err(e) = sh.seal(&mut core, &mut carry, false) {
                    tracing::error!(error = %e, "seal failed; retrying next interval");
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => continue,
        }
        next = Instant::now() + interval;
    }
}

fn durable_thread(sh: Arc<Shared>, mut rx: mpsc::Receiver<DurableReq>) {
    let since_seal = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while let Some(first) = rx.blocking_recv() {
        let mut n = first.events.len();
        let mut reqs = vec![first];
        while n < MAX_GROUP_COMMIT {
            match rx.try_recv() {
                Ok(r) => {
                    n += r.events.len();
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        // Ids: refuse repeats within the group, the accepted set and the store's dedup set. A
        // request's events are all appended or all refused: one record per request.
        let now = sh.clock.now_ms();
        let mut payloads = Vec::with_capacity(reqs.len());
        let mut appended: Vec<String> = Vec::new();
        let mut events = 0u64;
        let mut replies = Vec::with_capacity(reqs.len());
        {
            let mut ids = sh.ids.lock().unwrap_or_else(PoisonError::into_inner);
            'req: for r in reqs {
                let mut outcomes = Vec::with_capacity(r.events.len());
                let mut added: Vec<String> = Vec::new();
                let mut fresh = Vec::with_capacity(r.events.len());
                for ev in r.events {
                    if let Some(id) = &ev.id {
                        let seen = if ids.contains(id) {
                            Ok(true)
                        } else {
                            sh.store.seen_id(id, now)
                        };
                        match seen {
                            Ok(true) => {
                                outcomes.push(Recorded::Duplicate);
                                continue;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                for id in &added {
                                    ids.remove(id);
                                }
                                let _ = r.reply.send(Err(RecordError::from(e)));
                                continue 'req;
                            }
                        }
                        ids.insert(id.clone());
                        added.push(id.clone());
                    }
                    outcomes.push(Recorded::New);
                    fresh.push(ev);
                }
                if !fresh.is_empty() {
                    match postcard::to_stdvec(&fresh) {
                        Ok(p) => payloads.push(p),
                        Err(e) => {
                            for id in &added {
                                ids.remove(id);
                            }
                            let err = crate::error::StoreError::Corrupt {
                                table: "seglog",
                                detail: e.to_string(),
                            };
                            let _ = r.reply.send(Err(RecordError::from(err)));
                            continue 'req;
                        }
                    }
                    events += fresh.len() as u64;
                }
                appended.extend(added);
                replies.push((r.reply, outcomes));
            }
        }
        if payloads.is_empty() {
            for (reply, outcomes) in replies {
                let _ = reply.send(Ok(outcomes));
            }
            continue;
        }
        let bytes: u64 = payloads
            .iter()
            .map(|p| p.len() as u64 + crate::seglog::RECORD_HEADER)
            .sum();
        // Written now; answered by a syncer once an `fdatasync` covers it (the next group is
        // written while that sync runs).
        let weak = Arc::downgrade(&sh);
        let since_seal = since_seal.clone();
        sh.log.write(
            &payloads,
            Box::new(move |r| {
                let Some(sh) = weak.upgrade() else {
                    return;
                };
                sh.disk_result(r.as_ref().err().map(ToString::to_string));
                match r {
                    Ok(_) => {
                        sh.update_backlog(|b| {
                            b.log_rows += events;
                            b.log_bytes += bytes;
                        });
                        for (reply, outcomes) in replies {
                            let _ = reply.send(Ok(outcomes));
                        }
                        let n = since_seal.fetch_add(events as usize, Ordering::Relaxed);
                        if n + events as usize >= PENDING_SEAL_HINT {
                            since_seal.store(0, Ordering::Relaxed);
                            sh.agg.hint();
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "durable log write failed");
                        let mut ids = sh.ids.lock().unwrap_or_else(PoisonError::into_inner);
                        for id in &appended {
                            ids.remove(id);
                        }
                        drop(ids);
                        let err = RecordError::from(crate::error::StoreError::from(e));
                        for (reply, _) in replies {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            }),
        );
    }
    // No more writes: the syncers resolve what is in flight and end.
    sh.log.close();
}

/// Seals now through the sealer thread; the highest sealed seq.
async fn seal_now(sh: &Shared, seal_tx: &mpsc::Sender<SealerCmd>) -> Result<u64, SealError> {
    let (tx, rx) = oneshot::channel();
    seal_tx
        .send(SealerCmd::Seal(tx))
        .await
        .map_err(|_| SealError::Stopped)?;
    sh.agg.wake_sealer();
    rx.await.unwrap_or(Err(SealError::Stopped))
}

/// Sends the releases of `ids` (everything consumed under them is sealed through
/// `through_seq`) and forgets them on disk.
async fn release(sh: &Arc<Shared>, ctl: &mpsc::Sender<Frame>, ids: &[u64], through_seq: u64) {
    if ids.is_empty() {
        return;
    }
    for id in ids {
        tracing::debug!(lease = id, through_seq, "lease released");
        let f = Frame::LeaseRelease(LeaseRelease {
            lease_id: *id,
            epoch: sh.epoch,
            through_seq,
        });
        if ctl.send(f).await.is_err() {
            return;
        }
    }
    let st = sh.store.clone();
    let ids = ids.to_vec();
    let r = tokio::task::spawn_blocking(move || st.delete_leases(&ids)).await;
    if let Ok(Err(e)) = r {
        tracing::warn!(error = %e, "could not forget released leases");
    }
}

/// The entitlement shell: sends what the table queued (snapshot requests, batched; lease
/// requests), and releases leases that ended (and, first, those of the last run) once what
/// was consumed under them is sealed.
async fn entitlement_task(
    sh: Arc<Shared>,
    seal_tx: mpsc::WeakSender<SealerCmd>,
    ctl: mpsc::Sender<Frame>,
    mut stop: watch::Receiver<bool>,
) {
    let mut request_id = 0u64;
    let mut remembered = std::mem::take(
        &mut *sh
            .remembered_leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let mut tick = tokio::time::interval(LEASE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Releases first: a lease request after a release then always opens a new lease.
        let ended: Vec<u64> = sh
            .ent
            .scan(sh.clock.now_ms(), false)
            .iter()
            .map(|r| r.lease.id)
            .collect();
        if !ended.is_empty() || !remembered.is_empty() {
            let Some(seal_tx) = seal_tx.upgrade() else {
                return;
            };
            match seal_now(&sh, &seal_tx).await {
                Ok(upto) => {
                    drop(seal_tx);
                    let mut ids = std::mem::take(&mut remembered);
                    ids.extend(ended);
                    release(&sh, &ctl, &ids, upto).await;
                }
                Err(e) => {
                    // Not sealed: not released yet; tried again on the next tick.
                    tracing::warn!(error = %e, "could not seal before releasing leases");
                    remembered.extend(ended);
                }
            }
        }
        let mut customers = Vec::new();
        for m in sh.ent.drain_outbox(crate::entitlements::table::MAX_OUTBOX) {
            match m {
                Outgoing::Snapshot(c) => customers.push(c),
                Outgoing::Lease {
                    customer,
                    meter,
                    period_start_ms,
                    quantity,
                } => {
                    request_id += 1;
                    let f = Frame::LeaseRequest(LeaseRequest {
                        request_id,
                        customer,
                        meter,
                        period_start_ms,
                        quantity,
                    });
                    if ctl.send(f).await.is_err() {
                        return;
                    }
                }
            }
        }
        customers.sort_unstable();
        customers.dedup();
        for chunk in customers.chunks(MAX_CUSTOMERS_PER_REQUEST) {
            let Ok(customers) = BoundedVec::new(chunk.to_vec()) else {
                continue;
            };
            if ctl
                .send(Frame::EntitlementsRequest(EntitlementsRequest {
                    customers,
                }))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = sh.ent_outbox.notified() => {}
            _ = tick.tick() => {}
        }
    }
}

struct Handle {
    sh: Arc<Shared>,
    seal_tx: mpsc::Sender<SealerCmd>,
    durable_tx: mpsc::Sender<DurableReq>,
    stop_tx: watch::Sender<bool>,
    /// Frames for the collector, when there is a shipper.
    ctl_tx: Option<mpsc::Sender<Frame>>,
    shipper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The lease and snapshot-request task; it holds the store, so shutdown waits for it.
    ent_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Dropped without shutdown: stop recording, seal what is in memory, stop shipping.
        self.sh.agg.set_gate(GATE_CLOSED);
        let _ = self.stop_tx.send(true);
        // Close both channels: the sealer drains what is queued, seals a last time and ends; the
        // durable log's thread ends. Then wait for both threads: the store is closed when this
        // returns (unless a shipper task is still winding down).
        drop(std::mem::replace(&mut self.seal_tx, mpsc::channel(1).0));
        self.sh.agg.wake_sealer();
        drop(std::mem::replace(&mut self.durable_tx, mpsc::channel(1).0));
        for t in self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

/// The agent: record usage in nanoseconds, seal it to disk, ship it until acknowledged.
///
/// Cheap to clone (`Clone + Send + Sync`); every clone is the same agent. Call
/// [`Agent::shutdown`] before the end; dropping the last clone without it still seals what is
/// in memory (blocking the dropping thread for that seal) but ships nothing more.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tally_agent::{Agent, Event, Overflow};
/// use rust_decimal::Decimal;
///
/// let dir = tempfile::tempdir()?;
/// // With no collector the agent only buffers to disk; add `.collector(addr)`, `.ca_pem(pem)`
/// // and `.enroll_token(token)` to ship.
/// let agent = Agent::builder()
///     .data_dir(dir.path())
///     .flush_interval(Duration::from_millis(250))
///     .disk_budget(64 << 20)
///     .overflow(Overflow::Block)
///     .start()
///     .await?;
/// agent.record("acme", "api_calls", Decimal::ONE)?;
/// agent.record_with("acme", "tokens", &[("model", "gpt")], Decimal::from(1500))?;
/// let counter = agent.counter("acme", "api_calls", &[])?;
/// counter.add(Decimal::TWO)?;
/// agent.record_event(Event::new("acme", "api_calls", Decimal::ONE).with_id("req-1"))?;
/// agent.record_durable(Event::new("acme", "api_calls", Decimal::ONE)).await?;
/// // One batch of what was aggregated in memory, one folding in the durable log.
/// let last_seq = agent.seal().await?;
/// assert_eq!(agent.status().backlog_batches, 2);
/// assert_eq!(last_seq, 2);
/// assert!(agent.render_metrics().contains("tally_agent_records_total 5"));
/// // Nothing acknowledged it (no collector): the batch stays on disk for the next start.
/// let r = agent.shutdown(Duration::from_secs(1)).await;
/// assert!(matches!(r, Err(tally_agent::ShutdownError::Unacked { unacked: 2 })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Agent {
    h: Arc<Handle>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.h.sh.agent_id)
            .field("epoch", &self.h.sh.epoch)
            .finish()
    }
}

/// A kept handle to one `(customer, meter, dimensions)` key: `add` skips the key lookup.
#[derive(Clone)]
pub struct Counter {
    sh: Arc<Shared>,
    key: Arc<crate::aggregate::KeyInfo>,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter")
            .field("customer", &self.key.customer)
            .field("meter", &self.key.meter)
            .finish()
    }
}

impl Counter {
    /// Adds `quantity` now. Synchronous, no I/O, no allocation.
    pub fn add(&self, quantity: Decimal) -> Result<(), RecordError> {
        self.sh.agg.record_key(&self.key, quantity, coarse_now_ms())
    }
}

impl Agent {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.h.sh
    }

    /// A builder with the defaults of SPEC §3.
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    /// Records `quantity` of `meter` for `customer`, now. Synchronous, no I/O, no allocation
    /// once this thread has seen the key; usage is sealed within `flush_interval`.
    pub fn record(
        &self,
        customer: &str,
        meter: &str,
        quantity: Decimal,
    ) -> Result<(), RecordError> {
        // The hot path reads the coarse clock, not the injected one: a vDSO read of the kernel's
        // last tick (a few ns, accurate to 1–4 ms), far finer than the one-minute buckets usage
        // is aggregated into; a virtual clock would cost a dynamic call per record.
        self.h
            .sh
            .agg
            .record(customer, meter, &[], quantity, coarse_now_ms())
    }

    /// [`Agent::record`] with up to four dimensions (`key`, `value`).
    pub fn record_with(
        &self,
        customer: &str,
        meter: &str,
        dimensions: &[(&str, &str)],
        quantity: Decimal,
    ) -> Result<(), RecordError> {
        self.h
            .sh
            .agg
            .record(customer, meter, dimensions, quantity, coarse_now_ms())
    }

    /// A kept handle for one key, validated once.
    pub fn counter(
        &self,
        customer: &str,
        meter: &str,
        dimensions: &[(&str, &str)],
    ) -> Result<Counter, RecordError> {
        let key = self.h.sh.agg.intern(customer, meter, dimensions)?;
        Ok(Counter {
            sh: self.h.sh.clone(),
            key,
        })
    }

    fn validate(&self, e: &Event) -> Result<(CustomerId, MeterName, Dimensions), RecordError> {
        let sh = &self.h.sh;
        sh.agg.check_gate()?;
        if e.quantity.is_sign_negative() && !e.quantity.is_zero() {
            return Err(RecordError::NegativeQuantity);
        }
        let customer =
            CustomerId::new(e.customer.as_str()).map_err(RecordError::InvalidCustomer)?;
        let meter = MeterName::new(e.meter.as_str()).map_err(RecordError::InvalidMeter)?;
        let dims =
            Dimensions::from_strs(e.dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(RecordError::InvalidDimensions)?;
        if e.id
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > MAX_EVENT_ID_BYTES)
        {
            return Err(RecordError::InvalidEventId);
        }
        if !sh.agg.meter_known(meter.as_str()) {
            return Err(RecordError::UnknownMeter);
        }
        self.check_time(e)?;
        Ok((customer, meter, dims))
    }

    /// An event's own time within the configured window around now.
    fn check_time(&self, e: &Event) -> Result<(), RecordError> {
        let Some(at) = e.timestamp_ms else {
            return Ok(());
        };
        let cfg = &self.h.sh.cfg;
        let now = self.h.sh.clock.now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if at < now.saturating_sub(ms(cfg.max_event_age))
            || at > now.saturating_add(ms(cfg.max_event_lead))
        {
            return Err(RecordError::EventTimeOutOfRange);
        }
        Ok(())
    }

    /// Records one event. Without an id it is aggregated like [`Agent::record`] (at its own
    /// time). With an id it is checked against the ids recorded within `dedup_window` (a read
    /// of the local store) and counted at most once; the id is stored with the sealed batch.
    pub fn record_event(&self, event: Event) -> Result<Recorded, RecordError> {
        if event.id.is_none() {
            if let Err(e) = self.check_time(&event) {
                self.h.sh.agg.count_error(&e);
                return Err(e);
            }
            // The aggregator validates and counts (calls and errors) itself.
            let pairs: Vec<(&str, &str)> = event
                .dimensions
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let at = event
                .timestamp_ms
                .unwrap_or_else(|| self.h.sh.clock.now_ms());
            self.h
                .sh
                .agg
                .record(&event.customer, &event.meter, &pairs, event.quantity, at)?;
            return Ok(Recorded::New);
        }
        let r = self.record_event_with_id(event);
        if let Err(e) = &r {
            self.h.sh.agg.count_error(e);
        }
        r
    }

    fn record_event_with_id(&self, event: Event) -> Result<Recorded, RecordError> {
        let sh = &self.h.sh;
        let (customer, meter, dims) = self.validate(&event)?;
        let now = sh.clock.now_ms();
        let at = event.timestamp_ms.unwrap_or(now);
        let Some(id) = event.id else {
            return Err(RecordError::InvalidEventId);
        };
        {
            let mut ids = sh.ids.lock().unwrap_or_else(PoisonError::into_inner);
            if ids.contains(&id) || sh.store.seen_id(&id, now)? {
                return Ok(Recorded::Duplicate);
            }
            let mut pending = sh.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.len() >= PENDING_MAX {
                return Err(RecordError::OverBudget);
            }
            ids.insert(id.clone());
            pending.push((
                Delta::single(customer, meter, dims, at, event.quantity),
                Some((id, now)),
            ));
            if pending.len() == PENDING_SEAL_HINT {
                sh.agg.hint();
            }
        }
        sh.agg.count_record();
        Ok(Recorded::New)
    }

    /// Records one event durably: returns once it is fsynced in the local store's log (many
    /// concurrent callers share one commit). It survives `kill -9` and is folded into the next
    /// sealed batch exactly once. A repeated id within `dedup_window` returns
    /// [`Recorded::Duplicate`] and is not counted again.
    pub async fn record_durable(&self, event: Event) -> Result<Recorded, RecordError> {
        let r = self.record_durable_all(vec![event]).await;
        r.and_then(|v| v.into_iter().next().ok_or(RecordError::Closed))
    }

    /// Records several events durably as one unit: all are validated first, then appended to the
    /// durable log in one commit — all of them or none. Returns each event's outcome, in order
    /// (an id seen before, or twice in `events`, is [`Recorded::Duplicate`]). The sidecar uses
    /// this so an HTTP request is accepted or refused whole.
    pub async fn record_durable_all(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<Recorded>, RecordError> {
        let r = self.record_durable_inner(events).await;
        match &r {
            Ok(outcomes) => {
                for o in outcomes {
                    if *o == Recorded::New {
                        self.h.sh.agg.count_record();
                    }
                }
            }
            Err(e) => self.h.sh.agg.count_error(e),
        }
        r
    }

    async fn record_durable_inner(&self, events: Vec<Event>) -> Result<Vec<Recorded>, RecordError> {
        let sh = &self.h.sh;
        // A durable answer promises delivery, which a revoked agent cannot keep.
        if sh.revoked.load(Ordering::Relaxed) {
            return Err(RecordError::Revoked);
        }
        let now = sh.clock.now_ms();
        let mut logged = Vec::with_capacity(events.len());
        for event in events {
            let (customer, meter, dimensions) = self.validate(&event)?;
            logged.push(LoggedEvent {
                customer,
                meter,
                dimensions,
                at_ms: event.timestamp_ms.unwrap_or(now),
                quantity: event.quantity,
                id: event.id,
                accepted_at_ms: now,
            });
        }
        if sh.cfg.overflow == Overflow::Block && sh.over_budget() {
            let mut rx = sh.changed.subscribe();
            while sh.over_budget() {
                if rx.changed().await.is_err() {
                    return Err(RecordError::Closed);
                }
                sh.agg.check_gate()?;
            }
        }
        let (reply, rx) = oneshot::channel();
        // At DURABLE_QUEUE waiting requests this awaits room (backpressure), never errors.
        self.h
            .durable_tx
            .send(DurableReq {
                events: logged,
                reply,
            })
            .await
            .map_err(|_| RecordError::Closed)?;
        rx.await.map_err(|_| RecordError::Closed)?
    }

    /// Seals everything recorded so far now; returns the highest seq sealed (0 if none yet).
    /// Does not wait for acknowledgements.
    pub async fn seal(&self) -> Result<u64, FlushError> {
        let (tx, rx) = oneshot::channel();
        // At SEAL_QUEUE waiting requests this awaits room (backpressure), never errors.
        self.h
            .seal_tx
            .send(SealerCmd::Seal(tx))
            .await
            .map_err(|_| FlushError::Closed)?;
        self.h.sh.agg.wake_sealer();
        rx.await
            .map_err(|_| FlushError::Closed)?
            .map_err(FlushError::Seal)
    }

    /// Seals now and waits until everything sealed so far is acknowledged, or `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let upto = match tokio::time::timeout_at(deadline, self.seal()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(FlushError::Timeout {
                    unacked: self.status().backlog_batches,
                });
            }
        };
        self.wait_acked(upto, deadline).await
    }

    async fn wait_acked(
        &self,
        upto: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), FlushError> {
        let sh = &self.h.sh;
        let mut rx = sh.changed.subscribe();
        loop {
            let unacked = sh
                .backlog
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .batches
                .range(..=upto)
                .count() as u64;
            if unacked == 0 {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(FlushError::Closed),
                Err(_) => return Err(FlushError::Timeout { unacked }),
            }
        }
    }

    /// Stops recording, seals what is in memory, and ships for at most `timeout`. What is not
    /// acknowledged by then stays on disk and goes out on the next start. Later calls on any
    /// clone return [`RecordError::Closed`].
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), ShutdownError> {
        let sh = &self.h.sh;
        let deadline = tokio::time::Instant::now() + timeout;
        sh.agg.set_gate(GATE_CLOSED);
        let (tx, rx) = oneshot::channel();
        let sealed = if self.h.seal_tx.send(SealerCmd::Stop(tx)).await.is_ok() {
            sh.agg.wake_sealer();
            rx.await.unwrap_or(Err(SealError::Stopped))
        } else {
            Ok(sh
                .backlog
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last_sealed)
        };
        let upto = sealed.map_err(ShutdownError::Seal)?;
        // Every lease ends here: what was consumed under it is sealed (through `upto`).
        let closing = sh.ent.scan(sh.clock.now_ms(), true);
        if let Some(ctl) = &self.h.ctl_tx {
            let ids: Vec<u64> = closing.iter().map(|r| r.lease.id).collect();
            release(sh, ctl, &ids, upto).await;
        }
        let has_shipper = self
            .h
            .shipper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        let acked = if has_shipper {
            self.wait_acked(upto, deadline).await
        } else {
            Ok(())
        };
        let _ = self.h.stop_tx.send(true);
        let shipper = self
            .h
            .shipper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = shipper {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        let ent_task = self
            .h
            .ent_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = ent_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        *sh.conn.lock().unwrap_or_else(PoisonError::into_inner) = ConnectionState::Closed;
        tracing::info!(agent_id = %sh.agent_id, "agent shut down");
        match acked {
            Ok(()) if has_shipper => Ok(()),
            Ok(()) => {
                let unacked = sh
                    .backlog
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .batches
                    .len() as u64;
                if unacked == 0 {
                    Ok(())
                } else {
                    Err(ShutdownError::Unacked { unacked })
                }
            }
            Err(FlushError::Timeout { unacked }) => Err(ShutdownError::Unacked { unacked }),
            Err(FlushError::Seal(e)) => Err(ShutdownError::Seal(e)),
            Err(FlushError::Closed) => Err(ShutdownError::Seal(SealError::Stopped)),
        }
    }

    /// The batches in the store's quarantine, in seq order: each whole (signed bytes as they
    /// were sealed), with why and when it was taken out of shipping. For export; nothing here
    /// is ever sent (decision 0086).
    pub fn quarantined(&self) -> Result<Vec<(u64, QuarantinedBatch)>, StoreError> {
        self.h.sh.store.quarantined()
    }

    /// Backlog, connection and snapshot ages, as of now.
    pub fn status(&self) -> Status {
        let sh = &self.h.sh;
        let now = sh.clock.now_ms();
        let b = sh.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        let age = |t: i64| Duration::from_millis(u64::try_from(now.saturating_sub(t)).unwrap_or(0));
        Status {
            agent_id: sh.agent_id,
            epoch: sh.epoch,
            backlog_batches: b.batches.len() as u64,
            backlog_bytes: b.batch_bytes + b.log_bytes,
            durable_log_events: b.log_rows,
            oldest_unacked_age: b.batches.values().next().map(|m| age(m.sealed_at_ms)),
            last_sealed_seq: b.last_sealed,
            last_acked_seq: b.last_acked,
            connection: sh
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            last_error: sh
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            entitlements_age: sh
                .entitlements
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|e| age(e.built_at_ms)),
            catalog_version: sh.agg.catalog().map(|c| c.version),
            over_budget: sh.over_budget(),
            revoked: sh.revoked.load(Ordering::Relaxed),
            quarantined_batches: sh.quarantined.load(Ordering::Relaxed),
            disk_error: sh.disk_failure(),
        }
    }

    /// The agent's metrics as Prometheus text.
    pub fn render_metrics(&self) -> String {
        let sh = &self.h.sh;
        let age = sh
            .entitlements
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(-1.0, |e| {
                sh.clock.now_ms().saturating_sub(e.built_at_ms) as f64 / 1000.0
            });
        sh.metrics.entitlements_age.set(age);
        let oldest = sh
            .backlog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .batches
            .values()
            .next()
            .map_or(0.0, |m| {
                sh.clock.now_ms().saturating_sub(m.sealed_at_ms) as f64 / 1000.0
            });
        sh.metrics.oldest_unacked_age.set(oldest);
        sh.metrics.fold_entitlements(&sh.ent.stats);
        sh.metrics.render(sh.agg.counts())
    }

    /// The agent's wall clock (the one given to [`AgentBuilder::clock`]), for embedders that
    /// stamp usage on the same time.
    pub fn clock(&self) -> &SharedClock {
        &self.h.sh.clock
    }

    /// The agent's id (derived from its key).
    pub fn agent_id(&self) -> AgentId {
        self.h.sh.agent_id
    }

    /// The epoch of the local store.
    pub fn epoch(&self) -> u64 {
        self.h.sh.epoch
    }

    /// The collector's meter catalog, once received (kept on disk across restarts).
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.h.sh.agg.catalog()
    }

    /// The version of the entitlement snapshot held, once one was received.
    pub fn entitlements_version(&self) -> Option<u64> {
        self.h
            .sh
            .entitlements
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| e.version)
    }

    /// Applies a lease grant as if the collector had sent it: benches measure a hard limit
    /// under a lease through [`Agent::try_consume`] without a collector. Not part of the API.
    #[doc(hidden)]
    pub fn apply_lease_grant(&self, g: &tally_protocol::entitlements::LeaseGrant) {
        let sh = &self.h.sh;
        sh.ent.on_grant(g, sh.clock.now_ms());
        sh.ent_changed.notify_waiters();
    }

    /// The cached entitlement snapshot, once received (kept on disk across restarts).
    pub fn entitlements(&self) -> Option<EntitlementsCache> {
        self.h
            .sh
            .entitlements
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
