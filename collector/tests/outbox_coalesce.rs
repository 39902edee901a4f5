//! Outbox coalescing (docs/decisions/0106) through the real stores: ledger transactions add
//! to one open bucket per (customer, meter, minute) instead of writing rows; a seal turns
//! buckets into rows once; units after a claim make new rows and never change a group; Σ rows +
//! open = ⌊ledger × scale⌋ throughout, across a reopen (redb) and with two collectors ingesting
//! and sealing at once on one PostgreSQL database; the per-record limit spills the oldest
//! bucket as a row.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, BTreeSet};
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{IngestBatch, IngestOutcome, Store};
use tally_forward::stripe::coalesce::MAX_OPEN_BUCKETS;
use tally_forward::stripe::outbox::{EventGroup, NewGroup, OutboxRow, OutboxStore, identifier_for};
use tally_protocol::batch::{BatchBody, SignedBatch};
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::AckOutcome;
use tally_protocol::names::{CustomerId, MeterName};

const T0: i64 = 1_763_000_040_000;
const CUSTOMERS: [&str; 3] = ["acme", "beta", "gamma"];

fn forwarded(store: &dyn Store) {
    let mut m = meter("calls", Aggregation::Sum);
    m.stripe_event_name = Some("calls_ev".into());
    m.stripe_unit_scale = Decimal::from(10);
    store.put_meter(&m).unwrap();
}

/// Batch `seq` of agent `seed`: 100 deltas over the customers and `minutes` minutes, 0.01–0.99.
fn batch(seed: u8, seq: u64, minutes: i64) -> IngestBatch {
    let k = key(seed);
    let deltas = (0..100u64)
        .map(|i| {
            let x = seq * 131 + i * 17;
            delta(
                CUSTOMERS[(x % 3) as usize],
                "calls",
                &[],
                T0 + ((x / 3) as i64 % minutes) * 60_000,
                Decimal::new(1 + (x % 99) as i64, 2),
                1,
            )
        })
        .collect();
    let body = BatchBody::new(agent_id(&k), 1, seq, T0, deltas).unwrap();
    let signed = SignedBatch::seal(&body, &k).unwrap();
    IngestBatch { body, signed }
}

fn ingest(store: &dyn Store, batches: &[IngestBatch]) {
    for o in store.ingest(batches, T0).unwrap() {
        assert_eq!(o, IngestOutcome::Ack(AckOutcome::Committed));
    }
}

/// ⌊ledger × 10⌋ per customer.
fn due(store: &dyn Store) -> BTreeMap<String, u64> {
    CUSTOMERS
        .iter()
        .map(|c| {
            let total: Decimal = store
                .usage_accounts(
                    &CustomerId::new(*c).unwrap(),
                    Some(&MeterName::new("calls").unwrap()),
                    None,
                )
                .unwrap()
                .iter()
                .map(|a| a.balance())
                .sum();
            (
                c.to_string(),
                (total * Decimal::from(10)).floor().try_into().unwrap(),
            )
        })
        .collect()
}

/// Σ outbox units (rows and open buckets) per customer.
fn owed(store: &dyn Store) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = CUSTOMERS.iter().map(|c| (c.to_string(), 0)).collect();
    for (c, e, _, v) in store.outbox_items().unwrap() {
        assert_eq!(e, "calls_ev");
        *out.get_mut(&c).unwrap() += v;
    }
    out
}

fn all_rows(s: &impl OutboxStore) -> Vec<OutboxRow> {
    s.pending_rows(0, 100_000).unwrap()
}

/// Claims every pending row, one group per row.
fn claim(s: &impl OutboxStore) -> Vec<EventGroup> {
    let ns = s.namespace().unwrap();
    let groups = all_rows(s)
        .into_iter()
        .map(|r| NewGroup {
            identifier: identifier_for(&ns, &[r.id], r.revision),
            stripe_customer: format!("cus_{}", r.customer),
            event_name: r.stripe_event_name.clone(),
            meter: r.meter.clone(),
            timestamp_s: r.timestamp_s,
            value: r.value,
            row_ids: vec![r.id],
        })
        .collect();
    s.create_groups(groups).unwrap()
}

/// Ingest, seal, claim, more usage into the same minutes, seal again: exact and coalesced.
fn coalesces<S: Store + OutboxStore>(s: S, reopen: impl Fn(S) -> S) {
    forwarded(&s);
    let first: Vec<IngestBatch> = (1..=20).map(|q| batch(1, q, 4)).collect();
    ingest(&s, &first[..10]);
    ingest(&s, &first[10..]);
    // 2,000 deltas in two transactions: no row yet, 3 customers × 4 minutes open.
    assert!(all_rows(&s).is_empty());
    assert_eq!(s.stats().unwrap().pending_rows, 12);
    assert_eq!(owed(&s), due(&s));
    assert!(s.verify().unwrap().ok);
    let s = reopen(s);
    assert_eq!(owed(&s), due(&s), "open buckets survive a reopen");
    assert_eq!(s.seal_open(5).unwrap(), 8, "whole records: two customers");
    assert_eq!(s.seal_open(100).unwrap(), 4);
    assert_eq!(s.seal_open(100).unwrap(), 0);
    let rows = all_rows(&s);
    let keys: BTreeSet<(String, i64)> = rows
        .iter()
        .map(|r| (r.customer.clone(), r.timestamp_s))
        .collect();
    assert_eq!((rows.len(), keys.len()), (12, 12), "one row per bucket");
    assert_eq!(s.stats().unwrap().pending_rows, 12);
    let groups = claim(&s);
    // More usage into the same minutes: new buckets, then new rows; groups never change.
    let more: Vec<IngestBatch> = (21..=30).map(|q| batch(1, q, 4)).collect();
    ingest(&s, &more);
    assert!(all_rows(&s).is_empty());
    assert_eq!(owed(&s), due(&s));
    assert_eq!(s.seal_open(1000).unwrap(), 12);
    let again = claim(&s);
    assert!(
        again
            .iter()
            .all(|g| groups.iter().all(|o| o.event.row_ids != g.event.row_ids))
    );
    let ns = s.namespace().unwrap();
    for g in &groups {
        let now = s
            .window_groups(
                &g.event.stripe_customer,
                "calls_ev",
                g.event.timestamp_s,
                g.event.timestamp_s + 1,
            )
            .unwrap();
        let same = now.iter().find(|x| x.id == g.id).unwrap();
        assert_eq!(
            same.event, g.event,
            "a claimed group keeps its value and identifier"
        );
        assert_eq!(
            same.event.identifier,
            identifier_for(&ns, &g.event.row_ids, 0)
        );
    }
    let sum: u64 = groups.iter().chain(&again).map(|g| g.event.value).sum();
    assert_eq!(sum, due(&s).values().sum::<u64>());
    assert!(s.verify().unwrap().ok);
}

