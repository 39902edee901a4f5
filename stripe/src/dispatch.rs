//! The forwarder's decisions as a sans-IO state machine, in the spirit of `quinn-proto`.
//!
//! Inputs: `now_ms`, what the shell read from the store (pending rows scanned, ready groups),
//! HTTP answers (an [`Answer`] or a lost one), session answers and unknown-outcome check
//! readings. Outputs ([`Action`]): store actions (persist groups before any send, record the
//! attempt and its lease, mark sent / retry at / dead), requests to send (v1 form, v2 stream or
//! session, each with its identifier(s) and idempotency key), unknown-outcome checks to run, and
//! the next timer ([`Dispatcher::poll_timeout`]). No sockets, clocks, tasks or store calls here:
//! `crate::forwarder` (the tokio shell) performs the actions in order and feeds the results back.
//!
//! Rules it owns:
//! - **One in flight per key**: v1 sends at most one request per (Stripe customer, event name)
//!   at a time; a group is in at most one job; at most `max_in_flight` jobs.
//! - **Attempt before send**: every send is preceded by [`StoreOp::RecordAttempt`] (the lease),
//!   and a group is always sent under its one persisted identifier; the v1 idempotency key is
//!   `{identifier}-a{attempt}`.
//! - **Retry classes** ([`crate::retry::classify`]) with exponential backoff and jitter; a lost
//!   answer is an unknown outcome, retried under the same identifier.
//! - **The 23-hour rule**: an unknown group whose first attempt is older than
//!   `unknown_check_after` is checked against event summaries ([`Action::Check`], decided by
//!   [`decide_check`]) before it is sent again.
//! - **v2 sessions**: one session at a time, renewed `session_renew_before` its expiry and on
//!   `temporary_session_expired` (at most twice per stream request); a rejected stream of several
//!   events is resent one event at a time so one bad event cannot dead-letter the others.
//! - **Pacing**: every request takes a token from a [`TokenBucket`]; the wait is a timer.
//!
//! Limits: jobs ≤ `max_in_flight`, events per job ≤ [`crate::STREAM_EVENTS_MAX`], the groups
//! logged in log-only mode ≤ [`LOGGED_MAX`] (the oldest are forgotten first, so a group may be
//! logged again after that many others).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use rust_decimal::Decimal;

use crate::client::MeterEvent;
use crate::outbox::{EventGroup, GroupId, GroupState, NewGroup, OutboxRow, StripeError};
use crate::plan::plan_groups;
use crate::retry::{Answer, Backoff, Outcome, TokenBucket, classify};
use crate::time::parse_rfc3339;

/// Which Stripe API carries meter events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Api {
    /// `POST /v1/billing/meter_events` (default).
    #[default]
    V1,
    /// v2 meter event session + stream.
    V2,
}

/// An `--stripe-api` value other than `v1` or `v2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stripe api {0:?}: expected v1 or v2")]
pub struct ParseApiError(pub String);

impl std::str::FromStr for Api {
    type Err = ParseApiError;
    /// `v1` or `v2` (the `--stripe-api` flag).
    fn from_str(s: &str) -> Result<Self, ParseApiError> {
        match s {
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            other => Err(ParseApiError(other.to_owned())),
        }
    }
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

/// Most groups remembered as already logged in log-only mode.
pub const LOGGED_MAX: usize = 100_000;

/// How long an undecided unknown-outcome check waits before the next one.
pub const UNDECIDED_RECHECK_MS: i64 = 3_600_000;

/// How often the outbox gauges are refreshed.
pub const GAUGE_INTERVAL_MS: i64 = 1_000;

/// Longest a v2 session is trusted, whatever Stripe says.
const SESSION_CAP_MS: i64 = 15 * 60 * 1000;

/// Stream sends per request while the session keeps expiring.
const STREAM_TRIES: u32 = 3;

/// A job: one v1 group or one v2 chunk in flight.
pub type JobId = u64;

/// The machine's settings (from [`crate::ForwarderConfig`]).
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// v1 or v2.
    pub api: Api,
    /// Whether there is an API key; without one groups are only logged.
    pub live: bool,
    /// Requests per second (and burst).
    pub rate_per_s: u32,
    /// Most jobs in flight.
    pub max_in_flight: usize,
    /// Planning pass interval.
    pub poll_interval_ms: i64,
    /// Per-request timeout (the lease adds one second).
    pub request_timeout_ms: i64,
    /// Retry backoff.
    pub backoff: Backoff,
    /// The unknown-outcome age that triggers a check (23 h).
    pub unknown_check_after_ms: i64,
    /// Renew the v2 session this long before it expires.
    pub session_renew_before_ms: i64,
    /// Rows scanned per planning pass.
    pub rows_per_pass: usize,
}

/// A store action. The shell performs it before any later action of the same job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Persist these groups (all or none) — their identifiers are fixed from here on.
    CreateGroups(Vec<NewGroup>),
    /// `attempts + 1` and the lease, before the send.
    RecordAttempt {
        /// Groups about to be sent.
        ids: Vec<GroupId>,
        /// Now.
        now_ms: i64,
        /// Lease end.
        lease_until_ms: i64,
    },
    /// Delivered.
    MarkSent(Vec<GroupId>),
    /// Try again at `at_ms`.
    MarkRetry {
        /// Group.
        id: GroupId,
        /// Not before.
        at_ms: i64,
        /// Outcome unknown.
        unknown: bool,
        /// Stripe's error, if any.
        error: Option<StripeError>,
    },
    /// Dead letter.
    MarkDead {
        /// Group.
        id: GroupId,
        /// Stripe's error.
        error: StripeError,
    },
}

/// A request for the HTTP shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `POST /v1/billing/meter_events`.
    V1 {
        /// The event (its identifier is the group's).
        event: MeterEvent,
        /// `Idempotency-Key`.
        idempotency_key: String,
    },
    /// `POST /v2/billing/meter_event_session`.
    Session {
        /// `Idempotency-Key`.
        idempotency_key: String,
    },
    /// `POST /v2/billing/meter_event_stream`.
    Stream {
        /// Session token.
        token: String,
        /// Events (identifiers are the groups').
        events: Vec<MeterEvent>,
        /// `Idempotency-Key`.
        idempotency_key: String,
    },
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A store action; `job` is the job it belongs to (if it fails, tell
    /// [`Dispatcher::on_store_failed`] and skip that job's later actions).
    Store {
        /// Owning job.
        job: Option<JobId>,
        /// What to do.
        op: StoreOp,
    },
    /// Send a request and report its answer with [`Dispatcher::on_answer`] (or
    /// [`Dispatcher::on_session`] for a session request).
    Send {
        /// Owning job (`None` for a session request).
        job: Option<JobId>,
        /// The request.
        request: Request,
    },
    /// Read Stripe's event summaries for the group's minute and the store's groups in it, then
    /// call [`Dispatcher::on_check`].
    Check {
        /// Owning job.
        job: JobId,
        /// The unknown group.
        group: EventGroup,
    },
    /// Log-only mode: log the group as "would send".
    Log(EventGroup),
}

