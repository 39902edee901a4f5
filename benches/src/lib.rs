//! Criterion benchmarks for Tally live in `benches/benches/`. This library holds the
//! deterministic simulation of the whole system ([`sim`]), which the `simulate` binary and the
//! tests drive.

pub mod sim;
