//! The load generator (`cargo run --release -p tally-benches --bin load -- …`, SPEC §9): a real
//! `tally-collector run` process, in-process agents driven by recording threads, `tally-agent
//! run` sidecar processes driven by keep-alive HTTP clients, an in-process Stripe-compatible
//! server when forwarding is on, and — in the same run, over the same events — the design a
//! team would build itself: one PostgreSQL row per event ([`baseline`]).
//!
//! Latency is measured with probes: every 5 ms each agent records one unit for its own probe
//! customer and notes when; a poller reads the ledger's total for that customer every 2 ms,
//! and when the total reaches k, probe k was committed (record → ledger committed); a second
//! poller does the same on the Stripe-compatible server (ledger → Stripe). The pollers' period
//! bounds the error (≤ 2 ms and ≤ 5 ms). At the end of each phase every agent is flushed and
//! the ledger's total for every customer and meter must equal the events sent, exactly.

pub mod baseline;
pub mod memory;
pub mod procstat;
pub mod workload;

use crate::harness::common::{Proc, http, ready_addrs};
use crate::harness::{free_tcp_port, free_udp_port};
use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_agent::Agent;
use workload::{Names, Totals, Workload};

/// Streams of the sidecar clients start here (in-process threads use 0.., sweeps 1,000..).
const SIDECAR_STREAMS: u64 = 1_000_000;
/// Probe period per agent.
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Ledger poll period.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Stripe units per unit of usage (quantities have two decimal places).
const STRIPE_SCALE: u64 = 100;

/// A load run's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `tally-collector`.
    pub collector_bin: PathBuf,
    /// `tally-agent` (the sidecar).
    pub agent_bin: PathBuf,
    /// Customers, meters, dimensions.
    pub workload: Workload,
    /// In-process agents.
    pub agents: usize,
    /// Recording threads, spread over the in-process agents.
    pub threads: usize,
    /// Sidecar processes.
    pub sidecars: usize,
    /// HTTP clients over the sidecars; also the baseline's workers (one connection each).
    pub clients: usize,
    /// Offered events/s of the in-process phase; 0 = as fast as the threads go.
    pub rate: u64,
    /// Length of each phase.
    pub duration: Duration,
    /// Agents' flush interval.
    pub flush: Duration,
    /// Events per HTTP request and per baseline transaction, one phase each.
    pub batches: Vec<usize>,
    /// Every meter forwards to the in-process Stripe-compatible server.
    pub stripe: bool,
    /// The baseline's PostgreSQL; `None` skips it.
    pub postgres_url: Option<String>,
    /// Latency against offered load: fractions of the in-process phase's rate.
    pub sweep: Vec<f64>,
    /// Length of each sweep point.
    pub sweep_duration: Duration,
    /// The collector's log (`RUST_LOG=info`) goes here; `None` discards it.
    pub collector_log: Option<PathBuf>,
}

/// Percentiles, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pct {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Pct {
    fn of_us(h: &Histogram<u64>) -> Pct {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Pct {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1e3,
        }
    }
}

/// CPU and memory of one process over a phase.
#[derive(Debug, Clone, Serialize)]
pub struct ProcUse {
    /// Which process.
    pub name: String,
    /// % of one core.
    pub cpu_percent: f64,
    /// Resident memory at the end, peak.
    pub memory: procstat::Memory,
}

/// The in-process phase (and each sweep point).
#[derive(Debug, Clone, Serialize)]
pub struct InProcess {
    /// Offered events/s (0 = unpaced).
    pub offered_per_s: u64,
    /// Events recorded (probes not counted).
    pub events: u64,
    /// Recording time, s.
    pub record_seconds: f64,
    /// Events/s recorded.
    pub record_per_s: f64,
    /// From the first record to every agent's flush acknowledged (so the ledger holds all), s.
    pub to_ledger_seconds: f64,
    /// `events / to_ledger_seconds`: record → exact ledger totals.
    pub to_ledger_per_s: f64,
    /// Probe latency record → ledger committed.
    pub record_to_ledger_ms: Pct,
    /// Probe latency ledger → Stripe-compatible server (forwarding on).
    pub ledger_to_stripe_ms: Option<Pct>,
    /// Processes' CPU and memory over the phase.
    pub processes: Vec<ProcUse>,
}

