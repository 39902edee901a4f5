//! Random workloads forwarded through injected 500s, 429s with Retry-After, 409 lock_timeouts,
//! lost answers and dropped connections end with Stripe's totals exactly equal to the outbox totals, no
//! identifier accepted twice, and (v1) never more than one request in flight per customer and
//! meter.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tally_forward::stripe::test_server::{FakeStripe, Fault};
use tally_forward::stripe::{Api, MemoryStore};

async fn run(api: Api, seed: u64) {
    let server = FakeStripe::start().await.unwrap();
    server.inject_fault_mix(seed);
    server.push_faults([Fault::LoseAnswer]);
    let store = Arc::new(MemoryStore::new());
    let mut rng = Rng(seed);
    let fwd =
        tally_forward::stripe::spawn(config(api, &server), store.clone(), None, None).unwrap();
    // Rows keep arriving while the forwarder works.
    for _ in 0..5 {
        workload(&store, &mut rng, 60, 6);
        fwd.notify();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = wait_until(Duration::from_secs(60), || {
        all_sent(&store) && server.totals() == store.totals().unwrap()
    })
    .await;
    let status = fwd.status();
    fwd.shutdown().await;
    assert!(
        done,
        "not converged: stats {:?}, status {status:?}",
        store_stats(&store)
    );
    assert_eq!(server.totals(), store.totals().unwrap());
    assert!(server.faults_injected() >= 5, "faults actually happened");
    let events = server.events();
    let ids: HashSet<_> = events.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(ids.len(), events.len(), "an identifier was accepted twice");
    assert_eq!(
        events.len(),
        store.groups().unwrap().len(),
        "one accepted event per group"
    );
    if api == Api::V1 {
        for (key, n) in server.max_in_flight() {
            assert!(n <= 1, "{key:?} had {n} requests in flight");
        }
    }
}

fn store_stats(store: &Arc<MemoryStore>) -> tally_forward::stripe::outbox::OutboxStats {
    use tally_forward::stripe::OutboxStore;
    store.stats().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_exact_under_faults() {
    for seed in [7, 1234] {
        run(Api::V1, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_exact_under_faults() {
    for seed in [7, 99] {
        run(Api::V2, seed).await;
    }
}
