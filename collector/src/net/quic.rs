//! The QUIC server: TLS, the handshake, admission, batches in, acks and pushes out.
//!
//! Owns the per-connection protocol (see `tally_protocol::frame` for the transport mapping): one
//! bidirectional stream per connection; `Hello → Challenge → Proof → Welcome`, then the catalog
//! and an entitlement snapshot are pushed, then `Batch` frames are answered by `Ack` frames in
//! arrival order, and the catalog is pushed again whenever it changes.
//!
//! Guarantees:
//! - A batch's signature is verified with the key authenticated on this connection before
//!   anything else is done with it; a bad signature closes the connection with
//!   `Error{BadSignature}` and no ack.
//! - An ack is written only after the committer reports the batch durable.
//! - Before the handshake a frame may be at most [`HANDSHAKE_FRAME_BYTES`], and the handshake
//!   must finish within the configured timeout, so unauthenticated peers cannot hold much.
//! - Connections beyond the configured limit are refused at the QUIC level.

use crate::config::CollectorConfig;
use crate::ingest::IngestHandle;
use crate::ingest::{IngestReply, IngestRequest};
use crate::metrics::Metrics;
use crate::net::registry::{Admitted, Registry};
use crate::store::{IngestBatch, IngestOutcome};
use std::sync::Arc;
use std::time::Duration;
use tally_clock::SharedClock;
use tally_protocol::batch::{AgentId, BatchError};
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{EntitlementsSnapshot, LeaseGrant};
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{
    Ack, AckOutcome, ErrorFrame, Frame, FrameError, LENGTH_PREFIX_BYTES, Welcome, decode_payload,
    encode_frame, frame_len,
};
use tally_protocol::handshake::{Authenticated, ServerHandshake};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

/// Largest frame accepted before the handshake completes.
pub const HANDSHAKE_FRAME_BYTES: usize = 4096;
/// The TLS exporter label for the handshake binding.
pub const BINDING_LABEL: &[u8] = b"tally/1 handshake";

/// Why the QUIC server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The PEM does not hold a certificate or key.
    #[error("pem: {0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("quic: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration: TLS 1.3 with the collector's certificate, ALPN `tally/1`.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<quinn::ServerConfig, TlsSetupError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsSetupError::Pem(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![tally_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        30_000,
    ))));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client configuration that trusts `ca_pem`, for agents, tests and benchmarks.
pub fn client_config(ca_pem: &[u8]) -> Result<quinn::ClientConfig, TlsSetupError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| TlsSetupError::Pem(e.to_string()))?;
        roots.add(cert)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tally_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsSetupError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Why reading a frame stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer finished the stream cleanly between frames.
    Finished,
    /// The stream or connection failed.
    Stream(String),
    /// The bytes are not a frame.
    Frame(FrameError),
}

/// Reads one length-prefixed frame of at most `max` bytes.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Frame, ReadError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(ReadError::Finished),
        Err(e) => return Err(ReadError::Stream(e.to_string())),
    }
    let len = match frame_len(&prefix) {
        Ok(Some(len)) => len,
        Ok(None) => return Err(ReadError::Stream(String::from("short prefix"))),
        Err(e) => return Err(ReadError::Frame(e)),
    };
    if len > max {
        return Err(ReadError::Frame(FrameError::TooLarge(len)));
    }
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| ReadError::Stream(e.to_string()))?;
    decode_payload(&payload).map_err(ReadError::Frame)
}

pub(crate) async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), String> {
    let bytes = encode_frame(frame).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())
}

/// The limits of one agent session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Unacknowledged batches an agent may have in flight per connection.
    pub max_in_flight: u32,
    /// Most concurrent QUIC connections.
    pub max_connections: usize,
    /// Time allowed from connection to `Welcome`.
    pub handshake_timeout: Duration,
}

