//! The shipper: the tokio shell around the [`Session`] state machine. It resolves and connects
//! over QUIC (`tally_net`'s client configuration, TLS 1.3 with `ring`, the deployment CA alone,
//! server name = the host part of the collector address), moves frames with
//! `tally_net::frames`, reads batches from and writes acks and caches to the store, and hands the
//! session's events to the agent through [`SessionEvents`]. Every decision — what to send, when
//! an ack is wrong, when to reconnect and where — is the session's.
//!
//! The shipper owns no agent state: it knows the store, the key, a receiver of the highest
//! sealed seq and an event sink, so it imports nothing of the agent module.

use crate::entitlements::EntitlementsCache;
use crate::session::{Action, Session, SessionConfig, SessionError, SessionEvent, StoreAction};
use crate::store::{ForShipping, Store};
use quinn::{ClientConfig, Connection, Endpoint, SendStream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tally_clock::SharedClock;
use tally_net::frames::{FrameReader, write_frame};
use tally_protocol::frame::Frame;
use tokio::sync::watch;
use tracing::Instrument;

/// Frames handled from one read before the session's actions run, so the acks that arrived
/// together are deleted in one store commit.
const FRAMES_PER_TURN: usize = 1024;

/// Where the agent hears what the session did. Called on the shipper's task, after the store
/// write an event depends on committed.
pub trait SessionEvents: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: SessionEvent);
}

/// What the shipper needs to run.
pub struct Shipper {
    /// The session's settings.
    pub cfg: SessionConfig,
    /// How often the first collector is tried while another serves (fail back); `None`: never.
    pub failback: Option<Duration>,
    /// The agent's key (handshake proofs).
    pub key: ed25519_dalek::SigningKey,
    /// The agent's store: batches to send, acks to delete, caches to keep.
    pub store: Arc<Store>,
    /// The QUIC client configuration.
    pub client: ClientConfig,
    /// Wall time for the session's timers.
    pub clock: SharedClock,
    /// The highest sealed seq; changes as the sealer stores batches.
    pub sealed: watch::Receiver<u64>,
    /// Unacknowledged seqs in the store at start, ascending.
    pub unacked: Vec<u64>,
    /// The entitlement cache at start.
    pub entitlements: Option<EntitlementsCache>,
    /// Where events go.
    pub events: Arc<dyn SessionEvents>,
    /// Control frames from the agent (snapshot and lease requests, releases).
    pub control: tokio::sync::mpsc::Receiver<Frame>,
}

/// One live connection: its endpoint, the connection and its stream.
struct Link {
    endpoint: Endpoint,
    conn: Connection,
    send: SendStream,
    reader: FrameReader,
}

impl Link {
    fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.close(0u32.into(), b"bye");
    }
}

