//! The console's reads against a redb ledger of 100,000 transfers over 2,000 customers
//! (decision 0077): a customer's usage series (a scan of the transfers filtered by customer,
//! then hour buckets — what `GET /v1/usage/series` does) and the customer search (a skip-scan of
//! the usage index).
//!
//! `cargo bench -p tally-benches --bench console`

use criterion::{Criterion, criterion_group, criterion_main};
use rust_decimal::Decimal;
use std::hint::black_box;
use tally_collector::api::series::{Buckets, Granularity};
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{IngestBatch, Store};
use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

const CUSTOMERS: u64 = 2_000;
const BATCHES: usize = 100;
const PER_BATCH: usize = 1_000;
const T0: i64 = 1_763_000_000_000;

fn filled(dir: &std::path::Path) -> RedbStore {
    let s = RedbStore::open(&dir.join("console.redb")).expect("store");
    s.put_meter(&MeterDef {
        name: MeterName::new("api_calls").expect("meter"),
        aggregation: Aggregation::Sum,
        event_type: String::from("api_calls"),
        value_property: Some(String::from("$.v")),
        group_by: BoundedVec::default(),
        stripe_event_name: None,
        stripe_unit_scale: Decimal::ONE,
    })
    .expect("meter");
    let key = SigningKey::from_bytes(&[7; 32]);
    let agent = AgentId::from_public_key(&key.verifying_key());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..BATCHES {
        let deltas: Vec<Delta> = (0..PER_BATCH)
            .map(|j| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Delta::single(
                    CustomerId::new(format!("customer-{}", x % CUSTOMERS)).expect("customer"),
                    MeterName::new("api_calls").expect("meter"),
                    Dimensions::default(),
                    // Spread over 48 hours.
                    T0 + ((i * PER_BATCH + j) as i64 % 2_880) * 60_000,
                    Decimal::new((x >> 32) as i64 % 100_000, 2),
                )
            })
            .collect();
        let body = BatchBody::new(agent, 1, i as u64 + 1, T0, deltas).expect("body");
        let signed = SignedBatch::seal(&body, &key).expect("seal");
        s.ingest(&[IngestBatch { body, signed }], T0)
            .expect("ingest");
    }
    s
}

fn series(s: &RedbStore, c: &CustomerId, m: &MeterName) -> Decimal {
    let mut b = Buckets::new(T0, T0 + 48 * 3_600_000, Granularity::Hour).expect("range");
    let mut after = 0;
    loop {
        let rows = s.entries(Some(c), after, 10_000).expect("entries");
        for (_, t) in &rows {
            if t.unit == *m {
                b.add(t);
            }
        }
        match rows.last() {
            Some((p, _)) if rows.len() == 10_000 => after = *p,
            _ => break,
        }
    }
    b.points().iter().map(|p| p.quantity).sum()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = filled(dir.path());
    let customer = CustomerId::new("customer-42").expect("customer");
    let meter = MeterName::new("api_calls").expect("meter");
    assert!(series(&s, &customer, &meter) > Decimal::ZERO);
    let mut g = c.benchmark_group("console");
    g.sample_size(20);
    g.bench_function("usage_series_48h_of_100k_transfers", |b| {
        b.iter(|| black_box(series(&s, &customer, &meter)))
    });
    g.bench_function("customer_search_prefix_50_of_2000", |b| {
        b.iter(|| black_box(s.customers("customer-1", "", 50).expect("customers")))
    });
    g.bench_function("customer_list_first_1000", |b| {
        b.iter(|| black_box(s.customers("", "", 1000).expect("customers")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
