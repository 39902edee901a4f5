//! The agent's collector session as a sans-IO state machine (in the spirit of `quinn-proto`):
//! no sockets, files, clocks or tasks. The `shipper` shell feeds it what
//! happened — [`Session::connected`], [`Session::frame_received`], [`Session::batches_sealed`],
//! [`Session::handle_timeout`], [`Session::connection_lost`] — with `now_ms`, and performs what
//! [`Session::poll`] returns, in order: connect, send a frame or a stored batch, close, a store
//! action (then its event), an event for the agent. [`Session::poll_timeout`] is the next timer.
//!
//! Per connection: one bidirectional stream; `Hello` (with the enrolment token, every time),
//! `Challenge`, `Proof` over the TLS exporter binding, `Welcome{max_in_flight}`, all within
//! `connect_timeout` of the connection. Then batches go out in seq order, at most
//! `max_in_flight` unacknowledged (starting from one per connection and doubling with every
//! ack); acks come back in the same order. `Catalog` and `Entitlements` pushes are stored, then
//! reported to the agent. A `Frame::Error` from the collector, a protocol violation (a
//! duplicated or out-of-order ack, an unexpected frame) or a lost connection ends the
//! connection with a typed [`SessionError`].
//!
//! Guarantees:
//! - A batch is deleted from the store only after its `Ack` (`Committed`, `Duplicate` or
//!   `Quarantined`) arrived on a connection it was sent on; the agent hears of the ack only after
//!   the deletion committed ([`StoreAction`] carries its event) (A1).
//! - After any reconnect every unacknowledged batch is sent again, oldest first; resends are
//!   harmless because the collector dedups by `(agent, epoch, seq)` (A4).
//! - A batch that cannot be shipped under the agent's key — it fails the check before sending
//!   ([`Session::batch_unshippable`]), or the collector refuses it `bad_signature` or
//!   `agent_mismatch` — is quarantined in the store ([`StoreAction::Quarantine`]): kept, never
//!   sent again, and the batches after it flow (decision 0086). Only the batch the refusal is
//!   about is moved: the oldest in flight, since acks and the refusal come in batch order.
//! - Collectors are tried in the configured order; on failure the next one is tried after an
//!   exponential backoff with jitter (between half and all of `min × 2^attempt`, capped at
//!   `max`). A connection that was welcomed and then got batches acknowledged, or stayed up
//!   30 s, resets the backoff. Failover is sticky: the agent stays on the collector that works
//!   until it fails, and moves on only from one that never welcomed it.
//!
//! Limits: the window is at most [`MAX_WINDOW`] batches; the set of unacknowledged seqs mirrors
//! the store's sealed batches, which the disk budget bounds; the action queue holds at most one
//! window of sends plus the store actions of one read.

use crate::entitlements::EntitlementsCache;
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{EntitlementsSnapshot, LeaseGrant};
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{Ack, AckOutcome, Frame};
use tally_protocol::handshake::{ClientHandshake, HandshakeError};

/// A connection that lasted this long counts as healthy even if it acknowledged nothing.
pub const HEALTHY_MS: i64 = 30_000;

/// The largest window the agent uses, whatever the collector allows.
pub const MAX_WINDOW: u32 = 1024;

/// Control frames (snapshot requests, lease releases) kept while disconnected at most; past it
/// the oldest goes (a request is asked again, a release's lease expires at the collector).
pub const MAX_PENDING_CONTROL: usize = 4_096;

/// Exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`, jittered by `seed` (the shell's randomness).
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The next delay: uniformly between half and all of `min × 2^attempt`, capped at `max`.
    pub fn next_delay(&mut self) -> Duration {
        let full = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = full / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(self.rng % nanos)
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// An ack that does not match the batches in flight: the connection is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Nothing was in flight.
    #[error("ack for epoch {epoch} seq {seq} with nothing in flight")]
    NothingInFlight {
        /// The ack's epoch.
        epoch: u64,
        /// The ack's seq.
        seq: u64,
    },
    /// Acks must come in the order batches were sent, for our epoch.
    #[error("ack for epoch {got_epoch} seq {got_seq}, expected epoch {epoch} seq {seq}")]
    OutOfOrder {
        /// Our epoch.
        epoch: u64,
        /// The oldest seq in flight.
        seq: u64,
        /// The ack's epoch.
        got_epoch: u64,
        /// The ack's seq.
        got_seq: u64,
    },
}

/// The send side of one connection: which batch goes next, how many may be in flight, and
/// whether an ack is the expected one. `T` is the send time the caller keeps per batch.
///
/// Slow start: a new connection sends one batch, and the window doubles with every ack up to
/// `max_in_flight`. Acks in flight are lost with a connection, so a collector that keeps dropping
/// connections still gets at least one batch acknowledged per connection.
#[derive(Debug)]
pub struct SendWindow<T = i64> {
    epoch: u64,
    max_in_flight: usize,
    window: usize,
    sent_upto: u64,
    inflight: VecDeque<(u64, T)>,
}

impl<T> SendWindow<T> {
    /// A fresh connection's window: nothing sent yet, so everything unacknowledged goes again.
    pub fn new(epoch: u64, max_in_flight: usize) -> Self {
        SendWindow {
            epoch,
            max_in_flight: max_in_flight.max(1),
            window: 1,
            sent_upto: 0,
            inflight: VecDeque::new(),
        }
    }

    /// The next seq to send, given the unacknowledged seqs in ascending order; `None` when the
    /// window is full or everything is sent.
    pub fn next_to_send(&self, mut unacked: impl Iterator<Item = u64>) -> Option<u64> {
        if self.inflight.len() >= self.window {
            return None;
        }
        unacked.find(|s| *s > self.sent_upto)
    }

    /// `seq` was sent at `at`.
    pub fn sent(&mut self, seq: u64, at: T) {
        assert!(seq > self.sent_upto, "batches are sent in seq order");
        self.sent_upto = seq;
        self.inflight.push_back((seq, at));
    }

