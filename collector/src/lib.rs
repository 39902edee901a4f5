//! The Tally collector library (work in progress).
