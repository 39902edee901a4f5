//! The tokio shell: one task per destination, each with its own pacing, retries and store
//! calls, so one destination down or slow never holds up another.
//!
//! A pass: (1) plan — read the ledger after the destination's cursor, persist the groups and the
//! new cursor together; (2) window — Metronome lists groups older than its window as
//! `out_of_window`; Orb moves them into a backfill (one at a time, since Orb refuses
//! overlapping pending backfills) and drives it: create (our key as `Idempotency-Key`), ingest
//! with `?backfill_id=`, close, wait for `reflected`; (3) send — due groups in batches of at
//! most 500 (Orb) / 100 (Metronome), each batch after a token, with the lease recorded before
//! the request. A lost answer keeps the group unknown and it is resent under the same key; a
//! refused batch of several events is resent one event at a time so one bad event cannot
//! dead-letter the others.
//!
//! The decisions are the pure functions of [`super`] and [`super::wire`]; this file only
//! performs them. Limits: one request in flight per destination; at most
//! [`PLAN_ITEMS_MAX`] ledger items per planning step.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::Notify;

use super::store::{BackfillPhase, BackfillRecord, ForwardStore, FwdStoreError};
use super::wire::{self, Reply, WireOutcome};
use super::{Destination, FwdEvent, FwdGroup, FwdState, LedgerItem, Routes, plan};
use crate::retry::{Backoff, TokenBucket};
use crate::secret::ApiKey;
use crate::time::{SharedClock, SystemClock, rfc3339};

/// Most ledger items read in one planning step.
pub const PLAN_ITEMS_MAX: usize = 5_000;

/// Where the forwarder reads the ledger from (the collector's store).
pub trait LedgerSource: Send + Sync + 'static {
    /// Usage transfers after position `after`, ascending, at most `limit`; and the last
    /// position scanned (past transfers that are not usage), so the cursor can move over them.
    fn read(&self, after: u64, limit: usize) -> Result<(Vec<LedgerItem>, u64), String>;

    /// The names `dest` uses for the meters and customers of `items`: `base` (the
    /// configuration's) with whatever the source knows on top (names set through the API,
    /// SPEC §6.4b). Called once per planning step, so a change applies to events planned after
    /// it; planned events keep their names.
    fn routes(
        &self,
        dest: Destination,
        items: &[LedgerItem],
        base: &Routes,
    ) -> Result<Routes, String> {
        let _ = (dest, items);
        Ok(base.clone())
    }
}

/// One destination's settings.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Which.
    pub destination: Destination,
    /// The API key (`ORB_API_KEY` / `METRONOME_API_KEY` or a file); never logged.
    pub api_key: ApiKey,
    /// Base URL (`https://api.withorb.com`, `https://api.metronome.com`, or a local server).
    pub base_url: String,
    /// Meter and customer names at the destination.
    pub routes: Routes,
    /// Requests per second (Orb: 100 live, 10 test).
    pub rate_per_s: u32,
    /// Events per minute (Orb: 10,000 live, 2,000 test; `None`: no such limit).
    pub events_per_minute: Option<u32>,
    /// Per-request timeout; a timeout is an unknown outcome.
    pub request_timeout: Duration,
    /// Retry backoff.
    pub backoff: Backoff,
    /// How far back the destination takes usage (Orb's grace period, Metronome's 34 days).
    pub window: Duration,
    /// Usage within this of the window's edge is treated as outside it (it would be by the
    /// time it arrives).
    pub window_margin: Duration,
    /// Planning interval when nothing wakes the task.
    pub poll_interval: Duration,
}