    /// `seq` turned out to be acknowledged already; move past it.
    pub fn skipped(&mut self, seq: u64) {
        self.sent_upto = self.sent_upto.max(seq);
    }

    /// `seq` was counted as sent but never went out (it was gone from the store): forget it.
    pub fn unsent(&mut self, seq: u64) {
        self.inflight.retain(|(s, _)| *s != seq);
    }

    /// Matches an ack against the oldest batch in flight; returns its seq and send time.
    pub fn acked(&mut self, ack: &Ack) -> Result<(u64, T), AckError> {
        let Some((seq, _)) = self.inflight.front() else {
            return Err(AckError::NothingInFlight {
                epoch: ack.epoch,
                seq: ack.seq,
            });
        };
        if ack.epoch != self.epoch || ack.seq != *seq {
            return Err(AckError::OutOfOrder {
                epoch: self.epoch,
                seq: *seq,
                got_epoch: ack.epoch,
                got_seq: ack.seq,
            });
        }
        self.window = (self.window * 2).min(self.max_in_flight);
        self.inflight.pop_front().ok_or(AckError::NothingInFlight {
            epoch: ack.epoch,
            seq: ack.seq,
        })
    }

    /// The oldest seq in flight: the one the collector's next ack or refusal is about.
    pub fn oldest_in_flight(&self) -> Option<u64> {
        self.inflight.front().map(|(s, _)| *s)
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}

/// Why a connection (or an attempt) ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Resolving, connecting or the TLS handshake failed (the shell's words).
    #[error("{0}")]
    Connect(String),
    /// The stream or the connection failed or was closed (the shell's words).
    #[error("{0}")]
    Connection(String),
    /// No welcome within `connect_timeout` of the connection.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Our side of the handshake refused a message or could not start.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The collector sent `Frame::Error`.
    #[error("collector error {code}: {message}")]
    Collector {
        /// Its code.
        code: ErrorCode,
        /// Its lowercase detail.
        message: String,
    },
    /// An ack that does not match what is in flight (duplicated, out of order, other epoch).
    #[error(transparent)]
    Ack(#[from] AckError),
    /// A frame the protocol does not allow here.
    #[error("unexpected frame {got} instead of {expected}")]
    UnexpectedFrame {
        /// What the session waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The local store failed while shipping (reading a batch, deleting acked ones, caching).
    #[error("local store failed: {0}")]
    Store(String),
}

/// The connection as the agent reports it (`Agent::status`).
pub use crate::status::ConnectionState;

/// One acknowledged batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedBatch {
    /// Its seq.
    pub seq: u64,
    /// What the collector did with it.
    pub outcome: AckOutcome,
    /// Send to ack, in ms of the shell's clock.
    pub rtt_ms: i64,
}

/// What the agent, which owns the backlog, the catalog and the entitlement cache, hears.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// The collector refused this agent as revoked.
    Revoked,
    /// This batch was moved to the store's quarantine and will not be sent.
    Quarantined {
        /// Its seq.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// These batches are acknowledged and deleted from the store, in seq order.
    Acked(Vec<AckedBatch>),
    /// A catalog was received and stored.
    Catalog(Catalog),
    /// Entitlements were received, merged into the cache, and the merged cache stored.
    Entitlements {
        /// The merged cache.
        cache: EntitlementsCache,
        /// The frame that changed it.
        update: EntitlementsSnapshot,
    },
    /// A lease grant was received and stored.
    LeaseGrant(LeaseGrant),
    /// The connection changed (`Disconnected` carries the error that ended it).
    State(ConnectionState),
}

/// A store write the shell performs; once it committed, the shell reports [`Self::into_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum StoreAction {
    /// Delete these acknowledged batches.
    Ack(Vec<AckedBatch>),
    /// Keep this catalog.
    PutCatalog(Catalog),
    /// Keep this merged entitlement cache (the frame that changed it is reported with it).
    PutEntitlements(EntitlementsCache, EntitlementsSnapshot),
    /// Keep this lease grant before anything is consumed under it.
    PutLease(LeaseGrant),
    /// Move this batch from the batches to the quarantine; on failure call
    /// [`Session::quarantine_failed`] instead of [`Session::store_failed`].
    Quarantine {
        /// Its seq.
        seq: u64,
        /// Why it cannot be shipped.
        reason: String,
    },
}

