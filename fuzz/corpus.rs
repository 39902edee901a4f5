//! Reads a fuzz target's seed corpus (`fuzz/corpus/<target>/`), for the tests that replay the
//! corpora through the targets' entry points (included with `#[path]` by each crate's
//! `tests/fuzz_corpus.rs`).

use std::path::PathBuf;

/// Every file of `target`'s corpus, sorted by name, with its path.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}
