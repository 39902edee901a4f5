//! The session machine driven without sockets, on a virtual clock.

use super::*;
use tally_clock::{Clock, ManualClock};
use tally_protocol::batch::{BatchBody, SignedBatch};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::handshake::ClientHandshake;

const BINDING: [u8; 32] = [7; 32];
const T0: i64 = 1_763_000_000_000;

fn config() -> SessionConfig {
    SessionConfig {
        max_in_flight: 4,
        handshake_timeout_ms: 10_000,
    }
}

fn drain(s: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn sent(actions: &[Action]) -> Vec<Frame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn close_code(actions: &[Action]) -> Option<u32> {
    actions.iter().find_map(|a| match a {
        Action::Close { code, .. } => Some(*code),
        _ => None,
    })
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error(e) => Some(e.code),
        _ => None,
    })
}

/// Runs Hello → Challenge → Proof; returns the session (awaiting admission) and the Admit.
fn to_admission(key: &SigningKey, clock: &ManualClock) -> (Session, Authenticated) {
    let mut s = Session::new(config(), BINDING, [3; 32], clock.now_ms());
    assert_eq!(
        drain(&mut s),
        vec![Action::SetFrameLimit(HANDSHAKE_FRAME_BYTES)]
    );
    let (mut client, hello) = ClientHandshake::start(key.clone(), BINDING.to_vec(), None).unwrap();
    s.handle_frame(clock.now_ms(), Frame::Hello(hello));
    let out = drain(&mut s);
    let [Action::Send(Frame::Challenge(challenge))] = out.as_slice() else {
        panic!("expected a challenge, got {out:?}");
    };
    let proof = client.on_challenge(challenge).unwrap();
    s.handle_frame(clock.now_ms(), Frame::Proof(proof));
    let out = drain(&mut s);
    let [Action::Admit(auth)] = out.as_slice() else {
        panic!("expected an admission request, got {out:?}");
    };
    (s, (**auth).clone())
}

fn ready(key: &SigningKey, clock: &ManualClock) -> Session {
    let (mut s, _) = to_admission(key, clock);
    s.on_catalog(Catalog::default());
    s.on_admitted(clock.now_ms(), Admission::Known);
    let out = drain(&mut s);
    let frames = sent(&out);
    assert!(matches!(frames[0], Frame::Welcome(_)), "{out:?}");
    assert!(matches!(frames[1], Frame::Catalog(_)));
    assert!(matches!(frames[2], Frame::Entitlements(_)));
    assert!(out.contains(&Action::SetFrameLimit(MAX_FRAME_BYTES)));
    assert!(out.contains(&Action::Note(Note::Handshake("ok"))));
    s
}

fn batch(key: &SigningKey, seq: u64) -> SignedBatch {
    let agent = AgentId::from_public_key(&key.verifying_key());
    let body = BatchBody::new(agent, 1, seq, T0, Vec::new()).unwrap();
    SignedBatch::seal(&body, key).unwrap()
}

/// Sends batches and returns their tickets, in order.
fn send_batches(s: &mut Session, key: &SigningKey, seqs: &[u64], now: i64) -> Vec<u64> {
    let mut tickets = Vec::new();
    for &seq in seqs {
        s.handle_frame(now, Frame::Batch(batch(key, seq)));
        for a in drain(s) {
            match a {
                Action::Ingest { ticket, batch } => {
                    assert_eq!(batch.body.seq, seq);
                    tickets.push(ticket);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    tickets
}

fn acks(frames: &[Frame]) -> Vec<(u64, AckOutcome)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Ack(a) => Some((a.seq, a.outcome)),
            _ => None,
        })
        .collect()
}

const COMMITTED: IngestReply = Ok(IngestOutcome::Ack(AckOutcome::Committed));

#[test]
fn good_handshake_welcomes_and_pushes_the_catalog_then_its_changes() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let (s, auth) = to_admission(&key, &clock);
    assert_eq!(
        auth.agent_id,
        AgentId::from_public_key(&key.verifying_key())
    );
    drop(s);
    let mut s = ready(&key, &clock);
    assert_eq!(s.poll_timeout(), None, "no timer once welcomed");
    let c = Catalog {
        version: 2,
        ..Catalog::default()
    };
    s.on_catalog(c.clone());
    assert_eq!(sent(&drain(&mut s)), vec![Frame::Catalog(c)]);
}

#[test]
fn a_bad_proof_is_refused() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = Session::new(config(), BINDING, [3; 32], clock.now_ms());
    drain(&mut s);
    // The client signs for another connection's binding.
    let (mut client, hello) = ClientHandshake::start(key, vec![9; 32], None).unwrap();
    s.handle_frame(clock.now_ms(), Frame::Hello(hello));
    let out = drain(&mut s);
    let [Action::Send(Frame::Challenge(ch))] = out.as_slice() else {
        panic!("{out:?}")
    };
    s.handle_frame(
        clock.now_ms(),
        Frame::Proof(client.on_challenge(ch).unwrap()),
    );
    let out = drain(&mut s);
    assert_eq!(error_code(&sent(&out)), Some(ErrorCode::BadProof));
    assert!(out.contains(&Action::Note(Note::Handshake("bad_proof"))));
    assert_eq!(
        close_code(&out),
        Some(u32::from(ErrorCode::BadProof.number()))
    );
    assert!(s.is_closed());
}