impl From<&CollectorConfig> for SessionLimits {
    fn from(c: &CollectorConfig) -> Self {
        SessionLimits {
            max_in_flight: c.max_in_flight,
            max_connections: c.max_connections,
            handshake_timeout: c.handshake_timeout,
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
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Wall time.
    pub clock: SharedClock,
}

/// What the connection's writer task sends, in order.
enum Out {
    Frame(Frame),
    Ack {
        epoch: u64,
        seq: u64,
        reply: oneshot::Receiver<IngestReply>,
    },
}

/// Serves QUIC until `shutdown` turns true, then lets every connection finish its acks.
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<QuicServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Some(incoming) = incoming else { break };
        if conns.len() >= shared.limits.max_connections {
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            shared.metrics.connections.inc();
            shared.metrics.connections_active.inc();
            handle(incoming, &shared, shutdown).await;
            shared.metrics.connections_active.dec();
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
    shared: &Arc<QuicServer>,
    shutdown: watch::Receiver<bool>,
) {
    let timeout = shared.limits.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection failed before it was established");
            return;
        }
        Err(_) => return,
    };
    let setup = tokio::time::timeout(timeout, async {
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut binding = [0u8; 32];
        conn.export_keying_material(&mut binding, BINDING_LABEL, b"")
            .map_err(|_| String::from("no keying material"))?;
        Ok::<_, String>((send, recv, binding))
    })
    .await;
    let (mut send, mut recv, binding) = match setup {
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
    let auth =
        tokio::time::timeout(timeout, handshake(&mut send, &mut recv, binding, shared)).await;
    let auth = match auth {
        Ok(Ok(auth)) => auth,
        Ok(Err(code)) => {
            shared.metrics.handshake(code.name());
            close_with(&conn, send, ErrorFrame::new(code, "handshake refused")).await;
            return;
        }
        Err(_) => {
            shared.metrics.handshake("timeout");
            conn.close(quinn::VarInt::from_u32(1), b"handshake timeout");
            return;
        }
    };
    let span = tracing::info_span!("agent_session", agent = %auth.agent_id);
    shared.registry.register_live(auth.agent_id, conn.clone());
    session(conn, send, recv, auth, shared, shutdown)
        .instrument(span)
        .await;
}

/// Sends a final error frame, waits briefly for it to be delivered, then closes.
async fn close_with(conn: &quinn::Connection, mut send: quinn::SendStream, e: ErrorFrame) {
    let code = e.code.number();
    let _ = write_frame(&mut send, &Frame::Error(e)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(quinn::VarInt::from_u32(u32::from(code)), b"error");
}

async fn handshake(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    binding: [u8; 32],
    shared: &Arc<QuicServer>,
) -> Result<Authenticated, ErrorCode> {
    let mut nonce = [0u8; 32];
    getrandom::getrandom(&mut nonce).map_err(|_| ErrorCode::Internal)?;
    let mut hs = ServerHandshake::new(binding.to_vec(), nonce);
    let read = |r| match r {
        ReadError::Frame(e) => e.code(),
        ReadError::Finished | ReadError::Stream(_) => ErrorCode::Malformed,
    };
    let Frame::Hello(hello) = read_frame(recv, HANDSHAKE_FRAME_BYTES)
        .await
        .map_err(read)?
    else {
        return Err(ErrorCode::UnexpectedFrame);
    };
    let challenge = hs.on_hello(hello).map_err(|e| e.code())?;
    write_frame(send, &Frame::Challenge(challenge))
        .await
        .map_err(|_| ErrorCode::Internal)?;
    let Frame::Proof(proof) = read_frame(recv, HANDSHAKE_FRAME_BYTES)
        .await
        .map_err(read)?
    else {
        return Err(ErrorCode::UnexpectedFrame);
    };
    let auth = hs.on_proof(&proof).map_err(|e| e.code())?;
    let registry = shared.registry.clone();
    let id = auth.agent_id;
    let public_key = auth.public_key.to_bytes();
    let token = auth.enroll_token.clone();
    let admitted =
        tokio::task::spawn_blocking(move || registry.admit(id, public_key, token.as_deref()))
            .await
            .map_err(|_| ErrorCode::Internal)?
            .map_err(|_| ErrorCode::Internal)??;
    match admitted {
        Admitted::Known => shared.metrics.handshake("ok"),
        Admitted::Enrolled => {
            shared.metrics.handshake("enrolled");
            tracing::info!(agent = %id, "agent enrolled");
        }
    }
    write_frame(
        send,
        &Frame::Welcome(Welcome {
            agent_id: id,
            max_in_flight: shared.limits.max_in_flight,
        }),
    )
    .await
    .map_err(|_| ErrorCode::Internal)?;
    Ok(auth)
}

async fn session(
    conn: quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    auth: Authenticated,
    shared: &Arc<QuicServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let capacity = usize::try_from(shared.limits.max_in_flight)
        .unwrap_or(32)
        .max(1)
        * 2;
    let (out_tx, out_rx) = mpsc::channel::<Out>(capacity);
    let writer = tokio::spawn(
        writer(conn.clone(), send, out_rx, shared.clone(), auth.agent_id)
            .instrument(tracing::Span::current()),
    );
    let mut catalog_rx = shared.catalog.clone();
    let first = catalog_rx.borrow_and_update().as_ref().clone();
    let snapshot = EntitlementsSnapshot {
        version: 0,
        built_at_ms: shared.clock.now_ms(),
        full: true,
        customers: Default::default(),
    };
    let _ = out_tx.send(Out::Frame(Frame::Catalog(first))).await;
    let _ = out_tx.send(Out::Frame(Frame::Entitlements(snapshot))).await;
    let pusher_tx = out_tx.clone();
    let pusher = tokio::spawn(async move {
        while catalog_rx.changed().await.is_ok() {
            let c = catalog_rx.borrow_and_update().as_ref().clone();
            if pusher_tx.send(Out::Frame(Frame::Catalog(c))).await.is_err() {
                break;
            }
        }
    });
    let final_error = loop {
        let frame = tokio::select! {
            f = read_frame(&mut recv, tally_protocol::frame::MAX_FRAME_BYTES) => f,
            _ = shutdown.wait_for(|s| *s) => {
                break Some(ErrorFrame::new(ErrorCode::ShuttingDown, "collector is shutting down"));
            }
        };
        match frame {
            Ok(Frame::Batch(signed)) => match signed.verify(&auth.public_key) {
                Ok(body) => {
                    let (reply_tx, reply_rx) = oneshot::channel();
                    let (epoch, seq) = (body.epoch, body.seq);
                    let req = IngestRequest {
                        batch: IngestBatch { body, signed },
                        reply: reply_tx,
                    };
                    if shared.ingest.sender().send(req).await.is_err() {
                        break Some(ErrorFrame::new(
                            ErrorCode::ShuttingDown,
                            "collector is shutting down",
                        ));
                    }
                    if out_tx
                        .send(Out::Ack {
                            epoch,
                            seq,
                            reply: reply_rx,
                        })
                        .await
                        .is_err()
                    {
                        break None;
                    }
                }
                Err(e) => {
                    let code = match e {
                        BatchError::BadSignature => ErrorCode::BadSignature,
                        BatchError::AgentMismatch { .. } => ErrorCode::AgentMismatch,
                        _ => ErrorCode::Malformed,
                    };
                    if code == ErrorCode::Malformed {
                        shared.metrics.batch("malformed");
                    } else {
                        shared.metrics.batch("bad_signature");
                        shared.metrics.signature_failures.inc();
                    }
                    tracing::warn!(agent = %auth.agent_id, error = %e, "batch refused");
                    break Some(ErrorFrame::new(code, &e.to_string()));
                }
            },
            Ok(Frame::LeaseRequest(req)) => {
                // Entitlements and leases are a later issue: grant nothing, for now.
                let grant = LeaseGrant {
                    request_id: req.request_id,
                    customer: req.customer,
                    meter: req.meter,
                    granted: rust_decimal::Decimal::ZERO,
                    expires_at_ms: shared.clock.now_ms(),
                };
                if out_tx
                    .send(Out::Frame(Frame::LeaseGrant(grant)))
                    .await
                    .is_err()
                {
                    break None;
                }
            }
            Ok(_) => {
                break Some(ErrorFrame::new(
                    ErrorCode::UnexpectedFrame,
                    "unexpected frame",
                ));
            }
            Err(ReadError::Finished) => break None,
            Err(ReadError::Stream(e)) => {
                tracing::debug!(agent = %auth.agent_id, error = %e, "stream ended");
                break None;
            }
            Err(ReadError::Frame(e)) => {
                shared.metrics.batch("malformed");
                break Some(ErrorFrame::new(e.code(), &e.to_string()));
            }
        }
    };
    pusher.abort();
    if let Some(e) = final_error {
        let _ = out_tx.send(Out::Frame(Frame::Error(e))).await;
    }
    drop(out_tx);
    let _ = writer.await;
}

/// Writes frames in order; an ack waits for its batch to be durable.
async fn writer(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Out>,
    shared: Arc<QuicServer>,
    agent: AgentId,
) {
    let mut close_code = 0u32;
    while let Some(out) = rx.recv().await {
        let frame = match out {
            Out::Frame(f) => f,
            Out::Ack { epoch, seq, reply } => match reply.await {
                Ok(Ok(IngestOutcome::Ack(outcome))) => {
                    tracing::debug!(epoch, seq, outcome = outcome_name(outcome), "batch acked");
                    shared.registry.acked(agent, epoch, seq, outcome);
                    Frame::Ack(Ack {
                        epoch,
                        seq,
                        outcome,
                    })
                }
                Ok(Ok(IngestOutcome::Refused(code))) | Ok(Err(code)) => {
                    Frame::Error(ErrorFrame::new(code, "batch not committed; retry later"))
                }
                Err(_) => Frame::Error(ErrorFrame::new(ErrorCode::Internal, "batch not committed")),
            },
        };
        let is_error = matches!(frame, Frame::Error(_));
        if let Frame::Error(e) = &frame {
            close_code = u32::from(e.code.number());
        }
        if write_frame(&mut send, &frame).await.is_err() {
            return;
        }
        if is_error {
            break;
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(quinn::VarInt::from_u32(close_code), b"bye");
}

/// The committed outcome's name, for logs.
pub fn outcome_name(o: AckOutcome) -> &'static str {
    match o {
        AckOutcome::Committed => "committed",
        AckOutcome::Duplicate => "duplicate",
        AckOutcome::Quarantined { .. } => "quarantined",
    }
}
