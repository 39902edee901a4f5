//! The process-level fault harness: real `tally-collector run` and `tally-agent run` (sidecar)
//! processes on 127.0.0.1, a UDP relay between them that drops, duplicates, reorders and delays
//! datagrams ([`proxy`]), SIGKILL of agents and of the collector at random moments, one
//! collector outage far longer than the flush interval, and two agents whose disk budget runs
//! out during it, one under `block` and one under `reject`. Clients post CloudEvents with
//! unique ids and retry every request that got no 204 (same ids) until it does. At the end the
//! collector's usage per customer must equal what was posted, exactly, `ledger verify` must
//! pass, and every agent's backlog must be empty.
//!
//! The process helpers (`Proc`, `ready_addrs`, `http`) are the collector tests' own
//! (`collector/tests/common`), included here rather than copied.

pub mod proxy;

#[path = "../../../collector/tests/common/mod.rs"]
pub(crate) mod common;

use anyhow::{Context, bail};
use common::{Proc, http, ready_addrs};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// Customers the clients post for.
const CUSTOMERS: u64 = 5;
/// Longest a request may take to get its 204, retries included.
const REQUEST_DEADLINE: Duration = Duration::from_secs(90);

/// The harness's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Seeds the kill schedule, the relay and the quantities.
    pub seed: u64,
    /// How long clients post and processes get killed.
    pub duration: Duration,
    /// The relay's fault rates.
    pub rates: proxy::Rates,
    /// The agents' flush interval, ms.
    pub flush_ms: u64,
    /// The long collector outage (at least many flush intervals).
    pub outage: Duration,
    /// Disk budget of the two budgeted agents, bytes.
    pub budget_bytes: u64,
    /// `tally-collector`.
    pub collector_bin: PathBuf,
    /// `tally-agent` (the sidecar).
    pub agent_bin: PathBuf,
}

/// What happened, for the report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests (of three events) answered 204.
    pub requests: u64,
    /// Events counted.
    pub events: u64,
    /// Agents SIGKILLed.
    pub agent_kills: u64,
    /// Collector SIGKILLs.
    pub collector_kills: u64,
    /// The long outage, ms.
    pub outage_ms: u64,
    /// Datagrams relayed, dropped, duplicated, held back.
    pub datagrams: (u64, u64, u64, u64),
    /// Answers other than 204 (429 from the `reject` agent, 5xx while restarting) and requests
    /// with no answer (a killed agent, `block` past the client's timeout), all retried.
    pub retried: u64,
    /// 429 answers of the `reject` agent (its budget ran out).
    pub rejected: u64,
    /// Whether the `block` agent reported `over_budget`.
    pub block_over_budget: bool,
    /// Longest a request to the `block` agent waited for its 204, ms (waiting for room).
    pub block_wait_ms_max: u64,
    /// Per customer: posted = counted.
    pub totals: BTreeMap<String, Decimal>,
}

/// Finds a workspace binary next to the running executable (`target/<profile>/` or its
/// `deps/`).
pub fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "{name} not found next to {}; build it first: cargo build -p tally-collector -p tally-sidecar (add --release for the release harness)",
        exe.display()
    )
}

pub(crate) fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

pub(crate) fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Collector {
    bin: PathBuf,
    dir: PathBuf,
    quic: SocketAddr,
    http: SocketAddr,
    proc: Option<Proc>,
}

impl Collector {
    async fn start(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(&self.bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--quic",
                &self.quic.to_string(),
                "--http",
                &self.http.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn tally-collector")?;
        let stdout = child.stdout.take().context("collector stdout")?;
        self.proc = Some(Proc(child));
        tokio::task::spawn_blocking(move || ready_addrs(stdout)).await?;
        Ok(())
    }

    fn kill9(&mut self) {
        self.proc = None; // `Proc` SIGKILLs on drop.
    }
}

struct Agent {
    bin: PathBuf,
    args: Vec<String>,
    http: SocketAddr,
    proc: Option<Proc>,
}

impl Agent {
    async fn start(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn tally-agent")?;
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if get(self.http, "/readyz")
                .await
                .is_some_and(|(s, _)| s == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent on {} never became ready", self.http);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        self.proc = None;
    }
}

/// One HTTP/1.1 request; `None` when the connection failed or no full answer came in time.
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    ct: &str,
    body: &[u8],
    timeout: Duration,
) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(body).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.get(9..12)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Some((status, body))
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    request(addr, "GET", path, "text/plain", b"", Duration::from_secs(5)).await
}

