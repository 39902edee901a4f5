//! Collector ingest (SPEC §9): deltas/s verified, deduped and durably committed, with batches of
//! 1,000 and of 10 deltas, and commit latency percentiles (hdrhistogram).
//!
//! Three ways in, each against a fresh redb store in a temporary directory (fsync on):
//! - `direct`: verify, then one `Store::ingest` transaction per batch, one after the other;
//! - `group`: verify on producer tasks (as connections do), then the collector's group
//!   committer (`tally_collector::ingest`), with `PRODUCERS` producers of 32 in flight each;
//! - `quic`: an in-process collector and `PRODUCERS` protocol clients over loopback QUIC, each
//!   pipelining 32 batches, timing send → ack.
//!
//! `cargo bench -p tally-benches --bench collector` (set `TALLY_BENCH_SCALE=0.2` for a quick run;
//! `TALLY_BENCH_STRIPE=1` to give every meter a Stripe event name, so commits write the outbox).

use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_collector::ingest::{GroupLimits, IngestRequest};
use tally_collector::metrics::Metrics;
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{IngestBatch, IngestOutcome, Store};
use tally_collector::testkit::TestClient;
use tally_collector::{Collector, CollectorConfig};
use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::frame::{AckOutcome, Frame};
use tally_protocol::names::{CustomerId, Dimensions, MeterName};
use tokio::sync::{Semaphore, oneshot};

/// Seal time of every batch; also the collector's clock where the bench passes one (a seal more
/// than an hour ahead of the clock is refused).
const T0_MS: i64 = 1_763_000_000_000;
const PRODUCERS: usize = 4;
const IN_FLIGHT: usize = 32;
const METERS: [&str; 4] = ["api_calls", "tokens", "storage", "requests"];

fn meter(name: &str) -> MeterDef {
    MeterDef {
        name: MeterName::new(name).expect("meter"),
        aggregation: Aggregation::Sum,
        event_type: name.to_owned(),
        value_property: Some(String::from("$.v")),
        group_by: BoundedVec::default(),
        // `TALLY_BENCH_STRIPE=1`: every meter forwards to Stripe, so each ledger transaction
        // also writes outbox rows and unit carries.
        stripe_event_name: std::env::var_os("TALLY_BENCH_STRIPE").map(|_| name.to_owned()),
        stripe_unit_scale: Decimal::ONE,
    }
}

