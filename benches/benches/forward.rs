//! Orb and Metronome forwarding (SPEC §6.4b): events per second each destination's forwarder
//! sends into its local fake server (unpaced, to see the engine's own ceiling, and paced at the
//! published limits), and API calls per million recorded events.
//!
//! `cargo bench -p tally-benches --bench forward`
//!
//! With `TALLY_TEST_POSTGRES_URL` set, the unpaced run is repeated with the destinations' state
//! in PostgreSQL (`PgForwardStore`, a fresh database), beside the redb store at the same size.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::forward::PgForwardStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_forward::ApiKey;
use tally_forward::ledger_feed::fake::FakeDest;
use tally_forward::ledger_feed::runner::{ForwardMetrics, LedgerSource};
use tally_forward::ledger_feed::store::ForwardStore;
use tally_forward::ledger_feed::{
    DestinationConfig, Engine as Destination, LedgerItem, MemoryForwardStore, spawn_destination,
};

struct VecLedger(Mutex<Vec<LedgerItem>>);

impl LedgerSource for VecLedger {
    fn read(&self, after: u64, limit: usize) -> Result<(Vec<LedgerItem>, u64), String> {
        let g = self.0.lock().map_err(|e| e.to_string())?;
        let start = g.partition_point(|i| i.position <= after);
        let items: Vec<_> = g[start..].iter().take(limit).cloned().collect();
        let scanned = items.last().map_or(after, |i| i.position);
        Ok((items, scanned))
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `deltas` ledger items for `customers` customers over `minutes` minutes (ending an hour ago),
/// each carrying `events_per_delta` recorded events' worth of decimal usage.
fn ledger(deltas: usize, customers: usize, minutes: usize) -> Arc<VecLedger> {
    let base = now_s() - now_s().rem_euclid(60) - 3600 - 60 * minutes as i64;
    let items = (0..deltas)
        .map(|i| LedgerItem {
            position: i as u64 + 1,
            customer: format!("cust{:05}", i % customers),
            meter: "tokens".into(),
            amount: Decimal::new(1 + (i % 9973) as i64, 3),
            timestamp_s: base + 60 * ((i * minutes) / deltas) as i64,
            dimensions: BTreeMap::new(),
        })
        .collect();
    Arc::new(VecLedger(Mutex::new(items)))
}

struct Run {
    secs: f64,
    events: usize,
    requests: usize,
}

async fn run(dest: Destination, ledger: Arc<VecLedger>, paced: bool) -> Run {
    let store = Arc::new(MemoryForwardStore::in_memory().expect("store"));
    run_on(dest, ledger, paced, store).await
}

async fn run_on(
    dest: Destination,
    ledger: Arc<VecLedger>,
    paced: bool,
    store: Arc<dyn ForwardStore>,
) -> Run {
    let key = "bench_live_key";
    let fake = FakeDest::start(dest, key).await.expect("fake");
    let mut cfg = DestinationConfig::new(dest, ApiKey::new(key), Some(fake.url()));
    if !paced {
        cfg.rate_per_s = 1_000_000;
        cfg.events_per_minute = None;
    }
    cfg.poll_interval = Duration::from_millis(5);
    let last = ledger.0.lock().map(|g| g.len() as u64).unwrap_or(0);
    let start = Instant::now();
    let h = spawn_destination(cfg, store.clone(), ledger, ForwardMetrics::default(), None)
        .expect("spawn");
    loop {
        // The cursor first: it moves in the same transaction as the groups it planned, so
        // once it is at the end the counts read after it include every group.
        let planned = store.cursor(dest).expect("cursor") >= last;
        if planned && store.stats(dest).expect("stats").open == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "bench did not finish"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    h.shutdown().await;
    let st = store.stats(dest).expect("stats");
    assert_eq!(
        st.sent as usize,
        fake.events().len(),
        "{}: every event sent once: {st:?}",
        dest.as_str()
    );
    Run {
        secs,
        events: fake.events().len(),
        requests: fake.requests().len(),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let scale: f64 = std::env::var("TALLY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    rt.block_on(async {
        // Throughput: every ledger item its own event (distinct customer × minute).
        let n = ((100_000.0 * scale) as usize).max(1000);
        for dest in [Destination::Metronome, Destination::Orb] {
            let r = run(dest, ledger(n, n, 1.max(n / 1000)), false).await;
            println!(
                "{:9} unpaced: {} events in {:.2}s = {:.0} events/s, {} requests ({} events/request)",
                dest.as_str(),
                r.events,
                r.secs,
                r.events as f64 / r.secs,
                r.requests,
                r.events / r.requests.max(1)
            );
        }
        // The same on PostgreSQL (and on redb at that size, to compare like with like).
        if let Some(db) = TestDb::create("forward bench") {
            let n = ((20_000.0 * scale) as usize).max(1000);
            for dest in [Destination::Metronome, Destination::Orb] {
                let r = run(dest, ledger(n, n, 1.max(n / 1000)), false).await;
                println!(
                    "{:9} unpaced redb:     {} events in {:.2}s = {:.0} events/s, {} requests",
                    dest.as_str(),
                    r.events,
                    r.secs,
                    r.events as f64 / r.secs,
                    r.requests
                );
                let url = db.url().to_owned();
                let pg = tokio::task::spawn_blocking(move || PgStore::open(&url))
                    .await
                    .expect("join")
                    .expect("postgres");
                let store = Arc::new(PgForwardStore::new(Arc::new(pg)));
                let r = run_on(dest, ledger(n, n, 1.max(n / 1000)), false, store).await;
                println!(
                    "{:9} unpaced postgres: {} events in {:.2}s = {:.0} events/s, {} requests",
                    dest.as_str(),
                    r.events,
                    r.secs,
                    r.events as f64 / r.secs,
                    r.requests
                );
            }
        }
        // API calls per million recorded events: 1M events recorded by the agents arrive as
        // 100k ledger deltas (10 events each, 1-minute buckets) for 1,000 customers over 10
        // minutes; the forwarder catches up from that backlog.
        let deltas = ((100_000.0 * scale) as usize).max(1000);
        let recorded = deltas * 10;
        for dest in [Destination::Metronome, Destination::Orb] {
            let r = run(dest, ledger(deltas, 1000, 10), false).await;
            println!(
                "{:9} backlog: {} recorded events → {} deltas → {} events, {} requests = {:.0} API calls per million recorded events ({:.2}s)",
                dest.as_str(),
                recorded,
                deltas,
                r.events,
                r.requests,
                r.requests as f64 * 1e6 / recorded as f64,
                r.secs
            );
        }
        // Paced at the published limits (Orb live: 100 requests/s, 10,000 events/minute with a
        // minute's burst; Metronome: no published limit, 50 requests/s here).
        let n = ((30_000.0 * scale) as usize).max(1000);
        for dest in [Destination::Metronome, Destination::Orb] {
            let r = run(dest, ledger(n, n, 1.max(n / 1000)), true).await;
            println!(
                "{:9} paced:   {} events in {:.2}s = {:.0} events/s, {} requests",
                dest.as_str(),
                r.events,
                r.secs,
                r.events as f64 / r.secs,
                r.requests
            );
        }
    });
}
