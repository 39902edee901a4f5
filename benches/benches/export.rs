//! Analytics export (issue 17): ledger positions exported per second and bytes per row, Parquet
//! and NDJSON, from a redb store of usage transfers (2,000 customers, 4 meters, 3 dimension
//! sets) into a fresh export directory (fsync on), in files of 100,000 positions.
//!
//! `cargo bench -p tally-benches --bench export` (`TALLY_BENCH_SCALE=0.2` for a quick run).

use rust_decimal::Decimal;
use std::time::Instant;
use tally_collector::export::core::{Dataset, Format};
use tally_collector::export::{ExportOptions, export_once, read_manifest};
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
        stripe_event_name: None,
        stripe_unit_scale: Decimal::ONE,
    }
}

/// A store holding `batches` × 1,000 usage transfers.
fn fill(dir: &std::path::Path, batches: usize) -> RedbStore {
    let s = RedbStore::open(&dir.join("bench.redb")).expect("store");
    for m in METERS {
        s.put_meter(&meter(m)).expect("meter");
    }
    let key = SigningKey::from_bytes(&[3; 32]);
    let agent = AgentId::from_public_key(&key.verifying_key());
    let dims = [
        Dimensions::default(),
        Dimensions::from_strs([("model", "small")]).expect("dims"),
        Dimensions::from_strs([("model", "large"), ("region", "eu")]).expect("dims"),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let t0 = 1_763_000_000_000;
    for i in 0..batches {
        let deltas: Vec<Delta> = (0..1000)
            .map(|j| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut d = Delta::single(
                    CustomerId::new(format!("customer-{}", x % 2000)).expect("customer"),
                    MeterName::new(METERS[(x >> 16) as usize % 4]).expect("meter"),
                    dims[(x >> 24) as usize % 3].clone(),
                    t0 + (i as i64) * 60_000 + j,
                    Decimal::new((x >> 32) as i64 % 100_000, 2),
                );
                d.count = 1 + (x >> 40) % 9;
                d
            })
            .collect();
        let body = BatchBody::new(agent, 1, i as u64 + 1, t0, deltas).expect("body");
        let signed = SignedBatch::seal(&body, &key).expect("seal");
        s.ingest(&[IngestBatch { body, signed }], t0 + i as i64 * 1000)
            .expect("ingest");
    }
    s
}

fn main() {
    let scale: f64 = std::env::var("TALLY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let batches = ((300.0 * scale) as usize).max(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = fill(dir.path(), batches);
    let rows = batches as f64 * 1000.0;
    println!("export of {} ledger positions", rows as u64);
    for format in [Format::Parquet, Format::Ndjson] {
        let out = tempfile::tempdir().expect("tempdir");
        let opts = ExportOptions {
            format,
            ..ExportOptions::new(out.path())
        };
        let t = Instant::now();
        let r = export_once(&store, &opts).expect("export");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(r.rows as f64, rows);
        let m = read_manifest(out.path())
            .expect("manifest")
            .expect("manifest");
        let bytes = |ds: Dataset| -> u64 {
            m.files
                .iter()
                .filter(|f| f.dataset == ds)
                .map(|f| f.bytes)
                .sum()
        };
        let hourly_rows: u64 = m
            .files
            .iter()
            .filter(|f| f.dataset == Dataset::UsageHourly)
            .map(|f| f.rows)
            .sum();
        println!(
            "{:<8} {:>9.0} rows/s  transfers {:>6.1} bytes/row  usage_hourly {:>6.1} bytes/row ({} rows)  {:.2} s",
            format!("{format:?}"),
            rows / secs,
            bytes(Dataset::Transfers) as f64 / rows,
            bytes(Dataset::UsageHourly) as f64 / hourly_rows.max(1) as f64,
            hourly_rows,
            secs
        );
    }
}
