//! The one interface (decision 0107): Stripe's forwarder and a Metronome feed, held only as
//! `Arc<dyn Destination>` as the collector holds them, are listed, retried, woken, read and
//! stopped through the trait over real loopback HTTP, and each delivers exactly what it owes.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rust_decimal::Decimal;
use tally_forward::ledger_feed::fake::FakeDest;
use tally_forward::ledger_feed::runner::{ForwardMetrics, LedgerSource};
use tally_forward::ledger_feed::store::ForwardStore;
use tally_forward::ledger_feed::{
    DestinationConfig, Engine, FwdEvent, FwdState, LedgerItem, MemoryForwardStore,
    spawn_destination,
};
use tally_forward::retry::Backoff;
use tally_forward::stripe::Api;
use tally_forward::stripe::outbox::{MemoryStore, NewOutboxRow, OutboxStore, StoreError};
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::{
    ApiKey, Destination, DestinationError, DestinationKind, Listing, Retried, Status,
};

const MET_KEY: &str = "met_test_key";

struct VecLedger(Mutex<Vec<LedgerItem>>);

impl LedgerSource for VecLedger {
    fn read(&self, after: u64, limit: usize) -> Result<(Vec<LedgerItem>, u64), String> {
        let items: Vec<_> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i.position > after)
            .take(limit)
            .cloned()
            .collect();
        let scanned = items.last().map_or(after, |i| i.position);
        Ok((items, scanned))
    }
}

fn stripe_row(value: u64) -> NewOutboxRow {
    let ts = now_s() - 120;
    NewOutboxRow {
        customer: "acme".into(),
        meter: "api_calls".into(),
        stripe_event_name: "api_calls".into(),
        timestamp_s: ts - ts.rem_euclid(60),
        value,
    }
}

fn listed(d: &dyn Destination, state: &str) -> usize {
    match d.list(Some(state), 0, 100).unwrap() {
        Listing::Stripe { data, .. } => data.len(),
        Listing::Feed { data, .. } => data.len(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_and_metronome_behind_one_interface() {
    // Stripe: the customer is mapped to one Stripe refuses, so both rows become dead letters.
    let server = FakeStripe::start().await.unwrap();
    server.reject_customer("cus_wrong");
    let outbox = Arc::new(MemoryStore::new());
    outbox.set_stripe_customer("acme", "cus_wrong").unwrap();
    let first = outbox.insert(stripe_row(5)).unwrap();
    outbox.insert(stripe_row(7)).unwrap();
    let stripe =
        tally_forward::stripe::spawn(config(Api::V1, &server), outbox.clone(), None, None).unwrap();

    // Metronome: down at first, so its three events are attempted and stay open.
    let met = FakeDest::start(Engine::Metronome, MET_KEY).await.unwrap();
    met.set_down(true);
    let ts = now_s() - 300;
    let ledger = Arc::new(VecLedger(Mutex::new(
        ["0.125", "2.5", "-0.025"]
            .iter()
            .zip(1u64..)
            .map(|(a, p)| LedgerItem {
                position: p,
                customer: "acme".into(),
                meter: "tokens".into(),
                amount: a.parse().unwrap(),
                timestamp_s: ts + 60 * p as i64,
                dimensions: BTreeMap::new(),
            })
            .collect(),
    )));
    let fstore = Arc::new(MemoryForwardStore::in_memory().unwrap());
    let mut cfg = DestinationConfig::new(Engine::Metronome, ApiKey::new(MET_KEY), Some(met.url()));
    cfg.rate_per_s = 1000;
    cfg.request_timeout = Duration::from_millis(800);
    cfg.backoff = Backoff {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(100),
    };
    cfg.poll_interval = Duration::from_millis(20);
    let feed = spawn_destination(
        cfg,
        fstore.clone(),
        ledger.clone(),
        ForwardMetrics::default(),
        None,
    )
    .unwrap();

    // From here on both are only `dyn Destination`.
    let dests: Vec<Arc<dyn Destination>> = vec![Arc::new(stripe), Arc::new(feed)];
    assert_eq!(
        dests.iter().map(|d| d.kind()).collect::<Vec<_>>(),
        [DestinationKind::Stripe, DestinationKind::Metronome]
    );
    let (s, m) = (dests[0].clone(), dests[1].clone());
    assert!(wait_until(Duration::from_secs(10), || listed(s.as_ref(), "dead") == 2).await);
    assert!(
        wait_until(Duration::from_secs(10), || {
            fstore
                .list(Engine::Metronome, None, 0, 10)
                .unwrap()
                .iter()
                .filter(|g| g.attempts > 0)
                .count()
                == 3
        })
        .await
    );
    // One Metronome event refused, as a 400 would make it.
    fstore
        .apply(
            Engine::Metronome,
            &[2],
            FwdEvent::Rejected(String::from("refused")),
        )
        .unwrap();
    assert_eq!(listed(m.as_ref(), "dead"), 1);

    // A state that is not the destination's, a row or event that does not exist, one not dead.
    for d in &dests {
        assert!(matches!(
            d.list(Some("bogus"), 0, 10),
            Err(DestinationError::InvalidState(_))
        ));
    }
    assert!(matches!(
        s.retry(999_999),
        Err(DestinationError::Outbox(StoreError::NotFound(_)))
    ));
    assert!(matches!(
        m.retry(999_999),
        Err(DestinationError::NotFound(_))
    ));
    assert!(matches!(m.retry(1), Err(DestinationError::NotDead(_))));

    // Both come back: the mapping is fixed and Metronome is up; the retries go through the trait.
    outbox.set_stripe_customer("acme", "cus_right").unwrap();
    met.set_down(false);
    match s.retry(first).unwrap() {
        Retried::Rows(rows) => assert_eq!(rows.len(), 2),
        other => panic!("{other:?}"),
    }
    match m.retry(2).unwrap() {
        Retried::Group(g) => {
            assert_eq!(
                (g.id, g.state),
                (2, FwdState::Unknown),
                "same key, sent before"
            );
        }
        other => panic!("{other:?}"),
    }
    for d in &dests {
        d.notify();
    }
    let total = |c: &str| {
        server
            .totals()
            .get(&(c.to_owned(), "api_calls".to_owned()))
            .copied()
    };
    assert!(wait_until(Duration::from_secs(10), || total("cus_right") == Some(12)).await);
    let want = BTreeMap::from([(
        ("acme".to_owned(), "tokens".to_owned()),
        "2.6".parse::<Decimal>().unwrap(),
    )]);
    assert!(wait_until(Duration::from_secs(10), || met.totals() == want).await);
    assert!(wait_until(Duration::from_secs(5), || all_sent(&outbox)).await);
    assert!(wait_until(Duration::from_secs(5), || listed(m.as_ref(), "sent") == 3).await);
    assert_eq!(
        total("cus_wrong"),
        None,
        "nothing reached the refused customer"
    );
    assert_eq!(met.duplicates().1, 0, "no key sent with two values");

    match s.status() {
        Status::Stripe(st) => assert!(st.requests >= 2 && st.unmapped.is_empty(), "{st:?}"),
        other => panic!("{other:?}"),
    }
    match m.status() {
        Status::Feed(st) => assert_eq!(st.events_sent, 3, "{st:?}"),
        other => panic!("{other:?}"),
    }
    for d in &dests {
        d.shutdown().await;
    }
}