/// What the shell read for an unknown-outcome check.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckReading {
    /// Stripe's total for the window and every stored group in it.
    Read {
        /// Σ aggregated value in Stripe's event summaries.
        stripe_total: Decimal,
        /// The store's groups for the same customer, event and window.
        window: Vec<EventGroup>,
    },
    /// Stripe or the store could not be read (no meter id, an error): why.
    Failed(String),
}

/// What an unknown-outcome check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Stripe has these groups (all unknown ones in the window).
    Delivered(Vec<GroupId>),
    /// Stripe has none of the unknown ones: send.
    NotDelivered,
    /// Neither explains Stripe's total (eventual consistency, foreign events): wait.
    Undecided,
}

/// The unknown-outcome decision for `g`: Stripe's total over the window is compared with what
/// we know was delivered there plus every group whose outcome is unknown.
pub fn decide_check(g: &EventGroup, stripe_total: Decimal, window: &[EventGroup]) -> Check {
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
    if stripe_total == Decimal::from(sent) + Decimal::from(unknown_sum) {
        Check::Delivered(unknown.into_iter().map(|(id, _)| id).collect())
    } else if stripe_total == Decimal::from(sent) {
        Check::NotDelivered
    } else {
        Check::Undecided
    }
}

/// The meter event a group is sent as.
pub fn to_event(g: &EventGroup) -> MeterEvent {
    MeterEvent {
        event_name: g.event.event_name.clone(),
        identifier: g.event.identifier.clone(),
        timestamp_s: g.event.timestamp_s,
        stripe_customer: g.event.stripe_customer.clone(),
        value: g.event.value,
    }
}

/// What a planning scan read from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScannedRows {
    /// The store's namespace (part of every identifier).
    pub namespace: String,
    /// Pending rows, ascending id.
    pub rows: Vec<OutboxRow>,
    /// Each row customer's Stripe customer (`None`: not mapped yet).
    pub mapping: BTreeMap<String, Option<String>>,
    /// Whether the scan reached the end of the outbox.
    pub reached_end: bool,
}

/// A planning scan to run: pending rows with `id > after`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanScan {
    /// Resume after this row id.
    pub after: u64,
    /// Most rows.
    pub limit: usize,
}

/// A set that forgets its oldest member at its limit.
#[derive(Debug)]
pub struct BoundedSet {
    limit: usize,
    order: VecDeque<GroupId>,
    members: HashSet<GroupId>,
}

impl BoundedSet {
    /// An empty set holding at most `limit` (≥ 1) ids.
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            order: VecDeque::new(),
            members: HashSet::new(),
        }
    }

    /// Inserts `id`; false if it was there. At the limit the oldest id is forgotten.
    pub fn insert(&mut self, id: GroupId) -> bool {
        if !self.members.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.limit
            && let Some(old) = self.order.pop_front()
        {
            self.members.remove(&old);
        }
        assert!(self.order.len() <= self.limit && self.members.len() == self.order.len());
        true
    }

    /// How many ids it holds.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

type Key = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Unknown-outcome checks outstanding.
    Checking(usize),
    /// Waiting for a v2 session.
    Session,
    /// Waiting for a token.
    Token,
    /// A request is in flight.
    Sending,
}

#[derive(Debug)]
struct Job {
    /// Groups still to be sent (a check may remove some).
    groups: Vec<EventGroup>,
    /// Every group the job holds busy, released when it ends.
    holds: Vec<GroupId>,
    key: Option<Key>,
    phase: Phase,
    attempted: bool,
    /// v2: session renewals for the current stream request.
    tries: u32,
    /// v2: resending one event at a time, at this index.
    isolating: Option<usize>,
}

#[derive(Debug)]
struct Session {
    token: String,
    expires_ms: i64,
}

/// The forwarder's dispatch state machine.
#[derive(Debug)]
pub struct Dispatcher {
    cfg: DispatchConfig,
    bucket: TokenBucket,
    rng: u64,
    session: Option<Session>,
    session_in_flight: bool,
    jobs: BTreeMap<JobId, Job>,
    next_job: JobId,
    /// Jobs waiting for a token, in order.
    token_queue: VecDeque<JobId>,
    /// A session request waits for a token.
    session_wants_token: bool,
    token_at_ms: Option<i64>,
    busy_keys: HashSet<Key>,
    busy_groups: HashSet<GroupId>,
    logged: BoundedSet,
    next_plan_ms: i64,
    next_gauges_ms: i64,
    plan_after: u64,
    unmapped: BTreeMap<String, u64>,
    status: ForwarderStatus,
    stopping: bool,
}