/// One sidecar phase.
#[derive(Debug, Clone, Serialize)]
pub struct SidecarRun {
    /// Events per request.
    pub batch: usize,
    /// Concurrent keep-alive clients.
    pub clients: usize,
    /// Events answered 204 (durable on the agent's disk).
    pub events: u64,
    /// Events/s.
    pub events_per_s: f64,
    /// Request latency.
    pub request_ms: Pct,
    /// Processes' CPU and memory over the phase.
    pub processes: Vec<ProcUse>,
}

/// One of the issue's ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// What against what.
    pub name: String,
    /// Ours, events/s.
    pub ours: f64,
    /// Baseline, events/s.
    pub baseline: f64,
    /// ours ÷ baseline.
    pub ratio: f64,
    /// The issue's goal.
    pub goal: f64,
}

/// The machine the figures came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores.
    pub cores: usize,
    /// `/proc/loadavg` at the start.
    pub load_average: String,
    /// `fdatasync` of an appended 200-byte record in the run's directory, µs: p50, p99.
    pub fdatasync_us: [u64; 2],
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The workload.
    pub workload: Workload,
    /// Forwarding to the Stripe-compatible server was on.
    pub stripe: bool,
    /// Flush interval, ms.
    pub flush_ms: u64,
    /// The in-process phase.
    pub in_process: InProcess,
    /// Latency against offered load.
    pub sweep: Vec<InProcess>,
    /// The sidecar phases.
    pub sidecar: Vec<SidecarRun>,
    /// The PostgreSQL row-per-event baseline.
    pub baseline: Vec<baseline::BaselineRun>,
    /// Ours against the baseline.
    pub ratios: Vec<Ratio>,
    /// Ledger totals equal the events sent, for every customer and meter, after every phase.
    pub ledger_exact: bool,
    /// The Stripe-compatible server's totals equal the ledger's × scale (forwarding on).
    pub stripe_exact: Option<bool>,
    /// From the last flush until Stripe's totals matched, s.
    pub stripe_drain_seconds: Option<f64>,
}

/// A `tally-collector` process started by [`start_collector`].
pub(crate) struct Running {
    /// The process (SIGKILLed when dropped).
    pub proc: Proc,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Its admin API.
    pub admin: SocketAddr,
    /// The admin token `init` wrote.
    pub token: String,
}

