//! A minimal collector stand-in for the agent's tests: a real QUIC server (quinn + rustls/ring)
//! with an rcgen CA, the protocol's `ServerHandshake`, signature verification, exactly-once
//! commit by `(agent, epoch, seq)`, and injectable faults.
#![allow(clippy::unwrap_used, dead_code)]

use quinn::{Endpoint, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tally_protocol::Decimal;
use tally_protocol::batch::AgentId;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{
    CustomerEntitlements, EntitlementsSnapshot, LeaseGrant, LeaseRelease,
};
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{
    Ack, AckOutcome, ErrorFrame, Frame, FrameDecoder, Welcome, encode_frame,
};
use tally_protocol::handshake::ServerHandshake;

/// Faults, triggered by the count of batches received over all connections.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Close the connection on receiving every n-th batch, before committing it.
    pub drop_conn_every: Option<u64>,
    /// Commit every n-th batch but lose its ack (close the connection instead).
    pub drop_ack_every: Option<u64>,
    /// Refuse handshakes whose token differs.
    pub require_token: Option<String>,
    /// On every n-th batch received, answer `Frame::Error(Overloaded)` and close instead.
    pub overload_every: Option<u64>,
}

/// What the stand-in saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub committed: HashSet<(AgentId, u64, u64)>,
    /// (customer, meter) → (sum, events)
    pub totals: HashMap<(String, String), (Decimal, u64)>,
    pub received: u64,
    pub acks: u64,
    pub duplicates: u64,
    pub dropped_conns: u64,
    pub dropped_acks: u64,
    pub connections: u64,
    pub bad_signatures: u64,
    pub overloaded: u64,
    /// Entitlements answered to `EntitlementsRequest` (a customer not here comes back empty).
    pub customers: HashMap<String, CustomerEntitlements>,
    /// Hard limits per (customer, meter) the stand-in grants leases against, as the protocol
    /// says: a grant keeps `used + Σ outstanding ≤ limit`.
    pub limits: HashMap<(String, String), Decimal>,
    /// Leases by id.
    pub leases: HashMap<u64, StandInLease>,
    pub lease_requests: u64,
    pub releases: Vec<LeaseRelease>,
    /// Releases waiting for the batches they name to be committed.
    pub pending_releases: Vec<(AgentId, LeaseRelease)>,
    pub snapshot_requests: Vec<String>,
    pub snapshot_version: u64,
}

/// One lease as the stand-in keeps it.
#[derive(Debug, Clone)]
pub struct StandInLease {
    pub agent: AgentId,
    pub customer: String,
    pub meter: String,
    pub granted: Decimal,
    /// Usage of its customer and meter committed from its agent since it began.
    pub shipped: Decimal,
    pub open: bool,
}

impl Seen {
    /// Committed usage of a customer and meter.
    pub fn used(&self, c: &str, m: &str) -> Decimal {
        self.totals
            .get(&(c.to_string(), m.to_string()))
            .map_or(Decimal::ZERO, |t| t.0)
    }

    /// Σ outstanding of the open leases of a customer and meter.
    pub fn outstanding(&self, c: &str, m: &str) -> Decimal {
        self.leases
            .values()
            .filter(|l| l.open && l.customer == c && l.meter == m)
            .map(|l| (l.granted - l.shipped).max(Decimal::ZERO))
            .sum()
    }

    fn contiguous(&self, agent: AgentId, epoch: u64) -> u64 {
        let mut s = 0;
        while self.committed.contains(&(agent, epoch, s + 1)) {
            s += 1;
        }
        s
    }

    /// Frees the leases whose release names only committed batches.
    fn settle_releases(&mut self) {
        let pending = std::mem::take(&mut self.pending_releases);
        for (agent, r) in pending {
            if r.through_seq == 0 || self.contiguous(agent, r.epoch) >= r.through_seq {
                if let Some(l) = self.leases.get_mut(&r.lease_id) {
                    l.open = false;
                }
                self.releases.push(r);
            } else {
                self.pending_releases.push((agent, r));
            }
        }
    }
}

pub struct StandIn {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub seen: Arc<Mutex<Seen>>,
    endpoint: Endpoint,
    /// What a restart at the same address needs: the same certificate and the same state.
    certs: Arc<Certs>,
    ctx: Ctx,
}

pub struct Certs {
    pub ca_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub fn certs() -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tally test ca");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    Certs {
        ca_pem: ca.pem(),
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn server_config(c: &Certs) -> ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(c.chain.clone(), c.key.clone_key())
        .unwrap();
    tls.alpn_protocols = vec![tally_protocol::ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    ServerConfig::with_crypto(Arc::new(q))
}

#[derive(Clone)]
struct Ctx {
    seen: Arc<Mutex<Seen>>,
    faults: Faults,
    catalog: Option<Catalog>,
    entitlements: Option<EntitlementsSnapshot>,
    max_in_flight: u32,
}

impl StandIn {
    /// Starts on 127.0.0.1, an ephemeral port.
    pub async fn start(faults: Faults) -> StandIn {
        Self::start_with(faults, None, None, 8).await
    }

