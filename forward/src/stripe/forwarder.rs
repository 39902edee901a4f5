//! The forwarder: the tokio shell around [`crate::stripe::dispatch::Dispatcher`] that turns pending
//! outbox rows into meter events and drives them to `Sent` (or `Dead`) through every failure
//! Stripe and the network produce.
//!
//! The shell only moves data: it reads the store (pending rows, grouped with [`crate::stripe::plan`];
//! ready groups), hands what it read and every HTTP answer to the machine, and performs the
//! machine's actions in order — store calls on the blocking pool, requests through
//! [`StripeClient`] on tasks — sleeping until the machine's next timer. Every decision (what to
//! claim, retry classes, the 23-hour rule, v2 sessions, pacing, dead letters) is the machine's.
//!
//! Guarantees: a group is only ever sent under its one identifier, so retries (including after a
//! crash, when the lease written before the send runs out) are deduplicated by Stripe; a group
//! whose outcome stayed unknown longer than `unknown_check_after` (23 h) is checked against
//! event summaries before it is sent again; without an API key nothing is sent and nothing is
//! marked (log-only mode). The key never appears in logs.
//!
//! Limits: jobs ≤ `max_in_flight` (the machine's); tasks ≤ jobs × (1 + one check per event) + one
//! session request; meter ids cached ≤ [`crate::stripe::client::METER_IDS_MAX`]; unmapped counts ≤ the distinct
//! customers of one scan (`rows_per_pass` rows). Time is read only from the injected [`Clock`];
//! the run loop sleeps until the machine's next timer, at most `poll_interval`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rust_decimal::Decimal;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::destination::{
    Destination, DestinationError, DestinationKind, Listing, Retried, Status,
};
use crate::metrics::StripeMetrics;
use crate::retry::{Answer, Backoff};
use crate::secret::ApiKey;
use crate::stripe::client::{
    DEFAULT_STRIPE_VERSION, MeterIdError, MeterIds, StripeClient, TransportError,
};
use crate::stripe::dispatch::{
    Action, CheckReading, DispatchConfig, Dispatcher, JobId, PlanScan, Request, ScannedRows,
    StoreOp,
};
pub use crate::stripe::dispatch::{Api, ForwarderStatus, ParseApiError};
use crate::stripe::outbox::{
    EventGroup, GroupId, OutboxState, OutboxStore, StoreError, resolve_customer,
};
use crate::time::{Clock, SystemClock};

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

    /// The dispatch machine's settings.
    pub fn dispatch(&self) -> DispatchConfig {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4);
        DispatchConfig {
            api: self.api,
            live: self.api_key.is_some(),
            rate_per_s: self.effective_rate(),
            max_in_flight: self.max_in_flight,
            poll_interval_ms: ms(self.poll_interval),
            request_timeout_ms: ms(self.request_timeout),
            backoff: self.backoff,
            unknown_check_after_ms: ms(self.unknown_check_after),
            session_renew_before_ms: ms(self.session_renew_before),
            rows_per_pass: self.rows_per_pass,
        }
    }
}

/// Errors starting the forwarder.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(#[from] TransportError),
}

