//! A full disk (issue 11): the agent fails what it cannot store, says so in `status()`, and
//! recovers by itself once space returns — no restart — with everything it acknowledged
//! delivered exactly once.
//!
//! The disk is filled with the store's failure-injecting file layer (`DiskFaults`: every
//! write, resize and sync of the redb file and of the segment log fails with `ENOSPC` while it
//! is set), not a real small file system: that needs root (a loop mount or tmpfs quota) which
//! CI does not have. redb's own reaction to a failed write (`PreviousIo` on every later call)
//! is real, and so is the agent's reopening of the store.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Faults, StandIn};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tally_agent::store::DiskFaults;
use tally_agent::{Agent, Event, Recorded};
use tally_protocol::Decimal;

fn request(r: u64) -> (String, Vec<Event>, Decimal) {
    let customer = format!("cust-{}", r % 3);
    let q = Decimal::new(r as i64 * 10 + 7, 1);
    let events = vec![
        Event::new(&customer, "api_calls", q).with_id(format!("r{r}-a")),
        Event::new(&customer, "api_calls", Decimal::ONE).with_id(format!("r{r}-b")),
    ];
    (customer, events, q + Decimal::ONE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_recovers_from_a_full_disk_without_a_restart() {
    let s = StandIn::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let faults = DiskFaults::new();
    let a = Agent::builder()
        .data_dir(dir.path())
        .collector(s.address())
        .ca_pem(s.ca_pem.as_bytes().to_vec())
        .enroll_token("tok")
        .flush_interval(Duration::from_millis(20))
        .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(100))
        .disk_faults(faults.clone())
        .start()
        .await
        .unwrap();
    let mut expected = BTreeMap::<String, Decimal>::new();
    let mut acked = |customer: String, q: Decimal| *expected.entry(customer).or_default() += q;

    for r in 0..20 {
        let (c, evs, q) = request(r);
        assert!(
            a.record_durable_all(evs)
                .await
                .unwrap()
                .iter()
                .all(|o| *o == Recorded::New)
        );
        acked(c, q);
    }
    a.flush(Duration::from_secs(10)).await.unwrap();

    // The disk fills up: durable writes and seals fail, and status says why.
    faults.set_full(true);
    let mut failed = Vec::new();
    for r in 20..40 {
        let (c, evs, q) = request(r);
        match a.record_durable_all(evs).await {
            Ok(out) => {
                assert!(out.iter().all(|o| *o == Recorded::New));
                acked(c, q);
            }
            Err(_) => failed.push(r),
        }
        // In-memory usage is kept and sealed once the disk works again.
        a.record("memory", "api_calls", Decimal::ONE).unwrap();
        acked("memory".into(), Decimal::ONE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!failed.is_empty(), "no write failed on a full disk");
    assert!(a.seal().await.is_err(), "a seal succeeded on a full disk");
    let st = a.status();
    assert!(st.disk_error.is_some(), "{st:?}");

    // Space returns: retried requests (same ids) go through, within a bounded time.
    faults.set_full(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in failed {
        let (c, evs, q) = request(r);
        loop {
            match a.record_durable_all(evs.clone()).await {
                Ok(out) => {
                    assert!(out.iter().all(|o| *o == Recorded::New), "{out:?}");
                    acked(c, q);
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "still failing: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    for r in 40..50 {
        let (c, evs, q) = request(r);
        assert!(
            a.record_durable_all(evs)
                .await
                .unwrap()
                .iter()
                .all(|o| *o == Recorded::New)
        );
        acked(c, q);
    }
    // A request retried after success is a duplicate, not counted again (its id is sealed, so
    // this reads the store, which reopens within a few hundred ms of space returning).
    let (_, evs, _) = request(3);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a.record_durable_all(evs.clone()).await {
            Ok(out) => {
                assert!(out.iter().all(|o| *o == Recorded::Duplicate), "{out:?}");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "store still failing: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // Everything acknowledged arrives exactly once; the agent reports healthy again.
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
        if st.backlog_batches == 0 && st.durable_log_events == 0 && counted == expected {
            assert_eq!(st.disk_error, None);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {st:?}\ncounted  {counted:?}\nexpected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown(Duration::from_secs(5)).await.unwrap();
}
