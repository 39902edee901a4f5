//! `Overflow::Block` against a collector stand-in over real QUIC (issue 13's two harness
//! findings), each in bounded time:
//! - a durable log that alone exceeds the disk budget still drains (it used to stop the agent
//!   for good: the budget counts unsealed log rows, and sealing paused while over budget);
//! - after a short collector outage every blocked `record_durable` returns soon after the
//!   collector is back (one used to wait ~30 s after a 2 s outage).
//!
//! Both end with the stand-in's totals equal to what was acknowledged, exactly.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Faults, StandIn};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally_agent::{Agent, Event, Overflow, Recorded};
use tally_protocol::Decimal;

const CUSTOMERS: u64 = 5;

async fn agent(dir: &std::path::Path, s: &StandIn, budget: u64) -> Agent {
    Agent::builder()
        .data_dir(dir)
        .collector(s.address())
        .ca_pem(s.ca_pem.as_bytes().to_vec())
        .enroll_token("tok")
        .flush_interval(Duration::from_millis(20))
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(100))
        .disk_budget(budget)
        .overflow(Overflow::Block)
        .start()
        .await
        .unwrap()
}

/// Request `r` of caller `c`: three events with ids unique to it.
fn request(c: u64, r: u64) -> (String, Vec<Event>, Decimal) {
    let customer = format!("cust-{}", (c + r) % CUSTOMERS);
    let qs = [
        Decimal::new(r as i64 * 100 + 1, 2),
        Decimal::ONE,
        Decimal::new(5, 1),
    ];
    let events = qs
        .iter()
        .enumerate()
        .map(|(i, q)| Event::new(&customer, "api_calls", *q).with_id(format!("c{c}-{r}-{i}")))
        .collect();
    (customer, events, qs.iter().sum())
}

struct Load {
    stop: AtomicBool,
    wait_ms_max: AtomicU64,
    requests: AtomicU64,
}

/// `callers` tasks posting requests until `load.stop` (or `per_caller` requests each); returns
/// the acknowledged totals per customer.
async fn drive(
    a: &Agent,
    callers: u64,
    per_caller: u64,
    load: Arc<Load>,
) -> BTreeMap<String, Decimal> {
    let mut set = tokio::task::JoinSet::new();
    for c in 0..callers {
        let (a, load) = (a.clone(), load.clone());
        set.spawn(async move {
            let mut totals = BTreeMap::<String, Decimal>::new();
            for r in 0..per_caller {
                if load.stop.load(Ordering::Relaxed) {
                    break;
                }
                let (customer, events, total) = request(c, r);
                let began = Instant::now();
                let out = a.record_durable_all(events).await.unwrap();
                assert!(out.iter().all(|o| *o == Recorded::New));
                let ms = began.elapsed().as_millis() as u64;
                load.wait_ms_max.fetch_max(ms, Ordering::Relaxed);
                load.requests.fetch_add(1, Ordering::Relaxed);
                *totals.entry(customer).or_default() += total;
            }
            totals
        });
    }
    let mut totals = BTreeMap::new();
    while let Some(t) = set.join_next().await {
        for (c, q) in t.unwrap() {
            *totals.entry(c).or_default() += q;
        }
    }
    totals
}

/// Flushes until the agent's backlog is empty and the stand-in counted `expected` exactly.
async fn drained(a: &Agent, s: &StandIn, expected: &BTreeMap<String, Decimal>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = a.flush(Duration::from_secs(5)).await;
        let st = a.status();
        let counted: BTreeMap<String, Decimal> = s
            .seen
            .lock()
            .unwrap()
            .totals
            .iter()
            .map(|((c, _), (q, _))| (c.clone(), *q))
            .collect();
        if st.backlog_batches == 0 && st.durable_log_events == 0 && &counted == expected {
            assert!(!st.over_budget);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {st:?}, counted {counted:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_log_larger_than_the_budget_still_drains() {
    let s = StandIn::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // 2 KiB: 32 callers of 3 events put ~6 KiB in the log in one group commit.
    let a = agent(dir.path(), &s, 2_048).await;
    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        wait_ms_max: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let totals = tokio::time::timeout(Duration::from_secs(60), drive(&a, 32, 15, load.clone()))
        .await
        .expect("record_durable blocked for good with a log over the budget");
    assert_eq!(load.requests.load(Ordering::Relaxed), 32 * 15);
    drained(&a, &s, &totals).await;
    a.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_callers_resume_soon_after_an_outage() {
    let s = StandIn::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), &s, 6_144).await;
    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        wait_ms_max: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let driver = {
        let (a, load) = (a.clone(), load.clone());
        tokio::spawn(async move { drive(&a, 16, u64::MAX, load).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A 2 s outage: the backlog reaches the budget and callers block.
    s.close();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a.status().over_budget, "{:?}", a.status());
    let s = s.restart().await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop.store(true, Ordering::Relaxed);
    let totals = tokio::time::timeout(Duration::from_secs(30), driver)
        .await
        .expect("callers still blocked 30 s after the collector came back")
        .unwrap();
    let waited = Duration::from_millis(load.wait_ms_max.load(Ordering::Relaxed));
    // The longest wait is the outage plus reconnecting and shipping, not tens of seconds.
    assert!(
        waited < Duration::from_secs(6),
        "a caller waited {waited:?} (outage 2 s; back for {:?})",
        back.elapsed()
    );
    drained(&a, &s, &totals).await;
    a.shutdown(Duration::from_secs(5)).await.unwrap();
}
