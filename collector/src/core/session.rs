//! The collector's side of one agent session, sans-IO: events and `now_ms` in, [`Action`]s out.
//! The QUIC shell ([`crate::net::quic`]) only moves bytes, asks the registry and the committer,
//! and feeds their answers back.
//!
//! The protocol (SPEC §5; `tally_protocol::frame`): `Hello → Challenge → Proof`, then the shell
//! asks the registry ([`Action::Admit`]) and on admission the session sends `Welcome`, the
//! catalog and an entitlement snapshot. Then each `Batch` is verified with the key
//! authenticated on this connection, handed to the committer ([`Action::Ingest`]) and answered
//! by an `Ack` once durable. The catalog is pushed again whenever it changes.
//!
//! Guarantees:
//! - Frames go out in the order they were queued, and an `Ack` waits for its batch's ingest
//!   reply: acks leave in batch order whatever order the replies come back in, and a push or a
//!   final error queued after an ack leaves after it.
//! - A batch that does not verify is never ingested: `Error{BadSignature|AgentMismatch|…}`
//!   (after the acks already owed), then close.
//! - More than `max_in_flight` batches without their ack sent is a protocol error
//!   (`Error{Overloaded}`): an agent that keeps to the window from `Welcome` never sees it.
//! - A refused or failed ingest reply ends the session with that error at the ack's place;
//!   nothing after it is sent.
//! - Shutdown, a peer that finished its stream and revocation stop reading: acks of batches
//!   already received are flushed first (not after revocation), then the final error if any,
//!   then [`Action::Close`].
//! - The handshake must reach `Welcome` by `handshake_timeout_ms` after the session began.
//! - Limits: at most `max_in_flight` acks owed, one catalog and one entitlement push waiting
//!   (a newer one replaces it), at most [`MAX_QUEUED_FRAMES`] frames waiting behind owed acks.

pub use crate::core::ingest::IngestReply;
use crate::core::ingest::{IngestBatch, IngestOutcome};
use crate::core::registry::Admission;
use std::collections::VecDeque;
use tally_protocol::batch::{AgentId, BatchError};
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{
    EntitlementsSnapshot, LeaseGrant, LeaseRelease, LeaseRequest, MAX_CUSTOMERS_PER_PUSH,
};
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{
    Ack, AckOutcome, ErrorFrame, Frame, FrameError, MAX_FRAME_BYTES, Welcome,
};
use tally_protocol::handshake::{Authenticated, ServerHandshake};
use tally_protocol::names::CustomerId;

/// Largest frame accepted before the handshake completes.
pub const HANDSHAKE_FRAME_BYTES: usize = 4096;

/// Most frames other than acks (pushes, lease grants) waiting behind owed acks. A catalog or
/// entitlement push replaces one already waiting, so only lease requests can reach this; one
/// more is answered `Error{Overloaded}` and the session ends.
pub const MAX_QUEUED_FRAMES: usize = 64;

/// Most customers a session tracks for entitlement pushes (those in its agent's batches and
/// requests); customers past it are answered once and not tracked.
pub const MAX_SEEN_CUSTOMERS: usize = 100_000;

/// The session's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Batches the agent may have without their ack (told in `Welcome`).
    pub max_in_flight: u32,
    /// Time from the start of the session to `Welcome`, ms.
    pub handshake_timeout_ms: i64,
}

