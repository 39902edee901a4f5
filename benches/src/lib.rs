//! Criterion benchmarks for Tally live in `benches/benches/`; this library is empty.