impl StoreAction {
    /// What the agent hears once this write committed.
    pub fn into_event(self) -> SessionEvent {
        match self {
            StoreAction::Ack(a) => SessionEvent::Acked(a),
            StoreAction::PutCatalog(c) => SessionEvent::Catalog(c),
            StoreAction::PutEntitlements(cache, update) => {
                SessionEvent::Entitlements { cache, update }
            }
            StoreAction::PutLease(g) => SessionEvent::LeaseGrant(g),
            StoreAction::Quarantine { seq, reason } => SessionEvent::Quarantined { seq, reason },
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Resolve and connect to this collector, then call [`Session::connected`] or
    /// [`Session::connection_lost`].
    Connect {
        /// `host:port`.
        collector: String,
    },
    /// Write this frame on the connection's stream.
    Send(Frame),
    /// Read this sealed batch from the store and write it; if it is gone, call
    /// [`Session::batch_missing`].
    SendBatch(u64),
    /// Close the connection.
    Close,
    /// Write to the store; on success report [`StoreAction::into_event`], on failure call
    /// [`Session::store_failed`].
    Store(StoreAction),
    /// Tell the agent.
    Event(SessionEvent),
}

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Collector addresses, tried in order.
    pub collectors: Vec<String>,
    /// The agent's epoch.
    pub epoch: u64,
    /// Enrolment token, presented on every connect.
    pub enroll_token: Option<String>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Time from connection to welcome.
    pub connect_timeout: Duration,
}

#[derive(Debug)]
enum State {
    /// Not started, or stopped.
    Idle,
    /// Waiting for the shell to connect.
    Connecting,
    /// Connected; handshake under way until `deadline_ms`.
    Handshaking {
        hs: Box<ClientHandshake>,
        deadline_ms: i64,
        awaiting: &'static str,
    },
    /// Welcomed; batches flow.
    Connected { window: SendWindow<i64> },
    /// Waiting out a backoff.
    Backoff { until_ms: i64 },
}

/// The collector session. See the module doc.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    key: ed25519_dalek::SigningKey,
    backoff: Backoff,
    /// Index of the collector to try (mod the count).
    idx: usize,
    state: State,
    /// Sealed, unacknowledged seqs (mirrors the store's batches table).
    unacked: BTreeSet<u64>,
    /// Highest seq the session has heard of.
    sealed_upto: u64,
    entitlements: Option<EntitlementsCache>,
    /// When the current attempt began, whether it was welcomed, whether it got acks.
    attempt_began_ms: i64,
    welcomed: bool,
    acked_any: bool,
    queue: VecDeque<Action>,
    /// Control frames waiting for a connection.
    pending_control: VecDeque<Frame>,
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::Challenge(_) => "challenge",
        Frame::Proof(_) => "proof",
        Frame::Welcome(_) => "welcome",
        Frame::Batch(_) => "batch",
        Frame::Ack(_) => "ack",
        Frame::Catalog(_) => "catalog",
        Frame::Entitlements(_) => "entitlements",
        Frame::LeaseRequest(_) => "lease request",
        Frame::LeaseGrant(_) => "lease grant",
        Frame::Error(_) => "error",
        Frame::EntitlementsRequest(_) => "entitlements request",
        Frame::LeaseRelease(_) => "lease release",
    }
}

