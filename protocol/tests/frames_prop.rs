//! Property tests: every frame round-trips; no byte string makes the decoder panic; limits hold.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use rust_decimal::Decimal;
use tally_protocol::batch::*;
use tally_protocol::bounded::{BoundedBytes, BoundedVec, Sig64};
use tally_protocol::catalog::*;
use tally_protocol::entitlements::*;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::*;
use tally_protocol::names::*;

fn decimal() -> impl Strategy<Value = Decimal> {
    (any::<i64>(), 0u32..=28).prop_map(|(m, s)| Decimal::new(m, s))
}

fn non_negative() -> impl Strategy<Value = Decimal> {
    (0i64..i64::MAX, 0u32..=12).prop_map(|(m, s)| Decimal::new(m, s))
}

fn customer() -> impl Strategy<Value = CustomerId> {
    "[a-zA-Z0-9_ éü-]{1,40}".prop_map(|s| CustomerId::new(s).unwrap())
}

fn meter() -> impl Strategy<Value = MeterName> {
    "[a-z0-9_.-]{1,64}".prop_map(|s| MeterName::new(s).unwrap())
}

fn dimensions() -> impl Strategy<Value = Dimensions> {
    proptest::collection::btree_map("[a-zA-Z0-9_.-]{1,16}", "[^\\p{Cc}]{0,20}", 0..=4).prop_map(
        |m| Dimensions::from_strs(m.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap(),
    )
}

fn delta() -> impl Strategy<Value = Delta> {
    (
        customer(),
        meter(),
        dimensions(),
        -1_000_000i64..10_000_000,
        non_negative(),
        1u64..1000,
        non_negative(),
    )
        .prop_map(|(c, m, d, minute, sum, count, last)| {
            let start = minute * BUCKET_MS;
            Delta {
                customer: c,
                meter: m,
                dimensions: d,
                bucket_start_ms: start,
                sum,
                count,
                last,
                first_at_ms: start + 10,
                last_at_ms: start + 59_000,
            }
        })
}

fn body() -> impl Strategy<Value = BatchBody> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        1u64..,
        any::<i64>(),
        proptest::collection::vec(delta(), 0..20),
    )
        .prop_map(|(a, e, s, t, d)| BatchBody::new(AgentId(a), e, s, t, d).unwrap())
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_number)
}

fn meter_def() -> impl Strategy<Value = MeterDef> {
    (
        meter(),
        prop_oneof![
            Just(Aggregation::Sum),
            Just(Aggregation::Count),
            Just(Aggregation::Last)
        ],
        "[a-z_.]{1,20}",
        proptest::option::of("\\$\\.[a-z]{1,10}"),
        proptest::option::of("[a-z_]{1,20}"),
        non_negative(),
    )
        .prop_map(
            |(name, aggregation, event_type, value_property, stripe_event_name, scale)| MeterDef {
                name,
                aggregation,
                event_type,
                value_property,
                group_by: BoundedVec::new(vec![(
                    DimensionKey::new("model").unwrap(),
                    "$.model".into(),
                )])
                .unwrap(),
                stripe_event_name,
                stripe_unit_scale: scale,
            },
        )
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        Just(Source::Plan),
        Just(Source::Override),
        Just(Source::Stripe)
    ]
}

