//! The QUIC shell of the agent session: accepts connections, moves frames between the stream
//! and the session machine ([`crate::core::session`]), and carries out its actions (ask the
//! registry, queue batches for the committer, note metrics, close). No protocol rule lives here.
//!
//! Guarantees (with the machine's):
//! - Connections beyond the configured limit, and beyond the configured handshakes per second,
//!   are refused at the QUIC level, before any TLS or signature work.
//! - An agent key has at most [`MAX_LIVE_PER_AGENT`](crate::net::registry::MAX_LIVE_PER_AGENT)
//!   live connections (one more closes its oldest), and a closed connection is forgotten, so
//!   memory per agent goes back to nothing when it is gone.
//! - Before `Welcome` a frame may be at most [`HANDSHAKE_FRAME_BYTES`], and the connection,
//!   its stream and the handshake must each be done within the configured timeout.
//! - On shutdown, every connection stops reading, flushes the acks of batches it received and
//!   closes; [`serve`] waits at most 10 s for them.

use crate::config::CollectorConfig;
use crate::core::registry::Admission;
pub use crate::core::session::HANDSHAKE_FRAME_BYTES;
use crate::core::session::{Action, IngestReply, Note, Session, SessionConfig};
use crate::ingest::IngestHandle;
use crate::metrics::Metrics;
use crate::net::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tally_clock::SharedClock;
use tally_forward::retry::TokenBucket;
use tally_net::frames::{FrameReader, ReadError, write_frame};
use tally_protocol::catalog::Catalog;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::AckOutcome;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

/// The limits of one agent session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Unacknowledged batches an agent may have in flight per connection.
    pub max_in_flight: u32,
    /// Most concurrent QUIC connections.
    pub max_connections: usize,
    /// Time allowed from connection to `Welcome`.
    pub handshake_timeout: Duration,
    /// New connections per second (and burst).
    pub handshakes_per_s: u32,
}

impl From<&CollectorConfig> for SessionLimits {
    fn from(c: &CollectorConfig) -> Self {
        SessionLimits {
            max_in_flight: c.max_in_flight,
            max_connections: c.max_connections,
            handshake_timeout: c.handshake_timeout,
            handshakes_per_s: c.max_handshakes_per_s,
        }
    }
}

/// What the QUIC server holds: narrow handles, each owned elsewhere.
pub struct QuicServer {
    /// Session limits.
    pub limits: SessionLimits,
    /// The committer's queue.
    pub ingest: IngestHandle,
    /// Admission, live connections, revocation.
    pub registry: Arc<Registry>,
    /// The current catalog; sessions push it when it changes.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Entitlements: snapshots, their changes and the lease book.
    pub entitlements: Arc<crate::entitlements::Entitlements>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Wall time.
    pub clock: SharedClock,
}

/// Serves QUIC until `shutdown` turns true, then lets every connection finish its acks.
pub async fn serve(
    endpoint: quinn::Endpoint,
    server: Arc<QuicServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let rate = server.limits.handshakes_per_s;
    let mut handshakes = TokenBucket::new(rate, rate, server.clock.now_ms());
    loop {
        while conns.try_join_next().is_some() {}
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Some(incoming) = incoming else { break };
        if conns.len() >= server.limits.max_connections {
            server.metrics.connection_refused("max_connections");
            incoming.refuse();
            continue;
        }
        // Before any TLS or signature work: a flood of handshakes costs little to refuse.
        if handshakes.try_take(server.clock.now_ms()).is_err() {
            server.metrics.connection_refused("handshake_rate");
            incoming.refuse();
            continue;
        }
        let server = server.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            server.metrics.connections.inc();
            server.metrics.connections_active.inc();
            handle(incoming, &server, shutdown).await;
            server.metrics.connections_active.dec();
        });
    }
    // Draining: connections stop reading new batches and flush their acks.
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn handle(
    incoming: quinn::Incoming,
    server: &Arc<QuicServer>,
    shutdown: watch::Receiver<bool>,
) {
    let timeout = server.limits.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection failed before it was established");
            return;
        }
        Err(_) => return,
    };
    let (send, recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no stream");
            conn.close(quinn::VarInt::from_u32(1), b"no stream");
            return;
        }
        Err(_) => {
            conn.close(quinn::VarInt::from_u32(1), b"handshake timeout");
            return;
        }
    };
    let Some(binding) = tally_net::tls::binding(&conn) else {
        conn.close(quinn::VarInt::from_u32(1), b"no keying material");
        return;
    };
    let mut nonce = [0u8; 32];
    if getrandom::getrandom(&mut nonce).is_err() {
        conn.close(
            quinn::VarInt::from_u32(u32::from(ErrorCode::Internal.number())),
            b"error",
        );
        return;
    }
    let config = SessionConfig {
        max_in_flight: server.limits.max_in_flight.max(1),
        handshake_timeout_ms: i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
    };
    let session = Session::new(config, binding, nonce, server.clock.now_ms());
    let span = tracing::info_span!("agent_session", agent = tracing::field::Empty);
    Shell {
        server: server.clone(),
        conn,
        send,
        reader: FrameReader::new(recv),
        session,
        replies: JoinSet::new(),
        shutdown,
        agent: None,
    }
    .run()
    .instrument(span)
    .await;
}