    pub async fn start_with(
        faults: Faults,
        catalog: Option<Catalog>,
        entitlements: Option<EntitlementsSnapshot>,
        max_in_flight: u32,
    ) -> StandIn {
        let ctx = Ctx {
            seen: Arc::new(Mutex::new(Seen::default())),
            faults,
            catalog,
            entitlements,
            max_in_flight,
        };
        Self::serve(Arc::new(certs()), ctx, "127.0.0.1:0".parse().unwrap())
    }

    /// A stand-in at the same address with the same certificate and the same state (what it
    /// committed stays committed), after this one closed: a collector back from an outage.
    pub async fn restart(self) -> StandIn {
        let StandIn {
            addr,
            endpoint,
            certs,
            ctx,
            ..
        } = self;
        endpoint.close(0u32.into(), b"bye");
        drop(endpoint);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // The closed endpoint frees its socket once its connections and driver wound down.
            if let Ok(sock) = std::net::UdpSocket::bind(addr) {
                drop(sock);
                return Self::serve(certs, ctx, addr);
            }
            assert!(std::time::Instant::now() < deadline, "{addr} stays bound");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn serve(c: Arc<Certs>, ctx: Ctx, addr: SocketAddr) -> StandIn {
        let endpoint = Endpoint::server(server_config(&c), addr).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let seen = ctx.seen.clone();
        let ep = endpoint.clone();
        let served = ctx.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let ctx = served.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        ctx.seen.lock().unwrap().connections += 1;
                        if let Err(e) = handle(conn, ctx).await {
                            eprintln!("stand-in connection failed: {e}");
                        }
                    }
                });
            }
        });
        StandIn {
            addr,
            ca_pem: c.ca_pem.clone(),
            seen,
            endpoint,
            certs: c,
            ctx,
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> R<Option<Frame>> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(Some(f));
        }
        match recv.read(buf).await? {
            Some(n) => dec.push(&buf[..n]),
            None => return Ok(None),
        }
    }
}

async fn send(s: &mut quinn::SendStream, f: &Frame) -> R<()> {
    s.write_all(&encode_frame(f)?).await?;
    Ok(())
}