/// A record holds at most `MAX_OPEN_BUCKETS` buckets: one more spills the oldest as a row.
fn spills_at_the_limit<S: Store + OutboxStore>(s: &S) {
    forwarded(s);
    let k = key(9);
    let n = MAX_OPEN_BUCKETS as i64 + 2;
    let deltas = (0..n)
        .map(|m| delta("acme", "calls", &[], T0 - m * 60_000, Decimal::ONE, 1))
        .collect();
    let body = BatchBody::new(agent_id(&k), 1, 1, T0, deltas).unwrap();
    let signed = SignedBatch::seal(&body, &k).unwrap();
    ingest(s, &[IngestBatch { body, signed }]);
    let rows = all_rows(s);
    assert_eq!(
        rows.iter()
            .map(|r| (r.timestamp_s, r.value))
            .collect::<Vec<_>>(),
        vec![
            (T0 / 1000 - (n - 1) * 60, 10),
            (T0 / 1000 - (n - 2) * 60, 10)
        ],
        "the two oldest minutes spilled"
    );
    assert_eq!(s.stats().unwrap().pending_rows, n as u64);
    assert_eq!(s.seal_open(1).unwrap(), MAX_OPEN_BUCKETS as u64);
    assert_eq!(all_rows(s).len() as i64, n);
    assert!(s.verify().unwrap().ok);
}

#[test]
fn redb_coalesces_exactly_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    coalesces(RedbStore::open(&path).unwrap(), |s| {
        drop(s);
        RedbStore::open(&path).unwrap()
    });
}

#[test]
fn redb_spills_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    spills_at_the_limit(&RedbStore::open(&dir.path().join("s.redb")).unwrap());
}

#[test]
fn postgres_coalesces_exactly() {
    let Some(db) = TestDb::create("postgres_coalesces_exactly") else {
        return;
    };
    coalesces(PgStore::open(db.url()).unwrap(), |s| {
        drop(s);
        PgStore::open(db.url()).unwrap()
    });
}

#[test]
fn postgres_spills_at_the_limit() {
    let Some(db) = TestDb::create("postgres_spills_at_the_limit") else {
        return;
    };
    spills_at_the_limit(&PgStore::open(db.url()).unwrap());
}

/// Two collectors on one database: one ingests (two agents, one transaction per batch) while
/// both seal and claim in a loop; every unit ends in exactly one row and one group.
#[test]
fn postgres_two_collectors_ingest_and_seal_at_once() {
    let Some(db) = TestDb::create("postgres_two_collectors_ingest_and_seal_at_once") else {
        return;
    };
    let (a, b) = (
        PgStore::open(db.url()).unwrap(),
        PgStore::open(db.url()).unwrap(),
    );
    forwarded(&a);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let claimed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for (seed, s) in [(1u8, &a), (2u8, &b)] {
            let done = &done;
            sc.spawn(move || {
                for q in 1..=40 {
                    ingest(s, &[batch(seed, q, 3)]);
                }
                // Both ingesters must be done before a sealer may stop.
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        for s in [&a, &b] {
            let (done, claimed) = (&done, &claimed);
            sc.spawn(move || {
                let ns = s.namespace().unwrap();
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst) == 2;
                    s.seal_open(7).unwrap();
                    let groups: Vec<NewGroup> = all_rows(s)
                        .into_iter()
                        .map(|r| NewGroup {
                            identifier: identifier_for(&ns, &[r.id], 0),
                            stripe_customer: r.customer.clone(),
                            event_name: r.stripe_event_name.clone(),
                            meter: r.meter.clone(),
                            timestamp_s: r.timestamp_s,
                            value: r.value,
                            row_ids: vec![r.id],
                        })
                        .collect();
                    // The other collector may claim a row first: `Conflict`, plan again.
                    if let Ok(g) = s.create_groups(groups) {
                        claimed.lock().unwrap().extend(g);
                    }
                    if finished && s.seal_open(1000).unwrap() == 0 && all_rows(s).is_empty() {
                        break;
                    }
                }
            });
        }
    });
    let claimed = claimed.into_inner().unwrap();
    let rows: BTreeSet<u64> = claimed
        .iter()
        .flat_map(|g| g.event.row_ids.clone())
        .collect();
    assert_eq!(rows.len(), claimed.len(), "no row in two groups");
    let mut per: BTreeMap<String, u64> = BTreeMap::new();
    for g in &claimed {
        *per.entry(g.event.stripe_customer.clone()).or_default() += g.event.value;
    }
    let want: BTreeMap<String, u64> = due(&a).into_iter().filter(|(_, v)| *v > 0).collect();
    assert_eq!(per, want);
    assert!(a.verify().unwrap().ok);
}
