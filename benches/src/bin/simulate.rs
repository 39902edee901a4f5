//! Runs seeds of the deterministic simulation (`tally_benches::sim`) and stops at the first
//! failure, printing the command that replays it.
//!
//! `cargo run --release -p tally-benches --bin simulate -- --seeds N --seed S`

use clap::Parser;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;
use tally_benches::sim::{Options, Report, replay_command, run};

/// Runs N seeds of the simulation from S.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// First seed (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds, S, S+1, ….
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// Agents per run.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Simulated milliseconds of workload and faults per run.
    #[arg(long, default_value_t = 10_000)]
    workload_ms: i64,
    /// Turn on the deliberately broken dedup (forgets seq 2): the auditor must catch it.
    #[arg(long)]
    broken_dedup: bool,
    /// Print every seed's report.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let start = args.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).map_or(0, |()| u64::from_le_bytes(b) >> 16)
    });
    let opts = Options {
        agents: args.agents.max(1),
        workload_ms: args.workload_ms.max(1),
        broken_dedup: args.broken_dedup,
        ..Options::default()
    };
    println!(
        "simulate: seeds {start}..{} ({} seeds)",
        start + args.seeds,
        args.seeds
    );
    let began = Instant::now();
    let mut total = Report::default();
    let mut revocations = 0u64;
    for seed in start..start.saturating_add(args.seeds) {
        let report = match catch_unwind(AssertUnwindSafe(|| run(seed, &opts))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                Report {
                    seed,
                    findings: vec![format!("panicked: {msg}")],
                    ..Report::default()
                }
            }
        };
        if args.verbose {
            println!("{report:?}");
        }
        add(&mut total, &report);
        revocations += u64::from(report.revoked);
        if !report.passed() {
            println!("seed {seed} FAILED:");
            for f in &report.findings {
                println!("  {f}");
            }
            println!("replay: {}", replay_command(seed, &opts));
            return std::process::ExitCode::FAILURE;
        }
    }
    let secs = began.elapsed().as_secs_f64();
    println!(
        "passed {} seeds in {secs:.1} s ({:.1} seeds/s): {} ops, {} batches sealed, {} ingested \
         ({} duplicates), {} agent crashes, {} collector crashes, {} agent-disk-full ticks, {} \
         revocations, {} calls refused, {} frames ({} packets lost, {} duplicated, {} reordered, {} connections \
         broken), {} Stripe requests ({} refused, {} processed with the answer lost or 500), {} \
         `record` calls lost inside the loss window, 0 durable events lost",
        args.seeds,
        args.seeds as f64 / secs.max(1e-9),
        total.ops,
        total.batches_sealed,
        total.batches_ingested,
        total.duplicates,
        total.agent_crashes,
        total.collector_crashes,
        total.disk_full_ticks,
        revocations,
        total.refused,
        total.net.frames,
        total.net.lost,
        total.net.duplicated,
        total.net.reordered,
        total.net.broken,
        total.stripe.requests,
        total.stripe.refused,
        total.stripe.processed_unknown,
        total.record_lost,
    );
    std::process::ExitCode::SUCCESS
}

fn add(t: &mut Report, r: &Report) {
    t.ops += r.ops;
    t.agent_crashes += r.agent_crashes;
    t.collector_crashes += r.collector_crashes;
    t.disk_full_ticks += r.disk_full_ticks;
    t.batches_sealed += r.batches_sealed;
    t.batches_ingested += r.batches_ingested;
    t.duplicates += r.duplicates;
    t.record_lost += r.record_lost;
    t.refused += r.refused;
    t.net.frames += r.net.frames;
    t.net.lost += r.net.lost;
    t.net.duplicated += r.net.duplicated;
    t.net.reordered += r.net.reordered;
    t.net.broken += r.net.broken;
    t.net.connections += r.net.connections;
    t.stripe.requests += r.stripe.requests;
    t.stripe.refused += r.stripe.refused;
    t.stripe.processed_unknown += r.stripe.processed_unknown;
    t.stripe.duplicates += r.stripe.duplicates;
}