impl Session {
    /// A session over the store's unacknowledged `unacked` seqs (ascending), the last sealed
    /// seq, and the cached entitlements; `seed` jitters the backoff. Call [`Session::start`].
    pub fn new(
        cfg: SessionConfig,
        key: ed25519_dalek::SigningKey,
        unacked: impl IntoIterator<Item = u64>,
        sealed_upto: u64,
        entitlements: Option<EntitlementsCache>,
        seed: u64,
    ) -> Self {
        assert!(!cfg.collectors.is_empty(), "a session needs a collector");
        let unacked: BTreeSet<u64> = unacked.into_iter().collect();
        assert!(
            unacked.last().is_none_or(|l| *l <= sealed_upto),
            "unacked batches are sealed"
        );
        Session {
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max, seed),
            cfg,
            key,
            idx: 0,
            state: State::Idle,
            unacked,
            sealed_upto,
            entitlements,
            attempt_began_ms: 0,
            welcomed: false,
            acked_any: false,
            queue: VecDeque::new(),
            pending_control: VecDeque::new(),
        }
    }

    /// Starts the first attempt, on the first collector.
    pub fn start(&mut self, now_ms: i64) {
        self.attempt(now_ms);
    }

    /// The next action for the shell, in order.
    pub fn poll(&mut self) -> Option<Action> {
        self.queue.pop_front()
    }

    /// When [`Session::handle_timeout`] is due: the handshake deadline or the end of a backoff.
    pub fn poll_timeout(&self) -> Option<i64> {
        match &self.state {
            State::Handshaking { deadline_ms, .. } => Some(*deadline_ms),
            State::Backoff { until_ms } => Some(*until_ms),
            _ => None,
        }
    }

    /// Unacknowledged batches known to the session.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Batches in flight on the current connection.
    pub fn in_flight(&self) -> usize {
        match &self.state {
            State::Connected { window } => window.in_flight(),
            _ => 0,
        }
    }

    /// Whether the session is welcomed and shipping.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected { .. })
    }

    /// Timers: a handshake that took too long ends; a backoff that ran out starts an attempt.
    pub fn handle_timeout(&mut self, now_ms: i64) {
        match self.state {
            State::Handshaking { deadline_ms, .. } if now_ms >= deadline_ms => {
                self.end(SessionError::HandshakeTimeout, now_ms);
            }
            State::Backoff { until_ms } if now_ms >= until_ms => self.attempt(now_ms),
            _ => {}
        }
    }

    /// The shell connected; `binding` is the connection's TLS exporter material.
    pub fn connected(&mut self, binding: &[u8], now_ms: i64) {
        if !matches!(self.state, State::Connecting) {
            return;
        }
        match ClientHandshake::start(
            self.key.clone(),
            binding.to_vec(),
            self.cfg.enroll_token.as_deref(),
        ) {
            Ok((hs, hello)) => {
                self.queue.push_back(Action::Send(Frame::Hello(hello)));
                self.state = State::Handshaking {
                    hs: Box::new(hs),
                    deadline_ms: now_ms.saturating_add(duration_ms(self.cfg.connect_timeout)),
                    awaiting: "challenge",
                };
            }
            Err(e) => self.end(e.into(), now_ms),
        }
    }

    /// The attempt or the connection failed in the shell (resolve, connect, read, write).
    pub fn connection_lost(&mut self, error: SessionError, now_ms: i64) {
        if matches!(self.state, State::Idle | State::Backoff { .. }) {
            return;
        }
        self.end(error, now_ms);
    }

    /// A store action failed: the connection ends (what was not deleted is sent again).
    pub fn store_failed(&mut self, detail: String, now_ms: i64) {
        self.connection_lost(SessionError::Store(detail), now_ms);
    }

    /// The batch of a [`Action::SendBatch`] was not in the store: it is not shipped, and the
    /// next one may take its place in the window.
    pub fn batch_missing(&mut self, seq: u64, now_ms: i64) {
        self.unacked.remove(&seq);
        if let State::Connected { window } = &mut self.state {
            window.unsent(seq);
        }
        self.fill_window(now_ms);
    }

    /// The batch of a [`Action::SendBatch`] is in the store but fails the check under the
    /// agent's key (`reason` says how): it is quarantined instead of sent, and the next one may
    /// take its place in the window.
    pub fn batch_unshippable(&mut self, seq: u64, reason: String, now_ms: i64) {
        tracing::debug!(seq, %reason, "batch cannot be shipped: quarantining it");
        self.unacked.remove(&seq);
        if let State::Connected { window } = &mut self.state {
            window.unsent(seq);
        }
        self.queue
            .push_back(Action::Store(StoreAction::Quarantine { seq, reason }));
        self.fill_window(now_ms);
    }

    /// A [`StoreAction::Quarantine`] failed: the batch is still stored and unacknowledged, so
    /// it goes back to the batches to send, and the connection ends as after any store failure.
    pub fn quarantine_failed(&mut self, seq: u64, detail: String, now_ms: i64) {
        if seq <= self.sealed_upto {
            self.unacked.insert(seq);
        }
        self.store_failed(detail, now_ms);
    }

    /// Batches up to `upto` are sealed and stored (seqs are contiguous, SPEC A1).
    pub fn batches_sealed(&mut self, upto: u64, now_ms: i64) {
        if upto <= self.sealed_upto {
            return;
        }
        self.unacked.extend(self.sealed_upto + 1..=upto);
        self.sealed_upto = upto;
        self.fill_window(now_ms);
    }

    /// A frame from the collector.
    pub fn frame_received(&mut self, frame: Frame, now_ms: i64) {
        match &mut self.state {
            State::Handshaking { hs, awaiting, .. } => {
                let r = match (frame, *awaiting) {
                    (Frame::Challenge(c), "challenge") => hs.on_challenge(&c).map(|proof| {
                        self.queue.push_back(Action::Send(Frame::Proof(proof)));
                        *awaiting = "welcome";
                        None
                    }),
                    (Frame::Welcome(w), "welcome") => hs
                        .on_welcome(&w)
                        .map(|()| Some(w.max_in_flight.clamp(1, MAX_WINDOW))),
                    (Frame::Error(e), _) => {
                        return self.end(collector_error(&e), now_ms);
                    }
                    (other, expected) => {
                        let got = frame_name(&other);
                        return self.end(SessionError::UnexpectedFrame { expected, got }, now_ms);
                    }
                };
                match r {
                    Ok(None) => {}
                    Ok(Some(max_in_flight)) => self.welcome(max_in_flight, now_ms),
                    Err(e) => self.end(e.into(), now_ms),
                }
            }
            State::Connected { window } => match frame {
                Frame::Ack(a) => match window.acked(&a) {
                    Ok((seq, sent_at)) => {
                        self.unacked.remove(&seq);
                        self.acked_any = true;
                        self.push_ack(AckedBatch {
                            seq,
                            outcome: a.outcome,
                            rtt_ms: now_ms.saturating_sub(sent_at).max(0),
                        });
                        self.fill_window(now_ms);
                    }
                    Err(e) => self.end(e.into(), now_ms),
                },
                Frame::Catalog(c) => {
                    tracing::info!(
                        version = c.version,
                        meters = c.meters.len(),
                        "catalog received"
                    );
                    self.queue
                        .push_back(Action::Store(StoreAction::PutCatalog(c)));
                }
                Frame::Entitlements(e) => {
                    let mut merged = self.entitlements.clone().unwrap_or_default();
                    if merged.apply(e.clone()) {
                        self.entitlements = Some(merged.clone());
                        self.queue
                            .push_back(Action::Store(StoreAction::PutEntitlements(merged, e)));
                    }
                }
                Frame::LeaseGrant(g) => {
                    self.queue
                        .push_back(Action::Store(StoreAction::PutLease(g)));
                }
                Frame::Error(e) => {
                    if matches!(e.code, ErrorCode::BadSignature | ErrorCode::AgentMismatch)
                        && let Some(seq) = window.oldest_in_flight()
                    {
                        let reason =
                            format!("the collector refused it: {}: {}", e.code, e.message());
                        tracing::debug!(seq, %reason, "batch refused: quarantining it");
                        self.unacked.remove(&seq);
                        self.queue
                            .push_back(Action::Store(StoreAction::Quarantine { seq, reason }));
                    }
                    self.end(collector_error(&e), now_ms)
                }
                other => {
                    let got = frame_name(&other);
                    self.end(
                        SessionError::UnexpectedFrame {
                            expected: "ack or push",
                            got,
                        },
                        now_ms,
                    );
                }
            },
            // A frame after the connection ended (already buffered by the shell): ignored.
            State::Idle | State::Connecting | State::Backoff { .. } => {}
        }
    }

    /// A control frame for the collector (a snapshot request, a lease request or release): sent
    /// now when connected, else kept for the next connection — except a lease request, which
    /// the agent asks again if no grant comes.
    pub fn send_control(&mut self, frame: Frame) {
        if self.is_connected() {
            self.queue.push_back(Action::Send(frame));
            return;
        }
        if matches!(frame, Frame::LeaseRequest(_)) {
            return;
        }
        if self.pending_control.len() >= MAX_PENDING_CONTROL {
            self.pending_control.pop_front();
        }
        self.pending_control.push_back(frame);
    }

    /// Control frames waiting for a connection.
    pub fn pending_control(&self) -> usize {
        self.pending_control.len()
    }

    /// The agent stops: the connection closes and no attempt follows.
    pub fn close(&mut self) {
        self.queue.retain(|a| !is_send(a));
        if !matches!(self.state, State::Idle | State::Backoff { .. }) {
            self.queue.push_back(Action::Close);
        }
        self.state = State::Idle;
        self.queue
            .push_back(Action::Event(SessionEvent::State(ConnectionState::Closed)));
    }

    fn collector(&self) -> &str {
        &self.cfg.collectors[self.idx % self.cfg.collectors.len()]
    }

    fn attempt(&mut self, now_ms: i64) {
        let collector = self.collector().to_owned();
        self.state = State::Connecting;
        self.attempt_began_ms = now_ms;
        self.welcomed = false;
        self.acked_any = false;
        self.queue.push_back(Action::Event(SessionEvent::State(
            ConnectionState::Connecting {
                collector: collector.clone(),
            },
        )));
        self.queue.push_back(Action::Connect { collector });
    }

    fn welcome(&mut self, max_in_flight: u32, now_ms: i64) {
        self.welcomed = true;
        let collector = self.collector().to_owned();
        tracing::info!(collector = %collector, max_in_flight, "connected to collector");
        self.state = State::Connected {
            window: SendWindow::new(self.cfg.epoch, max_in_flight as usize),
        };
        self.queue.push_back(Action::Event(SessionEvent::State(
            ConnectionState::Connected {
                collector,
                max_in_flight,
            },
        )));
        while let Some(f) = self.pending_control.pop_front() {
            self.queue.push_back(Action::Send(f));
        }
        self.fill_window(now_ms);
    }

    /// Sends, oldest unacknowledged first, as far as the window allows.
    fn fill_window(&mut self, now_ms: i64) {
        let State::Connected { window } = &mut self.state else {
            return;
        };
        while let Some(seq) = window.next_to_send(self.unacked.iter().copied()) {
            window.sent(seq, now_ms);
            self.queue.push_back(Action::SendBatch(seq));
        }
    }

    /// Queues the store deletion of an acked batch, folding it into a deletion still queued so
    /// that the acks of one read commit together.
    fn push_ack(&mut self, acked: AckedBatch) {
        for a in self.queue.iter_mut().rev() {
            match a {
                Action::Store(StoreAction::Ack(v)) => {
                    v.push(acked);
                    return;
                }
                Action::SendBatch(_) => {}
                _ => break,
            }
        }
        self.queue
            .push_back(Action::Store(StoreAction::Ack(vec![acked])));
    }

    /// Ends the connection or attempt with `error` and schedules the next attempt.
    fn end(&mut self, error: SessionError, now_ms: i64) {
        // Frames queued for the dead connection go nowhere; store actions and events stay.
        self.queue.retain(|a| !is_send(a));
        if !matches!(self.state, State::Connecting) {
            self.queue.push_back(Action::Close);
        }
        // Reset the backoff only after a connection that did useful work, so a collector that
        // welcomes and then fails at once (overloaded, shutting down) is not hammered.
        if self.welcomed
            && (self.acked_any || now_ms.saturating_sub(self.attempt_began_ms) >= HEALTHY_MS)
        {
            self.backoff.reset();
        }
        if matches!(
            &error,
            SessionError::Collector {
                code: ErrorCode::RevokedAgent,
                ..
            }
        ) {
            self.queue.push_back(Action::Event(SessionEvent::Revoked));
        }
        let collector = self.collector().to_owned();
        let last_error = error.to_string();
        tracing::warn!(collector = %collector, error = %last_error, "collector connection ended");
        self.queue.push_back(Action::Event(SessionEvent::State(
            ConnectionState::Disconnected { last_error },
        )));
        if !self.welcomed {
            self.idx = self.idx.wrapping_add(1);
        }
        let delay = duration_ms(self.backoff.next_delay());
        self.state = State::Backoff {
            until_ms: now_ms.saturating_add(delay),
        };
    }
}

