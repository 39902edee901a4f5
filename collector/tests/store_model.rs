//! The redb store against a model: random batches (duplicates, reorders, several epochs and
//! agents, some unpostable) committed in random group sizes — so duplicates and shared accounts
//! meet inside one transaction — plus adjustments; totals equal the model and verify is clean
//! after every step. The in-memory reference store (same ingest rules, same trait) gives the
//! same outcomes and totals.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use proptest::prelude::*;
use rust_decimal::Decimal;
use std::collections::{HashMap, HashSet};
use tally_collector::core::ledger::{Adjustment, Period};
use tally_collector::store::memory::MemoryLedger;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{AdjustOutcome, IngestBatch, IngestOutcome, Store};
use tally_protocol::batch::{BatchBody, SignedBatch};
use tally_protocol::catalog::Aggregation;
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::frame::AckOutcome;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

const T0: i64 = 1_761_955_200_000; // 2025-11-01

fn usage(store: &dyn Store, customer: &str, meter: &str, period: Period) -> Decimal {
    store
        .usage_accounts(
            &CustomerId::new(customer).unwrap(),
            Some(&MeterName::new(meter).unwrap()),
            Some(period),
        )
        .unwrap()
        .iter()
        .map(|a| a.balance())
        .sum()
}

type Contents = Vec<Vec<(u8, u8, i64, i64, u32, u64)>>;

