//! Encode, decode, sign and verify of a 1,000-delta batch.
//!
//! `cargo bench -p tally-benches --bench protocol`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rust_decimal::Decimal;
use std::hint::black_box;
use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
use tally_protocol::frame::{Frame, decode_frame, encode_frame};
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

fn batch_body(key: &ed25519_dalek::SigningKey) -> BatchBody {
    let meters = [MeterName::new("api_calls"), MeterName::new("tokens")].map(|m| m.expect("valid"));
    let deltas = (0..1_000)
        .map(|i| {
            let dims =
                Dimensions::from_strs([("model", if i % 2 == 0 { "gpt-4o" } else { "claude" })])
                    .expect("valid");
            let mut d = Delta::single(
                CustomerId::new(format!("customer-{:05}", i / 2)).expect("valid"),
                meters[i % 2].clone(),
                dims,
                1_763_700_000_000 + i as i64,
                Decimal::new(12_345 + i as i64, 3),
            );
            d.count = 17;
            d
        })
        .collect();
    BatchBody::new(
        AgentId::from_public_key(&key.verifying_key()),
        1,
        42,
        1_763_700_060_000,
        deltas,
    )
    .expect("within limits")
}

fn bench(c: &mut Criterion) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let body = batch_body(&key);
    let signed = SignedBatch::seal(&body, &key).expect("seal");
    let frame = Frame::Batch(signed.clone());
    let bytes = encode_frame(&frame).expect("encode");
    eprintln!("1,000-delta batch frame: {} bytes", bytes.len());

    let mut g = c.benchmark_group("batch_1000_deltas");
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("encode_body", |b| {
        b.iter(|| black_box(&body).canonical_bytes().expect("encode"))
    });
    g.bench_function("encode_frame", |b| {
        b.iter(|| encode_frame(black_box(&frame)).expect("encode"))
    });
    g.bench_function("decode_frame", |b| {
        b.iter(|| decode_frame(black_box(&bytes)).expect("decode"))
    });
    g.bench_function("sign", |b| {
        b.iter(|| SignedBatch::seal(black_box(&body), &key).expect("seal"))
    });
    g.bench_function("verify_and_decode", |b| {
        b.iter(|| {
            black_box(&signed)
                .verify(&key.verifying_key())
                .expect("verify")
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
