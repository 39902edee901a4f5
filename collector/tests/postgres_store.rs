//! The PostgreSQL store's own guarantees, when `TALLY_TEST_POSTGRES_URL` is set (a fresh
//! database per test): collectors starting together migrate once; a lost connection is retried
//! and nothing is lost or doubled; forwarder claims across two collectors (a row grouped once, a
//! group claimed by one, one send in flight per Stripe customer and event name, a lease that
//! expires).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::str::FromStr;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::schema::MIGRATIONS;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::{IngestBatch, IngestOutcome, Store};
use tally_forward::stripe::outbox::{
    NewGroup, OutboxStore, StoreError as OutboxError, identifier_for,
};
use tally_protocol::batch::{BatchBody, SignedBatch};
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::AckOutcome;
use tally_protocol::names::{CustomerId, MeterName};

fn sql(url: &str, q: &str) -> i64 {
    let mut c = postgres::Config::from_str(url)
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    c.query_one(q, &[]).unwrap().get(0)
}

#[test]
fn collectors_starting_together_migrate_once() {
    let Some(db) = TestDb::create("collectors_starting_together_migrate_once") else {
        return;
    };
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url().to_owned();
            std::thread::spawn(move || PgStore::open(&url).map(|s| s.namespace().unwrap()))
        })
        .collect();
    let namespaces: Vec<String> = opened
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(
        namespaces.windows(2).all(|w| w[0] == w[1]),
        "{namespaces:?}"
    );
    assert_eq!(
        sql(db.url(), "SELECT count(*) FROM tally_schema"),
        MIGRATIONS.len() as i64
    );
    // Opening again changes nothing.
    let s = PgStore::open(db.url()).unwrap();
    assert_eq!(s.namespace().unwrap(), namespaces[0]);
    assert_eq!(
        sql(db.url(), "SELECT count(*) FROM tally_schema"),
        MIGRATIONS.len() as i64
    );
}

#[test]
fn a_lost_connection_is_retried_and_counts_once() {
    let Some(db) = TestDb::create("a_lost_connection_is_retried_and_counts_once") else {
        return;
    };
    let store = PgStore::open(db.url()).unwrap();
    store.put_meter(&meter("calls", Aggregation::Sum)).unwrap();
    let k = key(5);
    let t0 = 1_763_000_000_000;
    let batch = |seq| {
        let d = delta("acme", "calls", &[], t0, Decimal::TEN, 1);
        let body = BatchBody::new(agent_id(&k), 1, seq, t0, vec![d]).unwrap();
        let signed = SignedBatch::seal(&body, &k).unwrap();
        IngestBatch { body, signed }
    };
    for seq in 1..=20u64 {
        if seq % 5 == 0 {
            // Every session of the store's pool is killed by the server.
            let name = db.url().rsplit('/').next().unwrap().to_owned();
            sql(
                db.url(),
                &format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                ),
            );
        }
        let out = store.ingest(&[batch(seq)], t0).unwrap();
        assert_eq!(out, vec![IngestOutcome::Ack(AckOutcome::Committed)]);
    }
    // And again: all duplicates.
    let again: Vec<IngestBatch> = (1..=20).map(batch).collect();
    let out = store.ingest(&again, t0).unwrap();
    assert!(
        out.iter()
            .all(|o| *o == IngestOutcome::Ack(AckOutcome::Duplicate))
    );
    assert!(store.retries() >= 1, "no transaction was retried");
    let total: Decimal = store
        .usage_accounts(
            &CustomerId::new("acme").unwrap(),
            Some(&MeterName::new("calls").unwrap()),
            None,
        )
        .unwrap()
        .iter()
        .map(|a| a.balance())
        .sum();
    assert_eq!(total, Decimal::from(200));
    assert!(store.verify().unwrap().ok);
}

fn group(ns: &str, row: u64, value: u64) -> NewGroup {
    NewGroup {
        identifier: identifier_for(ns, &[row], 0),
        stripe_customer: "cus_x".into(),
        event_name: "calls".into(),
        meter: "calls".into(),
        timestamp_s: 1_763_000_000,
        value,
        row_ids: vec![row],
    }
}

#[test]
fn forwarder_claims_hold_across_collectors() {
    let Some(db) = TestDb::create("forwarder_claims_hold_across_collectors") else {
        return;
    };
    let (a, b) = (
        PgStore::open(db.url()).unwrap(),
        PgStore::open(db.url()).unwrap(),
    );
    let ns = a.namespace().unwrap();
    let row = |v| tally_forward::stripe::NewOutboxRow {
        customer: "cus_x".into(),
        meter: "calls".into(),
        stripe_event_name: "calls".into(),
        timestamp_s: 1_763_000_000,
        value: v,
    };
    let (r1, r2) = (
        a.append_outbox_row(row(3)).unwrap(),
        a.append_outbox_row(row(4)).unwrap(),
    );
    // A row is grouped once.
    let g1 = a.create_groups(vec![group(&ns, r1, 3)]).unwrap()[0].id;
    let mut other = group(&ns, r1, 3);
    other.identifier.push('x');
    assert_eq!(
        b.create_groups(vec![other]).unwrap_err(),
        OutboxError::Conflict(r1)
    );
    // A group is claimed by one collector; the other is refused until the lease runs out.
    let now = 1_000_000;
    a.record_attempt(&[g1], now, now + 1_000).unwrap();
    assert!(b.record_attempt(&[g1], now, now + 1_000).is_err());
    assert!(b.ready_groups(now + 500, 10).unwrap().is_empty());
    // One send in flight per Stripe customer and event name: another group waits for the slot.
    let g2 = b.create_groups(vec![group(&ns, r2, 4)]).unwrap()[0].id;
    assert!(b.record_attempt(&[g2], now, now + 1_000).is_err());
    // A killed sender: its lease runs out, the other collector claims the same group (same
    // identifier) and the slot.
    assert_eq!(
        b.ready_groups(now + 1_001, 10)
            .unwrap()
            .iter()
            .map(|g| g.id)
            .collect::<Vec<_>>(),
        vec![g1, g2]
    );
    b.record_attempt(&[g1], now + 1_001, now + 2_000).unwrap();
    assert!(a.record_attempt(&[g2], now + 1_002, now + 2_000).is_err());
    // Marking it sent frees the slot.
    b.mark_sent(&[g1]).unwrap();
    a.record_attempt(&[g2], now + 1_003, now + 2_000).unwrap();
    a.mark_sent(&[g2]).unwrap();
    let st = b.stats().unwrap();
    assert_eq!((st.sent_rows, st.pending_rows), (2, 0));
}
