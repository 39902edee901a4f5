//! The admin API of Orb and Metronome forwarding.
//!
//! Operator retry of a dead letter (`POST /v1/{orb,metronome}/outbox/{id}/retry`): back to the
//! queue under the same key, delivered once; refused for a group that is not dead.
//!
//! Names (SPEC §6.4b): `orb_event_name` /
//! `metronome_event_type` on `PUT /v1/meters/{m}`, `orb_external_customer_id` /
//! `metronome_customer_id` on `PUT /v1/customers/{c}` — validated with Stripe-shaped errors,
//! stored in both stores (redb and PostgreSQL), returned by `GET`, kept out of the agents'
//! catalog, and used by the events planned after the change (events planned before keep
//! theirs).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{DestNames, NameKind, Store};
use tally_forward::ApiKey;
use tally_forward::ledger_feed::fake::FakeDest;
use tally_forward::ledger_feed::{DestinationConfig, Engine, FwdEvent, FwdState};
use tally_protocol::frame::{AckOutcome, Frame};

fn names_round_trip(s: &dyn Store) {
    let k = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert!(
        s.dest_names(NameKind::Meter, &k(&["a"]))
            .unwrap()
            .is_empty()
    );
    let n = DestNames {
        orb: Some("llm_tokens".into()),
        metronome: None,
    };
    s.put_dest_names(NameKind::Meter, "tokens", &n).unwrap();
    let c = DestNames {
        orb: None,
        metronome: Some("alias-1".into()),
    };
    s.put_dest_names(NameKind::Customer, "tokens", &c).unwrap();
    s.put_dest_names(NameKind::Customer, "acme", &c).unwrap();
    assert_eq!(
        s.dest_names(NameKind::Meter, &k(&["x", "tokens", "tokens"]))
            .unwrap(),
        vec![("tokens".to_owned(), n)],
        "kinds apart, unknown keys left out, duplicates once"
    );
    assert_eq!(
        s.dest_names(NameKind::Customer, &k(&["tokens", "acme"]))
            .unwrap()
            .len(),
        2
    );
    s.put_dest_names(NameKind::Customer, "acme", &DestNames::default())
        .unwrap();
    assert_eq!(
        s.dest_names(NameKind::Customer, &k(&["acme", "tokens"]))
            .unwrap(),
        vec![("tokens".to_owned(), c)],
        "empty names remove the row"
    );
}

#[test]
fn destination_names_are_stored_by_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    names_round_trip(&RedbStore::open(&dir.path().join("s.redb")).unwrap());
    if let Some(db) = TestDb::create("destination_names_are_stored_by_both_stores") {
        names_round_trip(&PgStore::open(db.url()).unwrap());
    }
}

