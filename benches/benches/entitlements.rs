//! Entitlement benchmarks (issue 10, SPEC §9):
//! - `check()` and `try_consume()` on one thread over 10,000 customers (targets: median ≤ 50 ns
//!   and ≤ 100 ns), and how two threads scale (target ≥ 1.6×);
//! - `try_consume()` on a hard limit under a lease (`Agent::try_consume` of an agent whose
//!   customers each hold a lease, applied as a collector would grant it), and the same through
//!   the table alone recording with a kept `Counter` (the figure measured before decision 0112);
//! - the sidecar's `GET /v1/entitlements/{c}/{feature}` and `POST …/consume` over loopback:
//!   p50 / p99 (hdrhistogram), keep-alive clients; consume records durably (group commit).
//!
//! Two threads sweep the same customers (each from its own offset), so every meter slot a call
//! reaches was last reached by the other core (decision 0132 gives each thread its own lane of
//! the slot to write); `TALLY_BENCH_SPLIT=1` gives each thread its own half of the customers.
//! One thread alone and two side by side alternate in phases of a few milliseconds (100 rounds),
//! so the scaling compares the two at the same moments of a shared VM (see [`alternate`]).
//!
//! The agent decides from a snapshot of 10,000 customers kept in its store (as after a
//! restart), so no collector is needed. Per-call latency is measured over batches of 64 calls
//! (one clock read per batch), so p99 is the p99 of 64-call averages.
//! `cargo bench -p tally-benches --bench entitlements`

