//! Replays the sidecar's fuzz corpora in `fuzz/corpus/` through the fuzz targets' entry points,
//! so they run on every `cargo test` and cannot rot; findings once fixed stay here as files.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
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

#[test]
fn cloudevents_corpus() {
    let catalog = tally_sidecar::fuzz::catalog();
    let files = corpus("cloudevents");
    assert!(files.len() >= 5, "seed corpus too small");
    for (path, data) in files {
        eprintln!("{}", path.display());
        tally_sidecar::fuzz::cloudevents(&catalog, &data);
    }
}

#[test]
fn stripe_form_corpus() {
    let catalog = tally_sidecar::fuzz::catalog();
    let files = corpus("stripe_form");
    assert!(files.len() >= 5, "seed corpus too small");
    for (path, data) in files {
        eprintln!("{}", path.display());
        tally_sidecar::fuzz::stripe_form(&catalog, &data);
    }
}
