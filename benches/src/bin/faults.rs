//! The process-level fault harness (`tally_benches::harness`) as a command:
//!
//! ```sh
//! cargo build --release -p tally-collector -p tally-sidecar
//! cargo run --release -p tally-benches --bin faults -- --seconds 30 --drop-ppm 50000
//! ```

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use tally_benches::harness::{Config, find_bin, proxy::Rates, run};

/// Real collector and agents behind a lossy UDP relay, SIGKILLed at random; exact totals at the
/// end.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Seed of the kill schedule and the relay (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of traffic and kills.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Datagrams dropped, per million.
    #[arg(long, default_value_t = 30_000)]
    drop_ppm: u32,
    /// Datagrams duplicated, per million.
    #[arg(long, default_value_t = 20_000)]
    dup_ppm: u32,
    /// Datagrams held back (reordered), per million.
    #[arg(long, default_value_t = 20_000)]
    reorder_ppm: u32,
    /// Largest delay of a datagram, ms.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// The agents' flush interval, ms.
    #[arg(long, default_value_t = 50)]
    flush_ms: u64,
    /// The long collector outage, ms.
    #[arg(long, default_value_t = 3_000)]
    outage_ms: u64,
    /// Disk budget of the `block` and `reject` agents, bytes.
    #[arg(long, default_value_t = 6_144)]
    budget_bytes: u64,
    /// `tally-collector` (default: next to this binary).
    #[arg(long)]
    collector_bin: Option<PathBuf>,
    /// `tally-agent` (default: next to this binary).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let seed = a.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).map_or(0, |()| u64::from_le_bytes(b) >> 16)
    });
    println!("faults: seed {seed}");
    let cfg = Config {
        seed,
        duration: Duration::from_secs(a.seconds),
        rates: Rates {
            drop_ppm: a.drop_ppm,
            dup_ppm: a.dup_ppm,
            reorder_ppm: a.reorder_ppm,
            delay_ms_max: a.delay_ms,
        },
        flush_ms: a.flush_ms,
        outage: Duration::from_millis(a.outage_ms),
        budget_bytes: a.budget_bytes,
        collector_bin: match a.collector_bin {
            Some(p) => p,
            None => find_bin("tally-collector")?,
        },
        agent_bin: match a.agent_bin {
            Some(p) => p,
            None => find_bin("tally-agent")?,
        },
    };
    match run(&cfg).await {
        Ok(r) => {
            println!("{r:#?}");
            println!("exact: every posted event counted once; backlogs drained; ledger verified");
            Ok(())
        }
        Err(e) => {
            println!("FAILED: {e:#}");
            println!(
                "replay the schedule: cargo run --release -p tally-benches --bin faults -- --seed {seed} --seconds {}",
                a.seconds
            );
            Err(e)
        }
    }
}
