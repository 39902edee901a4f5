//! A forwarder dropped while requests are in flight (some processed, their answers lost), then a
//! new forwarder over the same store: nothing is counted twice and everything arrives.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::stripe::{Api, MemoryStore};

async fn crash_and_restart(api: Api) {
    let server = FakeStripe::start().await.unwrap();
    // Requests are processed at once and answered 400 ms later: a crash in between loses answers.
    server.set_response_delay(Duration::from_millis(400));
    let store = Arc::new(MemoryStore::new());
    let mut rng = Rng(42);
    workload(&store, &mut rng, 400, 8);
    let mut cfg = config(api, &server);
    if api == Api::V2 {
        cfg.max_in_flight = 2;
    }
    let fwd = tally_forward::stripe::spawn(cfg.clone(), store.clone(), None, None).unwrap();
    assert!(wait_until(Duration::from_secs(20), || !server.events().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(fwd); // the crash: in-flight requests are cut off
    let processed_before = server.events().len();
    assert!(processed_before > 0);
    assert!(!all_sent(&store), "the crash must leave work behind");
    server.set_response_delay(Duration::ZERO);
    let fwd = tally_forward::stripe::spawn(cfg, store.clone(), None, None).unwrap();
    let ok = wait_until(Duration::from_secs(60), || {
        all_sent(&store) && server.totals() == store.totals().unwrap()
    })
    .await;
    fwd.shutdown().await;
    assert!(ok, "did not converge after restart");
    let events = server.events();
    let ids: HashSet<_> = events.iter().map(|e| &e.identifier).collect();
    assert_eq!(ids.len(), events.len(), "an identifier was accepted twice");
    assert_eq!(events.len(), store.groups().unwrap().len());
    assert_eq!(server.totals(), store.totals().unwrap());
    if api == Api::V1 {
        assert!(
            server.duplicates_rejected() > 0,
            "resends of processed events were deduplicated by identifier"
        );
    } else {
        assert!(
            server.duplicates_dropped_v2() > 0,
            "resends of processed events were deduplicated by identifier"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_crash_mid_forwarding_sends_nothing_twice() {
    crash_and_restart(Api::V1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_crash_mid_forwarding_sends_nothing_twice() {
    crash_and_restart(Api::V2).await;
}
