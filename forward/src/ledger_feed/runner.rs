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

use serde::Serialize;
use tokio::sync::Notify;

use super::store::{ForwardStore, FwdStoreError};
use super::wire::{self, Reply, WireOutcome};
use super::{Engine, FwdEvent, FwdGroup, FwdState, LedgerItem, Routes, plan};
use crate::destination::{
    Destination, DestinationError, DestinationKind, Listing, Retried, Status,
};
pub use crate::metrics::{DestLabel, DestStatusLabel, ForwardMetrics};
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
    fn routes(&self, dest: Engine, items: &[LedgerItem], base: &Routes) -> Result<Routes, String> {
        let _ = (dest, items);
        Ok(base.clone())
    }
}

/// One destination's settings.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Which.
    pub destination: Engine,
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
    pub fn new(destination: Engine, api_key: ApiKey, base_url: Option<String>) -> Self {
        let test = api_key.expose().contains("test");
        let (base, rate, epm, window, margin) = match destination {
            Engine::Orb => (
                "https://api.withorb.com",
                if test { 10 } else { 100 },
                Some(if test { 2_000 } else { 10_000 }),
                crate::orb::DEFAULT_GRACE,
                Duration::from_secs(600),
            ),
            Engine::Metronome => (
                "https://api.metronome.com",
                50,
                None,
                crate::metronome::WINDOW,
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

/// A running Orb or Metronome destination, a [`crate::Destination`].
pub struct FeedHandle {
    /// Which.
    pub destination: Engine,
    shared: Arc<Shared>,
    store: Arc<dyn ForwardStore>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The HTTP client the task uses (reconciliation shares it).
    pub client: DestClient,
}

impl FeedHandle {
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

impl Destination for FeedHandle {
    fn kind(&self) -> DestinationKind {
        self.destination.into()
    }

    fn notify(&self) {
        FeedHandle::notify(self);
    }

    fn status(&self) -> Status {
        Status::Feed(FeedHandle::status(self))
    }

    /// Events in `state` (default: every state) and counts.
    fn list(
        &self,
        state: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Listing, DestinationError> {
        let state: Option<FwdState> = state
            .map(str::parse)
            .transpose()
            .map_err(DestinationError::InvalidState)?;
        let d = self.destination;
        let store_err = |e: FwdStoreError| DestinationError::Store(e.to_string());
        let groups = self.store.list(d, state, after, limit).map_err(store_err)?;
        let stats = self.store.stats(d).map_err(store_err)?;
        Ok(Listing::Feed {
            data: groups.iter().map(Into::into).collect(),
            stats,
        })
    }

    /// Back to open under the **same key**, so a copy the destination did take is deduplicated
    /// (one that was attempted goes back as `unknown`; an Orb one older than the grace period
    /// goes through a backfill after an event search).
    fn retry(&self, id: u64) -> Result<Retried, DestinationError> {
        let d = self.destination;
        let store_err = |e: FwdStoreError| DestinationError::Store(e.to_string());
        let cur = self
            .store
            .list(d, None, id.saturating_sub(1), 1)
            .map_err(store_err)?
            .into_iter()
            .find(|g| g.id == id);
        let not_found = || DestinationError::NotFound(format!("no {} event {id}", d.as_str()));
        let Some(cur) = cur else {
            return Err(not_found());
        };
        if cur.state != FwdState::Dead {
            return Err(DestinationError::NotDead(format!(
                "{} event {id} is {:?}, not dead; only dead letters are retried",
                d.as_str(),
                cur.state
            )));
        }
        let after = self
            .store
            .apply(d, &[id], FwdEvent::Requeue)
            .map_err(store_err)?;
        FeedHandle::notify(self);
        after
            .into_iter()
            .next()
            .map(|g| Retried::Group(Box::new(g)))
            .ok_or_else(not_found)
    }

    fn shutdown(&self) -> crate::destination::Shutdown<'_> {
        Box::pin(FeedHandle::shutdown(self))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
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
        crate::stripe::client::install_ring_provider();
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
) -> Result<FeedHandle, StartError> {
    let client = DestClient::new(&cfg.base_url, cfg.api_key.clone(), cfg.request_timeout)?;
    let shared = Arc::new(Shared {
        notify: Notify::new(),
        stop: std::sync::atomic::AtomicBool::new(false),
        status: Mutex::new(DestinationStatus::default()),
    });
    let clock = clock.unwrap_or_else(|| Arc::new(SystemClock));
    let now = clock.now_ms();
    let store2 = store.clone();
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
    Ok(FeedHandle {
        destination,
        shared,
        store: store2,
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

pub(crate) struct Runner {
    pub(crate) cfg: DestinationConfig,
    pub(crate) store: Arc<dyn ForwardStore>,
    ledger: Arc<dyn LedgerSource>,
    metrics: ForwardMetrics,
    pub(crate) clock: SharedClock,
    pub(crate) client: DestClient,
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
pub(crate) async fn blocking<T: Send + 'static>(
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
    pub(crate) fn stopping(&self) -> bool {
        self.shared.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn note(&self, f: impl FnOnce(&mut DestinationStatus)) {
        f(&mut self
            .shared
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    pub(crate) fn error(&self, e: impl std::fmt::Display) {
        let msg = e.to_string();
        tracing::warn!(destination = self.cfg.destination.as_str(), error = %msg, "forwarding");
        self.note(|s| s.last_error = Some(msg));
    }

    pub(crate) fn random(&mut self) -> u64 {
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
        if self.cfg.destination == Engine::Orb {
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
            Engine::Metronome => {
                for g in old {
                    let why = crate::metronome::out_of_window_reason(
                        g.event.timestamp_s,
                        self.cfg.window,
                    );
                    blocking(&self.store, move |s| {
                        s.apply(d, &[g.id], FwdEvent::OutOfWindow(why))
                    })
                    .await?;
                }
                Ok(())
            }
            Engine::Orb => self.start_backfill(old).await,
        }
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

    pub(crate) async fn request(
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

    pub(crate) fn sent(&self, n: u64) {
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
    pub(crate) async fn send_batch(
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
