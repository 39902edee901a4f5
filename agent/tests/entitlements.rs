//! Entitlements through a real QUIC session with the stand-in collector: a new customer's
//! snapshot and first lease arrive within the waiting bound; a hard limit allows exactly what
//! was granted; a restarted agent decides from disk with no collector, and releases the leases
//! its disk remembers (naming a seq that holds what it consumed) once connected.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Faults, StandIn};
use std::time::Duration;
use tally_agent::{Agent, ConsumeError, DecidedBy, OfflinePolicy};
use tally_protocol::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::entitlements::{
    CustomerEntitlements, Enforcement, Feature, MeterLimit, Source,
};
use tally_protocol::names::{CustomerId, FeatureName, MeterName};

async fn agent(dir: &std::path::Path, collectors: &[String], ca: &str) -> Agent {
    Agent::builder()
        .data_dir(dir)
        .collectors(collectors.iter().cloned())
        .ca_pem(ca.as_bytes().to_vec())
        .enroll_token("tok")
        .flush_interval(Duration::from_millis(20))
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .entitlements_wait(Duration::from_secs(2))
        .start()
        .await
        .unwrap()
}

fn plan(customer: &str, hard: i64, soft: i64) -> CustomerEntitlements {
    let limit = |m: &str, q: i64, e| MeterLimit {
        meter: MeterName::new(m).unwrap(),
        included: Decimal::from(q),
        granted: Decimal::ZERO,
        limit: Decimal::from(q),
        used: Decimal::ZERO,
        enforcement: e,
        source: Source::Plan,
        period_start_ms: 0,
        period_end_ms: i64::MAX,
    };
    CustomerEntitlements {
        customer: CustomerId::new(customer).unwrap(),
        plan: None,
        features: BoundedVec::new(vec![Feature {
            name: FeatureName::new("gpt4").unwrap(),
            source: Source::Plan,
        }])
        .unwrap(),
        limits: BoundedVec::new(vec![
            limit("api_calls", hard, Enforcement::Hard),
            limit("tokens", soft, Enforcement::Soft),
        ])
        .unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_customer_gets_its_plan_and_a_hard_limit_allows_exactly_the_grant() {
    let standin = StandIn::start(Faults::default()).await;
    {
        let mut s = standin.seen.lock().unwrap();
        s.customers.insert("acme".into(), plan("acme", 1_000, 10));
        // Only 25 of the 1,000 remain for this agent (others hold the rest).
        s.limits
            .insert(("acme".into(), "api_calls".into()), Decimal::from(25));
    }
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), &[standin.address()], &standin.ca_pem).await;

    // The first call for a customer never seen waits for its snapshot.
    let d = a.check_wait("acme", "gpt4").await;
    assert_eq!((d.allowed, d.decided_by), (true, DecidedBy::Plan));
    let d = a.check("acme", "sora");
    assert_eq!((d.allowed, d.decided_by), (false, DecidedBy::Plan));
    // An unknown customer comes back without features: denied by the plan, not by policy.
    let d = a.check_wait("nobody", "gpt4").await;
    assert_eq!((d.allowed, d.decided_by), (false, DecidedBy::Plan));

    // Consume one at a time until denied: exactly the 25 granted.
    let mut allowed = 0;
    loop {
        let c = a
            .try_consume_wait("acme", "api_calls", Decimal::ONE)
            .await
            .unwrap();
        if !c.allowed {
            assert_eq!(c.decided_by, DecidedBy::Lease);
            break;
        }
        allowed += 1;
        assert!(allowed <= 25);
    }
    assert_eq!(allowed, 25);
    // Reservations cannot exceed it either.
    assert!(matches!(
        a.reserve_wait("acme", "api_calls", Decimal::ONE).await,
        Err(ConsumeError::Denied {
            decided_by: DecidedBy::Lease,
            ..
        })
    ));
    // A soft limit allows past it and counts the overshoot.
    for _ in 0..12 {
        assert!(
            a.try_consume("acme", "tokens", Decimal::ONE)
                .unwrap()
                .allowed
        );
    }
    let l = a.limit("acme", "tokens");
    assert_eq!(
        (l.used, l.remaining),
        (Decimal::from(12), Some(Decimal::ZERO))
    );
    let m = a.render_metrics();
    assert!(m.contains("tally_agent_soft_limit_overshoot 2"), "{m}");
    assert!(
        m.contains("tally_agent_entitlement_denials_total{decided_by=\"lease\"}"),
        "{m}"
    );
    // More quantity for this agent: the next request gets it.
    standin
        .seen
        .lock()
        .unwrap()
        .limits
        .insert(("acme".into(), "api_calls".into()), Decimal::from(28));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = a
        .reserve_wait("acme", "api_calls", Decimal::TWO)
        .await
        .unwrap();
    let c = r.commit(Decimal::from(5)).unwrap();
    // Capped: only 3 were left.
    assert_eq!((c.allowed, c.recorded), (false, Decimal::from(3)));
    a.flush(Duration::from_secs(5)).await.unwrap();
    let s = standin.seen.lock().unwrap();
    assert_eq!(
        s.totals
            .get(&("acme".to_string(), "api_calls".to_string()))
            .map(|t| t.0),
        Some(Decimal::from(28))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_decides_from_disk_then_releases_what_its_disk_remembers() {
    let standin = StandIn::start(Faults::default()).await;
    {
        let mut s = standin.seen.lock().unwrap();
        s.customers.insert("acme".into(), plan("acme", 100, 10));
        s.limits
            .insert(("acme".into(), "api_calls".into()), Decimal::from(100));
    }
    let dir = tempfile::tempdir().unwrap();
    {
        let a = agent(dir.path(), &[standin.address()], &standin.ca_pem).await;
        for _ in 0..7 {
            assert!(
                a.try_consume_durable("acme", "api_calls", Decimal::ONE)
                    .await
                    .unwrap()
                    .allowed
            );
        }
        // Dropped without shutdown (as after a crash, the lease is still on disk).
    }
    assert!(standin.seen.lock().unwrap().releases.is_empty());
    // No collector: the snapshot on disk decides features; the lease is not resumed, so the
    // hard limit falls to the offline policy once the snapshot is stale.
    {
        // The dropped agent's tasks let go of the store a moment later (a crashed process
        // would hold nothing): open it again until they have.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let offline = loop {
            let r = Agent::builder()
                .data_dir(dir.path())
                .stale_after(Duration::from_millis(1))
                .offline_policy(
                    MeterName::new("api_calls").unwrap(),
                    OfflinePolicy::AllowUpTo(Decimal::from(2)),
                )
                .start()
                .await;
            match r {
                Err(e)
                    if e.to_string().to_lowercase().contains("already open")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                r => break r.unwrap(),
            }
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let d = offline.check("acme", "gpt4");
        assert_eq!((d.allowed, d.decided_by), (false, DecidedBy::StaleSnapshot));
        let c = |q| {
            offline
                .try_consume("acme", "api_calls", Decimal::from(q))
                .unwrap()
        };
        assert_eq!((c(2).allowed, c(1).allowed), (true, false));
        assert_eq!(c(1).decided_by, DecidedBy::StaleSnapshot);
        let _ = offline.shutdown(Duration::from_millis(100)).await;
    }
    {
        let offline = Agent::builder().data_dir(dir.path()).start().await.unwrap();
        let d = offline.check("acme", "gpt4");
        assert_eq!((d.allowed, d.decided_by), (true, DecidedBy::Plan));
        let _ = offline.shutdown(Duration::from_millis(100)).await;
    }
    // Connected again: the remembered lease is released, naming a seq at or after the batches
    // holding the 7 (and the 2 of the offline run).
    let a = agent(dir.path(), &[standin.address()], &standin.ca_pem).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if !standin.seen.lock().unwrap().releases.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no release");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.flush(Duration::from_secs(5)).await.unwrap();
    let s = standin.seen.lock().unwrap();
    let r = &s.releases[0];
    assert_eq!(r.epoch, a.epoch());
    assert!(r.through_seq >= 1);
    assert_eq!(
        s.totals
            .get(&("acme".to_string(), "api_calls".to_string()))
            .map(|t| t.0),
        Some(Decimal::from(9))
    );
}
