//! Hearing other collectors' changes without `LISTEN` (decision 0097), when
//! `TALLY_TEST_POSTGRES_URL` is set (otherwise the test prints that it skipped): a store that
//! polls the change log (`--ledger-listen-url poll`, for a transaction-mode pooler) hears a
//! meter, a plan and a customer put through another store within 1 s, once each.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::meter;
use std::time::{Duration, Instant};
use tally_collector::core::entitlements::Plan;
use tally_collector::store::Store;
use tally_collector::store::entitlements::EntitlementStore;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::listen::PgChange;
use tally_collector::store::postgres::testdb::TestDb;
use tally_protocol::catalog::Aggregation;
use tally_protocol::names::PlanName;
use tokio::sync::broadcast::error::TryRecvError;

/// The next change other than a resync, within `bound`.
fn next_change(rx: &mut tokio::sync::broadcast::Receiver<PgChange>, bound: Duration) -> PgChange {
    let t0 = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(PgChange::Resync) => {}
            Ok(c) => return c,
            Err(TryRecvError::Empty) => {
                assert!(t0.elapsed() < bound, "no change within {bound:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[test]
fn a_polling_store_hears_changes_made_through_another_within_a_second() {
    let Some(db) =
        TestDb::create("a_polling_store_hears_changes_made_through_another_within_a_second")
    else {
        return;
    };
    let url = db.url().to_owned();
    std::thread::spawn(move || {
        let writer = PgStore::open(&url).unwrap();
        let poller = PgStore::open_with_listen(&url, Some("poll")).unwrap();
        let mut rx = poller.changes();
        // Let the poller start (its first poll sends a resync).
        std::thread::sleep(Duration::from_millis(400));
        let t0 = Instant::now();
        writer.put_meter(&meter("calls", Aggregation::Sum)).unwrap();
        assert_eq!(
            next_change(&mut rx, Duration::from_secs(1)),
            PgChange::Catalog
        );
        println!("a meter reached the polling store in {:?}", t0.elapsed());
        writer
            .put_plan(&PlanName::new("pro").unwrap(), &Plan::default())
            .unwrap();
        assert_eq!(
            next_change(&mut rx, Duration::from_secs(1)),
            PgChange::Entitlements(None)
        );
        writer
            .put_customer("acme", &tally_collector::store::CustomerRecord::default())
            .unwrap();
        assert_eq!(
            next_change(&mut rx, Duration::from_secs(1)),
            PgChange::Entitlements(Some(String::from("acme")))
        );
        // Each change once: nothing more arrives over the next polls.
        std::thread::sleep(Duration::from_millis(800));
        loop {
            match rx.try_recv() {
                Ok(PgChange::Resync) => {}
                Ok(c) => panic!("heard twice: {c:?}"),
                Err(_) => break,
            }
        }
    })
    .join()
    .unwrap();
}