use criterion::{Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_agent::entitlements::table::Table;
use tally_agent::entitlements::{EntitlementsCache, EntitlementsConfig};
use tally_agent::store::Store;
use tally_agent::{Agent, Counter};
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{
    CustomerEntitlements, Enforcement, Feature, LeaseGrant, MeterLimit, Source,
};
use tally_protocol::names::{CustomerId, FeatureName, MeterName};
use tally_sidecar::backend::AgentBackend;
use tally_sidecar::http::{HttpConfig, router};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Customers the calls sweep: 10,000 (the SPEC's figure), or `TALLY_BENCH_CUSTOMERS=N` (fewer
/// fit a core's L2, which shows what sharing a line costs apart from memory latency).
static CUSTOMERS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("TALLY_BENCH_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
        .max(2)
});
const BATCH: u64 = 64;

/// `TALLY_BENCH_ONLY=calls` runs only the per-call figures (no criterion, no sidecar), and
/// `TALLY_BENCH_CALLS=N` sets their number of calls per thread in each phase, all rounds together
/// (default 5,000,000; fewer for profiling under callgrind).
fn run(part: &str) -> bool {
    std::env::var("TALLY_BENCH_ONLY").map_or(true, |v| v == part)
}

fn calls() -> u64 {
    std::env::var("TALLY_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn names() -> Arc<Vec<String>> {
    Arc::new(
        (0..*CUSTOMERS)
            .map(|i| format!("customer-{i:05}"))
            .collect(),
    )
}

fn customer(name: &str, enforcement: Enforcement) -> CustomerEntitlements {
    let big = Decimal::from(1_000_000_000_000i64);
    CustomerEntitlements {
        customer: CustomerId::new(name).expect("customer"),
        plan: None,
        features: BoundedVec::new(vec![
            Feature {
                name: FeatureName::new("sso").expect("feature"),
                source: Source::Plan,
            },
            Feature {
                name: FeatureName::new("gpt4").expect("feature"),
                source: Source::Plan,
            },
        ])
        .expect("features"),
        limits: BoundedVec::new(vec![MeterLimit {
            meter: MeterName::new("api_calls").expect("meter"),
            included: big,
            granted: Decimal::ZERO,
            limit: big,
            used: Decimal::ZERO,
            enforcement,
            source: Source::Plan,
            period_start_ms: 0,
            period_end_ms: i64::MAX,
        }])
        .expect("limits"),
    }
}

/// A data dir whose store holds the sample catalog and a snapshot of 10,000 customers with a
/// limit on `api_calls` (soft or hard).
fn prepared(dir: &std::path::Path, names: &[String], enforcement: Enforcement) {
    std::fs::create_dir_all(dir).expect("dir");
    let store = Store::open(&dir.join("agent.redb"), Duration::from_secs(3600)).expect("store");
    let meters = tally_protocol::catalog::sample_meters().expect("meters");
    store
        .put_catalog(&Catalog {
            version: 1,
            meters: BoundedVec::new(meters).expect("catalog"),
        })
        .expect("catalog");
    store
        .put_entitlements(&EntitlementsCache {
            version: 1,
            built_at_ms: now_ms(),
            customers: names.iter().map(|n| customer(n, enforcement)).collect(),
        })
        .expect("snapshot");
}

/// Per-call ns of batches of 64 calls of `f(k)`, sweeping the customers on from `*k`.
fn timed(calls: u64, k: &mut usize, h: &mut Histogram<u64>, f: &impl Fn(usize)) -> Duration {
    let customers = *CUSTOMERS;
    let start = Instant::now();
    for _ in 0..calls / BATCH {
        let t = Instant::now();
        for _ in 0..BATCH {
            f(*k);
            *k += 1;
            if *k == customers {
                *k = 0;
            }
        }
        let _ = h.record((t.elapsed().as_nanos() as u64 / BATCH).max(1));
    }
    start.elapsed()
}

/// What one thread saw over the rounds of [`alternate`].
struct Seen {
    /// Per round: its time alone (every other round), and its time beside the other thread.
    alone: Vec<Option<Duration>>,
    beside: Vec<Duration>,
    h_alone: Histogram<u64>,
    h_beside: Histogram<u64>,
}

/// Two threads alternate, `rounds` times, a phase where one of them (in turn) makes `calls`
/// calls alone and a phase where both make `calls` at once. Each round's two phases are a few
/// milliseconds apart, so a neighbour's burst on the host, which on a shared VM moved one
/// thread's speed by up to 1.8× from one run to the next, reaches both sides of a ratio alike
/// instead of one run of one thread against a later run of two.
fn alternate<F>(rounds: usize, calls: u64, f: F) -> [Seen; 2]
where
    F: Fn(usize) + Send + Sync + Clone + 'static,
{
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let handles = [0, 1].map(|t| {
        let (call, barrier) = (f.clone(), barrier.clone());
        // `TALLY_BENCH_SPLIT=1`: thread t takes only the customers k ≡ t (mod 2), alone and
        // side by side, so no line one thread writes is written by the other and each sweeps
        // as many customers in both phases: the scaling with nothing shared, to compare with.
        let customers = *CUSTOMERS;
        let split = std::env::var_os("TALLY_BENCH_SPLIT").is_some();
        std::thread::spawn(move || {
            let new = || Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
            let mut seen = Seen {
                alone: Vec::with_capacity(rounds),
                beside: Vec::with_capacity(rounds),
                h_alone: new(),
                h_beside: new(),
            };
            for k in 0..customers {
                call(k);
            }
            let mut k = (t * 997) % customers;
            let f = |k: usize| {
                call(if split {
                    (k - k % 2 + t) % customers
                } else {
                    k
                })
            };
            for r in 0..rounds {
                barrier.wait();
                seen.alone
                    .push((r % 2 == t).then(|| timed(calls, &mut k, &mut seen.h_alone, &f)));
                barrier.wait();
                seen.beside
                    .push(timed(calls, &mut k, &mut seen.h_beside, &f));
            }
            seen
        })
    });
    handles.map(|h| h.join().expect("thread"))
}

fn report<F>(what: &str, calls: u64, f: F)
where
    F: Fn(usize) + Send + Sync + Clone + 'static,
{
    // `TALLY_BENCH_FIGURE=soft` runs only the figures whose name holds "soft" (for profiling).
    if std::env::var("TALLY_BENCH_FIGURE").is_ok_and(|only| !what.contains(only.as_str())) {
        return;
    }
    // `TALLY_BENCH_ROUNDS=N` (default 100): the alternations; each phase makes calls/N calls.
    let rounds: usize = std::env::var("TALLY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .max(1);
    // Whole batches, so the calls counted are the calls made.
    let per = (calls / rounds as u64 / BATCH).max(1) * BATCH;
    let [a, b] = alternate(rounds, per, f);
    // Per round: the lone thread's time, and the slower thread's time side by side.
    let alone: Vec<Duration> = (0..rounds)
        .map(|r| a.alone[r].or(b.alone[r]).expect("one thread alone"))
        .collect();
    let beside: Vec<Duration> = (0..rounds).map(|r| a.beside[r].max(b.beside[r])).collect();
    // A round's scaling: twice the calls in the slower thread's time against the calls in the
    // lone thread's time.
    let mut scalings: Vec<f64> = alone
        .iter()
        .zip(&beside)
        .map(|(one, two)| 2.0 * one.as_secs_f64() / two.as_secs_f64())
        .collect();
    let total_alone: Duration = alone.iter().sum();
    let total_beside: Duration = beside.iter().sum();
    let (mut h1, mut h2) = (a.h_alone, a.h_beside);
    h1.add(&b.h_alone).expect("merge");
    h2.add(&b.h_beside).expect("merge");
    let one = (per * rounds as u64) as f64 / total_alone.as_secs_f64();
    let two = (2 * per * rounds as u64) as f64 / total_beside.as_secs_f64();
    scalings.sort_by(f64::total_cmp);
    let q = |p: f64| scalings[((rounds - 1) as f64 * p).round() as usize];
    println!(
        "== {what} 1 thread: median {} ns, p99 {} ns, {:.1} M calls/s",
        h1.value_at_quantile(0.5),
        h1.value_at_quantile(0.99),
        one / 1e6
    );
    println!(
        "== {what} 2 threads: median {} ns, p99 {} ns, {:.1} M calls/s, scaling {:.2}x \
         (rounds of {per} calls: median {:.2}x, quartiles {:.2}–{:.2}x, over {rounds})",
        h2.value_at_quantile(0.5),
        h2.value_at_quantile(0.99),
        two / 1e6,
        two / one,
        q(0.5),
        q(0.25),
        q(0.75),
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_calls(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let names = names();
    prepared(dir.path(), &names, Enforcement::Soft);
    let agent = rt
        .block_on(
            Agent::builder()
                .data_dir(dir.path())
                .disk_budget(u64::MAX)
                .start(),
        )
        .expect("agent");
    assert!(agent.check(&names[0], "gpt4").allowed, "snapshot loaded");

    // An agent whose customers have a hard limit, each with a lease (as a collector grants).
    let hard_dir = tempfile::tempdir().expect("tempdir");
    prepared(hard_dir.path(), &names, Enforcement::Hard);
    let hard_agent = rt
        .block_on(
            Agent::builder()
                .data_dir(hard_dir.path())
                .disk_budget(u64::MAX)
                .start(),
        )
        .expect("agent");
    for (i, n) in names.iter().enumerate() {
        hard_agent.apply_lease_grant(&lease(i, n));
    }

    // A table with a hard limit per customer and a lease on each (as granted by a collector).
    let table = Arc::new(Table::new(EntitlementsConfig::default()));
    table.set_connected(true, now_ms());
    let hard: Vec<_> = names
        .iter()
        .map(|n| customer(n, Enforcement::Hard))
        .collect();
    table.apply(&hard, true, now_ms());
    for (i, n) in names.iter().enumerate() {
        table.on_grant(&lease(i, n), now_ms());
    }

    // What `Agent::try_consume` records through: the key resolved once per customer and meter
    // (a kept `Counter` is the same path).
    let counters: Arc<Vec<Counter>> = Arc::new(
        names
            .iter()
            .map(|n| agent.counter(n, "api_calls", &[]).expect("counter"))
            .collect(),
    );
    if !run("calls") {
        return;
    }
    if run("criterion") {
        criterion_calls(c, &agent, &hard_agent, &table, &names, &counters);
    }
    let calls = calls();
    let (a, n) = (agent.clone(), names.clone());
    report("check", calls, move |k| {
        black_box(a.check(&n[k], "gpt4"));
    });
    let (a, n) = (agent.clone(), names.clone());
    report("try_consume soft", calls, move |k| {
        let _ = black_box(a.try_consume(&n[k], "api_calls", Decimal::ONE));
    });
    let (a, n) = (hard_agent.clone(), names.clone());
    report("try_consume hard lease", calls, move |k| {
        let _ = black_box(a.try_consume(&n[k], "api_calls", Decimal::ONE));
    });
    // The table alone, recording through a kept `Counter` (the figure before decision 0112).
    let (n, t, cs) = (names.clone(), table.clone(), counters.clone());
    report("table try_consume hard lease + Counter", calls, move |k| {
        let c = &cs[k];
        let _ =
            black_box(t.try_consume(&n[k], "api_calls", Decimal::ONE, 0, |_| c.add(Decimal::ONE)));
    });
    rt.block_on(async {
        let _ = agent.shutdown(Duration::from_millis(200)).await;
        let _ = hard_agent.shutdown(Duration::from_millis(200)).await;
    });
}

/// A lease of 10⁹ on `api_calls` for customer `i`, open for the whole run.
fn lease(i: usize, name: &str) -> LeaseGrant {
    LeaseGrant {
        request_id: i as u64,
        customer: CustomerId::new(name).expect("customer"),
        meter: MeterName::new("api_calls").expect("meter"),
        lease_id: i as u64 + 1,
        period_start_ms: 0,
        granted_total: Decimal::from(1_000_000_000i64),
        added: Decimal::from(1_000_000_000i64),
        expires_at_ms: i64::MAX,
    }
}

fn criterion_calls(
    c: &mut Criterion,
    agent: &Agent,
    hard_agent: &Agent,
    table: &Arc<Table>,
    names: &[String],
    counters: &[Counter],
) {
    let mut g = c.benchmark_group("entitlements");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    g.bench_function("check_1_thread_10k_customers", |b| {
        let mut k = 0;
        b.iter(|| {
            let d = agent.check(&names[k], "gpt4");
            k = (k + 1) % *CUSTOMERS;
            black_box(d)
        })
    });
    g.bench_function("try_consume_soft_1_thread_10k_customers", |b| {
        let mut k = 0;
        b.iter(|| {
            let r = agent.try_consume(&names[k], "api_calls", Decimal::ONE);
            k = (k + 1) % *CUSTOMERS;
            black_box(r)
        })
    });
    g.bench_function("try_consume_hard_lease_1_thread_10k_customers", |b| {
        let mut k = 0;
        b.iter(|| {
            let r = hard_agent.try_consume(&names[k], "api_calls", Decimal::ONE);
            k = (k + 1) % *CUSTOMERS;
            black_box(r)
        })
    });
    g.bench_function("table_try_consume_hard_lease_1_thread_10k_customers", |b| {
        let mut k = 0;
        b.iter(|| {
            let n = &names[k];
            let c = &counters[k];
            let r = table.try_consume(n, "api_calls", Decimal::ONE, 0, |_| c.add(Decimal::ONE));
            k = (k + 1) % *CUSTOMERS;
            black_box(r)
        })
    });
    g.finish();
}

/// A keep-alive HTTP/1.1 connection.
struct Conn(BufReader<TcpStream>);

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Conn(BufReader::new(s))
    }

    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> u16 {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.0.get_mut();
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(body).await.expect("write");
        let mut line = String::new();
        self.0.read_line(&mut line).await.expect("status line");
        let status = line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.0.read_line(&mut line).await.expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut skip = vec![0; len];
        self.0.read_exact(&mut skip).await.expect("body");
        status
    }
}

/// `clients` keep-alive clients, `per_client` requests each; per-request µs.
async fn http_run(
    addr: SocketAddr,
    clients: usize,
    per_client: usize,
    consume: bool,
    names: Arc<Vec<String>>,
) -> (f64, Histogram<u64>) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let names = names.clone();
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("h");
                for i in 0..per_client {
                    let n = &names[(c * 7919 + i) % *CUSTOMERS];
                    let t = Instant::now();
                    let status = if consume {
                        conn.request(
                            "POST",
                            &format!("/v1/entitlements/{n}/api_calls/consume"),
                            br#"{"quantity":"1"}"#,
                        )
                        .await
                    } else {
                        conn.request("GET", &format!("/v1/entitlements/{n}/gpt4"), b"")
                            .await
                    };
                    assert_eq!(status, 200);
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
                h
            })
        })
        .collect();
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("h");
    for t in tasks {
        merged.add(t.await.expect("task")).expect("merge");
    }
    (
        (clients * per_client) as f64 / start.elapsed().as_secs_f64(),
        merged,
    )
}

fn bench_sidecar(_: &mut Criterion) {
    if !run("sidecar") {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let names = names();
    prepared(dir.path(), &names, Enforcement::Soft);
    rt.block_on(async {
        let agent = Agent::builder()
            .data_dir(dir.path())
            .disk_budget(u64::MAX)
            .start()
            .await
            .expect("agent");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(AgentBackend::new(agent.clone()), HttpConfig::default());
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        for (what, consume, clients, per) in [
            ("GET feature", false, 1, 20_000),
            ("GET feature", false, 8, 5_000),
            ("POST consume", true, 1, 2_000),
            ("POST consume", true, 8, 2_000),
        ] {
            let (rate, h) = http_run(addr, clients, per, consume, names.clone()).await;
            println!(
                "== sidecar {what}, {clients} keep-alive client(s): p50 {} µs, p99 {} µs, {:.0} req/s",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                rate
            );
        }
        let _ = agent.shutdown(Duration::from_secs(2)).await;
    });
}

criterion_group!(benches, bench_calls, bench_sidecar);
criterion_main!(benches);
