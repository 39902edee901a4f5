//! The forwarder: a tokio shell that turns pending outbox rows into meter events and drives them
//! to `Sent` (or `Dead`) through every failure Stripe and the network produce.
//!
//! Each pass: (1) pending rows are grouped ([`crate::plan`]) and the groups persisted before any
//! send, fixing their identifiers; (2) ready groups are sent — v1 one event per request, at most
//! one request in flight per (Stripe customer, event name); v2 up to 100 events per stream
//! request on a session renewed before expiry and on `temporary_session_expired` — paced by a
//! token bucket; (3) each answer is classified ([`crate::retry::classify`]) and recorded.
//!
//! Guarantees: a group is only ever sent under its one identifier, so retries (including after a
//! crash, when the lease written before the send runs out) are deduplicated by Stripe; a group
//! whose outcome stayed unknown longer than `unknown_check_after` (23 h) is checked against
//! event summaries before it is sent again; without an API key nothing is sent and nothing is
//! marked (log-only mode). The key never appears in logs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::client::{DEFAULT_STRIPE_VERSION, MeterEvent, StripeClient, TransportError};
use crate::metrics::StripeMetrics;
use crate::outbox::{EventGroup, GroupId, GroupState, OutboxStore, StoreError, resolve_customer};
use crate::plan::plan_groups;
use crate::retry::{Backoff, Outcome, TokenBucket, classify};
use crate::secret::ApiKey;
use crate::time::{Clock, SystemClock, parse_rfc3339};

/// Which Stripe API carries meter events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Api {
    /// `POST /v1/billing/meter_events` (default).
    #[default]
    V1,
    /// v2 meter event session + stream.
    V2,
}

impl std::str::FromStr for Api {
    type Err = String;
    /// `v1` or `v2` (the `--stripe-api` flag).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            other => Err(format!("unknown stripe api {other:?}: expected v1 or v2")),
        }
    }
}

/// Forwarder settings.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// v1 or v2.
    pub api: Api,
    /// `STRIPE_API_KEY`; `None` = log-only mode.
    pub api_key: Option<ApiKey>,
    /// `--stripe-base-url`.
    pub base_url: String,
    /// `--stripe-meter-events-url` (v2 stream host).
    pub meter_events_url: String,
    /// Pinned `Stripe-Version`.
    pub stripe_version: String,
    /// Requests per second; `None` = 20 for test keys, 900 for live keys.
    pub rate_per_s: Option<u32>,
    /// Most requests in flight at once (v1: across distinct customer+meter pairs).
    pub max_in_flight: usize,
    /// Pass interval when idle.
    pub poll_interval: Duration,
    /// Per-request timeout; also the lease taken on a group before sending it.
    pub request_timeout: Duration,
    /// Retry backoff.
    pub backoff: Backoff,
    /// Unknown outcomes older than this are checked against event summaries first (23 h).
    pub unknown_check_after: Duration,
    /// Renew the v2 session this long before it expires.
    pub session_renew_before: Duration,
    /// Rows grouped per pass at most.
    pub rows_per_pass: usize,
    /// Stripe meter ids by event name (`mtr_…`); missing ones are looked up with
    /// `GET /v1/billing/meters`.
    pub meter_ids: HashMap<String, String>,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            api: Api::V1,
            api_key: None,
            base_url: "https://api.stripe.com".into(),
            meter_events_url: "https://meter-events.stripe.com".into(),
            stripe_version: DEFAULT_STRIPE_VERSION.into(),
            rate_per_s: None,
            max_in_flight: 32,
            poll_interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            unknown_check_after: Duration::from_secs(23 * 3600),
            session_renew_before: Duration::from_secs(60),
            rows_per_pass: 100_000,
            meter_ids: HashMap::new(),
        }
    }
}

impl ForwarderConfig {
    /// The effective rate: configured, else 20/s for test keys and 900/s for live keys.
    pub fn effective_rate(&self) -> u32 {
        self.rate_per_s.unwrap_or(match &self.api_key {
            Some(k) if !k.is_test_mode() => 900,
            _ => 20,
        })
    }
}

/// Errors starting the forwarder.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(#[from] TransportError),
}

