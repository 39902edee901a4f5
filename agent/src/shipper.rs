//! The shipper: sealed batches from the local store to a collector over QUIC, until acknowledged.
//!
//! Owns the QUIC client (quinn + rustls with the `ring` provider, TLS 1.3 only, ALPN
//! `tally/1`, the server verified against the deployment CA alone, server name = the host part
//! of the collector address), the handshake of SPEC §5, the in-flight window, and reconnection.
//!
//! Per connection: one bidirectional stream; `Hello` (with the enrolment token, every time),
//! `Challenge`, `Proof` over the TLS exporter binding, `Welcome{max_in_flight}`. Then batches go
//! out in seq order, at most `max_in_flight` unacknowledged (starting from one per connection
//! and doubling with every ack); acks come back in the same order.
//! `Catalog` and `Entitlements` pushes are stored on disk and applied. A `Frame::Error` from the
//! collector, a protocol violation or a lost connection ends the connection.
//!
//! Guarantees:
//! - A batch is deleted from the store only after its `Ack` (`Committed`, `Duplicate` or
//!   `Quarantined`) arrived on a connection it was sent on, and the deletion commits before the
//!   ack is reported to `flush()` (A1).
//! - After any reconnect every unacknowledged batch is sent again, oldest first; resends are
//!   harmless because the collector dedups by `(agent, epoch, seq)` (A4).
//! - Collectors are tried in the configured order; on failure the next one is tried after an
//!   exponential backoff with jitter (between half and all of `min × 2^attempt`, capped at
//!   `max`). A connection that got batches acknowledged, or stayed up 30 s, resets the backoff.
//!   Failover is sticky:
//!   the agent stays on the collector that works until it fails.

use crate::agent::{Shared, lock};
use crate::error::StartError;
use crate::status::ConnectionState;
use quinn::{ClientConfig, Endpoint, RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_protocol::frame::{AckOutcome, Frame, FrameDecoder, encode_frame};
use tally_protocol::handshake::ClientHandshake;
use tokio::sync::watch;
use tracing::Instrument;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection that lasted this long counts as healthy even if it acknowledged nothing.
const HEALTHY: Duration = Duration::from_secs(30);

/// The largest window the agent uses, whatever the collector allows.
const MAX_WINDOW: u32 = 1024;

/// The QUIC client configuration: TLS 1.3 with the `ring` provider, trusting only `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<ClientConfig, StartError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| StartError::Ca(e.to_string()))?;
        roots.add(cert).map_err(|e| StartError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(StartError::Ca("no certificate in the PEM".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StartError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tally_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| StartError::Ca(e.to_string()))?;
    let mut cfg = ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30))
            .map_err(|e| StartError::Config(e.to_string()))?,
    ));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The host part of `host:port`, `[v6]:port` or a bare host: the TLS server name.