fn contents() -> impl Strategy<Value = Contents> {
    proptest::collection::vec(
        proptest::collection::vec(
            (
                0u8..3,
                0u8..4,
                0i64..(60 * 24 * 45),
                0i64..100_000,
                0u32..3,
                0u64..4,
            ),
            1..8,
        ),
        8,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn redb_store_matches_a_model(
        contents in contents(),
        sends in proptest::collection::vec((0u8..2, 1u64..3, 1u64..5), 1..40),
        groups in proptest::collection::vec(1usize..6, 40),
        adjustments in proptest::collection::vec((0u8..3, -3i64..4, 0u8..3), 0..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        model_case(&store, contents, sends, groups, adjustments)?;
    }

    /// The same model on PostgreSQL (a fresh database per case) when `TALLY_TEST_POSTGRES_URL`
    /// is set.
    #[test]
    fn postgres_store_matches_a_model(
        contents in contents(),
        sends in proptest::collection::vec((0u8..2, 1u64..3, 1u64..5), 1..40),
        groups in proptest::collection::vec(1usize..6, 40),
        adjustments in proptest::collection::vec((0u8..3, -3i64..4, 0u8..3), 0..6),
    ) {
        let Some(db) = TestDb::create("postgres_store_matches_a_model") else { return Ok(()) };
        let store = PgStore::open(db.url()).unwrap();
        model_case(&store, contents, sends, groups, adjustments)?;
    }
}

fn model_case(
    store: &dyn Store,
    contents: Contents,
    sends: Vec<(u8, u64, u64)>,
    groups: Vec<usize>,
    adjustments: Vec<(u8, i64, u8)>,
) -> Result<(), TestCaseError> {
    {
        for (name, agg) in [
            ("calls", Aggregation::Sum),
            ("events", Aggregation::Count),
            ("seats", Aggregation::Last),
        ] {
            store.put_meter(&common::meter(name, agg)).unwrap();
        }
        let mut reference = MemoryLedger::new(store.catalog().unwrap());
        let keys = [
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        ];
        let names = ["calls", "events", "seats", "ghost"];
        let mut model: HashMap<(String, &str, Period), Decimal> = HashMap::new();
        let mut lasts: HashMap<(String, Period), (i64, Decimal)> = HashMap::new();
        let mut done: HashSet<(u8, u64, u64)> = HashSet::new();
        let mut pending: Vec<(IngestBatch, (u8, u64, u64))> = Vec::new();
        let mut g = groups.iter().cycle();
        let mut expected = Vec::new();
        for (i, &(agent, epoch, seq)) in sends.iter().enumerate() {
            let idx = (agent as usize * 8 + epoch as usize * 4 + seq as usize) % contents.len();
            let deltas: Vec<_> = contents[idx]
                .iter()
                .map(|&(c, m, minute, mant, scale, count)| {
                    common::delta(
                        &format!("c{c}"),
                        names[m as usize],
                        &[],
                        T0 + minute * 60_000,
                        Decimal::new(mant, scale),
                        count,
                    )
                })
                .collect();
            let body = BatchBody::new(
                common::agent_id(&keys[agent as usize]),
                epoch,
                seq,
                T0 + 46 * 86_400_000,
                deltas.clone(),
            )
            .unwrap();
            let signed = SignedBatch::seal(&body, &keys[agent as usize]).unwrap();
            // The model, in send order.
            let first = done.insert((agent, epoch, seq));
            let postable = deltas
                .iter()
                .all(|d| d.count > 0 && d.meter.as_str() != "ghost");
            expected.push(match (first, postable) {
                (false, _) => "duplicate",
                (true, true) => "committed",
                (true, false) => "quarantined",
            });
            if first && postable {
                for d in &deltas {
                    let p = Period::of_ms(d.bucket_start_ms);
                    match d.meter.as_str() {
                        "calls" => {
                            *model
                                .entry((d.customer.to_string(), "calls", p))
                                .or_default() += d.sum
                        }
                        "events" => {
                            *model
                                .entry((d.customer.to_string(), "events", p))
                                .or_default() += Decimal::from(d.count)
                        }
                        _ => {
                            let e = lasts
                                .entry((d.customer.to_string(), p))
                                .or_insert((i64::MIN, Decimal::ZERO));
                            if (d.last_at_ms, d.last) > *e {
                                *e = (d.last_at_ms, d.last);
                            }
                        }
                    }
                }
            }
            pending.push((IngestBatch { body, signed }, (agent, epoch, seq)));
            let flush = i + 1 == sends.len() || pending.len() >= *g.next().unwrap();
            if flush {
                let batches: Vec<IngestBatch> = pending.drain(..).map(|(b, _)| b).collect();
                let outs = store.ingest(&batches, T0 + 46 * 86_400_000).unwrap();
                prop_assert_eq!(
                    &reference.ingest(&batches, T0 + 46 * 86_400_000).unwrap(),
                    &outs
                );
                let got: Vec<&str> = outs
                    .iter()
                    .map(|o| match o {
                        IngestOutcome::Ack(AckOutcome::Committed) => "committed",
                        IngestOutcome::Ack(AckOutcome::Duplicate) => "duplicate",
                        IngestOutcome::Ack(AckOutcome::Quarantined { .. }) => "quarantined",
                        IngestOutcome::Refused(_) => "refused",
                    })
                    .collect();
                let want: Vec<&str> = std::mem::take(&mut expected);
                prop_assert_eq!(got, want);
                let r = store.verify().unwrap();
                prop_assert!(r.ok, "{:?}", r);
            }
        }
        for ((c, m, p), want) in &model {
            prop_assert_eq!(
                reference.usage(c, m, *p),
                *want,
                "reference {} {} {}",
                c,
                m,
                p
            );
        }
        for ((c, p), (_, v)) in &lasts {
            prop_assert_eq!(
                reference.usage(c, "seats", *p),
                *v,
                "reference {} seats {}",
                c,
                p
            );
        }
        let period = Period::of_ms(T0);
        for (c, q, k) in adjustments {
            if q == 0 {
                continue;
            }
            let adj = Adjustment {
                customer: CustomerId::new(format!("c{c}")).unwrap(),
                meter: MeterName::new("calls").unwrap(),
                dimensions: Dimensions::default(),
                period,
                quantity: Decimal::from(q),
                reason: String::from("p"),
                idempotency_key: format!("k{k}"),
            };
            let before = usage(store, &format!("c{c}"), "calls", period);
            match store.adjust(&adj, 0).unwrap() {
                AdjustOutcome::Created(_) => {
                    *model.entry((format!("c{c}"), "calls", period)).or_default() +=
                        Decimal::from(q);
                    prop_assert!(before + Decimal::from(q) >= Decimal::ZERO);
                }
                AdjustOutcome::Rejected(_) => {
                    prop_assert!(before + Decimal::from(q) < Decimal::ZERO)
                }
                AdjustOutcome::Exists(_) | AdjustOutcome::ExistsWithDifferent(_) => {}
            }
            prop_assert!(store.verify().unwrap().ok);
        }
        for ((c, m, p), want) in &model {
            prop_assert_eq!(usage(store, c, m, *p), *want, "{} {} {}", c, m, p);
        }
        for ((c, p), (_, v)) in &lasts {
            prop_assert_eq!(usage(store, c, "seats", *p), *v, "{} seats {}", c, p);
        }
    }
    Ok(())
}

#[test]
fn verify_catches_dedup_and_batch_record_drift() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let key = SigningKey::from_bytes(&[3; 32]);
    {
        let store = RedbStore::open(&path).unwrap();
        store
            .put_meter(&common::meter("calls", Aggregation::Sum))
            .unwrap();
        let batches: Vec<IngestBatch> = (1..=3)
            .map(|seq| {
                let d = common::delta("c", "calls", &[], T0, Decimal::ONE, 1);
                let body = BatchBody::new(common::agent_id(&key), 1, seq, T0, vec![d]).unwrap();
                let signed = SignedBatch::seal(&body, &key).unwrap();
                IngestBatch { body, signed }
            })
            .collect();
        store.ingest(&batches, T0).unwrap();
        assert!(store.verify().unwrap().ok);
    }
    // Forget that seq 3 was done: its transfers no longer trace, and the records disagree.
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: redb::TableDefinition<(u128, u64), &[u8]> = redb::TableDefinition::new("dedup");
        let mut t = txn.open_table(def).unwrap();
        let mut state = tally_collector::core::dedup::DedupState::default();
        state.insert(1).unwrap();
        state.insert(2).unwrap();
        let k = (common::agent_id(&key).as_u128(), 1u64);
        t.insert(k, postcard::to_stdvec(&state).unwrap().as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
    drop(db);
    let store = RedbStore::open(&path).unwrap();
    let r = store.verify().unwrap();
    assert!(!r.ok);
    assert!(
        r.violations.iter().any(|v| v.contains("dedup state")),
        "{r:?}"
    );
}