/// What the forwarder knows beyond the store (for the API and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwarderStatus {
    /// Rows waiting for a customer mapping, per customer key (from the last pass).
    pub unmapped: BTreeMap<String, u64>,
    /// Requests sent.
    pub requests: u64,
    /// Unknown-outcome checks that could not decide (left for a later check / an operator).
    pub inconclusive_checks: u64,
    /// Groups found delivered by an unknown-outcome check.
    pub resolved_by_check: u64,
    /// The last store or transport error, for operators (no secrets).
    pub last_error: Option<String>,
}

/// What the unknown-outcome check found.
enum Check {
    /// Stripe has these groups (all unknown ones in the window).
    Delivered(Vec<GroupId>),
    /// Stripe has none of the unknown ones: send.
    NotDelivered,
    /// Neither explains Stripe's total (eventual consistency, foreign events): wait.
    Undecided,
}

struct Session {
    token: String,
    expires_ms: i64,
}

struct Shared<S: ?Sized> {
    cfg: ForwarderConfig,
    store: Arc<S>,
    client: Option<StripeClient>,
    clock: Arc<dyn Clock>,
    metrics: StripeMetrics,
    bucket: Mutex<TokenBucket>,
    session: tokio::sync::Mutex<Option<Session>>,
    meter_ids: tokio::sync::Mutex<HashMap<String, String>>,
    status: Mutex<ForwarderStatus>,
    rng: AtomicU64,
    logged: Mutex<HashSet<GroupId>>,
    /// Where the next planning pass resumes, and unmapped counts gathered since the last wrap.
    plan_cursor: Mutex<(u64, BTreeMap<String, u64>)>,
    wake: Notify,
}