/// Something for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// A handshake ended with this result (`ok`, `enrolled`, `timeout` or an error code name).
    Handshake(&'static str),
    /// A batch was refused before ingest: `malformed` or `bad_signature`.
    BatchRefused(&'static str),
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this frame.
    Send(Frame),
    /// Apply the admission rule to this agent; answer with [`Session::on_admitted`].
    Admit(Box<Authenticated>),
    /// Queue this verified batch for the committer; answer with [`Session::on_ingest_reply`].
    Ingest {
        /// The session's number for it.
        ticket: u64,
        /// The batch.
        batch: Box<IngestBatch>,
    },
    /// An ack was sent (for the registry's live facts and the logs).
    Acked {
        /// The agent.
        agent: AgentId,
        /// The batch's epoch.
        epoch: u64,
        /// The batch's seq.
        seq: u64,
        /// Its outcome.
        outcome: AckOutcome,
    },
    /// These customers' entitlements are wanted now (first seen in a batch, or asked for);
    /// answer with [`Session::on_entitlements_update`].
    Watch(Vec<CustomerId>),
    /// Answer this lease request with [`Session::on_lease_grant`].
    Lease(LeaseRequest),
    /// The agent ended a lease.
    LeaseRelease(LeaseRelease),
    /// Frames over this many bytes are refused from now on.
    SetFrameLimit(usize),
    /// Count this.
    Note(Note),
    /// Finish the stream and close the connection with this code; the session is over.
    Close {
        /// The QUIC application close code (0, or an error code's number).
        code: u32,
        /// The close reason.
        reason: &'static str,
    },
}

enum Out {
    Frame(Frame),
    Ack {
        ticket: u64,
        epoch: u64,
        seq: u64,
        reply: Option<IngestReply>,
    },
    Close {
        code: u32,
        reason: &'static str,
    },
}

enum State {
    AwaitHello(Box<ServerHandshake>),
    AwaitProof(Box<ServerHandshake>),
    AwaitAdmission(Box<Authenticated>),
    Ready(Box<Authenticated>),
    /// No more frames are read; the queue drains to its `Close`.
    Draining,
    Closed,
}

/// One agent session.
pub struct Session {
    config: SessionConfig,
    state: State,
    agent_id: Option<AgentId>,
    deadline_ms: i64,
    catalog: Option<Catalog>,
    entitlements: Option<EntitlementsSnapshot>,
    /// Customers whose entitlement changes are pushed to this agent.
    seen: std::collections::HashSet<CustomerId>,
    queue: VecDeque<Out>,
    /// Acks queued and not yet sent.
    unacked: usize,
    next_ticket: u64,
    actions: VecDeque<Action>,
}

impl Session {
    /// A session on a connection with this TLS `binding`, the server's random `nonce`, begun at
    /// `now_ms`.
    pub fn new(config: SessionConfig, binding: [u8; 32], nonce: [u8; 32], now_ms: i64) -> Self {
        Session {
            config,
            state: State::AwaitHello(Box::new(ServerHandshake::new(binding.to_vec(), nonce))),
            agent_id: None,
            deadline_ms: now_ms.saturating_add(config.handshake_timeout_ms),
            catalog: None,
            entitlements: None,
            seen: std::collections::HashSet::new(),
            queue: VecDeque::new(),
            unacked: 0,
            next_ticket: 1,
            actions: VecDeque::from([Action::SetFrameLimit(HANDSHAKE_FRAME_BYTES)]),
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True while the shell should read frames.
    pub fn wants_frames(&self) -> bool {
        matches!(
            self.state,
            State::AwaitHello(_) | State::AwaitProof(_) | State::Ready(_)
        )
    }

    /// True once the session closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The authenticated agent, once known.
    pub fn agent(&self) -> Option<AgentId> {
        self.agent_id
    }

    /// When [`Session::handle_timeout`] is due, if a timer runs (the handshake's).
    pub fn poll_timeout(&self) -> Option<i64> {
        match self.state {
            State::AwaitHello(_) | State::AwaitProof(_) | State::AwaitAdmission(_) => {
                Some(self.deadline_ms)
            }
            _ => None,
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now_ms: i64) {
        if now_ms >= self.deadline_ms && self.poll_timeout().is_some() {
            self.actions
                .push_back(Action::Note(Note::Handshake("timeout")));
            self.close_now(1, "handshake timeout");
        }
    }

    /// A frame arrived.
    pub fn handle_frame(&mut self, now_ms: i64, frame: Frame) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitHello(mut hs) => {
                let Frame::Hello(hello) = frame else {
                    return self.refuse_handshake(ErrorCode::UnexpectedFrame);
                };
                match hs.on_hello(hello) {
                    Ok(challenge) => {
                        self.actions
                            .push_back(Action::Send(Frame::Challenge(challenge)));
                        self.state = State::AwaitProof(hs);
                    }
                    Err(e) => self.refuse_handshake(e.code()),
                }
            }
            State::AwaitProof(mut hs) => {
                let Frame::Proof(proof) = frame else {
                    return self.refuse_handshake(ErrorCode::UnexpectedFrame);
                };
                match hs.on_proof(&proof) {
                    Ok(auth) => {
                        self.agent_id = Some(auth.agent_id);
                        let auth = Box::new(auth);
                        self.actions.push_back(Action::Admit(auth.clone()));
                        self.state = State::AwaitAdmission(auth);
                    }
                    Err(e) => self.refuse_handshake(e.code()),
                }
            }
            State::Ready(auth) => {
                self.state = State::Ready(auth);
                self.on_session_frame(now_ms, frame);
            }
            other @ (State::AwaitAdmission(_) | State::Draining | State::Closed) => {
                // Not reading: a frame now is the peer's mistake, but there is nobody to tell
                // before the current step ends.
                self.state = other;
            }
        }
    }

    /// A frame could not be read: the bytes are not a frame.
    pub fn handle_bad_frame(&mut self, error: &FrameError) {
        match self.state {
            State::AwaitHello(_) | State::AwaitProof(_) => self.refuse_handshake(error.code()),
            State::Ready(_) => {
                self.actions
                    .push_back(Action::Note(Note::BatchRefused("malformed")));
                self.finish(Some(ErrorFrame::new(error.code(), &error.to_string())));
            }
            _ => {}
        }
    }

    /// The peer finished its stream, or the stream failed: nothing more will be read.
    pub fn handle_peer_finished(&mut self) {
        match self.state {
            State::AwaitHello(_) | State::AwaitProof(_) => {
                self.refuse_handshake(ErrorCode::Malformed);
            }
            State::AwaitAdmission(_) | State::Ready(_) => self.finish(None),
            _ => {}
        }
    }

    /// The registry's decision on the agent authenticated by [`Action::Admit`].
    pub fn on_admitted(&mut self, now_ms: i64, admission: Admission) {
        let State::AwaitAdmission(auth) = std::mem::replace(&mut self.state, State::Closed) else {
            // A late answer (the handshake timed out meanwhile): nothing to do.
            return self.restore_closed_or_draining();
        };
        let label = match admission {
            Admission::Refuse(code) => return self.refuse_handshake(code),
            Admission::Known => "ok",
            Admission::Enrol => "enrolled",
        };
        self.actions.push_back(Action::Note(Note::Handshake(label)));
        self.actions.push_back(Action::Send(Frame::Welcome(Welcome {
            agent_id: auth.agent_id,
            max_in_flight: self.config.max_in_flight,
        })));
        self.actions
            .push_back(Action::SetFrameLimit(MAX_FRAME_BYTES));
        let catalog = self.catalog.clone().unwrap_or_default();
        let snapshot = self.entitlements.take().unwrap_or(EntitlementsSnapshot {
            version: 0,
            built_at_ms: now_ms,
            full: true,
            customers: Default::default(),
        });
        self.queue.push_back(Out::Frame(Frame::Catalog(catalog)));
        self.queue
            .push_back(Out::Frame(Frame::Entitlements(snapshot)));
        self.state = State::Ready(auth);
        self.flush();
    }

    /// The committer's answer for the batch of `ticket`.
    pub fn on_ingest_reply(&mut self, ticket: u64, reply: IngestReply) {
        for out in &mut self.queue {
            if let Out::Ack {
                ticket: t,
                reply: r @ None,
                ..
            } = out
                && *t == ticket
            {
                *r = Some(reply);
                break;
            }
        }
        self.flush();
    }

    /// The catalog changed (the shell also calls this once at the start with the current one).
    pub fn on_catalog(&mut self, catalog: Catalog) {
        match self.state {
            State::Ready(_) => {
                self.push_replacing(Frame::Catalog(catalog));
            }
            State::AwaitHello(_) | State::AwaitProof(_) | State::AwaitAdmission(_) => {
                self.catalog = Some(catalog);
            }
            _ => {}
        }
    }

    /// New entitlements for this agent.
    pub fn on_entitlements(&mut self, snapshot: EntitlementsSnapshot) {
        match self.state {
            State::Ready(_) => {
                self.push_replacing(Frame::Entitlements(snapshot));
            }
            State::AwaitHello(_) | State::AwaitProof(_) | State::AwaitAdmission(_) => {
                self.entitlements = Some(snapshot);
            }
            _ => {}
        }
    }

    /// Customers this session pushes entitlement changes for.
    pub fn seen_customers(&self) -> impl Iterator<Item = &CustomerId> {
        self.seen.iter()
    }

    /// True when this session pushes `customer`'s changes.
    pub fn watches(&self, customer: &CustomerId) -> bool {
        self.seen.contains(customer)
    }

    /// Updated entitlements of some customers (`full: false`). A waiting update absorbs it
    /// (customer by customer, newest wins) while it fits one frame, so changes are never lost
    /// and the queue stays bounded.
    pub fn on_entitlements_update(&mut self, snapshot: EntitlementsSnapshot) {
        if !matches!(self.state, State::Ready(_)) {
            return;
        }
        let waiting = self.queue.iter_mut().rev().find_map(|o| match o {
            Out::Frame(Frame::Entitlements(s)) if !s.full => Some(s),
            _ => None,
        });
        if let Some(w) = waiting {
            let mut merged: Vec<_> = w.customers.iter().cloned().collect();
            for c in snapshot.customers.iter() {
                match merged.iter_mut().find(|m| m.customer == c.customer) {
                    Some(m) => *m = c.clone(),
                    None => merged.push(c.clone()),
                }
            }
            if merged.len() <= MAX_CUSTOMERS_PER_PUSH
                && let Ok(customers) = tally_protocol::bounded::BoundedVec::new(merged)
            {
                w.customers = customers;
                w.version = w.version.max(snapshot.version);
                w.built_at_ms = w.built_at_ms.max(snapshot.built_at_ms);
                return;
            }
        }
        self.queue
            .push_back(Out::Frame(Frame::Entitlements(snapshot)));
        self.flush();
    }

    /// The answer to an [`Action::Lease`].
    pub fn on_lease_grant(&mut self, grant: LeaseGrant) {
        if !matches!(self.state, State::Ready(_) | State::Draining) {
            return;
        }
        self.queue.push_back(Out::Frame(Frame::LeaseGrant(grant)));
        self.flush();
    }

    /// Tracks customers the collector remembers for this agent (from earlier sessions);
    /// returns those not tracked before, for the shell to push.
    pub fn watch(&mut self, customers: &[CustomerId]) -> Vec<CustomerId> {
        self.track(customers.iter())
    }

    /// Tracks customers; returns those not tracked before.
    fn track<'a>(&mut self, customers: impl Iterator<Item = &'a CustomerId>) -> Vec<CustomerId> {
        let mut new = Vec::new();
        for c in customers {
            if !self.seen.contains(c) && self.seen.len() < MAX_SEEN_CUSTOMERS {
                self.seen.insert(c.clone());
                new.push(c.clone());
            }
        }
        new
    }

    /// The agent was revoked: it is told at once and the session ends (owed acks are dropped;
    /// their batches are durable and will be acked `Duplicate` if it ever comes back).
    pub fn on_revoked(&mut self) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.queue.clear();
        self.unacked = 0;
        let e = ErrorFrame::new(ErrorCode::RevokedAgent, "agent revoked");
        self.actions.push_back(Action::Send(Frame::Error(e)));
        self.close_now(u32::from(ErrorCode::RevokedAgent.number()), "revoked");
    }

    /// The collector is shutting down: stop reading, flush the acks owed, then say so.
    pub fn on_shutdown(&mut self) {
        match self.state {
            State::Ready(_) | State::AwaitAdmission(_) => self.finish(Some(ErrorFrame::new(
                ErrorCode::ShuttingDown,
                "collector is shutting down",
            ))),
            State::AwaitHello(_) | State::AwaitProof(_) => {
                self.close_now(1, "shutting down");
            }
            _ => {}
        }
    }

    fn on_session_frame(&mut self, _now_ms: i64, frame: Frame) {
        let State::Ready(auth) = &self.state else {
            return;
        };
        match frame {
            Frame::Batch(signed) => match signed.verify(&auth.public_key) {
                Ok(body) => {
                    if self.unacked >= self.config.max_in_flight as usize {
                        return self.finish(Some(ErrorFrame::new(
                            ErrorCode::Overloaded,
                            "more batches in flight than max_in_flight",
                        )));
                    }
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.queue.push_back(Out::Ack {
                        ticket,
                        epoch: body.epoch,
                        seq: body.seq,
                        reply: None,
                    });
                    self.unacked += 1;
                    let new = self.track(body.deltas.iter().map(|d| &d.customer));
                    if !new.is_empty() {
                        self.actions.push_back(Action::Watch(new));
                    }
                    self.actions.push_back(Action::Ingest {
                        ticket,
                        batch: Box::new(IngestBatch { body, signed }),
                    });
                }
                Err(e) => {
                    let code = match e {
                        BatchError::BadSignature => ErrorCode::BadSignature,
                        BatchError::AgentMismatch { .. } => ErrorCode::AgentMismatch,
                        _ => ErrorCode::Malformed,
                    };
                    let label = if code == ErrorCode::Malformed {
                        "malformed"
                    } else {
                        "bad_signature"
                    };
                    self.actions
                        .push_back(Action::Note(Note::BatchRefused(label)));
                    self.finish(Some(ErrorFrame::new(code, &e.to_string())));
                }
            },
            Frame::LeaseRequest(req) => {
                if self.queue.len() - self.unacked >= MAX_QUEUED_FRAMES {
                    return self.finish(Some(ErrorFrame::new(
                        ErrorCode::Overloaded,
                        "too many requests behind unacknowledged batches",
                    )));
                }
                self.track(std::iter::once(&req.customer));
                self.actions.push_back(Action::Lease(req));
            }
            Frame::LeaseRelease(rel) => self.actions.push_back(Action::LeaseRelease(rel)),
            Frame::EntitlementsRequest(req) => {
                // Every customer asked for is answered, tracked or not.
                self.track(req.customers.iter());
                self.actions
                    .push_back(Action::Watch(req.customers.iter().cloned().collect()));
            }
            _ => self.finish(Some(ErrorFrame::new(
                ErrorCode::UnexpectedFrame,
                "unexpected frame",
            ))),
        }
    }

    /// Queues a push; one of the same kind still waiting is replaced (the newer supersedes it).
    fn push_replacing(&mut self, frame: Frame) {
        let same = |f: &Frame| std::mem::discriminant(f) == std::mem::discriminant(&frame);
        match self
            .queue
            .iter_mut()
            .find(|o| matches!(o, Out::Frame(f) if same(f)))
        {
            Some(waiting) => *waiting = Out::Frame(frame),
            None => self.queue.push_back(Out::Frame(frame)),
        }
        self.flush();
    }

    /// Stops reading; the queue drains (acks owed first), then `last`, then close.
    fn finish(&mut self, last: Option<ErrorFrame>) {
        let code = last.as_ref().map_or(0, |e| u32::from(e.code.number()));
        if let Some(e) = last {
            self.queue.push_back(Out::Frame(Frame::Error(e)));
        }
        self.queue.push_back(Out::Close {
            code,
            reason: if code == 0 { "bye" } else { "error" },
        });
        self.state = State::Draining;
        self.flush();
    }

    fn refuse_handshake(&mut self, code: ErrorCode) {
        self.actions
            .push_back(Action::Note(Note::Handshake(code.name())));
        let e = ErrorFrame::new(code, "handshake refused");
        self.actions.push_back(Action::Send(Frame::Error(e)));
        self.close_now(u32::from(code.number()), "error");
    }

    fn close_now(&mut self, code: u32, reason: &'static str) {
        self.queue.clear();
        self.unacked = 0;
        self.actions.push_back(Action::Close { code, reason });
        self.state = State::Closed;
    }

    fn restore_closed_or_draining(&mut self) {
        self.state = if self.queue.is_empty() {
            State::Closed
        } else {
            State::Draining
        };
    }

    /// Moves every ready frame at the head of the queue to the actions.
    fn flush(&mut self) {
        while let Some(out) = self.queue.pop_front() {
            match out {
                Out::Frame(f) => self.actions.push_back(Action::Send(f)),
                Out::Ack {
                    ticket,
                    epoch,
                    seq,
                    reply: None,
                } => {
                    // Not durable yet: everything behind it waits.
                    self.queue.push_front(Out::Ack {
                        ticket,
                        epoch,
                        seq,
                        reply: None,
                    });
                    return;
                }
                Out::Ack {
                    epoch,
                    seq,
                    reply: Some(reply),
                    ..
                } => {
                    self.unacked = self.unacked.saturating_sub(1);
                    match reply {
                        Ok(IngestOutcome::Ack(outcome)) => {
                            self.actions.push_back(Action::Send(Frame::Ack(Ack {
                                epoch,
                                seq,
                                outcome,
                            })));
                            if let Some(agent) = self.agent_id {
                                self.actions.push_back(Action::Acked {
                                    agent,
                                    epoch,
                                    seq,
                                    outcome,
                                });
                            }
                        }
                        Ok(IngestOutcome::Refused(code)) | Err(code) => {
                            let e = ErrorFrame::new(code, "batch not committed; retry later");
                            self.actions.push_back(Action::Send(Frame::Error(e)));
                            return self.close_now(u32::from(code.number()), "error");
                        }
                    }
                }
                Out::Close { code, reason } => return self.close_now(code, reason),
            }
        }
    }
}

#[cfg(test)]
mod tests;