/// Request `r` of agent `a`: three events with ids unique to it; returns the body, the
/// customer and the total quantity.
fn events(a: usize, r: u64) -> (Vec<u8>, String, Decimal) {
    let customer = format!("cust-{}", (r + a as u64) % CUSTOMERS);
    let qs = [
        Decimal::new(r as i64 * 100 + 1, 2),
        Decimal::ONE,
        Decimal::new(5, 1),
    ];
    let evs: Vec<String> = qs
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                r#"{{"specversion":"1.0","type":"api_call","id":"a{a}-{r}-{i}","source":"harness","subject":"{customer}","data":{{"count":"{q}"}}}}"#
            )
        })
        .collect();
    (
        format!("[{}]", evs.join(",")).into_bytes(),
        customer,
        qs.iter().sum(),
    )
}

struct Shared {
    stop: AtomicBool,
    retried: AtomicU64,
    rejected: AtomicU64,
    block_over_budget: AtomicBool,
    block_wait_ms_max: AtomicU64,
    totals: Mutex<BTreeMap<String, Decimal>>,
    requests: AtomicU64,
}

/// Posts requests to agent `a` until told to stop; each until it is answered 204.
async fn client(a: usize, addr: SocketAddr, sh: Arc<Shared>) -> anyhow::Result<()> {
    let reject = a == 2;
    let ct = "application/cloudevents-batch+json";
    let mut r = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        let (body, customer, total) = events(a, r);
        let began = Instant::now();
        loop {
            match request(
                addr,
                "POST",
                "/api/v1/events",
                ct,
                &body,
                Duration::from_secs(30),
            )
            .await
            {
                Some((204, _)) => {
                    if a == 1 {
                        let ms = began.elapsed().as_millis() as u64;
                        sh.block_wait_ms_max.fetch_max(ms, Ordering::Relaxed);
                    }
                    break;
                }
                Some((429, _)) if reject => {
                    sh.rejected.fetch_add(1, Ordering::Relaxed);
                }
                Some((s, b)) if s < 500 && s != 429 => {
                    bail!("agent {a} request {r} answered {s}: {b}")
                }
                _ => {}
            }
            sh.retried.fetch_add(1, Ordering::Relaxed);
            if began.elapsed() > REQUEST_DEADLINE {
                bail!("agent {a} request {r} got no 204 in {REQUEST_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        *sh.totals.lock().await.entry(customer).or_default() += total;
        sh.requests.fetch_add(1, Ordering::Relaxed);
        r += 1;
    }
    Ok(())
}

/// Runs the harness once.
pub async fn run(cfg: &Config) -> anyhow::Result<Report> {
    let tmp = tempfile::tempdir()?;
    let cdir = tmp.path().join("collector");
    let out = Command::new(&cfg.collector_bin)
        .arg("init")
        .arg("--data-dir")
        .arg(&cdir)
        .stdout(Stdio::null())
        .output()
        .context("tally-collector init")?;
    if !out.status.success() {
        bail!(
            "tally-collector init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut collector = Collector {
        bin: cfg.collector_bin.clone(),
        dir: cdir.clone(),
        quic: free_udp_port()?,
        http: free_tcp_port()?,
        proc: None,
    };
    collector.start().await?;
    let admin = std::fs::read_to_string(cdir.join("admin-token"))?
        .trim()
        .to_owned();
    let meter = r#"{"aggregation":"sum","event_type":"api_call","value_property":"$.count"}"#;
    let (s, b) = http(
        collector.http,
        "PUT",
        "/v1/meters/api_calls",
        Some(&admin),
        Some(meter),
    )
    .await;
    if s != 200 {
        bail!("put meter: {s} {b}");
    }
    let (relay, stats) = proxy::start(collector.quic, cfg.rates, cfg.seed).await?;

    // Agent 0 without a budget, agent 1 `block`, agent 2 `reject`.
    let mut agents = Vec::new();
    for (i, policy) in [None, Some("block"), Some("reject")]
        .into_iter()
        .enumerate()
    {
        let http_addr = free_tcp_port()?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--data-dir".into(),
            tmp.path().join(format!("agent{i}")).display().to_string(),
            "--collector".into(),
            relay.to_string(),
            "--ca".into(),
            cdir.join("ca.pem").display().to_string(),
            "--enroll-token-file".into(),
            cdir.join("enroll-token").display().to_string(),
            "--http".into(),
            http_addr.to_string(),
            "--flush-interval-ms".into(),
            cfg.flush_ms.to_string(),
        ];
        if let Some(p) = policy {
            args.extend([
                "--disk-budget".into(),
                cfg.budget_bytes.to_string(),
                "--overflow".into(),
                p.into(),
            ]);
        }
        let mut a = Agent {
            bin: cfg.agent_bin.clone(),
            args,
            http: http_addr,
            proc: None,
        };
        a.start().await?;
        agents.push(a);
    }

    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        retried: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        block_over_budget: AtomicBool::new(false),
        block_wait_ms_max: AtomicU64::new(0),
        totals: Mutex::new(BTreeMap::new()),
        requests: AtomicU64::new(0),
    });
    let mut clients = tokio::task::JoinSet::new();
    for (i, a) in agents.iter().enumerate() {
        clients.spawn(client(i, a.http, sh.clone()));
    }
    // Watches the `block` agent's budget.
    let watch = {
        let (sh, addr) = (sh.clone(), agents[1].http);
        tokio::spawn(async move {
            while !sh.stop.load(Ordering::Relaxed) {
                if let Some((200, b)) = get(addr, "/v1/status").await
                    && b.contains(r#""over_budget":true"#)
                {
                    sh.block_over_budget.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The kills.
    let mut rng = crate::sim::rng::Rng::new(cfg.seed);
    let mut report = Report::default();
    let began = Instant::now();
    let outage_at = cfg.duration / 3;
    let mut outage_done = false;
    while began.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(rng.range(150, 700) as u64)).await;
        if !outage_done && began.elapsed() >= outage_at {
            outage_done = true;
            collector.kill9();
            report.collector_kills += 1;
            tokio::time::sleep(cfg.outage).await;
            report.outage_ms = cfg.outage.as_millis() as u64;
            collector.start().await?;
            continue;
        }
        if rng.below(4) == 0 {
            collector.kill9();
            report.collector_kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.range(50, 500) as u64)).await;
            collector.start().await?;
        } else {
            let i = rng.below(agents.len() as u64) as usize;
            agents[i].kill9();
            report.agent_kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.range(20, 300) as u64)).await;
            agents[i].start().await?;
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    while let Some(r) = clients.join_next().await {
        r??;
    }
    watch.await?;

    // Drain: flush every agent, then wait for exact totals and empty backlogs.
    let totals = sh.totals.lock().await.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ok = true;
        for a in &agents {
            let _ = request(
                a.http,
                "POST",
                "/v1/flush",
                "application/json",
                b"",
                Duration::from_secs(10),
            )
            .await;
            match get(a.http, "/v1/status").await {
                Some((200, b))
                    if b.contains(r#""backlog_batches":0"#)
                        && b.contains(r#""durable_log_events":0"#) => {}
                _ => ok = false,
            }
        }
        let mut counted = BTreeMap::new();
        for c in 0..CUSTOMERS {
            let customer = format!("cust-{c}");
            let (s, v) = http(
                collector.http,
                "GET",
                &format!("/v1/usage?customer={customer}&meter=api_calls"),
                Some(&admin),
                None,
            )
            .await;
            let q = serde_json::from_str::<serde_json::Value>(&v)
                .ok()
                .and_then(|j| {
                    j["quantity"]
                        .as_str()
                        .and_then(|q| q.parse::<Decimal>().ok())
                })
                .unwrap_or_default();
            if s == 200 && !q.is_zero() {
                counted.insert(customer, q);
            }
        }
        if ok && counted == totals {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not exact after draining: posted {totals:?}, counted {counted:?}, backlogs drained: {ok}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, v) = http(
        collector.http,
        "GET",
        "/v1/ledger/verify",
        Some(&admin),
        None,
    )
    .await;
    if s != 200 || !v.contains(r#""ok":true"#) {
        bail!("ledger verify: {s} {v}");
    }
    report.requests = sh.requests.load(Ordering::Relaxed);
    report.events = report.requests * 3;
    report.retried = sh.retried.load(Ordering::Relaxed);
    report.rejected = sh.rejected.load(Ordering::Relaxed);
    report.block_over_budget = sh.block_over_budget.load(Ordering::Relaxed);
    report.block_wait_ms_max = sh.block_wait_ms_max.load(Ordering::Relaxed);
    report.datagrams = (
        stats.datagrams.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
        stats.duplicated.load(Ordering::Relaxed),
        stats.reordered.load(Ordering::Relaxed),
    );
    report.totals = totals;
    Ok(report)
}
