//! Leases of hard limits whose truth is the store's (decision 0095):
//! - two `tally-collector run` processes on one PostgreSQL (when `TALLY_TEST_POSTGRES_URL` is
//!   set; otherwise the test prints that it skipped), real agents on both consuming one hard
//!   limit concurrently past it: the total allowed is ≤ N and ≥ 99 % of N, and the ledger holds
//!   exactly what was allowed;
//! - on redb and on PostgreSQL: usage committed by an ingest transaction is already off its
//!   lease's outstanding part when the ack leaves, so a lease request right after it is not
//!   short-changed by counting that usage twice (once in `used`, once as leased).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally_agent::Agent;
use tally_collector::store::Store;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_protocol::entitlements::LeaseRequest;
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, MeterName};

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Starts `tally-collector run --ledger-url …`; returns it with its QUIC and HTTP addresses.
fn run(dir: &std::path::Path, url: &str) -> (Proc, SocketAddr, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .args(["run", "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--ledger-url", url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (q, h) = ready_addrs(stdout);
    (Proc(child), q, h)
}

const N: u64 = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_two_collector_processes_share_one_hard_limit_exactly() {
    let Some(db) = TestDb::create("agents_on_two_collector_processes_share_one_hard_limit_exactly")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = tally_collector::init(dir.path(), &[]).unwrap();
    let token = tally_collector::InitFiles::read_token(&files.admin_token).unwrap();
    let ca = std::fs::read(&files.ca_pem).unwrap();
    let (_pa, qa, ha) = run(dir.path(), db.url());
    let (_pb, qb, hb) = run(dir.path(), db.url());

    let (st, v) = http(
        ha,
        "PUT",
        "/v1/meters/api_calls",
        Some(&token),
        Some(r#"{"aggregation":"sum","event_type":"api_call","value_property":"$.count"}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let plan = format!(
        r#"{{"limits":{{"api_calls":{{"included":"{N}","enforcement":"hard","reset":"calendar"}}}}}}"#
    );
    let (st, v) = http(hb, "PUT", "/v1/plans/pro", Some(&token), Some(&plan)).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = http(
        ha,
        "PUT",
        "/v1/customers/acme",
        Some(&token),
        Some(r#"{"plan":"pro"}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // B's agents get the catalog through LISTEN/NOTIFY (4–7 ms measured); leave room.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Two agents on each collector, each consuming one unit at a time as fast as it may.
    let allowed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for (n, addr) in [qa, qa, qb, qb].into_iter().enumerate() {
        let adir = tempfile::tempdir().unwrap();
        let agent = Agent::builder()
            .data_dir(adir.path())
            .collector(addr.to_string())
            .ca_pem(ca.clone())
            .enroll_token(tally_collector::InitFiles::read_token(&files.enroll_token).unwrap())
            .flush_interval(Duration::from_millis(50))
            .entitlements_wait(Duration::from_secs(5))
            .start()
            .await
            .unwrap();
        let agent = Arc::new(agent);
        agents.push(agent.clone());
        dirs.push(adir);
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = 0u64;
            let mut last_yes = Instant::now();
            // Demand exceeds the limit: keep asking until the limit is spent, or nothing was
            // allowed for 5 s (every lease released or reclaimed by then would be re-granted).
            while allowed.load(Ordering::SeqCst) < N && last_yes.elapsed() < Duration::from_secs(5)
            {
                let c = agent
                    .try_consume_wait("acme", "api_calls", Decimal::ONE)
                    .await
                    .unwrap();
                if c.allowed {
                    mine += 1;
                    last_yes = Instant::now();
                    allowed.fetch_add(1, Ordering::SeqCst);
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (n, mine)
        }));
    }
    let t0 = Instant::now();
    let mut per_agent = Vec::new();
    for t in tasks {
        per_agent.push(
            tokio::time::timeout(Duration::from_secs(90), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let total = allowed.load(Ordering::SeqCst);
    println!(
        "allowed {total} of {N} in {:?}, per agent {per_agent:?}",
        t0.elapsed()
    );
    assert!(total <= N, "a hard limit overshot: {total} > {N}");
    assert!(
        total * 100 >= N * 99,
        "less than 99 % allowed: {total} of {N}"
    );
    assert!(
        per_agent.iter().filter(|(_, m)| *m > 0).count() >= 2,
        "{per_agent:?}"
    );
    // One more is refused everywhere.
    for a in &agents {
        let c = a.try_consume("acme", "api_calls", Decimal::ONE).unwrap();
        assert!(!c.allowed || total < N, "{c:?}");
    }
    for a in &agents {
        a.shutdown(Duration::from_secs(10)).await.unwrap();
    }

    // The ledger holds exactly what was allowed, and verifies.
    let url = db.url().to_owned();
    let (used, report) = tokio::task::spawn_blocking(move || {
        let store = PgStore::open(&url).unwrap();
        let used: Decimal = store
            .usage_accounts(
                &CustomerId::new("acme").unwrap(),
                Some(&MeterName::new("api_calls").unwrap()),
                None,
            )
            .unwrap()
            .iter()
            .map(|a| a.balance())
            .sum();
        (used, store.verify().unwrap())
    })
    .await
    .unwrap();
    assert_eq!(used, Decimal::from(total), "ledger total");
    assert!(report.ok, "{report:?}");
}

/// Usage committed for a lease is off its outstanding part when the ack leaves: another
/// agent's request right after gets exactly what remains.
async fn committed_usage_is_not_counted_twice(env: &Env) {
    env.put_meter("api_calls", tally_protocol::catalog::Aggregation::Sum);
    let token = env.handle.admin_token().to_owned();
    let (st, v) = http(
        env.handle.http_addr(),
        "PUT",
        "/v1/plans/pro",
        Some(&token),
        Some(r#"{"limits":{"api_calls":{"included":"100","enforcement":"hard","reset":"calendar"}}}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = http(
        env.handle.http_addr(),
        "PUT",
        "/v1/customers/acme",
        Some(&token),
        Some(r#"{"plan":"pro"}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let now = now_ms();
    let period = tally_collector::core::entitlements::period::calendar_month(now);
    let lease = |id: u64, q: &str| {
        Frame::LeaseRequest(LeaseRequest {
            request_id: id,
            customer: CustomerId::new("acme").unwrap(),
            meter: MeterName::new("api_calls").unwrap(),
            period_start_ms: period.start_ms,
            quantity: d(q),
        })
    };
    let (k1, k2) = (key(41), key(42));
    let mut a1 = env.client(&k1).await;
    let mut a2 = env.client(&k2).await;
    a1.send(&lease(1, "60")).await.unwrap();
    let Frame::LeaseGrant(g1) = a1.next_reply().await.unwrap() else {
        panic!("no grant")
    };
    assert_eq!(g1.added, d("60"));
    // Agent 1 consumed all 60 and shipped them: committed, acked.
    for round in 0..5u64 {
        let b = seal(
            &k1,
            1,
            round + 1,
            vec![delta("acme", "api_calls", &[], now, d("12"), 12)],
        );
        let Frame::Ack(a) = send(&mut a1, &b).await else {
            panic!("no ack")
        };
        assert_eq!(a.outcome, AckOutcome::Committed);
    }
    // At once: the 40 left are granted whole (nothing is outstanding at agent 1 any more, and
    // its 60 count once, in `used`).
    a2.send(&lease(2, "100")).await.unwrap();
    let Frame::LeaseGrant(g2) = a2.next_reply().await.unwrap() else {
        panic!("no grant")
    };
    assert_eq!(g2.added, d("40"), "{g2:?}");
    // And nothing more for anyone.
    a1.send(&lease(3, "1")).await.unwrap();
    let Frame::LeaseGrant(g3) = a1.next_reply().await.unwrap() else {
        panic!("no grant")
    };
    assert_eq!(g3.added, Decimal::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_usage_is_not_counted_twice_on_redb() {
    let env = start().await;
    committed_usage_is_not_counted_twice(&env).await;
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_usage_is_not_counted_twice_on_postgres() {
    let Some(db) = TestDb::create("committed_usage_is_not_counted_twice_on_postgres") else {
        return;
    };
    let url = db.url().to_owned();
    let env = start_with(move |c| c.ledger_url = Some(url)).await;
    committed_usage_is_not_counted_twice(&env).await;
    env.handle.shutdown().await;
}

/// Usage past a soft limit is allowed and reported: the collector's soft-overshoot gauge
/// shows how far the customer went past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_past_a_soft_limit_shows_in_the_overshoot_metric() {
    let env = start().await;
    env.put_meter("api_calls", tally_protocol::catalog::Aggregation::Sum);
    let (st, v) = env
        .admin(
            "PUT",
            "/v1/plans/soft",
            Some(r#"{"limits":{"api_calls":{"included":"10","enforcement":"soft","reset":"calendar"}}}"#),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = env
        .admin("PUT", "/v1/customers/acme", Some(r#"{"plan":"soft"}"#))
        .await;
    assert_eq!(st, 200, "{v}");
    let k = key(43);
    let mut a = env.client(&k).await;
    let b = seal(
        &k,
        1,
        1,
        vec![delta("acme", "api_calls", &[], now_ms(), d("15.5"), 3)],
    );
    let Frame::Ack(ack) = send(&mut a, &b).await else {
        panic!("no ack")
    };
    assert_eq!(ack.outcome, AckOutcome::Committed);
    let (st, v) = env.admin("GET", "/v1/entitlements/acme", None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["meters"]["api_calls"]["used"], "15.5");
    let text = env.handle.shared().metrics.encode();
    assert!(
        text.contains("tally_collector_entitlements_soft_overshoot 5.5"),
        "{text}"
    );
    env.handle.shutdown().await;
}
