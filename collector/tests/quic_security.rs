//! Hostile peers over real QUIC on loopback: tampered batches, unknown, wrongly enrolled and
//! revoked keys, replayed handshakes, and a flood of garbage — each refused and counted, and the
//! collector keeps serving.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::time::Duration;
use tally_collector::testkit::{ClientError, RawStream, TestClient};
use tally_protocol::batch::{AgentId, BatchBody, SignedBatch};
use tally_protocol::bounded::BoundedBytes;
use tally_protocol::catalog::Aggregation;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::handshake::ClientHandshake;

fn error_code(f: &Frame) -> ErrorCode {
    match f {
        Frame::Error(e) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn refused(r: Result<TestClient, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Refused(e)) => e.code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a welcome"),
    }
}

fn metric(env: &Env, line: &str) -> bool {
    env.handle
        .shared()
        .metrics
        .encode()
        .lines()
        .any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_forged_batches_are_refused_and_counted() {
    let env = start().await;
    env.put_meter("api_calls", Aggregation::Sum);
    let k = key(1);
    let other = key(2);
    let d = || {
        vec![delta(
            "acme",
            "api_calls",
            &[],
            1_763_000_000_000,
            Decimal::TEN,
            1,
        )]
    };

    // A byte of the signed body flipped.
    let mut c = env.client(&k).await;
    let good = seal(&k, 1, 1, d());
    let mut bytes = good.body.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = SignedBatch {
        body: BoundedBytes::new(bytes).unwrap(),
        signature: good.signature,
    };
    assert_eq!(
        error_code(&send(&mut c, &tampered).await),
        ErrorCode::BadSignature
    );
    assert!(
        c.next_reply().await.is_err(),
        "the connection is closed after a bad signature"
    );

    // Our agent id, signed by another key.
    let mut c = env.client(&k).await;
    let body = BatchBody::new(agent_id(&k), 1, 1, 0, d()).unwrap();
    let forged = SignedBatch::seal(&body, &other).unwrap();
    assert_eq!(
        error_code(&send(&mut c, &forged).await),
        ErrorCode::BadSignature
    );

    // Signed by us, naming another agent.
    let mut c = env.client(&k).await;
    let body = BatchBody::new(AgentId([9; 16]), 1, 1, 0, d()).unwrap();
    let mismatch = SignedBatch::seal(&body, &k).unwrap();
    assert_eq!(
        error_code(&send(&mut c, &mismatch).await),
        ErrorCode::AgentMismatch
    );

    // Nothing reached the ledger; the good batch still commits as seq 1.
    let mut c = env.client(&k).await;
    assert!(
        matches!(send(&mut c, &good).await, Frame::Ack(a) if a.outcome == AckOutcome::Committed)
    );
    assert!(metric(&env, "tally_collector_signature_failures_total 3"));
    assert!(metric(
        &env,
        "tally_collector_batches_total{result=\"bad_signature\"} 3"
    ));
    env.assert_verified();
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_badly_enrolled_and_revoked_keys_are_refused() {
    let env = start().await;
    let addr = env.handle.quic_addr();
    let k = key(4);
    assert_eq!(
        refused(TestClient::connect(addr, &env.ca_pem, &k, None).await),
        ErrorCode::UnknownAgent
    );
    assert_eq!(
        refused(TestClient::connect(addr, &env.ca_pem, &k, Some("not-the-token")).await),
        ErrorCode::InvalidEnrollToken
    );
    let mut live = env.client(&k).await;
    assert!(env.handle.shared().revoke(agent_id(&k), false).unwrap());
    // The live connection is closed, and new ones are refused, token or not.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), live.next_reply())
            .await
            .unwrap()
            .is_err()
    );
    assert_eq!(
        refused(TestClient::connect(addr, &env.ca_pem, &k, Some(env.handle.enroll_token())).await),
        ErrorCode::RevokedAgent
    );
    assert!(metric(
        &env,
        "tally_collector_handshakes_total{result=\"unknown_agent\"} 1"
    ));
    assert!(metric(
        &env,
        "tally_collector_handshakes_total{result=\"invalid_enroll_token\"} 1"
    ));
    assert!(metric(
        &env,
        "tally_collector_handshakes_total{result=\"revoked_agent\"} 1"
    ));
    // The same counts over the admin API's /metrics.
    let (status, text) = env
        .http("GET", "/metrics", Some(env.handle.admin_token()), None)
        .await;
    assert_eq!(status, 200);
    for line in [
        "tally_collector_handshakes_total{result=\"unknown_agent\"} 1",
        "tally_collector_handshakes_total{result=\"invalid_enroll_token\"} 1",
        "tally_collector_handshakes_total{result=\"revoked_agent\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_fails() {
    let env = start().await;
    let addr = env.handle.quic_addr();
    let k = key(5);
    // A genuine handshake, recorded.
    let mut a = RawStream::open(addr, &env.ca_pem).await.unwrap();
    let (mut hs, hello) = ClientHandshake::start(
        k.clone(),
        a.binding.to_vec(),
        Some(env.handle.enroll_token()),
    )
    .unwrap();
    a.send(&Frame::Hello(hello.clone())).await.unwrap();
    let Frame::Challenge(ch) = a.recv().await.unwrap() else {
        panic!("no challenge")
    };
    let proof = hs.on_challenge(&ch).unwrap();
    a.send(&Frame::Proof(proof.clone())).await.unwrap();
    assert!(matches!(a.recv().await.unwrap(), Frame::Welcome(_)));
    // The attacker replays hello and proof on its own connection.
    let mut b = RawStream::open(addr, &env.ca_pem).await.unwrap();
    b.send(&Frame::Hello(hello)).await.unwrap();
    assert!(matches!(b.recv().await.unwrap(), Frame::Challenge(_)));
    b.send(&Frame::Proof(proof)).await.unwrap();
    assert_eq!(error_code(&b.recv().await.unwrap()), ErrorCode::BadProof);
    assert!(metric(
        &env,
        "tally_collector_handshakes_total{result=\"bad_proof\"} 1"
    ));
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_does_not_stop_it_serving() {
    let env = start().await;
    env.put_meter("api_calls", Aggregation::Sum);
    let addr = env.handle.quic_addr();
    let mut rng = Rng(42);
    // 20,000 garbage datagrams, some shaped like QUIC long-header Initial packets.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 1500];
    for i in 0..20_000u32 {
        let len = 1 + rng.below(1400) as usize;
        for b in buf.iter_mut().take(len) {
            *b = rng.next() as u8;
        }
        if i % 2 == 0 && len > 8 {
            buf[0] = 0xc3;
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
        }
        let _ = sock.send_to(&buf[..len], addr).await;
        if i % 1000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Authenticated-transport garbage: real TLS, then junk frames and hostile length prefixes.
    let mut junk = Vec::new();
    for i in 0..40u32 {
        let mut s = RawStream::open(addr, &env.ca_pem).await.unwrap();
        let bytes: Vec<u8> = match i % 3 {
            0 => vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
            1 => (0..64).map(|_| rng.next() as u8).collect(),
            _ => vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
        };
        s.send.write_all(&bytes).await.unwrap();
        junk.push(s);
    }
    for mut s in junk {
        let r = tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .unwrap();
        assert!(matches!(r, Ok(Frame::Error(_)) | Err(_)), "{r:?}");
    }
    // A real agent is still served.
    let k = key(6);
    let mut c = env.client(&k).await;
    let b = seal(
        &k,
        1,
        1,
        vec![delta(
            "acme",
            "api_calls",
            &[],
            1_763_000_000_000,
            Decimal::ONE,
            1,
        )],
    );
    assert!(matches!(send(&mut c, &b).await, Frame::Ack(a) if a.outcome == AckOutcome::Committed));
    env.assert_verified();
    env.handle.shutdown().await;
}

/// The registry remembers at most `MAX_LIVE_PER_AGENT` live connections per agent: one more
/// closes the oldest (so a revocation still reaches every connection left open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connections_per_agent_are_bounded() {
    use tally_collector::net::registry::MAX_LIVE_PER_AGENT;
    let env = start().await;
    let k = key(9);
    let mut clients = Vec::new();
    for _ in 0..=MAX_LIVE_PER_AGENT {
        clients.push(env.client(&k).await);
    }
    let registry = &env.handle.shared().registry;
    assert_eq!(registry.live_connections(agent_id(&k)), MAX_LIVE_PER_AGENT);
    let closed = tokio::time::timeout(Duration::from_secs(5), clients[0].conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(u32::from(ErrorCode::Overloaded.number()))),
        "{closed:?}"
    );
    assert!(clients[1].conn.close_reason().is_none());
    env.handle.shutdown().await;
}
