//! Orb and Metronome forwarding over real loopback HTTP against the local fake servers
//! (`tally_forward::ledger_feed::fake`), with faults: decimal totals equal the ledger's to the last
//! decimal place, no key is sent with two values, one destination down does not delay the
//! other, late usage goes through an Orb backfill, Metronome lists usage past 34 days, and a
//! restarted forwarder sends nothing twice.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use tally_forward::ApiKey;
use tally_forward::ledger_feed::fake::{FakeDest, FakeFault, FakeFaults};
use tally_forward::ledger_feed::runner::{ForwardMetrics, LedgerSource};
use tally_forward::ledger_feed::store::ForwardStore;
use tally_forward::ledger_feed::{
    DestinationConfig, Engine, FeedHandle, FwdState, LedgerItem, MemoryForwardStore,
    spawn_destination,
};
use tally_forward::retry::Backoff;

#[derive(Default)]
struct VecLedger(Mutex<Vec<LedgerItem>>);

impl VecLedger {
    fn push(&self, customer: &str, meter: &str, amount: Decimal, timestamp_s: i64) {
        let mut g = self.0.lock().unwrap();
        let position = g.len() as u64 * 2 + 1;
        g.push(LedgerItem {
            position,
            customer: customer.into(),
            meter: meter.into(),
            amount,
            timestamp_s,
            dimensions: BTreeMap::from([("model".to_owned(), format!("m{}", position % 3))]),
        });
    }

    /// Σ signed amount per (customer, meter), zeros left out.
    fn totals(&self) -> BTreeMap<(String, String), Decimal> {
        let mut t = BTreeMap::new();
        for it in self.0.lock().unwrap().iter() {
            *t.entry((it.customer.clone(), it.meter.clone()))
                .or_insert(Decimal::ZERO) += it.amount;
        }
        t.retain(|_, v: &mut Decimal| !v.is_zero());
        t
    }
}

impl LedgerSource for VecLedger {
    fn read(&self, after: u64, limit: usize) -> Result<(Vec<LedgerItem>, u64), String> {
        let g = self.0.lock().unwrap();
        let items: Vec<_> = g
            .iter()
            .filter(|i| i.position > after)
            .take(limit)
            .cloned()
            .collect();
        // A gap position (a grant, say) after the last item is scanned over too.
        let scanned = items.last().map_or(after, |i| i.position + 1);
        Ok((items, scanned))
    }
}

const KEY: &str = "test_key_SECRET";

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn config(dest: Engine, url: &str) -> DestinationConfig {
    let mut c = DestinationConfig::new(dest, ApiKey::new(KEY), Some(url.to_owned()));
    c.rate_per_s = 2000;
    c.events_per_minute = None;
    c.request_timeout = Duration::from_millis(800);
    c.backoff = Backoff {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(200),
    };
    c.poll_interval = Duration::from_millis(20);
    c
}

fn start(
    dest: Engine,
    url: &str,
    store: &Arc<MemoryForwardStore>,
    ledger: &Arc<VecLedger>,
) -> FeedHandle {
    spawn_destination(
        config(dest, url),
        store.clone(),
        ledger.clone(),
        ForwardMetrics::default(),
        None,
    )
    .unwrap()
}

/// Deterministic decimal usage from several "agents", with reductions.
fn fill(ledger: &VecLedger, n: usize, ts: i64) {
    let mut x: u64 = 0x1234_5678;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let customer = format!("cust{}", x % 5);
        let meter = if i % 2 == 0 { "tokens" } else { "gpu_seconds" };
        let mut amount = Decimal::new((x % 1_000_000) as i64, (x % 7) as u32);
        if i % 17 == 0 {
            // A reduction (a negative adjustment, a `last` meter going down).
            amount = -Decimal::new((x % 100_000) as i64, 9);
        }
        ledger.push(&customer, meter, amount, ts - (i as i64 % 50) * 60);
    }
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn settled(store: &MemoryForwardStore, d: Engine, ledger: &VecLedger) -> bool {
    let st = store.stats(d).unwrap();
    st.open == 0
        && st.backfill == 0
        && store.cursor(d).unwrap() >= ledger.0.lock().unwrap().last().map_or(0, |i| i.position)
}

fn by_customer_meter(fake: &FakeDest) -> BTreeMap<(String, String), Decimal> {
    // The fake keys by (customer, event name); routes here are the identity.
    fake.totals()
}