/// One connection: the session machine and the I/O it asks for.
struct Shell {
    server: Arc<QuicServer>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    session: Session,
    replies: JoinSet<(u64, IngestReply)>,
    shutdown: watch::Receiver<bool>,
    /// The agent, once admitted (its live connection is registered under it).
    agent: Option<tally_protocol::batch::AgentId>,
}

impl Shell {
    /// Serves the connection, then forgets it in the registry.
    async fn run(mut self) {
        self.serve().await;
        if let Some(agent) = self.agent {
            self.server
                .registry
                .unregister_live(agent, self.conn.stable_id());
        }
    }

    async fn serve(&mut self) {
        let mut catalog = self.server.catalog.clone();
        self.session
            .on_catalog(catalog.borrow_and_update().as_ref().clone());
        let mut catalog_open = true;
        let mut changes = self.server.entitlements.subscribe();
        let mut changes_open = true;
        self.session
            .on_entitlements(tally_protocol::entitlements::EntitlementsSnapshot {
                version: self.server.entitlements.next_version(),
                built_at_ms: self.server.clock.now_ms(),
                full: false,
                customers: Default::default(),
            });
        let mut shutdown_seen = false;
        loop {
            if self.act().await {
                return;
            }
            let now = self.server.clock.now_ms();
            let timer = self.session.poll_timeout().map(|due| {
                Duration::from_millis(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
            });
            let reading = self.session.wants_frames();
            let mut wanted = Vec::new();
            tokio::select! {
                Some(r) = self.replies.join_next(), if !self.replies.is_empty() => {
                    let (ticket, reply) = r.unwrap_or((0, Err(ErrorCode::Internal)));
                    self.session.on_ingest_reply(ticket, reply);
                }
                f = self.reader.next(), if reading => match f {
                    Ok(frame) => self.session.handle_frame(self.server.clock.now_ms(), frame),
                    Err(ReadError::Frame(e)) => self.session.handle_bad_frame(&e),
                    Err(e) => {
                        tracing::debug!(error = %e, "stream ended");
                        self.session.handle_peer_finished();
                    }
                },
                c = catalog.changed(), if catalog_open => match c {
                    Ok(()) => {
                        let c = catalog.borrow_and_update().as_ref().clone();
                        self.session.on_catalog(c);
                    }
                    Err(_) => catalog_open = false,
                },
                c = changes.recv(), if changes_open => {
                    use tokio::sync::broadcast::error::RecvError;
                    wanted = match c {
                        Ok(crate::entitlements::Change::Customer(c)) => {
                            if self.session.watches(&c) { vec![c] } else { Vec::new() }
                        }
                        Ok(crate::entitlements::Change::All) | Err(RecvError::Lagged(_)) => {
                            self.session.seen_customers().cloned().collect()
                        }
                        Err(RecvError::Closed) => {
                            changes_open = false;
                            Vec::new()
                        }
                    };
                },
                _ = self.shutdown.wait_for(|s| *s), if !shutdown_seen => {
                    shutdown_seen = true;
                    self.session.on_shutdown();
                }
                _ = tokio::time::sleep(timer.unwrap_or(Duration::ZERO)), if timer.is_some() => {
                    self.session.handle_timeout(self.server.clock.now_ms());
                }
            }
            self.push_entitlements(wanted).await;
        }
    }

    /// Carries out the session's actions; true once the connection is closed.
    async fn act(&mut self) -> bool {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Send(frame) => {
                    if let Err(e) = write_frame(&mut self.send, &frame).await {
                        tracing::debug!(error = %e, "write failed");
                        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
                        return true;
                    }
                }
                Action::Admit(auth) => {
                    let registry = self.server.registry.clone();
                    let (id, key, token) = (
                        auth.agent_id,
                        auth.public_key.to_bytes(),
                        auth.enroll_token.clone(),
                    );
                    let admission = tokio::task::spawn_blocking(move || {
                        registry.admit(id, key, token.as_deref())
                    })
                    .await;
                    let admission = match admission {
                        Ok(Ok(a)) => a,
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "admission failed");
                            Admission::Refuse(ErrorCode::Internal)
                        }
                        Err(_) => Admission::Refuse(ErrorCode::Internal),
                    };
                    if let Admission::Enrol(token) = &admission {
                        tracing::info!(agent = %id, token = %token, "agent enrolled");
                    }
                    if !matches!(admission, Admission::Refuse(_)) {
                        tracing::Span::current().record("agent", tracing::field::display(id));
                        self.server.registry.register_live(id, self.conn.clone());
                        self.agent = Some(id);
                    }
                    let admitted = !matches!(admission, Admission::Refuse(_));
                    self.session
                        .on_admitted(self.server.clock.now_ms(), admission);
                    if admitted {
                        // On connect: the customers its earlier sessions tracked.
                        let known = self.server.entitlements.remembered(id);
                        let again = self.session.watch(&known);
                        self.push_entitlements(again).await;
                    }
                }
                Action::Ingest { ticket, batch } => match self.server.ingest.submit(*batch).await {
                    Ok(rx) => {
                        self.replies.spawn(async move {
                            (ticket, rx.await.unwrap_or(Err(ErrorCode::Internal)))
                        });
                    }
                    Err(_) => self
                        .session
                        .on_ingest_reply(ticket, Err(ErrorCode::ShuttingDown)),
                },
                Action::Watch(customers) => {
                    if let Some(agent) = self.session.agent() {
                        self.server.entitlements.remember(agent, &customers);
                    }
                    self.push_entitlements(customers).await;
                }
                Action::Lease(req) => {
                    let grant = self.lease(req).await;
                    self.session.on_lease_grant(grant);
                }
                Action::LeaseRelease(rel) => {
                    if let Some(agent) = self.session.agent() {
                        let hub = self.server.entitlements.clone();
                        let r = tokio::task::spawn_blocking(move || hub.release(agent, &rel)).await;
                        if !matches!(r, Ok(Ok(()))) {
                            tracing::warn!(%agent, "lease release not recorded");
                        }
                    }
                }
                Action::Acked {
                    agent,
                    epoch,
                    seq,
                    outcome,
                } => {
                    tracing::debug!(%agent, epoch, seq, outcome = outcome_name(outcome), "batch acked");
                    // Leases learnt of this batch's usage in its ingest transaction.
                    self.server.registry.acked(agent, epoch, seq, outcome);
                }
                Action::SetFrameLimit(n) => self.reader.set_limit(n),
                Action::Note(Note::Handshake(result)) => self.server.metrics.handshake(result),
                Action::Note(Note::BatchRefused(result)) => {
                    self.server.metrics.batch(result);
                    if result == "bad_signature" {
                        self.server.metrics.signature_failures.inc();
                    }
                    tracing::warn!(agent = ?self.session.agent(), result, "batch refused");
                }
                Action::Close { code, reason } => {
                    let _ = self.send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.send.stopped()).await;
                    self.conn
                        .close(quinn::VarInt::from_u32(code), reason.as_bytes());
                    return true;
                }
            }
        }
        false
    }
}