fn entitlements() -> impl Strategy<Value = EntitlementsSnapshot> {
    let limit = (
        meter(),
        (decimal(), decimal(), decimal(), decimal()),
        any::<bool>(),
        source(),
        (any::<i64>(), any::<i64>()),
    )
        .prop_map(
            |(meter, (included, granted, limit, used), hard, source, (start, end))| MeterLimit {
                meter,
                included,
                granted,
                limit,
                used,
                enforcement: if hard {
                    Enforcement::Hard
                } else {
                    Enforcement::Soft
                },
                source,
                period_start_ms: start,
                period_end_ms: end,
            },
        );
    let feature = ("[A-Za-z0-9_.:-]{1,20}", source()).prop_map(|(n, source)| Feature {
        name: FeatureName::new(n).unwrap(),
        source,
    });
    let cust = (
        customer(),
        proptest::option::of("[a-z0-9_.-]{1,20}"),
        proptest::collection::vec(feature, 0..4),
        proptest::collection::vec(limit, 0..4),
    )
        .prop_map(|(customer, plan, f, l)| CustomerEntitlements {
            customer,
            plan: plan.map(|p| PlanName::new(p).unwrap()),
            features: BoundedVec::new(f).unwrap(),
            limits: BoundedVec::new(l).unwrap(),
        });
    (
        any::<u64>(),
        any::<i64>(),
        any::<bool>(),
        proptest::collection::vec(cust, 0..5),
    )
        .prop_map(|(version, built_at_ms, full, c)| EntitlementsSnapshot {
            version,
            built_at_ms,
            full,
            customers: BoundedVec::new(c).unwrap(),
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            any::<[u8; 32]>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
        )
            .prop_map(|(version, public_key, t)| Frame::Hello(Hello {
                version,
                public_key,
                enroll_token: t.map(|t| BoundedBytes::new(t).unwrap()),
            })),
        any::<[u8; 32]>().prop_map(|nonce| Frame::Challenge(Challenge { nonce })),
        (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
            let mut s = [0; 64];
            s[..32].copy_from_slice(&a);
            s[32..].copy_from_slice(&b);
            Frame::Proof(Proof {
                signature: Sig64(s),
            })
        }),
        (any::<[u8; 16]>(), any::<u32>()).prop_map(|(a, m)| Frame::Welcome(Welcome {
            agent_id: AgentId(a),
            max_in_flight: m
        })),
        (body(), any::<[u8; 32]>()).prop_map(|(b, k)| {
            let key = ed25519_dalek::SigningKey::from_bytes(&k);
            let b = BatchBody {
                agent_id: AgentId::from_public_key(&key.verifying_key()),
                ..b
            };
            Frame::Batch(SignedBatch::seal(&b, &key).unwrap())
        }),
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![
                Just(AckOutcome::Committed),
                Just(AckOutcome::Duplicate),
                error_code().prop_map(|code| AckOutcome::Quarantined { code })
            ]
        )
            .prop_map(|(epoch, seq, outcome)| Frame::Ack(Ack {
                epoch,
                seq,
                outcome
            })),
        (any::<u64>(), proptest::collection::vec(meter_def(), 0..5)).prop_map(|(version, m)| {
            Frame::Catalog(Catalog {
                version,
                meters: BoundedVec::new(m).unwrap(),
            })
        }),
        entitlements().prop_map(Frame::Entitlements),
        (any::<u64>(), customer(), meter(), any::<i64>(), decimal()).prop_map(
            |(request_id, customer, meter, period_start_ms, quantity)| {
                Frame::LeaseRequest(LeaseRequest {
                    request_id,
                    customer,
                    meter,
                    period_start_ms,
                    quantity,
                })
            }
        ),
        (
            (any::<u64>(), any::<u64>(), any::<i64>(), any::<i64>()),
            customer(),
            meter(),
            decimal(),
            decimal(),
        )
            .prop_map(
                |(
                    (request_id, lease_id, period_start_ms, expires_at_ms),
                    customer,
                    meter,
                    granted_total,
                    added,
                )| {
                    Frame::LeaseGrant(LeaseGrant {
                        request_id,
                        customer,
                        meter,
                        lease_id,
                        period_start_ms,
                        granted_total,
                        added,
                        expires_at_ms,
                    })
                }
            ),
        proptest::collection::vec(customer(), 0..5).prop_map(|c| {
            Frame::EntitlementsRequest(EntitlementsRequest {
                customers: BoundedVec::new(c).unwrap(),
            })
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(lease_id, epoch, through_seq)| {
            Frame::LeaseRelease(LeaseRelease {
                lease_id,
                epoch,
                through_seq,
            })
        }),
        (error_code(), ".{0,100}").prop_map(|(code, m)| Frame::Error(ErrorFrame::new(code, &m))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_round_trips(f in frame()) {
        let bytes = encode_frame(&f).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &f);
        // Encoding is canonical: the same value always gives the same bytes.
        prop_assert_eq!(encode_frame(&back).unwrap(), bytes);
    }

    #[test]
    fn a_stream_of_frames_splits_anywhere(fs in proptest::collection::vec(frame(), 1..5), cut in any::<prop::sample::Index>()) {
        let bytes: Vec<u8> = fs.iter().flat_map(|f| encode_frame(f).unwrap()).collect();
        let cut = cut.index(bytes.len() + 1);
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        d.push(&bytes[..cut]);
        while let Some(f) = d.next_frame().unwrap() { out.push(f); }
        d.push(&bytes[cut..]);
        while let Some(f) = d.next_frame().unwrap() { out.push(f); }
        prop_assert_eq!(out, fs);
    }

    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
        let _ = decode_payload(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(f in frame(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = encode_frame(&f).unwrap();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(Some((Frame::Batch(b), _))) = decode_frame(&bytes) {
            let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
            let _ = b.verify(&key.verifying_key());
        }
    }

    #[test]
    fn a_signed_batch_with_any_byte_changed_fails(b in body(), k in any::<[u8; 32]>(), i in any::<prop::sample::Index>(), x in 1u8..) {
        let key = ed25519_dalek::SigningKey::from_bytes(&k);
        let b = BatchBody { agent_id: AgentId::from_public_key(&key.verifying_key()), ..b };
        let signed = SignedBatch::seal(&b, &key).unwrap();
        prop_assert_eq!(signed.verify(&key.verifying_key()).unwrap(), b);
        let mut body = signed.body.to_vec();
        let i = i.index(body.len());
        body[i] ^= x;
        let tampered = SignedBatch { body: BoundedBytes::new(body).unwrap(), signature: signed.signature };
        prop_assert_eq!(tampered.verify(&key.verifying_key()), Err(BatchError::BadSignature));
    }

    #[test]
    fn decimals_round_trip_exactly(d in decimal()) {
        let f = Frame::LeaseRequest(LeaseRequest {
            request_id: 1,
            customer: CustomerId::new("c").unwrap(),
            meter: MeterName::new("m").unwrap(),
            period_start_ms: 0,
            quantity: d,
        });
        let Frame::LeaseRequest(back) = decode_frame(&encode_frame(&f).unwrap()).unwrap().unwrap().0 else { unreachable!() };
        prop_assert_eq!(back.quantity.to_string(), d.to_string());
    }
}

#[test]
fn collection_limits_hold_while_decoding() {
    // A catalog frame whose meter count prefix claims far more than the limit.
    let mut payload = postcard::to_stdvec(&6u32).unwrap(); // variant index of Frame::Catalog
    payload.extend(postcard::to_stdvec(&1u64).unwrap()); // version
    payload.extend(postcard::to_stdvec(&(MAX_METERS as u64 + 1)).unwrap());
    assert_eq!(
        decode_payload(&payload).map(|_| ()).unwrap_err().code(),
        ErrorCode::Malformed
    );

    // A batch body with more deltas than allowed is refused at build time.
    let d = Delta::single(
        CustomerId::new("c").unwrap(),
        MeterName::new("m").unwrap(),
        Dimensions::default(),
        0,
        Decimal::ONE,
    );
    assert!(BatchBody::new(AgentId([0; 16]), 1, 1, 0, vec![d; MAX_DELTAS_PER_BATCH + 1]).is_err());
}

#[test]
fn an_oversized_frame_is_refused_when_encoding() {
    let big = Frame::Error(ErrorFrame::new(ErrorCode::Internal, &"x".repeat(10_000)));
    // Messages are cut to the limit, so this still encodes.
    assert!(encode_frame(&big).unwrap().len() < MAX_FRAME_BYTES);
}