const ORB_KEY: &str = "orb_test_names";
const MET_KEY: &str = "met_names";

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_set_through_the_api_apply_to_events_planned_after() {
    let orb = FakeDest::start(Engine::Orb, ORB_KEY).await.unwrap();
    let met = FakeDest::start(Engine::Metronome, MET_KEY).await.unwrap();
    let (ou, mu) = (orb.url(), met.url());
    let env = start_with(move |c| {
        c.forward.orb = Some(DestinationConfig::new(
            Engine::Orb,
            ApiKey::new(ORB_KEY.to_owned()),
            Some(ou),
        ));
        c.forward.metronome = Some(DestinationConfig::new(
            Engine::Metronome,
            ApiKey::new(MET_KEY.to_owned()),
            Some(mu),
        ));
    })
    .await;
    let meter = |extra: &str| {
        format!(
            r#"{{"aggregation":"sum","event_type":"api_calls","value_property":"$.value"{extra}}}"#
        )
    };
    let (st, v) = env
        .admin("PUT", "/v1/meters/api_calls", Some(&meter("")))
        .await;
    assert_eq!(st, 200, "{v}");
    let version = v["version"].as_u64().unwrap();
    assert!(v["data"][0]["orb_event_name"].is_null(), "{v}");

    // Refused with Stripe-shaped errors.
    for (path, body, param) in [
        (
            "/v1/meters/api_calls",
            meter(r#","orb_event_name":"a\u0001b""#),
            "orb_event_name",
        ),
        (
            "/v1/meters/api_calls",
            meter(&format!(r#","metronome_event_type":"{}""#, "x".repeat(256))),
            "metronome_event_type",
        ),
        (
            "/v1/customers/acme",
            String::from(r#"{"orb_external_customer_id":"a\nb"}"#),
            "orb_external_customer_id",
        ),
        (
            "/v1/customers/acme",
            String::from(r#"{"metronome_customer_id":"\u0000"}"#),
            "metronome_customer_id",
        ),
    ] {
        let (st, v) = env.admin("PUT", path, Some(&body)).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["code"], "invalid_destination_name", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }

    // Usage before any name: the meter's and customer's own names.
    let k = key(31);
    let mut client = env.client(&k).await;
    let now = now_ms();
    let q1 = Decimal::new(12_345, 4);
    match send(
        &mut client,
        &seal(
            &k,
            1,
            1,
            vec![delta("acme", "api_calls", &[], now - 120_000, q1, 1)],
        ),
    )
    .await
    {
        Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
        other => panic!("{other:?}"),
    }
    until("both got the first event", 20, || {
        orb.events().len() == 1 && met.events().len() == 1
    })
    .await;

    // Names through the API: the catalog agents get does not change.
    let (st, v) = env
        .admin(
            "PUT",
            "/v1/meters/api_calls",
            Some(&meter(
                r#","orb_event_name":"llm_calls","metronome_event_type":"calls_v2""#,
            )),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["version"].as_u64().unwrap(), version, "catalog unchanged");
    assert_eq!(v["data"][0]["orb_event_name"], "llm_calls", "{v}");
    let (st, v) = env
        .admin(
            "PUT",
            "/v1/customers/acme",
            Some(r#"{"orb_external_customer_id":"acme-orb","metronome_customer_id":"acme-met"}"#),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["orb_external_customer_id"], "acme-orb", "{v}");
    let (_, v) = env.admin("GET", "/v1/meters", None).await;
    assert_eq!(v["data"][0]["metronome_event_type"], "calls_v2", "{v}");
    let (st, v) = env.admin("GET", "/v1/customers/acme", None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["metronome_customer_id"], "acme-met", "{v}");
    // An absent field keeps its value; "" removes it.
    let (_, v) = env
        .admin("PUT", "/v1/customers/acme", Some(r#"{"plan":null}"#))
        .await;
    assert_eq!(v["orb_external_customer_id"], "acme-orb", "{v}");

    // Usage after: the new names; the first events kept theirs.
    let q2 = Decimal::new(7, 3);
    match send(
        &mut client,
        &seal(
            &k,
            1,
            2,
            vec![delta("acme", "api_calls", &[], now - 60_000, q2, 1)],
        ),
    )
    .await
    {
        Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
        other => panic!("{other:?}"),
    }
    until("both got the second event", 20, || {
        orb.events().len() == 2 && met.events().len() == 2
    })
    .await;
    let seen = |f: &FakeDest| -> BTreeSet<(String, String, Decimal)> {
        f.events()
            .into_iter()
            .map(|e| (e.customer, e.event_name, e.value))
            .collect()
    };
    assert_eq!(
        seen(&orb),
        BTreeSet::from([
            ("acme".into(), "api_calls".into(), q1),
            ("acme-orb".into(), "llm_calls".into(), q2)
        ])
    );
    assert_eq!(
        seen(&met),
        BTreeSet::from([
            ("acme".into(), "api_calls".into(), q1),
            ("acme-met".into(), "calls_v2".into(), q2)
        ])
    );
    let (_, v) = env
        .admin(
            "PUT",
            "/v1/meters/api_calls",
            Some(&meter(r#","orb_event_name":"""#)),
        )
        .await;
    assert!(v["data"][0]["orb_event_name"].is_null(), "{v}");
    assert_eq!(v["data"][0]["metronome_event_type"], "calls_v2", "{v}");
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_retried_under_its_key_and_delivered_once() {
    let met = FakeDest::start(Engine::Metronome, MET_KEY).await.unwrap();
    met.set_down(true);
    let mu = met.url();
    let env = start_with(move |c| {
        let mut m =
            DestinationConfig::new(Engine::Metronome, ApiKey::new(MET_KEY.to_owned()), Some(mu));
        m.backoff.base = Duration::from_millis(100);
        m.backoff.cap = Duration::from_millis(300);
        c.forward.metronome = Some(m);
    })
    .await;
    let (st, v) = env
        .admin(
            "PUT",
            "/v1/meters/tokens",
            Some(r#"{"aggregation":"sum","event_type":"tokens","value_property":"$.value"}"#),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let k = key(32);
    let mut client = env.client(&k).await;
    let now = now_ms();
    let mut deltas = Vec::new();
    let mut want = Decimal::ZERO;
    for (i, c) in ["a", "b", "c"].iter().enumerate() {
        let q = Decimal::new(1_001 + i as i64, 3);
        want += q;
        deltas.push(delta(c, "tokens", &[], now - 60_000, q, 1));
    }
    match send(&mut client, &seal(&k, 1, 1, deltas)).await {
        Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
        other => panic!("{other:?}"),
    }
    // Metronome is down: the events are attempted and stay open; one is made a dead letter
    // as a refusal would (the refusal path itself is the runner's tests').
    let store = env.handle.shared().forwarding.feed_store().unwrap();
    until("attempted", 20, || {
        store
            .list(Engine::Metronome, None, 0, 10)
            .unwrap()
            .iter()
            .filter(|g| g.attempts > 0)
            .count()
            == 3
    })
    .await;
    let dead = store
        .apply(
            Engine::Metronome,
            &[2],
            FwdEvent::Rejected(String::from("refused")),
        )
        .unwrap()
        .remove(0);
    assert_eq!(dead.state, FwdState::Dead);

    // Refusals: not a number, no such event, not dead, a destination that is off.
    let (st, v) = env
        .admin("POST", "/v1/metronome/outbox/x/retry", None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_integer")),
        "{v}"
    );
    let (st, v) = env
        .admin("POST", "/v1/metronome/outbox/99/retry", None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("resource_missing")),
        "{v}"
    );
    let (st, v) = env
        .admin("POST", "/v1/metronome/outbox/1/retry", None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("outbox_row_not_dead")),
        "{v}"
    );
    let (st, v) = env.admin("POST", "/v1/orb/outbox/2/retry", None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("destination_not_configured")),
        "{v}"
    );

    met.set_down(false);
    until("two delivered", 20, || met.events().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        met.events().len(),
        2,
        "a dead letter waits for the operator"
    );
    let (st, v) = env
        .admin("POST", "/v1/metronome/outbox/2/retry", None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["key"], dead.event.key, "the same key");
    assert_eq!(v["state"], "unknown", "it was attempted before: {v}");
    until("all delivered", 20, || met.events().len() == 3).await;
    let total: Decimal = met.totals().values().copied().sum();
    assert_eq!(total, want);
    assert!(met.events().iter().any(|e| e.key == dead.event.key));
    // The fake has the event before the forwarder has recorded the answer: wait for that.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let v = loop {
        let (_, v) = env
            .admin("GET", "/v1/outbox?destination=metronome&state=dead", None)
            .await;
        if v["stats"]["sent"] == 3 || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(v["stats"]["dead"], 0, "{v}");
    assert_eq!(v["stats"]["sent"], 3, "{v}");
    env.handle.shutdown().await;
}
