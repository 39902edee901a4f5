//! Criterion benchmarks for Tally live in `benches/benches/`. This library holds the
//! deterministic simulation of the whole system ([`sim`]) and the process-level fault harness
//! ([`harness`]), which the `simulate` and `faults` binaries and the tests drive, and the load
//! generator ([`load`]) behind the `load` binary.

pub mod harness;
pub mod load;
pub mod sim;
