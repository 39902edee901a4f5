//! Orb and Metronome forwarding with the ledger in PostgreSQL (`--ledger-url`), when
//! `TALLY_TEST_POSTGRES_URL` is set (each test makes and drops its own database):
//! - the PostgreSQL forward store passes the same store-model checks as the redb one, and its
//!   destination claim is held by one holder at a time until it runs out;
//! - a ledger position that commits after a later one is never skipped: the ledger reader
//!   stops before the first missing position, and writers take positions in commit order;
//! - two `tally-collector run` processes on one database, Orb and Metronome fakes with lost
//!   answers, 500s and 429s, the collector holding the claims SIGKILLed mid-send: the other
//!   takes over once the claim runs out and resends under the same keys; each destination's
//!   totals equal the ledger to the last decimal place and no key carries two values.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_collector::core::ledger::{Adjustment, Period};
use tally_collector::forwarding::ledger_feed::StoreLedger;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::forward::PgForwardStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::store::{AdjustOutcome, Store};
use tally_collector::testkit::TestClient;
use tally_forward::ledger_feed::fake::{FakeDest, FakeFault, FakeFaults};
use tally_forward::ledger_feed::runner::LedgerSource;
use tally_forward::ledger_feed::store::ForwardStore;
use tally_forward::ledger_feed::{Engine, Routes, plan};
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

#[test]
fn the_postgres_forward_store_passes_the_store_model() {
    let Some(db) = TestDb::create("the_postgres_forward_store_passes_the_store_model") else {
        return;
    };
    let pg = Arc::new(PgStore::open(db.url()).unwrap());
    let s = PgForwardStore::new(pg.clone());
    tally_forward::ledger_feed::conformance::check_store(&s);

    // A second collector on the same database sees the same state and namespace.
    let other = PgForwardStore::new(Arc::new(PgStore::open(db.url()).unwrap()));
    assert_eq!(other.namespace().unwrap(), s.namespace().unwrap());
    assert_eq!(other.cursor(Engine::Metronome).unwrap(), 7);
    assert_eq!(
        other.stats(Engine::Orb).unwrap(),
        s.stats(Engine::Orb).unwrap()
    );

    // The claim: one holder at a time, per destination, until it runs out.
    let d = Engine::Orb;
    assert!(s.claim(d, "a", 1_000, 5_000).unwrap());
    assert!(!other.claim(d, "b", 1_000, 6_000).unwrap(), "a holds it");
    assert!(
        other.claim(Engine::Metronome, "b", 1_000, 6_000).unwrap(),
        "claims are per destination"
    );
    assert!(s.claim(d, "a", 4_000, 9_000).unwrap(), "a renews");
    assert!(!other.claim(d, "b", 8_999, 12_000).unwrap());
    assert!(other.claim(d, "b", 9_000, 12_000).unwrap(), "a's ran out");
    assert!(!s.claim(d, "a", 9_500, 14_000).unwrap());
}

fn adjustment(key: &str, q: i64) -> Adjustment {
    Adjustment {
        customer: CustomerId::new("acme").unwrap(),
        meter: MeterName::new("calls").unwrap(),
        dimensions: Dimensions::default(),
        period: Period::of_ms(now_ms()),
        quantity: Decimal::new(q, 3),
        reason: String::from("test"),
        idempotency_key: key.to_owned(),
    }
}

fn connect(url: &str) -> postgres::Client {
    use std::str::FromStr;
    postgres::Config::from_str(url)
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap()
}