impl DestinationConfig {
    /// Defaults from the wire facts for `destination`, live or test limits by the key.
    pub fn new(destination: Destination, api_key: ApiKey, base_url: Option<String>) -> Self {
        let test = api_key.expose().contains("test");
        let (base, rate, epm, window, margin) = match destination {
            Destination::Orb => (
                "https://api.withorb.com",
                if test { 10 } else { 100 },
                Some(if test { 2_000 } else { 10_000 }),
                Duration::from_secs(12 * 3600),
                Duration::from_secs(600),
            ),
            Destination::Metronome => (
                "https://api.metronome.com",
                50,
                None,
                Duration::from_secs(34 * 86_400),
                Duration::from_secs(3600),
            ),
        };
        Self {
            destination,
            api_key,
            base_url: base_url
                .unwrap_or_else(|| base.to_owned())
                .trim_end_matches('/')
                .to_owned(),
            routes: Routes::default(),
            rate_per_s: rate,
            events_per_minute: epm,
            request_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            window,
            window_margin: margin,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// Label set: destination.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestLabel {
    /// `orb` or `metronome`.
    pub destination: String,
}

/// Label set: destination and HTTP status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestStatusLabel {
    /// `orb` or `metronome`.
    pub destination: String,
    /// HTTP status or `network`.
    pub status: String,
}

/// Metrics labelled by destination (`tally_forward_…`).
#[derive(Debug, Clone, Default)]
pub struct ForwardMetrics {
    /// Requests by destination and status.
    pub requests: Family<DestStatusLabel, Counter>,
    /// Events delivered.
    pub events_sent: Family<DestLabel, Counter>,
    /// Open groups (pending or unknown).
    pub pending: Family<DestLabel, Gauge>,
    /// Groups waiting in an Orb backfill.
    pub backfill: Family<DestLabel, Gauge>,
    /// Dead letters.
    pub dead_letters: Family<DestLabel, Gauge>,
    /// Usage listed as out of the destination's window.
    pub out_of_window: Family<DestLabel, Gauge>,
    /// Now minus the oldest open group's time, seconds.
    pub lag_seconds: Family<DestLabel, Gauge>,
    /// Discrepancies found by the last reconciliation.
    pub reconciliation_discrepancies: Family<DestLabel, Gauge>,
}

impl ForwardMetrics {
    /// Creates and registers the handles under `tally_forward_…`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tally_forward");
        r.register(
            "requests",
            "Requests to Orb and Metronome by status",
            m.requests.clone(),
        );
        r.register(
            "events_sent",
            "Events delivered per destination",
            m.events_sent.clone(),
        );
        r.register("pending", "Events not yet delivered", m.pending.clone());
        r.register(
            "backfill",
            "Events waiting in an Orb backfill",
            m.backfill.clone(),
        );
        r.register(
            "dead_letters",
            "Events rejected permanently",
            m.dead_letters.clone(),
        );
        r.register(
            "out_of_window",
            "Usage older than the destination's window (listed, not sent)",
            m.out_of_window.clone(),
        );
        r.register(
            "lag_seconds",
            "Age of the oldest undelivered event",
            m.lag_seconds.clone(),
        );
        r.register(
            "reconciliation_discrepancies",
            "Ledger vs destination discrepancies found by the last reconciliation",
            m.reconciliation_discrepancies.clone(),
        );
        m
    }

    fn label(d: Destination) -> DestLabel {
        DestLabel {
            destination: d.as_str().to_owned(),
        }
    }
}

/// What a destination's task knows beyond its store.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DestinationStatus {
    /// Requests made.
    pub requests: u64,
    /// Events delivered by this process.
    pub events_sent: u64,
    /// The last error (no secrets).
    pub last_error: Option<String>,
}

struct Shared {
    notify: Notify,
    stop: std::sync::atomic::AtomicBool,
    status: Mutex<DestinationStatus>,
}

/// A running destination.
pub struct DestinationHandle {
    /// Which.
    pub destination: Destination,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The HTTP client the task uses (reconciliation shares it).
    pub client: DestClient,
}

impl DestinationHandle {
    /// Asks for a pass now (after a ledger commit).
    pub fn notify(&self) {
        self.shared.notify.notify_one();
    }

    /// Counters and the last error.
    pub fn status(&self) -> DestinationStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops after the request in flight is answered and recorded.
    pub async fn shutdown(&self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.notify.notify_one();
        let t = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.await;
        }
    }
}

/// Why a destination could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(String),
}

/// The HTTP side of one destination (reqwest + rustls/ring).
#[derive(Clone)]
pub struct DestClient {
    http: reqwest::Client,
    base: String,
    key: ApiKey,
}