impl Dispatcher {
    /// A machine at `now_ms`; `seed` drives jitter and idempotency keys.
    pub fn new(cfg: DispatchConfig, now_ms: i64, seed: u64) -> Self {
        let rate = cfg.rate_per_s;
        Self {
            bucket: TokenBucket::new(rate, rate, now_ms),
            cfg,
            rng: seed | 1,
            session: None,
            session_in_flight: false,
            jobs: BTreeMap::new(),
            next_job: 1,
            token_queue: VecDeque::new(),
            session_wants_token: false,
            token_at_ms: None,
            busy_keys: HashSet::new(),
            busy_groups: HashSet::new(),
            logged: BoundedSet::new(LOGGED_MAX),
            next_plan_ms: now_ms,
            next_gauges_ms: now_ms,
            plan_after: 0,
            unmapped: BTreeMap::new(),
            status: ForwarderStatus::default(),
            stopping: false,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*; quality is plenty for jitter and idempotency keys.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Counters and the last error, for the API.
    pub fn status(&self) -> &ForwarderStatus {
        &self.status
    }

    /// Records an error for operators.
    pub fn note_error(&mut self, error: impl std::fmt::Display) {
        self.status.last_error = Some(error.to_string());
    }

    /// Jobs in flight.
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Groups remembered as logged (log-only mode).
    pub fn logged_len(&self) -> usize {
        self.logged.len()
    }

    /// Plan now (after new outbox rows or a mapping change).
    pub fn wake(&mut self, now_ms: i64) {
        self.next_plan_ms = self.next_plan_ms.min(now_ms);
    }

    /// Stop planning and starting jobs; [`Dispatcher::is_done`] once the jobs have ended.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// Stopped and nothing in flight.
    pub fn is_done(&self) -> bool {
        self.stopping && self.jobs.is_empty() && !self.session_in_flight
    }

    /// The next time something is due (plan pass, gauges, a token).
    pub fn poll_timeout(&self) -> i64 {
        let mut t = self.next_gauges_ms;
        if !self.stopping {
            t = t.min(self.next_plan_ms);
        }
        if let Some(at) = self.token_at_ms {
            t = t.min(at);
        }
        t
    }

    /// Whether the gauges are due; call [`Dispatcher::gauges_refreshed`] after reading them.
    pub fn gauges_due(&self, now_ms: i64) -> bool {
        now_ms >= self.next_gauges_ms
    }

    /// The gauges were read.
    pub fn gauges_refreshed(&mut self, now_ms: i64) {
        self.next_gauges_ms = now_ms + GAUGE_INTERVAL_MS;
    }

    /// The planning scan due now, if any. Each pass scans at most `rows_per_pass` rows,
    /// resuming where the last stopped, so a backlog of unmapped rows cannot starve newer ones.
    pub fn plan_due(&self, now_ms: i64) -> Option<PlanScan> {
        (!self.stopping && now_ms >= self.next_plan_ms).then(|| PlanScan {
            after: self.plan_after,
            limit: self.cfg.rows_per_pass.max(1),
        })
    }

    /// The scan ran: groups the pending rows ([`crate::plan`]) under the store's namespace with
    /// the customers' mapping. Returns the store action persisting the groups — their
    /// identifiers fixed before any send — and, each time a scan reaches the end of the outbox,
    /// the rows left for want of a mapping, per customer, to publish.
    pub fn on_rows(
        &mut self,
        now_ms: i64,
        scanned: ScannedRows,
    ) -> (Option<Action>, Option<BTreeMap<String, u64>>) {
        self.next_plan_ms = now_ms + self.cfg.poll_interval_ms;
        let last = scanned.rows.last().map_or(self.plan_after, |r| r.id);
        let plan = plan_groups(&scanned.namespace, &scanned.rows, |c| {
            scanned.mapping.get(c).cloned().flatten()
        });
        let (groups, reached_end) = (plan.groups, scanned.reached_end);
        for (k, v) in plan.unmapped {
            *self.unmapped.entry(k).or_insert(0) += v;
        }
        let publish = if reached_end {
            self.plan_after = 0;
            let u = std::mem::take(&mut self.unmapped);
            self.status.unmapped = u.clone();
            Some(u)
        } else {
            self.plan_after = last;
            None
        };
        let create = (!groups.is_empty()).then_some(Action::Store {
            job: None,
            op: StoreOp::CreateGroups(groups),
        });
        (create, publish)
    }

    /// The planning scan failed: try again after the poll interval.
    pub fn on_plan_failed(&mut self, now_ms: i64) {
        self.next_plan_ms = now_ms + self.cfg.poll_interval_ms;
    }

    /// How many ready groups to read now, `None` when no job can start.
    pub fn ready_limit(&self) -> Option<usize> {
        if self.stopping {
            return None;
        }
        let free = self.cfg.max_in_flight.saturating_sub(self.jobs.len());
        if free == 0 {
            return None;
        }
        let per = if self.cfg.api == Api::V2 {
            crate::STREAM_EVENTS_MAX
        } else {
            1
        };
        Some(self.busy_groups.len() + free * per * 4 + 100)
    }

    /// Ready groups read from the store: starts jobs (or logs, without a key).
    pub fn on_ready(&mut self, now_ms: i64, ready: Vec<EventGroup>) -> Vec<Action> {
        let mut out = Vec::new();
        let free = self.cfg.max_in_flight.saturating_sub(self.jobs.len());
        if self.stopping || free == 0 {
            return out;
        }
        let ready: Vec<EventGroup> = ready
            .into_iter()
            .filter(|g| g.state.is_open() && !self.busy_groups.contains(&g.id))
            .collect();
        if !self.cfg.live {
            for g in ready {
                if self.logged.insert(g.id) {
                    out.push(Action::Log(g));
                }
            }
            return out;
        }
        match self.cfg.api {
            Api::V1 => {
                let mut started = 0;
                for g in ready {
                    if started >= free {
                        break;
                    }
                    let key = (g.event.stripe_customer.clone(), g.event.event_name.clone());
                    if self.busy_keys.contains(&key) {
                        continue;
                    }
                    self.busy_keys.insert(key.clone());
                    self.start(now_ms, vec![g], Some(key), &mut out);
                    started += 1;
                }
            }
            Api::V2 => {
                let mut iter = ready.into_iter();
                for _ in 0..free {
                    let chunk: Vec<EventGroup> =
                        iter.by_ref().take(crate::STREAM_EVENTS_MAX).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    self.start(now_ms, chunk, None, &mut out);
                }
            }
        }
        self.assert_bounds();
        out
    }

    fn start(
        &mut self,
        now_ms: i64,
        groups: Vec<EventGroup>,
        key: Option<Key>,
        out: &mut Vec<Action>,
    ) {
        let id = self.next_job;
        self.next_job += 1;
        let holds: Vec<GroupId> = groups.iter().map(|g| g.id).collect();
        for g in &holds {
            assert!(self.busy_groups.insert(*g), "a group is in one job at most");
        }
        let checks: Vec<EventGroup> = groups
            .iter()
            .filter(|g| self.needs_check(g, now_ms))
            .cloned()
            .collect();
        let job = Job {
            groups,
            holds,
            key,
            phase: Phase::Checking(checks.len()),
            attempted: false,
            tries: 0,
            isolating: None,
        };
        self.jobs.insert(id, job);
        if checks.is_empty() {
            self.advance(now_ms, id, out);
        } else {
            out.extend(
                checks
                    .into_iter()
                    .map(|group| Action::Check { job: id, group }),
            );
        }
    }

    fn needs_check(&self, g: &EventGroup, now_ms: i64) -> bool {
        g.state == GroupState::Unknown
            && g.first_attempt_ms
                .is_some_and(|t| now_ms - t > self.cfg.unknown_check_after_ms)
    }

    /// An unknown-outcome check's reading for `group` of `job`.
    pub fn on_check(
        &mut self,
        now_ms: i64,
        job: JobId,
        group: GroupId,
        reading: CheckReading,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(j) = self.jobs.get_mut(&job) else {
            return out;
        };
        let Phase::Checking(n) = j.phase else {
            return out;
        };
        j.phase = Phase::Checking(n.saturating_sub(1));
        // (A group found delivered by another group's check has left the job already.)
        let check = match j.groups.iter().position(|g| g.id == group) {
            None => Check::NotDelivered,
            Some(pos) => match reading {
                CheckReading::Read {
                    stripe_total,
                    window,
                } => decide_check(&j.groups[pos], stripe_total, &window),
                CheckReading::Failed(e) => {
                    self.status.last_error = Some(e);
                    Check::Undecided
                }
            },
        };
        match check {
            Check::Delivered(ids) => {
                j.groups.retain(|g| !ids.contains(&g.id));
                self.status.resolved_by_check += ids.len() as u64;
                out.push(Action::Store {
                    job: Some(job),
                    op: StoreOp::MarkSent(ids),
                });
            }
            Check::NotDelivered => {}
            Check::Undecided => {
                j.groups.retain(|g| g.id != group);
                self.status.inconclusive_checks += 1;
                out.push(Action::Store {
                    job: Some(job),
                    op: StoreOp::MarkRetry {
                        id: group,
                        at_ms: now_ms + UNDECIDED_RECHECK_MS,
                        unknown: true,
                        error: None,
                    },
                });
            }
        }
        if n <= 1 {
            self.advance(now_ms, job, &mut out);
        }
        self.assert_bounds();
        out
    }

    /// Moves a job whose checks are done (or whose session/token arrived) toward its send.
    fn advance(&mut self, now_ms: i64, job: JobId, out: &mut Vec<Action>) {
        let session_valid = self.session_valid(now_ms);
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.groups.is_empty() {
            self.finish(job);
            return;
        }
        if self.cfg.api == Api::V2 && !session_valid {
            j.phase = Phase::Session;
            self.request_session(now_ms, out);
            return;
        }
        j.phase = Phase::Token;
        self.token_queue.push_back(job);
        self.pump(now_ms, out);
    }

    fn session_valid(&self, now_ms: i64) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.expires_ms - self.cfg.session_renew_before_ms > now_ms)
    }

