//! The load generator (`tally_benches::load`) as a command. Builds nothing itself: build the
//! collector and the sidecar first, in the same profile.
//!
//! ```sh
//! cargo build --release -p tally-collector -p tally-sidecar
//! TALLY_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p tally-benches --bin load -- --stripe --json load.json
//! cargo run --release -p tally-benches --bin load -- --memory --json memory.json
//! ```

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use tally_benches::harness::find_bin;
use tally_benches::load::{self, Config, memory, workload::Workload};

/// A collector, in-process agents, sidecar processes and a PostgreSQL row-per-event baseline
/// over the same events; throughput, CPU, memory and latency percentiles.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Distinct customers.
    #[arg(long, default_value_t = 1_000)]
    customers: u32,
    /// Distinct meters.
    #[arg(long, default_value_t = 4)]
    meters: u32,
    /// Distinct values of the one dimension.
    #[arg(long, default_value_t = 3)]
    dimensions: u32,
    /// In-process agents.
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Recording threads over the in-process agents.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Sidecar processes (0 skips the sidecar phases).
    #[arg(long, default_value_t = 1)]
    sidecars: usize,
    /// Concurrent HTTP clients over the sidecars; the baseline's connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Offered events/s of the in-process phase (0: as fast as the threads go).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Agents' flush interval, ms.
    #[arg(long, default_value_t = 200)]
    flush_ms: u64,
    /// Events per HTTP request and per baseline transaction, one phase each.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    batch: Vec<usize>,
    /// Every meter forwards to an in-process Stripe-compatible server.
    #[arg(long)]
    stripe: bool,
    /// PostgreSQL of the row-per-event baseline (skipped when unset).
    #[arg(long, env = "TALLY_TEST_POSTGRES_URL")]
    postgres: Option<String>,
    /// Latency against offered load: fractions of the in-process phase's rate.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.25,0.5,0.75,1.0")]
    sweep: Vec<f64>,
    /// Seconds per sweep point.
    #[arg(long, default_value_t = 5)]
    sweep_seconds: u64,
    /// Memory figures instead: agent keys, a full disk budget, collector history.
    #[arg(long)]
    memory: bool,
    /// Memory: distinct keys per agent measurement.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    keys: Vec<u64>,
    /// Memory: the sidecar's disk budget, bytes.
    #[arg(long, default_value_t = 64 << 20)]
    budget_bytes: u64,
    /// Memory: agents sending to the collector.
    #[arg(long, default_value_t = 1_000)]
    history_agents: u64,
    /// Memory: deltas they send in all.
    #[arg(long, default_value_t = 10_000_000)]
    history_deltas: u64,
    /// Keep the collector's log (`RUST_LOG=info`) in this file.
    #[arg(long)]
    collector_log: Option<PathBuf>,
    /// Write the report as JSON here as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `tally-collector` (default: next to this binary).
    #[arg(long)]
    collector_bin: Option<PathBuf>,
    /// `tally-agent` (default: next to this binary).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Internal: the child process of one agent-keys measurement.
    #[arg(long, hide = true)]
    agent_keys: Option<u64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(k) = a.agent_keys {
        println!(
            "{}",
            serde_json::to_string(&memory::agent_keys_child(k).await?)?
        );
        return Ok(());
    }
    let collector_bin = a
        .collector_bin
        .map_or_else(|| find_bin("tally-collector"), Ok)?;
    let agent_bin = a.agent_bin.map_or_else(|| find_bin("tally-agent"), Ok)?;
    if a.memory {
        let agent_keys = memory::agent_keys(&a.keys)?;
        for k in &agent_keys {
            println!(
                "agent, {:>9} keys: RSS {:>7.1} → {:>7.1} MiB, {:>6.0} bytes a key",
                k.keys,
                k.before_kib as f64 / 1024.0,
                k.after_kib as f64 / 1024.0,
                k.bytes_per_key
            );
        }
        let full_budget = memory::full_budget(&collector_bin, &agent_bin, a.budget_bytes).await?;
        println!(
            "sidecar, disk budget of {} MiB full ({} events accepted): RSS {:.1} MiB, peak {:.1} MiB",
            full_budget.budget_bytes >> 20,
            full_budget.events_accepted,
            full_budget.memory.rss_kib as f64 / 1024.0,
            full_budget.memory.peak_kib as f64 / 1024.0
        );
        let collector =
            memory::collector_history(&collector_bin, a.history_agents, a.history_deltas).await?;
        for p in &collector {
            println!(
                "collector after {:>5} agents, {:>10} deltas: RSS {:>7.1} MiB, peak {:>7.1} MiB",
                p.agents,
                p.deltas,
                p.memory.rss_kib as f64 / 1024.0,
                p.memory.peak_kib as f64 / 1024.0
            );
        }
        let r = memory::MemoryReport {
            agent_keys,
            full_budget,
            collector,
        };
        if let Some(p) = a.json {
            std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
        }
        return Ok(());
    }
    let cfg = Config {
        collector_bin,
        agent_bin,
        workload: Workload {
            customers: a.customers,
            meters: a.meters,
            dimensions: a.dimensions,
        },
        agents: a.agents.max(1),
        threads: a.threads.max(1),
        sidecars: a.sidecars,
        clients: a.clients.max(1),
        rate: a.rate,
        duration: Duration::from_secs(a.seconds),
        flush: Duration::from_millis(a.flush_ms),
        batches: a.batch,
        stripe: a.stripe,
        postgres_url: a.postgres,
        sweep: a.sweep,
        sweep_duration: Duration::from_secs(a.sweep_seconds),
        collector_log: a.collector_log,
    };
    let report = load::run(&cfg).await?;
    print!("{}", load::table(&report));
    if let Some(p) = a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    if !report.ledger_exact || report.stripe_exact == Some(false) {
        anyhow::bail!("totals were not exact");
    }
    Ok(())
}
