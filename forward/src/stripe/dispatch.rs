//! The forwarder's decisions as a sans-IO state machine, in the spirit of `quinn-proto`.
//!
//! Inputs: `now_ms`, what the shell read from the store (pending rows scanned, ready groups),
//! HTTP answers (an [`Answer`] or a lost one), session answers and unknown-outcome check
//! readings. Outputs ([`Action`]): store actions (persist groups before any send, record the
//! attempt and its lease, mark sent / retry at / dead), requests to send (v1 form, v2 stream or
//! session, each with its identifier(s) and idempotency key), unknown-outcome checks to run, and
//! the next timer ([`Dispatcher::poll_timeout`]). No sockets, clocks, tasks or store calls here:
//! `crate::stripe::forwarder` (the tokio shell) performs the actions in order and feeds the results back.
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
//! Limits: jobs ≤ `max_in_flight`, events per job ≤ [`crate::stripe::STREAM_EVENTS_MAX`], the groups
//! logged in log-only mode ≤ [`LOGGED_MAX`] (the oldest are forgotten first, so a group may be
//! logged again after that many others).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use rust_decimal::Decimal;

use crate::retry::{Answer, Backoff, Outcome, TokenBucket, classify};
use crate::stripe::client::MeterEvent;
use crate::stripe::outbox::{EventGroup, GroupId, GroupState, NewGroup, OutboxRow, StripeError};
use crate::stripe::plan::plan_groups;
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

/// The machine's settings (from [`crate::stripe::ForwarderConfig`]).
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

    /// The scan ran: groups the pending rows ([`crate::stripe::plan`]) under the store's namespace with
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
            crate::stripe::STREAM_EVENTS_MAX
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
                    let chunk: Vec<EventGroup> = iter
                        .by_ref()
                        .take(crate::stripe::STREAM_EVENTS_MAX)
                        .collect();
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
            self.busy_groups.len() <= self.jobs.len() * crate::stripe::STREAM_EVENTS_MAX,
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
mod tests;
