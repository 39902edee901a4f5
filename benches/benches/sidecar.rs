//! Sustained ingest through the sidecar's HTTP (SPEC §4): CloudEvents batches of 1 and of 100
//! events, posted by concurrent keep-alive clients to a real sidecar (axum on loopback) whose
//! agent records every event durably (group commit, fsync) and ships to an in-process collector
//! over QUIC. Reports events/s and request latency percentiles (hdrhistogram).
//!
//! `cargo bench -p tally-benches --bench sidecar` (set `TALLY_BENCH_SCALE=0.2` for a quick run).

use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tally_agent::Agent;
use tally_collector::{Collector, CollectorConfig};
use tally_sidecar::backend::AgentBackend;
use tally_sidecar::http::{HttpConfig, router};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CLIENTS: usize = 16;

fn scale() -> f64 {
    std::env::var("TALLY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// A keep-alive HTTP/1.1 connection that posts one body and reads the status.
struct Conn(BufReader<TcpStream>);

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Conn(BufReader::new(s))
    }

    async fn post(&mut self, body: &[u8]) -> u16 {
        let head = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: bench\r\nContent-Type: application/cloudevents-batch+json\r\nContent-Length: {}\r\n\r\n",
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

fn batch(client: usize, req: u64, events: usize) -> Vec<u8> {
    let items: Vec<String> = (0..events)
        .map(|e| {
            format!(
                r#"{{"specversion":"1.0","type":"llm_tokens","id":"{client}-{req}-{e}","source":"bench","subject":"customer-{}","data":{{"tokens":"{}.5","model":"m{}"}}}}"#,
                (req as usize * 7 + e) % 1000,
                e + 1,
                e % 3
            )
        })
        .collect();
    format!("[{}]", items.join(",")).into_bytes()
}

async fn run(addr: SocketAddr, events_per_request: usize, requests_per_client: u64) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            for r in 0..requests_per_client {
                let body = batch(
                    c,
                    r + events_per_request as u64 * 1_000_000,
                    events_per_request,
                );
                let t = Instant::now();
                assert_eq!(conn.post(&body).await, 204);
                h.record(t.elapsed().as_micros() as u64).expect("record");
            }
            h
        }));
    }
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        h.add(t.await.expect("client")).expect("merge");
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = CLIENTS as u64 * requests_per_client;
    let events = requests * events_per_request as u64;
    println!(
        "sidecar/batch_{events_per_request:<3} {CLIENTS} clients: {:>9.0} events/s {:>7.0} req/s | latency p50 {:>6.2} ms p99 {:>6.2} ms max {:>6.2} ms ({requests} requests)",
        events as f64 / secs,
        requests as f64 / secs,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this harness has no criterion groups.
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        tally_collector::init(&dir.path().join("collector"), &[]).expect("init");
        let collector = Collector::start(CollectorConfig::ephemeral(dir.path().join("collector")))
            .await
            .expect("collector");
        for m in tally_collector::catalog::sample_meters().expect("meters") {
            collector.shared().put_meter(&m).expect("meter");
        }
        let ca = std::fs::read(&collector.files().ca_pem).expect("ca");
        let agent = Agent::builder()
            .data_dir(dir.path().join("agent"))
            .collector(collector.quic_addr().to_string())
            .ca_pem(ca)
            .enroll_token(collector.enroll_token())
            .start()
            .await
            .expect("agent");
        while agent.catalog().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(AgentBackend::new(agent.clone()), HttpConfig::default());
        tokio::spawn(async move { axum_serve(listener, app).await });
        let n = |base: f64| ((base * scale()) as u64).max(1);
        run(addr, 1, n(2_000.0)).await; // warm-up
        run(addr, 1, n(4_000.0)).await;
        run(addr, 100, n(100.0)).await;
        agent.flush(Duration::from_secs(60)).await.expect("flush");
        agent
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
        collector.shutdown().await;
    });
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    axum::serve(listener, app).await.expect("serve");
}