/// `n` signed batches of `per_batch` deltas from agent `key`, over 2,000 customers, 4 meters
/// and 3 dimension sets (24,000 possible usage accounts).
fn batches(key: &SigningKey, epoch: u64, n: usize, per_batch: usize) -> Vec<SignedBatch> {
    let agent = AgentId::from_public_key(&key.verifying_key());
    let dims = [
        Dimensions::default(),
        Dimensions::from_strs([("model", "small")]).expect("dims"),
        Dimensions::from_strs([("model", "large"), ("region", "eu")]).expect("dims"),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ epoch;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t0 = T0_MS;
    (0..n)
        .map(|i| {
            let deltas: Vec<Delta> = (0..per_batch)
                .map(|_| {
                    let r = next();
                    let mut d = Delta::single(
                        CustomerId::new(format!("customer-{}", r % 2000)).expect("customer"),
                        MeterName::new(METERS[(r >> 16) as usize % 4]).expect("meter"),
                        dims[(r >> 24) as usize % 3].clone(),
                        t0 + (i as i64 % 60) * 60_000,
                        Decimal::new((r >> 32) as i64 % 100_000, 2),
                    );
                    d.count = 1 + (r >> 40) % 9;
                    d
                })
                .collect();
            let body = BatchBody::new(agent, epoch, i as u64 + 1, t0, deltas).expect("body");
            SignedBatch::seal(&body, key).expect("seal")
        })
        .collect()
}

fn store(dir: &std::path::Path) -> RedbStore {
    let s = RedbStore::open(&dir.join("bench.redb")).expect("store");
    for m in METERS {
        s.put_meter(&meter(m)).expect("meter");
    }
    s
}

struct Report {
    name: String,
    deltas: u64,
    batches: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    latency_label: &'static str,
}

impl Report {
    fn print(&self) {
        let s = self.elapsed.as_secs_f64();
        let q = |p| self.latency_us.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{:<34} {:>10.0} deltas/s {:>8.0} batches/s   {} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms   ({} batches in {:.2} s)",
            self.name,
            self.deltas as f64 / s,
            self.batches as f64 / s,
            self.latency_label,
            q(0.5),
            q(0.99),
            self.latency_us.max() as f64 / 1000.0,
            self.batches,
            s,
        );
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// Verify, then one durable transaction per batch.
fn direct(per_batch: usize, n: usize) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let key = SigningKey::from_bytes(&[1; 32]);
    let input = batches(&key, 1, n, per_batch);
    let vk = key.verifying_key();
    let mut lat = hist();
    let start = Instant::now();
    for signed in input {
        let t = Instant::now();
        let body = signed.verify(&vk).expect("verify");
        let out = s
            .ingest(&[IngestBatch { body, signed }], T0_MS)
            .expect("ingest");
        assert_eq!(out, vec![IngestOutcome::Ack(AckOutcome::Committed)]);
        let _ = lat.record(t.elapsed().as_micros() as u64);
    }
    let elapsed = start.elapsed();
    assert!(s.verify().expect("verify").ok);
    Report {
        name: format!("direct   batches of {per_batch:>5}"),
        deltas: (n * per_batch) as u64,
        batches: n as u64,
        elapsed,
        latency_us: lat,
        latency_label: "commit",
    }
}

/// Where the time goes, per 1,000-delta batch: signature + decode, the ledger rules in memory,
/// and the store transaction (with and without the rules' share).
fn breakdown(per_batch: usize, n: usize) {
    let key = SigningKey::from_bytes(&[2; 32]);
    let input = batches(&key, 1, n, per_batch);
    let vk = key.verifying_key();
    let t = Instant::now();
    let bodies: Vec<BatchBody> = input
        .iter()
        .map(|b| b.verify(&vk).expect("verify"))
        .collect();
    let verify = t.elapsed();
    let catalog = tally_protocol::catalog::Catalog {
        version: 1,
        meters: BoundedVec::new(METERS.iter().map(|m| meter(m)).collect()).expect("meters"),
    };
    let mut ws = tally_collector::core::ledger::WorkingSet::new();
    let mut base = tally_collector::core::ledger::NoAccounts;
    let t = Instant::now();
    for b in &bodies {
        let p = tally_collector::core::ledger::post_batch(&mut ws, &mut base, &catalog, b, T0_MS)
            .expect("infallible")
            .expect("postable");
        std::hint::black_box(p);
    }
    let post = t.elapsed();
    // The committer alone: pre-verified batches, 100 per transaction (the default group limit of
    // 100,000 deltas).
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let items: Vec<IngestBatch> = input
        .into_iter()
        .zip(bodies)
        .map(|(signed, body)| IngestBatch { body, signed })
        .collect();
    let t = Instant::now();
    for group in items.chunks(100) {
        s.ingest(group, T0_MS).expect("ingest");
    }
    let commit = t.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
    println!(
        "breakdown batches of {per_batch}: verify+decode {:.3} ms/batch, ledger rules in memory {:.3} ms/batch ({} accounts), store.ingest in groups of 100 {:.3} ms/batch (rules included) = {:.0} deltas/s for the committer alone",
        per(verify),
        per(post),
        ws.accounts.len(),
        per(commit),
        (n * per_batch) as f64 / commit.as_secs_f64()
    );
}

/// Verify on producers, group commit in the collector's committer.
async fn group(per_batch: usize, n: usize) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    let s: Arc<dyn Store> = Arc::new(store(dir.path()));
    let metrics = Arc::new(Metrics::new());
    let (tx, thread) = tally_collector::ingest::spawn(
        s.clone(),
        metrics,
        GroupLimits::default(),
        std::sync::Arc::new(tally_collector::tally_clock::SystemClock),
    )
    .expect("spawn");
    let per_producer = n / PRODUCERS;
    let inputs: Vec<(SigningKey, Vec<SignedBatch>)> = (0..PRODUCERS)
        .map(|p| {
            let key = SigningKey::from_bytes(&[p as u8 + 10; 32]);
            let b = batches(&key, 1, per_producer, per_batch);
            (key, b)
        })
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (key, input) in inputs {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let vk = key.verifying_key();
            let window = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut waits = Vec::with_capacity(input.len());
            for signed in input {
                let permit = window.clone().acquire_owned().await.expect("permit");
                let t = Instant::now();
                let body = signed.verify(&vk).expect("verify");
                let (reply, rx) = oneshot::channel();
                tx.send(IngestRequest {
                    batch: IngestBatch { body, signed },
                    reply,
                })
                .await
                .expect("send");
                waits.push(tokio::spawn(async move {
                    let out = rx.await.expect("reply").expect("committed");
                    assert_eq!(out, IngestOutcome::Ack(AckOutcome::Committed));
                    drop(permit);
                    t.elapsed().as_micros() as u64
                }));
            }
            let mut lat = Vec::with_capacity(waits.len());
            for w in waits {
                lat.push(w.await.expect("join"));
            }
            lat
        }));
    }
    let mut lat = hist();
    for t in tasks {
        for us in t.await.expect("join") {
            let _ = lat.record(us);
        }
    }
    let elapsed = start.elapsed();
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    assert!(s.verify().expect("verify").ok);
    Report {
        name: format!("group    batches of {per_batch:>5}"),
        deltas: (per_producer * PRODUCERS * per_batch) as u64,
        batches: (per_producer * PRODUCERS) as u64,
        elapsed,
        latency_us: lat,
        latency_label: "enqueue→durable",
    }
}