/// Why an unknown-outcome check could not read what it compares.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The meter id is unknown.
    #[error(transparent)]
    MeterId(#[from] MeterIdError),
    /// The event summaries answered with this status.
    #[error("event summaries: http {0}")]
    Summaries(u16),
    /// The request failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

struct Shared<S: ?Sized> {
    cfg: ForwarderConfig,
    store: Arc<S>,
    client: Option<StripeClient>,
    clock: Arc<dyn Clock>,
    metrics: StripeMetrics,
    meter_ids: MeterIds,
    status: Mutex<ForwarderStatus>,
    wake: Notify,
}

/// The running forwarder, a [`crate::Destination`]. Dropping it aborts the task and every
/// request in flight (as a crash would); [`ForwarderHandle::shutdown`] stops it gracefully.
pub struct ForwarderHandle<S: OutboxStore + ?Sized> {
    shared: Arc<Shared<S>>,
    stop: Arc<Notify>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<S: OutboxStore + ?Sized> Drop for ForwarderHandle<S> {
    fn drop(&mut self) {
        if let Some(t) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
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
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True when an API key is configured (otherwise log-only).
    pub fn sends(&self) -> bool {
        self.shared.client.is_some()
    }

    /// Stops after the requests in flight have been answered.
    pub async fn shutdown(&self) {
        self.stop.notify_one();
        let t = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.await;
        }
    }
}

impl<S: OutboxStore + ?Sized> Destination for ForwarderHandle<S> {
    fn kind(&self) -> DestinationKind {
        DestinationKind::Stripe
    }

    fn notify(&self) {
        ForwarderHandle::notify(self);
    }

    fn status(&self) -> Status {
        Status::Stripe(ForwarderHandle::status(self))
    }

    /// Outbox rows in `state` (default `pending`) and counts over the whole outbox.
    fn list(
        &self,
        state: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Listing, DestinationError> {
        let state: OutboxState = match state {
            None => OutboxState::Pending,
            Some(s) => s.parse().map_err(|_| {
                DestinationError::InvalidState(String::from(
                    "state must be pending, unknown, sent or dead",
                ))
            })?,
        };
        let store = &self.shared.store;
        let data = store
            .list(state, after, limit)
            .map_err(DestinationError::Outbox)?;
        let stats = store.stats().map_err(DestinationError::Outbox)?;
        Ok(Listing::Stripe { data, stats })
    }

    /// Requeues the dead event of row `id` (every row of it, under a new identifier revision).
    fn retry(&self, id: u64) -> Result<Retried, DestinationError> {
        let rows = self
            .shared
            .store
            .requeue(id)
            .map_err(DestinationError::Outbox)?;
        ForwarderHandle::notify(self);
        Ok(Retried::Rows(rows))
    }

    fn shutdown(&self) -> crate::destination::Shutdown<'_> {
        Box::pin(ForwarderHandle::shutdown(self))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
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
    let shared = Arc::new(Shared {
        meter_ids: MeterIds::new(cfg.meter_ids.clone()),
        cfg,
        store,
        client,
        clock,
        metrics: metrics.unwrap_or_default(),
        status: Mutex::new(ForwarderStatus::default()),
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
        task: Mutex::new(Some(task)),
    })
}

/// What a finished task brings back to the machine.
enum Done {
    /// A v1 or stream answer (`None`: lost).
    Answer(JobId, Option<Answer>),
    /// The session answer.
    Session(Result<Result<(String, String), Answer>, ()>),
    /// An unknown-outcome check's reading.
    Check(JobId, GroupId, CheckReading),
}

/// What a task was for, to answer the machine if it panics.
#[derive(Clone, Copy)]
enum Pending {
    Answer(JobId),
    Session,
    Check(JobId, GroupId),
}

impl<S: OutboxStore + ?Sized> Shared<S> {
    fn note_error(&self, m: &mut Dispatcher, e: impl std::fmt::Display) {
        warn!(error = %e, "stripe forwarder");
        m.note_error(e);
    }

    fn publish(&self, m: &Dispatcher) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = m.status().clone();
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

    /// Reads pending rows as the scan says, and their customers' Stripe mapping.
    async fn scan(self: &Arc<Self>, scan: PlanScan) -> Result<ScannedRows, StoreError> {
        self.blocking(move |store| {
            let ns = store.namespace()?;
            // Open buckets become rows here, so the scan below sees them.
            store.seal_open(scan.limit)?;
            let mut rows = Vec::new();
            let mut after = scan.after;
            let mut reached_end = false;
            while rows.len() < scan.limit {
                let page = store.pending_rows(after, (scan.limit - rows.len()).min(10_000))?;
                let Some(last) = page.last() else {
                    reached_end = true;
                    break;
                };
                after = last.id;
                rows.extend(page);
            }
            // At most one entry per distinct customer of the scan.
            let mut mapping = BTreeMap::new();
            for r in &rows {
                if !mapping.contains_key(&r.customer) {
                    mapping.insert(r.customer.clone(), resolve_customer(store, &r.customer)?);
                }
            }
            Ok(ScannedRows {
                namespace: ns,
                rows,
                mapping,
                reached_end,
            })
        })
        .await
    }

    async fn refresh_gauges(self: &Arc<Self>, m: &mut Dispatcher) {
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
            Err(e) => self.note_error(m, e),
        }
    }

    /// Reads what the unknown-outcome check of `g` compares: Stripe's event summaries over the
    /// group's minute and the store's groups in it.
    async fn read_check(
        self: &Arc<Self>,
        client: &StripeClient,
        g: &EventGroup,
    ) -> Result<CheckReading, CheckError> {
        let meter = self.meter_ids.get(client, &g.event.event_name).await?;
        let start = g.event.timestamp_s - g.event.timestamp_s.rem_euclid(60);
        let end = start + 60;
        let summaries = client
            .event_summaries(&meter, &g.event.stripe_customer, start, end, None)
            .await?
            .map_err(|a| CheckError::Summaries(a.status))?;
        let stripe_total: Decimal = summaries.iter().map(|s| s.aggregated_value).sum();
        let (cust, name) = (g.event.stripe_customer.clone(), g.event.event_name.clone());
        let window = self
            .blocking(move |s| s.window_groups(&cust, &name, start, end))
            .await?;
        Ok(CheckReading::Read {
            stripe_total,
            window,
        })
    }

    /// Performs the machine's actions in order; a failed store action ends its job and skips
    /// the job's later actions.
    async fn perform(
        self: &Arc<Self>,
        m: &mut Dispatcher,
        actions: Vec<Action>,
        tasks: &mut JoinSet<Done>,
        pending: &mut HashMap<tokio::task::Id, Pending>,
    ) {
        let mut failed: Vec<JobId> = Vec::new();
        for action in actions {
            match action {
                Action::Store { job, op } => {
                    if job.is_some_and(|j| failed.contains(&j)) {
                        continue;
                    }
                    if let Err(e) = self.store_op(op).await {
                        self.note_error(m, e);
                        if let Some(j) = job {
                            failed.push(j);
                            m.on_store_failed(j);
                        }
                    }
                }
                Action::Send { job, request } => {
                    if job.is_some_and(|j| failed.contains(&j)) {
                        continue;
                    }
                    let Some(client) = self.client.clone() else {
                        continue;
                    };
                    let (kind, fut): (Pending, _) = match (job, request) {
                        (None, Request::Session { idempotency_key }) => (
                            Pending::Session,
                            Box::pin(async move {
                                Done::Session(match client.create_session(&idempotency_key).await {
                                    Ok(Ok(s)) => Ok(Ok((s.authentication_token, s.expires_at))),
                                    Ok(Err(a)) => Ok(Err(a)),
                                    Err(_) => Err(()),
                                })
                            })
                                as std::pin::Pin<Box<dyn Future<Output = Done> + Send>>,
                        ),
                        (
                            Some(j),
                            Request::V1 {
                                event,
                                idempotency_key,
                            },
                        ) => (
                            Pending::Answer(j),
                            Box::pin(async move {
                                let r = client.create_meter_event(&event, &idempotency_key).await;
                                if let Err(e) = &r {
                                    debug!(identifier = %event.identifier, error = %e, "meter event outcome unknown");
                                }
                                Done::Answer(j, r.ok())
                            }),
                        ),
                        (
                            Some(j),
                            Request::Stream {
                                token,
                                events,
                                idempotency_key,
                            },
                        ) => (
                            Pending::Answer(j),
                            Box::pin(async move {
                                let r = client.send_stream(&token, &events, &idempotency_key).await;
                                Done::Answer(j, r.ok())
                            }),
                        ),
                        _ => continue,
                    };
                    let h = tasks.spawn(fut);
                    pending.insert(h.id(), kind);
                }
                Action::Check { job, group } => {
                    let Some(client) = self.client.clone() else {
                        continue;
                    };
                    let me = self.clone();
                    let gid = group.id;
                    let h = tasks.spawn(async move {
                        let reading = match me.read_check(&client, &group).await {
                            Ok(r) => r,
                            Err(e) => CheckReading::Failed(e.to_string()),
                        };
                        Done::Check(job, gid, reading)
                    });
                    pending.insert(h.id(), Pending::Check(job, gid));
                }
                Action::Log(g) => info!(
                    identifier = %g.event.identifier,
                    customer = %g.event.stripe_customer,
                    event_name = %g.event.event_name,
                    timestamp = g.event.timestamp_s,
                    value = g.event.value,
                    "stripe log-only: would send meter event"
                ),
            }
        }
    }

    async fn store_op(self: &Arc<Self>, op: StoreOp) -> Result<(), StoreError> {
        match op {
            StoreOp::CreateGroups(groups) => {
                let n = groups.len();
                self.blocking(move |s| s.create_groups(groups).map(|_| ()))
                    .await?;
                debug!(groups = n, "stripe outbox rows grouped");
                Ok(())
            }
            StoreOp::RecordAttempt {
                ids,
                now_ms,
                lease_until_ms,
            } => {
                self.blocking(move |s| s.record_attempt(&ids, now_ms, lease_until_ms))
                    .await
            }
            StoreOp::MarkSent(ids) => self.blocking(move |s| s.mark_sent(&ids)).await,
            StoreOp::MarkRetry {
                id,
                at_ms,
                unknown,
                error,
            } => {
                self.blocking(move |s| s.mark_retry(id, at_ms, unknown, error))
                    .await
            }
            StoreOp::MarkDead { id, error } => {
                warn!(code = %error.code, status = error.status, group = id, "stripe rejected meter event: dead letter");
                self.blocking(move |s| s.mark_dead(id, error)).await
            }
        }
    }

    /// Hands a finished task's result to the machine.
    fn on_done(&self, m: &mut Dispatcher, done: Done) -> Vec<Action> {
        let now = self.clock.now_ms();
        match done {
            Done::Answer(job, answer) => {
                self.metrics.request(answer.as_ref().map(|a| a.status));
                m.on_answer(now, job, answer)
            }
            Done::Session(r) => {
                self.metrics.request(match &r {
                    Ok(Ok(_)) => Some(200),
                    Ok(Err(a)) => Some(a.status),
                    Err(()) => None,
                });
                if let Ok(Ok((_, expires_at))) = &r {
                    debug!(%expires_at, "meter event session created");
                }
                m.on_session(now, r)
            }
            Done::Check(job, group, reading) => {
                if let CheckReading::Failed(e) = &reading {
                    warn!(error = %e, "stripe forwarder: unknown-outcome check");
                }
                let out = m.on_check(now, job, group, reading);
                for a in &out {
                    if let Action::Store {
                        op: StoreOp::MarkSent(ids),
                        ..
                    } = a
                    {
                        info!(
                            groups = ids.len(),
                            "unknown outcome found delivered in event summaries"
                        );
                    }
                    if let Action::Store {
                        op: StoreOp::MarkRetry { id, .. },
                        ..
                    } = a
                    {
                        warn!(
                            group = id,
                            "unknown outcome could not be decided from event summaries; checking again in an hour"
                        );
                    }
                }
                out
            }
        }
    }
}

async fn run<S: OutboxStore + ?Sized>(shared: Arc<Shared<S>>, stop: Arc<Notify>) {
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let clock = shared.clock.clone();
    let mut m = Dispatcher::new(
        shared.cfg.dispatch(),
        clock.now_ms(),
        u64::from_le_bytes(seed),
    );
    let mut tasks: JoinSet<Done> = JoinSet::new();
    let mut pending: HashMap<tokio::task::Id, Pending> = HashMap::new();
    let poll_ms = i64::try_from(shared.cfg.poll_interval.as_millis()).unwrap_or(i64::MAX / 4);
    loop {
        let now = clock.now_ms();
        if let Some(scan) = m.plan_due(now) {
            match shared.scan(scan).await {
                Ok(scanned) => {
                    let (create, publish) = m.on_rows(now, scanned);
                    if let Some(a) = create {
                        shared
                            .perform(&mut m, vec![a], &mut tasks, &mut pending)
                            .await;
                    }
                    if let Some(unmapped) = publish {
                        let rows: u64 = unmapped.values().sum();
                        shared
                            .metrics
                            .outbox_unmapped
                            .set(i64::try_from(rows).unwrap_or(i64::MAX));
                    }
                }
                Err(e) => {
                    shared.note_error(&mut m, e);
                    m.on_plan_failed(now);
                }
            }
        }
        if m.gauges_due(clock.now_ms()) {
            shared.refresh_gauges(&mut m).await;
            m.gauges_refreshed(clock.now_ms());
        }
        if let Some(limit) = m.ready_limit() {
            let now = clock.now_ms();
            match shared.blocking(move |s| s.ready_groups(now, limit)).await {
                Ok(ready) => {
                    let actions = m.on_ready(now, ready);
                    shared
                        .perform(&mut m, actions, &mut tasks, &mut pending)
                        .await;
                }
                Err(e) => shared.note_error(&mut m, e),
            }
        }
        let actions = m.on_timeout(clock.now_ms());
        shared
            .perform(&mut m, actions, &mut tasks, &mut pending)
            .await;
        shared.publish(&m);
        if m.is_done() && tasks.is_empty() {
            break;
        }
        let wait = (m.poll_timeout() - clock.now_ms()).clamp(0, poll_ms.max(1));
        tokio::select! {
            _ = stop.notified() => m.stop(),
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let mut finished = vec![done];
                while let Some(more) = tasks.try_join_next_with_id() {
                    finished.push(more);
                }
                for f in finished {
                    let done = match f {
                        Ok((id, done)) => {
                            pending.remove(&id);
                            done
                        }
                        Err(e) => {
                            // A panicked task: the machine hears of it as a lost answer.
                            shared.note_error(&mut m, format!("stripe task: {e}"));
                            match pending.remove(&e.id()) {
                                Some(Pending::Answer(j)) => Done::Answer(j, None),
                                Some(Pending::Session) => Done::Session(Err(())),
                                Some(Pending::Check(j, g)) => {
                                    Done::Check(j, g, CheckReading::Failed("task failed".into()))
                                }
                                None => continue,
                            }
                        }
                    };
                    let actions = shared.on_done(&mut m, done);
                    shared.perform(&mut m, actions, &mut tasks, &mut pending).await;
                }
            }
            _ = shared.wake.notified() => m.wake(clock.now_ms()),
            _ = tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))) => {}
        }
    }
    shared.refresh_gauges(&mut m).await;
    shared.publish(&m);
}