#[test]
fn a_revoked_agent_is_refused_at_admission_and_cut_off_in_session() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let (mut s, _) = to_admission(&key, &clock);
    s.on_admitted(clock.now_ms(), Admission::Refuse(ErrorCode::RevokedAgent));
    let out = drain(&mut s);
    assert_eq!(error_code(&sent(&out)), Some(ErrorCode::RevokedAgent));
    assert!(!sent(&out).iter().any(|f| matches!(f, Frame::Welcome(_))));
    assert!(s.is_closed());

    let mut s = ready(&key, &clock);
    let tickets = send_batches(&mut s, &key, &[1], clock.now_ms());
    s.on_revoked();
    let out = drain(&mut s);
    assert_eq!(error_code(&sent(&out)), Some(ErrorCode::RevokedAgent));
    assert_eq!(
        close_code(&out),
        Some(u32::from(ErrorCode::RevokedAgent.number()))
    );
    // A reply that comes late sends nothing.
    s.on_ingest_reply(tickets[0], COMMITTED);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn acks_leave_in_batch_order_when_replies_come_back_out_of_order() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    let t = send_batches(&mut s, &key, &[1, 2, 3], clock.now_ms());
    s.on_ingest_reply(t[2], COMMITTED);
    s.on_ingest_reply(t[1], COMMITTED);
    assert!(
        sent(&drain(&mut s)).is_empty(),
        "batch 1 is not durable yet"
    );
    // A push queued now waits behind the owed acks; a newer one replaces it.
    s.on_catalog(Catalog {
        version: 4,
        ..Catalog::default()
    });
    let c = Catalog {
        version: 5,
        ..Catalog::default()
    };
    s.on_catalog(c.clone());
    assert!(sent(&drain(&mut s)).is_empty());
    s.on_ingest_reply(t[0], COMMITTED);
    let out = drain(&mut s);
    let frames = sent(&out);
    assert_eq!(
        acks(&frames),
        vec![
            (1, AckOutcome::Committed),
            (2, AckOutcome::Committed),
            (3, AckOutcome::Committed)
        ]
    );
    assert_eq!(frames.last(), Some(&Frame::Catalog(c)));
    assert_eq!(
        frames
            .iter()
            .filter(|f| matches!(f, Frame::Catalog(_)))
            .count(),
        1,
        "one catalog push waited"
    );
    let noted: Vec<u64> = out
        .iter()
        .filter_map(|a| match a {
            Action::Acked { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(noted, vec![1, 2, 3]);
}

#[test]
fn a_duplicated_batch_is_acked_duplicate() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    let t = send_batches(&mut s, &key, &[1, 1], clock.now_ms());
    s.on_ingest_reply(t[1], Ok(IngestOutcome::Ack(AckOutcome::Duplicate)));
    s.on_ingest_reply(t[0], COMMITTED);
    assert_eq!(
        acks(&sent(&drain(&mut s))),
        vec![(1, AckOutcome::Committed), (1, AckOutcome::Duplicate)]
    );
}

#[test]
fn exceeding_max_in_flight_is_a_protocol_error() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    let t = send_batches(&mut s, &key, &[1, 2, 3, 4], clock.now_ms());
    // Acks sent free the window.
    s.on_ingest_reply(t[0], COMMITTED);
    drain(&mut s);
    send_batches(&mut s, &key, &[5], clock.now_ms());
    // Now 4 owed: the next one is over the window.
    s.handle_frame(clock.now_ms(), Frame::Batch(batch(&key, 6)));
    let out = drain(&mut s);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Ingest { .. })),
        "{out:?}"
    );
    assert!(!s.wants_frames());
    // The owed acks are still sent, then the error, then close.
    for ticket in &t[1..] {
        s.on_ingest_reply(*ticket, COMMITTED);
    }
    s.on_ingest_reply(t[3] + 1, COMMITTED);
    let out = drain(&mut s);
    let frames = sent(&out);
    assert_eq!(acks(&frames).len(), 4);
    assert_eq!(error_code(&frames), Some(ErrorCode::Overloaded));
    assert_eq!(
        close_code(&out),
        Some(u32::from(ErrorCode::Overloaded.number()))
    );
}

