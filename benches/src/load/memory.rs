//! Memory figures (issue 14): what grows with what.
//! - an agent's resident memory with 10k, 100k and 1M distinct keys in its aggregator, each
//!   count in a fresh child process (`load --agent-keys K`), so one measurement's freed pages
//!   do not hide the next one's;
//! - a sidecar whose collector is down until its disk budget is full (`--overflow reject`);
//! - the collector after `deltas` deltas from `agents` agents, sampled as the history grows:
//!   it should stay flat, not grow with history.

use super::procstat::{self, Memory};
use crate::harness::common::Proc;
use crate::harness::free_tcp_port;
use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tally_agent::Agent;

/// An agent with `keys` distinct keys.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AgentKeys {
    /// Distinct (customer, meter) keys recorded.
    pub keys: u64,
    /// Resident before the first record, KiB.
    pub before_kib: u64,
    /// Resident after the last, KiB.
    pub after_kib: u64,
    /// (after − before) ÷ keys.
    pub bytes_per_key: f64,
}

/// In this process (the child of [`agent_keys`]): an agent with no collector and a flush
/// interval of an hour, so every key stays in memory; prints one JSON line.
pub async fn agent_keys_child(keys: u64) -> anyhow::Result<AgentKeys> {
    let dir = tempfile::tempdir()?;
    let agent = Agent::builder()
        .data_dir(dir.path())
        .flush_interval(Duration::from_secs(3600))
        .disk_budget(u64::MAX)
        .start()
        .await?;
    agent.record("warm-up", "api_calls", Decimal::ONE)?;
    let before = procstat::memory("self").rss_kib;
    let mut name = String::with_capacity(32);
    for k in 0..keys {
        use std::fmt::Write;
        name.clear();
        let _ = write!(name, "cust-{k:07}");
        agent.record(&name, "api_calls", Decimal::new(k as i64 % 1000 + 1, 2))?;
    }
    let after = procstat::memory("self").rss_kib;
    let out = AgentKeys {
        keys,
        before_kib: before,
        after_kib: after,
        bytes_per_key: (after.saturating_sub(before) as f64 * 1024.0) / keys as f64,
    };
    agent.shutdown(Duration::from_secs(1)).await.ok();
    Ok(out)
}

/// Runs [`agent_keys_child`] in a fresh process of this executable for each count.
pub fn agent_keys(counts: &[u64]) -> anyhow::Result<Vec<AgentKeys>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for &k in counts {
        let o = Command::new(&exe)
            .args(["--agent-keys", &k.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("run the agent-keys child")?;
        if !o.status.success() {
            bail!("agent-keys child for {k} keys failed");
        }
        out.push(serde_json::from_slice(&o.stdout).context("child's JSON")?);
    }
    Ok(out)
}

/// A sidecar whose disk budget filled while its collector was down.
#[derive(Debug, Clone, Serialize)]
pub struct FullBudget {
    /// The budget, bytes.
    pub budget_bytes: u64,
    /// Events accepted before the first 429.
    pub events_accepted: u64,
    /// The sidecar's memory with its budget full.
    pub memory: Memory,
}

/// Deltas sent to a collector, and its memory, as history grows.
#[derive(Debug, Clone, Serialize)]
pub struct CollectorPoint {
    /// Agents that have sent so far.
    pub agents: u64,
    /// Deltas committed so far.
    pub deltas: u64,
    /// The collector's memory then.
    pub memory: Memory,
}

/// The memory part of a run.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Agent RSS per distinct key count.
    pub agent_keys: Vec<AgentKeys>,
    /// A sidecar at its disk budget.
    pub full_budget: FullBudget,
    /// The collector as history grows.
    pub collector: Vec<CollectorPoint>,
}

struct Collector {
    _dir: tempfile::TempDir,
    root: PathBuf,
    proc: Proc,
    quic: std::net::SocketAddr,
}

async fn collector(bin: &std::path::Path) -> anyhow::Result<Collector> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("collector");
    let running = super::start_collector(bin, &root, |cmd| {
        cmd.env("RUST_LOG", "warn").stderr(Stdio::null());
        Ok(())
    })
    .await?;
    for m in ["api_calls", "tokens", "storage", "requests"] {
        let body =
            format!(r#"{{"aggregation":"sum","event_type":"{m}","value_property":"$.value"}}"#);
        super::put_meter(running.admin, &running.token, m, &body).await?;
    }
    let super::Running { proc, quic, .. } = running;
    Ok(Collector {
        _dir: dir,
        root,
        proc,
        quic,
    })
}

