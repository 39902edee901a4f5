//! The agent against a collector stand-in over real QUIC on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Faults, StandIn};
use std::collections::HashMap;
use std::time::Duration;
use tally_agent::{Agent, ConnectionState, Event, RecordError, Recorded};
use tally_protocol::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, Catalog, MeterDef};
use tally_protocol::entitlements::EntitlementsSnapshot;
use tally_protocol::names::MeterName;

async fn agent(dir: &std::path::Path, collectors: &[String], ca: &str) -> Agent {
    Agent::builder()
        .data_dir(dir)
        .collectors(collectors.iter().cloned())
        .ca_pem(ca.as_bytes().to_vec())
        .enroll_token("tok")
        .flush_interval(Duration::from_millis(20))
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .start()
        .await
        .unwrap()
}

type Totals = HashMap<(String, String), (Decimal, u64)>;

fn add(t: &mut Totals, c: &str, m: &str, q: Decimal) {
    let e = t
        .entry((c.to_string(), m.to_string()))
        .or_insert((Decimal::ZERO, 0));
    e.0 += q;
    e.1 += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_acknowledged_exactly_once_through_faults() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let standin = StandIn::start(Faults {
        drop_conn_every: Some(11),
        drop_ack_every: Some(7),
        require_token: Some("tok".into()),
        overload_every: Some(13),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[standin.address()], &standin.ca_pem).await;

    // Two recording threads, many keys, exact decimals, over several flush intervals.
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                let mut expected = Totals::new();
                for i in 0..3000i64 {
                    let c = format!("cust-{}", i % 37);
                    let q = Decimal::new(i % 1000 + t, 3);
                    if i % 3 == 0 {
                        agent
                            .record_with(&c, "tokens", &[("model", "gpt")], q)
                            .unwrap();
                        add(&mut expected, &c, "tokens", q);
                    } else {
                        agent.record(&c, "api_calls", q).unwrap();
                        add(&mut expected, &c, "api_calls", q);
                    }
                    if i % 50 == 0 {
                        std::thread::sleep(Duration::from_millis(4));
                    }
                }
                expected
            })
        })
        .collect();
    let mut expected = Totals::new();
    // Events with ids, each sent twice: counted once.
    for i in 0..200 {
        let ev = Event::new("ided", "api_calls", Decimal::new(i, 2)).with_id(format!("ev-{i}"));
        assert_eq!(agent.record_event(ev.clone()).unwrap(), Recorded::New);
        assert_eq!(agent.record_event(ev).unwrap(), Recorded::Duplicate);
        add(&mut expected, "ided", "api_calls", Decimal::new(i, 2));
    }
    // Durable events from concurrent callers.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            agent
                .record_durable(Event::new("durable", "api_calls", Decimal::new(i, 1)))
                .await
                .unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), Recorded::New);
        add(
            &mut expected,
            "durable",
            "api_calls",
            Decimal::new(i as i64, 1),
        );
    }
    for t in threads {
        for (k, (q, n)) in t.join().unwrap() {
            let e = expected.entry(k).or_insert((Decimal::ZERO, 0));
            e.0 += q;
            e.1 += n;
        }
    }
    // At least 30 more batches, so that every fault fires more than once.
    for i in 0..30 {
        agent
            .record("late", "api_calls", Decimal::new(i, 4))
            .unwrap();
        add(&mut expected, "late", "api_calls", Decimal::new(i, 4));
        agent.seal().await.unwrap();
    }
    agent.flush(Duration::from_secs(60)).await.unwrap();

    let status = agent.status();
    assert_eq!(status.backlog_batches, 0);
    assert_eq!(status.last_acked_seq, Some(status.last_sealed_seq));
    {
        let seen = standin.seen.lock().unwrap();
        assert_eq!(
            seen.totals, expected,
            "totals received differ from totals recorded"
        );
        // Every seq of the epoch committed exactly once.
        assert_eq!(seen.committed.len() as u64, status.last_sealed_seq);
        assert!(seen.committed.iter().all(|(_, e, _)| *e == agent.epoch()));
        // The faults really happened, and resends were answered as duplicates.
        assert!(seen.dropped_conns > 0 && seen.dropped_acks > 0, "{seen:?}");
        assert!(seen.duplicates > 0, "{seen:?}");
        assert!(seen.connections > 2, "{seen:?}");
        assert_eq!(seen.bad_signatures, 0);
    }
    let metrics = agent.render_metrics();
    assert!(metrics.contains("tally_agent_batches_acked_total{outcome=\"duplicate\"}"));
    assert!(metrics.contains("tally_agent_backlog_batches 0"));
    agent.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn agent_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Agent>();
    check::<tally_agent::Counter>();
}