    fn request_session(&mut self, now_ms: i64, out: &mut Vec<Action>) {
        if self.session_in_flight || self.session_wants_token {
            return;
        }
        self.session_wants_token = true;
        self.pump(now_ms, out);
    }

    /// Hands out tokens: the session request first, then jobs in order.
    fn pump(&mut self, now_ms: i64, out: &mut Vec<Action>) {
        self.token_at_ms = None;
        loop {
            if !self.session_wants_token && self.token_queue.is_empty() {
                return;
            }
            if let Err(wait) = self.bucket.try_take(now_ms) {
                let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 4);
                self.token_at_ms = Some(now_ms + ms.max(1));
                return;
            }
            if self.session_wants_token {
                self.session_wants_token = false;
                self.session_in_flight = true;
                let idempotency_key = format!("tally-session-{:016x}", self.random());
                out.push(Action::Send {
                    job: None,
                    request: Request::Session { idempotency_key },
                });
                continue;
            }
            let Some(job) = self.token_queue.pop_front() else {
                return;
            };
            self.send(now_ms, job, out);
        }
    }

    /// A token is held: record the attempt (first send of the job) and send.
    fn send(&mut self, now_ms: i64, job: JobId, out: &mut Vec<Action>) {
        let lease = now_ms + self.cfg.request_timeout_ms + 1000;
        let api = self.cfg.api;
        let stream_key = format!("tally-stream-{:016x}", self.random());
        let token = self.session.as_ref().map(|s| s.token.clone());
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if !j.attempted {
            j.attempted = true;
            out.push(Action::Store {
                job: Some(job),
                op: StoreOp::RecordAttempt {
                    ids: j.groups.iter().map(|g| g.id).collect(),
                    now_ms,
                    lease_until_ms: lease,
                },
            });
        }
        j.phase = Phase::Sending;
        let request = match api {
            Api::V1 => {
                let g = &j.groups[0];
                Request::V1 {
                    event: to_event(g),
                    idempotency_key: format!("{}-a{}", g.event.identifier, g.attempts + 1),
                }
            }
            Api::V2 => {
                let events = match j.isolating {
                    Some(i) => vec![to_event(&j.groups[i])],
                    None => j.groups.iter().map(to_event).collect(),
                };
                Request::Stream {
                    token: token.unwrap_or_default(),
                    events,
                    idempotency_key: stream_key,
                }
            }
        };
        out.push(Action::Send {
            job: Some(job),
            request,
        });
    }

    /// Timers: hands out tokens that became available.
    pub fn on_timeout(&mut self, now_ms: i64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.token_at_ms.is_some_and(|t| now_ms >= t) {
            self.pump(now_ms, &mut out);
        }
        self.assert_bounds();
        out
    }

    /// The answer to a v1 or stream request of `job`; `None` when it was lost (timeout, dropped
    /// connection, unreadable body): the outcome is unknown.
    pub fn on_answer(&mut self, now_ms: i64, job: JobId, answer: Option<Answer>) -> Vec<Action> {
        let mut out = Vec::new();
        self.status.requests += 1;
        let Some(j) = self.jobs.get_mut(&job) else {
            return out;
        };
        let lost = Outcome::Retry {
            after: None,
            unknown: true,
            error: None,
        };
        match self.cfg.api {
            Api::V1 => {
                let outcome = match &answer {
                    Some(a) => classify(a, j.groups.first().map(|g| g.event.identifier.as_str())),
                    None => lost,
                };
                let groups = std::mem::take(&mut j.groups);
                self.settle(now_ms, job, &groups, outcome, &mut out);
                self.finish(job);
            }
            Api::V2 => {
                let outcome = match &answer {
                    // Any 401 on the stream is about the session token, never the events.
                    Some(a) if a.status == 401 => Outcome::SessionExpired,
                    Some(a) => classify(a, None),
                    None => lost,
                };
                if outcome == Outcome::SessionExpired {
                    self.session = None;
                    j.tries += 1;
                    if j.tries < STREAM_TRIES {
                        self.advance(now_ms, job, &mut out);
                        return out;
                    }
                }
                self.stream_done(now_ms, job, outcome, &mut out);
            }
        }
        self.assert_bounds();
        out
    }

    /// One stream request of a v2 job ended with `outcome`.
    fn stream_done(&mut self, now_ms: i64, job: JobId, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        j.tries = 0;
        match j.isolating {
            None if matches!(outcome, Outcome::Dead(_)) && j.groups.len() > 1 => {
                // One bad event must not dead-letter the other 99: resend each on its own (same
                // identifiers, so nothing can count twice) and keep each event's own outcome.
                j.isolating = Some(0);
                self.advance(now_ms, job, out);
            }
            None => {
                let groups = std::mem::take(&mut j.groups);
                self.settle(now_ms, job, &groups, outcome, out);
                self.finish(job);
            }
            Some(i) => {
                let g = j.groups[i].clone();
                let more = i + 1 < j.groups.len();
                j.isolating = Some(i + 1);
                self.settle(now_ms, job, std::slice::from_ref(&g), outcome, out);
                if more {
                    self.advance(now_ms, job, out);
                } else {
                    self.finish(job);
                }
            }
        }
    }

    /// The answer to the session request: `Ok(Ok((token, expires_at)))`, Stripe's refusal, or
    /// `Err(())` when the answer was lost.
    pub fn on_session(
        &mut self,
        now_ms: i64,
        answer: Result<Result<(String, String), Answer>, ()>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.status.requests += 1;
        self.session_in_flight = false;
        let waiting: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.phase == Phase::Session)
            .map(|(id, _)| *id)
            .collect();
        let failure = match answer {
            Ok(Ok((token, expires_at))) => {
                let cap = now_ms + SESSION_CAP_MS;
                let expires_ms = parse_rfc3339(&expires_at).map_or(cap, |t| (t * 1000).min(cap));
                self.session = Some(Session { token, expires_ms });
                None
            }
            // Nothing was sent: not an unknown outcome for the events.
            Ok(Err(a)) => Some(match classify(&a, None) {
                Outcome::Retry { after, error, .. } => Outcome::Retry {
                    after,
                    unknown: false,
                    error,
                },
                other => other,
            }),
            Err(()) => Some(Outcome::Retry {
                after: None,
                unknown: false,
                error: None,
            }),
        };
        for job in waiting {
            match &failure {
                None => {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.phase = Phase::Token;
                        self.token_queue.push_back(job);
                    }
                }
                Some(o) => self.stream_done(now_ms, job, o.clone(), &mut out),
            }
        }
        self.pump(now_ms, &mut out);
        self.assert_bounds();
        out
    }

    /// A store action of `job` failed: the job ends (its leases protect the groups).
    pub fn on_store_failed(&mut self, job: JobId) {
        self.token_queue.retain(|j| *j != job);
        self.finish(job);
    }

    fn retry_at(&mut self, now_ms: i64, attempts: u32, after: Option<Duration>) -> i64 {
        let random = self.random();
        let d = self.cfg.backoff.delay(attempts.saturating_sub(1), random);
        let d = after.map_or(d, |a| a.max(d));
        now_ms + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// Records what one request's outcome means for its groups.
    fn settle(
        &mut self,
        now_ms: i64,
        job: JobId,
        groups: &[EventGroup],
        outcome: Outcome,
        out: &mut Vec<Action>,
    ) {
        let store = |op| Action::Store { job: Some(job), op };
        match outcome {
            Outcome::Delivered => out.push(store(StoreOp::MarkSent(
                groups.iter().map(|g| g.id).collect(),
            ))),
            Outcome::Retry {
                after,
                unknown,
                error,
            } => {
                let attempts = groups.iter().map(|g| g.attempts + 1).max().unwrap_or(1);
                let at_ms = self.retry_at(now_ms, attempts, after);
                for g in groups {
                    out.push(store(StoreOp::MarkRetry {
                        id: g.id,
                        at_ms,
                        unknown,
                        error: error.clone(),
                    }));
                }
            }
            Outcome::SessionExpired => {
                for g in groups {
                    out.push(store(StoreOp::MarkRetry {
                        id: g.id,
                        at_ms: now_ms,
                        unknown: false,
                        error: None,
                    }));
                }
            }
            Outcome::Dead(err) => {
                for g in groups {
                    let mut e = err.clone();
                    if g.state == GroupState::Unknown {
                        // An earlier send may have been delivered: a blind retry (new
                        // identifier) could count twice. Say so where the operator looks.
                        e.message = format!(
                            "{} [an earlier send's outcome is unknown: check event summaries before retrying]",
                            e.message
                        );
                    }
                    out.push(store(StoreOp::MarkDead { id: g.id, error: e }));
                }
            }
        }
    }

    /// The bounds every public entry point leaves in place.
    fn assert_bounds(&self) {
        assert!(
            self.jobs.len() <= self.cfg.max_in_flight.max(1),
            "jobs ≤ max_in_flight"
        );
        assert!(
            self.token_queue.len() <= self.jobs.len(),
            "token queue ≤ jobs"
        );
        assert!(
            self.busy_keys.len() <= self.jobs.len(),
            "one key per v1 job"
        );
        assert!(
            self.busy_groups.len() <= self.jobs.len() * crate::STREAM_EVENTS_MAX,
            "groups held ≤ jobs × events per job"
        );
    }

    fn finish(&mut self, job: JobId) {
        let Some(j) = self.jobs.remove(&job) else {
            return;
        };
        for g in &j.holds {
            self.busy_groups.remove(g);
        }
        if let Some(k) = &j.key {
            self.busy_keys.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::outbox::{MemoryStore, NewOutboxRow, OutboxState, OutboxStore, resolve_customer};
    use crate::time::{Clock, ManualClock};

    const T0: i64 = 1_800_000_000_000;

    /// The machine on a virtual clock, with a [`MemoryStore`] and a Stripe that counts each
    /// identifier once — everything the tokio shell does, without sockets or tasks.
    struct Harness {
        m: Dispatcher,
        store: MemoryStore,
        clock: ManualClock,
        /// Identifier → value, as Stripe counts it.
        stripe: BTreeMap<String, u64>,
        sends: Vec<(Option<JobId>, Request)>,
        checks: Vec<(JobId, EventGroup)>,
        logs: usize,
    }

    fn config(api: Api) -> DispatchConfig {
        DispatchConfig {
            api,
            live: true,
            rate_per_s: 1000,
            max_in_flight: 8,
            poll_interval_ms: 500,
            request_timeout_ms: 30_000,
            backoff: Backoff::default(),
            unknown_check_after_ms: 23 * 3_600_000,
            session_renew_before_ms: 60_000,
            rows_per_pass: 1000,
        }
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            retry_after_s: None,
            should_retry: None,
            body: body.into(),
        }
    }

    fn stripe_error(code: &str) -> String {
        format!(
            r#"{{"error":{{"type":"invalid_request_error","code":"{code}","message":"{code}!"}}}}"#
        )
    }

    impl Harness {
        fn new(cfg: DispatchConfig) -> Self {
            Self {
                m: Dispatcher::new(cfg, T0, 42),
                store: MemoryStore::with_namespace("t"),
                clock: ManualClock::new(T0),
                stripe: BTreeMap::new(),
                sends: Vec::new(),
                checks: Vec::new(),
                logs: 0,
            }
        }

        fn now(&self) -> i64 {
            self.clock.now_ms()
        }

        fn usage(&mut self, customer: &str, meter: &str, value: u64) {
            self.store
                .insert(NewOutboxRow {
                    customer: customer.into(),
                    meter: meter.into(),
                    stripe_event_name: meter.into(),
                    timestamp_s: T0 / 1000 / 60 * 60,
                    value,
                })
                .unwrap();
        }

        /// One planning scan, as the shell runs it.
        fn plan(&mut self) {
            let now = self.now();
            self.m.wake(now);
            let scan = self.m.plan_due(now).unwrap();
            let rows = self.store.pending_rows(scan.after, scan.limit).unwrap();
            let mapping = rows
                .iter()
                .map(|r| {
                    let m = resolve_customer(&self.store, &r.customer).unwrap();
                    (r.customer.clone(), m)
                })
                .collect();
            let scanned = ScannedRows {
                namespace: "t".into(),
                rows,
                mapping,
                reached_end: true,
            };
            let (create, _) = self.m.on_rows(now, scanned);
            self.perform(create.into_iter().collect());
        }

        fn perform(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Store { op, .. } => match op {
                        StoreOp::CreateGroups(g) => {
                            self.store.create_groups(g).unwrap();
                        }
                        StoreOp::RecordAttempt {
                            ids,
                            now_ms,
                            lease_until_ms,
                        } => self
                            .store
                            .record_attempt(&ids, now_ms, lease_until_ms)
                            .unwrap(),
                        StoreOp::MarkSent(ids) => self.store.mark_sent(&ids).unwrap(),
                        StoreOp::MarkRetry {
                            id,
                            at_ms,
                            unknown,
                            error,
                        } => self.store.mark_retry(id, at_ms, unknown, error).unwrap(),
                        StoreOp::MarkDead { id, error } => self.store.mark_dead(id, error).unwrap(),
                    },
                    Action::Send { job, request } => self.sends.push((job, request)),
                    Action::Check { job, group } => self.checks.push((job, group)),
                    Action::Log(_) => self.logs += 1,
                }
            }
        }

        /// What the shell does each turn: ready groups to the machine, timers.
        fn tick(&mut self) {
            let now = self.now();
            if let Some(limit) = self.m.ready_limit() {
                let ready = self.store.ready_groups(now, limit).unwrap();
                let a = self.m.on_ready(now, ready);
                self.perform(a);
            }
            let a = self.m.on_timeout(now);
            self.perform(a);
        }

        fn take_sends(&mut self) -> Vec<(Option<JobId>, Request)> {
            std::mem::take(&mut self.sends)
        }

        /// Stripe processes a v1 request (counting its identifier once) and answers.
        fn stripe_v1(&mut self, req: &Request) -> Answer {
            let Request::V1 { event, .. } = req else {
                panic!("not v1: {req:?}")
            };
            if self.stripe.contains_key(&event.identifier) {
                return answer(
                    400,
                    &format!(
                        r#"{{"error":{{"type":"invalid_request_error","message":"An event already exists with identifier {}."}}}}"#,
                        event.identifier
                    ),
                );
            }
            self.stripe.insert(event.identifier.clone(), event.value);
            answer(200, "{}")
        }

        fn answer(&mut self, job: Option<JobId>, a: Option<Answer>) {
            let now = self.now();
            let out = self.m.on_answer(now, job.unwrap(), a);
            self.perform(out);
        }

        fn state(&self, s: OutboxState) -> usize {
            self.store.list(s, 0, 1000).unwrap().len()
        }
    }

    #[test]
    fn a_500_then_success_sends_once_under_one_identifier() {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 5);
        h.plan();
        h.tick();
        let s = h.take_sends();
        assert_eq!(s.len(), 1);
        let Request::V1 {
            event: first,
            idempotency_key: k1,
        } = s[0].1.clone()
        else {
            panic!()
        };
        h.answer(s[0].0, Some(answer(500, &stripe_error("api_error"))));
        assert_eq!(
            h.state(OutboxState::Unknown),
            1,
            "a 5xx may have been processed"
        );
        h.tick();
        assert!(h.take_sends().is_empty(), "backoff: not at once");
        h.clock.advance_ms(60_000);
        h.tick();
        let s = h.take_sends();
        let Request::V1 {
            event: again,
            idempotency_key: k2,
        } = s[0].1.clone()
        else {
            panic!()
        };
        assert_eq!(again.identifier, first.identifier);
        assert_ne!(k1, k2, "a new attempt, a new idempotency key");
        let a = h.stripe_v1(&s[0].1);
        h.answer(s[0].0, Some(a));
        assert_eq!(h.state(OutboxState::Sent), 1);
        assert_eq!(h.stripe.values().sum::<u64>(), 5);
        assert_eq!(h.store.groups().unwrap()[0].attempts, 2);
    }

    #[test]
    fn a_429_backs_off_at_least_retry_after() {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 1);
        h.plan();
        h.tick();
        let s = h.take_sends();
        let mut a = answer(429, &stripe_error("rate_limit"));
        a.retry_after_s = Some(120);
        h.answer(s[0].0, Some(a));
        let g = &h.store.groups().unwrap()[0];
        assert_eq!(g.state, GroupState::Pending, "a 429 was not processed");
        assert!(
            g.next_attempt_ms >= h.now() + 120_000,
            "{}",
            g.next_attempt_ms - h.now()
        );
        h.clock.advance_ms(119_000);
        h.tick();
        assert!(h.take_sends().is_empty());
        h.clock.advance_ms(1_000);
        h.tick();
        assert_eq!(h.take_sends().len(), 1);
    }

    #[test]
    fn an_answer_lost_after_processing_is_retried_under_the_same_identifier_and_counted_once() {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 7);
        h.plan();
        h.tick();
        let s = h.take_sends();
        let _processed = h.stripe_v1(&s[0].1);
        h.answer(s[0].0, None);
        assert_eq!(h.state(OutboxState::Unknown), 1);
        h.clock.advance_ms(60_000);
        h.tick();
        let s2 = h.take_sends();
        assert_eq!(s2.len(), 1);
        let a = h.stripe_v1(&s2[0].1);
        assert_eq!(a.status, 400, "Stripe already has the identifier");
        h.answer(s2[0].0, Some(a));
        assert_eq!(h.state(OutboxState::Sent), 1);
        assert_eq!(h.stripe.len(), 1);
        assert_eq!(h.stripe.values().sum::<u64>(), 7, "counted once");
    }

    #[test]
    fn a_4xx_goes_to_dead_letters_with_stripes_code() {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 1);
        h.plan();
        h.tick();
        let s = h.take_sends();
        h.answer(s[0].0, Some(answer(400, &stripe_error("resource_missing"))));
        let dead = h.store.list(OutboxState::Dead, 0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        let e = dead[0].error.clone().unwrap();
        assert_eq!((e.status, e.code.as_str()), (400, "resource_missing"));
        h.clock.advance_ms(3_600_000);
        h.tick();
        assert!(
            h.take_sends().is_empty(),
            "dead letters wait for an operator"
        );
    }

    #[test]
    fn the_23_hour_rule_checks_event_summaries_before_sending_again() {
        for (total, expect) in [(3, "sent"), (0, "send"), (2, "undecided")] {
            let mut h = Harness::new(config(Api::V1));
            h.usage("cus_a", "calls", 3);
            h.plan();
            h.tick();
            let s = h.take_sends();
            h.answer(s[0].0, None);
            // Within 23 hours an unknown group is simply retried.
            h.clock.advance_ms(60_000);
            h.tick();
            let s = h.take_sends();
            assert_eq!(s.len(), 1);
            assert!(h.checks.is_empty());
            h.answer(s[0].0, None);
            h.clock.advance_ms(23 * 3_600_000);
            h.tick();
            assert!(h.take_sends().is_empty(), "checked before it is sent again");
            let (job, g) = h.checks.pop().unwrap();
            let window = h.store.groups().unwrap();
            let out = h.m.on_check(
                h.now(),
                job,
                g.id,
                CheckReading::Read {
                    stripe_total: Decimal::from(total),
                    window,
                },
            );
            h.perform(out);
            match expect {
                "sent" => {
                    assert_eq!(h.state(OutboxState::Sent), 1);
                    assert!(h.take_sends().is_empty());
                    assert_eq!(h.m.status().resolved_by_check, 1);
                }
                "send" => assert_eq!(h.take_sends().len(), 1),
                _ => {
                    assert!(h.take_sends().is_empty());
                    assert_eq!(h.m.status().inconclusive_checks, 1);
                    let g = &h.store.groups().unwrap()[0];
                    assert_eq!(g.state, GroupState::Unknown);
                    assert_eq!(g.next_attempt_ms, h.now() + UNDECIDED_RECHECK_MS);
                }
            }
            let in_flight = usize::from(expect == "send");
            assert_eq!(h.m.jobs_in_flight(), in_flight, "{expect}");
        }
    }

    #[test]
    fn at_most_one_request_in_flight_per_customer_and_meter() {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 1);
        h.plan();
        h.clock.advance_ms(60_000);
        // A later bucket: a second group for the same customer and meter, and another pair.
        h.store
            .insert(NewOutboxRow {
                customer: "cus_a".into(),
                meter: "calls".into(),
                stripe_event_name: "calls".into(),
                timestamp_s: T0 / 1000 / 60 * 60 + 60,
                value: 2,
            })
            .unwrap();
        h.usage("cus_b", "calls", 3);
        h.plan();
        assert_eq!(h.store.groups().unwrap().len(), 3);
        h.tick();
        let s = h.take_sends();
        let keys: Vec<(String, String)> = s
            .iter()
            .map(|(_, r)| match r {
                Request::V1 { event, .. } => {
                    (event.stripe_customer.clone(), event.event_name.clone())
                }
                _ => panic!(),
            })
            .collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_ne!(keys[0], keys[1]);
        h.tick();
        assert!(h.take_sends().is_empty(), "cus_a/calls is busy");
        let a = h.stripe_v1(&s[0].1);
        h.answer(s[0].0, Some(a));
        h.tick();
        assert_eq!(h.take_sends().len(), 1, "the key is free again");
    }

    #[test]
    fn v2_session_expiry_renews_the_session() {
        let mut h = Harness::new(config(Api::V2));
        h.usage("cus_a", "calls", 4);
        h.plan();
        h.tick();
        let s = h.take_sends();
        assert!(matches!(s[..], [(None, Request::Session { .. })]), "{s:?}");
        let expires = crate::time::rfc3339(h.now() / 1000 + 600);
        let out = h.m.on_session(h.now(), Ok(Ok(("tok1".into(), expires))));
        h.perform(out);
        let s = h.take_sends();
        let (job, Request::Stream { token, .. }) = s[0].clone() else {
            panic!("{s:?}")
        };
        assert_eq!(token, "tok1");
        // Stripe says the session expired: a new session, then the same events again.
        h.answer(
            job,
            Some(answer(
                401,
                r#"{"error":{"type":"temporary_session_expired","message":"x"}}"#,
            )),
        );
        let s = h.take_sends();
        assert!(matches!(s[..], [(None, Request::Session { .. })]), "{s:?}");
        let expires = crate::time::rfc3339(h.now() / 1000 + 600);
        let out = h.m.on_session(h.now(), Ok(Ok(("tok2".into(), expires))));
        h.perform(out);
        let s = h.take_sends();
        let (job2, Request::Stream { token, events, .. }) = s[0].clone() else {
            panic!("{s:?}")
        };
        assert_eq!((job2, token.as_str(), events.len()), (job, "tok2", 1));
        h.answer(job2, Some(answer(200, "{}")));
        assert_eq!(h.state(OutboxState::Sent), 1);
        // Near its expiry the session is renewed before the next stream request.
        h.usage("cus_a", "calls", 1);
        h.clock.advance_ms(600_000 - 30_000);
        h.plan();
        h.tick();
        let s = h.take_sends();
        assert!(matches!(s[..], [(None, Request::Session { .. })]), "{s:?}");
    }

    #[test]
    fn v2_rejected_stream_is_resent_event_by_event() {
        let mut h = Harness::new(config(Api::V2));
        h.usage("cus_a", "calls", 1);
        h.usage("cus_b", "calls", 2);
        h.plan();
        h.tick();
        let expires = crate::time::rfc3339(h.now() / 1000 + 600);
        h.take_sends();
        let out = h.m.on_session(h.now(), Ok(Ok(("tok".into(), expires))));
        h.perform(out);
        let s = h.take_sends();
        h.answer(s[0].0, Some(answer(400, &stripe_error("invalid_customer"))));
        let s = h.take_sends();
        let Request::Stream { events, .. } = &s[0].1 else {
            panic!()
        };
        assert_eq!(events.len(), 1);
        h.answer(s[0].0, Some(answer(400, &stripe_error("invalid_customer"))));
        let s = h.take_sends();
        h.answer(s[0].0, Some(answer(200, "{}")));
        assert_eq!(
            (h.state(OutboxState::Dead), h.state(OutboxState::Sent)),
            (1, 1)
        );
        assert_eq!(h.m.jobs_in_flight(), 0);
    }

    #[test]
    fn requests_are_paced_by_the_token_bucket() {
        let mut cfg = config(Api::V1);
        cfg.rate_per_s = 1;
        let mut h = Harness::new(cfg);
        h.usage("cus_a", "calls", 1);
        h.usage("cus_b", "calls", 1);
        h.plan();
        h.tick();
        assert_eq!(h.take_sends().len(), 1, "burst of one");
        assert!(h.m.poll_timeout() <= h.now() + 1000);
        h.clock.advance_ms(1000);
        h.tick();
        assert_eq!(h.take_sends().len(), 1);
    }

    #[test]
    fn log_only_logs_each_group_once_within_its_bound() {
        let mut cfg = config(Api::V1);
        cfg.live = false;
        let mut h = Harness::new(cfg);
        h.usage("cus_a", "calls", 1);
        h.plan();
        h.tick();
        h.tick();
        assert_eq!((h.logs, h.sends.len()), (1, 0));
        assert_eq!(h.m.logged_len(), 1);
        let mut set = BoundedSet::new(3);
        for id in 0..5 {
            assert!(set.insert(id));
        }
        assert_eq!(set.len(), 3, "the limit holds");
        assert!(!set.insert(4), "recent ids are remembered");
        assert!(set.insert(0), "the oldest were forgotten: logged again");
    }

    #[test]
    fn unknown_groups_sharing_a_minute_are_resolved_by_one_check() {
        let mut h = Harness::new(config(Api::V2));
        h.usage("cus_a", "calls", 1);
        h.usage("cus_a", "tokens", 2);
        h.plan();
        h.tick();
        h.take_sends();
        let expires = crate::time::rfc3339(h.now() / 1000 + 600);
        let out = h.m.on_session(h.now(), Ok(Ok(("tok".into(), expires))));
        h.perform(out);
        let s = h.take_sends();
        h.answer(s[0].0, None);
        assert_eq!(h.state(OutboxState::Unknown), 2);
        h.clock.advance_ms(24 * 3_600_000);
        h.tick();
        assert_eq!(h.checks.len(), 2, "both are checked before any send");
        let window = h.store.groups().unwrap();
        // The first reading explains both (one event name's window holds both here).
        let (job, g) = h.checks.remove(0);
        let out = h.m.on_check(
            h.now(),
            job,
            g.id,
            CheckReading::Read {
                stripe_total: Decimal::from(3),
                window: window.clone(),
            },
        );
        h.perform(out);
        assert_eq!(h.state(OutboxState::Sent), 2);
        let (job, g) = h.checks.remove(0);
        let out =
            h.m.on_check(h.now(), job, g.id, CheckReading::Failed("late".into()));
        h.perform(out);
        assert!(h.take_sends().is_empty(), "nothing is sent again");
        assert_eq!(h.m.jobs_in_flight(), 0, "the job ends");
    }

    #[test]
    fn a_lost_session_answer_retries_the_events_later_as_not_sent() {
        let mut h = Harness::new(config(Api::V2));
        h.usage("cus_a", "calls", 1);
        h.plan();
        h.tick();
        h.take_sends();
        let out = h.m.on_session(h.now(), Err(()));
        h.perform(out);
        let g = &h.store.groups().unwrap()[0];
        assert_eq!(g.state, GroupState::Pending, "no event was sent");
        assert!(g.next_attempt_ms > h.now());
        assert_eq!(h.m.jobs_in_flight(), 0);
    }

    /// Random faults on a virtual clock: 5xx processed or not, 429s, answers lost before or
    /// after processing, expired v2 sessions, answers out of order. Stripe ends with exactly
    /// the outbox's units, each identifier once, and v1 never has two requests in flight for
    /// one customer and meter.
    #[test]
    fn random_faults_end_exact() {
        for api in [Api::V1, Api::V2] {
            for seed in 1..=20u64 {
                let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = move |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                let mut cfg = config(api);
                cfg.max_in_flight = 3;
                let mut h = Harness::new(cfg);
                let mut total = 0;
                for i in 0..30u64 {
                    let v = 1 + next(5);
                    total += v;
                    let c = format!("cus_{}", i % 3);
                    h.usage(&c, ["calls", "tokens"][(i % 2) as usize], v);
                    if next(4) == 0 {
                        h.plan();
                    }
                }
                h.plan();
                let mut in_flight: Vec<(Option<JobId>, Request)> = Vec::new();
                for step in 0..20_000 {
                    if h.state(OutboxState::Sent) == 30 && in_flight.is_empty() {
                        break;
                    }
                    assert!(step < 19_999, "{api:?} seed {seed}: not done");
                    h.clock.advance_ms(next(3000) as i64);
                    h.tick();
                    in_flight.extend(h.take_sends());
                    if api == Api::V1 {
                        let mut keys = HashSet::new();
                        for (_, r) in &in_flight {
                            if let Request::V1 { event, .. } = r {
                                let k = (event.stripe_customer.clone(), event.event_name.clone());
                                assert!(keys.insert(k), "two in flight for one key");
                            }
                        }
                    }
                    if in_flight.is_empty() || next(3) == 0 {
                        continue;
                    }
                    let (job, req) = in_flight.remove(next(in_flight.len() as u64) as usize);
                    let now = h.now();
                    let fault = next(10);
                    let out = match req {
                        Request::Session { .. } => {
                            let r = if fault < 2 {
                                Err(())
                            } else {
                                let exp = crate::time::rfc3339(now / 1000 + 60 + next(600) as i64);
                                Ok(Ok((format!("tok{step}"), exp)))
                            };
                            h.m.on_session(now, r)
                        }
                        Request::V1 { .. } => {
                            let processed = fault >= 4 || fault == 1;
                            let a = if processed {
                                Some(h.stripe_v1(&req))
                            } else {
                                None
                            };
                            let a = match fault {
                                0 => Some(answer(500, &stripe_error("api_error"))),
                                1 => None,
                                2 => Some(answer(429, &stripe_error("rate_limit"))),
                                3 => None,
                                _ => a,
                            };
                            h.m.on_answer(now, job.unwrap(), a)
                        }
                        Request::Stream { ref events, .. } => {
                            let processed = fault >= 4 || fault == 1;
                            if processed {
                                for e in events {
                                    h.stripe.entry(e.identifier.clone()).or_insert(e.value);
                                }
                            }
                            let a = match fault {
                                0 => Some(answer(
                                    401,
                                    r#"{"error":{"type":"temporary_session_expired"}}"#,
                                )),
                                1 | 3 => None,
                                2 => Some(answer(429, &stripe_error("rate_limit"))),
                                _ => Some(answer(200, "{}")),
                            };
                            h.m.on_answer(now, job.unwrap(), a)
                        }
                    };
                    h.perform(out);
                    in_flight.extend(h.take_sends());
                }
                assert_eq!(h.stripe.values().sum::<u64>(), total, "{api:?} seed {seed}");
                assert_eq!(h.stripe.len(), h.store.groups().unwrap().len());
                assert_eq!(h.m.jobs_in_flight(), 0);
            }
        }
    }

    #[test]
    fn planning_resumes_where_it_stopped_and_publishes_unmapped_at_the_end() {
        let mut cfg = config(Api::V1);
        cfg.rows_per_pass = 2;
        let mut m = Dispatcher::new(cfg, T0, 1);
        let row = |id: u64, customer: &str| OutboxRow {
            id,
            customer: customer.into(),
            meter: "calls".into(),
            stripe_event_name: "calls".into(),
            timestamp_s: 60,
            value: 1,
            revision: 0,
        };
        let scan = m.plan_due(T0).unwrap();
        assert_eq!((scan.after, scan.limit), (0, 2));
        let (create, publish) = m.on_rows(
            T0,
            ScannedRows {
                namespace: "t".into(),
                rows: vec![row(1, "acme"), row(2, "acme")],
                mapping: BTreeMap::from([("acme".to_string(), None)]),
                reached_end: false,
            },
        );
        assert_eq!((create, publish), (None, None));
        assert_eq!(
            m.plan_due(T0),
            None,
            "the next pass waits for the poll interval"
        );
        m.wake(T0);
        assert_eq!(
            m.plan_due(T0).unwrap().after,
            2,
            "resumes after the backlog"
        );
        let (create, publish) = m.on_rows(
            T0,
            ScannedRows {
                namespace: "t".into(),
                rows: vec![row(3, "acme"), row(4, "cus_b")],
                mapping: BTreeMap::from([
                    ("acme".to_string(), None),
                    ("cus_b".to_string(), Some("cus_b".to_string())),
                ]),
                reached_end: true,
            },
        );
        let Some(Action::Store {
            op: StoreOp::CreateGroups(groups),
            ..
        }) = create
        else {
            panic!("{create:?}")
        };
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].row_ids, vec![4]);
        assert_eq!(publish, Some(BTreeMap::from([("acme".to_string(), 3)])));
        assert_eq!(m.status().unmapped.get("acme"), Some(&3));
        m.wake(T0);
        assert_eq!(
            m.plan_due(T0).unwrap().after,
            0,
            "a new scan from the start"
        );
    }

    #[test]
    fn stop_waits_for_jobs_in_flight() {
        let mut h = Harness::new(config(Api::V1));
        h.usage("cus_a", "calls", 1);
        h.plan();
        h.tick();
        let s = h.take_sends();
        h.m.stop();
        assert!(!h.m.is_done());
        assert_eq!(h.m.ready_limit(), None);
        h.answer(s[0].0, Some(answer(200, "{}")));
        assert!(h.m.is_done());
    }
}