/// A sidecar with a `budget`-byte disk budget and `--overflow reject`, its collector stopped
/// after the catalog reached it; posts 100-event requests until the first 429.
pub async fn full_budget(
    collector_bin: &std::path::Path,
    agent_bin: &std::path::Path,
    budget: u64,
) -> anyhow::Result<FullBudget> {
    let c = collector(collector_bin).await?;
    let http_addr = free_tcp_port()?;
    let data = c.root.parent().context("root")?.join("sidecar");
    let sc = Proc(
        Command::new(agent_bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&data)
            .args(["--collector", &c.quic.to_string()])
            .arg("--ca")
            .arg(c.root.join("ca.pem"))
            .arg("--enroll-token-file")
            .arg(c.root.join("enroll-token"))
            .args(["--http", &http_addr.to_string()])
            .args(["--flush-interval-ms", "100"])
            .args(["--disk-budget", &budget.to_string(), "--overflow", "reject"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b) = super::sidecar_status(http_addr).await;
        if s == 200 && !b.contains("\"catalog_version\":null") && b.contains("catalog_version") {
            break;
        }
        if Instant::now() > deadline {
            bail!("sidecar never got the catalog: {s} {b}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Collector { proc, .. } = c;
    drop(proc); // SIGKILL: the collector is down from here on.
    let mut accepted = 0u64;
    let mut r = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let evs: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    r#"{{"specversion":"1.0","id":"f{r}-{i}","source":"load","type":"api_calls","subject":"cust-{}","data":{{"value":"1.25"}}}}"#,
                    (r * 100 + i) % 5_000
                )
            })
            .collect();
        let body = format!("[{}]", evs.join(","));
        let (s, b) = crate::harness::request(
            http_addr,
            "POST",
            "/api/v1/events",
            "application/cloudevents-batch+json",
            body.as_bytes(),
            Duration::from_secs(30),
        )
        .await
        .context("no answer from the sidecar")?;
        match s {
            204 => accepted += 100,
            429 | 507 => break,
            _ => bail!("sidecar answered {s}: {b}"),
        }
        r += 1;
        if Instant::now() > deadline {
            bail!("the budget never filled");
        }
    }
    Ok(FullBudget {
        budget_bytes: budget,
        events_accepted: accepted,
        memory: procstat::memory(&sc.0.id().to_string()),
    })
}

/// `agents` agents, one after the other in groups of 4 at a time, each enrolling and sending
/// `deltas / agents` deltas in batches of 1,000 over 10,000 customers and 4 meters; the
/// collector's memory after every tenth of the agents.
pub async fn collector_history(
    collector_bin: &std::path::Path,
    agents: u64,
    deltas: u64,
) -> anyhow::Result<Vec<CollectorPoint>> {
    use tally_collector::testkit::TestClient;
    use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
    use tally_protocol::ed25519_dalek::SigningKey;
    use tally_protocol::frame::{AckOutcome, Frame};
    use tally_protocol::names::{CustomerId, Dimensions, MeterName};

    let c = collector(collector_bin).await?;
    let ca = std::fs::read(c.root.join("ca.pem"))?;
    let enroll = std::fs::read_to_string(c.root.join("enroll-token"))?
        .trim()
        .to_owned();
    let pid = c.proc.0.id().to_string();
    let per_agent = (deltas / agents.max(1)).max(1_000);
    let batches = per_agent / 1_000;
    let meters = ["api_calls", "tokens", "storage", "requests"];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let mut points = vec![CollectorPoint {
        agents: 0,
        deltas: 0,
        memory: procstat::memory(&pid),
    }];
    let step = (agents / 10).max(1);
    let mut done = 0u64;
    while done < agents {
        let group: Vec<u64> = (done..(done + 4).min(agents)).collect();
        let mut tasks = Vec::new();
        for a in group.iter().copied() {
            let (ca, enroll, quic) = (ca.clone(), enroll.clone(), c.quic);
            tasks.push(tokio::spawn(async move {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(a + 1).to_le_bytes());
                seed[31] = 0x5a;
                let key = SigningKey::from_bytes(&seed);
                let id = AgentId::from_public_key(&key.verifying_key());
                let mut client = TestClient::connect(quic, &ca, &key, Some(&enroll)).await?;
                let mut x = a.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for seq in 1..=batches {
                    let deltas: Vec<Delta> = (0..1_000)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            Ok(Delta::single(
                                CustomerId::new(format!("cust-{:05}", x % 10_000))?,
                                MeterName::new(meters[(x >> 20) as usize % 4])?,
                                Dimensions::default(),
                                now,
                                Decimal::new((x >> 32) as i64 % 10_000 + 1, 2),
                            ))
                        })
                        .collect::<anyhow::Result<_>>()?;
                    let body = BatchBody::new(id, 1, seq, now, deltas)?;
                    let batch = SignedBatch::seal(&body, &key)?;
                    client.send(&Frame::Batch(batch)).await?;
                    match client.next_reply().await? {
                        Frame::Ack(a) if a.outcome == AckOutcome::Committed => {}
                        other => bail!("unexpected answer {other:?}"),
                    }
                }
                client.close().await;
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let before = done;
        done += group.len() as u64;
        if done / step != before / step || done == agents {
            let p = CollectorPoint {
                agents: done,
                deltas: done * batches * 1_000,
                memory: procstat::memory(&pid),
            };
            eprintln!(
                "collector: {} agents, {} deltas, RSS {} MiB",
                p.agents,
                p.deltas,
                p.memory.rss_kib / 1024
            );
            points.push(p);
        }
    }
    // The ledger afterwards: the collector SIGKILLed, then `ledger verify` on its file (over
    // 10M deltas it takes longer than an HTTP helper's timeout).
    let Collector {
        proc, root, _dir, ..
    } = c;
    drop(proc);
    let out = Command::new(collector_bin)
        .args(["ledger", "verify", "--data-dir"])
        .arg(&root)
        .output()?;
    if !out.status.success() {
        bail!(
            "ledger verify: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(points)
}