/// The agent's last connection error, waiting up to 20 s for one.
async fn last_error(a: &Agent) -> String {
    for _ in 0..200 {
        if let Some(e) = a.status().last_error {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection error after 20 s: {:?}", a.status());
}

fn meter(name: &str) -> MeterDef {
    MeterDef {
        name: MeterName::new(name).unwrap(),
        aggregation: Aggregation::Sum,
        event_type: name.into(),
        value_property: Some("$.v".into()),
        group_by: BoundedVec::default(),
        stripe_event_name: None,
        stripe_unit_scale: Decimal::ONE,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_catalog_and_entitlements_are_kept_on_disk() {
    let catalog = Catalog {
        version: 4,
        meters: BoundedVec::new(vec![meter("api_calls")]).unwrap(),
    };
    let ents = EntitlementsSnapshot {
        version: 2,
        built_at_ms: tally_clock::Clock::now_ms(&tally_clock::SystemClock),
        full: true,
        customers: BoundedVec::default(),
    };
    let standin = StandIn::start_with(Faults::default(), Some(catalog), Some(ents), 4).await;
    // A port with nothing listening comes first: the agent fails over to the stand-in.
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let collectors = [dead, standin.address()];
    let a = Agent::builder()
        .data_dir(dir.path())
        .collectors(collectors.iter().cloned())
        .ca_pem(standin.ca_pem.clone())
        .enroll_token("tok")
        .flush_interval(Duration::from_millis(20))
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
        // Long enough for a debug-build handshake on a loaded machine (300 ms was not: every
        // attempt at the stand-in timed out and the flush ran out); the dead port costs it once.
        .connect_timeout(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    a.record("acme", "api_calls", Decimal::ONE).unwrap();
    a.flush(Duration::from_secs(20)).await.unwrap();
    assert!(matches!(
        a.status().connection,
        ConnectionState::Connected { ref collector, max_in_flight: 4 } if *collector == standin.address()
    ));
    assert_eq!(a.catalog().unwrap().version, 4);
    assert_eq!(a.entitlements().unwrap().version, 2);
    assert_eq!(
        a.record("acme", "not_in_catalog", Decimal::ONE),
        Err(RecordError::UnknownMeter)
    );
    a.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(a);
    // Restart offline: the catalog and snapshot come from disk.
    let a = Agent::builder().data_dir(dir.path()).start().await.unwrap();
    assert_eq!(a.catalog().unwrap().version, 4);
    assert!(a.status().entitlements_age.is_some());
    assert_eq!(
        a.record("acme", "not_in_catalog", Decimal::ONE),
        Err(RecordError::UnknownMeter)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_pushed_with_the_welcome_is_applied_without_any_batch() {
    // Regression: frames that arrive in the same read as the welcome must not wait for the
    // next read (which, with nothing to ship, may never come).
    let catalog = Catalog {
        version: 9,
        meters: BoundedVec::new(vec![meter("api_calls")]).unwrap(),
    };
    let standin = StandIn::start_with(Faults::default(), Some(catalog), None, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), &[standin.address()], &standin.ca_pem).await;
    for _ in 0..200 {
        if a.catalog().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.catalog().map(|c| c.version), Some(9));
    assert_eq!(standin.seen.lock().unwrap().received, 0);
    a.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_reported_and_retried() {
    let standin = StandIn::start(Faults {
        require_token: Some("right".into()),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), &[standin.address()], &standin.ca_pem).await;
    a.record("acme", "api_calls", Decimal::ONE).unwrap();
    let r = a.flush(Duration::from_millis(500)).await;
    assert!(matches!(
        r,
        Err(tally_agent::FlushError::Timeout { unacked: 1 })
    ));
    let last_error = last_error(&a).await;
    assert!(last_error.contains("invalid_enroll_token"), "{last_error}");
    // It keeps retrying.
    for _ in 0..200 {
        if standin.seen.lock().unwrap().connections >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(standin.seen.lock().unwrap().connections >= 2);
    // Unacknowledged work stays on disk.
    assert!(matches!(
        a.shutdown(Duration::from_millis(100)).await,
        Err(tally_agent::ShutdownError::Unacked { unacked: 1 })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_never_trusted() {
    let standin = StandIn::start(Faults::default()).await;
    let other = common::certs();
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), &[standin.address()], &other.ca_pem).await;
    a.record("acme", "api_calls", Decimal::ONE).unwrap();
    assert!(a.flush(Duration::from_millis(500)).await.is_err());
    assert_eq!(standin.seen.lock().unwrap().received, 0);
    let last_error = last_error(&a).await;
    assert!(
        last_error.to_lowercase().contains("certificate"),
        "{last_error}"
    );
}