impl std::fmt::Debug for DestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestClient")
            .field("base", &self.base)
            .finish()
    }
}

impl DestClient {
    /// A client for `base` with `key`.
    pub fn new(base: &str, key: ApiKey, timeout: Duration) -> Result<Self, StartError> {
        crate::client::install_ring_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("tally-forward/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StartError::Client(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// `method path` with an optional JSON body and `Idempotency-Key`; `None` when the answer
    /// was lost.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        idempotency_key: Option<&str>,
    ) -> Option<Reply> {
        let mut rq = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.key.expose()));
        if let Some(b) = body {
            rq = rq.header("Content-Type", "application/json").body(b);
        }
        if let Some(k) = idempotency_key {
            rq = rq.header("Idempotency-Key", k);
        }
        let resp = rq.send().await.ok()?;
        let status = resp.status().as_u16();
        let retry_after_s = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = resp.text().await.ok()?;
        Some(Reply {
            status,
            retry_after_s,
            body,
        })
    }
}

/// Starts the task for one destination.
pub fn spawn_destination(
    cfg: DestinationConfig,
    store: Arc<dyn ForwardStore>,
    ledger: Arc<dyn LedgerSource>,
    metrics: ForwardMetrics,
    clock: Option<SharedClock>,
) -> Result<DestinationHandle, StartError> {
    let client = DestClient::new(&cfg.base_url, cfg.api_key.clone(), cfg.request_timeout)?;
    let shared = Arc::new(Shared {
        notify: Notify::new(),
        stop: std::sync::atomic::AtomicBool::new(false),
        status: Mutex::new(DestinationStatus::default()),
    });
    let clock = clock.unwrap_or_else(|| Arc::new(SystemClock));
    let now = clock.now_ms();
    let mut r = Runner {
        bucket: TokenBucket::new(cfg.rate_per_s, cfg.rate_per_s, now),
        events: cfg.events_per_minute.map(|n| EventBudget::new(n, now)),
        cfg,
        store,
        ledger,
        metrics,
        clock,
        client: client.clone(),
        shared: shared.clone(),
        rng: (now as u64) | 1,
        hold_until_ms: 0,
        holder: holder_id(),
    };
    let destination = r.cfg.destination;
    let task = tokio::spawn(async move { r.run().await });
    Ok(DestinationHandle {
        destination,
        shared,
        task: Mutex::new(Some(task)),
        client,
    })
}

/// Events a minute, as a budget refilled continuously.
struct EventBudget {
    per_minute: u64,
    milli: u64,
    last_ms: i64,
}

impl EventBudget {
    fn new(per_minute: u32, now_ms: i64) -> Self {
        let per_minute = u64::from(per_minute.max(1));
        Self {
            per_minute,
            milli: per_minute * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes `n` events' worth, or says how long to wait.
    fn take(&mut self, n: usize, now_ms: i64) -> Result<(), Duration> {
        let n = (n as u64).min(self.per_minute) * 1000;
        let elapsed = u64::try_from((now_ms - self.last_ms).max(0)).unwrap_or(0);
        self.last_ms = self.last_ms.max(now_ms);
        // per_minute events per 60,000 ms = per_minute milli-events per 60 ms.
        self.milli = (self.milli + elapsed * self.per_minute / 60).min(self.per_minute * 1000);
        if self.milli >= n {
            self.milli -= n;
            Ok(())
        } else {
            let missing = n - self.milli;
            Err(Duration::from_millis(
                (missing * 60).div_ceil(self.per_minute).max(1),
            ))
        }
    }
}

struct Runner {
    cfg: DestinationConfig,
    store: Arc<dyn ForwardStore>,
    ledger: Arc<dyn LedgerSource>,
    metrics: ForwardMetrics,
    clock: SharedClock,
    client: DestClient,
    shared: Arc<Shared>,
    bucket: TokenBucket,
    events: Option<EventBudget>,
    rng: u64,
    /// After a transient failure nothing is sent before this (Unix ms): a destination that is
    /// down is probed once per backoff, not once per queued batch.
    hold_until_ms: i64,
    /// This task's name in the destination's claim ([`ForwardStore::claim`]).
    holder: String,
}

/// A random name for one destination task of one process.
fn holder_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Without a random source, the process id and time still tell two processes apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = (t ^ u64::from(std::process::id())).to_be_bytes();
    }
    hex::encode(b)
}