#[test]
fn the_handshake_times_out_on_the_virtual_clock() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let (mut s, _) = to_admission(&key, &clock);
    let due = s.poll_timeout().unwrap();
    assert_eq!(due, T0 + 10_000);
    clock.advance_ms(9_999);
    s.handle_timeout(clock.now_ms());
    assert!(drain(&mut s).is_empty());
    clock.advance_ms(1);
    s.handle_timeout(clock.now_ms());
    let out = drain(&mut s);
    assert!(out.contains(&Action::Note(Note::Handshake("timeout"))));
    assert_eq!(close_code(&out), Some(1));
    // The registry's late answer changes nothing.
    s.on_admitted(clock.now_ms(), Admission::Known);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn shutdown_flushes_the_acks_of_batches_already_received() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    let t = send_batches(&mut s, &key, &[1, 2], clock.now_ms());
    s.on_shutdown();
    assert!(!s.wants_frames(), "no new batches once shutting down");
    assert!(sent(&drain(&mut s)).is_empty());
    s.on_ingest_reply(t[1], COMMITTED);
    s.on_ingest_reply(t[0], COMMITTED);
    let out = drain(&mut s);
    let frames = sent(&out);
    assert_eq!(
        acks(&frames),
        vec![(1, AckOutcome::Committed), (2, AckOutcome::Committed)]
    );
    assert_eq!(error_code(&frames), Some(ErrorCode::ShuttingDown));
    assert!(matches!(frames.last(), Some(Frame::Error(_))));
    assert!(matches!(out.last(), Some(Action::Close { .. })));
}

#[test]
fn a_bad_signature_is_never_ingested_and_a_refused_reply_ends_the_session() {
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    let mut b = batch(&key, 1);
    b.signature.0[0] ^= 1;
    s.handle_frame(clock.now_ms(), Frame::Batch(b));
    let out = drain(&mut s);
    assert!(!out.iter().any(|a| matches!(a, Action::Ingest { .. })));
    assert!(out.contains(&Action::Note(Note::BatchRefused("bad_signature"))));
    assert_eq!(error_code(&sent(&out)), Some(ErrorCode::BadSignature));

    let mut s = ready(&key, &clock);
    let t = send_batches(&mut s, &key, &[1, 2], clock.now_ms());
    s.on_ingest_reply(t[0], Ok(IngestOutcome::Refused(ErrorCode::Overloaded)));
    s.on_ingest_reply(t[1], COMMITTED);
    let out = drain(&mut s);
    assert!(acks(&sent(&out)).is_empty(), "nothing after the refusal");
    assert_eq!(error_code(&sent(&out)), Some(ErrorCode::Overloaded));
    assert!(s.is_closed());
}

#[test]
fn lease_requests_behind_owed_acks_are_bounded() {
    use tally_protocol::entitlements::LeaseRequest;
    use tally_protocol::names::{CustomerId, MeterName};
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    send_batches(&mut s, &key, &[1], clock.now_ms());
    let req = |i: u64| {
        Frame::LeaseRequest(LeaseRequest {
            request_id: i,
            customer: CustomerId::new("c").unwrap(),
            meter: MeterName::new("calls").unwrap(),
            period_start_ms: 0,
            quantity: rust_decimal::Decimal::ONE,
        })
    };
    // The shell answers each request from the lease book; the grants wait behind the ack.
    let answer = |s: &mut Session| {
        for a in drain(s) {
            if let Action::Lease(r) = a {
                s.on_lease_grant(tally_protocol::entitlements::LeaseGrant {
                    request_id: r.request_id,
                    customer: r.customer,
                    meter: r.meter,
                    lease_id: 1,
                    period_start_ms: 0,
                    granted_total: rust_decimal::Decimal::ONE,
                    added: rust_decimal::Decimal::ONE,
                    expires_at_ms: 1,
                });
            }
        }
    };
    for i in 0..MAX_QUEUED_FRAMES as u64 {
        s.handle_frame(clock.now_ms(), req(i));
        answer(&mut s);
        assert!(s.wants_frames());
    }
    s.handle_frame(clock.now_ms(), req(999));
    assert!(!s.wants_frames(), "one more is a protocol error");
}

#[test]
fn customers_seen_in_batches_and_requests_are_watched_once() {
    use tally_protocol::entitlements::EntitlementsRequest;
    use tally_protocol::names::CustomerId;
    let clock = ManualClock::new(T0);
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut s = ready(&key, &clock);
    let acme = CustomerId::new("acme").unwrap();
    let other = CustomerId::new("other").unwrap();
    let ask = |s: &mut Session| {
        s.handle_frame(
            clock.now_ms(),
            Frame::EntitlementsRequest(EntitlementsRequest {
                customers: tally_protocol::bounded::BoundedVec::new(vec![
                    CustomerId::new("acme").unwrap(),
                    CustomerId::new("other").unwrap(),
                ])
                .unwrap(),
            }),
        );
        drain(s)
    };
    let out = ask(&mut s);
    assert!(out.contains(&Action::Watch(vec![acme.clone(), other.clone()])));
    // Asked again: answered again (the agent asked), still tracked once.
    let out = ask(&mut s);
    assert!(out.contains(&Action::Watch(vec![acme.clone(), other.clone()])));
    assert_eq!(s.seen_customers().count(), 2);
    assert!(s.watches(&acme));
}
