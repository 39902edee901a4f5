//! A deterministic simulation of the whole system, in the spirit of TigerBeetle's VOPR and
//! quinn-proto's test `Pair`: several agents, a collector and Stripe, driven through their real
//! sans-IO cores on one simulated clock, a simulated network and disks that can crash. A seed
//! chooses the workload and the faults; after every run an auditor checks the end state
//! (`auditor`). The same seed always replays the same run.
//!
//! Modules, one per concept: [`rng`] (the seeded generator), [`workload`] (what the product
//! does), [`net`] (the network), [`disk`] (agent storage that loses unsynced writes),
//! [`faults`] (the seed's fault schedule), [`stripe`] (Stripe's idempotency, with faults),
//! [`agent`] and [`collector`] (the shells around the real cores), [`auditor`] (the checks),
//! [`run`] (one seed → a report).
//!
//! ```no_run
//! let report = tally_benches::sim::run(42, &tally_benches::sim::Options::default());
//! assert!(report.passed(), "{:?}", report.findings);
//! ```

pub mod agent;
pub mod auditor;
pub mod collector;
pub mod disk;
pub mod faults;
pub mod net;
pub mod rng;
pub mod run;
pub mod stripe;
pub mod workload;

pub use run::{Options, Report, run};

/// The one-line command that replays `seed` with `opts`.
pub fn replay_command(seed: u64, opts: &Options) -> String {
    let mut cmd =
        format!("cargo run --release -p tally-benches --bin simulate -- --seed {seed} --seeds 1");
    if opts.broken_dedup {
        cmd.push_str(" --broken-dedup");
    }
    cmd
}
