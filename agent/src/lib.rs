//! The Tally agent library (work in progress).