/// `tally-collector init` in `dir`, then `run` on free loopback ports with what `configure`
/// adds (flags, variables, where its log goes); returns once it printed its addresses.
pub(crate) async fn start_collector(
    bin: &Path,
    dir: &Path,
    configure: impl FnOnce(&mut Command) -> anyhow::Result<()>,
) -> anyhow::Result<Running> {
    let out = Command::new(bin)
        .arg("init")
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .output()
        .context("tally-collector init")?;
    if !out.status.success() {
        bail!("init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (quic, admin) = (free_udp_port()?, free_tcp_port()?);
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--data-dir")
        .arg(dir)
        .args(["--quic", &quic.to_string(), "--http", &admin.to_string()])
        .args(["--max-handshakes-per-s", "100000"])
        .stdout(Stdio::piped());
    configure(&mut cmd)?;
    let mut child = cmd.spawn().context("spawn tally-collector")?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    tokio::task::spawn_blocking(move || ready_addrs(stdout)).await?;
    let token = std::fs::read_to_string(dir.join("admin-token"))?
        .trim()
        .to_owned();
    Ok(Running {
        proc,
        quic,
        admin,
        token,
    })
}

/// `PUT /v1/meters/{name}` with `body`.
pub(crate) async fn put_meter(
    admin: SocketAddr,
    token: &str,
    name: &str,
    body: &str,
) -> anyhow::Result<()> {
    let (s, b) = http(
        admin,
        "PUT",
        &format!("/v1/meters/{name}"),
        Some(token),
        Some(body),
    )
    .await;
    if s != 200 {
        bail!("PUT meter {name}: {s} {b}");
    }
    Ok(())
}

/// A running collector and what talking to it takes.
struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    collector: Proc,
    quic: SocketAddr,
    admin: SocketAddr,
    token: String,
    ca: Vec<u8>,
    stripe: Option<tally_forward::stripe::test_server::FakeStripe>,
    names: Arc<Names>,
    w: Workload,
}

impl Rig {
    async fn start(cfg: &Config) -> anyhow::Result<Rig> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_path_buf();
        let cdir = root.join("collector");
        let stripe = if cfg.stripe {
            Some(tally_forward::stripe::test_server::FakeStripe::start().await?)
        } else {
            None
        };
        let stripe_url = stripe.as_ref().map(|s| s.url());
        let running = start_collector(&cfg.collector_bin, &cdir, |cmd| {
            match &cfg.collector_log {
                Some(p) => cmd
                    .env("RUST_LOG", "info")
                    .stderr(std::fs::File::create(p)?),
                None => cmd.env("RUST_LOG", "warn").stderr(Stdio::null()),
            };
            if let Some(url) = &stripe_url {
                // v2 meter event streams (100 events a request), the high-volume path SPEC §9's
                // forwarder target is about; v1 sends one event a request.
                cmd.args(["--stripe-base-url", url, "--stripe-rate", "10000"])
                    .args(["--stripe-api", "v2"])
                    .env("STRIPE_API_KEY", "sk_test_load");
            }
            Ok(())
        })
        .await?;
        let Running {
            proc: collector,
            quic,
            admin,
            token,
        } = running;
        let ca = std::fs::read(cdir.join("ca.pem"))?;
        let names = Arc::new(cfg.workload.names());
        for m in &names.meters {
            let fwd = if cfg.stripe {
                format!(r#","stripe_event_name":"{m}","stripe_unit_scale":"{STRIPE_SCALE}""#)
            } else {
                String::new()
            };
            let body = format!(
                r#"{{"aggregation":"sum","event_type":"{m}","value_property":"$.value","group_by":{{"model":"$.model"}}{fwd}}}"#
            );
            put_meter(admin, &token, m, &body).await?;
        }
        Ok(Rig {
            _dir: dir,
            root,
            collector,
            quic,
            admin,
            token,
            ca,
            stripe,
            names,
            w: cfg.workload,
        })
    }

    fn collector_pid(&self) -> String {
        self.collector.0.id().to_string()
    }

    /// The ledger's usage of `customer` per meter (all periods).
    async fn usage(&self, customer: &str) -> anyhow::Result<BTreeMap<String, Decimal>> {
        let (s, b) = http(
            self.admin,
            "GET",
            &format!("/v1/customers/{customer}/usage"),
            Some(&self.token),
            None,
        )
        .await;
        if s != 200 {
            bail!("usage of {customer}: {s} {b}");
        }
        let v: serde_json::Value = serde_json::from_str(&b)?;
        let mut out = BTreeMap::new();
        for u in v["data"].as_array().into_iter().flatten() {
            let (Some(m), Some(q)) = (u["meter"].as_str(), u["quantity"].as_str()) else {
                continue;
            };
            *out.entry(m.to_owned()).or_default() += Decimal::from_str(q)?;
        }
        Ok(out)
    }

    /// Whether the ledger holds exactly `expected` for every customer and meter of the workload.
    async fn ledger_equals(&self, expected: &Totals) -> anyhow::Result<bool> {
        for c in 0..self.w.customers {
            let got = self.usage(&workload::customer_name(c)).await?;
            for (mi, m) in self.names.meters.iter().enumerate() {
                let want = expected.get(&(c, mi as u32)).copied().unwrap_or_default();
                if got.get(m).copied().unwrap_or_default() != want {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Whether Stripe's totals equal the ledger's × scale for every customer and meter.
    async fn stripe_equals(&self, expected: &Totals) -> bool {
        let Some(s) = &self.stripe else { return true };
        let got = s.totals();
        expected.iter().all(|(&(c, m), q)| {
            let key = (
                workload::customer_name(c),
                self.names.meters[m as usize].clone(),
            );
            let want = (q * Decimal::from(STRIPE_SCALE)).trunc();
            Decimal::from(got.get(&key).copied().unwrap_or(0)) == want
        })
    }

    async fn agent(&self, i: usize, flush: Duration) -> anyhow::Result<Agent> {
        let token = std::fs::read_to_string(self.root.join("collector/enroll-token"))?;
        let a = Agent::builder()
            .data_dir(self.root.join(format!("agent-{i}")))
            .collector(self.quic.to_string())
            .ca_pem(self.ca.clone())
            .enroll_token(token.trim())
            .flush_interval(flush)
            .disk_budget(u64::MAX)
            .start()
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.catalog().is_none_or(|c| c.meter("meter_0").is_none()) {
            if Instant::now() > deadline {
                bail!("agent {i} never received the catalog");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(a)
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

/// Probes and their pollers for one in-process phase.
struct Probes {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ledger: Arc<Mutex<Histogram<u64>>>,
    stripe: Arc<Mutex<Histogram<u64>>>,
    /// Forwarding to Stripe is on.
    forwarding: bool,
}

#[derive(Default)]
struct ProbeState {
    recorded: Vec<Instant>,
    committed: Vec<Instant>,
    forwarded: usize,
}

impl Probes {
    /// `phase` makes the probe customers unique to this phase.
    fn start(rig: &Arc<Rig>, agents: &[Agent], phase: usize) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(hist()));
        let stripe = Arc::new(Mutex::new(hist()));
        let mut tasks = Vec::new();
        for (a, agent) in agents.iter().enumerate() {
            let st = Arc::new(Mutex::new(ProbeState::default()));
            let customer = format!("cus_probe_{phase}_{a}");
            // Recorder.
            {
                let (agent, st, stop, customer) =
                    (agent.clone(), st.clone(), stop.clone(), customer.clone());
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(PROBE_EVERY);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        if agent
                            .record_with(&customer, "meter_0", &[("model", "m0")], Decimal::ONE)
                            .is_ok()
                        {
                            lock(&st).recorded.push(Instant::now());
                        }
                    }
                }));
            }
            // Ledger poller: runs until told to stop and every recorded probe is committed.
            {
                let (rig, st, stop, ledger) =
                    (rig.clone(), st.clone(), stop.clone(), ledger.clone());
                let path = format!("/v1/usage?customer={customer}&meter=meter_0");
                tasks.push(tokio::spawn(async move {
                    loop {
                        let (s, b) = http(rig.admin, "GET", &path, Some(&rig.token), None).await;
                        let now = Instant::now();
                        let n = (s == 200)
                            .then(|| serde_json::from_str::<serde_json::Value>(&b).ok())
                            .flatten()
                            .and_then(|v| {
                                v["quantity"].as_str().and_then(|q| q.parse::<u64>().ok())
                            })
                            .unwrap_or(0) as usize;
                        {
                            let mut g = lock(&st);
                            while g.committed.len() < n.min(g.recorded.len()) {
                                let k = g.committed.len();
                                let us = now.duration_since(g.recorded[k]).as_micros() as u64;
                                let _ = lock(&ledger).record(us);
                                g.committed.push(now);
                            }
                            if stop.load(Ordering::Relaxed) && g.committed.len() >= g.recorded.len()
                            {
                                return;
                            }
                        }
                        tokio::time::sleep(POLL_EVERY).await;
                    }
                }));
            }
            // Stripe poller.
            if rig.stripe.is_some() {
                let (rig, st, stop, hist) = (rig.clone(), st.clone(), stop.clone(), stripe.clone());
                tasks.push(tokio::spawn(async move {
                    let key = (customer, String::from("meter_0"));
                    loop {
                        let n = rig
                            .stripe
                            .as_ref()
                            .and_then(|s| s.totals().get(&key).copied())
                            .unwrap_or(0)
                            / STRIPE_SCALE;
                        let now = Instant::now();
                        {
                            let mut g = lock(&st);
                            while g.forwarded < (n as usize).min(g.committed.len()) {
                                let k = g.forwarded;
                                let _ = lock(&hist)
                                    .record(now.duration_since(g.committed[k]).as_micros() as u64);
                                g.forwarded += 1;
                            }
                            if stop.load(Ordering::Relaxed) && g.forwarded >= g.recorded.len() {
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
            }
        }
        Probes {
            stop,
            tasks,
            ledger,
            stripe,
            forwarding: rig.stripe.is_some(),
        }
    }

    /// Stops recording probes and waits (up to `wait`) until the pollers saw every one.
    async fn finish(self, wait: Duration) -> (Pct, Option<Pct>, bool) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + wait;
        let mut all = true;
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
                all = false;
            }
        }
        let ledger = Pct::of_us(&lock(&self.ledger));
        let stripe = Pct::of_us(&lock(&self.stripe));
        (ledger, self.forwarding.then_some(stripe), all)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// CPU readings of the processes of a phase.
struct Watch(Vec<(String, String, Option<procstat::Sample>)>);

impl Watch {
    fn start(procs: &[(String, String)]) -> Watch {
        Watch(
            procs
                .iter()
                .map(|(n, p)| (n.clone(), p.clone(), procstat::sample(p)))
                .collect(),
        )
    }

    fn finish(self) -> Vec<ProcUse> {
        self.0
            .into_iter()
            .map(|(name, pid, a)| ProcUse {
                cpu_percent: match (a, procstat::sample(&pid)) {
                    (Some(a), Some(b)) => procstat::cpu_percent(a, b),
                    _ => f64::NAN,
                },
                memory: procstat::memory(&pid),
                name,
            })
            .collect()
    }
}

/// One in-process phase: `threads` recording threads over `agents` at `rate` (0 = unpaced)
/// for `duration`, probes, then a flush of every agent. Adds what was recorded to `expected`.
async fn in_process(
    rig: &Arc<Rig>,
    agents: &[Agent],
    cfg: &Config,
    rate: u64,
    duration: Duration,
    phase: usize,
    expected: &mut Totals,
) -> anyhow::Result<InProcess> {
    let watch = Watch::start(&[
        ("collector".into(), rig.collector_pid()),
        (
            "load (in-process agents and recording threads)".into(),
            "self".into(),
        ),
    ]);
    let probes = Probes::start(rig, agents, phase);
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let per_thread = (rate as f64) / cfg.threads as f64;
    let mut threads = Vec::new();
    for t in 0..cfg.threads {
        let (agent, stop, names, w) = (
            agents[t % agents.len()].clone(),
            stop.clone(),
            rig.names.clone(),
            rig.w,
        );
        let stream = (phase as u64) * 1_000 + t as u64;
        threads.push(std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    let e = w.event(stream, i);
                    agent.record_with(
                        &names.customers[e.customer as usize],
                        &names.meters[e.meter as usize],
                        &[("model", &names.dims[e.dim as usize])],
                        e.quantity,
                    )?;
                    i += 1;
                }
                if per_thread > 0.0 {
                    let due = began + Duration::from_secs_f64(i as f64 / per_thread);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
            }
            Ok((stream, i))
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut streams = Vec::new();
    for t in threads {
        streams.push(
            t.join()
                .map_err(|_| anyhow::anyhow!("recording thread panicked"))??,
        );
    }
    let record_seconds = began.elapsed().as_secs_f64();
    for a in agents {
        a.flush(Duration::from_secs(120)).await?;
    }
    let to_ledger_seconds = began.elapsed().as_secs_f64();
    // The first phase waits for its probes to reach Stripe too; sweep points do not.
    let wait = Duration::from_secs(if phase == 0 { 120 } else { 5 });
    let (record_to_ledger_ms, ledger_to_stripe_ms, _) = probes.finish(wait).await;
    let processes = watch.finish();
    let events: u64 = streams.iter().map(|s| s.1).sum();
    rig.w.add_totals(&streams, expected);
    Ok(InProcess {
        offered_per_s: rate,
        events,
        record_seconds,
        record_per_s: events as f64 / record_seconds,
        to_ledger_seconds,
        to_ledger_per_s: events as f64 / to_ledger_seconds,
        record_to_ledger_ms,
        ledger_to_stripe_ms,
        processes,
    })
}

/// A sidecar's `/v1/status`; `(0, "")` while it is not listening yet.
async fn sidecar_status(addr: SocketAddr) -> (u16, String) {
    crate::harness::request(
        addr,
        "GET",
        "/v1/status",
        "text/plain",
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_default()
}

struct Sidecar {
    proc: Proc,
    http: SocketAddr,
}

async fn start_sidecar(rig: &Rig, cfg: &Config, i: usize) -> anyhow::Result<Sidecar> {
    let http_addr = free_tcp_port()?;
    let child = Command::new(&cfg.agent_bin)
        .arg("run")
        .arg("--data-dir")
        .arg(rig.root.join(format!("sidecar-{i}")))
        .args(["--collector", &rig.quic.to_string()])
        .arg("--ca")
        .arg(rig.root.join("collector/ca.pem"))
        .arg("--enroll-token-file")
        .arg(rig.root.join("collector/enroll-token"))
        .args(["--http", &http_addr.to_string()])
        .args(["--flush-interval-ms", &cfg.flush.as_millis().to_string()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn tally-agent")?;
    let sc = Sidecar {
        proc: Proc(child),
        http: http_addr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Ready, and the catalog is there (events of an unknown type would be refused).
        let (s, b) = sidecar_status(sc.http).await;
        if s == 200 && b.contains("\"catalog_version\":") && !b.contains("\"catalog_version\":null")
        {
            return Ok(sc);
        }
        if Instant::now() > deadline {
            bail!("sidecar {i} never became ready: {s} {b}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sidecar phase: `clients` keep-alive clients posting `batch` events a request.
async fn sidecar_phase(
    rig: &Arc<Rig>,
    sidecars: &[Sidecar],
    cfg: &Config,
    batch: usize,
    expected: &mut Totals,
) -> anyhow::Result<SidecarRun> {
    let mut procs = vec![("collector".to_owned(), rig.collector_pid())];
    for (i, s) in sidecars.iter().enumerate() {
        procs.push((format!("sidecar {i}"), s.proc.0.id().to_string()));
    }
    procs.push(("load (HTTP clients)".into(), "self".into()));
    // reqwest is built without a TLS provider (plain HTTP here, but it wants one installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let watch = Watch::start(&procs);
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for j in 0..cfg.clients {
        let addr = sidecars[j % sidecars.len()].http;
        let (stop, names, w) = (stop.clone(), rig.names.clone(), rig.w);
        let stream = SIDECAR_STREAMS + (batch as u64) * 1_000 + j as u64;
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()?;
            let url = format!("http://{addr}/api/v1/events");
            let mut h = hist();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body: Vec<String> = (i..i + batch as u64)
                    .map(|k| workload::cloudevent(&w, &names, stream, k))
                    .collect();
                let body = format!("[{}]", body.join(","));
                let t0 = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body)
                    .send()
                    .await?;
                let status = r.status().as_u16();
                if status != 204 {
                    let text = r.text().await.unwrap_or_default();
                    bail!("sidecar answered {status}: {text}");
                }
                let _ = h.record(t0.elapsed().as_micros() as u64);
                i += batch as u64;
            }
            Ok::<_, anyhow::Error>((stream, i, h))
        }));
    }
    tokio::time::sleep(cfg.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut h = hist();
    let mut streams = Vec::new();
    for t in tasks {
        let (stream, n, th) = t.await??;
        h.add(th)?;
        streams.push((stream, n));
    }
    let seconds = began.elapsed().as_secs_f64();
    let processes = watch.finish();
    for s in sidecars {
        let (st, b) = http(s.http, "POST", "/v1/flush", None, Some("")).await;
        if st / 100 != 2 {
            bail!("flush sidecar: {st} {b}");
        }
    }
    let events: u64 = streams.iter().map(|s| s.1).sum();
    rig.w.add_totals(&streams, expected);
    Ok(SidecarRun {
        batch,
        clients: cfg.clients,
        events,
        events_per_s: events as f64 / seconds,
        request_ms: Pct::of_us(&h),
        processes,
    })
}

/// `fdatasync` latency of an appended 200-byte record in `dir`, µs: p50, p99.
fn fdatasync_probe(dir: &Path) -> anyhow::Result<[u64; 2]> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fsync-probe"))?;
    let mut h = hist();
    for _ in 0..300 {
        f.write_all(&[7u8; 200])?;
        let t0 = Instant::now();
        f.sync_data()?;
        let _ = h.record(t0.elapsed().as_micros() as u64);
    }
    Ok([h.value_at_quantile(0.5), h.value_at_quantile(0.99)])
}

/// Runs every phase once and reports.
pub async fn run(cfg: &Config) -> anyhow::Result<Report> {
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let rig = Arc::new(Rig::start(cfg).await?);
    let machine = Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average,
        fdatasync_us: fdatasync_probe(&rig.root)?,
    };
    let mut expected = Totals::new();
    let mut ledger_exact = true;

    eprintln!(
        "in-process: {} agents, {} threads, {:?}",
        cfg.agents, cfg.threads, cfg.duration
    );
    let mut agents = Vec::new();
    for i in 0..cfg.agents {
        agents.push(rig.agent(i, cfg.flush).await?);
    }
    let in_proc = in_process(&rig, &agents, cfg, cfg.rate, cfg.duration, 0, &mut expected).await?;
    ledger_exact &= rig.ledger_equals(&expected).await?;

    let mut sweep = Vec::new();
    let top = in_proc.to_ledger_per_s;
    for (k, f) in cfg.sweep.iter().enumerate() {
        let rate = (top * f).max(1.0) as u64;
        eprintln!("sweep: {rate} events/s offered");
        sweep.push(
            in_process(
                &rig,
                &agents,
                cfg,
                rate,
                cfg.sweep_duration,
                k + 1,
                &mut expected,
            )
            .await?,
        );
    }
    if !cfg.sweep.is_empty() {
        ledger_exact &= rig.ledger_equals(&expected).await?;
    }
    for a in &agents {
        a.shutdown(Duration::from_secs(30)).await?;
    }

    let mut sidecar = Vec::new();
    if cfg.sidecars > 0 {
        let mut scs = Vec::new();
        for i in 0..cfg.sidecars {
            scs.push(start_sidecar(&rig, cfg, i).await?);
        }
        for &b in &cfg.batches {
            eprintln!("sidecar: {b} events a request, {} clients", cfg.clients);
            sidecar.push(sidecar_phase(&rig, &scs, cfg, b, &mut expected).await?);
        }
        ledger_exact &= rig.ledger_equals(&expected).await?;
    }

    let (mut stripe_exact, mut stripe_drain_seconds) = (None, None);
    if rig.stripe.is_some() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(180);
        loop {
            if rig.stripe_equals(&expected).await {
                stripe_exact = Some(true);
                stripe_drain_seconds = Some(t0.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                stripe_exact = Some(false);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The baseline's driver blocks; it runs (and drops its scratch database) off the runtime.
    let mut base = Vec::new();
    if let Some(url) = cfg.postgres_url.clone() {
        let (names, w, workers, d) = (rig.names.clone(), rig.w, cfg.clients, cfg.duration);
        let batches = cfg.batches.clone();
        base = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
            let db = baseline::ScratchDb::create(&url)?;
            let mut out = Vec::new();
            for b in batches {
                eprintln!("baseline: PostgreSQL, {b} events a transaction, {workers} workers");
                out.push(baseline::run(&db, w, &names, workers, b, d)?);
            }
            Ok(out)
        })
        .await??;
    }

    let mut ratios = Vec::new();
    let by_batch = |b: usize| base.iter().find(|r| r.batch == b).map(|r| r.events_per_s);
    if let Some(top_batch) = cfg.batches.iter().copied().max()
        && let Some(bl) = by_batch(top_batch)
    {
        ratios.push(Ratio {
            name: format!("in-process record → exact ledger vs PostgreSQL row per event, {top_batch} a transaction"),
            ours: in_proc.to_ledger_per_s,
            baseline: bl,
            ratio: in_proc.to_ledger_per_s / bl,
            goal: 100.0,
        });
    }
    for s in &sidecar {
        if let Some(bl) = by_batch(s.batch) {
            ratios.push(Ratio {
                name: format!(
                    "sidecar durable HTTP ingest, {} a request, vs PostgreSQL, {} a transaction",
                    s.batch, s.batch
                ),
                ours: s.events_per_s,
                baseline: bl,
                ratio: s.events_per_s / bl,
                goal: 5.0,
            });
        }
    }
    Ok(Report {
        machine,
        workload: cfg.workload,
        stripe: cfg.stripe,
        flush_ms: cfg.flush.as_millis() as u64,
        in_process: in_proc,
        sweep,
        sidecar,
        baseline: base,
        ratios,
        ledger_exact,
        stripe_exact,
        stripe_drain_seconds,
    })
}

/// The report as a plain-text table.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "machine: {} cores, load average {}, fdatasync p50 {} µs p99 {} µs",
        r.machine.cores,
        r.machine.load_average,
        r.machine.fdatasync_us[0],
        r.machine.fdatasync_us[1]
    );
    let _ = writeln!(
        o,
        "workload: {} customers × {} meters × {} dimension values; flush {} ms; Stripe forwarding {}",
        r.workload.customers,
        r.workload.meters,
        r.workload.dimensions,
        r.flush_ms,
        if r.stripe { "on" } else { "off" }
    );
    let _ = writeln!(
        o,
        "\n{:<44} {:>12} {:>12} {:>9} {:>9} {:>9}",
        "phase", "events", "events/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let ip = &r.in_process;
    let _ = writeln!(
        o,
        "{:<44} {:>12} {:>12.0} {:>9} {:>9} {:>9}",
        "in-process record()", ip.events, ip.record_per_s, "", "", ""
    );
    let _ = writeln!(
        o,
        "{:<44} {:>12} {:>12.0} {:>9.1} {:>9.1} {:>9.1}",
        "  record → ledger committed (exact)",
        ip.events,
        ip.to_ledger_per_s,
        ip.record_to_ledger_ms.p50,
        ip.record_to_ledger_ms.p99,
        ip.record_to_ledger_ms.p999
    );
    if let Some(s) = &ip.ledger_to_stripe_ms {
        let _ = writeln!(
            o,
            "{:<44} {:>12} {:>12} {:>9.1} {:>9.1} {:>9.1}",
            "  ledger → Stripe-compatible server", s.count, "", s.p50, s.p99, s.p999
        );
    }
    for p in &r.sweep {
        let _ = writeln!(
            o,
            "{:<44} {:>12} {:>12.0} {:>9.1} {:>9.1} {:>9.1}",
            format!("  offered {} events/s → ledger", p.offered_per_s),
            p.events,
            p.to_ledger_per_s,
            p.record_to_ledger_ms.p50,
            p.record_to_ledger_ms.p99,
            p.record_to_ledger_ms.p999
        );
    }
    for s in &r.sidecar {
        let _ = writeln!(
            o,
            "{:<44} {:>12} {:>12.0} {:>9.2} {:>9.2} {:>9.2}",
            format!("sidecar HTTP, {} a request, {} clients", s.batch, s.clients),
            s.events,
            s.events_per_s,
            s.request_ms.p50,
            s.request_ms.p99,
            s.request_ms.p999
        );
    }
    for b in &r.baseline {
        let _ = writeln!(
            o,
            "{:<44} {:>12} {:>12.0} {:>9.2} {:>9.2} {:>9.2}",
            format!(
                "PostgreSQL row/event, {} a txn, {} conns",
                b.batch, b.workers
            ),
            b.events,
            b.events_per_s,
            b.txn_us[0] as f64 / 1e3,
            b.txn_us[1] as f64 / 1e3,
            b.txn_us[2] as f64 / 1e3
        );
    }
    for b in &r.baseline {
        let _ = writeln!(
            o,
            "  then SUM per customer and meter: {:.0} ms over {} rows, exact: {}",
            b.sum_ms, b.events, b.exact
        );
    }
    let _ = writeln!(
        o,
        "\n{:<44} {:>8} {:>10} {:>10}",
        "process (phase)", "CPU %", "RSS MiB", "peak MiB"
    );
    let mut rows: Vec<(String, &ProcUse)> = ip
        .processes
        .iter()
        .map(|p| (format!("{} (in-process)", p.name), p))
        .collect();
    for s in &r.sidecar {
        rows.extend(
            s.processes
                .iter()
                .map(|p| (format!("{} (sidecar {}/req)", p.name, s.batch), p)),
        );
    }
    for (n, p) in rows {
        let _ = writeln!(
            o,
            "{:<44} {:>8.0} {:>10.1} {:>10.1}",
            n,
            p.cpu_percent,
            p.memory.rss_kib as f64 / 1024.0,
            p.memory.peak_kib as f64 / 1024.0
        );
    }
    if !r.ratios.is_empty() {
        let _ = writeln!(o, "\n{:<84} {:>8} {:>6}", "ratio", "×", "goal");
        for x in &r.ratios {
            let _ = writeln!(o, "{:<84} {:>8.1} {:>6.0}", x.name, x.ratio, x.goal);
        }
    }
    let _ = writeln!(
        o,
        "\nledger exact: {}; Stripe exact: {}",
        r.ledger_exact,
        r.stripe_exact.map_or("n/a".to_owned(), |b| format!(
            "{b} (drained {:.1} s after the last flush)",
            r.stripe_drain_seconds.unwrap_or(f64::NAN)
        ))
    );
    o
}