impl Shell {
    /// Builds and queues snapshots of these customers.
    async fn push_entitlements(&mut self, customers: Vec<tally_protocol::names::CustomerId>) {
        if customers.is_empty() {
            return;
        }
        let hub = self.server.entitlements.clone();
        match tokio::task::spawn_blocking(move || hub.snapshots(&customers)).await {
            Ok(Ok(frames)) => {
                for f in frames {
                    self.session.on_entitlements_update(f);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "entitlement snapshot failed"),
            Err(e) => tracing::warn!(error = %e, "entitlement snapshot task failed"),
        }
    }

    /// Answers a lease request from the lease book (nothing granted if it fails).
    async fn lease(
        &mut self,
        req: tally_protocol::entitlements::LeaseRequest,
    ) -> tally_protocol::entitlements::LeaseGrant {
        let none = tally_protocol::entitlements::LeaseGrant {
            request_id: req.request_id,
            customer: req.customer.clone(),
            meter: req.meter.clone(),
            lease_id: 0,
            period_start_ms: req.period_start_ms,
            granted_total: rust_decimal::Decimal::ZERO,
            added: rust_decimal::Decimal::ZERO,
            expires_at_ms: self.server.clock.now_ms(),
        };
        let Some(agent) = self.session.agent() else {
            return none;
        };
        let hub = self.server.entitlements.clone();
        match tokio::task::spawn_blocking(move || hub.lease(agent, &req)).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease request failed");
                none
            }
            Err(_) => none,
        }
    }
}

/// The committed outcome's name, for logs.
pub fn outcome_name(o: AckOutcome) -> &'static str {
    match o {
        AckOutcome::Committed => "committed",
        AckOutcome::Duplicate => "duplicate",
        AckOutcome::Quarantined { .. } => "quarantined",
    }
}
