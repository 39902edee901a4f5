//! Stripe forwarding: meter events per second forwarded over v2 streams into the local
//! Stripe-compatible server (SPEC §9: ≥ 10k/s), v1 for reference, and Stripe API calls per
//! million recorded events given the aggregation (agent deltas per minute → outbox rows →
//! one meter event per customer, meter and minute).
//!
//! `cargo bench -p tally-benches --bench stripe`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_forward::stripe::outbox::{MemoryStore, NewOutboxRow};
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::stripe::{Api, ApiKey, ForwarderConfig};

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn config(api: Api, server: &FakeStripe) -> ForwarderConfig {
    ForwarderConfig {
        api,
        api_key: Some(ApiKey::new("sk_live_bench")),
        base_url: server.url(),
        meter_events_url: server.url(),
        rate_per_s: Some(1_000_000),
        max_in_flight: if api == Api::V2 { 4 } else { 64 },
        poll_interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(10),
        ..ForwarderConfig::default()
    }
}

/// Forwards everything in `store`; returns (seconds, meter-event requests, session requests).
async fn forward(api: Api, store: Arc<MemoryStore>, server: &FakeStripe) -> (f64, usize, usize) {
    let expected: u64 = store.totals().expect("totals").values().sum();
    let start = Instant::now();
    let fwd = tally_forward::stripe::spawn(config(api, server), store.clone(), None, None)
        .expect("forwarder");
    // Watch the server (cheap) rather than the store, so the probe does not slow the forwarder.
    while server.totals().values().sum::<u64>() < expected {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "bench did not finish"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    fwd.shutdown().await;
    let reqs = server.requests();
    let events = reqs
        .iter()
        .filter(|r| r.path.ends_with("meter_events") || r.path.ends_with("meter_event_stream"))
        .count();
    let sessions = reqs
        .iter()
        .filter(|r| r.path.ends_with("meter_event_session"))
        .count();
    (secs, events, sessions)
}

/// `n` rows that each become their own meter event (distinct customer × minute).
fn distinct_rows(n: usize) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let base = now_s() - now_s().rem_euclid(60) - 200 * 60;
    for i in 0..n {
        store
            .insert(NewOutboxRow {
                customer: format!("cus_{:05}", i % 2000),
                meter: "api_calls".into(),
                stripe_event_name: "api_calls".into(),
                timestamp_s: base + 60 * (i / 2000) as i64,
                value: 1 + (i % 7) as u64,
            })
            .expect("insert");
    }
    store
}

async fn throughput(api: Api, n: usize) {
    let server = FakeStripe::start().await.expect("server");
    let store = distinct_rows(n);
    let (secs, requests, sessions) = forward(api, store.clone(), &server).await;
    let sent: u64 = server.totals().values().sum();
    let expected: u64 = store.totals().expect("totals").values().sum();
    assert_eq!(sent, expected, "exact");
    println!(
        "stripe/{api:?}: {n} meter events in {secs:.3} s = {:.0} events/s ({requests} requests, {sessions} sessions)",
        n as f64 / secs
    );
}

/// 1,000,000 recorded events: 1,000 customers × 2 meters over 10 minutes, recorded through 4
/// agents, each sealing one delta per (customer, meter, minute) → one outbox row per delta.
async fn api_calls_per_million(api: Api) {
    let base = now_s() - now_s().rem_euclid(60) - 15 * 60;
    let mut deltas: HashMap<(u64, u64, u64, i64), u64> = HashMap::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (agent, customer, meter, minute) = (
            x % 4,
            (x >> 8) % 1000,
            (x >> 20) % 2,
            ((x >> 24) % 10) as i64,
        );
        *deltas
            .entry((agent, customer, meter, base + 60 * minute))
            .or_insert(0) += 1;
    }
    let store = Arc::new(MemoryStore::new());
    let mut rows: Vec<_> = deltas.into_iter().collect();
    rows.sort();
    let n_rows = rows.len();
    for ((_agent, customer, meter, ts), value) in rows {
        let name = if meter == 0 { "api_calls" } else { "tokens" };
        store
            .insert(NewOutboxRow {
                customer: format!("cus_{customer:04}"),
                meter: name.into(),
                stripe_event_name: name.into(),
                timestamp_s: ts,
                value,
            })
            .expect("insert");
    }
    let server = FakeStripe::start().await.expect("server");
    let (secs, requests, sessions) = forward(api, store.clone(), &server).await;
    let groups = store.groups().expect("groups").len();
    let sent: u64 = server.totals().values().sum();
    assert_eq!(sent, 1_000_000, "exact");
    println!(
        "stripe/{api:?}: 1,000,000 recorded events → {n_rows} outbox rows → {groups} meter events → {} API calls ({requests} meter-event requests + {sessions} sessions) in {secs:.2} s",
        requests + sessions
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, so keep it bounded.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if quick {
            throughput(Api::V2, 2_000).await;
            return;
        }
        for _ in 0..3 {
            throughput(Api::V2, 200_000).await;
        }
        throughput(Api::V1, 20_000).await;
        api_calls_per_million(Api::V2).await;
        api_calls_per_million(Api::V1).await;
    });
}
