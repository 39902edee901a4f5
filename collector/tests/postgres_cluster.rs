//! Several collectors on one PostgreSQL (`--ledger-url`), when `TALLY_TEST_POSTGRES_URL` is
//! set (each test makes and drops its own database; without the variable they print that they
//! skipped):
//! - in-process: a meter put through one collector reaches the other's agents within 1 s and
//!   its admin API at once; a plan put through one is served by the other; the same batch sent
//!   to both (an agent failing over mid-send), also concurrently, is committed once and
//!   answered `Duplicate` by the other;
//! - real processes: two `tally-collector run`s forwarding to a Stripe-compatible server, agents
//!   sending to both, one collector SIGKILLed mid-stream (its agent fails over to the other,
//!   then back once it is restarted): the ledger's totals are exact, Stripe's totals are exact
//!   with no identifier accepted twice, and `ledger verify --ledger-url` is clean.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_collector::store::Store;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_collector::testkit::TestClient;
use tally_collector::{Collector, CollectorConfig};
use tally_forward::stripe::test_server::{FakeStripe, RandomFaults};
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, MeterName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_on_one_database_answer_the_same_and_commit_once() {
    let Some(db) = TestDb::create("two_collectors_on_one_database_answer_the_same_and_commit_once")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tally_collector::init(dir.path(), &[]).unwrap();
    let start = || {
        let mut c = CollectorConfig::ephemeral(dir.path());
        c.ledger_url = Some(db.url().to_owned());
        Collector::start(c)
    };
    let a = start().await.unwrap();
    let b = start().await.unwrap();
    let ca = std::fs::read(&a.files().ca_pem).unwrap();
    let token = a.admin_token().to_owned();

    // A meter put through A: B's agents get the new catalog within 1 s.
    let mut sub = b.shared().catalogs.subscribe();
    let t0 = Instant::now();
    a.shared()
        .put_meter(&meter("calls", Aggregation::Sum))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), async {
        while sub.borrow_and_update().meter("calls").is_none() {
            sub.changed().await.unwrap();
        }
    })
    .await
    .expect("the catalog reached the other collector within 1 s");
    println!(
        "catalog change reached the other collector in {:?}",
        t0.elapsed()
    );
    let (st, v) = http(b.http_addr(), "GET", "/v1/meters", Some(&token), None).await;
    assert_eq!(st, 200);
    assert!(v.contains("\"calls\""), "{v}");

    // A plan put through B is served by A.
    let plan = r#"{"features":["gpt4"],"limits":{"calls":{"included":"100","enforcement":"hard","reset":"calendar"}}}"#;
    let (st, v) = http(
        b.http_addr(),
        "PUT",
        "/v1/plans/pro",
        Some(&token),
        Some(plan),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = http(a.http_addr(), "GET", "/v1/plans/pro", Some(&token), None).await;
    assert_eq!(st, 200, "{v}");
    assert!(v.contains("gpt4"), "{v}");

    // The same batch through both: committed once, a duplicate at the other.
    let k = key(21);
    let connect = |addr| TestClient::connect(addr, &ca, &k, Some(a.enroll_token()));
    let mut ca_client = connect(a.quic_addr()).await.unwrap();
    let mut cb_client = connect(b.quic_addr()).await.unwrap();
    let now = now_ms();
    let batch = |seq| {
        seal(
            &k,
            1,
            seq,
            vec![delta("acme", "calls", &[], now, Decimal::TEN, 1)],
        )
    };
    let outcome = |f: Frame| match f {
        Frame::Ack(a) => a.outcome,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        outcome(send(&mut ca_client, &batch(1)).await),
        AckOutcome::Committed
    );
    assert_eq!(
        outcome(send(&mut cb_client, &batch(1)).await),
        AckOutcome::Duplicate
    );
    // And at the same time: each seq committed by exactly one of them.
    let seqs: Vec<u64> = (2..=21).collect();
    let (ba, bb) = (seqs.clone(), seqs.clone());
    let batch2 = move |seq| {
        seal(
            &key(21),
            1,
            seq,
            vec![delta("acme", "calls", &[], now, Decimal::TEN, 1)],
        )
    };
    let ta = tokio::spawn(async move {
        let mut out = Vec::new();
        for s in ba {
            out.push(outcome(send(&mut ca_client, &batch2(s)).await));
        }
        out
    });
    let tb = tokio::spawn(async move {
        let mut out = Vec::new();
        for s in bb {
            out.push(outcome(send(&mut cb_client, &batch2(s)).await));
        }
        out
    });
    let (oa, ob) = (ta.await.unwrap(), tb.await.unwrap());
    for (x, y) in oa.iter().zip(&ob) {
        let committed = [x, y]
            .iter()
            .filter(|o| ***o == AckOutcome::Committed)
            .count();
        assert_eq!(committed, 1, "{x:?} {y:?}");
        assert!([x, y].contains(&&AckOutcome::Duplicate));
    }
    let store = b.shared().store.clone();
    let total: Decimal = tokio::task::spawn_blocking(move || {
        store
            .usage_accounts(
                &CustomerId::new("acme").unwrap(),
                Some(&MeterName::new("calls").unwrap()),
                None,
            )
            .unwrap()
            .iter()
            .map(|a| a.balance())
            .sum()
    })
    .await
    .unwrap();
    assert_eq!(total, Decimal::from(210));
    let (_, v) = http(
        a.http_addr(),
        "GET",
        "/v1/ledger/verify",
        Some(&token),
        None,
    )
    .await;
    assert!(v.contains("\"ok\":true"), "{v}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A port free on 127.0.0.1 now (UDP, for QUIC), so a restarted collector keeps its address.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `tally-collector run --ledger-url …` on `quic`; returns it with its HTTP address.
fn run(dir: &std::path::Path, url: &str, quic: SocketAddr, stripe_url: &str) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .args(["run", "--http", "127.0.0.1:0"])
        .arg("--quic")
        .arg(quic.to_string())
        .arg("--data-dir")
        .arg(dir)
        .args(["--ledger-url", url])
        .args(["--stripe-base-url", stripe_url])
        .args(["--stripe-request-timeout", "1", "--stripe-rate", "500"])
        .env("STRIPE_API_KEY", "sk_test_cluster_SECRETKEY")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            assert!(!line.contains("SECRETKEY"), "the API key reached the log");
        }
    });
    let (q, http) = ready_addrs(stdout);
    assert_eq!(q, quic);
    (Proc(child), http)
}