/// Through QUIC: handshake, signature verification, dedup, ledger, ack.
async fn quic(per_batch: usize, n: usize) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    tally_collector::init(dir.path(), &[]).expect("init");
    let handle = Collector::start(CollectorConfig::ephemeral(dir.path()))
        .await
        .expect("start");
    for m in METERS {
        handle.shared().put_meter(&meter(m)).expect("meter");
    }
    let ca = std::fs::read(&handle.files().ca_pem).expect("ca");
    let per_producer = n / PRODUCERS;
    let mut clients = Vec::new();
    for p in 0..PRODUCERS {
        let key = SigningKey::from_bytes(&[p as u8 + 20; 32]);
        let input = batches(&key, 1, per_producer, per_batch);
        let c = TestClient::connect(handle.quic_addr(), &ca, &key, Some(handle.enroll_token()))
            .await
            .expect("connect");
        clients.push((c, input));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut c, input) in clients {
        tasks.push(tokio::spawn(async move {
            let mut sent_at = std::collections::VecDeque::new();
            let mut lat = Vec::with_capacity(input.len());
            let total = input.len();
            let mut it = input.into_iter();
            while lat.len() < total {
                while sent_at.len() < IN_FLIGHT {
                    let Some(b) = it.next() else { break };
                    sent_at.push_back(Instant::now());
                    c.send(&Frame::Batch(b)).await.expect("send");
                }
                match c.next_reply().await.expect("reply") {
                    Frame::Ack(a) => {
                        assert_eq!(a.outcome, AckOutcome::Committed);
                        let t = sent_at.pop_front().expect("in flight");
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            lat
        }));
    }
    let mut lat = hist();
    for t in tasks {
        for us in t.await.expect("join") {
            let _ = lat.record(us);
        }
    }
    let elapsed = start.elapsed();
    assert!(handle.shared().verify().expect("verify").ok);
    handle.shutdown().await;
    Report {
        name: format!("quic     batches of {per_batch:>5}"),
        deltas: (per_producer * PRODUCERS * per_batch) as u64,
        batches: (per_producer * PRODUCERS) as u64,
        elapsed,
        latency_us: lat,
        latency_label: "send→ack",
    }
}

/// Through QUIC at a fixed rate (about half the measured maximum): the commit latency an agent
/// sees when the collector is not saturated.
async fn quic_paced(per_batch: usize, batches_per_s: u64, n: usize) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    tally_collector::init(dir.path(), &[]).expect("init");
    let handle = Collector::start(CollectorConfig::ephemeral(dir.path()))
        .await
        .expect("start");
    for m in METERS {
        handle.shared().put_meter(&meter(m)).expect("meter");
    }
    let ca = std::fs::read(&handle.files().ca_pem).expect("ca");
    let key = SigningKey::from_bytes(&[40; 32]);
    let input = batches(&key, 1, n, per_batch);
    let c = TestClient::connect(handle.quic_addr(), &ca, &key, Some(handle.enroll_token()))
        .await
        .expect("connect");
    let TestClient {
        endpoint: _endpoint,
        conn: _conn,
        mut send,
        mut recv,
        welcome,
    } = c;
    // As an agent does: never more unacknowledged batches than the collector's window (past it
    // the collector closes the connection as overloaded), so when the collector is slower than
    // the pace the sender waits (the run takes longer; send→ack is timed from the send).
    let window = Arc::new(tokio::sync::Semaphore::new(
        welcome.max_in_flight.max(1) as usize
    ));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now();
    let w = window.clone();
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / batches_per_s));
        for b in input {
            tick.tick().await;
            w.acquire().await.expect("window").forget();
            let bytes = tally_protocol::frame::encode_frame(&Frame::Batch(b)).expect("encode");
            let _ = tx.send(Instant::now());
            send.write_all(&bytes).await.expect("send");
        }
        send
    });
    let mut lat = hist();
    let mut acked = 0;
    while acked < n {
        // `recv` is the client's cancel-safe frame reader.
        let Ok(f) = recv.next().await else {
            break;
        };
        if let Frame::Ack(a) = f {
            assert_eq!(a.outcome, AckOutcome::Committed);
            let t = rx.recv().await.expect("sent");
            let _ = lat.record(t.elapsed().as_micros() as u64);
            acked += 1;
            window.add_permits(1);
        }
    }
    let elapsed = start.elapsed();
    let _send = sender.await.expect("join");
    handle.shutdown().await;
    Report {
        name: format!("quic     batches of {per_batch:>5} at {batches_per_s}/s"),
        deltas: (n * per_batch) as u64,
        batches: n as u64,
        elapsed,
        latency_us: lat,
        latency_label: "send→ack",
    }
}

fn main() {
    let scale: f64 = std::env::var("TALLY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = |base: usize| ((base as f64 * scale) as usize).max(PRODUCERS * 2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "collector ingest, redb with fsync, 2 worker threads; targets: >= 200,000 deltas/s (1,000-delta batches), >= 2,000 batches/s (10-delta batches)"
    );
    breakdown(1000, n(100));
    direct(1000, n(100)).print();
    direct(10, n(1000)).print();
    rt.block_on(async {
        group(1000, n(400)).await.print();
        group(10, n(20_000)).await.print();
        quic(1000, n(400)).await.print();
        quic(10, n(20_000)).await.print();
        quic_paced(1000, 100, n(300)).await.print();
        quic_paced(10, 1000, n(3000)).await.print();
    });
}