fn is_send(a: &Action) -> bool {
    matches!(
        a,
        Action::Send(_) | Action::SendBatch(_) | Action::Connect { .. }
    )
}

fn collector_error(e: &tally_protocol::frame::ErrorFrame) -> SessionError {
    SessionError::Collector {
        code: e.code,
        message: e.message(),
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tally_protocol::batch::AgentId;
    use tally_protocol::bounded::BoundedVec;
    use tally_protocol::entitlements::{
        CustomerEntitlements, EntitlementsSnapshot, Feature, Source,
    };
    use tally_protocol::frame::{Challenge, ErrorFrame, Welcome};
    use tally_protocol::names::{CustomerId, FeatureName};

    fn ack(epoch: u64, seq: u64) -> Ack {
        Ack {
            epoch,
            seq,
            outcome: AckOutcome::Committed,
        }
    }

    #[test]
    fn window_slow_starts_sends_in_order_and_checks_acks() {
        let backlog = [3u64, 4, 5, 6, 7, 8, 9];
        let mut w = SendWindow::<u32>::new(9, 4);
        // One batch until the first ack.
        assert_eq!(w.next_to_send(backlog.iter().copied()), Some(3));
        w.sent(3, 0);
        assert_eq!(w.next_to_send(backlog.iter().copied()), None);
        assert_eq!(w.acked(&ack(9, 3)), Ok((3, 0)));
        // Then two, then four (the maximum).
        for s in [4, 5] {
            assert_eq!(w.next_to_send(backlog.iter().copied()), Some(s));
            w.sent(s, 1);
        }
        assert_eq!(w.next_to_send(backlog.iter().copied()), None);
        assert_eq!(w.acked(&ack(9, 4)), Ok((4, 1)));
        assert_eq!(w.acked(&ack(9, 5)), Ok((5, 1)));
        // A batch acknowledged meanwhile is skipped.
        assert_eq!(w.next_to_send(backlog.iter().copied()), Some(6));
        w.skipped(6);
        for s in [7, 8, 9] {
            assert_eq!(w.next_to_send(backlog.iter().copied()), Some(s));
            w.sent(s, 2);
        }
        assert_eq!(w.in_flight(), 3);
        assert_eq!(w.next_to_send(backlog.iter().copied()), None);
        // Out of order, another epoch, nothing in flight: all refused.
        assert!(matches!(
            w.acked(&ack(9, 8)),
            Err(AckError::OutOfOrder { .. })
        ));
        assert!(matches!(
            w.acked(&ack(1, 7)),
            Err(AckError::OutOfOrder { .. })
        ));
        let mut fresh = SendWindow::<u32>::new(9, 4);
        assert!(matches!(
            fresh.acked(&ack(9, 3)),
            Err(AckError::NothingInFlight { .. })
        ));
        // A new connection starts again from the oldest unacknowledged batch.
        assert_eq!(fresh.next_to_send([7u64, 8, 9].into_iter()), Some(7));
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 42);
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d[5] >= Duration::from_millis(500) && d[5] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    const EPOCH: u64 = 7;
    const T0: i64 = 1_700_000_000_000;

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[5; 32])
    }

    fn cfg(collectors: &[&str]) -> SessionConfig {
        SessionConfig {
            collectors: collectors.iter().map(|c| c.to_string()).collect(),
            epoch: EPOCH,
            enroll_token: Some("tok".into()),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A session under test with its virtual clock.
    struct Harness {
        s: Session,
        now: i64,
    }

    impl Harness {
        /// Batches 1 ..= `upto` sealed and unacknowledged.
        fn new(collectors: &[&str], upto: u64) -> Self {
            let mut s = Session::new(cfg(collectors), key(), 1..=upto, upto, None, 42);
            s.start(T0);
            Harness { s, now: T0 }
        }

        fn drain(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.s.poll()).collect()
        }

        fn advance(&mut self, ms: i64) {
            self.now += ms;
            self.s.handle_timeout(self.now);
        }

        fn frame(&mut self, f: Frame) {
            self.s.frame_received(f, self.now);
        }

        /// Connects and completes the handshake; returns the actions after the welcome.
        fn handshake(&mut self, max_in_flight: u32) -> Vec<Action> {
            self.s.connected(&[1; 32], self.now);
            let a = self.drain();
            assert!(matches!(&a[..], [Action::Send(Frame::Hello(h))] if h.enroll_token.is_some()));
            self.frame(Frame::Challenge(Challenge { nonce: [2; 32] }));
            let a = self.drain();
            assert!(matches!(&a[..], [Action::Send(Frame::Proof(_))]), "{a:?}");
            self.frame(Frame::Welcome(Welcome {
                agent_id: AgentId::from_public_key(&key().verifying_key()),
                max_in_flight,
            }));
            self.drain()
        }
    }

    fn sends(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendBatch(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    fn disconnected(actions: &[Action]) -> Option<String> {
        actions.iter().find_map(|a| match a {
            Action::Event(SessionEvent::State(ConnectionState::Disconnected { last_error })) => {
                Some(last_error.clone())
            }
            _ => None,
        })
    }

    fn connect_target(actions: &[Action]) -> Option<String> {
        actions.iter().find_map(|a| match a {
            Action::Connect { collector } => Some(collector.clone()),
            _ => None,
        })
    }

    #[test]
    fn handshake_then_slow_start_and_acks_in_order() {
        let mut h = Harness::new(&["a:1"], 6);
        let first = h.drain();
        assert_eq!(
            first,
            vec![
                Action::Event(SessionEvent::State(ConnectionState::Connecting {
                    collector: "a:1".into()
                })),
                Action::Connect {
                    collector: "a:1".into()
                },
            ]
        );
        let a = h.handshake(4);
        assert_eq!(
            a[0],
            Action::Event(SessionEvent::State(ConnectionState::Connected {
                collector: "a:1".into(),
                max_in_flight: 4
            }))
        );
        // Slow start: one, then two, then four.
        assert_eq!(sends(&a), vec![1]);
        h.now += 3;
        h.frame(Frame::Ack(ack(EPOCH, 1)));
        let a = h.drain();
        assert_eq!(
            a[0],
            Action::Store(StoreAction::Ack(vec![AckedBatch {
                seq: 1,
                outcome: AckOutcome::Committed,
                rtt_ms: 3
            }]))
        );
        assert_eq!(sends(&a), vec![2, 3]);
        // Acks of one read fold into one store deletion.
        h.frame(Frame::Ack(ack(EPOCH, 2)));
        h.frame(Frame::Ack(ack(EPOCH, 3)));
        let a = h.drain();
        let Action::Store(StoreAction::Ack(acked)) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(acked.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(sends(&a), vec![4, 5, 6]);
        assert_eq!(h.s.in_flight(), 3);
        // A newly sealed batch goes out as soon as the window allows.
        h.s.batches_sealed(7, h.now);
        assert_eq!(sends(&h.drain()), vec![7]);
        assert_eq!(h.s.unacked(), 4);
    }

    #[test]
    fn a_lost_ack_then_reconnect_resends_everything_unacked_oldest_first() {
        let mut h = Harness::new(&["a:1"], 3);
        h.drain();
        assert_eq!(sends(&h.handshake(8)), vec![1]);
        h.frame(Frame::Ack(ack(EPOCH, 1)));
        assert_eq!(sends(&h.drain()), vec![2, 3]);
        // The ack of 2 is lost with the connection.
        h.s.connection_lost(SessionError::Connection("reset".into()), h.now);
        let a = h.drain();
        assert!(a.contains(&Action::Close));
        assert_eq!(disconnected(&a).as_deref(), Some("reset"));
        // A welcomed connection that got an ack resets the backoff: the first delay is at
        // most `backoff_min`.
        let wait = h.s.poll_timeout().unwrap() - h.now;
        assert!((50..=100).contains(&wait), "{wait}");
        h.advance(wait);
        // Sticky: the same collector again.
        assert_eq!(connect_target(&h.drain()).as_deref(), Some("a:1"));
        assert_eq!(sends(&h.handshake(8)), vec![2]);
        h.frame(Frame::Ack(ack(EPOCH, 2)));
        assert_eq!(sends(&h.drain()), vec![3]);
    }

    #[test]
    fn a_duplicated_or_out_of_order_ack_ends_the_connection_with_a_typed_error() {
        for bad in [ack(EPOCH, 1), ack(EPOCH, 3), ack(EPOCH + 1, 2)] {
            let mut h = Harness::new(&["a:1"], 3);
            h.drain();
            h.handshake(8);
            h.frame(Frame::Ack(ack(EPOCH, 1)));
            h.drain();
            // 2 and 3 in flight; `bad` is a repeat of 1, a skip to 3, or another epoch.
            h.frame(Frame::Ack(bad));
            let a = h.drain();
            let err = disconnected(&a).unwrap();
            assert!(err.starts_with("ack for epoch"), "{err}");
            assert!(a.contains(&Action::Close));
            assert!(!h.s.is_connected());
        }
        // The typed error itself.
        let mut w = SendWindow::<i64>::new(EPOCH, 2);
        w.sent(1, 0);
        w.acked(&ack(EPOCH, 1)).unwrap();
        assert_eq!(
            SessionError::from(w.acked(&ack(EPOCH, 1)).unwrap_err()),
            SessionError::Ack(AckError::NothingInFlight {
                epoch: EPOCH,
                seq: 1
            })
        );
    }

    fn snapshot(version: u64, full: bool, customers: &[&str]) -> EntitlementsSnapshot {
        EntitlementsSnapshot {
            version,
            built_at_ms: T0 + version as i64,
            full,
            customers: BoundedVec::new(
                customers
                    .iter()
                    .map(|c| CustomerEntitlements {
                        customer: CustomerId::new(*c).unwrap(),
                        plan: None,
                        features: BoundedVec::new(vec![Feature {
                            name: FeatureName::new(format!("f{version}")).unwrap(),
                            source: Source::Plan,
                        }])
                        .unwrap(),
                        limits: BoundedVec::default(),
                    })
                    .collect(),
            )
            .unwrap(),
        }
    }

    #[test]
    fn reordered_pushes_are_stored_then_reported_and_an_older_snapshot_changes_nothing() {
        let mut h = Harness::new(&["a:1"], 0);
        h.drain();
        h.handshake(8);
        h.frame(Frame::Entitlements(snapshot(5, true, &["acme", "zed"])));
        h.frame(Frame::Entitlements(snapshot(6, false, &["acme"])));
        // Reordered: version 4 arrives after 6 and is ignored by the merge.
        h.frame(Frame::Entitlements(snapshot(4, true, &["old"])));
        let catalog = Catalog {
            version: 2,
            meters: BoundedVec::new(tally_protocol::catalog::sample_meters().unwrap()).unwrap(),
        };
        h.frame(Frame::Catalog(catalog.clone()));
        let a = h.drain();
        let merged: Vec<_> = a
            .iter()
            .filter_map(|a| match a {
                Action::Store(StoreAction::PutEntitlements(e, _)) => Some(e.clone()),
                _ => None,
            })
            .collect();
        // The older snapshot is not stored again.
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[1].version, 6);
        let names: Vec<_> = merged[1]
            .customers
            .iter()
            .map(|c| c.customer.as_str())
            .collect();
        assert_eq!(names, vec!["acme", "zed"]);
        assert_eq!(
            merged[1].customers[0]
                .features
                .first()
                .map(|f| f.name.as_str()),
            Some("f6")
        );
        assert_eq!(
            a.last(),
            Some(&Action::Store(StoreAction::PutCatalog(catalog.clone())))
        );
        // Each store action reports its event once the shell committed it.
        assert_eq!(
            StoreAction::PutCatalog(catalog.clone()).into_event(),
            SessionEvent::Catalog(catalog)
        );
    }

    #[test]
    fn a_collector_error_ends_the_connection_and_the_next_attempt_starts_after_a_backoff() {
        let mut h = Harness::new(&["a:1", "b:2"], 1);
        h.drain();
        h.handshake(8);
        h.frame(Frame::Error(ErrorFrame::new(ErrorCode::Overloaded, "busy")));
        let a = h.drain();
        assert_eq!(
            disconnected(&a).as_deref(),
            Some("collector error overloaded (31): busy")
        );
        // Welcomed but nothing acknowledged: no reset, yet sticky (the same collector).
        h.advance(h.s.poll_timeout().unwrap() - h.now);
        assert_eq!(connect_target(&h.drain()).as_deref(), Some("a:1"));
        // During the handshake too: the enrolment token refused.
        h.s.connected(&[1; 32], h.now);
        h.drain();
        h.frame(Frame::Error(ErrorFrame::new(
            ErrorCode::InvalidEnrollToken,
            "no such token",
        )));
        let err = disconnected(&h.drain()).unwrap();
        assert!(err.contains("invalid_enroll_token"), "{err}");
        // Not welcomed: fail over to the next collector.
        h.advance(h.s.poll_timeout().unwrap() - h.now);
        assert_eq!(connect_target(&h.drain()).as_deref(), Some("b:2"));
        // An unexpected frame in the handshake is a typed error too.
        h.s.connected(&[1; 32], h.now);
        h.drain();
        h.frame(Frame::Ack(ack(EPOCH, 1)));
        assert_eq!(
            disconnected(&h.drain()).as_deref(),
            Some("unexpected frame ack instead of challenge")
        );
    }

    #[test]
    fn a_handshake_that_takes_too_long_times_out() {
        let mut h = Harness::new(&["a:1", "b:2"], 1);
        h.drain();
        h.s.connected(&[1; 32], h.now);
        h.drain();
        assert_eq!(h.s.poll_timeout(), Some(T0 + 5_000));
        h.advance(4_999);
        assert!(h.drain().is_empty());
        h.advance(1);
        let a = h.drain();
        assert_eq!(disconnected(&a).as_deref(), Some("handshake timed out"));
        assert!(a.contains(&Action::Close));
        h.advance(h.s.poll_timeout().unwrap() - h.now);
        assert_eq!(connect_target(&h.drain()).as_deref(), Some("b:2"));
    }

    #[test]
    fn failover_goes_round_in_order_and_backoff_grows_until_useful_work_resets_it() {
        let mut h = Harness::new(&["a:1", "b:2", "c:3"], 1);
        let mut targets = vec![connect_target(&h.drain()).unwrap()];
        let mut delays = Vec::new();
        for _ in 0..5 {
            h.s.connection_lost(SessionError::Connect("refused".into()), h.now);
            h.drain();
            let wait = h.s.poll_timeout().unwrap() - h.now;
            delays.push(wait);
            h.advance(wait);
            targets.push(connect_target(&h.drain()).unwrap());
        }
        assert_eq!(targets, ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3"]);
        // Jittered between half and all of 100 ms × 2^attempt, capped at 5 s.
        for (i, d) in delays.iter().enumerate() {
            let full = (100i64 << i).min(5_000);
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d}");
        }
        // Welcomed, and up for 30 s without an ack: healthy, the backoff resets.
        h.handshake(8);
        h.now += HEALTHY_MS;
        h.s.connection_lost(SessionError::Connection("reset".into()), h.now);
        h.drain();
        let wait = h.s.poll_timeout().unwrap() - h.now;
        assert!((50..=100).contains(&wait), "{wait}");
        h.advance(wait);
        // Sticky on the collector that welcomed.
        assert_eq!(connect_target(&h.drain()).as_deref(), Some("c:3"));
        // Welcomed, failing at once without an ack: no reset (the delay grows).
        h.handshake(8);
        h.s.connection_lost(SessionError::Connection("reset".into()), h.now);
        h.drain();
        let wait = h.s.poll_timeout().unwrap() - h.now;
        assert!((100..=200).contains(&wait), "{wait}");
    }

    #[test]
    fn a_batch_gone_from_the_store_is_not_shipped_and_close_ends_everything() {
        let mut h = Harness::new(&["a:1"], 2);
        h.drain();
        assert_eq!(sends(&h.handshake(8)), vec![1]);
        h.s.batch_missing(1, h.now);
        assert_eq!(sends(&h.drain()), vec![2]);
        assert_eq!((h.s.in_flight(), h.s.unacked()), (1, 1));
        // Nothing new was sealed: nothing more to send.
        h.s.batches_sealed(2, h.now);
        assert!(h.drain().is_empty());
        h.s.close();
        assert_eq!(
            h.drain(),
            vec![
                Action::Close,
                Action::Event(SessionEvent::State(ConnectionState::Closed))
            ]
        );
        assert_eq!(h.s.poll_timeout(), None);
    }

    fn quarantines(actions: &[Action]) -> Vec<(u64, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Store(StoreAction::Quarantine { seq, reason }) => {
                    Some((*seq, reason.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_batch_that_fails_the_check_before_sending_is_quarantined_and_the_next_ones_flow() {
        let mut h = Harness::new(&["a:1"], 3);
        h.drain();
        assert_eq!(sends(&h.handshake(8)), vec![1]);
        h.s.batch_unshippable(1, "signed by agent x".into(), h.now);
        let a = h.drain();
        assert_eq!(quarantines(&a), vec![(1, "signed by agent x".to_string())]);
        assert_eq!(sends(&a), vec![2], "the window moves on to the next batch");
        assert!(disconnected(&a).is_none(), "the connection stays up");
        h.frame(Frame::Ack(ack(EPOCH, 2)));
        assert_eq!(sends(&h.drain()), vec![3]);
        assert_eq!(h.s.unacked(), 1);
        // The quarantine's store write failed: the batch is sent again on the next connection.
        h.s.quarantine_failed(1, "disk full".into(), h.now);
        let a = h.drain();
        assert!(disconnected(&a).unwrap().contains("disk full"));
        assert_eq!(h.s.unacked(), 2);
        h.advance(h.s.poll_timeout().unwrap() - h.now);
        h.drain();
        assert_eq!(sends(&h.handshake(8)), vec![1]);
    }

    #[test]
    fn a_batch_the_collector_refuses_as_bad_signature_is_quarantined_not_resent_forever() {
        let mut h = Harness::new(&["a:1"], 4);
        h.drain();
        assert_eq!(sends(&h.handshake(8)), vec![1]);
        h.frame(Frame::Ack(ack(EPOCH, 1)));
        assert_eq!(sends(&h.drain()), vec![2, 3]);
        // The ack of 2 comes before the refusal of 3: the refusal is about the oldest in flight.
        h.frame(Frame::Ack(ack(EPOCH, 2)));
        h.frame(Frame::Error(ErrorFrame::new(
            ErrorCode::BadSignature,
            "batch signature does not verify",
        )));
        let a = h.drain();
        let q = quarantines(&a);
        assert_eq!(q.len(), 1, "{a:?}");
        assert_eq!(q[0].0, 3);
        assert!(q[0].1.contains("bad_signature"), "{}", q[0].1);
        assert!(disconnected(&a).is_some());
        // The next connection sends 4, never 3 again.
        h.advance(h.s.poll_timeout().unwrap() - h.now);
        h.drain();
        assert_eq!(sends(&h.handshake(8)), vec![4]);
        h.frame(Frame::Ack(ack(EPOCH, 4)));
        assert!(sends(&h.drain()).is_empty());
        assert_eq!(h.s.unacked(), 0);
        // Any other collector error quarantines nothing.
        h.s.batches_sealed(5, h.now);
        assert_eq!(sends(&h.drain()), vec![5]);
        h.frame(Frame::Error(ErrorFrame::new(ErrorCode::Overloaded, "busy")));
        assert!(quarantines(&h.drain()).is_empty());
        assert_eq!(h.s.unacked(), 1);
    }
}