/// The running forwarder. Dropping it aborts the task and every request in flight (as a crash
/// would); [`ForwarderHandle::shutdown`] stops it gracefully.
pub struct ForwarderHandle<S: OutboxStore + ?Sized> {
    shared: Arc<Shared<S>>,
    stop: Arc<Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl<S: OutboxStore + ?Sized> Drop for ForwarderHandle<S> {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl<S: OutboxStore + ?Sized> ForwarderHandle<S> {
    /// Asks for a pass now (call after committing outbox rows or a mapping change).
    pub fn notify(&self) {
        self.shared.wake.notify_one();
    }

    /// A snapshot of the forwarder's status.
    pub fn status(&self) -> ForwarderStatus {
        self.shared
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Stops after the requests in flight have been answered.
    pub async fn shutdown(mut self) {
        self.stop.notify_one();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Starts the forwarder on the current tokio runtime.
pub fn spawn<S: OutboxStore + ?Sized>(
    cfg: ForwarderConfig,
    store: Arc<S>,
    metrics: Option<StripeMetrics>,
    clock: Option<Arc<dyn Clock>>,
) -> Result<ForwarderHandle<S>, ForwarderError> {
    let clock = clock.unwrap_or_else(|| Arc::new(SystemClock));
    let client = match &cfg.api_key {
        Some(k) => Some(StripeClient::new(
            &cfg.base_url,
            &cfg.meter_events_url,
            k.clone(),
            &cfg.stripe_version,
            cfg.request_timeout,
        )?),
        None => None,
    };
    let rate = cfg.effective_rate();
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let shared = Arc::new(Shared {
        bucket: Mutex::new(TokenBucket::new(rate, rate, clock.now_ms())),
        meter_ids: tokio::sync::Mutex::new(cfg.meter_ids.clone()),
        cfg,
        store,
        client,
        clock,
        metrics: metrics.unwrap_or_default(),
        session: tokio::sync::Mutex::new(None),
        status: Mutex::new(ForwarderStatus::default()),
        rng: AtomicU64::new(u64::from_le_bytes(seed) | 1),
        logged: Mutex::new(HashSet::new()),
        plan_cursor: Mutex::new((0, BTreeMap::new())),
        wake: Notify::new(),
    });
    match &shared.cfg.api_key {
        Some(k) => info!(api = ?shared.cfg.api, mode = k.mode(), rate, "stripe forwarder started"),
        None => info!("stripe forwarder in log-only mode: no api key"),
    }
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn(run(shared.clone(), stop.clone()));
    Ok(ForwarderHandle {
        shared,
        stop,
        task: Some(task),
    })
}

impl<S: OutboxStore + ?Sized> Shared<S> {
    fn random(&self) -> u64 {
        // xorshift64*; quality is plenty for jitter and idempotency keys.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn note_error(&self, e: impl std::fmt::Display) {
        warn!(error = %e, "stripe forwarder");
        if let Ok(mut s) = self.status.lock() {
            s.last_error = Some(e.to_string());
        }
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me.store))
            .await
            .map_err(|e| StoreError::Backend(format!("store task: {e}")))?
    }

    async fn take_token(&self) {
        loop {
            let now = self.clock.now_ms();
            let r = match self.bucket.lock() {
                Ok(mut b) => b.try_take(now),
                Err(_) => Ok(()),
            };
            match r {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    fn lease_until(&self, now_ms: i64) -> i64 {
        now_ms + i64::try_from(self.cfg.request_timeout.as_millis()).unwrap_or(i64::MAX / 4) + 1000
    }

    fn retry_at(&self, attempts: u32, after: Option<Duration>) -> i64 {
        let d = self
            .cfg
            .backoff
            .delay(attempts.saturating_sub(1), self.random());
        let d = after.map_or(d, |a| a.max(d));
        self.clock.now_ms() + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// Groups pending rows and persists the groups; counts rows waiting for a mapping.
    ///
    /// Scans at most `rows_per_pass` rows a pass, resuming where the last pass stopped, so a
    /// backlog of unmapped rows cannot starve newer rows; the unmapped counts are published each
    /// time a scan reaches the end of the outbox.
    async fn plan_pass(self: &Arc<Self>) -> Result<(), StoreError> {
        let limit = self.cfg.rows_per_pass.max(1);
        let start = self.plan_cursor.lock().map(|c| c.0).unwrap_or(0);
        let (groups, unmapped, reached_end, last) = self
            .blocking(move |store| {
                let ns = store.namespace()?;
                let mut rows = Vec::new();
                let mut after = start;
                let mut reached_end = false;
                while rows.len() < limit {
                    let page = store.pending_rows(after, (limit - rows.len()).min(10_000))?;
                    let Some(last) = page.last() else {
                        reached_end = true;
                        break;
                    };
                    after = last.id;
                    rows.extend(page);
                }
                let mut err = None;
                let plan = plan_groups(&ns, &rows, |c| match resolve_customer(store, c) {
                    Ok(v) => v,
                    Err(e) => {
                        err = Some(e);
                        None
                    }
                });
                if let Some(e) = err {
                    return Err(e);
                }
                let n = plan.groups.len();
                if n > 0 {
                    store.create_groups(plan.groups)?;
                }
                Ok((n, plan.unmapped, reached_end, after))
            })
            .await?;
        if groups > 0 {
            debug!(groups, "stripe outbox rows grouped");
        }
        let publish = {
            let Ok(mut c) = self.plan_cursor.lock() else {
                return Ok(());
            };
            for (k, v) in unmapped {
                *c.1.entry(k).or_insert(0) += v;
            }
            if reached_end {
                c.0 = 0;
                Some(std::mem::take(&mut c.1))
            } else {
                c.0 = last;
                None
            }
        };
        if let Some(unmapped) = publish {
            let unmapped_rows: u64 = unmapped.values().sum();
            self.metrics
                .outbox_unmapped
                .set(i64::try_from(unmapped_rows).unwrap_or(i64::MAX));
            if let Ok(mut s) = self.status.lock() {
                s.unmapped = unmapped;
            }
        }
        Ok(())
    }

    async fn refresh_gauges(self: &Arc<Self>) {
        match self.blocking(|s| s.stats()).await {
            Ok(st) => {
                self.metrics
                    .outbox_pending
                    .set(i64::try_from(st.pending_rows).unwrap_or(i64::MAX));
                self.metrics
                    .dead_letters
                    .set(i64::try_from(st.dead_rows).unwrap_or(i64::MAX));
                let now_s = self.clock.now_ms() / 1000;
                self.metrics.forward_lag_seconds.set(
                    st.oldest_pending_timestamp_s
                        .map_or(0, |t| (now_s - t).max(0)),
                );
            }
            Err(e) => self.note_error(e),
        }
    }

    fn needs_check(&self, g: &EventGroup, now_ms: i64) -> bool {
        let limit = i64::try_from(self.cfg.unknown_check_after.as_millis()).unwrap_or(i64::MAX);
        g.state == GroupState::Unknown && g.first_attempt_ms.is_some_and(|t| now_ms - t > limit)
    }

    async fn meter_id(&self, client: &StripeClient, event_name: &str) -> Option<String> {
        let mut ids = self.meter_ids.lock().await;
        if let Some(id) = ids.get(event_name) {
            return Some(id.clone());
        }
        match client.list_meters().await {
            Ok(Ok(meters)) => {
                for m in meters {
                    ids.entry(m.event_name).or_insert(m.id);
                }
            }
            Ok(Err(a)) => self.note_error(format!("list meters: http {}", a.status)),
            Err(e) => self.note_error(format!("list meters: {e}")),
        }
        ids.get(event_name).cloned()
    }

    /// The unknown-outcome check for `g`, over its minute window: Stripe's summary is compared
    /// with what we know was delivered there plus every group whose outcome is unknown.
    async fn check_delivered(&self, client: &StripeClient, g: &EventGroup) -> Check {
        let Some(meter) = self.meter_id(client, &g.event.event_name).await else {
            return Check::Undecided;
        };
        let start = g.event.timestamp_s - g.event.timestamp_s.rem_euclid(60);
        let end = start + 60;
        let summaries = match client
            .event_summaries(&meter, &g.event.stripe_customer, start, end, None)
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(a)) => {
                self.note_error(format!("event summaries: http {}", a.status));
                return Check::Undecided;
            }
            Err(e) => {
                self.note_error(format!("event summaries: {e}"));
                return Check::Undecided;
            }
        };
        let total: Decimal = summaries.iter().map(|s| s.aggregated_value).sum();
        let (cust, name) = (g.event.stripe_customer.clone(), g.event.event_name.clone());
        let window = match self.store.window_groups(&cust, &name, start, end) {
            Ok(w) => w,
            Err(e) => {
                self.note_error(e);
                return Check::Undecided;
            }
        };
        let sent: u64 = window
            .iter()
            .filter(|x| x.state == GroupState::Sent)
            .map(|x| x.event.value)
            .sum();
        let mut unknown: Vec<(GroupId, u64)> = window
            .iter()
            .filter(|x| x.state == GroupState::Unknown)
            .map(|x| (x.id, x.event.value))
            .collect();
        if !unknown.iter().any(|(id, _)| *id == g.id) {
            unknown.push((g.id, g.event.value));
        }
        let unknown_sum: u64 = unknown.iter().map(|(_, v)| v).sum();
        if total == Decimal::from(sent) + Decimal::from(unknown_sum) {
            Check::Delivered(unknown.into_iter().map(|(id, _)| id).collect())
        } else if total == Decimal::from(sent) {
            Check::NotDelivered
        } else {
            Check::Undecided
        }
    }

    /// Runs the unknown-outcome check on `g`; returns true if the group may be sent now.
    async fn gate_unknown(self: &Arc<Self>, client: &StripeClient, g: &EventGroup) -> bool {
        if !self.needs_check(g, self.clock.now_ms()) {
            return true;
        }
        match self.check_delivered(client, g).await {
            Check::Delivered(ids) => {
                info!(identifier = %g.event.identifier, groups = ids.len(), "unknown outcome found delivered in event summaries");
                let n = ids.len() as u64;
                if let Err(e) = self.blocking(move |s| s.mark_sent(&ids)).await {
                    self.note_error(e);
                }
                if let Ok(mut s) = self.status.lock() {
                    s.resolved_by_check += n;
                }
                false
            }
            Check::NotDelivered => true,
            Check::Undecided => {
                warn!(identifier = %g.event.identifier, "unknown outcome could not be decided from event summaries; checking again in an hour");
                if let Ok(mut s) = self.status.lock() {
                    s.inconclusive_checks += 1;
                }
                let (id, at) = (g.id, self.clock.now_ms() + 3_600_000);
                if let Err(e) = self
                    .blocking(move |s| s.mark_retry(id, at, true, None))
                    .await
                {
                    self.note_error(e);
                }
                false
            }
        }
    }

    async fn apply(self: &Arc<Self>, groups: &[EventGroup], outcome: Outcome) {
        let ids: Vec<GroupId> = groups.iter().map(|g| g.id).collect();
        let attempts = groups.iter().map(|g| g.attempts + 1).max().unwrap_or(1);
        let r = match outcome {
            Outcome::Delivered => self.blocking(move |s| s.mark_sent(&ids)).await,
            Outcome::Retry {
                after,
                unknown,
                error,
            } => {
                let at = self.retry_at(attempts, after);
                self.blocking(move |s| {
                    for id in ids {
                        s.mark_retry(id, at, unknown, error.clone())?;
                    }
                    Ok(())
                })
                .await
            }
            Outcome::SessionExpired => {
                let at = self.clock.now_ms();
                self.blocking(move |s| {
                    for id in ids {
                        s.mark_retry(id, at, false, None)?;
                    }
                    Ok(())
                })
                .await
            }
            Outcome::Dead(err) => {
                warn!(code = %err.code, status = err.status, events = groups.len(), "stripe rejected meter events: dead letter");
                let was_unknown: Vec<bool> = groups
                    .iter()
                    .map(|g| g.state == GroupState::Unknown)
                    .collect();
                self.blocking(move |s| {
                    for (id, unknown) in ids.into_iter().zip(was_unknown) {
                        let mut e = err.clone();
                        if unknown {
                            // An earlier send may have been delivered: a blind retry (new
                            // identifier) could count twice. Say so where the operator looks.
                            e.message = format!(
                                "{} [an earlier send's outcome is unknown: check event summaries before retrying]",
                                e.message
                            );
                        }
                        s.mark_dead(id, e)?;
                    }
                    Ok(())
                })
                .await
            }
        };
        if let Err(e) = r {
            self.note_error(e);
        }
    }

    fn count_request(&self, status: Option<u16>) {
        self.metrics.request(status);
        if let Ok(mut s) = self.status.lock() {
            s.requests += 1;
        }
    }

    async fn send_v1(self: Arc<Self>, client: StripeClient, g: EventGroup) {
        if !self.gate_unknown(&client, &g).await {
            return;
        }
        self.take_token().await;
        let (id, now) = (g.id, self.clock.now_ms());
        let lease = self.lease_until(now);
        if let Err(e) = self
            .blocking(move |s| s.record_attempt(&[id], now, lease))
            .await
        {
            self.note_error(e);
            return;
        }
        let event = to_event(&g);
        let key = format!("{}-a{}", g.event.identifier, g.attempts + 1);
        let outcome = match client.create_meter_event(&event, &key).await {
            Ok(a) => {
                self.count_request(Some(a.status));
                classify(&a, Some(&g.event.identifier))
            }
            Err(e) => {
                self.count_request(None);
                debug!(identifier = %g.event.identifier, error = %e, "meter event outcome unknown");
                Outcome::Retry {
                    after: None,
                    unknown: true,
                    error: None,
                }
            }
        };
        self.apply(std::slice::from_ref(&g), outcome).await;
    }

    async fn session_token(&self, client: &StripeClient) -> Result<String, Outcome> {
        let mut guard = self.session.lock().await;
        let now = self.clock.now_ms();
        let renew = i64::try_from(self.cfg.session_renew_before.as_millis()).unwrap_or(0);
        if let Some(s) = guard.as_ref()
            && s.expires_ms - renew > now
        {
            return Ok(s.token.clone());
        }
        self.take_token().await;
        let key = format!("tally-session-{:016x}", self.random());
        match client.create_session(&key).await {
            Ok(Ok(s)) => {
                self.count_request(Some(200));
                let cap = now + 15 * 60 * 1000;
                let expires_ms = parse_rfc3339(&s.expires_at).map_or(cap, |t| (t * 1000).min(cap));
                debug!(expires_ms, "meter event session created");
                let token = s.authentication_token.clone();
                *guard = Some(Session {
                    token: s.authentication_token,
                    expires_ms,
                });
                Ok(token)
            }
            Ok(Err(a)) => {
                self.count_request(Some(a.status));
                Err(match classify(&a, None) {
                    // Nothing was sent: not an unknown outcome for the events.
                    Outcome::Retry { after, error, .. } => Outcome::Retry {
                        after,
                        unknown: false,
                        error,
                    },
                    other => other,
                })
            }
            Err(_) => {
                self.count_request(None);
                Err(Outcome::Retry {
                    after: None,
                    unknown: false,
                    error: None,
                })
            }
        }
    }

    async fn send_v2(self: Arc<Self>, client: StripeClient, groups: Vec<EventGroup>) {
        let mut ready = Vec::with_capacity(groups.len());
        for g in groups {
            if self.gate_unknown(&client, &g).await {
                ready.push(g);
            }
        }
        if ready.is_empty() {
            return;
        }
        let events: Vec<MeterEvent> = ready.iter().map(to_event).collect();
        let ids: Vec<GroupId> = ready.iter().map(|g| g.id).collect();
        let now = self.clock.now_ms();
        let lease = self.lease_until(now);
        if let Err(e) = self
            .blocking(move |s| s.record_attempt(&ids, now, lease))
            .await
        {
            self.note_error(e);
            return;
        }
        let outcome = self.stream_once(&client, &events).await;
        if let Outcome::Dead(err) = &outcome
            && ready.len() > 1
        {
            // One bad event must not dead-letter the other 99: resend each on its own (same
            // identifiers, so nothing can count twice) and keep each event's own outcome.
            debug!(code = %err.code, events = ready.len(), "stream rejected; isolating events");
            for (g, e) in ready.iter().zip(&events) {
                let o = self.stream_once(&client, std::slice::from_ref(e)).await;
                self.apply(std::slice::from_ref(g), o).await;
            }
            return;
        }
        self.apply(&ready, outcome).await;
    }

    /// One stream request (renewing the session on `temporary_session_expired`, at most twice).
    async fn stream_once(&self, client: &StripeClient, events: &[MeterEvent]) -> Outcome {
        let mut outcome = Outcome::Retry {
            after: None,
            unknown: false,
            error: None,
        };
        for _ in 0..3 {
            let token = match self.session_token(client).await {
                Ok(t) => t,
                Err(o) => return o,
            };
            self.take_token().await;
            let key = format!("tally-stream-{:016x}", self.random());
            outcome = match client.send_stream(&token, events, &key).await {
                Ok(a) => {
                    self.count_request(Some(a.status));
                    // Any 401 on the stream is about the session token, never the events.
                    if a.status == 401 {
                        Outcome::SessionExpired
                    } else {
                        classify(&a, None)
                    }
                }
                Err(_) => {
                    self.count_request(None);
                    Outcome::Retry {
                        after: None,
                        unknown: true,
                        error: None,
                    }
                }
            };
            if outcome != Outcome::SessionExpired {
                break;
            }
            debug!("meter event session expired; renewing");
            *self.session.lock().await = None;
        }
        outcome
    }

    fn log_only(&self, groups: &[EventGroup]) {
        let Ok(mut logged) = self.logged.lock() else {
            return;
        };
        for g in groups {
            if logged.insert(g.id) {
                info!(
                    identifier = %g.event.identifier,
                    customer = %g.event.stripe_customer,
                    event_name = %g.event.event_name,
                    timestamp = g.event.timestamp_s,
                    value = g.event.value,
                    "stripe log-only: would send meter event"
                );
            }
        }
    }
}

fn to_event(g: &EventGroup) -> MeterEvent {
    MeterEvent {
        event_name: g.event.event_name.clone(),
        identifier: g.event.identifier.clone(),
        timestamp_s: g.event.timestamp_s,
        stripe_customer: g.event.stripe_customer.clone(),
        value: g.event.value,
    }
}

type Key = (String, String);

/// How often the outbox gauges are refreshed from the store (a full count can be costly).
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

async fn run<S: OutboxStore + ?Sized>(shared: Arc<Shared<S>>, stop: Arc<Notify>) {
    let mut tasks: JoinSet<(Vec<GroupId>, Option<Key>)> = JoinSet::new();
    let mut busy_keys: HashSet<Key> = HashSet::new();
    let mut busy_groups: HashSet<GroupId> = HashSet::new();
    let mut last_plan = tokio::time::Instant::now() - shared.cfg.poll_interval;
    let mut last_gauges = tokio::time::Instant::now() - GAUGE_INTERVAL;
    let mut stopping = false;
    loop {
        if !stopping && last_plan.elapsed() >= shared.cfg.poll_interval {
            if let Err(e) = shared.plan_pass().await {
                shared.note_error(e);
            }
            last_plan = tokio::time::Instant::now();
        }
        if last_gauges.elapsed() >= GAUGE_INTERVAL {
            shared.refresh_gauges().await;
            last_gauges = tokio::time::Instant::now();
        }
        if !stopping {
            dispatch(&shared, &mut tasks, &mut busy_keys, &mut busy_groups).await;
        }
        if stopping && tasks.is_empty() {
            break;
        }
        tokio::select! {
            _ = stop.notified() => stopping = true,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((ids, key)) = done {
                    for id in ids { busy_groups.remove(&id); }
                    if let Some(k) = key { busy_keys.remove(&k); }
                } else {
                    // A panicked send task: forget everything in flight; leases protect the rows.
                    busy_groups.clear();
                    busy_keys.clear();
                }
                while let Some(more) = tasks.try_join_next() {
                    if let Ok((ids, key)) = more {
                        for id in ids { busy_groups.remove(&id); }
                        if let Some(k) = key { busy_keys.remove(&k); }
                    }
                }
            }
            _ = shared.wake.notified() => last_plan = tokio::time::Instant::now() - shared.cfg.poll_interval,
            _ = tokio::time::sleep(shared.cfg.poll_interval) => {}
        }
    }
    shared.refresh_gauges().await;
}

async fn dispatch<S: OutboxStore + ?Sized>(
    shared: &Arc<Shared<S>>,
    tasks: &mut JoinSet<(Vec<GroupId>, Option<Key>)>,
    busy_keys: &mut HashSet<Key>,
    busy_groups: &mut HashSet<GroupId>,
) {
    let free = shared.cfg.max_in_flight.saturating_sub(tasks.len());
    if free == 0 {
        return;
    }
    let per = if shared.cfg.api == Api::V2 {
        crate::STREAM_EVENTS_MAX
    } else {
        1
    };
    let limit = busy_groups.len() + free * per * 4 + 100;
    let now = shared.clock.now_ms();
    let ready = match shared.blocking(move |s| s.ready_groups(now, limit)).await {
        Ok(r) => r,
        Err(e) => {
            shared.note_error(e);
            return;
        }
    };
    let ready: Vec<EventGroup> = ready
        .into_iter()
        .filter(|g| !busy_groups.contains(&g.id))
        .collect();
    if ready.is_empty() {
        return;
    }
    let Some(client) = shared.client.clone() else {
        shared.log_only(&ready);
        return;
    };
    match shared.cfg.api {
        Api::V1 => {
            let mut started = 0;
            for g in ready {
                if started >= free {
                    break;
                }
                let key = (g.event.stripe_customer.clone(), g.event.event_name.clone());
                if busy_keys.contains(&key) {
                    continue;
                }
                busy_keys.insert(key.clone());
                busy_groups.insert(g.id);
                let (me, c) = (shared.clone(), client.clone());
                tasks.spawn(async move {
                    let id = g.id;
                    me.send_v1(c, g).await;
                    (vec![id], Some(key))
                });
                started += 1;
            }
        }
        Api::V2 => {
            let mut iter = ready.into_iter().peekable();
            for _ in 0..free {
                let chunk: Vec<EventGroup> = iter.by_ref().take(crate::STREAM_EVENTS_MAX).collect();
                if chunk.is_empty() {
                    break;
                }
                let ids: Vec<GroupId> = chunk.iter().map(|g| g.id).collect();
                busy_groups.extend(ids.iter().copied());
                let (me, c) = (shared.clone(), client.clone());
                tasks.spawn(async move {
                    me.send_v2(c, chunk).await;
                    (ids, None)
                });
            }
        }
    }
}