/// Runs the session until `stop` turns true.
pub async fn run(s: Shipper, mut stop: watch::Receiver<bool>) {
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let Shipper {
        cfg,
        failback,
        key,
        store,
        client,
        clock,
        mut sealed,
        unacked,
        entitlements,
        events,
        mut control,
    } = s;
    let connect_timeout = cfg.connect_timeout;
    // Fail back (the shell's part of failover; the session's order and stickiness are its
    // own): while linked to another collector, the first is tried every `failback`; when it
    // answers, the link is ended and the session's next connect goes to the first collector.
    let preferred = cfg.collectors.first().cloned().unwrap_or_default();
    let mut linked_to: Option<String> = None;
    let mut fail_back = false;
    let mut next_probe =
        tokio::time::Instant::now() + failback.unwrap_or(Duration::from_secs(86_400));
    let verifying_key = key.verifying_key();
    let sealed_upto = *sealed.borrow_and_update();
    let mut session = Session::new(
        cfg,
        key,
        unacked,
        sealed_upto,
        entitlements,
        u64::from_le_bytes(seed),
    );
    session.start(clock.now_ms());
    let mut link: Option<Link> = None;
    let mut control_open = true;
    'run: loop {
        while let Some(action) = session.poll() {
            match action {
                Action::Connect { collector } => {
                    let collector = if std::mem::take(&mut fail_back) {
                        preferred.clone()
                    } else {
                        collector
                    };
                    let span = tracing::info_span!("collector_session", collector = %collector);
                    let r = tokio::select! {
                        r = connect(&client, &collector, connect_timeout).instrument(span) => r,
                        _ = stop.changed() => break 'run,
                    };
                    match r {
                        Ok((l, binding)) => {
                            link = Some(l);
                            linked_to = Some(collector);
                            if let Some(every) = failback {
                                next_probe = tokio::time::Instant::now() + every;
                            }
                            session.connected(&binding, clock.now_ms());
                        }
                        Err(e) => session.connection_lost(e, clock.now_ms()),
                    }
                }
                Action::Send(frame) => {
                    if let Some(l) = &mut link
                        && let Err(e) = write_frame(&mut l.send, &frame).await
                    {
                        session.connection_lost(
                            SessionError::Connection(e.to_string()),
                            clock.now_ms(),
                        );
                    }
                }
                Action::SendBatch(seq) => {
                    let Some(l) = &mut link else { continue };
                    let st = store.clone();
                    let stored = tokio::task::spawn_blocking(move || {
                        st.batch_for_shipping(seq, &verifying_key)
                    })
                    .await;
                    match stored {
                        Ok(Ok(ForShipping::Ready(b))) => {
                            if let Err(e) = write_frame(&mut l.send, &Frame::Batch(b.batch)).await {
                                session.connection_lost(
                                    SessionError::Connection(e.to_string()),
                                    clock.now_ms(),
                                );
                            } else {
                                tracing::trace!(seq, "batch sent");
                            }
                        }
                        Ok(Ok(ForShipping::Missing)) => session.batch_missing(seq, clock.now_ms()),
                        Ok(Ok(ForShipping::Unshippable(reason))) => {
                            session.batch_unshippable(seq, reason, clock.now_ms())
                        }
                        Ok(Err(e)) => session.store_failed(e.to_string(), clock.now_ms()),
                        Err(e) => session.store_failed(e.to_string(), clock.now_ms()),
                    }
                }
                Action::Close => {
                    linked_to = None;
                    if let Some(l) = link.take() {
                        l.close();
                    }
                }
                Action::Store(a) => {
                    let quarantine = match &a {
                        StoreAction::Quarantine { seq, .. } => Some(*seq),
                        _ => None,
                    };
                    match (perform(&store, a, clock.now_ms()).await, quarantine) {
                        (Ok(a), _) => events.on_event(a.into_event()),
                        (Err(e), Some(seq)) => {
                            session.quarantine_failed(seq, e.to_string(), clock.now_ms())
                        }
                        (Err(e), None) => session.connection_lost(e, clock.now_ms()),
                    }
                }
                Action::Event(e) => events.on_event(e),
            }
        }
        if *stop.borrow() {
            break;
        }
        let timer = session.poll_timeout().map(|at| {
            let ms = at.saturating_sub(clock.now_ms()).max(0);
            tokio::time::Instant::now() + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        });
        let away = failback.is_some() && linked_to.as_ref().is_some_and(|c| *c != preferred);
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(next_probe), if away => {
                if let Some(every) = failback {
                    next_probe = tokio::time::Instant::now() + every;
                }
                if let Ok((probe, _)) = connect(&client, &preferred, connect_timeout).await {
                    probe.close();
                    tracing::info!(collector = %preferred, "first collector answers again: failing back");
                    fail_back = true;
                    session.connection_lost(
                        SessionError::Connection(String::from("failing back to the first collector")),
                        clock.now_ms(),
                    );
                }
            }
            _ = async { match timer { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                session.handle_timeout(clock.now_ms());
            }
            f = async { if control_open { control.recv().await } else { std::future::pending().await } } => {
                match f {
                    Some(f) => session.send_control(f),
                    None => control_open = false,
                }
            }
            r = sealed.changed() => {
                if r.is_err() {
                    break;
                }
                let upto = *sealed.borrow_and_update();
                session.batches_sealed(upto, clock.now_ms());
            }
            r = async { match &mut link { Some(l) => l.reader.next().await, None => std::future::pending().await } } => {
                match r {
                    Ok(f) => {
                        session.frame_received(f, clock.now_ms());
                        // Frames already buffered or arriving with this read join this turn.
                        for _ in 1..FRAMES_PER_TURN {
                            let Some(l) = &mut link else { break };
                            match tokio::time::timeout(Duration::ZERO, l.reader.next()).await {
                                Ok(Ok(f)) => session.frame_received(f, clock.now_ms()),
                                Ok(Err(e)) => {
                                    session.connection_lost(SessionError::Connection(read_error(&e)), clock.now_ms());
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => session.connection_lost(SessionError::Connection(read_error(&e)), clock.now_ms()),
                }
            }
        }
    }
    session.close();
    while let Some(action) = session.poll() {
        match action {
            Action::Close => {
                if let Some(l) = link.take() {
                    l.close();
                }
            }
            Action::Event(e) => events.on_event(e),
            _ => {}
        }
    }
    if let Some(l) = link.take() {
        l.close();
    }
}

fn read_error(e: &tally_net::frames::ReadError) -> String {
    match e {
        tally_net::frames::ReadError::Finished => "stream closed by the collector".into(),
        e => e.to_string(),
    }
}

/// Performs a store action off the async threads; returns it back for its event.
async fn perform(
    store: &Arc<Store>,
    a: StoreAction,
    now_ms: i64,
) -> Result<StoreAction, SessionError> {
    let st = store.clone();
    tokio::task::spawn_blocking(move || {
        match &a {
            StoreAction::Ack(acked) => {
                let seqs: Vec<u64> = acked.iter().map(|b| b.seq).collect();
                st.ack(&seqs).map(|_| ())
            }
            StoreAction::PutCatalog(c) => st.put_catalog(c),
            StoreAction::PutEntitlements(e, _) => st.put_entitlements(e),
            StoreAction::PutLease(g) => st.put_lease(g),
            StoreAction::Quarantine { seq, reason } => {
                st.quarantine(*seq, reason, now_ms).map(|_| ())
            }
        }
        .map(|()| a)
        .map_err(|e| SessionError::Store(e.to_string()))
    })
    .await
    .map_err(|e| SessionError::Store(e.to_string()))?
}

/// Resolves, connects, and opens the session's stream, each step within `timeout`; returns the
/// link and the connection's handshake binding.
async fn connect(
    client: &ClientConfig,
    addr: &str,
    timeout: Duration,
) -> Result<(Link, [u8; 32]), SessionError> {
    let err = |e: &dyn std::fmt::Display| SessionError::Connect(e.to_string());
    let target: SocketAddr = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?
        .next()
        .ok_or_else(|| SessionError::Connect("address did not resolve".into()))?;
    let bind: SocketAddr = if target.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let endpoint = Endpoint::client(bind).map_err(|e| err(&e))?;
    let r = async {
        let connecting = endpoint
            .connect_with(client.clone(), target, tally_net::tls::server_name(addr))
            .map_err(|e| err(&e))?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e))?;
        let opened = async {
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| SessionError::Connection(e.to_string()))?;
            let binding = tally_net::tls::binding(&conn)
                .ok_or_else(|| SessionError::Connect("tls exporter unavailable".into()))?;
            Ok((send, recv, binding))
        }
        .await;
        match opened {
            Ok((send, recv, binding)) => Ok((conn, send, FrameReader::new(recv), binding)),
            Err(e) => {
                conn.close(0u32.into(), b"bye");
                Err(e)
            }
        }
    }
    .await;
    match r {
        Ok((conn, send, reader, binding)) => Ok((
            Link {
                endpoint,
                conn,
                send,
                reader,
            },
            binding,
        )),
        Err(e) => {
            endpoint.close(0u32.into(), b"bye");
            Err(e)
        }
    }
}