#[test]
fn a_position_committed_late_is_never_skipped() {
    let Some(db) = TestDb::create("a_position_committed_late_is_never_skipped") else {
        return;
    };
    let pg = Arc::new(PgStore::open(db.url()).unwrap());
    pg.put_meter(&meter("calls", Aggregation::Sum)).unwrap();
    assert!(matches!(
        pg.adjust(&adjustment("k1", 1_500), now_ms()).unwrap(),
        AdjustOutcome::Created(_)
    ));
    let ledger = StoreLedger::gapless(pg.clone());
    let fstore = PgForwardStore::new(pg.clone());
    let d = Engine::Metronome;
    let ns = fstore.namespace().unwrap();
    // One planning step as the runner does it: read after the cursor, commit the plan.
    let step = || {
        let cursor = fstore.cursor(d).unwrap();
        let (items, scanned) = ledger.read(cursor, 100).unwrap();
        let p = plan(&ns, d, cursor, scanned, &items, &Routes::default());
        fstore.commit_plan(d, cursor, p.cursor, p.groups).unwrap();
        fstore.cursor(d).unwrap()
    };
    assert_eq!(step(), 1);

    // Transaction A takes the ledger lock and writes position 2 as an ingest does, and does
    // not commit yet.
    let mut a = connect(db.url());
    let mut ta = a.transaction().unwrap();
    ta.query_one("SELECT id FROM ledger_head WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    ta.execute(
        "INSERT INTO transfers (pos, customer, t) SELECT 2, customer, t FROM transfers WHERE pos = 1",
        &[],
    )
    .unwrap();
    // A writer through the store waits for the lock: positions are taken in commit order.
    let (tx_done, rx_done) = std::sync::mpsc::channel();
    let pg2 = pg.clone();
    let writer = std::thread::spawn(move || {
        let out = pg2.adjust(&adjustment("k3", 250), now_ms()).unwrap();
        tx_done.send(()).unwrap();
        out
    });
    assert!(
        rx_done.recv_timeout(Duration::from_millis(500)).is_err(),
        "a ledger writer committed while another held the ledger lock"
    );
    // Even a writer that skipped the lock and committed position 3 before 2 is not read past:
    // the reader stops before the first missing position.
    let mut c = connect(db.url());
    c.execute(
        "INSERT INTO transfers (pos, customer, t) SELECT 3, customer, t FROM transfers WHERE pos = 1",
        &[],
    )
    .unwrap();
    assert_eq!(ledger.read(1, 100).unwrap().0.len(), 0);
    assert_eq!(
        step(),
        1,
        "the cursor does not pass the uncommitted position 2"
    );
    assert_eq!(step(), 1);

    ta.commit().unwrap();
    assert!(matches!(writer.join().unwrap(), AdjustOutcome::Created(_)));
    let positions: Vec<u64> = ledger
        .read(1, 100)
        .unwrap()
        .0
        .iter()
        .map(|i| i.position)
        .collect();
    assert_eq!(
        positions,
        vec![2, 3, 4],
        "the store's writer took position 4"
    );
    assert_eq!(step(), 4);
    // Every position is in exactly one group, and the values sum to the ledger's.
    let groups = fstore.list(d, None, 0, 100).unwrap();
    let mut seen: Vec<u64> = groups
        .iter()
        .flat_map(|g| g.event.positions.clone())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3, 4]);
    let total: Decimal = groups.iter().map(|g| g.event.value).sum();
    assert_eq!(total, Decimal::new(1_500 * 3 + 250, 3));
}

const ORB_KEY: &str = "orb_test_SECRETORB";
const MET_KEY: &str = "met_SECRETMET";

fn free_udp_port() -> SocketAddr {
    let p = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{p}").parse().unwrap()
}