pub fn server_name(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// Exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`, jittered by `seed`.
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

/// The send side of one connection, as a state machine (no I/O, the caller passes the time):
/// which batch goes next, how many may be in flight, and whether an ack is the expected one.
///
/// Slow start: a new connection sends one batch, and the window doubles with every ack up to
/// `max_in_flight`. Acks in flight are lost with a connection, so a collector that keeps dropping
/// connections still gets at least one batch acknowledged per connection.
#[derive(Debug)]
pub struct SendWindow<T = Instant> {
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
        debug_assert!(seq > self.sent_upto);
        self.sent_upto = seq;
        self.inflight.push_back((seq, at));
    }

    /// `seq` turned out to be acknowledged already; move past it.
    pub fn skipped(&mut self, seq: u64) {
        self.sent_upto = self.sent_upto.max(seq);
    }

    /// Matches an ack against the oldest batch in flight; returns its seq and send time.
    pub fn acked(&mut self, ack: &tally_protocol::frame::Ack) -> Result<(u64, T), AckError> {
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

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}

fn set_conn(sh: &Shared, s: ConnectionState) {
    sh.metrics
        .connected
        .set(i64::from(matches!(s, ConnectionState::Connected { .. })));
    *lock(&sh.conn) = s;
}

/// Runs until `stop` turns true.
pub(crate) async fn run(sh: Arc<Shared>, client: ClientConfig, mut stop: watch::Receiver<bool>) {
    let collectors = sh.cfg.collectors.clone();
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let mut backoff = Backoff::new(
        sh.cfg.backoff_min,
        sh.cfg.backoff_max,
        u64::from_le_bytes(seed),
    );
    let mut idx = 0;
    while !*stop.borrow() {
        let addr = &collectors[idx % collectors.len()];
        set_conn(
            &sh,
            ConnectionState::Connecting {
                collector: addr.clone(),
            },
        );
        let mut welcomed = false;
        let began = Instant::now();
        let acked_before = lock(&sh.backlog).last_acked;
        let span =
            tracing::info_span!("collector_session", collector = %addr, agent_id = %sh.agent_id);
        let r = session(&sh, &client, addr, &mut stop, &mut welcomed)
            .instrument(span)
            .await;
        if *stop.borrow() {
            break;
        }
        // Reset the backoff only after a connection that did useful work, so a collector that
        // welcomes and then fails at once (overloaded, shutting down) is not hammered.
        if welcomed && (lock(&sh.backlog).last_acked != acked_before || began.elapsed() >= HEALTHY)
        {
            backoff.reset();
        }
        let err = match r {
            Ok(()) => "connection closed".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(collector = %addr, error = %err, "collector connection ended");
        *lock(&sh.last_error) = Some(err.clone());
        set_conn(&sh, ConnectionState::Disconnected { last_error: err });
        if !welcomed {
            idx += 1;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
    set_conn(&sh, ConnectionState::Closed);
}

async fn write_frame(send: &mut SendStream, f: &Frame) -> Result<(), BoxError> {
    send.write_all(&encode_frame(f)?).await?;
    Ok(())
}

async fn read_frame(
    recv: &mut RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Frame, BoxError> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(f);
        }
        match recv.read(buf).await? {
            Some(n) => dec.push(&buf[..n]),
            None => return Err("stream closed by the collector".into()),
        }
    }
}

fn collector_error(e: &tally_protocol::frame::ErrorFrame) -> BoxError {
    format!("collector error {}: {}", e.code, e.message()).into()
}

async fn session(
    sh: &Arc<Shared>,
    client: &ClientConfig,
    addr: &str,
    stop: &mut watch::Receiver<bool>,
    welcomed: &mut bool,
) -> Result<(), BoxError> {
    let timeout = sh.cfg.connect_timeout;
    let target: SocketAddr = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await??
        .next()
        .ok_or("address did not resolve")?;
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let endpoint = Endpoint::client(bind)?;
    let r = async {
        let conn = tokio::time::timeout(
            timeout,
            endpoint.connect_with(client.clone(), target, server_name(addr))?,
        )
        .await??;
        let r = connected(sh, &conn, addr, stop, welcomed).await;
        conn.close(0u32.into(), b"bye");
        r
    }
    .await;
    endpoint.close(0u32.into(), b"bye");
    r
}

async fn connected(
    sh: &Arc<Shared>,
    conn: &quinn::Connection,
    addr: &str,
    stop: &mut watch::Receiver<bool>,
    welcomed: &mut bool,
) -> Result<(), BoxError> {
    let timeout = sh.cfg.connect_timeout;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut binding = [0u8; 32];
    conn.export_keying_material(&mut binding, b"tally/1 handshake", b"")
        .map_err(|_| "tls exporter unavailable")?;
    let (mut hs, hello) = ClientHandshake::start(
        sh.key.clone(),
        binding.to_vec(),
        sh.cfg.enroll_token.as_deref(),
    )?;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let max_in_flight = tokio::time::timeout(timeout, async {
        write_frame(&mut send, &Frame::Hello(hello)).await?;
        let proof = match read_frame(&mut recv, &mut dec, &mut buf).await? {
            Frame::Challenge(c) => hs.on_challenge(&c)?,
            Frame::Error(e) => return Err(collector_error(&e)),
            _ => return Err("unexpected frame instead of a challenge".into()),
        };
        write_frame(&mut send, &Frame::Proof(proof)).await?;
        match read_frame(&mut recv, &mut dec, &mut buf).await? {
            Frame::Welcome(w) => {
                hs.on_welcome(&w)?;
                Ok::<_, BoxError>(w.max_in_flight.clamp(1, MAX_WINDOW) as usize)
            }
            Frame::Error(e) => Err(collector_error(&e)),
            _ => Err("unexpected frame instead of a welcome".into()),
        }
    })
    .await??;
    *welcomed = true;
    tracing::info!(collector = %addr, max_in_flight, "connected to collector");
    set_conn(
        sh,
        ConnectionState::Connected {
            collector: addr.to_owned(),
            max_in_flight: max_in_flight as u32,
        },
    );
    let mut win = SendWindow::new(sh.epoch, max_in_flight);
    loop {
        // Fill the window, oldest unacknowledged first.
        loop {
            let next = win.next_to_send(lock(&sh.backlog).batches.keys().copied());
            let Some(seq) = next else { break };
            let sh2 = sh.clone();
            let Some(stored) = tokio::task::spawn_blocking(move || sh2.store.batch(seq)).await??
            else {
                win.skipped(seq); // acknowledged meanwhile
                continue;
            };
            write_frame(&mut send, &Frame::Batch(stored.batch)).await?;
            tracing::trace!(epoch = sh.epoch, seq, "batch sent");
            win.sent(seq, Instant::now());
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = sh.sealed_notify.notified() => {}
            // Frames that arrived with the welcome (or with an earlier read) are handled before
            // waiting for more bytes.
            r = async {
                if dec.has_frame() { Ok(Some(0)) } else { recv.read(&mut buf).await }
            } => {
                match r? {
                    Some(n) => dec.push(&buf[..n]),
                    None => return Err("stream closed by the collector".into()),
                }
                let mut acked = Vec::new();
                while let Some(f) = dec.next_frame()? {
                    match f {
                        Frame::Ack(a) => {
                            let (seq, sent_at) = win.acked(&a)?;
                            let outcome = match a.outcome {
                                AckOutcome::Committed => "committed",
                                AckOutcome::Duplicate => "duplicate",
                                AckOutcome::Quarantined { code } => {
                                    tracing::warn!(seq, %code, "batch quarantined by the collector");
                                    "quarantined"
                                }
                            };
                            sh.metrics.batches_acked.get_or_create(&[("outcome", outcome)]).inc();
                            sh.metrics.ship_rtt.observe(sent_at.elapsed().as_secs_f64());
                            tracing::trace!(epoch = a.epoch, seq, outcome, "batch acknowledged");
                            acked.push(seq);
                        }
                        Frame::Catalog(c) => {
                            tracing::info!(version = c.version, meters = c.meters.len(), "catalog received");
                            let sh2 = sh.clone();
                            let c2 = c.clone();
                            tokio::task::spawn_blocking(move || sh2.store.put_catalog(&c2)).await??;
                            sh.agg.set_catalog(c);
                        }
                        Frame::Entitlements(e) => {
                            let merged = {
                                let mut cache = sh.entitlements.write().unwrap_or_else(|e| e.into_inner());
                                let mut c = cache.clone().unwrap_or_default();
                                c.apply(e);
                                *cache = Some(c.clone());
                                c
                            };
                            let sh2 = sh.clone();
                            tokio::task::spawn_blocking(move || sh2.store.put_entitlements(&merged)).await??;
                        }
                        Frame::LeaseGrant(_) => {}
                        Frame::Error(e) => return Err(collector_error(&e)),
                        other => {
                            return Err(format!("unexpected frame {:?}", std::mem::discriminant(&other)).into());
                        }
                    }
                }
                if let Some(&last) = acked.last() {
                    let sh2 = sh.clone();
                    let seqs = acked.clone();
                    tokio::task::spawn_blocking(move || sh2.store.ack(&seqs)).await??;
                    sh.on_acked(&acked, last);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tally_protocol::frame::{Ack, AckOutcome};

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
    fn server_names() {
        assert_eq!(server_name("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(server_name("localhost:7443"), "localhost");
        assert_eq!(server_name("[::1]:7443"), "::1");
        assert_eq!(server_name("collector.internal"), "collector.internal");
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
}