async fn exact_with_faults(dest: Engine) {
    let fake = FakeDest::start(dest, KEY).await.unwrap();
    fake.set_random_faults(FakeFaults {
        status_500_permille: 100,
        rate_limited_permille: 100,
        lose_answer_permille: 150,
        seed: 11,
    });
    fake.push_faults([
        FakeFault::LoseAnswer,
        FakeFault::Status500,
        FakeFault::RateLimited,
    ]);
    let store = Arc::new(MemoryForwardStore::in_memory().unwrap());
    let ledger = Arc::new(VecLedger::default());
    fill(&ledger, 3000, now_s());
    let h = start(dest, &fake.url(), &store, &ledger);
    until("all delivered", 60, || settled(&store, dest, &ledger)).await;
    h.shutdown().await;
    assert_eq!(by_customer_meter(&fake), ledger.totals());
    let (dups, conflicting) = fake.duplicates();
    assert_eq!(conflicting, 0, "no key carried two values");
    assert!(dups > 0, "lost answers were resent under the same keys");
    assert!(fake.requests().iter().all(|(n, _)| *n <= dest.batch_max()));
    assert_eq!(store.stats(dest).unwrap().dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metronome_totals_are_exact_under_faults() {
    exact_with_faults(Engine::Metronome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orb_totals_are_exact_under_faults() {
    exact_with_faults(Engine::Orb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orb_down_does_not_delay_metronome_and_catches_up() {
    let orb = FakeDest::start(Engine::Orb, KEY).await.unwrap();
    let met = FakeDest::start(Engine::Metronome, KEY).await.unwrap();
    orb.set_down(true);
    let store = Arc::new(MemoryForwardStore::in_memory().unwrap());
    let ledger = Arc::new(VecLedger::default());
    fill(&ledger, 800, now_s());
    let ho = start(Engine::Orb, &orb.url(), &store, &ledger);
    let hm = start(Engine::Metronome, &met.url(), &store, &ledger);
    until("metronome delivered while orb is down", 20, || {
        settled(&store, Engine::Metronome, &ledger)
    })
    .await;
    assert_eq!(met.totals(), ledger.totals());
    assert!(orb.totals().is_empty());
    assert!(store.stats(Engine::Orb).unwrap().open > 0);
    orb.set_down(false);
    until("orb caught up", 30, || {
        settled(&store, Engine::Orb, &ledger)
    })
    .await;
    assert_eq!(orb.totals(), ledger.totals());
    ho.shutdown().await;
    hm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_reaches_orb_through_a_backfill_and_metronome_lists_past_34_days() {
    let orb = FakeDest::start(Engine::Orb, KEY).await.unwrap();
    let met = FakeDest::start(Engine::Metronome, KEY).await.unwrap();
    let store = Arc::new(MemoryForwardStore::in_memory().unwrap());
    let ledger = Arc::new(VecLedger::default());
    let now = now_s();
    // On time, 13 hours late (past Orb's 12 h grace), and 40 days late (past Metronome's 34).
    ledger.push("acme", "tokens", "1.000000001".parse().unwrap(), now - 60);
    ledger.push("acme", "tokens", "2.5".parse().unwrap(), now - 13 * 3600);
    ledger.push("beta", "tokens", "0.333".parse().unwrap(), now - 14 * 3600);
    ledger.push("acme", "tokens", "7".parse().unwrap(), now - 40 * 86_400);
    // A 40-day-old event is too old even for Orb's backfill window of 31 days from its start,
    // so Orb gets two backfills in turn.
    let ho = start(Engine::Orb, &orb.url(), &store, &ledger);
    let hm = start(Engine::Metronome, &met.url(), &store, &ledger);
    until("orb settled", 30, || settled(&store, Engine::Orb, &ledger)).await;
    until("metronome settled", 30, || {
        settled(&store, Engine::Metronome, &ledger)
    })
    .await;
    assert_eq!(
        orb.totals(),
        ledger.totals(),
        "every late event reached Orb"
    );
    let bfs = orb.backfills();
    assert!(
        !bfs.is_empty() && bfs.iter().all(|b| b.1 == "reflected"),
        "{bfs:?}"
    );
    let late: Vec<_> = orb
        .events()
        .into_iter()
        .filter(|e| e.timestamp_s < now - 12 * 3600)
        .collect();
    assert_eq!(late.len(), 3);
    assert!(late.iter().all(|e| e.backfill.is_some()));
    // Metronome: the 40-day-old event is listed with its reason, the rest delivered.
    let oow = store
        .list(Engine::Metronome, Some(FwdState::OutOfWindow), 0, 10)
        .unwrap();
    assert_eq!(oow.len(), 1);
    assert_eq!(oow[0].event.value, Decimal::from(7));
    assert!(oow[0].last_error.as_deref().unwrap().contains("34-day"));
    let mut want = ledger.totals();
    *want.get_mut(&("acme".into(), "tokens".into())).unwrap() -= Decimal::from(7);
    assert_eq!(met.totals(), want);
    ho.shutdown().await;
    hm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_forwarder_sends_nothing_twice() {
    for dest in [Engine::Metronome, Engine::Orb] {
        let fake = FakeDest::start(dest, KEY).await.unwrap();
        // Every answer lost after processing, so the first run leaves unknown outcomes behind.
        fake.set_random_faults(FakeFaults {
            lose_answer_permille: 1000,
            seed: 3,
            ..FakeFaults::default()
        });
        let store = Arc::new(MemoryForwardStore::in_memory().unwrap());
        let ledger = Arc::new(VecLedger::default());
        fill(&ledger, 600, now_s());
        let h = start(dest, &fake.url(), &store, &ledger);
        until("some processed", 20, || !fake.requests().is_empty()).await;
        h.shutdown().await;
        assert!(store.stats(dest).unwrap().open > 0);
        fake.set_random_faults(FakeFaults::default());
        let h = start(dest, &fake.url(), &store, &ledger);
        until("settled after restart", 30, || {
            settled(&store, dest, &ledger)
        })
        .await;
        h.shutdown().await;
        assert_eq!(fake.totals(), ledger.totals());
        assert_eq!(fake.duplicates().1, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_is_dead_lettered_alone() {
    let met = FakeDest::start(Engine::Metronome, KEY).await.unwrap();
    let store = Arc::new(MemoryForwardStore::in_memory().unwrap());
    let ledger = Arc::new(VecLedger::default());
    let now = now_s();
    for i in 0..10 {
        ledger.push("acme", "tokens", Decimal::new(i + 1, 2), now - 60);
    }
    // More than 24 h ahead: Metronome refuses the whole request.
    ledger.push("acme", "tokens", Decimal::ONE, now + 3 * 86_400);
    let h = start(Engine::Metronome, &met.url(), &store, &ledger);
    until("settled", 20, || {
        let st = store.stats(Engine::Metronome).unwrap();
        st.open == 0 && st.dead == 1
    })
    .await;
    h.shutdown().await;
    let total: Decimal = met.totals().values().copied().sum();
    assert_eq!(total, "0.55".parse::<Decimal>().unwrap());
    let dead = store
        .list(Engine::Metronome, Some(FwdState::Dead), 0, 10)
        .unwrap();
    assert!(dead[0].last_error.as_deref().unwrap().contains("24 hours"));
}

/// API calls per million recorded events (request counts do not depend on the build profile;
/// `benches/benches/forward.rs` measures the rates): 1M recorded events arrive as 100k ledger
/// deltas (10 events each) for 1,000 customers over 10 minutes; the forwarder catches up.
/// `cargo test -p tally-forward --test forward -- --ignored --nocapture api_calls`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, ~1 min in a debug build"]
async fn api_calls_per_million_recorded_events() {
    for dest in [Engine::Metronome, Engine::Orb] {
        let fake = FakeDest::start(dest, KEY).await.unwrap();
        let store = Arc::new(MemoryForwardStore::in_memory().unwrap());
        let ledger = Arc::new(VecLedger::default());
        let base = now_s() - now_s().rem_euclid(60) - 3600 - 600;
        for i in 0..100_000usize {
            ledger.push(
                &format!("cust{:04}", i % 1000),
                "tokens",
                Decimal::new(1 + (i % 9973) as i64, 3),
                base + 60 * (i / 10_000) as i64,
            );
        }
        let h = start(dest, &fake.url(), &store, &ledger);
        until("caught up", 300, || settled(&store, dest, &ledger)).await;
        h.shutdown().await;
        let events = fake.events().len();
        let requests = fake.requests().len();
        println!(
            "{}: 1,000,000 recorded events → 100,000 deltas → {events} events in {requests} requests = {requests} API calls per million recorded events",
            dest.as_str()
        );
        assert_eq!(fake.totals(), ledger.totals());
    }
}