fn run(
    dir: &std::path::Path,
    url: &str,
    quic: SocketAddr,
    orb: &str,
    met: &str,
) -> (Proc, SocketAddr) {
    let (p, q, http) = spawn_collector(
        Command::new(env!("CARGO_BIN_EXE_tally-collector"))
            .args(["run", "--http", "127.0.0.1:0"])
            .arg("--quic")
            .arg(quic.to_string())
            .arg("--data-dir")
            .arg(dir)
            .args(["--ledger-url", url])
            .args(["--orb-base-url", orb, "--metronome-base-url", met])
            .args(["--forward-request-timeout", "2"])
            .env("ORB_API_KEY", ORB_KEY)
            .env("METRONOME_API_KEY", MET_KEY),
        "SECRET",
    );
    assert_eq!(q, quic);
    (p, http)
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn claims(url: &str) -> Vec<(String, String)> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        connect(&url)
            .query(
                "SELECT name, holder FROM claims WHERE name LIKE 'forward:%' ORDER BY name",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_on_one_database_forward_once_through_a_sigkill() {
    let Some(db) = TestDb::create("two_collectors_on_one_database_forward_once_through_a_sigkill")
    else {
        return;
    };
    let orb = FakeDest::start(Engine::Orb, ORB_KEY).await.unwrap();
    let met = FakeDest::start(Engine::Metronome, MET_KEY).await.unwrap();
    // Slow answers (requests in flight at the kill) and faults at both.
    for (f, seed) in [(&orb, 3), (&met, 4)] {
        f.set_response_delay(Duration::from_millis(300));
        f.push_faults([
            FakeFault::LoseAnswer,
            FakeFault::Status500,
            FakeFault::RateLimited,
        ]);
        f.set_random_faults(FakeFaults {
            status_500_permille: 60,
            rate_limited_permille: 60,
            lose_answer_permille: 150,
            seed,
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let files = tally_collector::init(dir.path(), &[]).unwrap();
    let token = tally_collector::InitFiles::read_token(&files.admin_token).unwrap();
    let enroll = tally_collector::InitFiles::read_token(&files.enroll_token).unwrap();
    let ca = std::fs::read(&files.ca_pem).unwrap();
    let (qa, qb) = (free_udp_port(), free_udp_port());

    // A starts first and takes both destinations' claims; B starts beside it.
    let (proc_a, http_a) = run(dir.path(), db.url(), qa, &orb.url(), &met.url());
    until("a claims both destinations", 20, || {
        claims(db.url()).len() == 2
    })
    .await;
    let held_by_a = claims(db.url());
    let (proc_b, http_b) = run(dir.path(), db.url(), qb, &orb.url(), &met.url());
    put_stripe_meters(http_a, &token).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Two agents, one on each collector.
    let customers = ["cus_a", "cus_b", "cus_c"];
    let mut rng = Rng(77);
    let mut ledger: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let now = now_ms();
    for (n, addr) in [(0u8, qa), (1u8, qb)] {
        let k = key(60 + n);
        let mut client = TestClient::connect(addr, &ca, &k, Some(&enroll))
            .await
            .unwrap();
        // Enough (customer, meter, minute) events that Metronome needs several requests of
        // 100: the kill below must find some unsent, whenever the forwarder's first pass ran.
        for seq in 1..=40u64 {
            let mut deltas = Vec::new();
            let mut used = HashSet::new();
            for _ in 0..4 {
                let c = customers[rng.below(3) as usize];
                let m = ["api_calls", "tokens"][rng.below(2) as usize];
                if !used.insert((c, m)) {
                    continue;
                }
                let q = Decimal::new(1 + rng.below(9_000_000) as i64, 7);
                *ledger.entry((c.to_owned(), m.to_owned())).or_default() += q;
                deltas.push(delta(c, m, &[], now - 60_000 * rng.below(60) as i64, q, 1));
            }
            match send(&mut client, &seal(&k, 1, seq, deltas)).await {
                Frame::Ack(a) => assert_eq!(a.outcome, AckOutcome::Committed),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    // SIGKILL A while its requests are in flight: some events arrived, not all.
    until("metronome got something", 30, || !met.events().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(proc_a);
    assert_ne!(met.totals(), ledger, "everything arrived before the kill");
    assert!(!held_by_a.is_empty());

    // B takes over once A's claims run out (request timeout 2 s + 5 s) and finishes both.
    for f in [&orb, &met] {
        f.set_response_delay(Duration::from_millis(20));
    }
    until("metronome exact", 90, || met.totals() == ledger).await;
    until("orb exact", 90, || orb.totals() == ledger).await;
    let now_claims = claims(db.url());
    assert!(
        now_claims.iter().all(|c| !held_by_a.contains(c)),
        "B holds both claims now: {now_claims:?} (A held {held_by_a:?})"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(met.totals(), ledger, "nothing arrives twice later");
    assert_eq!(orb.totals(), ledger, "nothing arrives twice later");
    for (name, f) in [("metronome", &met), ("orb", &orb)] {
        assert_eq!(f.duplicates().1, 0, "a {name} key carried two values");
        // One namespace: both collectors name every event the same way.
        let prefixes: HashSet<String> = f
            .events()
            .iter()
            .map(|e| e.key.split('-').take(2).collect::<Vec<_>>().join("-"))
            .collect();
        assert_eq!(prefixes.len(), 1, "{name}: {prefixes:?}");
    }

    // The ledger the collectors agree on is the one that was sent.
    let (st, v) = http(http_b, "GET", "/v1/ledger/verify", Some(&token), None).await;
    assert_eq!(st, 200);
    assert!(v.contains("\"ok\":true"), "{v}");
    for d in ["orb", "metronome"] {
        let (st, v) = http(
            http_b,
            "GET",
            &format!("/v1/outbox?destination={d}&state=sent&limit=1"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["stats"]["open"].as_u64(), Some(0), "{d}: {v}");
        assert_eq!(v["stats"]["dead"].as_u64(), Some(0), "{d}: {v}");
    }
    drop(proc_b);
}

struct VecLedger(Vec<tally_forward::ledger_feed::LedgerItem>);

impl LedgerSource for VecLedger {
    fn read(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<tally_forward::ledger_feed::LedgerItem>, u64), String> {
        let start = self.0.partition_point(|i| i.position <= after);
        let items: Vec<_> = self.0[start..].iter().take(limit).cloned().collect();
        let scanned = items.last().map_or(after, |i| i.position);
        Ok((items, scanned))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_events_reach_both_destinations_from_the_postgres_store() {
    let Some(db) =
        TestDb::create("thousands_of_events_reach_both_destinations_from_the_postgres_store")
    else {
        return;
    };
    let url = db.url().to_owned();
    let pg = Arc::new(
        tokio::task::spawn_blocking(move || PgStore::open(&url))
            .await
            .unwrap()
            .unwrap(),
    );
    let now = now_ms() / 1000;
    let base = now - now.rem_euclid(60) - 3600;
    let n = 3000u64;
    let items: Vec<_> = (1..=n)
        .map(|p| tally_forward::ledger_feed::LedgerItem {
            position: p,
            customer: format!("c{p:05}"),
            meter: "tokens".into(),
            amount: Decimal::new(p as i64, 3),
            timestamp_s: base + 60 * (p as i64 % 5),
            dimensions: Default::default(),
        })
        .collect();
    let want: Decimal = items.iter().map(|i| i.amount).sum();
    let ledger = Arc::new(VecLedger(items));
    for dest in [Engine::Metronome, Engine::Orb] {
        let key = "k_live";
        let fake = FakeDest::start(dest, key).await.unwrap();
        let store: Arc<dyn ForwardStore> = Arc::new(PgForwardStore::new(pg.clone()));
        let mut cfg = tally_forward::ledger_feed::DestinationConfig::new(
            dest,
            tally_forward::ApiKey::new(key),
            Some(fake.url()),
        );
        cfg.rate_per_s = 1_000_000;
        cfg.events_per_minute = None;
        let h = tally_forward::ledger_feed::spawn_destination(
            cfg,
            store.clone(),
            ledger.clone(),
            Default::default(),
            None,
        )
        .unwrap();
        let total = || fake.totals().values().copied().sum::<Decimal>();
        let deadline = Instant::now() + Duration::from_secs(60);
        let stats = || {
            let s2 = store.clone();
            std::thread::spawn(move || s2.stats(dest).unwrap())
                .join()
                .unwrap()
        };
        // The fake counts an event before the forwarder records its answer: wait for both.
        while (total() != want || stats().sent != n) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let st = stats();
        h.shutdown().await;
        assert_eq!(total(), want, "{}: {st:?}", dest.as_str());
        assert_eq!(st.sent, n, "{}: {st:?}", dest.as_str());
        assert_eq!(fake.events().len() as u64, n);
    }
}
