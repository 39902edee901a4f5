//! The PostgreSQL ledger (SPEC §6.5, §9: ≥ 50k deltas/s per collector): deltas/s committed by
//! one and by two collectors sharing one database, batches of 1,000 and of 10, beside the same
//! work on redb.
//!
//! Each "collector" is a thread with its own store (its own connection pool), committing groups
//! of already verified batches from its own agent, as the group committer does under load
//! (8 batches of 1,000, or 100 batches of 10, per transaction); latency is per transaction.
//! Needs `TALLY_TEST_POSTGRES_URL` (a fresh database per run is made and dropped).
//!
//! `TALLY_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p tally-benches --bench postgres`
//! (`TALLY_BENCH_SCALE=0.2` for a quick run).

use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{IngestBatch, Store};
use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

const METERS: [&str; 4] = ["api_calls", "tokens", "storage", "requests"];

fn meter(name: &str) -> MeterDef {
    MeterDef {
        name: MeterName::new(name).expect("meter"),
        aggregation: Aggregation::Sum,
        event_type: name.to_owned(),
        value_property: Some(String::from("$.v")),
        group_by: BoundedVec::default(),
        stripe_event_name: Some(name.to_owned()),
        stripe_unit_scale: Decimal::ONE,
    }
}

/// `n` verified batches of `per_batch` deltas from agent `seed`, over 2,000 customers, 4 meters
/// and 3 dimension sets (as `benches/collector.rs`).
fn batches(seed: u8, n: usize, per_batch: usize) -> Vec<IngestBatch> {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let agent = AgentId::from_public_key(&key.verifying_key());
    let dims = [
        Dimensions::default(),
        Dimensions::from_strs([("model", "small")]).expect("dims"),
        Dimensions::from_strs([("model", "large"), ("region", "eu")]).expect("dims"),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(seed);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t0 = 1_763_000_000_000;
    (0..n)
        .map(|i| {
            let deltas: Vec<Delta> = (0..per_batch)
                .map(|_| {
                    let r = next();
                    let mut d = Delta::single(
                        CustomerId::new(format!("customer-{}", r % 2000)).expect("customer"),
                        MeterName::new(METERS[(r >> 16) as usize % 4]).expect("meter"),
                        dims[(r >> 24) as usize % 3].clone(),
                        t0 + (i as i64 % 60) * 60_000,
                        Decimal::new((r >> 32) as i64 % 100_000, 2),
                    );
                    d.count = 1 + (r >> 40) % 9;
                    d
                })
                .collect();
            let body = BatchBody::new(agent, 1, i as u64 + 1, t0, deltas).expect("body");
            let signed = SignedBatch::seal(&body, &key).expect("seal");
            IngestBatch { body, signed }
        })
        .collect()
}

fn scale() -> f64 {
    std::env::var("TALLY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// Runs one committer thread per store over its own agent's batches; returns deltas/s overall
/// and the per-transaction latency histogram (µs).
fn run(
    stores: Vec<Arc<dyn Store>>,
    per_batch: usize,
    group: usize,
    n: usize,
) -> (f64, Histogram<u64>) {
    let barrier = Arc::new(Barrier::new(stores.len()));
    let inputs: Vec<Vec<IngestBatch>> = (0..stores.len())
        .map(|i| batches(10 + i as u8, n, per_batch))
        .collect();
    let start = Instant::now();
    let handles: Vec<_> = stores
        .into_iter()
        .zip(inputs)
        .map(|(s, input)| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
                b.wait();
                for chunk in input.chunks(group) {
                    let t = Instant::now();
                    s.ingest(chunk, 0).expect("ingest");
                    let _ = h.record(t.elapsed().as_micros() as u64);
                }
                h
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
    let count = handles.len();
    for h in handles {
        all.add(h.join().expect("thread")).expect("add");
    }
    let secs = start.elapsed().as_secs_f64();
    ((count * n * per_batch) as f64 / secs, all)
}

fn report(name: &str, (rate, h): (f64, Histogram<u64>)) {
    let ms = |p| h.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{name:<44} {rate:>9.0} deltas/s   txn p50 {:>7.2} ms  p99 {:>7.2} ms",
        ms(0.5),
        ms(0.99)
    );
}

fn pg_stores(db: &TestDb, n: usize) -> Vec<Arc<dyn Store>> {
    (0..n)
        .map(|_| {
            let s = PgStore::open(db.url()).expect("postgres store");
            for m in METERS {
                s.put_meter(&meter(m)).expect("meter");
            }
            Arc::new(s) as Arc<dyn Store>
        })
        .collect()
}

fn main() {
    let sc = scale();
    let Some(_probe) = TestDb::create("postgres bench") else {
        return;
    };
    for (per_batch, group, n) in [(1000usize, 8usize, 160usize), (10, 100, 8000)] {
        let n = ((n as f64 * sc) as usize).max(group);
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = RedbStore::open(&dir.path().join("b.redb")).expect("redb");
        for m in METERS {
            redb.put_meter(&meter(m)).expect("meter");
        }
        report(
            &format!("redb       1 collector,  batches of {per_batch}"),
            run(vec![Arc::new(redb)], per_batch, group, n),
        );
        for collectors in [1usize, 2] {
            let db = TestDb::create("postgres bench").expect("database");
            let stores = pg_stores(&db, collectors);
            report(
                &format!(
                    "postgres   {collectors} collector{}, batches of {per_batch}",
                    if collectors == 1 { " " } else { "s" }
                ),
                run(stores.clone(), per_batch, group, n),
            );
            let ok = stores[0].verify().expect("verify").ok;
            assert!(ok, "ledger verify");
            drop(stores);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