async fn handle(conn: quinn::Connection, ctx: Ctx) -> R<()> {
    let (mut tx, mut rx) = conn.accept_bi().await?;
    let mut binding = [0u8; 32];
    conn.export_keying_material(&mut binding, b"tally/1 handshake", b"")
        .map_err(|_| "exporter")?;
    let mut nonce = [0u8; 32];
    getrandom::getrandom(&mut nonce).map_err(|_| "no randomness")?;
    let mut hs = ServerHandshake::new(binding.to_vec(), nonce);
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let Some(Frame::Hello(hello)) = read_frame(&mut rx, &mut dec, &mut buf).await? else {
        return Err("expected hello".into());
    };
    let challenge = hs.on_hello(hello)?;
    send(&mut tx, &Frame::Challenge(challenge)).await?;
    let Some(Frame::Proof(proof)) = read_frame(&mut rx, &mut dec, &mut buf).await? else {
        return Err("expected proof".into());
    };
    let auth = hs.on_proof(&proof)?;
    if let Some(t) = &ctx.faults.require_token
        && auth.enroll_token.as_deref() != Some(t.as_bytes())
    {
        let e = ErrorFrame::new(ErrorCode::InvalidEnrollToken, "enrolment token is wrong");
        send(&mut tx, &Frame::Error(e)).await?;
        tx.finish()?;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        conn.close(1u32.into(), b"refused");
        return Ok(());
    }
    send(
        &mut tx,
        &Frame::Welcome(Welcome {
            agent_id: auth.agent_id,
            max_in_flight: ctx.max_in_flight,
        }),
    )
    .await?;
    if let Some(c) = &ctx.catalog {
        send(&mut tx, &Frame::Catalog(c.clone())).await?;
    }
    if let Some(e) = &ctx.entitlements {
        send(&mut tx, &Frame::Entitlements(e.clone())).await?;
    }
    while let Some(f) = read_frame(&mut rx, &mut dec, &mut buf).await? {
        let signed = match f {
            Frame::Batch(b) => b,
            Frame::EntitlementsRequest(r) => {
                let snap = {
                    let mut s = ctx.seen.lock().unwrap();
                    s.snapshot_version += 1;
                    let customers =
                        r.customers
                            .iter()
                            .map(|c| {
                                s.snapshot_requests.push(c.to_string());
                                s.customers.get(c.as_str()).cloned().unwrap_or(
                                    CustomerEntitlements {
                                        customer: c.clone(),
                                        plan: None,
                                        features: BoundedVec::default(),
                                        limits: BoundedVec::default(),
                                    },
                                )
                            })
                            .collect();
                    EntitlementsSnapshot {
                        version: 1_000 + s.snapshot_version,
                        built_at_ms: wall_ms(),
                        full: false,
                        customers: BoundedVec::new(customers).unwrap(),
                    }
                };
                send(&mut tx, &Frame::Entitlements(snap)).await?;
                continue;
            }
            Frame::LeaseRequest(r) => {
                let g = {
                    let mut s = ctx.seen.lock().unwrap();
                    s.lease_requests += 1;
                    let (c, m) = (r.customer.to_string(), r.meter.to_string());
                    let limit = s
                        .limits
                        .get(&(c.clone(), m.clone()))
                        .copied()
                        .unwrap_or_default();
                    let room = (limit - s.used(&c, &m) - s.outstanding(&c, &m)).max(Decimal::ZERO);
                    let added = r.quantity.min(room);
                    // One open lease per agent, customer and meter.
                    let open = s
                        .leases
                        .iter()
                        .find(|(_, l)| {
                            l.open && l.agent == auth.agent_id && l.customer == c && l.meter == m
                        })
                        .map(|(id, _)| *id);
                    let lease_id = match open {
                        Some(id) => id,
                        None => {
                            let id = s.leases.len() as u64 + 1;
                            s.leases.insert(
                                id,
                                StandInLease {
                                    agent: auth.agent_id,
                                    customer: c,
                                    meter: m,
                                    granted: Decimal::ZERO,
                                    shipped: Decimal::ZERO,
                                    open: true,
                                },
                            );
                            id
                        }
                    };
                    let total = match s.leases.get_mut(&lease_id) {
                        Some(l) => {
                            l.granted += added;
                            l.granted
                        }
                        None => Decimal::ZERO,
                    };
                    LeaseGrant {
                        request_id: r.request_id,
                        customer: r.customer,
                        meter: r.meter,
                        lease_id,
                        period_start_ms: r.period_start_ms,
                        granted_total: total,
                        added,
                        expires_at_ms: wall_ms() + 30_000,
                    }
                };
                send(&mut tx, &Frame::LeaseGrant(g)).await?;
                continue;
            }
            Frame::LeaseRelease(r) => {
                let mut s = ctx.seen.lock().unwrap();
                s.pending_releases.push((auth.agent_id, r));
                s.settle_releases();
                continue;
            }
            _ => return Err("expected a batch".into()),
        };
        let body = match signed.verify(&auth.public_key) {
            Ok(b) => b,
            Err(_) => {
                ctx.seen.lock().unwrap().bad_signatures += 1;
                conn.close(2u32.into(), b"bad signature");
                return Ok(());
            }
        };
        let overload = {
            let mut s = ctx.seen.lock().unwrap();
            let n = s.received + 1;
            let hit = ctx.faults.overload_every.is_some_and(|k| n % k == 0);
            if hit {
                s.received = n;
                s.overloaded += 1;
            }
            hit
        };
        if overload {
            let e = ErrorFrame::new(ErrorCode::Overloaded, "collector is overloaded");
            send(&mut tx, &Frame::Error(e)).await?;
            tx.finish()?;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            conn.close(4u32.into(), b"overloaded");
            return Ok(());
        }
        let (outcome, drop_conn, drop_ack) = {
            let mut s = ctx.seen.lock().unwrap();
            s.received += 1;
            let n = s.received;
            if ctx.faults.drop_conn_every.is_some_and(|k| n % k == 0) {
                s.dropped_conns += 1;
                (AckOutcome::Committed, true, false)
            } else {
                let key = (body.agent_id, body.epoch, body.seq);
                let outcome = if s.committed.insert(key) {
                    for d in body.deltas.iter() {
                        d.validate().unwrap();
                        let (c, m) = (d.customer.to_string(), d.meter.to_string());
                        for l in s.leases.values_mut() {
                            if l.open && l.agent == body.agent_id && l.customer == c && l.meter == m
                            {
                                l.shipped += d.sum;
                            }
                        }
                        let e = s
                            .totals
                            .entry((d.customer.to_string(), d.meter.to_string()))
                            .or_insert((Decimal::ZERO, 0));
                        e.0 += d.sum;
                        e.1 += d.count;
                    }
                    s.settle_releases();
                    AckOutcome::Committed
                } else {
                    s.duplicates += 1;
                    AckOutcome::Duplicate
                };
                let drop_ack = ctx.faults.drop_ack_every.is_some_and(|k| n % k == 0);
                if drop_ack {
                    s.dropped_acks += 1;
                } else {
                    s.acks += 1;
                }
                (outcome, false, drop_ack)
            }
        };
        if drop_conn || drop_ack {
            conn.close(3u32.into(), b"fault");
            return Ok(());
        }
        send(
            &mut tx,
            &Frame::Ack(Ack {
                epoch: body.epoch,
                seq: body.seq,
                outcome,
            }),
        )
        .await?;
    }
    Ok(())
}