/// Margin of a destination claim beyond the longest request: a claim renewed right before a
/// request outlives it (and the clocks of collectors sharing a store may differ this much).
pub const CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// A store call off the async threads.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn ForwardStore>,
    f: impl FnOnce(&dyn ForwardStore) -> Result<T, FwdStoreError> + Send + 'static,
) -> Result<T, String> {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || f(s.as_ref())).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl Runner {
    fn stopping(&self) -> bool {
        self.shared.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn note(&self, f: impl FnOnce(&mut DestinationStatus)) {
        f(&mut self
            .shared
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    fn error(&self, e: impl std::fmt::Display) {
        let msg = e.to_string();
        tracing::warn!(destination = self.cfg.destination.as_str(), error = %msg, "forwarding");
        self.note(|s| s.last_error = Some(msg));
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    async fn run(&mut self) {
        while !self.stopping() {
            let busy = match self.pass().await {
                Ok(b) => b,
                Err(e) => {
                    self.error(e);
                    false
                }
            };
            self.gauges().await;
            if self.stopping() {
                break;
            }
            if !busy {
                let _ = tokio::time::timeout(self.cfg.poll_interval, self.shared.notify.notified())
                    .await;
            }
        }
    }

    async fn gauges(&self) {
        let d = self.cfg.destination;
        let Ok(st) = blocking(&self.store, move |s| s.stats(d)).await else {
            return;
        };
        let l = ForwardMetrics::label(d);
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.pending.get_or_create(&l).set(g(st.open));
        self.metrics.backfill.get_or_create(&l).set(g(st.backfill));
        self.metrics.dead_letters.get_or_create(&l).set(g(st.dead));
        self.metrics
            .out_of_window
            .get_or_create(&l)
            .set(g(st.out_of_window));
        let lag = st
            .oldest_open_s
            .map_or(0, |t| (self.clock.now_ms() / 1000 - t).max(0));
        self.metrics.lag_seconds.get_or_create(&l).set(lag);
    }

    /// Takes or renews this destination's claim for one request timeout plus
    /// [`CLAIM_MARGIN`]; false when another process holds it.
    async fn claim(&self) -> Result<bool, String> {
        let d = self.cfg.destination;
        let now = self.clock.now_ms();
        let until = now
            + i64::try_from((self.cfg.request_timeout + CLAIM_MARGIN).as_millis())
                .unwrap_or(i64::MAX / 4);
        let holder = self.holder.clone();
        blocking(&self.store, move |s| s.claim(d, &holder, now, until)).await
    }

    /// One pass; true when there is more to do at once. Nothing is planned, sent or driven
    /// while another process holds the destination's claim.
    async fn pass(&mut self) -> Result<bool, String> {
        if !self.claim().await? {
            return Ok(false);
        }
        let planned_full = self.plan().await?;
        self.window().await?;
        if self.cfg.destination == Destination::Orb {
            self.drive_backfill().await?;
        }
        let sent_full = self.send_ready().await?;
        Ok(planned_full || sent_full)
    }

    /// Plans one step; true when the read was full (more to read).
    async fn plan(&mut self) -> Result<bool, String> {
        let d = self.cfg.destination;
        let (ns, cursor) =
            blocking(&self.store, move |s| Ok((s.namespace()?, s.cursor(d)?))).await?;
        let ledger = self.ledger.clone();
        let base = self.cfg.routes.clone();
        let (items, scanned, routes) = tokio::task::spawn_blocking(move || {
            let (items, scanned) = ledger.read(cursor, PLAN_ITEMS_MAX)?;
            let routes = ledger.routes(d, &items, &base)?;
            Ok::<_, String>((items, scanned, routes))
        })
        .await
        .map_err(|e| e.to_string())??;
        if scanned <= cursor && items.is_empty() {
            return Ok(false);
        }
        let full = items.len() >= PLAN_ITEMS_MAX;
        let p = plan(&ns, d, cursor, scanned, &items, &routes);
        blocking(&self.store, move |s| {
            s.commit_plan(d, cursor, p.cursor, p.groups)
        })
        .await?;
        Ok(full)
    }

    fn edge_s(&self) -> i64 {
        let keep = self.cfg.window.saturating_sub(self.cfg.window_margin);
        self.clock.now_ms() / 1000 - i64::try_from(keep.as_secs()).unwrap_or(i64::MAX / 4)
    }

    /// Groups past the window: Metronome lists them out of window; Orb backfills them.
    async fn window(&mut self) -> Result<(), String> {
        let d = self.cfg.destination;
        let edge = self.edge_s();
        let old = blocking(&self.store, move |s| s.open_older_than(d, edge, 500)).await?;
        if old.is_empty() {
            return Ok(());
        }
        match d {
            Destination::Metronome => {
                for g in old {
                    let why = format!(
                        "usage at {} is older than Metronome's {}-day window; not sent (fix by \
                         an invoice adjustment in Metronome, then requeue or leave listed)",
                        rfc3339(g.event.timestamp_s),
                        self.cfg.window.as_secs() / 86_400
                    );
                    blocking(&self.store, move |s| {
                        s.apply(d, &[g.id], FwdEvent::OutOfWindow(why))
                    })
                    .await?;
                }
                Ok(())
            }
            Destination::Orb => self.start_backfill(old).await,
        }
    }

    /// Starts a backfill for `old` (Orb) if none is in progress. A group that may have been
    /// delivered before (attempted) is first looked up with event search: found means sent.
    async fn start_backfill(&mut self, old: Vec<FwdGroup>) -> Result<(), String> {
        let d = self.cfg.destination;
        if blocking(&self.store, move |s| s.backfill(d))
            .await?
            .is_some()
        {
            return Ok(());
        }
        let attempted: Vec<String> = old
            .iter()
            .filter(|g| g.attempts > 0)
            .map(|g| g.event.key.clone())
            .collect();
        let mut found = std::collections::HashSet::new();
        if !attempted.is_empty() {
            let Some(f) = super::reconcile::orb_search(&self.client, &attempted).await else {
                return Err(String::from("orb event search failed; backfill waits"));
            };
            found = f.into_iter().map(|e| e.id).collect();
        }
        let (delivered, todo): (Vec<_>, Vec<_>) =
            old.into_iter().partition(|g| found.contains(&g.event.key));
        if !delivered.is_empty() {
            let ids: Vec<u64> = delivered.iter().map(|g| g.id).collect();
            blocking(&self.store, move |s| s.apply(d, &ids, FwdEvent::Delivered)).await?;
        }
        let Some(start) = todo.iter().map(|g| g.event.timestamp_s).min() else {
            return Ok(());
        };
        // Orb: a backfill spans at most 31 days.
        let limit_end = start + 31 * 86_400;
        let members: Vec<&FwdGroup> = todo
            .iter()
            .filter(|g| g.event.timestamp_s < limit_end)
            .collect();
        let end = members
            .iter()
            .map(|g| g.event.timestamp_s + 60)
            .max()
            .unwrap_or(start + 60)
            .min(limit_end);
        let ns = blocking(&self.store, |s| s.namespace()).await?;
        let first = members.first().map_or(0, |g| g.id);
        let rec = BackfillRecord {
            key: format!("tly-{ns}-bf-{first}-{start}"),
            start_s: start,
            end_s: end,
            orb_id: None,
            phase: BackfillPhase::Create,
            next_attempt_ms: 0,
            attempts: 0,
        };
        let ids: Vec<u64> = members.iter().map(|g| g.id).collect();
        tracing::info!(groups = ids.len(), start = %rfc3339(start), end = %rfc3339(end), "orb backfill starts");
        blocking(&self.store, move |s| s.start_backfill(d, &rec, &ids)).await
    }

    async fn token(&mut self, events: usize) {
        loop {
            let now = self.clock.now_ms();
            let wait = match self.bucket.try_take(now) {
                Err(w) => Some(w),
                Ok(()) => match self.events.as_mut().map(|b| b.take(events, now)) {
                    Some(Err(w)) => Some(w),
                    _ => None,
                },
            };
            match wait {
                None => return,
                Some(w) => tokio::time::sleep(w).await,
            }
        }
    }

    async fn request(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        key: Option<&str>,
        events: usize,
    ) -> Result<Option<Reply>, String> {
        self.token(events).await;
        // Renewed right before the request and held past its timeout: no other process sends
        // for this destination while it is in flight.
        if !self.claim().await? {
            return Err(format!(
                "{} claim taken by another collector; this one stops sending",
                self.cfg.destination.as_str()
            ));
        }
        let r = self.client.call(method, path, body, key).await;
        let status = r
            .as_ref()
            .map_or_else(|| String::from("network"), |r| r.status.to_string());
        self.metrics
            .requests
            .get_or_create(&DestStatusLabel {
                destination: self.cfg.destination.as_str().to_owned(),
                status,
            })
            .inc();
        self.note(|s| s.requests += 1);
        Ok(r)
    }

    /// Drives the backfill in progress one step.
    async fn drive_backfill(&mut self) -> Result<(), String> {
        let d = self.cfg.destination;
        let Some(mut rec) = blocking(&self.store, move |s| s.backfill(d)).await? else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        if rec.next_attempt_ms > now {
            return Ok(());
        }
        let backoff = self.cfg.backoff;
        let retry = |rec: &mut BackfillRecord, rng: u64, after: Option<Duration>| {
            rec.attempts = rec.attempts.saturating_add(1);
            let delay = backoff.delay(rec.attempts.min(10), rng);
            let delay = after.map_or(delay, |a| a.max(delay));
            rec.next_attempt_ms = now + i64::try_from(delay.as_millis()).unwrap_or(60_000);
        };
        match rec.phase {
            BackfillPhase::Create => {
                let body = serde_json::json!({
                    "timeframe_start": rfc3339(rec.start_s),
                    "timeframe_end": rfc3339(rec.end_s),
                })
                .to_string();
                let key = rec.key.clone();
                let r = self
                    .request(
                        reqwest::Method::POST,
                        "/v1/events/backfills",
                        Some(body),
                        Some(&key),
                        0,
                    )
                    .await?;
                let id = r
                    .as_ref()
                    .filter(|r| (200..300).contains(&r.status))
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
                    .and_then(|v| v.get("id").and_then(|x| x.as_str()).map(str::to_owned));
                match id {
                    Some(id) => {
                        rec.orb_id = Some(id);
                        rec.phase = BackfillPhase::Ingest;
                        rec.attempts = 0;
                    }
                    None => {
                        if let Some(r) = &r {
                            self.error(format!(
                                "orb backfill create: {}",
                                wire::error_text(r.status, &r.body)
                            ));
                        }
                        let rng = self.random();
                        retry(
                            &mut rec,
                            rng,
                            r.and_then(|r| r.retry_after_s).map(Duration::from_secs),
                        );
                    }
                }
            }
            BackfillPhase::Ingest => {
                let key = rec.key.clone();
                let groups =
                    blocking(&self.store, move |s| s.backfill_groups(d, &key, usize::MAX)).await?;
                let todo: Vec<FwdGroup> = groups.into_iter().filter(|g| !g.ingested).collect();
                if todo.is_empty() {
                    rec.phase = BackfillPhase::Close;
                } else {
                    let path = format!(
                        "/v1/ingest?backfill_id={}",
                        rec.orb_id.as_deref().unwrap_or_default()
                    );
                    for chunk in todo.chunks(d.batch_max()) {
                        self.send_batch(chunk.to_vec(), &path, true).await?;
                        if self.stopping() {
                            break;
                        }
                    }
                    // Phase moves on the next pass, once every group is ingested.
                }
            }
            BackfillPhase::Close | BackfillPhase::Wait => {
                let id = rec.orb_id.clone().unwrap_or_default();
                let (method, path) = if rec.phase == BackfillPhase::Close {
                    (
                        reqwest::Method::POST,
                        format!("/v1/events/backfills/{id}/close"),
                    )
                } else {
                    (reqwest::Method::GET, format!("/v1/events/backfills/{id}"))
                };
                let r = self.request(method, &path, None, None, 0).await?;
                let closing = rec.phase == BackfillPhase::Close;
                // A close that was processed but whose answer was lost may be refused when resent
                // (already closed): the status read tells.
                if closing
                    && r.as_ref()
                        .is_some_and(|r| (400..500).contains(&r.status) && r.status != 429)
                {
                    rec.phase = BackfillPhase::Wait;
                    rec.next_attempt_ms = now + 500;
                    return blocking(&self.store, move |s| s.put_backfill(d, Some(&rec))).await;
                }
                let status = r
                    .as_ref()
                    .filter(|r| (200..300).contains(&r.status))
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
                    .and_then(|v| v.get("status").and_then(|x| x.as_str()).map(str::to_owned));
                match status.as_deref() {
                    Some("reflected") => {
                        let key = rec.key.clone();
                        let groups =
                            blocking(&self.store, move |s| s.backfill_groups(d, &key, usize::MAX))
                                .await?;
                        let ids: Vec<u64> = groups.iter().map(|g| g.id).collect();
                        let n = ids.len() as u64;
                        blocking(&self.store, move |s| {
                            s.apply(d, &ids, FwdEvent::Delivered)?;
                            s.put_backfill(d, None)
                        })
                        .await?;
                        self.sent(n);
                        tracing::info!(events = n, "orb backfill reflected");
                        return Ok(());
                    }
                    Some("reverted") | Some("pending_revert") => {
                        // Someone reverted it in Orb: the events are not there. Dead-letter them
                        // for an operator rather than resend on our own.
                        let key = rec.key.clone();
                        let groups =
                            blocking(&self.store, move |s| s.backfill_groups(d, &key, usize::MAX))
                                .await?;
                        let ids: Vec<u64> = groups.iter().map(|g| g.id).collect();
                        blocking(&self.store, move |s| {
                            s.apply(
                                d,
                                &ids,
                                FwdEvent::Rejected(String::from("orb backfill was reverted")),
                            )?;
                            s.put_backfill(d, None)
                        })
                        .await?;
                        return Ok(());
                    }
                    Some(_) => {
                        rec.phase = BackfillPhase::Wait;
                        rec.next_attempt_ms = now + 500;
                    }
                    None => {
                        let rng = self.random();
                        retry(&mut rec, rng, None);
                    }
                }
            }
        }
        blocking(&self.store, move |s| s.put_backfill(d, Some(&rec))).await
    }

    fn sent(&self, n: u64) {
        self.metrics
            .events_sent
            .get_or_create(&ForwardMetrics::label(self.cfg.destination))
            .inc_by(n);
        self.note(|s| s.events_sent += n);
    }

    /// Sends due groups; true when a full batch went (more may be due).
    async fn send_ready(&mut self) -> Result<bool, String> {
        let d = self.cfg.destination;
        let now = self.clock.now_ms();
        if now < self.hold_until_ms {
            return Ok(false);
        }
        let edge = self.edge_s();
        let max = d.batch_max();
        let ready = blocking(&self.store, move |s| s.ready(d, now, max)).await?;
        // Past the window: the window step handles them (backfill or out of window).
        let ready: Vec<FwdGroup> = ready
            .into_iter()
            .filter(|g| g.event.timestamp_s >= edge)
            .collect();
        if ready.is_empty() {
            return Ok(false);
        }
        let full = ready.len() >= max;
        self.send_batch(ready, "/v1/ingest", false).await?;
        Ok(full)
    }

    /// Records the attempt, sends `groups` in one request and records the outcome; a refused
    /// batch of several is resent one event at a time.
    async fn send_batch(
        &mut self,
        groups: Vec<FwdGroup>,
        path: &str,
        backfill: bool,
    ) -> Result<(), String> {
        let d = self.cfg.destination;
        let now = self.clock.now_ms();
        let lease =
            now + i64::try_from(self.cfg.request_timeout.as_millis()).unwrap_or(30_000) + 1000;
        let ids: Vec<u64> = groups.iter().map(|g| g.id).collect();
        let ids2 = ids.clone();
        blocking(&self.store, move |s| {
            s.apply(
                d,
                &ids2,
                FwdEvent::Attempt {
                    now_ms: now,
                    lease_until_ms: lease,
                },
            )
        })
        .await?;
        let refs: Vec<&FwdGroup> = groups.iter().collect();
        let body = wire::body(d, &refs);
        let reply = self
            .request(reqwest::Method::POST, path, Some(body), None, groups.len())
            .await?;
        let outcome = wire::classify(d, reply.as_ref());
        let now = self.clock.now_ms();
        match outcome {
            WireOutcome::Delivered { rejected } => {
                let (bad, good): (Vec<&FwdGroup>, Vec<&FwdGroup>) = groups
                    .iter()
                    .partition(|g| rejected.contains_key(&g.event.key));
                let good_ids: Vec<u64> = good.iter().map(|g| g.id).collect();
                let n = good_ids.len() as u64;
                let ev = if backfill {
                    FwdEvent::BackfillIngested
                } else {
                    FwdEvent::Delivered
                };
                blocking(&self.store, move |s| s.apply(d, &good_ids, ev)).await?;
                if !backfill {
                    self.sent(n);
                }
                for g in bad {
                    let why = rejected.get(&g.event.key).cloned().unwrap_or_default();
                    let id = g.id;
                    blocking(&self.store, move |s| {
                        s.apply(d, &[id], FwdEvent::Rejected(why))
                    })
                    .await?;
                }
            }
            WireOutcome::Retry {
                after,
                unknown,
                error,
            } => {
                self.error(&error);
                let attempts = groups.iter().map(|g| g.attempts + 1).max().unwrap_or(1);
                let rnd = self.random();
                let delay = self.cfg.backoff.delay(attempts.saturating_sub(1), rnd);
                let delay = after.map_or(delay, |a| a.max(delay));
                let at_ms = now + i64::try_from(delay.as_millis()).unwrap_or(60_000);
                self.hold_until_ms = self.hold_until_ms.max(at_ms);
                if backfill {
                    // Backfill groups are not "open": hold the whole backfill instead.
                    let mut rec = blocking(&self.store, move |s| s.backfill(d)).await?;
                    if let Some(r) = rec.as_mut() {
                        r.next_attempt_ms = at_ms;
                    }
                    blocking(&self.store, move |s| s.put_backfill(d, rec.as_ref())).await?;
                } else {
                    let ev = FwdEvent::Retry {
                        at_ms,
                        unknown,
                        error: Some(error),
                    };
                    blocking(&self.store, move |s| s.apply(d, &ids, ev)).await?;
                }
            }
            WireOutcome::Rejected(error) => {
                if groups.len() > 1 {
                    // Which one? Resend each alone under its key (dedup keeps it harmless).
                    for g in groups {
                        Box::pin(self.send_batch(vec![g], path, backfill)).await?;
                    }
                } else {
                    self.error(&error);
                    blocking(&self.store, move |s| {
                        s.apply(d, &ids, FwdEvent::Rejected(error))
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// A group as `GET /v1/outbox?destination=` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxView {
    /// Group id.
    pub id: u64,
    /// State.
    pub state: FwdState,
    /// Idempotency key / transaction id.
    pub key: String,
    /// Our customer.
    pub customer: String,
    /// Our meter.
    pub meter: String,
    /// Exact value.
    pub value: String,
    /// Usage time, RFC 3339.
    pub timestamp: String,
    /// Sends so far.
    pub attempts: u32,
    /// The last error or the out-of-window reason.
    pub error: Option<String>,
}

impl From<&FwdGroup> for OutboxView {
    fn from(g: &FwdGroup) -> Self {
        Self {
            id: g.id,
            state: g.state,
            key: g.event.key.clone(),
            customer: g.event.customer.clone(),
            meter: g.event.meter.clone(),
            value: g.event.value.to_string(),
            timestamp: rfc3339(g.event.timestamp_s),
            attempts: g.attempts,
            error: g.last_error.clone(),
        }
    }
}