/// An agent's failover as the agent does it: try the collectors in order, the first that
/// answers takes the batch; a connection that fails is dropped and the next one tried.
async fn deliver(
    batch: &tally_protocol::batch::SignedBatch,
    addrs: &[SocketAddr],
    clients: &mut [Option<TestClient>],
    ca: &[u8],
    k: &tally_protocol::ed25519_dalek::SigningKey,
    enroll: &str,
) -> (usize, AckOutcome) {
    loop {
        for (i, addr) in addrs.iter().enumerate() {
            if clients[i].is_none() {
                let c = tokio::time::timeout(
                    Duration::from_millis(500),
                    TestClient::connect(*addr, ca, k, Some(enroll)),
                )
                .await;
                match c {
                    Ok(Ok(c)) => clients[i] = Some(c),
                    _ => continue,
                }
            }
            let Some(c) = clients[i].as_mut() else {
                continue;
            };
            let sent = c.send(&Frame::Batch(batch.clone())).await;
            let reply = match sent {
                Ok(()) => tokio::time::timeout(Duration::from_secs(2), c.next_reply()).await,
                Err(_) => {
                    clients[i] = None;
                    continue;
                }
            };
            match reply {
                Ok(Ok(Frame::Ack(a))) => return (i, a.outcome),
                _ => clients[i] = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collector_processes_one_killed_mid_stream_count_and_forward_everything_once() {
    let Some(db) = TestDb::create(
        "two_collector_processes_one_killed_mid_stream_count_and_forward_everything_once",
    ) else {
        return;
    };
    let server = FakeStripe::start().await.unwrap();
    server.set_response_delay(Duration::from_millis(300));
    server.set_random_faults(RandomFaults {
        lose_answer_permille: 200,
        seed: 12,
        ..RandomFaults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let files = tally_collector::init(dir.path(), &[]).unwrap();
    let token = tally_collector::InitFiles::read_token(&files.admin_token).unwrap();
    let enroll = tally_collector::InitFiles::read_token(&files.enroll_token).unwrap();
    let ca = std::fs::read(&files.ca_pem).unwrap();
    let qa: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let qb: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let (proc_a, http_a) = run(dir.path(), db.url(), qa, &server.url());
    let (proc_b, http_b) = run(dir.path(), db.url(), qb, &server.url());

    // Meters through A, a customer mapping through B.
    put_stripe_meters(http_a, &token).await;
    let (st, v) = http(
        http_b,
        "PUT",
        "/v1/customers/acme",
        Some(&token),
        Some(r#"{"stripe_customer_id":"cus_acme"}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // B serves the meters defined through A (and its agents' catalog has them within 1 s).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, v) = http(http_b, "GET", "/v1/meters", Some(&token), None).await;
    assert!(v.contains("\"tokens\""), "{v}");

    // Two agents, one preferring A and one B; 40 batches each, paced so the kill lands mid-stream.
    let ledger: Arc<Mutex<BTreeMap<(String, String), Decimal>>> = Arc::default();
    let now = now_ms();
    let mut agents = Vec::new();
    for (n, order) in [(0u8, [qa, qb]), (1u8, [qb, qa])] {
        let (ca, enroll, ledger) = (ca.clone(), enroll.clone(), ledger.clone());
        agents.push(tokio::spawn(async move {
            let k = key(90 + n);
            let mut clients: Vec<Option<TestClient>> = vec![None, None];
            let mut rng = Rng(1000 + u64::from(n));
            let customers = ["acme", "cus_b", "cus_c"];
            let mut served = [0usize; 2];
            for seq in 1..=40u64 {
                let mut deltas = Vec::new();
                let mut batch_sum = Vec::new();
                let mut used = HashSet::new();
                for _ in 0..3 {
                    let c = customers[rng.below(3) as usize];
                    let m = ["api_calls", "tokens"][rng.below(2) as usize];
                    if !used.insert((c, m)) {
                        continue;
                    }
                    let q = Decimal::new(1 + rng.below(30_000) as i64, 4);
                    batch_sum.push((c.to_owned(), m.to_owned(), q));
                    deltas.push(delta(c, m, &[], now - 60_000 * rng.below(5) as i64, q, 1));
                }
                let b = seal(&k, 1, seq, deltas);
                // `deliver` tries the preferred collector first for every batch: fail back.
                let (i, outcome) = deliver(&b, &order, &mut clients, &ca, &k, &enroll).await;
                served[i] += 1;
                // A batch acked by neither before a failover is resent: committed once overall.
                assert!(
                    matches!(outcome, AckOutcome::Committed | AckOutcome::Duplicate),
                    "{outcome:?}"
                );
                {
                    let mut l = ledger.lock().unwrap();
                    for (c, m, q) in batch_sum {
                        *l.entry((c, m)).or_default() += q;
                    }
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            served
        }));
    }

    // Kill A once Stripe has events in flight, restart it on the same address a little later.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.events().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(proc_a); // SIGKILL
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.set_response_delay(Duration::from_millis(20));
    server.set_random_faults(RandomFaults::default());
    let (proc_a2, http_a2) = run(dir.path(), db.url(), qa, &server.url());
    let mut served = Vec::new();
    for a in agents {
        served.push(a.await.unwrap());
    }
    println!("batches served [preferred, other]: {served:?}");
    assert!(served[0][1] > 0, "the first agent never failed over");

    // The ledger's totals are exact.
    let want_ledger = ledger.lock().unwrap().clone();
    let url = db.url().to_owned();
    let got: BTreeMap<(String, String), Decimal> = tokio::task::spawn_blocking(move || {
        let store = PgStore::open(&url).unwrap();
        let mut got = BTreeMap::new();
        for c in ["acme", "cus_b", "cus_c"] {
            for m in ["api_calls", "tokens"] {
                let sum: Decimal = store
                    .usage_accounts(
                        &CustomerId::new(c).unwrap(),
                        Some(&MeterName::new(m).unwrap()),
                        None,
                    )
                    .unwrap()
                    .iter()
                    .map(|a| a.balance())
                    .sum();
                if !sum.is_zero() {
                    got.insert((c.to_owned(), m.to_owned()), sum);
                }
            }
        }
        got
    })
    .await
    .unwrap();
    assert_eq!(got, want_ledger, "ledger totals");

    // Stripe's totals are exact, no identifier twice.
    let mut want: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((c, m), q) in &want_ledger {
        let scale = if m == "tokens" {
            Decimal::from(1000)
        } else {
            Decimal::ONE
        };
        let units: u64 = (*q * scale).floor().try_into().unwrap();
        let sc = if c == "acme" {
            "cus_acme".to_owned()
        } else {
            c.clone()
        };
        if units > 0 {
            *want.entry((sc, m.clone())).or_default() += units;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.totals() != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.totals(), want, "Stripe's totals");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.totals(), want, "nothing arrives twice later");
    let events = server.events();
    let ids: HashSet<_> = events.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(ids.len(), events.len(), "an identifier was accepted twice");

    // Both collectors' API answers the same; `ledger verify --ledger-url` is clean.
    let (_, va) = http(http_a2, "GET", "/v1/meters", Some(&token), None).await;
    let (_, vb) = http(http_b, "GET", "/v1/meters", Some(&token), None).await;
    assert_eq!(va, vb);
    let out = Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .args(["ledger", "verify", "--ledger-url", db.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(proc_a2);
    drop(proc_b);
}

/// A real agent configured with two collectors on one database: the first serves; when it
/// stops, the second takes over; when it is back, the agent moves back to it; every unit is
/// counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_in_order_and_fails_back() {
    let Some(db) = TestDb::create("an_agent_fails_over_in_order_and_fails_back") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tally_collector::init(dir.path(), &[]).unwrap();
    let qa: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let start = |quic: Option<SocketAddr>| {
        let mut c = CollectorConfig::ephemeral(dir.path());
        c.ledger_url = Some(db.url().to_owned());
        if let Some(q) = quic {
            c.quic_addr = q;
        }
        Collector::start(c)
    };
    let a = start(Some(qa)).await.unwrap();
    let b = start(None).await.unwrap();
    a.shared()
        .put_meter(&meter("calls", Aggregation::Sum))
        .unwrap();
    let adir = tempfile::tempdir().unwrap();
    let agent = tally_agent::Agent::builder()
        .data_dir(adir.path())
        .collector(qa.to_string())
        .collector(b.quic_addr().to_string())
        .ca_pem(std::fs::read(&a.files().ca_pem).unwrap())
        .enroll_token(a.enroll_token())
        .flush_interval(Duration::from_millis(50))
        .failback_interval(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let id = agent.agent_id();
    let live = |h: &tally_collector::CollectorHandle| h.shared().registry.live_connections(id);
    let mut total = Decimal::ZERO;
    let mut record = |n: i64| {
        for _ in 0..n {
            agent.record("acme", "calls", Decimal::new(125, 2)).unwrap();
            total += Decimal::new(125, 2);
        }
    };
    record(50);
    agent.flush(Duration::from_secs(20)).await.unwrap();
    assert_eq!((live(&a), live(&b)), (1, 0), "the first collector serves");

    a.shutdown().await;
    record(50);
    agent.flush(Duration::from_secs(20)).await.unwrap();
    assert_eq!(live(&b), 1, "failed over to the second");

    let a = start(Some(qa)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while live(&a) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(live(&a), 1, "failed back to the first");
    record(50);
    agent.flush(Duration::from_secs(20)).await.unwrap();

    let store = b.shared().store.clone();
    let got: Decimal = tokio::task::spawn_blocking(move || {
        store
            .usage_accounts(
                &CustomerId::new("acme").unwrap(),
                Some(&MeterName::new("calls").unwrap()),
                None,
            )
            .unwrap()
            .iter()
            .map(|a| a.balance())
            .sum()
    })
    .await
    .unwrap();
    assert_eq!(got, total);
    assert!(a.shared().verify().unwrap().ok);
    agent.shutdown(Duration::from_secs(5)).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
